/* test_role_fixture: failover's role machine (failover/role.c) driven by
 * libraft's raft_fixture on a virtual clock: one role machine per server,
 * each reading its own server through the failover_view, ticked every
 * heartbeat of fixture time.
 *
 * Checked: the leader moves UNAVAILABLE → ... → LEADER_UNFENCED → ACTIVE
 * and the others to STANDBY; never two ACTIVE at any event while the
 * leader is cut off; the lease lapses before a successor exists; a planned
 * handover moves leadership (ACTIVE → DRAINING → ...); an aborted one
 * (unknown target, one-voter cluster: the issue 12 reproduction) goes back
 * DRAINING → ACTIVE with no further moves; a stalled loop (TILT) drops the
 * lease; a witness never serves; a move the table forbids is refused once,
 * counted, and never serves. Every test ends with no illegal move.
 *
 * Failure modes: a cmocka assertion names the server and the roles. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <raft.h>
#include <raft/fixture.h>

#include "base/base.h"
#include "failover/role.h"

#define MAX_SERVERS 3
#define ELECTION_TIMEOUT_MS 600
#define HEARTBEAT_MS 100
#define LEASE_RATIO 0.8

/* ---- a trivial fsm ------------------------------------------------------ */

static int nop_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result) {
  (void)fsm;
  (void)buf;
  *result = NULL;
  return 0;
}

static int nop_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs) {
  (void)fsm;
  *bufs = raft_malloc(sizeof **bufs);
  if (*bufs == NULL) return RAFT_NOMEM;
  (*bufs)[0].len = 8;
  (*bufs)[0].base = raft_calloc(1, 8);
  *n_bufs = 1;
  return 0;
}

static int nop_restore(struct raft_fsm *fsm, struct raft_buffer *buf) {
  (void)fsm;
  raft_free(buf->base);
  return 0;
}

/* ---- one server: raft + its view + its role machine -------------------- */

struct fx;

struct server {
  struct fx *fx;
  unsigned index;
  struct raft_fsm fsm;
  struct failover_view view;
  struct role_machine rm;
  raft_term election_barrier_submitted, election_barrier_committed;
  unsigned moves_to[FAILOVER_WITNESS + 1];
};

struct fx {
  struct raft_fixture f;
  unsigned n;
  struct server s[MAX_SERVERS];
  raft_time next_tick;
};

struct barrier_req {
  struct raft_barrier req;
  struct server *s;
  raft_term term;
  void (*cb)(void *arg, int status); /* NULL: the election barrier */
  void *arg;
};

struct transfer_req {
  struct raft_transfer req;
  struct server *s;
  void (*cb)(void *arg, int status);
  void *arg;
};

static struct raft *raft_of(struct server *s) {
  return raft_fixture_get(&s->fx->f, s->index);
}

static uint64_t v_now(void *ud) {
  return raft_fixture_time(&((struct server *)ud)->fx->f);
}

static uint64_t v_term(void *ud) {
  return raft_current_term(raft_of(ud));
}

static bool v_raft_leader(void *ud) {
  return raft_state(raft_of(ud)) == RAFT_LEADER;
}

static bool v_leader_known(void *ud) {
  raft_id id = 0;
  const char *address = NULL;
  raft_leader(raft_of(ud), &id, &address);
  return id != 0;
}

static bool v_barrier_committed(void *ud) {
  struct server *s = ud;
  return v_raft_leader(s) && s->election_barrier_committed == raft_current_term(raft_of(s));
}

static bool v_transfer_under_way(void *ud) {
  return raft_transferee(raft_of(ud)) != 0;
}

static void barrier_done(struct raft_barrier *req, int status) {
  struct barrier_req *b = req->data;
  if (b->cb) {
    b->cb(b->arg, status);
  } else if (status == 0 && raft_current_term(raft_of(b->s)) == b->term) {
    b->s->election_barrier_committed = b->term;
  }
  free(b);
}

static int submit_barrier(struct server *s, void (*cb)(void *, int), void *arg) {
  if (raft_state(raft_of(s)) != RAFT_LEADER) return -1;
  struct barrier_req *b = calloc(1, sizeof *b);
  b->s = s;
  b->term = raft_current_term(raft_of(s));
  b->cb = cb;
  b->arg = arg;
  b->req.data = b;
  int rv = raft_barrier(raft_of(s), &b->req, barrier_done);
  if (rv != 0) free(b);
  return rv;
}

static int v_barrier(void *ud, void (*cb)(void *arg, int status), void *arg) {
  return submit_barrier(ud, cb, arg);
}

static void transfer_done(struct raft_transfer *req) {
  struct transfer_req *t = req->data;
  int status = raft_state(raft_of(t->s)) == RAFT_LEADER ? -6 : 0;
  t->cb(t->arg, status);
  free(t);
}

/* Targets are named by fixture index ("0", "1", ...); anything else is
 * refused at once, as consensus refuses an unknown node id. */
static int v_transfer(void *ud, const char *to, void (*cb)(void *arg, int status), void *arg) {
  struct server *s = ud;
  raft_id id = 0;
  if (to) {
    char *end = NULL;
    unsigned long i = strtoul(to, &end, 10);
    if (end == to || *end || i >= s->fx->n || i == s->index) return -4;
    id = raft_fixture_get(&s->fx->f, (unsigned)i)->id;
  }
  struct transfer_req *t = calloc(1, sizeof *t);
  t->s = s;
  t->cb = cb;
  t->arg = arg;
  t->req.data = t;
  int rv = raft_transfer(raft_of(s), &t->req, id, transfer_done);
  if (rv != 0) free(t);
  return rv;
}

static const char *v_strerror(int status) {
  return status == -4 ? "unknown node" : status == 0 ? "ok" : "transfer failed";
}

static void on_move(void *ud, enum failover_role from, enum failover_role to, const char *why) {
  struct server *s = ud;
  (void)from;
  (void)why;
  s->moves_to[to]++;
}

static struct fx *fx_start(unsigned n, int witness_index) {
  struct fx *fx = calloc(1, sizeof *fx);
  struct raft_configuration conf;
  assert_non_null(fx);
  fx->n = n;
  assert_int_equal(raft_fixture_init(&fx->f), 0);
  for (unsigned i = 0; i < n; i++) {
    struct server *s = &fx->s[i];
    s->fx = fx;
    s->index = i;
    s->fsm.version = 1;
    s->fsm.apply = nop_apply;
    s->fsm.snapshot = nop_snapshot;
    s->fsm.restore = nop_restore;
    assert_int_equal(raft_fixture_grow(&fx->f, &s->fsm), 0);
  }
  assert_int_equal(raft_fixture_configuration(&fx->f, n, &conf), 0);
  assert_int_equal(raft_fixture_bootstrap(&fx->f, &conf), 0);
  raft_configuration_close(&conf);
  for (unsigned i = 0; i < n; i++) {
    struct raft *r = raft_fixture_get(&fx->f, i);
    raft_set_election_timeout(r, ELECTION_TIMEOUT_MS);
    raft_set_heartbeat_timeout(r, HEARTBEAT_MS);
    raft_set_pre_vote(r, true);
    if (getenv("ZG_RAFT_TRACE") == NULL) r->tracer = NULL;
    raft_fixture_set_network_latency(&fx->f, i, 5);
  }
  assert_int_equal(raft_fixture_start(&fx->f), 0);
  for (unsigned i = 0; i < n; i++) {
    struct server *s = &fx->s[i];
    s->view = (struct failover_view){.ud = s,
                                     .now_ms = v_now,
                                     .term = v_term,
                                     .raft_leader = v_raft_leader,
                                     .leader_known = v_leader_known,
                                     .barrier_committed = v_barrier_committed,
                                     .transfer_under_way = v_transfer_under_way,
                                     .barrier = v_barrier,
                                     .transfer = v_transfer,
                                     .strerror = v_strerror};
    role_init(&s->rm, &s->view, (int)i == witness_index, ELECTION_TIMEOUT_MS, HEARTBEAT_MS,
              LEASE_RATIO);
    s->rm.on_move = on_move;
    s->rm.on_move_ud = s;
  }
  fx->next_tick = raft_fixture_time(&fx->f) + HEARTBEAT_MS;
  return fx;
}

static void fx_stop(struct fx *fx) {
  for (unsigned i = 0; i < fx->n; i++)
    assert_int_equal(fx->s[i].rm.illegal_moves, 0); /* an illegal move is a bug */
  raft_fixture_close(&fx->f);
  free(fx);
}

static unsigned count_role(struct fx *fx, enum failover_role role) {
  unsigned c = 0;
  for (unsigned i = 0; i < fx->n; i++)
    if (role_current(&fx->s[i].rm, NULL) == role) c++;
  return c;
}

static int index_of_role(struct fx *fx, enum failover_role role) {
  for (unsigned i = 0; i < fx->n; i++)
    if (role_current(&fx->s[i].rm, NULL) == role) return (int)i;
  return -1;
}

/* One fixture event, then what consensus/ does after every loop turn (the
 * election barrier) and, on each heartbeat of fixture time, a role tick on
 * every server. `ticks`: false to simulate a stalled loop. Asserts never
 * two ACTIVE. */
static void fx_step(struct fx *fx, bool ticks) {
  raft_fixture_step(&fx->f);
  for (unsigned i = 0; i < fx->n; i++) {
    struct server *s = &fx->s[i];
    struct raft *r = raft_of(s);
    if (raft_state(r) == RAFT_LEADER && s->election_barrier_submitted != raft_current_term(r)) {
      s->election_barrier_submitted = raft_current_term(r);
      submit_barrier(s, NULL, NULL);
    }
  }
  raft_time now = raft_fixture_time(&fx->f);
  if (now >= fx->next_tick) {
    if (ticks)
      for (unsigned i = 0; i < fx->n; i++) role_tick(&fx->s[i].rm);
    fx->next_tick = now + HEARTBEAT_MS;
  }
  if (count_role(fx, FAILOVER_ACTIVE) > 1)
    fail_msg("two ACTIVE nodes at %llu", (unsigned long long)now);
}

static void fx_run(struct fx *fx, unsigned ms) {
  raft_time end = raft_fixture_time(&fx->f) + ms;
  while (raft_fixture_time(&fx->f) < end) fx_step(fx, true);
}

static bool fx_run_until_role(struct fx *fx, enum failover_role role, unsigned max_ms) {
  raft_time end = raft_fixture_time(&fx->f) + max_ms;
  while (raft_fixture_time(&fx->f) < end) {
    if (index_of_role(fx, role) >= 0) return true;
    fx_step(fx, true);
  }
  return index_of_role(fx, role) >= 0;
}

static void cut_off(struct raft_fixture *f, unsigned i) {
  for (unsigned j = 0; j < raft_fixture_n(f); j++) {
    if (j == i) continue;
    raft_fixture_disconnect(f, i, j);
    raft_fixture_disconnect(f, j, i);
  }
}

/* ---- tests --------------------------------------------------------------- */

static void test_election_makes_one_active_and_standbys(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 5 * HEARTBEAT_MS);
  int active = index_of_role(fx, FAILOVER_ACTIVE);
  assert_true(active >= 0);
  assert_int_equal(raft_state(raft_fixture_get(&fx->f, (unsigned)active)), RAFT_LEADER);
  assert_int_equal(count_role(fx, FAILOVER_STANDBY), 2);
  /* ACTIVE was reached through LEADER_UNFENCED (lease taken after the
   * election barrier), and the lease is at most election x ratio. */
  assert_true(fx->s[active].moves_to[FAILOVER_LEADER_UNFENCED] >= 1);
  uint64_t lease = role_lease_remaining_ms(&fx->s[active].rm);
  assert_true(lease > 0 && lease <= (uint64_t)(ELECTION_TIMEOUT_MS * LEASE_RATIO));
  fx_stop(fx);
}

static void test_cut_off_leader_stops_before_successor_is_active(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 5 * HEARTBEAT_MS);
  unsigned old = (unsigned)index_of_role(fx, FAILOVER_ACTIVE);
  cut_off(&fx->f, old);
  raft_time cut_at = raft_fixture_time(&fx->f);
  raft_time lapsed_at = 0;
  raft_time end = cut_at + 20 * ELECTION_TIMEOUT_MS;
  int successor = -1;
  while (raft_fixture_time(&fx->f) < end) {
    fx_step(fx, true); /* asserts never two ACTIVE */
    if (!lapsed_at && role_current(&fx->s[old].rm, NULL) != FAILOVER_ACTIVE)
      lapsed_at = raft_fixture_time(&fx->f);
    for (unsigned i = 0; i < fx->n; i++)
      if (i != old && role_current(&fx->s[i].rm, NULL) == FAILOVER_ACTIVE) successor = (int)i;
    if (successor >= 0) break;
  }
  assert_true(successor >= 0);
  assert_true(lapsed_at > 0);
  assert_true(lapsed_at <= cut_at + (raft_time)(ELECTION_TIMEOUT_MS * LEASE_RATIO));
  assert_true(raft_fixture_time(&fx->f) > lapsed_at);
  fx_stop(fx);
}

struct switch_result {
  bool called;
  int status;
};

static void on_switch_done(void *ud, int status, const char *msg) {
  struct switch_result *r = ud;
  (void)msg;
  r->called = true;
  r->status = status;
}

static void test_switchover_moves_leadership(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 5 * HEARTBEAT_MS);
  unsigned old = (unsigned)index_of_role(fx, FAILOVER_ACTIVE);
  unsigned target = (old + 1) % 3;
  char to[8];
  snprintf(to, sizeof to, "%u", target);
  struct switch_result res = {false, 0};
  assert_int_equal(role_drain_begin(&fx->s[old].rm, to, "test switchover", on_switch_done, &res),
                   0);
  assert_int_equal(role_current(&fx->s[old].rm, NULL), FAILOVER_DRAINING);
  assert_int_equal(role_drain_begin(&fx->s[old].rm, to, "again", NULL, NULL), ROLE_EBUSY);
  raft_time end = raft_fixture_time(&fx->f) + 10 * ELECTION_TIMEOUT_MS;
  while (!res.called && raft_fixture_time(&fx->f) < end) fx_step(fx, true);
  assert_true(res.called);
  assert_int_equal(res.status, 0);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 10 * ELECTION_TIMEOUT_MS));
  fx_run(fx, 3 * HEARTBEAT_MS);
  assert_int_equal(index_of_role(fx, FAILOVER_ACTIVE), (int)target);
  assert_int_equal(role_current(&fx->s[old].rm, NULL), FAILOVER_STANDBY);
  fx_stop(fx);
}

/* Issue 12's reproduction: a one-voter cluster, a switchover to a node
 * that does not exist. The transfer is refused at once and the node goes
 * back to ACTIVE, legally, and then stays put (no move per heartbeat). */
static void test_aborted_switchover_one_voter_returns_to_active(void **state) {
  (void)state;
  struct fx *fx = fx_start(1, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 3 * HEARTBEAT_MS);
  struct role_machine *rm = &fx->s[0].rm;
  struct switch_result res = {false, 0};
  assert_int_equal(role_drain_begin(rm, "nonexistent", "switchover", on_switch_done, &res), 0);
  role_drain_progress(rm); /* the transfer starts and is refused */
  assert_true(res.called);
  assert_int_equal(res.status, -4);
  assert_int_equal(role_current(rm, NULL), FAILOVER_ACTIVE);
  assert_int_equal(fx->s[0].moves_to[FAILOVER_DRAINING], 1);
  uint64_t moves = rm->moves;
  fx_run(fx, 50 * HEARTBEAT_MS);
  assert_int_equal(rm->moves, moves);
  assert_int_equal(role_current(rm, NULL), FAILOVER_ACTIVE);
  /* Switchover with no other voter: raft refuses, same way back. */
  res.called = false;
  assert_int_equal(role_drain_begin(rm, NULL, "switchover", on_switch_done, &res), 0);
  role_drain_progress(rm);
  fx_run(fx, 5 * HEARTBEAT_MS);
  assert_true(res.called);
  assert_true(res.status != 0);
  assert_int_equal(role_current(rm, NULL), FAILOVER_ACTIVE);
  fx_stop(fx);
}

/* Review of issue 10: the handover waited for the slowest request in
 * flight (up to drain_timeout) while every new request was held. The
 * transfer now starts at the first progress step: leadership has moved
 * within two election timeouts of role_drain_begin, whatever is in flight
 * (the role machine no longer takes an "idle" input at all). */
static void test_handover_transfers_at_once(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 5 * HEARTBEAT_MS);
  unsigned old = (unsigned)index_of_role(fx, FAILOVER_ACTIVE);
  struct role_machine *rm = &fx->s[old].rm;
  struct switch_result res = {false, 0};
  raft_time start = raft_fixture_time(&fx->f);
  assert_int_equal(role_drain_begin(rm, NULL, "switchover", on_switch_done, &res), 0);
  role_drain_progress(rm);
  assert_true(rm->transfer_started);
  while (!res.called && raft_fixture_time(&fx->f) < start + 10 * ELECTION_TIMEOUT_MS)
    fx_step(fx, true);
  assert_true(res.called);
  assert_int_equal(res.status, 0);
  assert_true(raft_fixture_time(&fx->f) - start <= 2 * ELECTION_TIMEOUT_MS);
  assert_int_not_equal(role_current(rm, NULL), FAILOVER_ACTIVE);
  fx_stop(fx);
}

static void test_tilt_drops_the_lease_then_recovers(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  fx_run(fx, 5 * HEARTBEAT_MS);
  unsigned leader = (unsigned)index_of_role(fx, FAILOVER_ACTIVE);
  /* The loop stalls for 5 heartbeats (the lease itself still runs). */
  raft_time end = raft_fixture_time(&fx->f) + 5 * HEARTBEAT_MS;
  while (raft_fixture_time(&fx->f) < end) fx_step(fx, false);
  assert_false(role_tick(&fx->s[leader].rm));
  assert_int_equal(role_current(&fx->s[leader].rm, NULL), FAILOVER_LEADER_UNFENCED);
  assert_int_equal(role_lease_remaining_ms(&fx->s[leader].rm), 0);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 5 * ELECTION_TIMEOUT_MS));
  fx_stop(fx);
}

static void test_witness_never_serves(void **state) {
  (void)state;
  struct fx *fx = fx_start(3, 0);
  raft_fixture_elect(&fx->f, 0);
  fx_run(fx, 10 * HEARTBEAT_MS);
  assert_int_equal(raft_state(raft_fixture_get(&fx->f, 0)), RAFT_LEADER);
  assert_int_equal(role_current(&fx->s[0].rm, NULL), FAILOVER_WITNESS);
  assert_int_equal(count_role(fx, FAILOVER_ACTIVE), 0);
  assert_int_equal(role_drain_begin(&fx->s[0].rm, NULL, "x", NULL, NULL), ROLE_ENOTACTIVE);
  fx_stop(fx);
}

static void test_transition_table(void **state) {
  (void)state;
  for (int from = FAILOVER_UNAVAILABLE; from <= FAILOVER_WITNESS; from++) {
    assert_true(role_move_allowed(from, from));
    bool to_active =
        from == FAILOVER_LEADER_UNFENCED || from == FAILOVER_DRAINING || from == FAILOVER_ACTIVE;
    assert_int_equal(role_move_allowed(from, FAILOVER_ACTIVE), to_active);
    if (from != FAILOVER_WITNESS) {
      assert_true(role_move_allowed(from, FAILOVER_CANDIDATE));
      assert_true(role_move_allowed(from, FAILOVER_LEADER_UNFENCED));
    }
  }
  assert_true(role_move_allowed(FAILOVER_DRAINING, FAILOVER_ACTIVE)); /* aborted switchover */
  assert_false(role_move_allowed(FAILOVER_STANDBY, FAILOVER_DRAINING));
  assert_false(role_move_allowed(FAILOVER_WITNESS, FAILOVER_STANDBY));
  assert_false(role_move_allowed(FAILOVER_ACTIVE, FAILOVER_WITNESS));
}

/* A forbidden move (forced here by corrupting the current role) is refused
 * once, counted, lands on a role that does not serve, and the next
 * evaluation continues legally. */
static void test_illegal_move_is_refused_and_counted(void **state) {
  (void)state;
  struct fx *fx = fx_start(1, -1);
  assert_true(fx_run_until_role(fx, FAILOVER_ACTIVE, 20000));
  struct role_machine *rm = &fx->s[0].rm;
  rm->role = FAILOVER_STANDBY; /* the bug: STANDBY -> ACTIVE is not in the table */
  assert_int_equal(role_current(rm, NULL), FAILOVER_LEADER_UNFENCED);
  assert_int_equal(rm->illegal_moves, 1);
  assert_int_equal(role_current(rm, NULL), FAILOVER_ACTIVE); /* UNFENCED -> ACTIVE is legal */
  assert_int_equal(rm->illegal_moves, 1);
  rm->illegal_moves = 0; /* the forced bug is not the fixture's */
  fx_stop(fx);
}

int main(void) {
  zg_log_set_level(getenv("ZG_ROLE_VERBOSE") ? ZG_DEBUG : ZG_ERROR);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_election_makes_one_active_and_standbys),
      cmocka_unit_test(test_cut_off_leader_stops_before_successor_is_active),
      cmocka_unit_test(test_switchover_moves_leadership),
      cmocka_unit_test(test_aborted_switchover_one_voter_returns_to_active),
      cmocka_unit_test(test_handover_transfers_at_once),
      cmocka_unit_test(test_tilt_drops_the_lease_then_recovers),
      cmocka_unit_test(test_witness_never_serves),
      cmocka_unit_test(test_transition_table),
      cmocka_unit_test(test_illegal_move_is_refused_and_counted),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
