/* test_consensus_fixture: three libraft servers on raft/fixture.h's virtual
 * network and clock, each running the zonegate state machine: election,
 * replicated writes, a partitioned leader (its uncommitted write is lost,
 * it rejoins and converges), a deposed leader, and a lagging node brought up
 * to date by snapshot install. Convergence is checked by comparing the
 * snapshot bytes of every node's state machine. */
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
#include "consensus/consensus.h"
#include "consensus/internal.h"

#define N 3

static const uint8_t key[32] = {3, 1, 4, 1, 5, 9, 2, 6};

struct fx {
  struct raft_fixture f;
  struct zg_fsm fsms[N];
};

struct submitted {
  struct raft_apply req;
  bool done;
  int status;
};

static int setup(void **state) {
  struct fx *fx = calloc(1, sizeof *fx);
  struct raft_configuration conf;
  zg_log_set_level(ZG_ERROR + 1);
  assert_int_equal(raft_fixture_init(&fx->f), 0);
  for (int i = 0; i < N; i++) {
    zg_fsm_init(&fx->fsms[i], 100);
    assert_int_equal(raft_fixture_grow(&fx->f, &fx->fsms[i].raft), 0);
  }
  assert_int_equal(raft_fixture_configuration(&fx->f, N, &conf), 0);
  assert_int_equal(raft_fixture_bootstrap(&fx->f, &conf), 0);
  raft_configuration_close(&conf);
  for (unsigned i = 0; i < N; i++) {
    raft_set_pre_vote(raft_fixture_get(&fx->f, i), true);
    if (getenv("ZG_RAFT_TRACE") == NULL) raft_fixture_get(&fx->f, i)->tracer = NULL; /* quiet */
  }
  assert_int_equal(raft_fixture_start(&fx->f), 0);
  *state = fx;
  return 0;
}

static int teardown(void **state) {
  struct fx *fx = *state;
  raft_fixture_close(&fx->f);
  for (int i = 0; i < N; i++) zg_fsm_close(&fx->fsms[i]);
  free(fx);
  return 0;
}

static void apply_cb(struct raft_apply *req, int status, void *result) {
  struct submitted *s = req->data;
  assert_null(result);
  s->done = true;
  s->status = status;
}

/* Submits a write on server i; returns the index it got. */
static raft_index submit(struct fx *fx, unsigned i, const char *type, const char *args,
                         struct submitted *s) {
  struct raft_buffer buf;
  char err[256];
  memset(s, 0, sizeof *s);
  s->req.data = s;
  assert_int_equal(zg_build_entry(type, cJSON_Parse(args), "admin", "10.0.0.1",
                                  1700000000000ull + raft_fixture_time(&fx->f), "", key, &buf, err,
                                  sizeof err),
                   0);
  struct raft *r = raft_fixture_get(&fx->f, i);
  assert_int_equal(raft_apply(r, &s->req, &buf, 1, apply_cb), 0);
  return raft_last_index(r);
}

static void note(struct fx *fx, unsigned i, const char *what, struct submitted *s,
                 raft_index *index) {
  char args[128];
  snprintf(args, sizeof args, "{\"what\":\"%s\"}", what);
  *index = submit(fx, i, "audit.note", args, s);
}

static void assert_converged(struct fx *fx) {
  char *first = NULL, *snap;
  size_t first_len = 0, len;
  for (int i = 0; i < N; i++) {
    assert_int_equal(zg_fsm_snapshot_bytes(&fx->fsms[i], &snap, &len), 0);
    if (first == NULL) {
      first = snap;
      first_len = len;
      continue;
    }
    assert_int_equal(len, first_len);
    assert_memory_equal(snap, first, len);
    free(snap);
  }
  free(first);
}

static bool audit_has(struct zg_fsm *f, const char *what) {
  cJSON *audit = zg_state_audit_json(&f->st, 0);
  const cJSON *rec;
  bool found = false;
  cJSON_ArrayForEach(rec, audit) {
    const cJSON *d = cJSON_GetObjectItem(rec, "detail");
    if (cJSON_IsString(d) && strcmp(d->valuestring, what) == 0) found = true;
  }
  cJSON_Delete(audit);
  return found;
}

/* Server 1 or 2 leads and the other follows it (server 0 is cut off). */
static bool survivors_have_leader(struct raft_fixture *f, void *arg) {
  (void)arg;
  for (unsigned i = 1; i <= 2; i++) {
    struct raft *l = raft_fixture_get(f, i), *o = raft_fixture_get(f, 3 - i);
    raft_id id = 0;
    const char *addr = NULL;
    raft_leader(o, &id, &addr);
    if (raft_state(l) == RAFT_LEADER && raft_state(o) == RAFT_FOLLOWER && id == l->id) return true;
  }
  return false;
}

static void test_elect_write_partition_rejoin(void **state) {
  struct fx *fx = *state;
  struct raft_fixture *f = &fx->f;
  struct submitted s1, s2, s3, lost, after, final;
  raft_index idx;

  raft_fixture_elect(f, 0);
  assert_int_equal(raft_fixture_leader_index(f), 0);
  submit(fx, 0, "config.put", "{\"config\":{\"endpoint\":\"https://a\"}}", &s1);
  submit(fx, 0, "key.add", "{\"id\":\"k1\",\"secret\":\"sk-1\"}", &s2);
  idx = submit(fx, 0, "token.create",
               "{\"name\":\"t\",\"sha256\":\""
               "0123456789abcdef0123456789abcdef"
               "0123456789abcdef0123456789abcdef\"}",
               &s3);
  assert_true(raft_fixture_step_until_applied(f, N, idx, 2000));
  assert_true(s1.done && s2.done && s3.done);
  assert_int_equal(s1.status | s2.status | s3.status, 0);
  for (int i = 0; i < N; i++) {
    assert_int_equal(fx->fsms[i].st.config_version, 1);
    assert_int_equal(fx->fsms[i].st.n_keys, 1);
    assert_int_equal(fx->fsms[i].st.n_tokens, 1);
  }
  assert_converged(fx);

  /* Cut the leader off. Its new write can never commit. */
  for (unsigned j = 1; j < N; j++) {
    raft_fixture_disconnect(f, 0, j);
    raft_fixture_disconnect(f, j, 0);
  }
  note(fx, 0, "lost-write", &lost, &idx);
  /* Distinct timeouts so the two survivors do not split the vote forever. */
  raft_fixture_set_randomized_election_timeout(f, 1, 1200);
  raft_fixture_set_randomized_election_timeout(f, 2, 1900);
  assert_true(raft_fixture_step_until_has_no_leader(f, 10000));
  assert_true(raft_fixture_step_until(f, survivors_have_leader, NULL, 10000));
  unsigned leader = raft_state(raft_fixture_get(f, 1)) == RAFT_LEADER ? 1 : 2;
  note(fx, leader, "after-failover", &after, &idx);
  unsigned other = leader == 1 ? 2 : 1;
  assert_true(raft_fixture_step_until_applied(f, leader, idx, 5000));
  assert_true(raft_fixture_step_until_applied(f, other, idx, 5000));
  assert_true(after.done);
  assert_int_equal(after.status, 0);
  assert_true(lost.done);
  assert_int_not_equal(lost.status, 0); /* never reported as committed */

  /* The old leader rejoins: it drops its uncommitted entry and catches up. */
  for (unsigned j = 1; j < N; j++) {
    raft_fixture_reconnect(f, 0, j);
    raft_fixture_reconnect(f, j, 0);
  }
  note(fx, leader, "final", &final, &idx);
  assert_true(raft_fixture_step_until_applied(f, N, idx, 10000));
  assert_int_equal(final.status, 0);
  for (int i = 0; i < N; i++) {
    assert_false(audit_has(&fx->fsms[i], "lost-write"));
    assert_true(audit_has(&fx->fsms[i], "after-failover"));
    assert_true(audit_has(&fx->fsms[i], "final"));
  }
  assert_converged(fx);

  /* Depose the leader: another takes over and writes still commit. */
  raft_fixture_depose(f);
  assert_true(raft_fixture_step_until_has_leader(f, 10000));
  leader = raft_fixture_leader_index(f);
  note(fx, leader, "after-depose", &final, &idx);
  assert_true(raft_fixture_step_until_applied(f, N, idx, 10000));
  assert_int_equal(final.status, 0);
  assert_converged(fx);
}

static void test_snapshot_install_on_lagging_node(void **state) {
  struct fx *fx = *state;
  struct raft_fixture *f = &fx->f;
  struct submitted s[30];
  raft_index idx = 0;
  for (unsigned i = 0; i < N; i++) {
    raft_set_snapshot_threshold(raft_fixture_get(f, i), 8);
    raft_set_snapshot_trailing(raft_fixture_get(f, i), 2);
  }
  raft_fixture_elect(f, 0);
  submit(fx, 0, "key.add", "{\"id\":\"k1\",\"secret\":\"sk-SNAPSHOT-SECRET\"}", &s[0]);
  raft_fixture_kill(f, 2);
  /* Several rounds, so the leader takes snapshots and drops its log prefix. */
  for (int i = 1; i < 30; i++) {
    char what[32];
    snprintf(what, sizeof what, "n%d", i);
    note(fx, 0, what, &s[i], &idx);
    if (i % 5 == 0) assert_true(raft_fixture_step_until_applied(f, 1, idx, 10000));
  }
  assert_true(raft_fixture_step_until_applied(f, 0, idx, 10000));
  assert_true(raft_fixture_step_until_applied(f, 1, idx, 10000));
  raft_fixture_step_until_elapsed(f, 500);
  assert_int_equal(fx->fsms[2].st.n_keys, 0);
  unsigned snapshots_before = raft_fixture_n_send(f, 0, RAFT_INSTALL_SNAPSHOT);

  raft_fixture_revive(f, 2);
  assert_true(raft_fixture_step_until_applied(f, 2, idx, 20000));
  assert_true(raft_fixture_n_send(f, 0, RAFT_INSTALL_SNAPSHOT) > snapshots_before);
  assert_int_equal(fx->fsms[2].st.n_keys, 1);
  assert_true(audit_has(&fx->fsms[2], "n29"));
  assert_converged(fx);
  /* The snapshot the lagging node received held only the sealed secret. */
  char *snap;
  size_t len;
  assert_int_equal(zg_fsm_snapshot_bytes(&fx->fsms[2], &snap, &len), 0);
  for (size_t i = 0; i + 6 <= len; i++) assert_false(memcmp(snap + i, "SNAPSH", 6) == 0 && i > 16);
  free(snap);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_elect_write_partition_rejoin, setup, teardown),
      cmocka_unit_test_setup_teardown(test_snapshot_install_on_lagging_node, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
