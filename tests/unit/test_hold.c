/* Unit tests for base's zg_hold (hold.c), the hold-and-retry timer of
 * forwarding, on a real uv loop: the deadline bounds the retries, stopping
 * while a retry is pending (and freeing the owner at once) is safe, the
 * retry count, a try made now cancels a pending retry, a zero budget and
 * a zero-filled hold. Every test ends with uv_loop_close() == 0 (no timer
 * left behind). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/base.h"

struct owner {
  struct zg_hold hold;
  unsigned calls;
  unsigned max_calls; /* stop re-arming after this many calls (0: until the deadline) */
  uint64_t interval_ms;
  bool stop_inside; /* zg_hold_stop from inside the callback on the last call */
  bool gave_up;     /* zg_hold_later returned false */
  uint64_t gave_up_at_ms;
};

static void on_retry(void *ud) {
  struct owner *o = ud;
  o->calls++;
  if (o->max_calls && o->calls >= o->max_calls) {
    if (o->stop_inside) {
      zg_hold_stop(&o->hold);
      zg_hold_stop(&o->hold); /* twice is fine */
    }
    return;
  }
  if (!zg_hold_later(&o->hold, o->interval_ms)) {
    o->gave_up = true;
    o->gave_up_at_ms = zg_mono_ms();
  }
}

static void close_loop(uv_loop_t *loop) {
  uv_run(loop, UV_RUN_DEFAULT); /* runs pending close callbacks */
  assert_int_equal(uv_loop_close(loop), 0);
}

/* Retries every 10 ms until a 120 ms budget is spent: it gives up no
 * earlier than the deadline and not much later, and each retry scheduled
 * is one call. */
static void test_deadline_respected(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct owner o = {.interval_ms = 10};
  zg_hold_init(&o.hold, &loop, 120, on_retry, &o);
  assert_false(zg_hold_expired(&o.hold)); /* clock not started */
  uint64_t t0 = zg_mono_ms();
  assert_true(zg_hold_later(&o.hold, o.interval_ms));
  uv_run(&loop, UV_RUN_DEFAULT); /* ends once nothing is scheduled */
  assert_true(o.gave_up);
  assert_true(zg_hold_expired(&o.hold));
  assert_true(o.gave_up_at_ms >= t0 + 120);
  assert_true(o.gave_up_at_ms < t0 + 120 + 200);
  assert_int_equal(o.hold.retries, o.calls);
  assert_true(o.calls >= 2 && o.calls <= 16); /* about budget / interval */
  /* past the deadline: nothing more is scheduled */
  assert_false(zg_hold_later(&o.hold, 1));
  assert_int_equal(o.hold.retries, o.calls);
  zg_hold_stop(&o.hold);
  close_loop(&loop);
}

/* A retry is pending when the owner is answered and freed: stop, free at
 * once, and the callback never runs. */
static void test_stop_while_pending(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct owner *o = calloc(1, sizeof(*o));
  assert_non_null(o);
  o->interval_ms = 5;
  zg_hold_init(&o->hold, &loop, 1000, on_retry, o);
  assert_true(zg_hold_later(&o->hold, 5));
  assert_non_null(o->hold.timer);
  zg_hold_stop(&o->hold);
  assert_null(o->hold.timer);
  zg_hold_stop(&o->hold);
  free(o); /* the timer is freed by its close callback, not through o */
  uint64_t until = zg_mono_ms() + 30;
  while (zg_mono_ms() < until) uv_run(&loop, UV_RUN_NOWAIT);
  close_loop(&loop); /* a call would have touched the freed owner (ASan) */
}

/* Exactly as many calls as retries scheduled; stopping from inside the
 * callback leaves nothing pending. */
static void test_retry_count(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct owner o = {.interval_ms = 1, .max_calls = 5, .stop_inside = true};
  zg_hold_init(&o.hold, &loop, 5000, on_retry, &o);
  assert_true(zg_hold_later(&o.hold, 1));
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.calls, 5);
  assert_int_equal(o.hold.retries, 5);
  assert_false(o.gave_up);
  assert_false(zg_hold_expired(&o.hold));
  assert_null(o.hold.timer);
  /* the deadline survives a stop: the hold can be used again */
  o.max_calls = 6;
  assert_true(zg_hold_later(&o.hold, 1));
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(o.calls, 6);
  assert_int_equal(o.hold.retries, 6);
  close_loop(&loop);
}

/* A try made now (zg_hold_start) starts the clock once and cancels a
 * pending retry. */
static void test_start_cancels_pending(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct owner o = {.interval_ms = 5};
  zg_hold_init(&o.hold, &loop, 60, on_retry, &o);
  zg_hold_start(&o.hold);
  uint64_t deadline = o.hold.deadline_ms;
  assert_true(deadline >= zg_mono_ms());
  assert_true(zg_hold_later(&o.hold, 5));
  zg_hold_start(&o.hold);
  assert_int_equal(o.hold.deadline_ms, deadline); /* not restarted */
  uv_run(&loop, UV_RUN_DEFAULT);                  /* the stopped timer does not keep it running */
  assert_int_equal(o.calls, 0);
  while (!zg_hold_expired(&o.hold)) uv_sleep(5);
  assert_false(zg_hold_later(&o.hold, 5));
  zg_hold_stop(&o.hold);
  close_loop(&loop);
}

/* A zero budget never holds (and allocates nothing); a zero-filled hold
 * is a stopped one. */
static void test_zero_budget_and_zeroed(void **state) {
  (void)state;
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct owner o = {.interval_ms = 5};
  zg_hold_init(&o.hold, &loop, 0, on_retry, &o);
  assert_false(zg_hold_later(&o.hold, 5));
  assert_true(zg_hold_expired(&o.hold));
  assert_null(o.hold.timer);
  assert_int_equal(o.hold.retries, 0);
  struct zg_hold zeroed;
  memset(&zeroed, 0, sizeof(zeroed));
  assert_false(zg_hold_expired(&zeroed));
  zg_hold_stop(&zeroed);
  close_loop(&loop);
  assert_int_equal(o.calls, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_deadline_respected),
      cmocka_unit_test(test_stop_while_pending),
      cmocka_unit_test(test_retry_count),
      cmocka_unit_test(test_start_cancels_pending),
      cmocka_unit_test(test_zero_budget_and_zeroed),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
