/* hold.c: "send this to the active (or the leader); while none answers,
 * hold the request and try again shortly, within a deadline". The
 * mechanics shared by the gateway's client requests (chat.c) and the admin
 * API's writes (node/admin.c): the deadline, a one-shot retry timer on
 * the uv loop, and stopping it safely while a retry is pending.
 *
 * The timer is allocated at the first zg_hold_later() (a request that
 * never waits allocates nothing) and freed by its close callback, so the
 * struct holding a zg_hold may be freed right after zg_hold_stop(). The
 * only failure is an allocation failure in zg_hold_later(), reported as
 * false with zg_hold_expired() still false. */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

void zg_hold_init(struct zg_hold *h, uv_loop_t *loop, uint64_t budget_ms, zg_hold_fn fn, void *ud) {
  memset(h, 0, sizeof(*h));
  h->loop = loop;
  h->budget_ms = budget_ms;
  h->fn = fn;
  h->ud = ud;
}

static void start_clock(struct zg_hold *h) {
  if (!h->deadline_ms) h->deadline_ms = zg_mono_ms() + h->budget_ms;
}

void zg_hold_start(struct zg_hold *h) {
  start_clock(h);
  if (h->timer) uv_timer_stop(h->timer);
}

bool zg_hold_expired(const struct zg_hold *h) {
  return h->deadline_ms && zg_mono_ms() >= h->deadline_ms;
}

static void on_tick(uv_timer_t *t) {
  struct zg_hold *h = t->data;
  h->fn(h->ud);
}

bool zg_hold_later(struct zg_hold *h, uint64_t interval_ms) {
  start_clock(h);
  if (zg_mono_ms() >= h->deadline_ms) return false;
  if (!h->timer) {
    h->timer = malloc(sizeof(*h->timer));
    if (!h->timer) return false;
    uv_timer_init(h->loop, h->timer);
    h->timer->data = h;
  }
  h->retries++;
  uv_timer_start(h->timer, on_tick, interval_ms, 0);
  return true;
}

static void on_closed(uv_handle_t *handle) {
  free(handle);
}

void zg_hold_stop(struct zg_hold *h) {
  if (!h->timer) return;
  uv_close((uv_handle_t *)h->timer, on_closed);
  h->timer = NULL;
}
