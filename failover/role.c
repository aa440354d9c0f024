/* role.c: the active/standby decision, the lease, the load balancer's
 * health answers, serve/forward/hold for client requests, planned
 * switchover, failback to the preferred zone and the
 * degraded handover.
 *
 * One timer ticks every heartbeat. Each tick: (1) TILT guard: if the loop
 * stalled (the tick came much later than planned) the lease is dropped and
 * no decision is taken this tick; (2) on the leader, a barrier is submitted
 * to renew the lease when none is in flight; (3) the role is recomputed and
 * every change is logged with its reason; (4) decisions (switchover
 * progress, failback, degraded handover) run.
 *
 * Every role change goes through set_role(), which checks the move against
 * a transition table and logs it, so a log line names every move.
 */
#include "failover/failover.h"

#include "base/base.h"
#include "config/config.h"
#include "consensus/consensus.h"
#include "gateway/gateway.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TILT_FACTOR 4 /* a tick later than 4 heartbeats means the loop stalled */
#define DEGRADED_HANDOVER_COOLDOWN_MS 30000

struct failover {
  uv_loop_t *loop;
  struct consensus *cs;
  struct gateway *gw;
  uv_timer_t tick;
  struct gateway_cluster hooks;
  /* config */
  char node_id[64], zone[32];
  bool witness;
  unsigned election_timeout_ms, heartbeat_ms, max_lag, drain_timeout_ms;
  double lease_ratio;
  char preferred_zone[32];
  bool failback_auto;
  unsigned failback_after_s;
  /* lease */
  bool barrier_inflight;
  uint64_t barrier_submit_ms, barrier_term;
  uint64_t lease_until_ms, lease_term;
  /* role */
  enum failover_role role;
  char role_reason[128];
  uint64_t last_tick_ms;
  bool tilt;
  /* switchover */
  bool draining;
  bool transfer_started;
  uint64_t drain_deadline_ms;
  char switch_to[64];
  char switch_reason[64];
  void (*switch_cb)(void *ud, int status, const char *msg);
  void *switch_ud;
  /* failback */
  char failback_candidate[64];
  uint64_t failback_healthy_since_ms;
  uint64_t last_degraded_handover_ms;
  /* metrics */
  char last_leader_id[64];
  uint64_t leader_changes;
  void (*close_done)(void *);
  void *close_arg;
};

const char *failover_role_name(enum failover_role role) {
  switch (role) {
  case FAILOVER_UNAVAILABLE:
    return "unavailable";
  case FAILOVER_CANDIDATE:
    return "candidate";
  case FAILOVER_STANDBY:
    return "standby";
  case FAILOVER_LEADER_UNFENCED:
    return "leader-unfenced";
  case FAILOVER_ACTIVE:
    return "active";
  case FAILOVER_DRAINING:
    return "draining";
  case FAILOVER_WITNESS:
    return "witness";
  }
  return "unavailable";
}

/* Allowed moves (row: from, column: to). Anything may fall to UNAVAILABLE
 * or CANDIDATE; ACTIVE is reached only from LEADER_UNFENCED; DRAINING
 * only from ACTIVE. */
static const bool transition_allowed[7][7] = {
    /*                 UNAV   CAND   STBY   UNFEN  ACTV   DRAIN  WITN */
    /* UNAVAILABLE */ {true, true, true, true, false, false, true},
    /* CANDIDATE   */ {true, true, true, true, false, false, true},
    /* STANDBY     */ {true, true, true, true, false, false, true},
    /* UNFENCED    */ {true, true, true, true, true, false, true},
    /* ACTIVE      */ {true, true, true, true, true, true, true},
    /* DRAINING    */ {true, true, true, true, false, true, true},
    /* WITNESS     */ {true, true, true, true, false, false, true},
};

static void set_role(struct failover *f, enum failover_role to, const char *reason) {
  if (f->role == to) return;
  if (!transition_allowed[f->role][to]) {
    zg_log(ZG_ERROR, "role_transition_refused", "%s -> %s refused (%s)",
           failover_role_name(f->role), failover_role_name(to), reason);
    to = FAILOVER_CANDIDATE;
  }
  cJSON *fields = cJSON_CreateObject();
  cJSON_AddStringToObject(fields, "from", failover_role_name(f->role));
  cJSON_AddStringToObject(fields, "to", failover_role_name(to));
  cJSON_AddStringToObject(fields, "reason", reason);
  cJSON_AddNumberToObject(fields, "term", (double)consensus_term(f->cs));
  zg_log_fields(to == FAILOVER_ACTIVE || f->role == FAILOVER_ACTIVE ? ZG_WARN : ZG_INFO,
                "role_changed", fields);
  f->role = to;
  snprintf(f->role_reason, sizeof(f->role_reason), "%s", reason);
}

static bool lease_valid(const struct failover *f, uint64_t now) {
  return f->lease_term == consensus_term(f->cs) && now < f->lease_until_ms;
}

uint64_t failover_lease_remaining_ms(const struct failover *f) {
  uint64_t now = zg_mono_ms();
  return lease_valid(f, now) ? f->lease_until_ms - now : 0;
}

/* Computes the role from scratch; the reason names the first condition
 * that failed. */
static enum failover_role compute_role(const struct failover *f, const char **reason) {
  const struct consensus_member *leader = consensus_leader(f->cs);
  const struct consensus_member *self = consensus_self(f->cs);
  bool raft_leader = leader && self && strcmp(leader->id, self->id) == 0;
  uint64_t now = zg_mono_ms();
  if (f->witness) {
    *reason = "witness never serves clients";
    return FAILOVER_WITNESS;
  }
  if (raft_leader) {
    if (!consensus_is_leader(f->cs)) {
      *reason = "raft leader; election barrier not committed or transfer under way";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (f->tilt) {
      *reason = "loop stalled (TILT): lease dropped";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (!lease_valid(f, now)) {
      *reason = "raft leader without a valid lease";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (f->draining) {
      *reason = f->switch_reason[0] ? f->switch_reason : "draining";
      return FAILOVER_DRAINING;
    }
    *reason = "leader with a valid lease";
    return FAILOVER_ACTIVE;
  }
  if (leader) {
    *reason = "following a known leader";
    return FAILOVER_STANDBY;
  }
  *reason = "no leader known";
  return FAILOVER_CANDIDATE;
}

static void refresh_role(struct failover *f) {
  const char *reason = "";
  enum failover_role r = compute_role(f, &reason);
  set_role(f, r, reason);
}

enum failover_role failover_role(const struct failover *f) {
  return f->role;
}

bool failover_is_active(const struct failover *f) {
  /* Recomputed on every call so a lapsed lease stops serving at once. */
  const char *reason;
  return compute_role(f, &reason) == FAILOVER_ACTIVE;
}

static bool healthy_standby(const struct failover *f) {
  if (f->witness) return false;
  const struct consensus_member *leader = consensus_leader(f->cs);
  const struct consensus_member *self = consensus_self(f->cs);
  if (!leader || !self || strcmp(leader->id, self->id) == 0) return false;
  uint64_t commit = consensus_commit_index(f->cs), applied = consensus_applied_index(f->cs);
  return commit - (applied < commit ? applied : commit) <= f->max_lag;
}

/* ---- lease ---------------------------------------------------------- */

static void on_lease_barrier(void *ud, int status) {
  struct failover *f = ud;
  f->barrier_inflight = false;
  if (status != 0) return; /* the lease lapses on its own */
  if (f->barrier_term != consensus_term(f->cs)) return;
  uint64_t until =
      f->barrier_submit_ms + (uint64_t)((double)f->election_timeout_ms * f->lease_ratio);
  if (f->lease_term != f->barrier_term || until > f->lease_until_ms) {
    f->lease_until_ms = until;
    f->lease_term = f->barrier_term;
  }
  refresh_role(f);
}

/* A barrier is a log entry: renew every few heartbeats (a third of the
 * lease), not every tick, so the lease never lapses under normal latency
 * while the log grows by a few entries a second only. */
static void renew_lease(struct failover *f) {
  if (f->barrier_inflight || f->witness || !consensus_is_leader(f->cs)) return;
  uint64_t now = zg_mono_ms();
  uint64_t lease_ms = (uint64_t)((double)f->election_timeout_ms * f->lease_ratio);
  uint64_t interval = lease_ms / 3 > f->heartbeat_ms ? lease_ms / 3 : f->heartbeat_ms;
  if (lease_valid(f, now) && now - f->barrier_submit_ms < interval) return;
  f->barrier_submit_ms = now;
  f->barrier_term = consensus_term(f->cs);
  if (consensus_barrier(f->cs, on_lease_barrier, f) == 0) f->barrier_inflight = true;
}

/* ---- decisions ------------------------------------------------------ */

static void finish_switchover(struct failover *f, int status, const char *msg) {
  void (*cb)(void *, int, const char *) = f->switch_cb;
  void *ud = f->switch_ud;
  f->switch_cb = NULL;
  f->draining = false;
  f->transfer_started = false;
  f->switch_reason[0] = '\0';
  refresh_role(f);
  if (cb) cb(ud, status, msg);
}

static void on_transfer_done(void *ud, int status) {
  struct failover *f = ud;
  const struct consensus_member *leader = consensus_leader(f->cs);
  if (status == 0)
    zg_log(ZG_INFO, "switchover_done", "leadership moved to %s",
           leader ? leader->id : "(electing)");
  else
    zg_log(ZG_WARN, "switchover_failed", "leadership transfer failed: %s",
           consensus_strerror(status));
  finish_switchover(f, status, status == 0 ? "leadership transferred" : consensus_strerror(status));
}

static void switchover_progress(struct failover *f) {
  if (!f->draining || f->transfer_started) return;
  struct gateway_stats st;
  gateway_get_stats(f->gw, &st);
  uint64_t now = zg_mono_ms();
  bool idle = st.in_flight == 0 && st.queued == 0;
  if (!idle && now < f->drain_deadline_ms) return;
  if (!idle)
    zg_log(ZG_WARN, "drain_timeout",
           "drain_timeout reached with %u requests in flight; transferring anyway", st.in_flight);
  f->transfer_started = true;
  int rc = consensus_transfer_leadership(f->cs, f->switch_to[0] ? f->switch_to : NULL,
                                         on_transfer_done, f);
  if (rc != 0) finish_switchover(f, rc, consensus_strerror(rc));
}

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

static void maybe_failback(struct failover *f, uint64_t now) {
  if (!f->failback_auto || !f->preferred_zone[0] || f->role != FAILOVER_ACTIVE || f->draining)
    return;
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

static void maybe_degraded_handover(struct failover *f, uint64_t now) {
  if (f->role != FAILOVER_ACTIVE || f->draining || gateway_upstream_healthy(f->gw)) return;
  if (now - f->last_degraded_handover_ms < DEGRADED_HANDOVER_COOLDOWN_MS) return;
  char target[64];
  if (!pick_target(f, false, target, sizeof(target))) return;
  f->last_degraded_handover_ms = now;
  zg_log(ZG_WARN, "degraded_handover",
         "self-check failing (upstream failed repeatedly); handing over to %s", target);
  failover_switchover(f, target, "degraded handover: self-check failing", NULL, NULL);
}

static void on_tick(uv_timer_t *t) {
  struct failover *f = t->data;
  uint64_t now = zg_mono_ms();
  uint64_t late = f->last_tick_ms ? now - f->last_tick_ms : 0;
  f->last_tick_ms = now;
  if (late > (uint64_t)f->heartbeat_ms * TILT_FACTOR + 50) {
    /* The loop stalled: timers and the lease may be stale. Drop the lease and
     * take no decision until a normal tick. */
    if (!f->tilt)
      zg_log(ZG_WARN, "tilt",
             "event loop stalled for %llu ms; lease dropped, decisions skipped this tick",
             (unsigned long long)late);
    f->tilt = true;
    f->lease_until_ms = 0;
    refresh_role(f);
    return;
  }
  f->tilt = false;
  const struct consensus_member *leader = consensus_leader(f->cs);
  if (leader && strcmp(leader->id, f->last_leader_id) != 0) {
    if (f->last_leader_id[0]) f->leader_changes++;
    snprintf(f->last_leader_id, sizeof(f->last_leader_id), "%.63s", leader->id);
  }
  renew_lease(f);
  refresh_role(f);
  switchover_progress(f);
  maybe_failback(f, now);
  maybe_degraded_handover(f, now);
}

/* ---- gateway hooks --------------------------------------------------- */

static bool hook_token_lookup(void *ud, const char sha256_hex[65], struct gateway_token *out) {
  struct failover *f = ud;
  struct consensus_token_view v;
  if (!consensus_token_lookup(f->cs, sha256_hex, &v)) return false;
  snprintf(out->id, sizeof(out->id), "%s", v.id);
  snprintf(out->name, sizeof(out->name), "%s", v.name);
  out->expires_at_ms = v.expires_at;
  out->rpm = v.rpm;
  out->n_allow = 0;
  for (size_t i = 0; i < v.n_allow && i < ZG_ARRAY_LEN(out->allow); i++)
    snprintf(out->allow[out->n_allow++], sizeof(out->allow[0]), "%s", v.allow[i]);
  return true;
}

static size_t hook_usable_keys(void *ud, const char *upstream, struct gateway_key *out,
                               size_t max) {
  struct failover *f = ud;
  struct consensus_key_use keys[16];
  if (max > ZG_ARRAY_LEN(keys)) max = ZG_ARRAY_LEN(keys);
  size_t n = consensus_usable_keys(f->cs, upstream, keys, max);
  for (size_t i = 0; i < n; i++) {
    snprintf(out[i].id, sizeof(out[i].id), "%.47s", keys[i].id);
    out[i].secret = keys[i].secret;
  }
  return n;
}

static void on_key_invalidated(void *ud, int status, const char *errmsg, const cJSON *result) {
  if (status != 0)
    zg_log(ZG_WARN, "key_invalidate_failed", "%s", errmsg ? errmsg : consensus_strerror(status));
}

static void hook_key_rejected(void *ud, const char *key_id, const char *upstream) {
  struct failover *f = ud;
  cJSON *args = cJSON_CreateObject();
  cJSON_AddStringToObject(args, "id", key_id);
  cJSON_AddStringToObject(args, "reason", "upstream answered 401");
  consensus_write(f->cs, "key.invalidate", args, "gateway", f->node_id, on_key_invalidated, f);
}

static enum gateway_serve_mode hook_serve_mode(void *ud, bool forwarded, char *forward_to,
                                               size_t len) {
  struct failover *f = ud;
  const char *reason;
  enum failover_role r = compute_role(f, &reason);
  switch (r) {
  case FAILOVER_ACTIVE:
    return GATEWAY_SERVE;
  case FAILOVER_WITNESS:
  case FAILOVER_UNAVAILABLE:
    return GATEWAY_REFUSE;
  case FAILOVER_LEADER_UNFENCED:
  case FAILOVER_DRAINING:
  case FAILOVER_CANDIDATE:
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

static void fill_health(struct failover *f, cJSON *body) {
  const char *reason;
  enum failover_role r = compute_role(f, &reason);
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
  cJSON_AddStringToObject(body, "reason", reason);
}

static int hook_health(void *ud, const char *check, cJSON *body) {
  struct failover *f = ud;
  fill_health(f, body);
  bool active = failover_is_active(f);
  bool standby = healthy_standby(f);
  if (!strcmp(check, "active")) return active ? 200 : standby ? 429 : 503;
  if (!strcmp(check, "standby")) return standby ? 200 : 503;
  if (!strcmp(check, "ready")) {
    const struct consensus_member *leader = consensus_leader(f->cs);
    bool can_forward = standby && leader && leader->gateway_address && leader->gateway_address[0];
    return active || can_forward ? 200 : 503;
  }
  if (!strcmp(check, "live")) return 200;
  /* system */
  return active || standby || (f->witness && consensus_leader(f->cs)) ? 200 : 503;
}

const struct gateway_cluster *failover_gateway_hooks(struct failover *f) {
  return &f->hooks;
}

static void collect_metrics(void *ud, void *out_buf);

/* ---- lifecycle -------------------------------------------------------- */

void failover_apply_config(struct failover *f, const struct zg_config *cfg) {
  f->lease_ratio = cfg->lease_ratio;
  f->max_lag = cfg->max_lag;
  f->drain_timeout_ms = cfg->drain_timeout_ms;
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
  failover_apply_config(f, cfg);
  f->role = f->witness ? FAILOVER_WITNESS : FAILOVER_CANDIDATE;
  f->hooks.ud = f;
  f->hooks.token_lookup = hook_token_lookup;
  f->hooks.usable_keys = hook_usable_keys;
  f->hooks.key_rejected = hook_key_rejected;
  f->hooks.serve_mode = hook_serve_mode;
  f->hooks.health = hook_health;
  f->hooks.hold_timeout_ms = cfg->election_timeout_ms * 3;
  gateway_add_metrics_collector(gw, collect_metrics, f);
  uv_timer_init(loop, &f->tick);
  f->tick.data = f;
  f->last_tick_ms = zg_mono_ms();
  uv_timer_start(&f->tick, on_tick, f->heartbeat_ms, f->heartbeat_ms);
  *out = f;
  return 0;
}

int failover_switchover(struct failover *f, const char *to, const char *reason,
                        void (*cb)(void *ud, int status, const char *msg), void *ud) {
  if (f->draining) return CONSENSUS_EBUSY;
  if (!failover_is_active(f)) return CONSENSUS_ENOTLEADER;
  if (to && strcmp(to, f->node_id) == 0) return CONSENSUS_EINVALID;
  f->draining = true;
  f->transfer_started = false;
  snprintf(f->switch_to, sizeof(f->switch_to), "%s", to ? to : "");
  snprintf(f->switch_reason, sizeof(f->switch_reason), "%s", reason ? reason : "switchover");
  f->switch_cb = cb;
  f->switch_ud = ud;
  f->drain_deadline_ms = zg_mono_ms() + f->drain_timeout_ms;
  if (!to) {
    char target[64];
    if (pick_target(f, f->preferred_zone[0] != 0, target, sizeof(target)) ||
        pick_target(f, false, target, sizeof(target)))
      snprintf(f->switch_to, sizeof(f->switch_to), "%s", target);
  }
  zg_log(ZG_WARN, "switchover_started", "%s: draining in-flight requests, then handing over to %s",
         f->switch_reason, f->switch_to[0] ? f->switch_to : "the most caught-up node");
  refresh_role(f);
  switchover_progress(f);
  return 0;
}

void failover_on_leader_changed(struct failover *f) {
  /* A new fenced leader takes its first lease at once instead of on the
   * next tick: one heartbeat less of unavailability after an election. */
  renew_lease(f);
  refresh_role(f);
}

void failover_drill_freeze(struct failover *f, unsigned ms) {
  zg_log(ZG_WARN, "drill_freeze", "drill: freezing the event loop for %u ms", ms);
  uv_sleep(ms);
}

void failover_status_json(const struct failover *f, cJSON *out) {
  const char *reason;
  enum failover_role r = compute_role(f, &reason);
  cJSON_AddStringToObject(out, "role", failover_role_name(r));
  cJSON_AddStringToObject(out, "role_reason", reason);
  cJSON_AddNumberToObject(out, "lease_remaining_ms", (double)failover_lease_remaining_ms(f));
  cJSON_AddBoolToObject(out, "draining", f->draining);
  cJSON_AddStringToObject(out, "preferred_zone", f->preferred_zone);
  cJSON_AddStringToObject(out, "failback", f->failback_auto ? "auto" : "manual");
}

/* /metrics: role, lease, raft progress and provider keys, for the
 * Prometheus rules in deploy/prometheus/alerts.yml. */
static void collect_metrics(void *ud, void *out_buf) {
  struct failover *f = ud;
  zg_buf *out = out_buf;
  const char *reason;
  enum failover_role r = compute_role(f, &reason);
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
      "# HELP zonegate_raft_term Current Raft term\n# TYPE zonegate_raft_term "
      "gauge\nzonegate_raft_term %llu\n"
      "# HELP zonegate_raft_commit_index Raft commit index\n# TYPE zonegate_raft_commit_index "
      "gauge\n"
      "zonegate_raft_commit_index %llu\n"
      "# HELP zonegate_raft_applied_index Raft applied index\n# TYPE zonegate_raft_applied_index "
      "gauge\n"
      "zonegate_raft_applied_index %llu\n",
      (unsigned long long)f->leader_changes, (double)failover_lease_remaining_ms(f) / 1000.0,
      (unsigned long long)consensus_term(f->cs), (unsigned long long)consensus_commit_index(f->cs),
      (unsigned long long)consensus_applied_index(f->cs));
  cJSON *keys = consensus_keys_json(f->cs);
  static const char *const states[] = {"active", "retiring", "revoked", "invalid"};
  int counts[4] = {0, 0, 0, 0};
  zg_buf_appendf(out, "# HELP zonegate_provider_key_age_days Age of each provider key\n"
                      "# TYPE zonegate_provider_key_age_days gauge\n");
  const cJSON *k;
  cJSON_ArrayForEach(k, keys) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(k, "id");
    const cJSON *up = cJSON_GetObjectItemCaseSensitive(k, "upstream");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(k, "state");
    const cJSON *age = cJSON_GetObjectItemCaseSensitive(k, "age_days");
    if (!cJSON_IsString(id) || !cJSON_IsString(up) || !cJSON_IsString(state)) continue;
    for (int i = 0; i < 4; i++)
      if (!strcmp(state->valuestring, states[i])) counts[i]++;
    if (!strcmp(state->valuestring, "revoked")) continue;
    zg_buf_appendf(out, "zonegate_provider_key_age_days{upstream=\"%s\",key_id=\"%s\"} %g\n",
                   up->valuestring, id->valuestring, cJSON_IsNumber(age) ? age->valuedouble : 0);
  }
  zg_buf_appendf(
      out, "# HELP zonegate_provider_key_rotate_after_days Rotation period of each provider key\n"
           "# TYPE zonegate_provider_key_rotate_after_days gauge\n");
  cJSON_ArrayForEach(k, keys) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(k, "id");
    const cJSON *up = cJSON_GetObjectItemCaseSensitive(k, "upstream");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(k, "state");
    const cJSON *rot = cJSON_GetObjectItemCaseSensitive(k, "rotate_after_days");
    if (!cJSON_IsString(id) || !cJSON_IsString(up) || !cJSON_IsString(state) ||
        !strcmp(state->valuestring, "revoked"))
      continue;
    zg_buf_appendf(out,
                   "zonegate_provider_key_rotate_after_days{upstream=\"%s\",key_id=\"%s\"} %g\n",
                   up->valuestring, id->valuestring, cJSON_IsNumber(rot) ? rot->valuedouble : 0);
  }
  zg_buf_appendf(out, "# HELP zonegate_provider_keys Provider keys by state\n# TYPE "
                      "zonegate_provider_keys gauge\n");
  for (int i = 0; i < 4; i++)
    zg_buf_appendf(out, "zonegate_provider_keys{state=\"%s\"} %d\n", states[i], counts[i]);
  cJSON_Delete(keys);
}

static void on_tick_closed(uv_handle_t *h) {
  struct failover *f = h->data;
  void (*done)(void *) = f->close_done;
  void *arg = f->close_arg;
  free(f);
  if (done) done(arg);
}

void failover_close(struct failover *f, void (*done)(void *arg), void *arg) {
  f->close_done = done;
  f->close_arg = arg;
  if (f->switch_cb) finish_switchover(f, CONSENSUS_ESHUTDOWN, "shutting down");
  uv_close((uv_handle_t *)&f->tick, on_tick_closed);
}
