/* gateway/limiter: private to the gateway module.
 *
 * 1. struct limiter bounds the number of in-flight upstream requests.
 *    Requests beyond max_concurrent wait in a FIFO queue of at most
 *    max_queue entries for at most queue_timeout_ms; then the caller is
 *    told to reject them (429 with Retry-After). Runs on the uv loop with
 *    ONE uv_timer armed for the oldest waiter's deadline (the queue is
 *    FIFO, so deadlines are in queue order).
 * 2. struct rate_limiter is a per-key (client token id) requests-per-
 *    minute token bucket with bounded memory.
 *
 * Single-threaded (the uv loop): no locks.
 */
#ifndef ZG_GATEWAY_LIMITER_H
#define ZG_GATEWAY_LIMITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

struct limiter;

enum limiter_verdict {
  LIMITER_GRANTED,    /* go ahead; call limiter_release() when done */
  LIMITER_QUEUE_FULL, /* rejected at once: the queue is full (or waiting is off) */
  LIMITER_TIMED_OUT,  /* waited queue_timeout_ms without getting a slot */
  LIMITER_SHUTDOWN,   /* the limiter is closing */
};

/* Opaque handle to a queued request, valid until its callback runs or it
 * is cancelled. */
struct limiter_waiter;

typedef void (*limiter_cb)(void *ud, enum limiter_verdict verdict);

/* Limits:
 * - max_concurrent 0 means unlimited (every acquire is granted at once);
 * - max_queue 0 means no queue: a request that cannot be granted at once
 *   gets LIMITER_QUEUE_FULL;
 * - queue_timeout_ms 0 means no waiting either (same as max_queue 0).
 * Returns 0, or a negative libuv error code (uv_timer_init) / UV_ENOMEM.
 * On success *out is owned by the caller until limiter_close(). */
int limiter_create(uv_loop_t *loop, unsigned max_concurrent, unsigned max_queue,
                   unsigned queue_timeout_ms, struct limiter **out);

/* Every waiter still queued gets LIMITER_SHUTDOWN (synchronously, in FIFO
 * order); later acquires get LIMITER_SHUTDOWN at once. The timer handle is
 * closed and done(arg) runs from its close callback; the limiter is freed
 * right after done returns. Call limiter_release() for granted slots only
 * before limiter_close(); after done has run the limiter is gone. */
void limiter_close(struct limiter *limiter, void (*done)(void *arg), void *arg);

/* Live reconfiguration. Raising max_concurrent admits waiters at once (their
 * callbacks run synchronously). Deadlines of queued waiters are recomputed
 * from the time they were queued with the new timeout. Lowering max_queue
 * does not drop waiters already queued; lowering max_concurrent does not
 * revoke granted slots (new grants wait until in_flight drops below it). */
void limiter_configure(struct limiter *limiter, unsigned max_concurrent, unsigned max_queue,
                       unsigned queue_timeout_ms);

/* Asks for a slot. cb runs exactly once unless the waiter is cancelled
 * first:
 * - synchronously, before limiter_acquire returns, with GRANTED,
 *   QUEUE_FULL or SHUTDOWN; then the return value is NULL;
 * - or later from the loop with GRANTED (a slot freed), TIMED_OUT or
 *   SHUTDOWN; then the return value is the waiter handle, which becomes
 *   invalid when cb runs (the limiter frees it just before calling cb).
 * cb may call any limiter function, including release and acquire.
 * Returns NULL also when out of memory (after calling cb with QUEUE_FULL). */
struct limiter_waiter *limiter_acquire(struct limiter *limiter, limiter_cb cb, void *ud);

/* Removes a queued waiter without calling its callback (the client went
 * away). NULL is a no-op. Never call it after the waiter's callback ran. */
void limiter_cancel(struct limiter_waiter *waiter);

/* One granted slot is done: admits the next waiter, if any. */
void limiter_release(struct limiter *limiter);

unsigned limiter_in_flight(const struct limiter *limiter);
unsigned limiter_queue_depth(const struct limiter *limiter);
/* A Retry-After value for a rejected request, in whole seconds (>= 1). */
unsigned limiter_retry_after_s(const struct limiter *limiter);

/* ---- per-key requests-per-minute ------------------------------------ */

struct rate_limiter;

/* Keeps state for at most max_keys keys (0 → 65536). When full, the least
 * recently used key is forgotten; keys idle for a full minute (whose
 * bucket has refilled, so forgetting them changes nothing) are dropped as
 * new requests arrive. Returns NULL when out of memory. */
struct rate_limiter *rate_limiter_create(size_t max_keys);
void rate_limiter_destroy(struct rate_limiter *rl); /* NULL is fine */

/* Token bucket per key: capacity rpm, refilled continuously at rpm per
 * minute, so a client may burst up to rpm requests and then sustain rpm per
 * minute. rpm 0 means unlimited (always true, no state kept). Returns
 * true when the request may go ahead; otherwise false and, when
 * retry_after_s is not NULL, the seconds (>= 1) until one request would be
 * allowed. now_ms is a monotonic clock (zg_mono_ms()). The key is copied.
 * Out of memory: allows the request (fails open). */
bool rate_limiter_allow(struct rate_limiter *rl, const char *key, unsigned rpm, uint64_t now_ms,
                        unsigned *retry_after_s);
size_t rate_limiter_key_count(const struct rate_limiter *rl);

#endif
