/* gateway/limiter: concurrency limiter with a bounded FIFO wait queue, and
 * a per-key requests-per-minute token bucket.
 *
 * Concurrency: acquire grants at once while in_flight < max_concurrent and
 * nobody is queued; otherwise the request joins the queue (or is refused
 * with QUEUE_FULL). One uv_timer is armed for the head's deadline: the
 * queue is FIFO and every waiter gets the same timeout, so deadlines grow
 * along the queue. Every waiter is freed before its callback runs, so a
 * callback may call back into the limiter. Failure modes: out of memory
 * for a waiter answers QUEUE_FULL; closing answers SHUTDOWN to everyone.
 *
 * Rate: token buckets in a chained hash table with an LRU list, bounded
 * by max_keys; idle keys are dropped lazily. Out of memory fails open.
 */
#include "gateway/limiter.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct limiter_waiter {
  struct limiter *limiter;
  limiter_cb cb;
  void *ud;
  uint64_t queued_at_ms; /* uv_now() when queued */
  uint64_t deadline_ms;
  struct limiter_waiter *prev, *next;
};

struct limiter {
  uv_loop_t *loop;
  uv_timer_t timeout_timer; /* data = this limiter */
  unsigned max_concurrent, max_queue, queue_timeout_ms;
  unsigned in_flight;
  unsigned queue_depth;
  struct limiter_waiter *queue_head, *queue_tail;
  bool closing;
  void (*close_done)(void *arg);
  void *close_done_arg;
};

static void queue_remove(struct limiter *limiter, struct limiter_waiter *waiter) {
  if (waiter->prev)
    waiter->prev->next = waiter->next;
  else
    limiter->queue_head = waiter->next;
  if (waiter->next)
    waiter->next->prev = waiter->prev;
  else
    limiter->queue_tail = waiter->prev;
  limiter->queue_depth--;
}

static void queue_append(struct limiter *limiter, struct limiter_waiter *waiter) {
  waiter->next = NULL;
  waiter->prev = limiter->queue_tail;
  if (limiter->queue_tail)
    limiter->queue_tail->next = waiter;
  else
    limiter->queue_head = waiter;
  limiter->queue_tail = waiter;
  limiter->queue_depth++;
}

/* Pops the head, frees it and calls its callback with verdict. */
static void answer_head(struct limiter *limiter, enum limiter_verdict verdict) {
  struct limiter_waiter *waiter = limiter->queue_head;
  queue_remove(limiter, waiter);
  limiter_cb cb = waiter->cb;
  void *ud = waiter->ud;
  free(waiter);
  if (verdict == LIMITER_GRANTED) limiter->in_flight++;
  cb(ud, verdict);
}

static void on_queue_timeout(uv_timer_t *timer);

static void rearm_timer(struct limiter *limiter) {
  if (limiter->closing) return;
  if (!limiter->queue_head) {
    uv_timer_stop(&limiter->timeout_timer);
    return;
  }
  uint64_t now = uv_now(limiter->loop);
  uint64_t deadline = limiter->queue_head->deadline_ms;
  uv_timer_start(&limiter->timeout_timer, on_queue_timeout, deadline > now ? deadline - now : 0, 0);
}

static bool slot_free(const struct limiter *limiter) {
  return limiter->max_concurrent == 0 || limiter->in_flight < limiter->max_concurrent;
}

static void admit_waiters(struct limiter *limiter) {
  while (!limiter->closing && limiter->queue_head && slot_free(limiter))
    answer_head(limiter, LIMITER_GRANTED);
  rearm_timer(limiter);
}

static void on_queue_timeout(uv_timer_t *timer) {
  struct limiter *limiter = timer->data;
  if (limiter->closing) return;
  uint64_t now = uv_now(limiter->loop);
  while (!limiter->closing && limiter->queue_head && limiter->queue_head->deadline_ms <= now)
    answer_head(limiter, LIMITER_TIMED_OUT);
  rearm_timer(limiter);
}

int limiter_create(uv_loop_t *loop, unsigned max_concurrent, unsigned max_queue,
                   unsigned queue_timeout_ms, struct limiter **out) {
  struct limiter *limiter = calloc(1, sizeof *limiter);
  if (!limiter) return UV_ENOMEM;
  int rc = uv_timer_init(loop, &limiter->timeout_timer);
  if (rc != 0) {
    free(limiter);
    return rc;
  }
  limiter->timeout_timer.data = limiter;
  limiter->loop = loop;
  limiter->max_concurrent = max_concurrent;
  limiter->max_queue = max_queue;
  limiter->queue_timeout_ms = queue_timeout_ms;
  *out = limiter;
  return 0;
}

static void on_timer_closed(uv_handle_t *handle) {
  struct limiter *limiter = handle->data;
  if (limiter->close_done) limiter->close_done(limiter->close_done_arg);
  free(limiter);
}

void limiter_close(struct limiter *limiter, void (*done)(void *arg), void *arg) {
  if (limiter->closing) return;
  limiter->closing = true;
  limiter->close_done = done;
  limiter->close_done_arg = arg;
  uv_timer_stop(&limiter->timeout_timer);
  while (limiter->queue_head) answer_head(limiter, LIMITER_SHUTDOWN);
  uv_close((uv_handle_t *)&limiter->timeout_timer, on_timer_closed);
}

void limiter_configure(struct limiter *limiter, unsigned max_concurrent, unsigned max_queue,
                       unsigned queue_timeout_ms) {
  limiter->max_concurrent = max_concurrent;
  limiter->max_queue = max_queue;
  limiter->queue_timeout_ms = queue_timeout_ms;
  for (struct limiter_waiter *w = limiter->queue_head; w; w = w->next)
    w->deadline_ms = w->queued_at_ms + queue_timeout_ms;
  admit_waiters(limiter);
}

struct limiter_waiter *limiter_acquire(struct limiter *limiter, limiter_cb cb, void *ud) {
  if (limiter->closing) {
    cb(ud, LIMITER_SHUTDOWN);
    return NULL;
  }
  if (!limiter->queue_head && slot_free(limiter)) {
    limiter->in_flight++;
    cb(ud, LIMITER_GRANTED);
    return NULL;
  }
  if (limiter->max_queue == 0 || limiter->queue_timeout_ms == 0 ||
      limiter->queue_depth >= limiter->max_queue) {
    cb(ud, LIMITER_QUEUE_FULL);
    return NULL;
  }
  struct limiter_waiter *waiter = calloc(1, sizeof *waiter);
  if (!waiter) {
    cb(ud, LIMITER_QUEUE_FULL);
    return NULL;
  }
  waiter->limiter = limiter;
  waiter->cb = cb;
  waiter->ud = ud;
  waiter->queued_at_ms = uv_now(limiter->loop);
  waiter->deadline_ms = waiter->queued_at_ms + limiter->queue_timeout_ms;
  queue_append(limiter, waiter);
  if (waiter == limiter->queue_head) rearm_timer(limiter);
  return waiter;
}

void limiter_cancel(struct limiter_waiter *waiter) {
  if (!waiter) return;
  struct limiter *limiter = waiter->limiter;
  bool was_head = waiter == limiter->queue_head;
  queue_remove(limiter, waiter);
  free(waiter);
  if (was_head) rearm_timer(limiter);
}

void limiter_release(struct limiter *limiter) {
  if (limiter->in_flight > 0) limiter->in_flight--;
  admit_waiters(limiter);
}

unsigned limiter_in_flight(const struct limiter *limiter) {
  return limiter->in_flight;
}

unsigned limiter_queue_depth(const struct limiter *limiter) {
  return limiter->queue_depth;
}

unsigned limiter_retry_after_s(const struct limiter *limiter) {
  unsigned seconds = (limiter->queue_timeout_ms + 999) / 1000;
  return seconds ? seconds : 1;
}

/* ---- per-key requests-per-minute ------------------------------------ */

#define RATE_IDLE_MS 60000u /* a bucket idle this long is full again */
#define RATE_DEFAULT_MAX_KEYS 65536u

struct rate_entry {
  uint64_t hash;
  double tokens;
  uint64_t last_ms;
  struct rate_entry *bucket_next;
  struct rate_entry *lru_prev, *lru_next; /* front = most recently used */
  char key[];
};

struct rate_limiter {
  size_t max_keys;
  size_t key_count;
  struct rate_entry **buckets;
  size_t bucket_count; /* power of two */
  struct rate_entry *lru_front, *lru_back;
};

static uint64_t hash_key(const char *key) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
    h ^= *p;
    h *= 1099511628211ull;
  }
  return h;
}

struct rate_limiter *rate_limiter_create(size_t max_keys) {
  struct rate_limiter *rl = calloc(1, sizeof *rl);
  if (!rl) return NULL;
  rl->max_keys = max_keys ? max_keys : RATE_DEFAULT_MAX_KEYS;
  rl->bucket_count = 16;
  while (rl->bucket_count < rl->max_keys && rl->bucket_count < (1u << 20)) rl->bucket_count *= 2;
  rl->buckets = calloc(rl->bucket_count, sizeof *rl->buckets);
  if (!rl->buckets) {
    free(rl);
    return NULL;
  }
  return rl;
}

void rate_limiter_destroy(struct rate_limiter *rl) {
  if (!rl) return;
  struct rate_entry *e = rl->lru_front;
  while (e) {
    struct rate_entry *next = e->lru_next;
    free(e);
    e = next;
  }
  free(rl->buckets);
  free(rl);
}

static void rate_lru_unlink(struct rate_limiter *rl, struct rate_entry *e) {
  if (e->lru_prev)
    e->lru_prev->lru_next = e->lru_next;
  else
    rl->lru_front = e->lru_next;
  if (e->lru_next)
    e->lru_next->lru_prev = e->lru_prev;
  else
    rl->lru_back = e->lru_prev;
  e->lru_prev = e->lru_next = NULL;
}

static void rate_lru_push_front(struct rate_limiter *rl, struct rate_entry *e) {
  e->lru_prev = NULL;
  e->lru_next = rl->lru_front;
  if (rl->lru_front) rl->lru_front->lru_prev = e;
  rl->lru_front = e;
  if (!rl->lru_back) rl->lru_back = e;
}

static void rate_remove(struct rate_limiter *rl, struct rate_entry *e) {
  struct rate_entry **link = &rl->buckets[e->hash & (rl->bucket_count - 1)];
  while (*link && *link != e) link = &(*link)->bucket_next;
  if (*link) *link = e->bucket_next;
  rate_lru_unlink(rl, e);
  rl->key_count--;
  free(e);
}

bool rate_limiter_allow(struct rate_limiter *rl, const char *key, unsigned rpm, uint64_t now_ms,
                        unsigned *retry_after_s) {
  if (rpm == 0) return true;
  uint64_t hash = hash_key(key);
  struct rate_entry *e = rl->buckets[hash & (rl->bucket_count - 1)];
  while (e && (e->hash != hash || strcmp(e->key, key) != 0)) e = e->bucket_next;

  if (!e) {
    if (rl->key_count >= rl->max_keys && rl->lru_back) rate_remove(rl, rl->lru_back);
    size_t key_len = strlen(key);
    e = calloc(1, sizeof *e + key_len + 1);
    if (!e) return true; /* fail open: limiting is not worth an outage */
    memcpy(e->key, key, key_len + 1);
    e->hash = hash;
    e->tokens = rpm;
    e->last_ms = now_ms;
    size_t b = hash & (rl->bucket_count - 1);
    e->bucket_next = rl->buckets[b];
    rl->buckets[b] = e;
    rl->key_count++;
  } else {
    rate_lru_unlink(rl, e);
  }
  rate_lru_push_front(rl, e);

  if (now_ms > e->last_ms) e->tokens += (double)(now_ms - e->last_ms) * rpm / 60000.0;
  if (now_ms > e->last_ms) e->last_ms = now_ms;
  if (e->tokens > rpm) e->tokens = rpm; /* also applies a lowered rpm */

  bool allowed = e->tokens >= 1.0;
  if (allowed) {
    e->tokens -= 1.0;
  } else if (retry_after_s) {
    double wait_ms = (1.0 - e->tokens) * 60000.0 / rpm;
    unsigned seconds = (unsigned)ceil(wait_ms / 1000.0);
    *retry_after_s = seconds ? seconds : 1;
  }

  /* Lazily drop up to two keys idle long enough to have refilled. */
  for (int i = 0; i < 2; i++) {
    struct rate_entry *oldest = rl->lru_back;
    if (!oldest || oldest == e || now_ms < oldest->last_ms + RATE_IDLE_MS) break;
    rate_remove(rl, oldest);
  }
  return allowed;
}

size_t rate_limiter_key_count(const struct rate_limiter *rl) {
  return rl->key_count;
}
