/* upstream/upstream.h: HTTP client on the uv loop, used for the upstream
 * model API, standby forwarding, admin write forwarding and alert webhooks.
 *
 * Two engines behind one API. Plain http:// URLs (no TLS options, not
 * curl_only) go to a lean HTTP/1.1 client of this module (upstream/lean.c:
 * libuv TCP, a keep-alive connection pool per host and port, http_parser
 * for the response, one gathered write per request); everything else, and
 * every https:// URL (TLS, HTTP/2), goes to libcurl as described below.
 * Both keep every promise of this header; where they differ in detail it
 * is said at the function.
 *
 * Requests run on the libcurl MULTI interface driven by the caller's libuv
 * loop (no threads): one uv_poll_t per curl socket, one uv timer for curl's
 * own timeout, and one uv timer per transfer whose meaning follows the
 * transfer's phase (first byte, idle, total). Connections are kept alive and
 * reused through the multi handle's connection cache (TCP_NODELAY, no
 * "Expect: 100-continue"); TLS sessions are cached per client, so a new
 * connection to an https upstream resumes a session instead of a full
 * handshake; an https upstream that offers HTTP/2 carries concurrent
 * transfers as streams of one connection (upstream_client_set_https).
 *
 * Threading: everything here runs on the loop thread; no function may be
 * called from another thread.
 *
 * Callbacks are never called from inside upstream_start(); they always run
 * later from the loop. A callback may call upstream_cancel() (on its own or
 * another transfer), upstream_start() and upstream_client_close(); those
 * calls are safe and take effect before control returns to the loop.
 *
 * Request bodies and header values are never logged by this module.
 */
#ifndef ZG_GATEWAY_UPSTREAM_H
#define ZG_GATEWAY_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* One per loop. Owns the curl multi handle, the lean client, their
 * connections and every transfer. */
struct upstream_client;

/* Creates a client on `loop` (not owned; must outlive the client).
 * Returns 0 and sets *out, or a negative value with a message in errmsg. */
int upstream_client_create(uv_loop_t *loop, struct upstream_client **out, char *errmsg,
                           size_t errlen);

/* Cancels every transfer (cancelled transfers get NO callback), cleans up
 * the multi handle and closes every uv handle. The client and every
 * upstream_transfer pointer become invalid at once for the caller; memory is
 * released from close callbacks, after which done(arg) is called (done may be
 * NULL). The loop must keep running until then. Calling it twice does
 * nothing the second time. Safe to call from inside any upstream callback. */
void upstream_client_close(struct upstream_client *c, void (*done)(void *arg), void *arg);

/* How the model API's https:// upstreams are reached: every transfer whose
 * URL is https:// and that has no upstream_tls (node-to-node TLS keeps
 * its own settings: TLS 1.3, the cluster CA, HTTP/1.1). */
enum upstream_http_version {
  /* HTTP/2 when the server offers it in the TLS handshake (ALPN "h2"), else
   * HTTP/1.1. Concurrent transfers to one origin then share one connection
   * (up to the server's SETTINGS_MAX_CONCURRENT_STREAMS, then one more
   * connection); a transfer started while that connection is still being
   * set up waits for it instead of opening its own. The default. */
  UPSTREAM_HTTP_2 = 0,
  /* HTTP/1.1 only (ALPN offers only "http/1.1"): one kept-alive connection
   * per concurrent transfer. */
  UPSTREAM_HTTP_1_1,
};

struct upstream_https_options {
  /* PEM file of CA certificates the upstream's certificate must chain to,
   * instead of the system's store; NULL or "" = the system's store. The
   * host name is always checked. */
  const char *ca_file;
  enum upstream_http_version http_version;
};

/* Sets how https:// upstreams are reached (see upstream_https_options)
 * for transfers started from now on; a client starts with {NULL,
 * UPSTREAM_HTTP_2}. `o` and its strings are copied. Transfers under way
 * keep what they started with. Connections and TLS sessions are reused
 * only between transfers of the same settings (libcurl matches a cached
 * connection's CA file and HTTP version), so a change opens new ones.
 * The file is not read here: a bad one fails each transfer as
 * UPSTREAM_CONNECT_FAILED with the TLS error in curl_error (config
 * validation checks it first). Returns 0; -1 with a message in errmsg
 * when out of memory (the previous settings then stay). */
int upstream_client_set_https(struct upstream_client *c, const struct upstream_https_options *o,
                              char *errmsg, size_t errlen);

/* How a transfer ended. The split that matters for retries:
 *  - CONNECT_FAILED / CONNECT_TIMEOUT: the request never left the gateway
 *    (DNS failure, connection refused, TLS handshake or certificate error,
 *    malformed URL). Safe to retry elsewhere.
 *  - FIRST_BYTE_TIMEOUT / BROKEN: the request was (or may have been) sent.
 *    BROKEN covers a reset or close mid-body, a truncated body, a send error,
 *    and also "server closed without answering" (CURLE_GOT_NOTHING) even
 *    before any response byte, because the upstream may have processed it.
 *  - IDLE_TIMEOUT / TOTAL_TIMEOUT: our own phase timers fired.
 * Any other curl error is CONNECT_FAILED if it happened before a connection
 * was ready to send the request, BROKEN after. */
enum upstream_result {
  UPSTREAM_OK,
  UPSTREAM_CONNECT_FAILED,
  UPSTREAM_CONNECT_TIMEOUT,
  UPSTREAM_FIRST_BYTE_TIMEOUT,
  UPSTREAM_IDLE_TIMEOUT,
  UPSTREAM_TOTAL_TIMEOUT,
  UPSTREAM_BROKEN,
};

/* "ok", "connect_failed", "connect_timeout", "first_byte_timeout",
 * "idle_timeout", "total_timeout", "broken"; "unknown" otherwise. Static
 * strings, suitable as metric labels. */
const char *upstream_result_name(enum upstream_result r);

/* All in milliseconds; 0 = none of ours. Phases:
 *  connect_ms    DNS + TCP + TLS, enforced by curl (CURLOPT_CONNECTTIMEOUT_MS)
 *                or by the lean client's phase timer. With 0, a 300 s
 *                connect limit (curl's built-in one) still applies.
 *  first_byte_ms from the moment the connection is ready and the request is
 *                handed to it, until the first response byte.
 *  idle_ms       longest silence between response pieces (header lines or
 *                body chunks) once the response has started.
 *  total_ms      whole transfer, from upstream_start(). */
struct upstream_timeouts {
  unsigned connect_ms, first_byte_ms, idle_ms, total_ms;
};

/* TLS between zonegate nodes (https:// URLs): the peer must chain to
 * ca_file and, when peer_node is set, its certificate must name that node
 * id (base/tls.h; the host name is then not checked, since nodes are often
 * dialled by IP); cert_file/key_file are our client certificate. TLS 1.3. */
struct upstream_tls {
  const char *ca_file, *cert_file, *key_file;
  const char *peer_node;
};

/* Everything is copied by upstream_start(); the caller may free it after,
 * except the body when body_kept is set. */
struct upstream_request {
  const char *url;            /* full http:// or https:// URL */
  const char *method;         /* "POST", "GET", "HEAD" or any other verb */
  const char *const *headers; /* NULL-terminated "Name: value" lines; may be NULL.
                                 A line containing CR or LF is refused. */
  const char *body;           /* may be NULL when body_len is 0 */
  size_t body_len;
  struct upstream_timeouts timeouts;
  const struct upstream_tls *tls; /* NULL: default verification (system CAs) */
  /* The caller keeps body[0..body_len) unchanged until on_done returns or
   * upstream_cancel() is called: then it is sent from there, not copied
   * (a 2 MB prompt costs no extra malloc + copy). */
  bool body_kept;
  /* Use libcurl even for a plain http:// URL (the lean client is used for
   * those otherwise); config performance.upstream_client = "curl". */
  bool curl_only;
};

struct upstream_callbacks {
  /* Final status line and headers complete (once; interim 1xx responses are
   * skipped). content_type is the Content-Type value or NULL. headers is a
   * NULL-terminated "Name: value" list without CRLF. Both are valid only
   * during the call. May be NULL. */
  void (*on_response)(void *ud, int status, const char *content_type, const char *const *headers);
  /* A piece of the body as it arrives from the network (never buffered: SSE
   * streaming relies on this). data is valid only during the call. Return 0
   * to continue; non-zero aborts the transfer, and then NO further callback
   * (not even on_done) is made, exactly as if upstream_cancel() had been
   * called. May be NULL (body discarded). */
  int (*on_data)(void *ud, const char *data, size_t len);
  /* Transfer finished. Called exactly once unless the transfer was cancelled
   * (upstream_cancel, non-zero from on_data, or upstream_client_close)
   * first. curl_error is a short text for logs ("" on success), valid during
   * the call. The transfer pointer is invalid once on_done returns. May be
   * NULL. */
  void (*on_done)(void *ud, enum upstream_result result, const char *curl_error);
};

/* One request in flight. Owned by the client; freed by this module after
 * on_done returns, or after upstream_cancel(). */
struct upstream_transfer;

/* Starts a request. `cb` is copied; `ud` is passed back to every callback and
 * is not owned. *out (optional, may be NULL) receives a handle valid until
 * on_done returns or upstream_cancel() is called. Returns 0, or a negative
 * value with a message in errmsg and no callback will follow. */
int upstream_start(struct upstream_client *c, const struct upstream_request *req,
                   const struct upstream_callbacks *cb, void *ud, struct upstream_transfer **out,
                   char *errmsg, size_t errlen);

/* The client went away: stop now, make no further callback. Safe from any
 * callback, including the transfer's own on_response/on_data; a call from the
 * transfer's own on_done, or with NULL, does nothing. Memory is released
 * later, safely. */
void upstream_cancel(struct upstream_transfer *t);

/* Back-pressure: the consumer of on_data cannot take more for now (e.g. the
 * client's write queue is full). curl stops reading the upstream socket; the
 * TCP window then slows the upstream down. Held meanwhile: at most curl's
 * receive buffer (one read, 16 KiB by default), or the lean client's one
 * read (64 KiB, still encoded when the body is gzip); a piece already being
 * delivered by on_data when upstream_pause() is called from it counts as
 * consumed. While paused the first-byte and idle timeouts do not run (the
 * silence is ours); the total timeout still does. upstream_resume() undoes
 * it: on_data resumes later from the loop, never from inside the call, and
 * the idle timeout counts again from the resume. Both are safe from any
 * callback and outside them; calling either twice is harmless; with NULL, a
 * cancelled or a finished transfer they do nothing. */
void upstream_pause(struct upstream_transfer *t);
void upstream_resume(struct upstream_transfer *t);

/* True once the transfer will not read the request body again: the whole
 * request went out and a response body is under way, so no retry sends it
 * again. A caller that kept the body (body_kept) may then free it before
 * on_done (a long stream need not hold its prompt). Always false for a
 * libcurl transfer (libcurl may read the body until the transfer ends),
 * and for NULL. */
bool upstream_body_done(const struct upstream_transfer *t);

/* Microseconds from upstream_start(): until the connection was ready to send
 * (connect_us, includes DNS and TLS; ~0 on a reused connection; 0 if it
 * never got there), until the first response byte (first_byte_us; 0 if
 * none), and until the end (total_us; up to now while still running).
 * Measured with the monotonic clock. Most useful during on_done. */
struct upstream_timing {
  uint64_t connect_us, first_byte_us, total_us;
};
void upstream_get_timing(const struct upstream_transfer *t, struct upstream_timing *out);

/* Transfers started and neither finished nor cancelled. */
size_t upstream_active_count(const struct upstream_client *c);

#endif
