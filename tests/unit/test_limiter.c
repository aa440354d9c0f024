/* Unit tests for gateway/limiter: the concurrency limiter on a real uv
 * loop (grants, FIFO queue, queue full, timeouts, cancel, live
 * reconfiguration, close with waiters, re-entrant callbacks) and the
 * per-key requests-per-minute limiter. Every loop test ends with
 * uv_loop_close() == 0. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/limiter.h"

#define MAX_REQUESTS 16
#define NO_VERDICT (-1)

/* One simulated client request. */
struct request {
  struct fixture *fixture;
  int id;
  int verdict; /* NO_VERDICT until the callback runs */
  int calls;
  uint64_t answered_at_ms;
  bool release_when_granted;
  struct limiter_waiter *waiter;
};

struct fixture {
  uv_loop_t loop;
  struct limiter *limiter;
  struct request requests[MAX_REQUESTS];
  int order[MAX_REQUESTS]; /* request ids in callback order */
  int answered;
  uint64_t started_ms;
  int close_done_calls;
};

static void on_verdict(void *ud, enum limiter_verdict verdict) {
  struct request *request = ud;
  struct fixture *f = request->fixture;
  request->verdict = (int)verdict;
  request->calls++;
  request->answered_at_ms = uv_now(&f->loop);
  f->order[f->answered++] = request->id;
  if (verdict == LIMITER_GRANTED && request->release_when_granted) limiter_release(f->limiter);
}

static struct fixture *fixture_new(unsigned max_concurrent, unsigned max_queue,
                                   unsigned timeout_ms) {
  struct fixture *f = calloc(1, sizeof *f);
  assert_non_null(f);
  assert_int_equal(uv_loop_init(&f->loop), 0);
  assert_int_equal(limiter_create(&f->loop, max_concurrent, max_queue, timeout_ms, &f->limiter), 0);
  for (int i = 0; i < MAX_REQUESTS; i++) {
    f->requests[i].fixture = f;
    f->requests[i].id = i;
    f->requests[i].verdict = NO_VERDICT;
  }
  f->started_ms = uv_now(&f->loop);
  return f;
}

static struct request *acquire(struct fixture *f, int id) {
  struct request *request = &f->requests[id];
  request->waiter = limiter_acquire(f->limiter, on_verdict, request);
  return request;
}

static void on_close_done(void *arg) {
  struct fixture *f = arg;
  f->close_done_calls++;
}

/* Closes the limiter, runs the loop until the close finished and checks
 * that the loop closes cleanly and no callback ran twice. */
static void fixture_close(struct fixture *f) {
  limiter_close(f->limiter, on_close_done, f);
  assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(f->close_done_calls, 1);
  for (int i = 0; i < MAX_REQUESTS; i++) assert_true(f->requests[i].calls <= 1);
  assert_int_equal(uv_loop_close(&f->loop), 0);
}

static void fixture_finish(struct fixture *f) {
  fixture_close(f);
  free(f);
}

static void test_grant_up_to_max(void **state) {
  struct fixture *f = fixture_new(2, 4, 1000);
  struct request *a = acquire(f, 0), *b = acquire(f, 1), *c = acquire(f, 2);
  assert_int_equal(a->verdict, LIMITER_GRANTED); /* synchronously */
  assert_null(a->waiter);
  assert_int_equal(b->verdict, LIMITER_GRANTED);
  assert_int_equal(c->verdict, NO_VERDICT);
  assert_non_null(c->waiter);
  assert_int_equal(limiter_in_flight(f->limiter), 2);
  assert_int_equal(limiter_queue_depth(f->limiter), 1);
  limiter_release(f->limiter);
  assert_int_equal(c->verdict, LIMITER_GRANTED);
  assert_int_equal(limiter_in_flight(f->limiter), 2);
  assert_int_equal(limiter_queue_depth(f->limiter), 0);
  limiter_release(f->limiter);
  limiter_release(f->limiter);
  assert_int_equal(limiter_in_flight(f->limiter), 0);
  fixture_finish(f);
}

static void test_queue_is_fifo(void **state) {
  struct fixture *f = fixture_new(1, 8, 1000);
  for (int i = 0; i < 5; i++) acquire(f, i);
  assert_int_equal(f->answered, 1);
  assert_int_equal(limiter_queue_depth(f->limiter), 4);
  for (int i = 0; i < 4; i++) limiter_release(f->limiter);
  assert_int_equal(f->answered, 5);
  for (int i = 0; i < 5; i++) {
    assert_int_equal(f->order[i], i);
    assert_int_equal(f->requests[i].verdict, LIMITER_GRANTED);
  }
  limiter_release(f->limiter);
  assert_int_equal(limiter_in_flight(f->limiter), 0);
  fixture_finish(f);
}

static void test_queue_full(void **state) {
  struct fixture *f = fixture_new(1, 2, 1000);
  for (int i = 0; i < 4; i++) acquire(f, i);
  assert_int_equal(f->requests[0].verdict, LIMITER_GRANTED);
  assert_int_equal(f->requests[1].verdict, NO_VERDICT);
  assert_int_equal(f->requests[2].verdict, NO_VERDICT);
  assert_int_equal(f->requests[3].verdict, LIMITER_QUEUE_FULL);
  assert_null(f->requests[3].waiter);
  assert_int_equal(limiter_queue_depth(f->limiter), 2);
  assert_int_equal(limiter_retry_after_s(f->limiter), 1);
  fixture_finish(f);
  /* The queued ones were told the limiter shut down. */
}

static void test_no_queue_rejects_at_once(void **state) {
  struct fixture *f = fixture_new(1, 0, 1000);
  acquire(f, 0);
  acquire(f, 1);
  assert_int_equal(f->requests[1].verdict, LIMITER_QUEUE_FULL);
  fixture_finish(f);
}

struct late_acquire {
  uv_timer_t timer;
  struct fixture *fixture;
  int request_id;
};

static void on_late_acquire(uv_timer_t *timer) {
  struct late_acquire *late = timer->data;
  acquire(late->fixture, late->request_id);
  uv_close((uv_handle_t *)timer, NULL);
}

static void test_timeout_on_real_loop(void **state) {
  const unsigned timeout_ms = 60;
  struct fixture *f = fixture_new(1, 4, timeout_ms);
  acquire(f, 0);
  struct request *first = acquire(f, 1);
  uint64_t first_queued_at = uv_now(&f->loop);
  /* A second waiter joins 30 ms later: it must time out 30 ms later too. */
  struct late_acquire late = {.fixture = f, .request_id = 2};
  assert_int_equal(uv_timer_init(&f->loop, &late.timer), 0);
  late.timer.data = &late;
  assert_int_equal(uv_timer_start(&late.timer, on_late_acquire, 30, 0), 0);

  assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0); /* ends when nothing is pending */
  struct request *second = &f->requests[2];
  assert_int_equal(first->verdict, LIMITER_TIMED_OUT);
  assert_int_equal(second->verdict, LIMITER_TIMED_OUT);
  assert_true(first->answered_at_ms - first_queued_at >= timeout_ms);
  assert_true(first->answered_at_ms - first_queued_at < 1000);
  assert_true(second->answered_at_ms >= first_queued_at + 30 + timeout_ms);
  assert_int_equal(f->order[1], 1);
  assert_int_equal(f->order[2], 2);
  assert_int_equal(limiter_queue_depth(f->limiter), 0);
  assert_int_equal(limiter_in_flight(f->limiter), 1); /* the granted one is untouched */
  fixture_finish(f);
}

static void test_cancel(void **state) {
  struct fixture *f = fixture_new(1, 4, 50);
  acquire(f, 0);
  struct request *b = acquire(f, 1), *c = acquire(f, 2), *d = acquire(f, 3);
  limiter_cancel(b->waiter); /* the head */
  limiter_cancel(NULL);      /* no-op */
  assert_int_equal(limiter_queue_depth(f->limiter), 2);
  limiter_release(f->limiter);
  assert_int_equal(c->verdict, LIMITER_GRANTED);
  limiter_cancel(d->waiter);
  /* Nothing is left to time out: the loop ends at once and b, d stay silent. */
  assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(b->calls, 0);
  assert_int_equal(d->calls, 0);
  assert_int_equal(limiter_queue_depth(f->limiter), 0);
  fixture_close(f);
  assert_int_equal(b->calls, 0); /* cancelled waiters get no SHUTDOWN either */
  assert_int_equal(d->calls, 0);
  free(f);
}

static void test_live_reconfigure(void **state) {
  struct fixture *f = fixture_new(1, 8, 10000);
  for (int i = 0; i < 5; i++) acquire(f, i);
  assert_int_equal(limiter_queue_depth(f->limiter), 4);
  limiter_configure(f->limiter, 3, 8, 10000); /* raising admits 2 at once */
  assert_int_equal(f->requests[1].verdict, LIMITER_GRANTED);
  assert_int_equal(f->requests[2].verdict, LIMITER_GRANTED);
  assert_int_equal(f->requests[3].verdict, NO_VERDICT);
  assert_int_equal(limiter_in_flight(f->limiter), 3);

  /* Lowering max_queue keeps those queued but refuses newcomers. */
  limiter_configure(f->limiter, 3, 1, 10000);
  assert_int_equal(limiter_queue_depth(f->limiter), 2);
  acquire(f, 5);
  assert_int_equal(f->requests[5].verdict, LIMITER_QUEUE_FULL);

  /* Shortening the timeout applies to waiters already queued. */
  uint64_t before = uv_now(&f->loop);
  limiter_configure(f->limiter, 3, 1, 20);
  assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(f->requests[3].verdict, LIMITER_TIMED_OUT);
  assert_int_equal(f->requests[4].verdict, LIMITER_TIMED_OUT);
  assert_true(f->requests[3].answered_at_ms - before < 5000);

  /* Lowering max_concurrent does not revoke grants; new ones wait. */
  limiter_configure(f->limiter, 1, 4, 1000);
  acquire(f, 6);
  assert_int_equal(f->requests[6].verdict, NO_VERDICT);
  limiter_release(f->limiter);
  limiter_release(f->limiter);
  assert_int_equal(f->requests[6].verdict, NO_VERDICT); /* in_flight 1 = max */
  limiter_release(f->limiter);
  assert_int_equal(f->requests[6].verdict, LIMITER_GRANTED);
  fixture_finish(f);
}

static void test_close_with_waiters(void **state) {
  struct fixture *f = fixture_new(1, 4, 10000);
  for (int i = 0; i < 4; i++) acquire(f, i);
  limiter_close(f->limiter, on_close_done, f);
  for (int i = 1; i < 4; i++) {
    assert_int_equal(f->requests[i].verdict, LIMITER_SHUTDOWN);
    assert_int_equal(f->order[i], i);
  }
  acquire(f, 4); /* between close and done: refused */
  assert_int_equal(f->requests[4].verdict, LIMITER_SHUTDOWN);
  assert_int_equal(f->close_done_calls, 0); /* done runs from the loop */
  assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
  assert_int_equal(f->close_done_calls, 1);
  assert_int_equal(uv_loop_close(&f->loop), 0);
  free(f);
}

static void test_reentrant_release(void **state) {
  struct fixture *f = fixture_new(1, 8, 1000);
  acquire(f, 0);
  for (int i = 1; i < 6; i++) {
    f->requests[i].release_when_granted = true;
    acquire(f, i);
  }
  limiter_release(f->limiter); /* each grant releases at once: the chain drains */
  for (int i = 1; i < 6; i++) assert_int_equal(f->requests[i].verdict, LIMITER_GRANTED);
  assert_int_equal(limiter_in_flight(f->limiter), 0);
  assert_int_equal(limiter_queue_depth(f->limiter), 0);
  fixture_finish(f);
}

static void test_unlimited_concurrency(void **state) {
  struct fixture *f = fixture_new(0, 0, 0);
  for (int i = 0; i < MAX_REQUESTS; i++) acquire(f, i);
  for (int i = 0; i < MAX_REQUESTS; i++) assert_int_equal(f->requests[i].verdict, LIMITER_GRANTED);
  assert_int_equal(limiter_in_flight(f->limiter), MAX_REQUESTS);
  fixture_finish(f);
}

/* ---- rate limiter ------------------------------------------------------ */

static void test_rate_burst_then_refill(void **state) {
  struct rate_limiter *rl = rate_limiter_create(100);
  assert_non_null(rl);
  const uint64_t t0 = 1000000;
  unsigned retry_after = 0;
  for (int i = 0; i < 60; i++) assert_true(rate_limiter_allow(rl, "tok-a", 60, t0, &retry_after));
  assert_false(rate_limiter_allow(rl, "tok-a", 60, t0, &retry_after));
  assert_int_equal(retry_after, 1); /* one token per second at 60 rpm */
  /* Another key is independent. */
  assert_true(rate_limiter_allow(rl, "tok-b", 60, t0, NULL));
  /* After one second, exactly one more request. */
  assert_true(rate_limiter_allow(rl, "tok-a", 60, t0 + 1000, NULL));
  assert_false(rate_limiter_allow(rl, "tok-a", 60, t0 + 1000, NULL));
  /* After a minute the full burst is back. */
  int allowed = 0;
  for (int i = 0; i < 100; i++) allowed += rate_limiter_allow(rl, "tok-a", 60, t0 + 61000, NULL);
  assert_int_equal(allowed, 60);
  rate_limiter_destroy(rl);
}

static void test_rate_retry_after_and_unlimited(void **state) {
  struct rate_limiter *rl = rate_limiter_create(0);
  unsigned retry_after = 0;
  assert_true(rate_limiter_allow(rl, "slow", 1, 5000, &retry_after));
  assert_false(rate_limiter_allow(rl, "slow", 1, 5000, &retry_after));
  assert_int_equal(retry_after, 60);
  assert_false(rate_limiter_allow(rl, "slow", 1, 35000, &retry_after));
  assert_int_equal(retry_after, 30);
  for (int i = 0; i < 1000; i++) assert_true(rate_limiter_allow(rl, "free", 0, 5000, NULL));
  assert_int_equal(rate_limiter_key_count(rl), 1); /* rpm 0 keeps no state */
  rate_limiter_destroy(rl);
}

static void test_rate_memory_bounded(void **state) {
  struct rate_limiter *rl = rate_limiter_create(10);
  char key[32];
  for (int i = 0; i < 1000; i++) {
    snprintf(key, sizeof key, "token-%d", i);
    assert_true(rate_limiter_allow(rl, key, 5, 1000, NULL));
    assert_true(rate_limiter_key_count(rl) <= 10);
  }
  /* Idle keys are dropped as traffic arrives a minute later. */
  for (int i = 0; i < 5; i++) rate_limiter_allow(rl, "fresh", 1000, 1000 + 60000, NULL);
  assert_true(rate_limiter_key_count(rl) == 1);
  rate_limiter_destroy(rl);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_grant_up_to_max),
      cmocka_unit_test(test_queue_is_fifo),
      cmocka_unit_test(test_queue_full),
      cmocka_unit_test(test_no_queue_rejects_at_once),
      cmocka_unit_test(test_timeout_on_real_loop),
      cmocka_unit_test(test_cancel),
      cmocka_unit_test(test_live_reconfigure),
      cmocka_unit_test(test_close_with_waiters),
      cmocka_unit_test(test_reentrant_release),
      cmocka_unit_test(test_unlimited_concurrency),
      cmocka_unit_test(test_rate_burst_then_refill),
      cmocka_unit_test(test_rate_retry_after_and_unlimited),
      cmocka_unit_test(test_rate_memory_bounded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
