/* test_leader_loss: the raft_io tap of consensus/leader_loss.c on a fake
 * transport: which messages reach libraft.
 *
 * The case: a pre-vote answer that arrives after this node stopped being a
 * candidate. libraft 0.22.1 may read it as a real term (a union read in
 * recv_request_vote_result.c) and then depose a healthy leader; the tap
 * keeps it from libraft. Every other message, and a pre-vote answer to a
 * node still campaigning, passes unchanged.
 *
 * And the log-gap decisions (consensus/log_gap.c) over sampled values: a
 * follower stuck behind its leader (the leader's commit index above our
 * last index, which does not move, while the leader keeps sending) is
 * reported after ZG_GAP_TIMEOUTS election timeouts and cleared when the
 * log moves; a follower catching up normally never is. A leader acts once
 * per term on a follower that keeps reporting below its match index; the
 * tap records what followers report. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "consensus/internal.h"

static raft_io_recv_cb tap_deliver; /* what the tap hands the transport */
static unsigned libraft_got;        /* messages that reached "libraft" */

static int fake_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick,
                      raft_io_recv_cb recv) {
  (void)io;
  (void)msecs;
  (void)tick;
  tap_deliver = recv;
  return 0;
}

static void fake_libraft_recv(struct raft_io *io, struct raft_message *m) {
  (void)io;
  (void)m;
  libraft_got++;
}

static void fake_tick(struct raft_io *io) {
  (void)io;
}

static raft_time fake_time(struct raft_io *io) {
  (void)io;
  return 0;
}

static struct raft_message vote_result(bool pre_vote, raft_term term) {
  struct raft_message m;
  memset(&m, 0, sizeof m);
  m.type = RAFT_REQUEST_VOTE_RESULT;
  m.server_id = 2;
  m.server_address = "127.0.0.1:9002";
  m.request_vote_result.version = 2;
  m.request_vote_result.term = term;
  m.request_vote_result.vote_granted = false;
  m.request_vote_result.pre_vote = pre_vote;
  return m;
}

static void test_stale_pre_vote_answer_never_reaches_libraft(void **state) {
  (void)state;
  static struct zg_io_tap tap;
  static struct raft r;
  memset(&tap, 0, sizeof tap);
  memset(&r, 0, sizeof r);
  tap.io.start = fake_start;
  tap.io.time = fake_time;
  zg_io_tap_init(&tap, 600, 100);
  assert_int_equal(tap.io.start(&tap.io, 100, fake_tick, fake_libraft_recv), 0);
  assert_non_null(tap_deliver);
  tap.io.data = &r;
  r.current_term = 3;

  /* A follower (it heard the leader's heartbeat first) and a leader: the
   * late pre-vote refusal, echoing term 4, is dropped. */
  for (unsigned short st = RAFT_FOLLOWER; st <= RAFT_LEADER; st++) {
    if (st == RAFT_CANDIDATE) continue;
    r.state = st;
    libraft_got = 0;
    struct raft_message m = vote_result(true, 4);
    tap_deliver(&tap.io, &m);
    assert_int_equal(libraft_got, 0);
    assert_true(zg_leader_loss_drops(&r, &m));
    /* A real vote answer still reaches libraft (its term is the voter's). */
    m = vote_result(false, 4);
    tap_deliver(&tap.io, &m);
    assert_int_equal(libraft_got, 1);
  }
  /* Still campaigning: the pre-vote answer is what the candidate waits for. */
  r.state = RAFT_CANDIDATE;
  r.candidate_state.in_pre_vote = true;
  libraft_got = 0;
  struct raft_message m = vote_result(true, 4);
  tap_deliver(&tap.io, &m);
  assert_int_equal(libraft_got, 1);
  /* Not started yet (no raft): nothing is judged. */
  assert_false(zg_leader_loss_drops(NULL, &m));
}

static void test_follower_stuck_behind_leader(void **state) {
  (void)state;
  struct zg_gap_follower g;
  memset(&g, 0, sizeof g);
  const unsigned el = 600;
  uint64_t t = 1000;
  /* Behind (commit 136, last 44), heartbeats every 100 ms, last not moving. */
  enum zg_gap_event ev = ZG_GAP_NONE;
  uint64_t stuck_at = 0;
  for (; t < 1000 + 10 * el; t += 100) {
    ev = zg_gap_follower_step(&g, t, true, t - 20, 136, 44, el);
    if (ev == ZG_GAP_STUCK) {
      stuck_at = t;
      break;
    }
    assert_int_equal(ev, ZG_GAP_NONE);
  }
  assert_int_equal(ev, ZG_GAP_STUCK);
  assert_true(stuck_at - 1000 >= (uint64_t)ZG_GAP_TIMEOUTS * el);
  assert_true(stuck_at - 1000 <= (uint64_t)ZG_GAP_TIMEOUTS * el + 100);
  assert_true(g.behind);
  assert_int_equal(g.leader_commit, 136);
  /* Reported once, not every sample; again after ZG_GAP_REPEAT_MS. */
  assert_int_equal(zg_gap_follower_step(&g, t + 100, true, t + 80, 137, 44, el), ZG_GAP_NONE);
  assert_int_equal(
      zg_gap_follower_step(&g, t + ZG_GAP_REPEAT_MS, true, t + ZG_GAP_REPEAT_MS, 137, 44, el),
      ZG_GAP_STUCK);
  t += ZG_GAP_REPEAT_MS;
  /* The leader goes quiet (an election): still behind, nothing judged. */
  assert_int_equal(zg_gap_follower_step(&g, t + 5000, false, t, 137, 44, el), ZG_GAP_NONE);
  assert_true(g.behind);
  /* Entries arrive (a new leader resends them): cleared. */
  assert_int_equal(zg_gap_follower_step(&g, t + 5100, true, t + 5100, 140, 60, el), ZG_GAP_CLEARED);
  assert_false(g.behind);
  assert_int_equal(zg_gap_follower_step(&g, t + 5200, true, t + 5200, 140, 140, el), ZG_GAP_NONE);
}

static void test_follower_catching_up_is_not_stuck(void **state) {
  (void)state;
  struct zg_gap_follower g;
  memset(&g, 0, sizeof g);
  const unsigned el = 600;
  /* Far behind but the log moves every sample (normal catch-up). */
  for (uint64_t t = 1000, last = 10; t < 1000 + 20 * el; t += 100, last += 5)
    assert_int_equal(zg_gap_follower_step(&g, t, true, t, 100000, last, el), ZG_GAP_NONE);
  /* Caught up, nothing new written for a long time. */
  memset(&g, 0, sizeof g);
  for (uint64_t t = 1000; t < 1000 + 20 * el; t += 100)
    assert_int_equal(zg_gap_follower_step(&g, t, true, t, 500, 500, el), ZG_GAP_NONE);
  /* Behind and not moving, but no leader talks to us: no judgement. */
  memset(&g, 0, sizeof g);
  for (uint64_t t = 1000; t < 1000 + 20 * el; t += 100)
    assert_int_equal(zg_gap_follower_step(&g, t, true, 900, 500, 400, el), ZG_GAP_NONE);
  /* A candidate (not following) is not judged either. */
  for (uint64_t t = 1000; t < 1000 + 20 * el; t += 100)
    assert_int_equal(zg_gap_follower_step(&g, t, false, t, 500, 400, el), ZG_GAP_NONE);
  assert_false(g.behind);
  /* Cut off for 3 s right after one heartbeat showed it behind: the first
   * heartbeat after the cut (commit far ahead) is not "stuck for 3 s", it
   * starts the wait; the entries follow at once (seen in a partition test:
   * an ERROR and its all-clear in the same millisecond). */
  memset(&g, 0, sizeof g);
  assert_int_equal(zg_gap_follower_step(&g, 1000, true, 1000, 33, 32, el), ZG_GAP_NONE);
  for (uint64_t t = 1100; t < 4000; t += 100)
    assert_int_equal(zg_gap_follower_step(&g, t, true, 1000, 33, 32, el), ZG_GAP_NONE);
  assert_int_equal(zg_gap_follower_step(&g, 4000, true, 4000, 44, 32, el), ZG_GAP_NONE);
  assert_int_equal(zg_gap_follower_step(&g, 4010, true, 4010, 53, 53, el), ZG_GAP_NONE);
  assert_false(g.behind);
}

static void test_leader_acts_once_per_term(void **state) {
  (void)state;
  struct zg_gap_leader g;
  memset(&g, 0, sizeof g);
  const unsigned el = 600;
  /* Reports at or above its match index: fine (and a new leader's match is 0). */
  for (uint64_t t = 1000; t < 10000; t += 100)
    assert_false(zg_gap_leader_step(&g, t, 2, true, 50, 50, el));
  /* Reports 44 with match 45: acted on after two election timeouts, once. */
  int acted = 0;
  uint64_t t = 10000;
  for (; t < 20000; t += 100)
    if (zg_gap_leader_step(&g, t, 2, true, 44, 45, el)) {
      assert_true(t - 10000 >= 2 * el);
      acted++;
    }
  assert_int_equal(acted, 1);
  /* A moment below the match index (a late result) is forgiven. */
  memset(&g, 0, sizeof g);
  assert_false(zg_gap_leader_step(&g, 1000, 3, true, 44, 45, el));
  assert_false(zg_gap_leader_step(&g, 1100, 3, true, 45, 45, el));
  assert_false(zg_gap_leader_step(&g, 1000 + 3 * el, 3, true, 44, 45, el));
  /* No recent result: nothing. Next term: acts again. */
  assert_false(zg_gap_leader_step(&g, 1000 + 5 * el, 3, false, 0, 45, el));
  g.acted_term = 3;
  assert_false(zg_gap_leader_step(&g, 20000, 4, true, 44, 45, el));
  assert_true(zg_gap_leader_step(&g, 20000 + 2 * el, 4, true, 44, 45, el));
}

/* The tap keeps what each follower reports in its AppendEntries results in
 * the current term, and the leader's commit index it hears as follower. */
static void test_tap_records_reports(void **state) {
  (void)state;
  static struct zg_io_tap tap;
  static struct raft r;
  memset(&tap, 0, sizeof tap);
  memset(&r, 0, sizeof r);
  tap.io.start = fake_start;
  tap.io.time = fake_time;
  zg_io_tap_init(&tap, 600, 100);
  assert_int_equal(tap.io.start(&tap.io, 100, fake_tick, fake_libraft_recv), 0);
  tap.io.data = &r;
  r.current_term = 3;
  r.state = RAFT_LEADER;
  struct raft_message m;
  memset(&m, 0, sizeof m);
  m.type = RAFT_APPEND_ENTRIES_RESULT;
  m.server_id = 7;
  m.append_entries_result.term = 2; /* an older term: not recorded */
  m.append_entries_result.last_log_index = 10;
  tap_deliver(&tap.io, &m);
  raft_index last = 0;
  assert_false(zg_io_tap_reported_last(&tap, 7, 1000, &last));
  m.append_entries_result.term = 3;
  m.append_entries_result.rejected = 45;
  m.append_entries_result.last_log_index = 44;
  tap_deliver(&tap.io, &m);
  assert_true(zg_io_tap_reported_last(&tap, 7, 1000, &last));
  assert_int_equal(last, 44);
  assert_false(zg_io_tap_reported_last(&tap, 8, 1000, &last));
  r.state = RAFT_FOLLOWER;
  memset(&m, 0, sizeof m);
  m.type = RAFT_APPEND_ENTRIES;
  m.server_id = 9;
  m.append_entries.term = 3;
  m.append_entries.leader_commit = 136;
  tap_deliver(&tap.io, &m);
  assert_int_equal(tap.ae_leader_commit, 136);
  assert_int_equal(tap.ae_from, 9);
  assert_true(tap.ae_at_ms != 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_stale_pre_vote_answer_never_reaches_libraft),
      cmocka_unit_test(test_follower_stuck_behind_leader),
      cmocka_unit_test(test_follower_catching_up_is_not_stuck),
      cmocka_unit_test(test_leader_acts_once_per_term),
      cmocka_unit_test(test_tap_records_reports),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
