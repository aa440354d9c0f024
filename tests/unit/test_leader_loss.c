/* test_leader_loss: the raft_io tap of consensus/leader_loss.c on a fake
 * transport: which messages reach libraft.
 *
 * The case: a pre-vote answer that arrives after this node stopped being a
 * candidate. libraft 0.22.1 may read it as a real term (a union read in
 * recv_request_vote_result.c) and then depose a healthy leader; the tap
 * keeps it from libraft. Every other message, and a pre-vote answer to a
 * node still campaigning, passes unchanged. */
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

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_stale_pre_vote_answer_never_reaches_libraft),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
