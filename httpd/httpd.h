/* httpd: a small HTTP/1.1 server on libuv + http_parser, shared by the
 * client API (gateway/) and the admin API. Keep-alive, pipelined requests
 * answered in order (one request per connection is dispatched at a time),
 * chunked request bodies, chunked streaming responses, and the bad-input
 * answers a public endpoint needs: 400 malformed, 413 body too large, 431
 * headers too large (every byte of the request line and header lines
 * counts, separators and CRLFs included; also more than 256 header lines,
 * or chunked-body trailers over the same byte limit), 408 request not
 * received within client_timeout. Memory per connection is bounded: see
 * max_write_queue_bytes and httpd_req_write_full().
 * Error bodies use OpenAI's shape {"error":{"message","type","code"}}.
 *
 * Ownership: a struct httpd_req belongs to httpd. A handler answers it
 * exactly once with httpd_respond() or httpd_stream_begin()..end(). A
 * handler that answers later (asynchronously) must set an abort callback:
 * if the client goes away first, the callback runs and the request is
 * freed right after it returns; it must not be touched again.
 */
#ifndef ZG_HTTPD_H
#define ZG_HTTPD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct httpd_server;
struct httpd_req;

typedef void (*httpd_handler)(void *ctx, struct httpd_req *req);

struct httpd_limits {
  size_t max_header_bytes;       /* request line + headers; default 16 KiB → 431 */
  size_t max_body_bytes;         /* default 4 MiB → 413 */
  unsigned client_timeout_ms;    /* whole request must arrive within this; default 10000 → 408 */
  unsigned keepalive_timeout_ms; /* idle keep-alive connection closed after; default 60000 */
  unsigned max_connections;      /* default 10000; over it new connections are closed at once */
  /* Response bytes held for one connection that its client has not taken
   * yet (beyond what the kernel's socket buffer took); default 1 MiB. Past
   * it httpd_req_write_full() is true and the next pipelined request waits. */
  size_t max_write_queue_bytes;
  /* A connection whose client takes no response byte for this long while
   * bytes wait for it is closed (its in-flight request aborted); default
   * 30000. Checked every slow_client_timeout_ms / 4 (at most every 1 s). */
  unsigned slow_client_timeout_ms;
};

/* Listens on "host:port". On failure returns a negative uv error code and
 * writes a message naming the address into errmsg (EADDRINUSE included). */
int httpd_listen(uv_loop_t *loop, const char *address, const struct httpd_limits *limits,
                 httpd_handler handler, void *ctx, struct httpd_server **out, char *errmsg,
                 size_t errlen);
void httpd_set_limits(struct httpd_server *srv, const struct httpd_limits *limits);
/* TLS on every connection accepted from now on (a context from base/tls.h;
 * httpd takes a reference). NULL: plaintext. ALPN, client certificates and
 * the TLS version come from the context. */
struct ssl_ctx_st;
void httpd_set_tls(struct httpd_server *srv, struct ssl_ctx_st *ctx);
/* One header line ("Name: value", copied) added to every response, e.g.
 * which node answered. NULL removes it. */
void httpd_set_response_header(struct httpd_server *srv, const char *line);
/* PROXY protocol (haproxy's doc/proxy-protocol.txt, v1 text and v2
 * binary) at the start of each connection of this server. trusted(ud, ip)
 * says whether the TCP peer may send one: a trusted peer's connection is
 * accepted with or without a header, and a header naming a TCP client
 * makes that client the connection's peer (httpd_req_peer_ip; the proxy
 * stays in httpd_req_socket_ip). A header from any other peer, a malformed
 * one, or one not complete within min(client_timeout, 3 s) closes the
 * connection (logged as WARN proxy_header_refused / proxy_header_invalid
 * with the address, at most once per address every 10 s). Not called:
 * no header is looked for (it would be a malformed request). */
void httpd_set_proxy_protocol(struct httpd_server *srv, bool (*trusted)(void *ud, const char *ip),
                              void *ud);
/* Stops accepting; idle keep-alive connections are closed, busy ones close
 * after their current response. In-flight requests finish normally. */
void httpd_stop_accepting(struct httpd_server *srv);
/* Requests dispatched to the handler and not yet answered completely. */
size_t httpd_active_requests(const struct httpd_server *srv);
size_t httpd_open_connections(const struct httpd_server *srv);
/* Closes the listener and every connection (aborting requests), then
 * calls done. */
void httpd_close(struct httpd_server *srv, void (*done)(void *arg), void *arg);

/* Called for every dispatched request once it is finished (answered
 * completely, or aborted because the client left: then status is 0),
 * just before httpd frees it. ctx is the handler's ctx. For access logs
 * and metrics. */
void httpd_set_finish_hook(struct httpd_server *srv,
                           void (*hook)(void *ctx, struct httpd_req *req));

/* ---- request ------------------------------------------------------- */
/* One pointer of the handler's own per request (e.g. access-log state). */
void httpd_req_set_user(struct httpd_req *req, void *user);
void *httpd_req_user(const struct httpd_req *req);
const char *httpd_req_method(const struct httpd_req *req); /* "GET", "POST", ... */
const char *httpd_req_path(const struct httpd_req *req);   /* without the query */
const char *httpd_req_query(const struct httpd_req *req);  /* after '?', or "" */
/* Drops `prefix` from the front of the path when it is there (an internal
 * route handing the request to another handler). True if it was. */
bool httpd_req_strip_path_prefix(struct httpd_req *req, const char *prefix);
/* Value of a query parameter (not URL-decoded), or NULL. */
const char *httpd_req_query_param(const struct httpd_req *req, const char *name, char *buf,
                                  size_t buflen);
const char *httpd_req_header(const struct httpd_req *req, const char *name); /* case-insensitive */
size_t httpd_req_header_count(const struct httpd_req *req);
void httpd_req_header_at(const struct httpd_req *req, size_t i, const char **name,
                         const char **value);
const char *httpd_req_body(const struct httpd_req *req, size_t *len); /* NUL-terminated */
/* Frees the request body's memory now (a handler that has sent it on and
 * will not read it again, e.g. under a long stream); httpd_req_body() then
 * gives "" and 0. Earlier pointers from httpd_req_body() are invalid. */
void httpd_req_release_body(struct httpd_req *req);
/* The client: the address a trusted proxy's PROXY header named, else the
 * TCP peer. httpd_req_socket_ip: always the TCP peer. */
const char *httpd_req_peer_ip(const struct httpd_req *req);
const char *httpd_req_socket_ip(const struct httpd_req *req);
/* True if the request's connection began with a PROXY header from a
 * trusted peer (httpd_set_proxy_protocol): a load balancer sent it. */
bool httpd_req_via_proxy(const struct httpd_req *req);
/* Removes every request header whose name starts with prefix
 * (case-insensitive), e.g. internal headers a client must not set. */
void httpd_req_drop_headers(struct httpd_req *req, const char *prefix);
/* The node id of the client's TLS certificate, verified against the
 * server context's CA; NULL without TLS or without a client certificate. */
const char *httpd_req_peer_node(const struct httpd_req *req);
uint64_t httpd_req_received_us(const struct httpd_req *req); /* monotonic, when complete */
void httpd_req_set_abort(struct httpd_req *req, void (*on_abort)(void *ud), void *ud);
bool httpd_req_is_head(const struct httpd_req *req);

/* ---- response ------------------------------------------------------ */
/* extra_headers: NULL-terminated list of "Name: value" lines, or NULL. */
void httpd_respond(struct httpd_req *req, int status, const char *content_type,
                   const char *const *extra_headers, const char *body, size_t len);
/* {"error":{"message":msg,"type":type,"code":code}} with the given status. */
void httpd_respond_error(struct httpd_req *req, int status, const char *type, const char *code,
                         const char *const *extra_headers, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* Chunked streaming response. write returns 0, or -1 once the client is
 * gone (then stop writing; the abort callback has run or will run). */
void httpd_stream_begin(struct httpd_req *req, int status, const char *content_type,
                        const char *const *extra_headers);
int httpd_stream_write(struct httpd_req *req, const char *data, size_t len);
void httpd_stream_end(struct httpd_req *req);
/* Ends a stream that failed: what was written is flushed, then the
 * connection is closed WITHOUT the terminating chunk, so the client sees
 * an incomplete response rather than a clean-looking finish. */
void httpd_stream_abort(struct httpd_req *req);
/* Closes the connection without a response byte (before any response:
 * nothing is written at all), so a load balancer may send the request to
 * another server (HAProxy's retry-on empty-response). The finish hook
 * sees status 444 (nginx's code for a connection closed without a
 * response). Pipelined requests behind it are dropped unanswered. */
void httpd_req_close_unanswered(struct httpd_req *req);
/* Back-pressure for a producer faster than the client (e.g. an upstream
 * stream). httpd_req_write_full() is true once the request's connection
 * holds max_write_queue_bytes or more of response bytes the client has not
 * taken: stop producing (writing on still works, nothing is dropped, the
 * queue only grows) until on_drain(ud) runs. on_drain runs once per full
 * episode, from the loop (never from inside an httpd_* call), when the
 * queue is down to max_write_queue_bytes / 2, and only while req is still
 * unanswered; it may call any httpd_* function on req. If the client never
 * drains, slow_client_timeout closes the connection and the abort callback
 * runs instead. False (and no on_drain) once the connection is gone. */
bool httpd_req_write_full(const struct httpd_req *req);
void httpd_req_set_drain(struct httpd_req *req, void (*on_drain)(void *ud), void *ud);
/* Bytes of the response body written so far (for access logs). */
uint64_t httpd_req_bytes_sent(const struct httpd_req *req);
int httpd_req_status(const struct httpd_req *req);

const char *httpd_status_text(int status);

#endif
