/* role.c: the role machine (see role.h): the transition table, the lease,
 * the TILT guard and the planned handover's drain and transfer.
 *
 * Happy path on the leader: elected (LEADER_UNFENCED) → the election
 * barrier commits → a lease barrier commits → ACTIVE; renewed every third
 * of the lease. A planned handover: ACTIVE → DRAINING (new requests held,
 * the transfer starts at once; requests in flight finish here whatever the
 * role) → LEADER_UNFENCED/STANDBY; a transfer that fails or is refused
 * goes back DRAINING → ACTIVE.
 *
 * Failure modes: a barrier that fails lets the lease lapse on its own
 * (ACTIVE → LEADER_UNFENCED); a stalled loop drops the lease (TILT); a
 * forbidden move is refused, logged once and counted (see role.h).
 */
#include "failover/role.h"

#include "base/base.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#define TILT_FACTOR 4 /* a tick later than 4 heartbeats means the loop stalled */
#define TILT_SLACK_MS 50

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

/* Allowed moves (row: from, column: to).
 * - Losing ground is always allowed between the gateway roles:
 *   UNAVAILABLE, CANDIDATE, STANDBY, LEADER_UNFENCED.
 * - ACTIVE only from LEADER_UNFENCED (lease taken) or DRAINING (a planned
 *   handover aborted: the transfer failed or was refused).
 * - DRAINING only from ACTIVE (handover begins) or LEADER_UNFENCED (the
 *   lease came back while a handover is still under way).
 * - WITNESS only from UNAVAILABLE (first evaluation), and a witness only
 *   ever goes back to UNAVAILABLE. */
static const bool transition_allowed[7][7] = {
    /*                 UNAV   CAND   STBY   UNFEN  ACTV   DRAIN  WITN */
    /* UNAVAILABLE */ {true, true, true, true, false, false, true},
    /* CANDIDATE   */ {true, true, true, true, false, false, false},
    /* STANDBY     */ {true, true, true, true, false, false, false},
    /* UNFENCED    */ {true, true, true, true, true, true, false},
    /* ACTIVE      */ {true, true, true, true, true, true, false},
    /* DRAINING    */ {true, true, true, true, true, true, false},
    /* WITNESS     */ {true, false, false, false, false, false, true},
};

bool role_move_allowed(enum failover_role from, enum failover_role to) {
  if ((unsigned)from > FAILOVER_WITNESS || (unsigned)to > FAILOVER_WITNESS) return false;
  return transition_allowed[from][to];
}

static uint64_t now_ms(const struct role_machine *m) {
  return m->view->now_ms(m->view->ud);
}

static const char *status_text(const struct role_machine *m, int status) {
  if (m->view->strerror) return m->view->strerror(status);
  return status == 0 ? "ok" : "failed";
}

static void set_role(struct role_machine *m, enum failover_role to, const char *reason) {
  if (m->role == to) {
    snprintf(m->reason, sizeof(m->reason), "%s", reason);
    return;
  }
  if (!role_move_allowed(m->role, to)) {
    m->illegal_moves++;
    if (m->last_refused_from != m->role || m->last_refused_to != to)
      zg_log(ZG_ERROR, "role_transition_refused", "%s -> %s refused (%s): a bug; holding as %s",
             failover_role_name(m->role), failover_role_name(to), reason,
             failover_role_name(FAILOVER_LEADER_UNFENCED));
    m->last_refused_from = m->role;
    m->last_refused_to = to;
    /* Never serves, and every legal path continues from it. A witness
     * stays a witness. */
    if (m->role == FAILOVER_WITNESS) return;
    to = FAILOVER_LEADER_UNFENCED;
    reason = "refused move (bug): not serving";
    if (m->role == to) return;
  }
  cJSON *fields = cJSON_CreateObject();
  cJSON_AddStringToObject(fields, "from", failover_role_name(m->role));
  cJSON_AddStringToObject(fields, "to", failover_role_name(to));
  cJSON_AddStringToObject(fields, "reason", reason);
  cJSON_AddNumberToObject(fields, "term", (double)m->view->term(m->view->ud));
  zg_log_fields(to == FAILOVER_ACTIVE || m->role == FAILOVER_ACTIVE ? ZG_WARN : ZG_INFO,
                "role_changed", fields);
  enum failover_role from = m->role;
  m->role = to;
  m->moves++;
  snprintf(m->reason, sizeof(m->reason), "%s", reason);
  if (m->on_move) m->on_move(m->on_move_ud, from, to, reason);
}

static bool lease_valid(const struct role_machine *m, uint64_t now) {
  return m->lease_term == m->view->term(m->view->ud) && now < m->lease_until_ms;
}

uint64_t role_lease_remaining_ms(const struct role_machine *m) {
  uint64_t now = now_ms(m);
  return lease_valid(m, now) ? m->lease_until_ms - now : 0;
}

/* The role from scratch; the reason names the first condition that failed. */
static enum failover_role compute_role(const struct role_machine *m, const char **reason) {
  const struct failover_view *v = m->view;
  if (v->superseded && v->superseded(v->ud)) {
    *reason = "data from an older cluster incarnation (recovered elsewhere): empty the data dir "
              "and add this node again";
    return FAILOVER_UNAVAILABLE;
  }
  if (m->witness) {
    *reason = "witness never serves clients";
    return FAILOVER_WITNESS;
  }
  if (v->raft_leader(v->ud)) {
    if (!v->barrier_committed(v->ud)) {
      *reason =
          "raft leader; election barrier not committed (or the old leader's lease may still run)";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (m->tilt) {
      *reason = "loop stalled (TILT): lease dropped";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (!lease_valid(m, now_ms(m))) {
      *reason = "raft leader without a valid lease";
      return FAILOVER_LEADER_UNFENCED;
    }
    if (m->draining) {
      *reason = m->switch_reason[0] ? m->switch_reason : "draining";
      return FAILOVER_DRAINING;
    }
    if (v->transfer_under_way(v->ud)) {
      *reason = "leadership transfer under way";
      return FAILOVER_LEADER_UNFENCED;
    }
    *reason = "leader with a valid lease";
    return FAILOVER_ACTIVE;
  }
  if (v->leader_known(v->ud)) {
    *reason = "following a known leader";
    return FAILOVER_STANDBY;
  }
  *reason = "no leader known";
  return FAILOVER_CANDIDATE;
}

/* Bookkeeping behind role_cut_off(). */
static void note_contact(struct role_machine *m, enum failover_role r) {
  const struct failover_view *v = m->view;
  uint64_t now = now_ms(m), term = v->term(v->ud);
  if (r == FAILOVER_STANDBY || r == FAILOVER_ACTIVE || r == FAILOVER_DRAINING) {
    m->fenced_term = 0;
    m->leaderless_since_ms = 0;
    return;
  }
  if (m->fenced_term && m->fenced_term != term) m->fenced_term = 0; /* a newer term: re-judge */
  /* Leader with a lease taken in this term that has lapsed (not handed
   * over: transfer and drain keep the lease) = its barriers stopped
   * committing. */
  if (r == FAILOVER_LEADER_UNFENCED && !m->witness && v->raft_leader(v->ud) &&
      m->lease_term == term && !lease_valid(m, now) && !v->transfer_under_way(v->ud))
    m->fenced_term = term;
  if (r == FAILOVER_CANDIDATE) {
    if (!m->leaderless_since_ms) m->leaderless_since_ms = now;
  } else {
    m->leaderless_since_ms = 0;
  }
}

bool role_cut_off(struct role_machine *m) {
  enum failover_role r = role_current(m, NULL);
  if (r == FAILOVER_STANDBY || r == FAILOVER_ACTIVE || r == FAILOVER_DRAINING) return false;
  if (m->fenced_term) return true;
  if (!m->leaderless_since_ms || now_ms(m) - m->leaderless_since_ms < 3ull * m->election_timeout_ms)
    return false;
  const struct failover_view *v = m->view;
  /* A candidate asks again at least every 2 election timeouts, and hears
   * the answers: 3 cover one round. */
  return !(v->quorum_heard && v->quorum_heard(v->ud, 3 * m->election_timeout_ms));
}

enum failover_role role_current(struct role_machine *m, const char **reason) {
  const char *why = "";
  enum failover_role r = compute_role(m, &why);
  set_role(m, r, why);
  note_contact(m, m->role);
  if (reason) *reason = m->reason;
  return m->role;
}

void role_init(struct role_machine *m, const struct failover_view *view, bool witness,
               unsigned election_timeout_ms, unsigned heartbeat_ms, double lease_ratio) {
  memset(m, 0, sizeof(*m));
  m->view = view;
  m->witness = witness;
  m->election_timeout_ms = election_timeout_ms;
  m->heartbeat_ms = heartbeat_ms;
  m->lease_ratio = lease_ratio;
  m->role = FAILOVER_UNAVAILABLE;
  m->last_refused_from = m->last_refused_to = FAILOVER_UNAVAILABLE;
  snprintf(m->reason, sizeof(m->reason), "not evaluated yet");
  m->last_tick_ms = now_ms(m);
}

/* ---- lease ---------------------------------------------------------- */

static void on_lease_barrier(void *arg, int status) {
  struct role_machine *m = arg;
  m->barrier_inflight = false;
  if (status != 0) return; /* the lease lapses on its own */
  if (m->barrier_term != m->view->term(m->view->ud)) return;
  uint64_t until =
      m->barrier_submit_ms + (uint64_t)((double)m->election_timeout_ms * m->lease_ratio);
  if (m->lease_term != m->barrier_term || until > m->lease_until_ms) {
    m->lease_until_ms = until;
    m->lease_term = m->barrier_term;
  }
  role_current(m, NULL);
}

/* A barrier is a log entry: renew every third of the lease (at least every
 * heartbeat), not every tick, so the lease never lapses under normal
 * latency while the log grows by a few entries a second only. */
void role_renew_lease(struct role_machine *m) {
  const struct failover_view *v = m->view;
  if (m->barrier_inflight || m->witness || m->tilt) return;
  if (!v->raft_leader(v->ud) || !v->barrier_committed(v->ud) || v->transfer_under_way(v->ud))
    return;
  uint64_t now = now_ms(m);
  uint64_t lease_ms = (uint64_t)((double)m->election_timeout_ms * m->lease_ratio);
  uint64_t interval = lease_ms / 3 > m->heartbeat_ms ? lease_ms / 3 : m->heartbeat_ms;
  if (lease_valid(m, now) && now - m->barrier_submit_ms < interval) return;
  m->barrier_submit_ms = now;
  m->barrier_term = v->term(v->ud);
  if (v->barrier(v->ud, on_lease_barrier, m) == 0) m->barrier_inflight = true;
}

bool role_tick(struct role_machine *m) {
  uint64_t now = now_ms(m);
  uint64_t late = now - m->last_tick_ms;
  m->last_tick_ms = now;
  if (late > (uint64_t)m->heartbeat_ms * TILT_FACTOR + TILT_SLACK_MS) {
    /* The loop stalled: timers and the lease may be stale. Drop the lease
     * and take no decision until a normal tick. */
    if (!m->tilt)
      zg_log(ZG_WARN, "tilt",
             "event loop stalled for %llu ms; lease dropped, decisions skipped this tick",
             (unsigned long long)late);
    m->tilt = true;
    m->lease_until_ms = 0;
    role_current(m, NULL);
    return false;
  }
  m->tilt = false;
  role_renew_lease(m);
  role_current(m, NULL);
  role_drain_progress(m);
  return true;
}

/* ---- planned handover ----------------------------------------------- */

static void finish_drain(struct role_machine *m, int status, const char *msg) {
  void (*cb)(void *, int, const char *) = m->switch_cb;
  void *ud = m->switch_ud;
  m->switch_cb = NULL;
  m->switch_ud = NULL;
  m->draining = false;
  m->transfer_started = false;
  m->switch_reason[0] = '\0';
  role_current(m, NULL);
  if (cb) cb(ud, status, msg);
}

/* A transfer libraft ends without moving leadership (the target was not
 * caught up when TimeoutNow reached it, or it lost the election it was
 * asked to start) is tried again, up to TRANSFER_ATTEMPTS times per
 * handover, from the next drain tick: a planned switchover should not fail
 * on such a race. */
#define TRANSFER_ATTEMPTS 3

static void on_transfer_done(void *arg, int status) {
  struct role_machine *m = arg;
  if (status != 0 && m->draining && m->transfer_attempts < TRANSFER_ATTEMPTS &&
      m->view->raft_leader(m->view->ud)) {
    zg_log(ZG_INFO, "switchover_retry", "leadership transfer did not complete (%s); trying again",
           status_text(m, status));
    m->transfer_started = false; /* role_drain_progress starts the next attempt */
    return;
  }
  if (status == 0)
    zg_log(ZG_INFO, "switchover_done", "leadership moved away from this node");
  else
    zg_log(ZG_WARN, "switchover_failed", "leadership transfer failed: %s; back to serving",
           status_text(m, status));
  finish_drain(m, status, status == 0 ? "leadership transferred" : status_text(m, status));
}

int role_drain_begin(struct role_machine *m, const char *to, const char *reason,
                     void (*cb)(void *ud, int status, const char *msg), void *ud) {
  if (m->draining) return ROLE_EBUSY;
  if (role_current(m, NULL) != FAILOVER_ACTIVE) return ROLE_ENOTACTIVE;
  m->draining = true;
  m->transfer_started = false;
  m->transfer_attempts = 0;
  snprintf(m->switch_to, sizeof(m->switch_to), "%s", to ? to : "");
  snprintf(m->switch_reason, sizeof(m->switch_reason), "%s", reason ? reason : "switchover");
  m->switch_cb = cb;
  m->switch_ud = ud;
  role_current(m, NULL);
  return 0;
}

void role_drain_progress(struct role_machine *m) {
  if (!m->draining || m->transfer_started) return;
  m->transfer_started = true;
  m->transfer_attempts++;
  int rc =
      m->view->transfer(m->view->ud, m->switch_to[0] ? m->switch_to : NULL, on_transfer_done, m);
  if (rc != 0) {
    zg_log(ZG_WARN, "switchover_failed", "leadership transfer refused: %s; back to serving",
           status_text(m, rc));
    finish_drain(m, rc, status_text(m, rc));
  }
}

void role_drain_abort(struct role_machine *m, int status, const char *msg) {
  if (m->draining || m->switch_cb) finish_drain(m, status, msg);
}
