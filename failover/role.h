/* failover/role.h (private to failover/ and its unit tests): the role
 * machine, the single source of truth for "is this node active".
 *
 * The machine reads the cluster through a small view (term, leader,
 * post-election barrier, transfer under way, now) and acts on it through
 * two calls (commit a barrier, transfer leadership), so the same code runs
 * on consensus/ in a node and on libraft's raft_fixture with a virtual
 * clock in tests/unit/test_role_fixture.c. It never includes consensus.h.
 *
 * Every role change goes through one function that checks the move
 * against a transition table and logs it (role_changed). A move the table
 * forbids is a bug: it is logged once as role_transition_refused, counted
 * in illegal_moves (the tests assert it stays 0) and replaced by
 * LEADER_UNFENCED, a role that never serves and from which every legal
 * path continues, so a bug can never make a node serve nor loop in logs.
 *
 * Every reader (data plane, health, metrics, alerts, status) calls
 * role_current(), which re-evaluates first: a lapsed lease stops serving
 * at the very next request, and the answer is always the logged role.
 */
#ifndef ZG_FAILOVER_ROLE_H
#define ZG_FAILOVER_ROLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "failover/failover.h"

/* The cluster as the role machine sees it. All calls are on the loop
 * thread; `ud` is passed back. */
struct failover_view {
  void *ud;
  uint64_t (*now_ms)(void *ud); /* monotonic milliseconds */
  uint64_t (*term)(void *ud);
  bool (*raft_leader)(void *ud);  /* this node is the raft leader */
  bool (*leader_known)(void *ud); /* some node (maybe this one) is known to lead */
  /* The barrier a new leader commits on election has committed in the
   * current term (the node's state is current). */
  bool (*barrier_committed)(void *ud);
  bool (*transfer_under_way)(void *ud);
  /* Commits a barrier; cb(arg, status) runs exactly once unless this
   * returns non-zero. */
  int (*barrier)(void *ud, void (*cb)(void *arg, int status), void *arg);
  /* Transfers leadership to node `to` (NULL: the most caught-up voter).
   * cb(arg, status) runs exactly once (status 0: leadership moved) unless
   * this returns non-zero (then nothing was started). */
  int (*transfer)(void *ud, const char *to, void (*cb)(void *arg, int status), void *arg);
  const char *(*strerror)(int status); /* may be NULL */
  /* A majority of the voters was heard from within within_ms (see
   * consensus_quorum_heard); NULL: never. */
  bool (*quorum_heard)(void *ud, unsigned within_ms);
  /* This node's data predates a `recover --force` of the cluster
   * (consensus_superseded): it never serves again. NULL: never. */
  bool (*superseded)(void *ud);
};

struct role_machine {
  const struct failover_view *view;
  bool witness;
  unsigned election_timeout_ms, heartbeat_ms;
  double lease_ratio; /* < 1 */
  /* lease */
  bool barrier_inflight;
  uint64_t barrier_submit_ms, barrier_term;
  uint64_t lease_until_ms, lease_term;
  /* role */
  enum failover_role role;
  char reason[128];
  uint64_t moves, illegal_moves;
  enum failover_role last_refused_from, last_refused_to;
  /* Cut off from the quorum (what /health/ready reports, see
   * role_cut_off): the term in which this node lost its lease while still
   * the raft leader (0: not fenced), and since when no leader is known
   * (0: one is). Both clear once a leader is known again. */
  uint64_t fenced_term, leaderless_since_ms;
  /* TILT: the loop stalled; no lease and no decision until a normal tick */
  uint64_t last_tick_ms;
  bool tilt;
  /* planned handover */
  bool draining, transfer_started;
  unsigned transfer_attempts; /* of this planned handover (a transfer can race a catch-up) */
  char switch_to[64], switch_reason[64];
  void (*switch_cb)(void *ud, int status, const char *msg);
  void *switch_ud;
  /* Optional trace of every move (tests). */
  void (*on_move)(void *ud, enum failover_role from, enum failover_role to, const char *reason);
  void *on_move_ud;
};

/* True when the table allows from -> to (a no-move is always allowed). */
bool role_move_allowed(enum failover_role from, enum failover_role to);

/* Starts in UNAVAILABLE (not evaluated yet); the first role_current()
 * moves it. `view` is borrowed and must outlive the machine. */
void role_init(struct role_machine *m, const struct failover_view *view, bool witness,
               unsigned election_timeout_ms, unsigned heartbeat_ms, double lease_ratio);

/* Re-evaluates and returns the role; *reason (may be NULL) gets the
 * condition that decided it (valid until the next call). */
enum failover_role role_current(struct role_machine *m, const char **reason);

/* One heartbeat: the TILT guard (a tick later than 4 heartbeats drops the
 * lease and returns false: take no decision now), then lease renewal,
 * re-evaluation and the next attempt of a planned handover's transfer. */
bool role_tick(struct role_machine *m);

/* True when this node cannot take part in the cluster's next decision: it
 * lost its lease while still the raft leader (no majority acknowledges its
 * barriers: a cut-off or stalled old active) and has not heard of a leader
 * since, or no leader has been known for the whole hold window (3 election
 * timeouts) and no majority of the voters was heard from within as long
 * (a node that still hears a quorum, e.g. one whose link from the leader
 * alone is cut, takes part in the next election and can hold requests
 * for it). /health/ready is 503 there: the LB's hold tier must not send
 * it requests it could only refuse at the end of the hold window. */
bool role_cut_off(struct role_machine *m);

/* Renews the lease now if due (on the fenced leader, no barrier in flight). */
void role_renew_lease(struct role_machine *m);
uint64_t role_lease_remaining_ms(const struct role_machine *m);

/* Planned handover: only from ACTIVE. `to` may be NULL or "" (the most
 * caught-up voter). The transfer starts at the next role_drain_progress
 * (failover_switchover calls it at once), without waiting for requests in
 * flight: they finish on this node, also once it is a standby (review of
 * issue 10: waiting for the slowest one held every new request for as
 * long). Meanwhile the role is DRAINING: new requests are held here until
 * leadership has moved (then forwarded). cb(ud, status, msg) runs once:
 * status 0 when leadership moved; otherwise the node is back to ACTIVE
 * (an aborted handover is a legal move back). Returns 0, ROLE_EBUSY (a
 * handover is already under way) or ROLE_ENOTACTIVE. */
enum { ROLE_EBUSY = -1, ROLE_ENOTACTIVE = -2 };
int role_drain_begin(struct role_machine *m, const char *to, const char *reason,
                     void (*cb)(void *ud, int status, const char *msg), void *ud);
/* Advances a handover: starts the transfer (again, after an attempt that
 * did not move leadership: up to 3 per handover) unless one is under way. */
void role_drain_progress(struct role_machine *m);
/* Ends a drain without a transfer result (shutdown): cb gets status. */
void role_drain_abort(struct role_machine *m, int status, const char *msg);

#endif
