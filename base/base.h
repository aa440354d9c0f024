/* base: small helpers every module uses: JSON-lines logging, clocks,
 * secret references (env:/file:/literal), hashing, randomness, base64,
 * constant-time compare, a growable byte buffer and the hold-and-retry
 * timer of forwarding (zg_hold).
 *
 * Nothing here allocates behind the caller's back except where a function
 * says it returns a malloc'd string (the caller frees it), and zg_hold's
 * timer (freed by zg_hold_stop). Logging writes
 * one JSON object per line to stdout; a failing stdout is ignored.
 */
#ifndef ZG_BASE_H
#define ZG_BASE_H

#include <openssl/ssl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct cJSON;

/* ---- logging ------------------------------------------------------- */
enum zg_log_level { ZG_DEBUG = 0, ZG_INFO = 1, ZG_WARN = 2, ZG_ERROR = 3 };

void zg_log_set_level(enum zg_log_level level);
void zg_log_set_node(const char *node_id); /* added to every line */
/* Whether a line at `level` would be written now: lets a caller skip
 * building an expensive line that the level filter would drop. */
bool zg_log_enabled(enum zg_log_level level);
/* {"ts":..., "level":..., "node":..., "event": event, "msg": <printf>} */
void zg_log(enum zg_log_level level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Same, with extra fields merged from `fields` (an object; ownership is
 * taken and it is freed). `fields` may be NULL. */
void zg_log_fields(enum zg_log_level level, const char *event, struct cJSON *fields);

/* Rate limit for repeated log lines about one source (failed peer
 * handshakes, failed admin logins, keyed by peer address): a small fixed
 * table of keys, least recently logged evicted first. Zero-initialise it
 * and set interval_ms. Not thread-safe: use one per loop thread. */
#define ZG_LOG_THROTTLE_SLOTS 16
struct zg_log_throttle {
  uint64_t interval_ms;
  struct {
    char key[72];
    uint64_t last_ms;
    unsigned suppressed;
  } slots[ZG_LOG_THROTTLE_SLOTS];
};
/* True when a line for `key` may be written now; *suppressed (may be
 * NULL) gets how many were dropped for that key since its last line.
 * False (and counted) inside the interval. */
bool zg_log_throttle(struct zg_log_throttle *t, const char *key, unsigned *suppressed);

#define ZG_LOG_INFO(event, ...) zg_log(ZG_INFO, event, __VA_ARGS__)
#define ZG_LOG_WARN(event, ...) zg_log(ZG_WARN, event, __VA_ARGS__)
#define ZG_LOG_ERROR(event, ...) zg_log(ZG_ERROR, event, __VA_ARGS__)

/* ---- clocks -------------------------------------------------------- */
uint64_t zg_mono_ms(void); /* monotonic milliseconds */
uint64_t zg_mono_us(void); /* monotonic microseconds */
uint64_t zg_wall_ms(void); /* wall clock, ms since the epoch */
void zg_iso8601(uint64_t wall_ms, char out[32]);

/* ---- secrets ------------------------------------------------------- */
/* Resolves "env:NAME", "file:PATH" or a literal. On success *out is a
 * malloc'd copy (trailing newline of a file stripped) and *was_literal says
 * whether the value was written in the config itself. Returns 0, or -1
 * with a message in err naming what was missing. */
int zg_secret_resolve(const char *spec, char **out, bool *was_literal, char *err, size_t errlen);
/* Overwrites then frees a secret string. NULL is fine. */
void zg_secret_free(char *secret);

/* ---- crypto helpers -------------------------------------------------- */
void zg_sha256_hex(const void *data, size_t len, char out[65]);
void zg_sha256(const void *data, size_t len, uint8_t out[32]);
/* HMAC-SHA256 of data under key. */
void zg_hmac_sha256(const void *key, size_t keylen, const void *data, size_t len, uint8_t out[32]);
int zg_random_bytes(void *buf, size_t len); /* 0 or -1 */
/* Constant-time equality; lengths are compared too (not secret). */
bool zg_ct_equal(const void *a, size_t alen, const void *b, size_t blen);
/* base64 (standard alphabet). Return length written or -1. */
int zg_base64_encode(const uint8_t *in, size_t len, char *out, size_t outcap);
int zg_base64_decode(const char *in, uint8_t *out, size_t outcap);
/* URL-safe random token with a prefix, e.g. "zg-" + 43 chars. malloc'd. */
char *zg_random_token(const char *prefix);

/* ---- buffer -------------------------------------------------------- */
typedef struct zg_buf {
  char *data;
  size_t len;
  size_t cap;
} zg_buf;

void zg_buf_init(zg_buf *b);
void zg_buf_free(zg_buf *b);
void zg_buf_reset(zg_buf *b);
int zg_buf_append(zg_buf *b, const void *data, size_t len); /* 0 or -1 (ENOMEM) */
/* Room for `extra` more bytes (and a NUL) without a reallocation: 0 or -1 (ENOMEM). */
int zg_buf_reserve(zg_buf *b, size_t extra);
int zg_buf_appendf(zg_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int zg_buf_vappendf(zg_buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Appends a whole file to out (NUL-terminated). 0, or -1 with errno set
 * (open or read failure). The read buffer is wiped: fine for secrets. */
int zg_read_file(const char *path, zg_buf *out);
/* Hands the data to the caller (NUL-terminated) and leaves b empty. */
char *zg_buf_steal(zg_buf *b);

/* ---- misc ---------------------------------------------------------- */
/* Copies the NUL-terminated src into dst[size] (size >= 1), cut to fit and
 * NUL-terminated: what snprintf(dst, size, "%s", src) does, without the
 * format machinery (it runs several times per request). Returns the length
 * written (at most size - 1). */
size_t zg_copy_cut(char *dst, size_t size, const char *src);
/* Drops the first `done` bytes of bufs[0..*nbufs) (what uv_try_write
 * took): emptied buffers leave the front, a partly written one is cut,
 * *nbufs shrinks to what is left. Returns the bytes left. The memory the
 * buffers point at is untouched (the caller's). */
size_t zg_bufs_consume(uv_buf_t *bufs, unsigned *nbufs, size_t done);
/* Levenshtein distance, for "did you mean" suggestions. */
size_t zg_edit_distance(const char *a, const char *b);
/* Parses "1GB", "512MB", "64KiB", "1024" into bytes. 0 ok, -1 bad. */
int zg_parse_size(const char *text, uint64_t *bytes);
/* Splits "host:port" (IPv4 or [IPv6]) into parts. 0 ok, -1 bad. */
int zg_split_host_port(const char *addr, char *host, size_t hostlen, int *port);
/* True for "address" or "address/prefix", IPv4 or IPv6, prefix in range. */
bool zg_cidr_ok(const char *cidr);
/* Process resident memory in bytes and CPU seconds (user+sys). */
uint64_t zg_process_rss_bytes(void);
double zg_process_cpu_seconds(void);

/* ---- system samples (sysstat.c) ------------------------------------ */
/* Memory of this node as every module sees it: the cgroup's limit and
 * usage when a limit below the machine's memory is set, else the
 * machine's (MemTotal, 1 - MemAvailable/MemTotal). 0 ok, -1 unreadable. */
struct zg_memory_sample {
  uint64_t limit_bytes, used_bytes;
  double used_percent;
  const char *source; /* "cgroup" or "system" (static) */
};
int zg_memory_sample(struct zg_memory_sample *out);
/* The limit of zg_memory_sample, or libuv's total memory if unreadable. */
uint64_t zg_memory_limit_bytes(void);
/* System-wide busy and total CPU jiffies (all cores) from /proc/stat;
 * usage over an interval is the ratio of the deltas. 0 ok, -1. */
int zg_cpu_sample(uint64_t *busy, uint64_t *total);
/* Parsers behind the samples (unit-tested): the "cpu" line of /proc/stat;
 * /proc/meminfo's used percent. 0 ok, -1 unparsable. */
int zg_parse_proc_stat(const char *text, uint64_t *busy, uint64_t *total);
int zg_parse_meminfo(const char *text, double *used_percent);

/* ---- hold and retry (hold.c) ----------------------------------------
 * "Send this to the active / the leader; while none answers, hold the
 * request and try again shortly, within a deadline" (the gateway's client
 * requests on a standby, the admin API's writes on a follower).
 *
 * zg_hold_init: no allocation, the clock not started yet. budget_ms: how
 * long the request may be held, counted from the first zg_hold_start() or
 * zg_hold_later(). fn(ud) is called from the loop once per scheduled
 * retry; it makes the next try (and may call any zg_hold_* on h).
 * A zero-filled struct is a valid, stopped hold (zg_hold_stop is a no-op).
 * The owner keeps h (and ud) alive until zg_hold_stop(); after it h may be
 * freed at once (the timer is freed by its own close callback). */
typedef void (*zg_hold_fn)(void *ud);
struct zg_hold {
  uv_loop_t *loop;
  zg_hold_fn fn;
  void *ud;
  uint64_t budget_ms;
  uint64_t deadline_ms; /* monotonic ms; 0 = clock not started */
  uv_timer_t *timer;    /* allocated at the first zg_hold_later; NULL after stop */
  unsigned retries;     /* retries scheduled by zg_hold_later */
};
void zg_hold_init(struct zg_hold *h, uv_loop_t *loop, uint64_t budget_ms, zg_hold_fn fn, void *ud);
/* A try is made now: starts the clock (first call only) and cancels a
 * pending retry. */
void zg_hold_start(struct zg_hold *h);
/* Try again in interval_ms (one shot): starts the clock if needed. False,
 * and nothing scheduled, once the deadline has passed (zg_hold_expired()
 * is then true) or when the timer cannot be allocated (ENOMEM;
 * zg_hold_expired() false). */
bool zg_hold_later(struct zg_hold *h, uint64_t interval_ms);
/* The clock was started and the deadline has passed. */
bool zg_hold_expired(const struct zg_hold *h);
/* Cancels a pending retry (fn is not called) and releases the timer; the
 * deadline is kept, so a later zg_hold_later still counts against it.
 * Safe twice, on a zero-filled struct and from inside fn. */
void zg_hold_stop(struct zg_hold *h);

#define ZG_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- TLS (tls.c) ------------------------------------------------------
 * TLS 1.3 for zonegate (OpenSSL 3), independent of any socket.
 *
 * - Contexts from PEM files: a node's certificate and key, and the cluster
 *   CA that every peer certificate must chain to (mutual TLS between nodes),
 *   or a plain server certificate (the optional TLS client port, ALPN
 *   http/1.1). TLS 1.3 only.
 * - Node identity: `zonegate certs init` puts the node id in the
 *   certificate's subjectAltName (URI urn:zonegate:node:<id> and DNS <id>)
 *   and CN; zg_tls_cert_node_id() reads it back from a verified peer.
 * - A session over memory BIOs: the caller feeds ciphertext read from its
 *   socket, takes plaintext out, gives plaintext to send and takes the
 *   ciphertext to write. No I/O here, so it layers under any libuv stream
 *   (httpd connections, the Raft transport).
 */
enum zg_tls_verify {
  ZG_TLS_PEER_REQUIRED, /* mutual TLS: the peer must present a cert chaining to the CA */
  ZG_TLS_PEER_OPTIONAL, /* server: a presented client cert must chain to the CA; none is ok */
  ZG_TLS_PEER_NONE,     /* server: no client certificate asked for (public client port) */
};

/* A TLS 1.3 context usable for both client and server sessions. ca may be
 * NULL with ZG_TLS_PEER_NONE. alpn: NULL, or a protocol the server selects
 * ("http/1.1"). NULL with a message naming the file on error. */
SSL_CTX *zg_tls_ctx_new(const char *cert_file, const char *key_file, const char *ca_file,
                        enum zg_tls_verify verify, const char *alpn, char *err, size_t errlen);

/* The node id in a certificate: the URI SAN urn:zonegate:node:<id>, else
 * the CN. 0, or -1 when it holds none. */
int zg_tls_cert_node_id(X509 *cert, char *out, size_t len);
/* The verified peer's node id (chain checked against the CA). 0 or -1. */
int zg_tls_peer_node_id(SSL *ssl, char *out, size_t len);
/* notAfter of the first certificate in a PEM file, as Unix seconds; 0 and
 * *ok=false when unreadable. */
int64_t zg_tls_cert_file_not_after(const char *path, bool *ok);

/* ---- session over memory BIOs ---------------------------------------- */
struct zg_tls;
enum { ZG_TLS_WANT = 0, ZG_TLS_CLOSED = -1, ZG_TLS_ERROR = -2 };

struct zg_tls *zg_tls_new(SSL_CTX *ctx, bool server);
void zg_tls_free(struct zg_tls *t);
SSL *zg_tls_ssl(struct zg_tls *t);
/* Ciphertext from the network. 0, or ZG_TLS_ERROR. */
int zg_tls_feed(struct zg_tls *t, const void *data, size_t len);
/* Drives the handshake: 1 done, ZG_TLS_WANT (0) more bytes needed,
 * ZG_TLS_ERROR (reason in zg_tls_error()). */
int zg_tls_handshake(struct zg_tls *t);
bool zg_tls_established(const struct zg_tls *t);
/* Plaintext received: > 0 bytes, ZG_TLS_WANT, ZG_TLS_CLOSED (close_notify)
 * or ZG_TLS_ERROR. Also finishes a handshake in progress. */
int zg_tls_read(struct zg_tls *t, void *buf, size_t len);
/* Plaintext to send (all of it is encrypted into the output). 0 or
 * ZG_TLS_ERROR. */
int zg_tls_write(struct zg_tls *t, const void *data, size_t len);
/* Queues a close_notify. */
void zg_tls_shutdown(struct zg_tls *t);
/* Ciphertext waiting to be sent. */
size_t zg_tls_pending(const struct zg_tls *t);
/* Moves up to len bytes of it into buf; returns how many. */
size_t zg_tls_take(struct zg_tls *t, void *buf, size_t len);
/* Why the session failed (certificate verification or protocol error). */
const char *zg_tls_error(const struct zg_tls *t);

#endif
