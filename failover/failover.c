/* failover.c: the failover module on a running node: adapts consensus/ to
 * the role machine's view (role.h), ticks it every heartbeat, answers the
 * data plane (serve/forward/hold) and the load balancer's health checks
 * from the role machine only, and takes the decisions: planned switchover,
 * failback to the preferred zone, degraded handover and the witness's
 * immediate hand-off.
 *
 * Each tick: the role machine's TILT guard, lease renewal and handover; then,
 * unless the loop stalled, the decisions. Every reader (serve mode,
 * health, metrics, status, alerts) goes through role_current(), so what a
 * node does is always what its role_changed log lines say.
 *
 * Failure modes: a failed barrier lets the lease lapse; a failed or
 * refused transfer ends the handover with the node back to ACTIVE (logged
 * switchover_failed); a witness hand-off that fails is retried next tick.
 */
#include "failover/failover.h"

#include "base/base.h"
#include "config/config.h"
#include "consensus/consensus.h"
#include "failover/role.h"
#include "gateway/gateway.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEGRADED_HANDOVER_COOLDOWN_MS 30000

struct failover {
  uv_loop_t *loop;
  struct consensus *cs;
  struct gateway *gw;
  uv_timer_t tick;
  struct failover_view view;
  struct role_machine rm;
  /* config */
  char node_id[64], zone[32];
  bool witness;
  unsigned election_timeout_ms, heartbeat_ms, max_lag;
  char preferred_zone[32];
  bool failback_auto;
  unsigned failback_after_s;
  /* failback */
  char failback_candidate[64];
  uint64_t failback_healthy_since_ms;
  uint64_t last_degraded_handover_ms;
  /* witness hand-off: the term it was last tried in */
  uint64_t witness_handoff_term;
  bool witness_handoff_inflight;
  /* metrics */
  char last_leader_id[64];
  uint64_t leader_changes;
  /* consensus calls in flight (their callbacks keep `f` alive on close) */
  unsigned ops_inflight;
  void (*barrier_cb)(void *arg, int status);
  void *barrier_arg;
  void (*transfer_cb)(void *arg, int status);
  void *transfer_arg;
  bool closing, tick_closed;
  void (*close_done)(void *);
  void *close_arg;
};

/* ---- the cluster view over consensus/ -------------------------------- */

static uint64_t view_now(void *ud) {
  return zg_mono_ms();
}

static uint64_t view_term(void *ud) {
  return consensus_term(((struct failover *)ud)->cs);
}

static bool view_raft_leader(void *ud) {
  struct failover *f = ud;
  const struct consensus_member *leader = consensus_leader(f->cs);
  const struct consensus_member *self = consensus_self(f->cs);
  return leader && self && strcmp(leader->id, self->id) == 0;
}

static bool view_leader_known(void *ud) {
  return consensus_leader(((struct failover *)ud)->cs) != NULL;
}

static bool view_barrier_committed(void *ud) {
  return consensus_barrier_committed(((struct failover *)ud)->cs);
}

static bool view_superseded(void *ud) {
  return consensus_superseded(((struct failover *)ud)->cs);
}

static bool view_quorum_heard(void *ud, unsigned within_ms) {
  return consensus_quorum_heard(((struct failover *)ud)->cs, within_ms);
}

static bool view_transfer_under_way(void *ud) {
  return consensus_transfer_under_way(((struct failover *)ud)->cs);
}

static void maybe_free(struct failover *f);

/* Barrier and transfer callbacks pass through here so that a failover
 * being closed stays allocated until consensus has answered them. */
static void on_barrier_done(void *ud, int status) {
  struct failover *f = ud;
  f->ops_inflight--;
  if (!f->closing) f->barrier_cb(f->barrier_arg, status);
  maybe_free(f);
}

static int view_barrier(void *ud, void (*cb)(void *arg, int status), void *arg) {
  struct failover *f = ud;
  f->barrier_cb = cb;
  f->barrier_arg = arg;
  int rc = consensus_barrier(f->cs, on_barrier_done, f);
  if (rc == 0) f->ops_inflight++;
  return rc;
}

static void on_transfer_done(void *ud, int status) {
  struct failover *f = ud;
  f->ops_inflight--;
  if (!f->closing) f->transfer_cb(f->transfer_arg, status);
  maybe_free(f);
}

/* Before leadership moves, the usage counts not yet written go through
 * Raft (gateway_flush_usage, twice: counts taken while the first write was
 * in flight), so a planned handover loses none; bounded by
 * USAGE_FLUSH_BOUND_MS so a stuck write never blocks the handover. The
 * wait counts as an operation in flight (keeps `f` alive on close). */
#define USAGE_FLUSH_BOUND_MS 1000

struct pre_transfer {
  struct failover *f;
  char to[64];
  bool has_to, done;
  int rounds, refs; /* refs: the timer handle + a flush not yet answered */
  uv_timer_t timer;
};

static void pre_transfer_unref(struct pre_transfer *p) {
  if (--p->refs == 0) free(p);
}

static void pre_transfer_closed(uv_handle_t *h) {
  pre_transfer_unref(h->data);
}

static void pre_transfer_go(struct pre_transfer *p, bool timed_out) {
  if (p->done) return;
  p->done = true;
  uv_timer_stop(&p->timer);
  uv_close((uv_handle_t *)&p->timer, pre_transfer_closed);
  struct failover *f = p->f;
  if (timed_out)
    zg_log(ZG_WARN, "usage_flush_slow",
           "usage counts not written within %u ms before the handover; transferring anyway",
           USAGE_FLUSH_BOUND_MS);
  if (f->closing || !f->rm.draining || !f->rm.transfer_started) { /* closed or aborted */
    f->ops_inflight--;
    maybe_free(f);
    return;
  }
  int rc = consensus_transfer_leadership(f->cs, p->has_to ? p->to : NULL, on_transfer_done, f);
  if (rc != 0) {
    f->ops_inflight--;
    f->transfer_cb(f->transfer_arg, rc);
  }
}

static void pre_transfer_flushed(void *arg) {
  struct pre_transfer *p = arg;
  if (!p->done && ++p->rounds < 2) {
    gateway_flush_usage(p->f->gw, pre_transfer_flushed, p); /* p keeps its ref */
    return;
  }
  pre_transfer_go(p, false);
  pre_transfer_unref(p);
}

static void pre_transfer_timeout(uv_timer_t *t) {
  pre_transfer_go(t->data, true);
}

static int view_transfer(void *ud, const char *to, void (*cb)(void *arg, int status), void *arg) {
  struct failover *f = ud;
  f->transfer_cb = cb;
  f->transfer_arg = arg;
  struct pre_transfer *p = f->gw ? calloc(1, sizeof(*p)) : NULL;
  if (!p) {
    int rc = consensus_transfer_leadership(f->cs, to, on_transfer_done, f);
    if (rc == 0) f->ops_inflight++;
    return rc;
  }
  p->f = f;
  p->has_to = to != NULL;
  snprintf(p->to, sizeof(p->to), "%s", to ? to : "");
  p->refs = 2;
  uv_timer_init(f->loop, &p->timer);
  p->timer.data = p;
  uv_timer_start(&p->timer, pre_transfer_timeout, USAGE_FLUSH_BOUND_MS, 0);
  f->ops_inflight++; /* answered through on_transfer_done or pre_transfer_go */
  gateway_flush_usage(f->gw, pre_transfer_flushed, p);
  return 0;
}

/* ---- reads ------------------------------------------------------------ */

enum failover_role failover_role(struct failover *f) {
  return role_current(&f->rm, NULL);
}

bool failover_is_active(struct failover *f) {
  return role_current(&f->rm, NULL) == FAILOVER_ACTIVE;
}

uint64_t failover_lease_remaining_ms(const struct failover *f) {
  return role_lease_remaining_ms(&f->rm);
}

static bool healthy_standby(struct failover *f, enum failover_role r) {
  if (r != FAILOVER_STANDBY || consensus_log_behind(f->cs)) return false;
  uint64_t commit = consensus_commit_index(f->cs), applied = consensus_applied_index(f->cs);
  return commit - (applied < commit ? applied : commit) <= f->max_lag;
}

/* ---- decisions -------------------------------------------------------- */

/* Best gateway member to hand over to: caught up, recently in contact,
 * preferring the preferred zone. Fills out and returns true if found. */
static bool pick_target(struct failover *f, bool preferred_only, char *out, size_t outlen) {
  cJSON *status = consensus_status_json(f->cs);
  cJSON *members = cJSON_GetObjectItemCaseSensitive(status, "members");
  cJSON *m;
  bool found = false;
  double best_lag = 1e18;
  cJSON_ArrayForEach(m, members) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "id");
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    const cJSON *zone = cJSON_GetObjectItemCaseSensitive(m, "zone");
    const cJSON *lag = cJSON_GetObjectItemCaseSensitive(m, "lag");
    const cJSON *contact = cJSON_GetObjectItemCaseSensitive(m, "last_contact_ms");
    const cJSON *voter = cJSON_GetObjectItemCaseSensitive(m, "voter");
    if (!cJSON_IsString(id) || strcmp(id->valuestring, f->node_id) == 0) continue;
    if (!cJSON_IsString(role) || strcmp(role->valuestring, "gateway") != 0) continue;
    if (voter && cJSON_IsFalse(voter)) continue;
    if (preferred_only &&
        (!cJSON_IsString(zone) || strcmp(zone->valuestring, f->preferred_zone) != 0))
      continue;
    if (!cJSON_IsNumber(lag) || lag->valuedouble > f->max_lag) continue;
    if (cJSON_IsNumber(contact) && contact->valuedouble > f->election_timeout_ms) continue;
    double score = lag->valuedouble;
    if (f->preferred_zone[0] && cJSON_IsString(zone) &&
        strcmp(zone->valuestring, f->preferred_zone) == 0)
      score -= 1e9;
    if (score < best_lag) {
      best_lag = score;
      snprintf(out, outlen, "%s", id->valuestring);
      found = true;
    }
  }
  cJSON_Delete(status);
  return found;
}

const char *failover_switchover_target_error(struct failover *f, const char *to) {
  if (strcmp(to, f->node_id) == 0) return "is this node: name another gateway";
  cJSON *status = consensus_status_json(f->cs);
  const char *why = "is not a member of this cluster";
  const cJSON *m;
  cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(status, "members")) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "id");
    if (!cJSON_IsString(id) || strcmp(id->valuestring, to) != 0) continue;
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    const cJSON *voter = cJSON_GetObjectItemCaseSensitive(m, "voter");
    if (!cJSON_IsString(role) || strcmp(role->valuestring, "gateway") != 0)
      why = "is the witness: it never serves clients";
    else if (voter && cJSON_IsFalse(voter))
      why = "is not a voter yet";
    else
      why = NULL;
    break;
  }
  cJSON_Delete(status);
  return why;
}

int failover_switchover(struct failover *f, const char *to, const char *reason,
                        void (*cb)(void *ud, int status, const char *msg), void *ud) {
  if (f->rm.draining) return CONSENSUS_EBUSY;
  if (to && failover_switchover_target_error(f, to)) return CONSENSUS_EINVALID;
  char target[64] = "";
  if (to)
    snprintf(target, sizeof(target), "%s", to);
  else if (!pick_target(f, f->preferred_zone[0] != 0, target, sizeof(target)))
    pick_target(f, false, target, sizeof(target));
  int rc = role_drain_begin(&f->rm, target, reason, cb, ud);
  if (rc == ROLE_EBUSY) return CONSENSUS_EBUSY;
  if (rc != 0) return CONSENSUS_ENOTLEADER;
  struct gateway_stats st;
  gateway_get_stats(f->gw, &st);
  zg_log(ZG_WARN, "switchover_started",
         "%s: handing over to %s now; new requests wait for the new active, the %u in flight here "
         "finish here",
         f->rm.switch_reason, target[0] ? target : "the most caught-up node",
         st.in_flight + st.queued);
  role_drain_progress(&f->rm);
  return 0;
}

static void maybe_failback(struct failover *f, enum failover_role r, uint64_t now) {
  if (!f->failback_auto || !f->preferred_zone[0] || r != FAILOVER_ACTIVE) return;
  if (strcmp(f->zone, f->preferred_zone) == 0) {
    f->failback_candidate[0] = '\0';
    return;
  }
  char target[64];
  if (!pick_target(f, true, target, sizeof(target))) {
    f->failback_candidate[0] = '\0';
    return;
  }
  if (strcmp(target, f->failback_candidate) != 0) {
    snprintf(f->failback_candidate, sizeof(f->failback_candidate), "%s", target);
    f->failback_healthy_since_ms = now;
    zg_log(ZG_INFO, "failback_pending",
           "%s in preferred zone %s is healthy and caught up; failing back after %u s of stability",
           target, f->preferred_zone, f->failback_after_s);
    return;
  }
  if (now - f->failback_healthy_since_ms < (uint64_t)f->failback_after_s * 1000u) return;
  zg_log(ZG_WARN, "failback", "failing back to %s in preferred zone %s", target, f->preferred_zone);
  f->failback_candidate[0] = '\0';
  failover_switchover(f, target, "failback to the preferred zone", NULL, NULL);
}

static void maybe_degraded_handover(struct failover *f, enum failover_role r, uint64_t now) {
  if (r != FAILOVER_ACTIVE || gateway_upstream_healthy(f->gw)) return;
  if (now - f->last_degraded_handover_ms < DEGRADED_HANDOVER_COOLDOWN_MS) return;
  char target[64];
  if (!pick_target(f, false, target, sizeof(target))) return;
  f->last_degraded_handover_ms = now;
  zg_log(ZG_WARN, "degraded_handover",
         "self-check failing (upstream failed repeatedly); handing over to %s", target);
  failover_switchover(f, target, "degraded handover: self-check failing", NULL, NULL);
}

static void witness_handoff_done(void *ud, int status) {
  struct failover *f = ud;
  f->witness_handoff_inflight = false;
  f->ops_inflight--;
  if (f->closing) {
    maybe_free(f);
    return;
  }
  if (status != 0) {
    zg_log(ZG_WARN, "witness_handoff_failed",
           "witness could not hand leadership away (%s); retrying", consensus_strerror(status));
    f->witness_handoff_term = 0;
  }
}

/* A witness never stays leader: once its election barrier and the seed of
 * a fresh cluster have committed, it hands leadership to the most
 * caught-up voter (retried each tick until that works). */
static void maybe_witness_handoff(struct failover *f) {
  if (!f->witness || f->witness_handoff_inflight) return;
  uint64_t term = consensus_term(f->cs);
  if (f->witness_handoff_term == term || !consensus_is_leader(f->cs)) return;
  if (!consensus_config(f->cs) || consensus_voter_count(f->cs) < 2) return;
  f->witness_handoff_term = term;
  zg_log(ZG_INFO, "witness_handoff", "witness won term %llu: handing leadership to a gateway",
         (unsigned long long)term);
  int rv = consensus_transfer_leadership(f->cs, NULL, witness_handoff_done, f);
  if (rv != 0) {
    zg_log(ZG_WARN, "witness_handoff_failed", "%s", consensus_strerror(rv));
    f->witness_handoff_term = 0;
  } else {
    f->witness_handoff_inflight = true;
    f->ops_inflight++;
  }
}

static void on_tick(uv_timer_t *t) {
  struct failover *f = t->data;
  const struct consensus_member *leader = consensus_leader(f->cs);
  if (leader && strcmp(leader->id, f->last_leader_id) != 0) {
    if (f->last_leader_id[0]) f->leader_changes++;
    snprintf(f->last_leader_id, sizeof(f->last_leader_id), "%.63s", leader->id);
  }
  if (!role_tick(&f->rm)) return; /* TILT */
  uint64_t now = zg_mono_ms();
  enum failover_role r = role_current(&f->rm, NULL);
  maybe_witness_handoff(f);
  maybe_failback(f, r, now);
  maybe_degraded_handover(f, r, now);
}

/* ---- the data plane and the load balancer ---------------------------- */

enum gateway_serve_mode failover_serve_mode(struct failover *f, bool forwarded, char *forward_to,
                                            size_t len) {
  if (consensus_superseded(f->cs)) return GATEWAY_REFUSE_SUPERSEDED;
  switch (role_current(&f->rm, NULL)) {
  case FAILOVER_ACTIVE:
    return GATEWAY_SERVE;
  case FAILOVER_WITNESS:
  case FAILOVER_UNAVAILABLE:
    return GATEWAY_REFUSE;
  case FAILOVER_LEADER_UNFENCED:
  case FAILOVER_CANDIDATE:
    /* A node cut off from the quorum (a fenced old active) still holds:
     * /health/ready is 503 there, so the load balancer stops sending here
     * within a few checks, and what it did send ends, at the hold
     * deadline, in a refusal it sends again to a node that can deliver it
     * (the connection closed unanswered, retry-on empty-response,
     * redispatch; gateway/chat.c refuse_here). Refusing at once was tried:
     * the LB's immediate retries came back here while its checks had not
     * caught up yet, and failed. */
    return GATEWAY_HOLD;
  case FAILOVER_DRAINING:
    return GATEWAY_HOLD;
  case FAILOVER_STANDBY: {
    if (forwarded) return GATEWAY_REFUSE;
    const struct consensus_member *leader = consensus_leader(f->cs);
    if (!leader || !leader->gateway_address || !leader->gateway_address[0]) return GATEWAY_HOLD;
    snprintf(forward_to, len, "%s", leader->gateway_address);
    return GATEWAY_FORWARD;
  }
  }
  return GATEWAY_REFUSE;
}

int failover_health(struct failover *f, const char *check, cJSON *body) {
  const char *reason;
  enum failover_role r = role_current(&f->rm, &reason);
  const struct consensus_member *leader = consensus_leader(f->cs);
  const char *role = r == FAILOVER_ACTIVE                                       ? "active"
                     : r == FAILOVER_WITNESS                                    ? "witness"
                     : r == FAILOVER_STANDBY                                    ? "standby"
                     : r == FAILOVER_LEADER_UNFENCED || r == FAILOVER_CANDIDATE ? "candidate"
                     : r == FAILOVER_DRAINING                                   ? "draining"
                                                                                : "unavailable";
  cJSON_AddStringToObject(body, "role", role);
  cJSON_AddStringToObject(body, "node", f->node_id);
  cJSON_AddStringToObject(body, "zone", f->zone);
  cJSON_AddStringToObject(body, "leader", leader ? leader->id : "");
  cJSON_AddNumberToObject(body, "term", (double)consensus_term(f->cs));
  cJSON_AddNumberToObject(body, "commit_index", (double)consensus_commit_index(f->cs));
  cJSON_AddNumberToObject(body, "applied_index", (double)consensus_applied_index(f->cs));
  cJSON_AddNumberToObject(body, "lease_remaining_ms", (double)failover_lease_remaining_ms(f));
  if (r == FAILOVER_STANDBY && consensus_log_behind(f->cs))
    reason = "the Raft log is stuck behind the leader's (it lost entries the leader counts as "
             "stored here): see the ERROR raft_log_behind_leader";
  cJSON_AddStringToObject(body, "reason", reason);
  if (consensus_superseded(f->cs)) cJSON_AddBoolToObject(body, "superseded", true);
  cJSON_AddBoolToObject(body, "log_behind_leader", consensus_log_behind(f->cs));
  bool active = r == FAILOVER_ACTIVE;
  bool standby = healthy_standby(f, r);
  if (!strcmp(check, "active")) return active ? 200 : standby ? 429 : 503;
  if (!strcmp(check, "standby")) return standby ? 200 : 503;
  if (!strcmp(check, "ready")) {
    /* What the LB's hold tier tracks: this node can take a client request
     * now and serve it, forward it, or hold it until a new active exists
     * (an election it takes part in). Not: a node cut off from the quorum
     * (a fenced old active; see role_cut_off), the witness, a node starting
     * or shutting down. */
    bool can_forward =
        r == FAILOVER_STANDBY && leader && leader->gateway_address && leader->gateway_address[0];
    /* A standby whose leader serves no clients (the witness, which is
     * handing leadership to a gateway) holds, as failover_serve_mode does:
     * it was 503 here, and with the active just dead the LB had no server
     * at all for that moment (review finding). */
    bool can_hold = (r == FAILOVER_CANDIDATE || r == FAILOVER_LEADER_UNFENCED ||
                     r == FAILOVER_DRAINING || (r == FAILOVER_STANDBY && !can_forward)) &&
                    !role_cut_off(&f->rm);
    return active || can_forward || can_hold ? 200 : 503;
  }
  /* A superseded node (data of an older incarnation) is alive but must be
   * emptied and added again: not live, so an orchestrator notices. */
  if (!strcmp(check, "live")) return consensus_superseded(f->cs) ? 503 : 200;
  /* system */
  return active || standby || (r == FAILOVER_WITNESS && leader) ? 200 : 503;
}

/* /metrics: the role and the lease (the raft and key metrics are node/'s). */
static void collect_metrics(void *ud, void *out_buf) {
  struct failover *f = ud;
  zg_buf *out = out_buf;
  enum failover_role r = role_current(&f->rm, NULL);
  zg_buf_appendf(
      out,
      "# HELP zonegate_active 1 while this node is the active node (leader with a valid lease)\n"
      "# TYPE zonegate_active gauge\nzonegate_active %d\n",
      r == FAILOVER_ACTIVE);
  zg_buf_appendf(
      out, "# HELP zonegate_role Current failover role of this node\n# TYPE zonegate_role gauge\n");
  for (int i = FAILOVER_UNAVAILABLE; i <= FAILOVER_WITNESS; i++)
    zg_buf_appendf(out, "zonegate_role{role=\"%s\"} %d\n",
                   failover_role_name((enum failover_role)i), (int)r == i);
  zg_buf_appendf(
      out,
      "# HELP zonegate_leader_changes_total Leader changes seen by this node\n"
      "# TYPE zonegate_leader_changes_total counter\nzonegate_leader_changes_total %llu\n"
      "# HELP zonegate_lease_remaining_seconds Time left on the active node's lease\n"
      "# TYPE zonegate_lease_remaining_seconds gauge\nzonegate_lease_remaining_seconds %.3f\n"
      "# HELP zonegate_role_moves_refused_total Role moves the transition table refused (a bug)\n"
      "# TYPE zonegate_role_moves_refused_total counter\nzonegate_role_moves_refused_total %llu\n",
      (unsigned long long)f->leader_changes, (double)failover_lease_remaining_ms(f) / 1000.0,
      (unsigned long long)f->rm.illegal_moves);
}

void failover_status_json(struct failover *f, cJSON *out) {
  const char *reason;
  enum failover_role r = role_current(&f->rm, &reason);
  cJSON_AddStringToObject(out, "role", failover_role_name(r));
  cJSON_AddStringToObject(out, "role_reason", reason);
  cJSON_AddNumberToObject(out, "lease_remaining_ms", (double)failover_lease_remaining_ms(f));
  cJSON_AddBoolToObject(out, "draining", f->rm.draining);
  cJSON_AddStringToObject(out, "preferred_zone", f->preferred_zone);
  cJSON_AddStringToObject(out, "failback", f->failback_auto ? "auto" : "manual");
}

/* ---- lifecycle -------------------------------------------------------- */

void failover_apply_config(struct failover *f, const struct zg_config *cfg) {
  f->rm.lease_ratio = cfg->lease_ratio;
  f->max_lag = cfg->max_lag;
  snprintf(f->preferred_zone, sizeof(f->preferred_zone), "%s", cfg->preferred_zone);
  f->failback_auto = strcmp(cfg->failback, "auto") == 0;
  f->failback_after_s = cfg->failback_after_s;
}

int failover_start(uv_loop_t *loop, struct consensus *cs, struct gateway *gw,
                   const struct zg_config *cfg, struct failover **out, char *errmsg,
                   size_t errlen) {
  struct failover *f = calloc(1, sizeof(*f));
  if (!f) {
    snprintf(errmsg, errlen, "out of memory");
    return -1;
  }
  f->loop = loop;
  f->cs = cs;
  f->gw = gw;
  snprintf(f->node_id, sizeof(f->node_id), "%s", cfg->node_id);
  snprintf(f->zone, sizeof(f->zone), "%s", cfg->zone);
  f->witness = strcmp(cfg->role, "witness") == 0;
  f->election_timeout_ms = cfg->election_timeout_ms;
  f->heartbeat_ms = cfg->heartbeat_ms;
  f->view = (struct failover_view){.ud = f,
                                   .now_ms = view_now,
                                   .term = view_term,
                                   .raft_leader = view_raft_leader,
                                   .leader_known = view_leader_known,
                                   .barrier_committed = view_barrier_committed,
                                   .transfer_under_way = view_transfer_under_way,
                                   .barrier = view_barrier,
                                   .transfer = view_transfer,
                                   .strerror = consensus_strerror,
                                   .quorum_heard = view_quorum_heard,
                                   .superseded = view_superseded};
  role_init(&f->rm, &f->view, f->witness, cfg->election_timeout_ms, cfg->heartbeat_ms,
            cfg->lease_ratio);
  failover_apply_config(f, cfg);
  role_current(&f->rm, NULL);
  gateway_add_metrics_collector(gw, collect_metrics, f);
  uv_timer_init(loop, &f->tick);
  f->tick.data = f;
  uv_timer_start(&f->tick, on_tick, f->heartbeat_ms, f->heartbeat_ms);
  *out = f;
  return 0;
}

void failover_on_leader_changed(struct failover *f) {
  /* A new fenced leader takes its first lease at once instead of on the
   * next tick: one heartbeat less of unavailability after an election. */
  role_renew_lease(&f->rm);
  role_current(&f->rm, NULL);
  maybe_witness_handoff(f);
}

static void maybe_free(struct failover *f) {
  if (!f->closing || !f->tick_closed || f->ops_inflight > 0) return;
  void (*done)(void *) = f->close_done;
  void *arg = f->close_arg;
  free(f);
  if (done) done(arg);
}

static void on_tick_closed(uv_handle_t *h) {
  struct failover *f = h->data;
  f->tick_closed = true;
  maybe_free(f);
}

void failover_close(struct failover *f, void (*done)(void *arg), void *arg) {
  f->closing = true;
  f->close_done = done;
  f->close_arg = arg;
  role_drain_abort(&f->rm, CONSENSUS_ESHUTDOWN, "shutting down");
  uv_close((uv_handle_t *)&f->tick, on_tick_closed);
}
