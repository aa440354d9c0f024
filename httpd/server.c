/* server.c: the listener, connections, request parsing and responses.
 *
 * Happy path: accept → read → http_parser fills a request → complete
 * requests queue on their connection → the head one is dispatched to the
 * handler → the handler answers → the next one is dispatched. Keep-alive
 * connections wait for the next request under the idle timer.
 *
 * Failure modes: a parse error, an oversized header block or body, or a
 * request that does not arrive within client_timeout is answered (400,
 * 431, 413, 408) after any earlier pipelined answers and the connection is
 * closed. A client that disconnects aborts its in-flight request through
 * the abort callback. Out of memory closes the connection. A client that
 * does not read holds at most max_write_queue_bytes of queued answer (plus
 * the one being written): past it the producer is told to wait
 * (httpd_req_write_full / on_drain) and the next pipelined request waits;
 * after slow_client_timeout without taking a byte it is cut.
 *
 * A streamed response's head is corked: httpd_stream_begin() keeps it on
 * the connection, and the next write (the first chunk, or the end of the
 * stream) goes out in the same writev, so a stream whose first chunk is
 * ready in the same loop iteration (an upstream that sends its head and
 * first event together) costs one write syscall and one packet, not two.
 * The head is never held past that iteration: a check handle (after the
 * poll phase) and a prepare handle (before the next poll, for a head
 * corked outside the poll phase) write every corked head that is still
 * waiting, so a late first chunk does not delay it.
 *
 * TLS (httpd_set_tls): a layer between the socket and the paths above, on
 * memory BIOs (base/tls.h). Ciphertext read from the socket is decrypted at
 * the top of parse_read() and the plaintext goes through parse_read() as
 * before; conn_writev() encrypts and hands the ciphertext to the same
 * socket write path (try_write, write queue, back-pressure and slow-client
 * accounting count ciphertext bytes). A failed handshake closes the
 * connection and logs WARN tls_handshake_failed with the peer address
 * (rate-limited). A verified client certificate's node id is kept for
 * httpd_req_peer_node().
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4 */
#endif
#include "httpd/httpd.h"

#include "base/base.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>
#include <http_parser.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_QUEUED_REQUESTS 32
/* After httpd_stop_accepting: how long an idle connection is still read
 * (a request already sent by the client is answered, not cut). */
#define STOP_LINGER_MS 300
/* Header lines per request (the byte limit alone would allow 4096 "a:"
 * lines, each costing a struct header); more → 431. */
#define MAX_HEADER_LINES 256
#define READ_BUFFER_SIZE 65536
/* Finished requests kept per server for reuse, with their buffers (so a
 * keep-alive request allocates nothing in httpd); buffers that grew past
 * POOLED_BUFFER_MAX are not kept. Under AddressSanitizer nothing is
 * pooled, so a use after the end of a request is still caught. */
#if defined(__SANITIZE_ADDRESS__)
#define REQUEST_POOL_SIZE 0
#else
#define REQUEST_POOL_SIZE 64
#endif
#define POOLED_BUFFER_MAX (64u * 1024u)
#define HEADER_NOT_STARTED SIZE_MAX

/* A request header: offsets into the request's header_text while parsing
 * (the buffer may move as it grows), pointers once the head is complete. */
struct header {
  size_t name_off, value_off; /* value_off = HEADER_NOT_STARTED until its value */
  const char *name;
  const char *value;
};

struct conn;

struct httpd_req {
  /* Kept while the request sits in the server's pool (capacity reused). */
  zg_buf url;         /* request target; split in place into path and query */
  zg_buf body;        /* NUL-terminated */
  zg_buf header_text; /* every header's "name\0value\0", one after the other */
  struct header *headers;
  size_t cap_headers;
  /* Per request: req_new zeroes everything from here on. */
  struct conn *conn; /* NULL once the connection is gone */
  struct httpd_server *srv;
  struct httpd_req *next;
  char method[16];
  const char *path;   /* in url, or "/" */
  const char *query;  /* in url, or "" */
  size_t n_headers;   /* headers parsed so far */
  bool headers_ready; /* name/value pointers are set */
  char peer_ip[64];   /* the client: a trusted proxy's PROXY header, else socket_ip */
  char socket_ip[64]; /* the TCP peer */
  char peer_node[64]; /* node id of a verified TLS client certificate, or "" */
  bool via_proxy;     /* the connection began with a trusted PROXY header */
  bool keep_alive;
  bool is_head;
  uint64_t received_us;
  int error_status; /* answered by httpd itself (parse errors, limits) */
  const char *error_message;
  void (*on_abort)(void *ud);
  void *abort_ud;
  void (*on_drain)(void *ud);
  void *drain_ud;
  int status;
  void *user;
  bool started, finished, streaming, dispatched;
  uint64_t bytes_sent;
};

enum timer_phase { PHASE_NONE, PHASE_REQUEST, PHASE_IDLE };

struct conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  /* Slow-client watch: runs while response bytes wait in the write queue
   * (see on_write_timer). */
  uv_timer_t write_timer;
  http_parser parser;
  struct httpd_server *srv;
  struct conn *prev, *next;
  struct httpd_req *parsing;
  struct httpd_req *queue_head, *queue_tail;
  struct httpd_req *inflight;
  size_t queued;
  size_t header_bytes;  /* names, values, target: an early bound inside one read */
  size_t head_bytes;    /* every byte of the head so far (see parse_read) */
  size_t trailer_bytes; /* chunked-body trailer lines (not stored) */
  bool in_head;         /* the parser is before the end of a request head */
  bool head_completed, message_completed; /* set by callbacks that pause the parser */
  bool header_value_last;
  /* Response bytes handed to uv_write in total; minus what is still queued,
   * the bytes the client took. write_full: queue at or over the limit (the
   * producer waits for on_drain; dispatch of the next request waits). */
  uint64_t write_queued_total, write_taken_seen, write_progress_ms;
  bool write_full;
  bool closing, close_after, read_stopped, paused_for_backlog, dispatching, saw_bytes;
  bool lingering; /* idle when the server stopped accepting: closed unless bytes come */
  int handles_open;
  int pending_writes;
  enum timer_phase phase;
  /* When on_timer should act (loop ms; 0 = nothing due) and when the uv
   * timer is armed for (0 = not armed). The timer is restarted only for a
   * deadline EARLIER than the armed one; firing early, it re-arms for the
   * rest. So back-to-back keep-alive requests cost no timer operation. */
  uint64_t deadline_ms, timer_armed_ms;
  char peer_ip[64];   /* the client (after a trusted PROXY header) */
  char socket_ip[64]; /* the TCP peer */
  bool via_proxy;     /* a trusted proxy's PROXY header began the connection */
  /* PROXY protocol header at the start of the connection (proxy_consume):
   * bytes held while deciding, and v2 TLV bytes still to discard. */
  struct {
    uint8_t state; /* PP_DONE (also: not enabled), PP_DETECT, PP_SKIP */
    uint16_t have;
    uint32_t skip;
    char buf[240];
  } pp;
  /* TLS layer (NULL: plaintext). tls_plain: parse_read is being fed
   * decrypted bytes; tls_raw: conn_writev is writing ciphertext. */
  struct zg_tls *tls;
  bool tls_plain, tls_raw, tls_closed;
  char peer_node[64]; /* node id of a verified client certificate, or "" */
  /* A corked response head (httpd_stream_begin; malloc'd, owned here):
   * written in front of the next write, or by flush_corked() at the end of
   * the loop iteration. On the server's cork list while set. */
  char *cork;
  size_t cork_len;
  struct conn *cork_prev, *cork_next;
};

struct httpd_server {
  uv_loop_t *loop;
  uv_tcp_t listener;
  bool listener_open;
  struct httpd_limits limits;
  httpd_handler handler;
  void (*finish_hook)(void *ctx, struct httpd_req *req);
  void *ctx;
  char response_header[160];
  zg_buf head;                    /* response head being built; reused (single-threaded loop) */
  struct httpd_req *request_pool; /* finished requests for reuse, via next */
  size_t request_pool_count;
  struct conn *conns;
  size_t n_conns;
  size_t active_requests;
  bool stopping, closing;
  int handles_open;
  void (*close_done)(void *arg);
  void *close_arg;
  http_parser_settings settings;
  /* PROXY protocol (httpd_set_proxy_protocol): detection on when set. */
  bool proxy_enabled;
  bool (*proxy_trusted)(void *ud, const char *ip);
  void *proxy_ud;
  struct zg_log_throttle proxy_log;
  SSL_CTX *tls_ctx; /* httpd_set_tls; NULL: plaintext */
  /* Connections with a corked head, and the handles that write them out
   * in the same loop iteration (started only while the list is not empty;
   * unreferenced, so they never keep the loop alive). */
  struct conn *corked;
  uv_check_t cork_check;
  uv_prepare_t cork_prepare;
  bool cork_handles;
};

static void conn_close(struct conn *c);
static void conn_dispatch(struct conn *c);
static void conn_arm_timer(struct conn *c);
static void on_timer(uv_timer_t *t);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* on_timer runs timeout_ms from now (see struct conn). */
static void conn_set_deadline(struct conn *c, unsigned timeout_ms) {
  uint64_t now = uv_now(c->srv->loop);
  c->deadline_ms = now + timeout_ms;
  if (c->timer_armed_ms && c->timer_armed_ms <= c->deadline_ms) return;
  c->timer_armed_ms = c->deadline_ms;
  uv_timer_start(&c->timer, on_timer, timeout_ms, 0);
}

/* Nothing due; an armed timer fires and finds nothing to do. */
static void conn_clear_deadline(struct conn *c) {
  c->deadline_ms = 0;
}
static void on_listener_closed(uv_handle_t *h);

/* ---- small helpers -------------------------------------------------- */

const char *httpd_status_text(int status) {
  switch (status) {
  case 100:
    return "Continue";
  case 200:
    return "OK";
  case 201:
    return "Created";
  case 202:
    return "Accepted";
  case 204:
    return "No Content";
  case 304:
    return "Not Modified";
  case 400:
    return "Bad Request";
  case 401:
    return "Unauthorized";
  case 403:
    return "Forbidden";
  case 404:
    return "Not Found";
  case 405:
    return "Method Not Allowed";
  case 408:
    return "Request Timeout";
  case 409:
    return "Conflict";
  case 412:
    return "Precondition Failed";
  case 413:
    return "Payload Too Large";
  case 415:
    return "Unsupported Media Type";
  case 422:
    return "Unprocessable Entity";
  case 429:
    return "Too Many Requests";
  case 431:
    return "Request Header Fields Too Large";
  case 500:
    return "Internal Server Error";
  case 501:
    return "Not Implemented";
  case 502:
    return "Bad Gateway";
  case 503:
    return "Service Unavailable";
  case 504:
    return "Gateway Timeout";
  default:
    return "Unknown";
  }
}

static void req_release_buffers(struct httpd_req *r) {
  zg_buf_free(&r->url);
  zg_buf_free(&r->body);
  zg_buf_free(&r->header_text);
  free(r->headers);
  r->headers = NULL;
  r->cap_headers = 0;
}

/* Puts a finished request in its server's pool, or frees it. */
static void req_free(struct httpd_req *r) {
  if (!r) return;
  struct httpd_server *srv = r->srv;
  bool small = r->url.cap <= POOLED_BUFFER_MAX && r->body.cap <= POOLED_BUFFER_MAX &&
               r->header_text.cap <= POOLED_BUFFER_MAX;
  if (srv && !srv->closing && small && srv->request_pool_count + 1 <= REQUEST_POOL_SIZE) {
    r->next = srv->request_pool;
    srv->request_pool = r;
    srv->request_pool_count++;
    return;
  }
  req_release_buffers(r);
  free(r);
}

static void free_request_pool(struct httpd_server *srv) {
  while (srv->request_pool) {
    struct httpd_req *r = srv->request_pool;
    srv->request_pool = r->next;
    req_release_buffers(r);
    free(r);
  }
  srv->request_pool_count = 0;
}

static struct httpd_req *req_new(struct conn *c) {
  struct httpd_server *srv = c->srv;
  struct httpd_req *r = srv->request_pool;
  if (r) {
    srv->request_pool = r->next;
    srv->request_pool_count--;
    zg_buf_reset(&r->url);
    zg_buf_reset(&r->body);
    zg_buf_reset(&r->header_text);
    memset(&r->conn, 0, sizeof(*r) - offsetof(struct httpd_req, conn));
  } else {
    r = calloc(1, sizeof(*r));
    if (!r) return NULL;
  }
  r->conn = c;
  r->srv = srv;
  r->keep_alive = true;
  memcpy(r->peer_ip, c->peer_ip, sizeof(r->peer_ip));
  r->via_proxy = c->via_proxy;
  memcpy(r->socket_ip, c->socket_ip, sizeof(r->socket_ip));
  memcpy(r->peer_node, c->peer_node, sizeof(r->peer_node));
  return r;
}

/* ---- writing -------------------------------------------------------- */

struct write_req {
  uv_write_t req;
  struct conn *conn;
  size_t len;
  char data[];
};

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct conn *c = req->data;
  free(req);
  conn_close(c);
}

static void conn_tls_close_notify(struct conn *c);

static void conn_maybe_finish_close(struct conn *c) {
  if (c->closing || !c->close_after || c->inflight || c->pending_writes > 0) return;
  if (c->tls && !c->tls_closed) {
    conn_tls_close_notify(c);
    if (c->closing || c->pending_writes > 0) return; /* shuts down once it is written */
  }
  uv_shutdown_t *sreq = malloc(sizeof(*sreq));
  if (!sreq || uv_shutdown(sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    free(sreq);
    conn_close(c);
    return;
  }
  sreq->data = c;
  c->pending_writes++; /* keeps close_after from shutting down twice */
}

static size_t conn_write_queue(const struct conn *c) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

/* The queue is down to half the limit after being full: the producer may
 * go on (on_drain), and the next pipelined request may be dispatched. */
static void conn_drained(struct conn *c) {
  c->write_full = false;
  struct httpd_req *r = c->inflight;
  if (r && r->on_drain && !r->finished) r->on_drain(r->drain_ud);
  if (c->closing || c->close_after) return; /* as req_finish: no further dispatch */
  conn_dispatch(c);
  conn_arm_timer(c);
}

static void on_write(uv_write_t *req, int status) {
  struct write_req *w = (struct write_req *)req;
  struct conn *c = w->conn;
  free(w);
  c->pending_writes--;
  if (status < 0 && !c->closing) {
    conn_close(c);
    return;
  }
  if (c->write_full && !c->closing &&
      conn_write_queue(c) <= c->srv->limits.max_write_queue_bytes / 2)
    conn_drained(c);
  conn_maybe_finish_close(c);
}

/* Runs every slow_client_timeout / 4 (10 ms..1 s) while bytes wait in the
 * write queue: a client that took none of them for slow_client_timeout is
 * cut (its in-flight request aborted), so it holds its queue (bounded by
 * max_write_queue_bytes plus one answer) only that long. */
static void on_write_timer(uv_timer_t *t) {
  struct conn *c = t->data;
  if (c->closing) return;
  size_t waiting = conn_write_queue(c);
  if (waiting == 0) {
    uv_timer_stop(t);
    return;
  }
  uint64_t now = uv_now(c->srv->loop);
  uint64_t taken = c->write_queued_total - waiting;
  if (taken != c->write_taken_seen) {
    c->write_taken_seen = taken;
    c->write_progress_ms = now;
    return;
  }
  if (now - c->write_progress_ms < c->srv->limits.slow_client_timeout_ms) return;
  zg_log(ZG_INFO, "slow_client_closed",
         "%s took no response byte for %u ms (%zu bytes waiting); connection closed", c->peer_ip,
         c->srv->limits.slow_client_timeout_ms, waiting);
  conn_close(c);
}

/* Called after bytes were queued with uv_write. */
static void conn_note_queued(struct conn *c, size_t len) {
  c->write_queued_total += len;
  size_t waiting = conn_write_queue(c);
  if (waiting >= c->srv->limits.max_write_queue_bytes) c->write_full = true;
  if (waiting == 0 || uv_is_active((uv_handle_t *)&c->write_timer)) return;
  c->write_taken_seen = c->write_queued_total - waiting;
  c->write_progress_ms = uv_now(c->srv->loop);
  uint64_t every = c->srv->limits.slow_client_timeout_ms / 4;
  if (every < 10) every = 10;
  if (every > 1000) every = 1000;
  uv_timer_start(&c->write_timer, on_write_timer, every, every);
}

/* Writes the pieces in order. Tries the socket at once (uv_try_write, one
 * writev): usually all of it goes, with no copy and no write request.
 * Whatever is left (or everything, when earlier writes are still queued)
 * is copied into one write request. A write error is reported
 * asynchronously by on_write, as before: an immediate error only sends the
 * bytes down the queued path. */
static int conn_tls_writev(struct conn *c, uv_buf_t *bufs, unsigned nbufs);
static int conn_write_corked(struct conn *c, uv_buf_t *bufs, unsigned nbufs);

static int conn_writev(struct conn *c, uv_buf_t *bufs, unsigned nbufs) {
  if (!c || c->closing) return -1;
  if (c->cork && !c->tls_raw) return conn_write_corked(c, bufs, nbufs);
  if (c->tls && !c->tls_raw) return conn_tls_writev(c, bufs, nbufs);
  size_t total = 0;
  for (unsigned i = 0; i < nbufs; i++) total += bufs[i].len;
  if (c->pending_writes == 0 && total > 0) {
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
    if (n > 0) {
      total = zg_bufs_consume(bufs, &nbufs, (size_t)n);
      if (total == 0) return 0;
    }
  }
  struct write_req *w = malloc(sizeof(*w) + total);
  if (!w) {
    conn_close(c);
    return -1;
  }
  w->conn = c;
  w->len = total;
  size_t at = 0;
  for (unsigned i = 0; i < nbufs; i++) {
    if (bufs[i].len) memcpy(w->data + at, bufs[i].base, bufs[i].len);
    at += bufs[i].len;
  }
  uv_buf_t buf = uv_buf_init(w->data, (unsigned)w->len);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write) != 0) {
    free(w);
    conn_close(c);
    return -1;
  }
  c->pending_writes++;
  conn_note_queued(c, total);
  return 0;
}

/* ---- corked heads --------------------------------------------------- */

static void cork_unlink(struct conn *c) {
  if (c->cork_prev)
    c->cork_prev->cork_next = c->cork_next;
  else
    c->srv->corked = c->cork_next;
  if (c->cork_next) c->cork_next->cork_prev = c->cork_prev;
  c->cork_prev = c->cork_next = NULL;
}

/* Takes the corked head off c (the caller frees it). */
static char *cork_take(struct conn *c, size_t *len) {
  char *held = c->cork;
  *len = c->cork_len;
  c->cork = NULL;
  c->cork_len = 0;
  cork_unlink(c);
  return held;
}

/* The corked head, then bufs, in one writev (conn_writev). httpd writes
 * at most three pieces at a time; more would go in a second writev. */
#define MAX_CORKED_BUFS 4
static int conn_write_corked(struct conn *c, uv_buf_t *bufs, unsigned nbufs) {
  uv_buf_t all[MAX_CORKED_BUFS + 1];
  size_t len;
  char *held = cork_take(c, &len);
  all[0] = uv_buf_init(held, (unsigned)len);
  int rc;
  if (nbufs <= MAX_CORKED_BUFS) {
    for (unsigned i = 0; i < nbufs; i++) all[i + 1] = bufs[i];
    rc = conn_writev(c, all, nbufs + 1);
  } else {
    rc = conn_writev(c, all, 1);
    if (rc == 0) rc = conn_writev(c, bufs, nbufs);
  }
  free(held); /* conn_writev copied whatever it could not write at once */
  return rc;
}

/* Writes c's corked head now, if it has one (a closing connection's is
 * dropped). Always takes c off the cork list. */
static void conn_uncork(struct conn *c) {
  if (!c || !c->cork) return;
  if (c->closing) {
    size_t len;
    free(cork_take(c, &len));
    return;
  }
  conn_writev(c, NULL, 0);
}

/* Writes every corked head still waiting (check: after the poll phase;
 * prepare: before the next poll, for one corked outside the poll phase). */
static void flush_corked(struct httpd_server *srv) {
  while (srv->corked) conn_uncork(srv->corked);
  uv_check_stop(&srv->cork_check);
  uv_prepare_stop(&srv->cork_prepare);
}

static void on_cork_check(uv_check_t *h) {
  flush_corked(h->data);
}

static void on_cork_prepare(uv_prepare_t *h) {
  flush_corked(h->data);
}

/* Keeps head[0..len) on c until its next write or the end of this loop
 * iteration. Returns 0, or -1 when it cannot (no memory, no handles): then
 * the caller writes the head itself. */
static int conn_cork(struct conn *c, const char *head, size_t len) {
  struct httpd_server *srv = c->srv;
  if (!srv->cork_handles || c->cork || c->closing || len == 0) return -1;
  char *copy = malloc(len);
  if (!copy) return -1;
  memcpy(copy, head, len);
  c->cork = copy;
  c->cork_len = len;
  if (!srv->corked) {
    uv_check_start(&srv->cork_check, on_cork_check);
    uv_prepare_start(&srv->cork_prepare, on_cork_prepare);
  }
  c->cork_next = srv->corked;
  if (srv->corked) srv->corked->cork_prev = c;
  srv->corked = c;
  return 0;
}

/* ---- TLS layer ------------------------------------------------------ */

/* Writes the ciphertext the session has produced down the plain path. */
static int conn_tls_flush(struct conn *c) {
  size_t n = zg_tls_pending(c->tls);
  if (n == 0) return 0;
  char stack[16384];
  char *buf = n <= sizeof(stack) ? stack : malloc(n);
  if (!buf) {
    conn_close(c);
    return -1;
  }
  size_t got = zg_tls_take(c->tls, buf, n);
  uv_buf_t b = uv_buf_init(buf, (unsigned)got);
  c->tls_raw = true;
  int rc = conn_writev(c, &b, 1);
  c->tls_raw = false;
  if (buf != stack) free(buf);
  return rc;
}

static int conn_tls_writev(struct conn *c, uv_buf_t *bufs, unsigned nbufs) {
  for (unsigned i = 0; i < nbufs; i++)
    if (bufs[i].len && zg_tls_write(c->tls, bufs[i].base, bufs[i].len) != 0) {
      conn_close(c);
      return -1;
    }
  return conn_tls_flush(c);
}

static void conn_tls_close_notify(struct conn *c) {
  c->tls_closed = true;
  if (!zg_tls_established(c->tls)) return;
  zg_tls_shutdown(c->tls);
  conn_tls_flush(c);
}

#define TLS_LOG_INTERVAL_MS 10000
static void log_tls_failure(struct conn *c, const char *why) {
  static struct zg_log_throttle throttle = {.interval_ms = TLS_LOG_INTERVAL_MS};
  unsigned suppressed = 0;
  if (!zg_log_throttle(&throttle, c->peer_ip, &suppressed)) return;
  zg_log(ZG_WARN, "tls_handshake_failed",
         "TLS connection from %s refused: %s (suppressed_since_last=%u)", c->peer_ip, why,
         suppressed);
}

static int parse_read(struct conn *c, const char *data, size_t len);

/* Ciphertext from the socket: decrypt and feed the plaintext to
 * parse_read. Returns as parse_read; a TLS failure closes the connection. */
static int conn_tls_input(struct conn *c, const char *data, size_t len) {
  static char plain[READ_BUFFER_SIZE]; /* single-threaded loop */
  if (zg_tls_feed(c->tls, data, len) != 0) {
    conn_close(c);
    return -1;
  }
  bool was_established = zg_tls_established(c->tls);
  int rc = 0;
  for (;;) {
    int n = zg_tls_read(c->tls, plain, sizeof(plain));
    if (!was_established && zg_tls_established(c->tls)) {
      was_established = true;
      if (zg_tls_peer_node_id(zg_tls_ssl(c->tls), c->peer_node, sizeof(c->peer_node)) != 0)
        c->peer_node[0] = '\0';
    }
    if (n > 0) {
      c->tls_plain = true;
      rc = parse_read(c, plain, (size_t)n);
      c->tls_plain = false;
      if (rc != 0 || c->closing) break;
      continue;
    }
    if (n == ZG_TLS_WANT) break;
    if (n == ZG_TLS_ERROR) {
      if (!zg_tls_established(c->tls)) log_tls_failure(c, zg_tls_error(c->tls));
      conn_tls_flush(c); /* the alert, best effort */
      conn_close(c);
      return -1;
    }
    /* close_notify: the client is done sending; answer what was asked. */
    break;
  }
  if (!c->closing && conn_tls_flush(c) != 0) return -1;
  return rc;
}

static int conn_write(struct conn *c, const char *a, size_t alen, const char *b, size_t blen) {
  uv_buf_t bufs[2] = {uv_buf_init((char *)a, (unsigned)alen),
                      uv_buf_init((char *)b, (unsigned)blen)};
  return conn_writev(c, bufs, 2);
}

static void req_finish(struct httpd_req *r) {
  r->finished = true;
  struct conn *c = r->conn;
  if (r->dispatched) {
    r->srv->active_requests--;
    if (r->srv->finish_hook) r->srv->finish_hook(r->srv->ctx, r);
  }
  if (!c) {
    req_free(r);
    return;
  }
  if (c->inflight == r) c->inflight = NULL;
  if (!r->keep_alive || r->srv->stopping) c->close_after = true;
  req_free(r);
  if (c->close_after) {
    conn_maybe_finish_close(c);
    return;
  }
  if (c->paused_for_backlog && c->queued < MAX_QUEUED_REQUESTS / 2) {
    c->paused_for_backlog = false;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  }
  conn_dispatch(c);
  conn_arm_timer(c);
}

static void head_line(zg_buf *head, const char *a, const char *b) {
  zg_buf_append(head, a, strlen(a));
  if (b) zg_buf_append(head, b, strlen(b));
  zg_buf_append(head, "\r\n", 2);
}

/* Appends n in decimal (hand-written: runs for every response). */
static void append_decimal(zg_buf *head, uint64_t n) {
  char digits[24];
  size_t at = sizeof(digits);
  do {
    digits[--at] = (char)('0' + n % 10);
    n /= 10;
  } while (n);
  zg_buf_append(head, digits + at, sizeof(digits) - at);
}

/* Builds the response head into srv->head (reset first); valid until the
 * next call. length_or_chunked is a whole header line, or NULL for
 * "Content-Length: <content_length>". */
static zg_buf *build_head(struct httpd_req *r, int status, const char *content_type,
                          const char *const *extra, const char *length_or_chunked,
                          size_t content_length) {
  zg_buf *head = &r->srv->head;
  zg_buf_reset(head);
  bool closing = !r->keep_alive || r->srv->stopping || (r->conn && r->conn->close_after);
  zg_buf_append(head, "HTTP/1.1 ", 9);
  append_decimal(head, status >= 0 ? (uint64_t)status : 0);
  head_line(head, " ", httpd_status_text(status));
  if (content_type) head_line(head, "Content-Type: ", content_type);
  if (length_or_chunked) {
    head_line(head, length_or_chunked, NULL);
  } else {
    zg_buf_append(head, "Content-Length: ", 16);
    append_decimal(head, content_length);
    zg_buf_append(head, "\r\n", 2);
  }
  for (size_t i = 0; extra && extra[i]; i++) head_line(head, extra[i], NULL);
  if (r->srv->response_header[0]) head_line(head, r->srv->response_header, NULL);
  head_line(head, closing ? "Connection: close\r\n" : "Connection: keep-alive\r\n", NULL);
  if (closing) r->keep_alive = false;
  return head;
}

void httpd_respond(struct httpd_req *r, int status, const char *content_type,
                   const char *const *extra_headers, const char *body, size_t len) {
  if (r->started) return;
  r->started = true;
  r->status = status;
  if (r->conn) {
    zg_buf *head = build_head(r, status, content_type, extra_headers, NULL, len);
    conn_write(r->conn, head->data, head->len, body, r->is_head ? 0 : len);
    r->bytes_sent = r->is_head ? 0 : len;
  }
  req_finish(r);
}

static void json_escape_into(zg_buf *out, const char *s) {
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\')
      zg_buf_appendf(out, "\\%c", ch);
    else if (ch < 0x20)
      zg_buf_appendf(out, "\\u%04x", ch);
    else
      zg_buf_append(out, s, 1);
  }
}

void httpd_respond_error(struct httpd_req *r, int status, const char *type, const char *code,
                         const char *const *extra_headers, const char *fmt, ...) {
  char message[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof(message), fmt, ap);
  va_end(ap);
  zg_buf body;
  zg_buf_init(&body);
  zg_buf_append(&body, "{\"error\":{\"message\":\"", 21);
  json_escape_into(&body, message);
  zg_buf_append(&body, "\",\"type\":\"", 10);
  json_escape_into(&body, type);
  zg_buf_append(&body, "\",\"code\":", 9);
  if (code) {
    zg_buf_append(&body, "\"", 1);
    json_escape_into(&body, code);
    zg_buf_append(&body, "\"", 1);
  } else {
    zg_buf_append(&body, "null", 4);
  }
  zg_buf_append(&body, "}}", 2);
  httpd_respond(r, status, "application/json", extra_headers, body.data, body.len);
  zg_buf_free(&body);
}

void httpd_stream_begin(struct httpd_req *r, int status, const char *content_type,
                        const char *const *extra_headers) {
  if (r->started) return;
  r->started = true;
  r->streaming = true;
  r->status = status;
  if (!r->conn) return;
  zg_buf *head =
      build_head(r, status, content_type, extra_headers, "Transfer-Encoding: chunked", 0);
  /* corked: it goes with the first chunk when that is ready in this loop
   * iteration, else at the iteration's end (flush_corked) */
  if (conn_cork(r->conn, head->data, head->len) != 0)
    conn_write(r->conn, head->data, head->len, NULL, 0);
}

int httpd_stream_write(struct httpd_req *r, const char *data, size_t len) {
  if (!r->conn || r->conn->closing) return -1;
  if (len == 0 || r->is_head) return 0;
  /* "<len in hex>\r\n" (RFC 9112 §7.1), hand-written: it runs per chunk */
  char size_line[24];
  size_t at = sizeof(size_line) - 2;
  size_line[at] = '\r';
  size_line[at + 1] = '\n';
  size_t v = len;
  do {
    size_line[--at] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v);
  uv_buf_t bufs[3] = {uv_buf_init(size_line + at, (unsigned)(sizeof(size_line) - at)),
                      uv_buf_init((char *)data, (unsigned)len), uv_buf_init((char *)"\r\n", 2)};
  int rc = conn_writev(r->conn, bufs, 3);
  r->bytes_sent += len;
  return rc;
}

void httpd_stream_end(struct httpd_req *r) {
  if (r->finished) return;
  if (r->conn && !r->is_head) conn_write(r->conn, "0\r\n\r\n", 5, NULL, 0);
  conn_uncork(r->conn); /* a HEAD request's head */
  req_finish(r);
}

void httpd_stream_abort(struct httpd_req *r) {
  httpd_req_close_unanswered(r);
}

void httpd_req_close_unanswered(struct httpd_req *r) {
  if (r->finished) return;
  conn_uncork(r->conn);             /* a stream's head goes before the close */
  if (!r->started) r->status = 444; /* nginx's code for "closed without a response" */
  r->keep_alive = false;
  if (r->conn) r->conn->close_after = true;
  req_finish(r);
}

/* ---- request accessors ---------------------------------------------- */

const char *httpd_req_method(const struct httpd_req *r) {
  return r->method;
}
const char *httpd_req_path(const struct httpd_req *r) {
  return r->path ? r->path : "/";
}
const char *httpd_req_query(const struct httpd_req *r) {
  return r->query ? r->query : "";
}
bool httpd_req_is_head(const struct httpd_req *r) {
  return r->is_head;
}

const char *httpd_req_query_param(const struct httpd_req *r, const char *name, char *buf,
                                  size_t buflen) {
  const char *q = httpd_req_query(r);
  size_t nlen = strlen(name);
  while (*q) {
    const char *end = strchr(q, '&');
    size_t plen = end ? (size_t)(end - q) : strlen(q);
    if (plen >= nlen && strncmp(q, name, nlen) == 0 && (plen == nlen || q[nlen] == '=')) {
      size_t vlen = plen > nlen ? plen - nlen - 1 : 0;
      if (vlen >= buflen) vlen = buflen - 1;
      memcpy(buf, q + nlen + (plen > nlen ? 1 : 0), vlen);
      buf[vlen] = '\0';
      return buf;
    }
    if (!end) break;
    q = end + 1;
  }
  return NULL;
}

/* True when a and b may be the same letter in another case (or the same
 * byte): the first bytes of two names, before a full case-insensitive
 * compare. Never false for names strcasecmp finds equal. */
static inline bool same_first_byte(const char *a, const char *b) {
  return ((unsigned char)a[0] | 0x20) == ((unsigned char)b[0] | 0x20);
}

const char *httpd_req_header(const struct httpd_req *r, const char *name) {
  if (!r->headers_ready) return NULL;
  for (size_t i = 0; i < r->n_headers; i++)
    if (same_first_byte(r->headers[i].name, name) && strcasecmp(r->headers[i].name, name) == 0)
      return r->headers[i].value;
  return NULL;
}

size_t httpd_req_header_count(const struct httpd_req *r) {
  return r->headers_ready ? r->n_headers : 0;
}

void httpd_req_header_at(const struct httpd_req *r, size_t i, const char **name,
                         const char **value) {
  *name = r->headers[i].name;
  *value = r->headers[i].value;
}

const char *httpd_req_body(const struct httpd_req *r, size_t *len) {
  if (len) *len = r->body.len;
  return r->body.data ? r->body.data : "";
}
void httpd_req_release_body(struct httpd_req *r) {
  zg_buf_free(&r->body);
}

bool httpd_req_via_proxy(const struct httpd_req *r) {
  return r->via_proxy;
}
const char *httpd_req_peer_ip(const struct httpd_req *r) {
  return r->peer_ip;
}
const char *httpd_req_socket_ip(const struct httpd_req *r) {
  return r->socket_ip;
}
void httpd_req_drop_headers(struct httpd_req *r, const char *prefix) {
  if (!r->headers_ready) return;
  size_t plen = strlen(prefix), kept = 0;
  for (size_t i = 0; i < r->n_headers; i++)
    if (plen && (!same_first_byte(r->headers[i].name, prefix) ||
                 strncasecmp(r->headers[i].name, prefix, plen) != 0))
      r->headers[kept++] = r->headers[i];
  r->n_headers = kept;
}
uint64_t httpd_req_received_us(const struct httpd_req *r) {
  return r->received_us;
}
void httpd_req_set_abort(struct httpd_req *r, void (*on_abort)(void *ud), void *ud) {
  r->on_abort = on_abort;
  r->abort_ud = ud;
}
bool httpd_req_write_full(const struct httpd_req *r) {
  return r->conn && !r->conn->closing && r->conn->write_full;
}
void httpd_req_set_drain(struct httpd_req *r, void (*on_drain)(void *ud), void *ud) {
  r->on_drain = on_drain;
  r->drain_ud = ud;
}
uint64_t httpd_req_bytes_sent(const struct httpd_req *r) {
  return r->bytes_sent;
}
void httpd_req_set_user(struct httpd_req *r, void *user) {
  r->user = user;
}
void *httpd_req_user(const struct httpd_req *r) {
  return r->user;
}
void httpd_set_finish_hook(struct httpd_server *srv,
                           void (*hook)(void *ctx, struct httpd_req *req)) {
  srv->finish_hook = hook;
}
int httpd_req_status(const struct httpd_req *r) {
  return r->status;
}

/* ---- parsing -------------------------------------------------------- */

static int fail_parse(struct conn *c, int status, const char *message) {
  if (!c->parsing) c->parsing = req_new(c);
  if (c->parsing) {
    c->parsing->error_status = status;
    c->parsing->error_message = message;
  }
  return -1;
}

static int count_header_bytes(struct conn *c, size_t len) {
  c->header_bytes += len;
  if (c->header_bytes > c->srv->limits.max_header_bytes)
    return fail_parse(c, 431, "request headers are larger than the server accepts");
  return 0;
}

static int on_message_begin(http_parser *p) {
  struct conn *c = p->data;
  c->parsing = req_new(c);
  c->header_bytes = 0;
  c->trailer_bytes = 0;
  c->header_value_last = false;
  if (!c->parsing) return -1;
  c->phase = PHASE_REQUEST;
  /* client_timeout runs from the request's first byte; later reads do not
   * extend it (conn_arm_timer leaves a request deadline alone). */
  conn_set_deadline(c, c->srv->limits.client_timeout_ms);
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t len) {
  struct conn *c = p->data;
  if (count_header_bytes(c, len)) return -1;
  return zg_buf_append(&c->parsing->url, at, len);
}

/* Appends the terminating NUL of the name or value being parsed. */
static int header_text_end_piece(struct httpd_req *r) {
  return zg_buf_append(&r->header_text, "", 1);
}

/* A trailer line of a chunked body: counted against max_header_bytes (each
 * line at least ":" and CRLF more than its name and value), never stored:
 * the head's header pointers are final by now. */
static int count_trailer(struct conn *c, size_t len, bool new_line) {
  c->trailer_bytes += len + (new_line ? 3 : 0);
  if (c->trailer_bytes > c->srv->limits.max_header_bytes)
    return fail_parse(c, 431, "request trailers are larger than the server accepts");
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  struct conn *c = p->data;
  struct httpd_req *r = c->parsing;
  /* The request line is complete: a HEAD request whose headers are then
   * refused still gets an answer without a body (RFC 9110 §9.3.2). A
   * request line that does not parse is no HEAD request yet. */
  r->is_head = p->method == HTTP_HEAD;
  /* RFC 9112 §5.1: no whitespace between a field name and its colon (or
   * inside the name); a server must refuse it with 400, or a proxy's
   * header filters would see another name than the next hop. */
  if (memchr(at, ' ', len) || memchr(at, '\t', len))
    return fail_parse(c, 400, "whitespace in a header field name (RFC 9112 section 5.1)");
  if (r->headers_ready) {
    int rc = count_trailer(c, len, c->header_value_last || c->trailer_bytes == 0);
    c->header_value_last = false;
    return rc;
  }
  if (count_header_bytes(c, len)) return -1;
  if (r->n_headers == 0 || c->header_value_last) {
    if (r->n_headers >= MAX_HEADER_LINES)
      return fail_parse(c, 431, "request has more header lines than the server accepts");
    if (r->n_headers > 0 && header_text_end_piece(r) != 0) return -1; /* previous value */
    if (r->n_headers == r->cap_headers) {
      size_t cap = r->cap_headers ? r->cap_headers * 2 : 16;
      struct header *h = realloc(r->headers, cap * sizeof(*h));
      if (!h) return -1;
      r->headers = h;
      r->cap_headers = cap;
    }
    struct header *h = &r->headers[r->n_headers++];
    h->name_off = r->header_text.len;
    h->value_off = HEADER_NOT_STARTED;
  }
  c->header_value_last = false;
  return zg_buf_append(&r->header_text, at, len); /* the name, or more of it */
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  struct conn *c = p->data;
  struct httpd_req *r = c->parsing;
  if (r->headers_ready) {
    c->header_value_last = true;
    return count_trailer(c, len, false);
  }
  if (count_header_bytes(c, len)) return -1;
  if (r->n_headers == 0) return -1;
  struct header *h = &r->headers[r->n_headers - 1];
  if (h->value_off == HEADER_NOT_STARTED) {
    if (header_text_end_piece(r) != 0) return -1; /* the name */
    h->value_off = r->header_text.len;
  }
  c->header_value_last = true;
  return zg_buf_append(&r->header_text, at, len);
}

/* Ends the last header and points every header into header_text. */
static int finish_headers(struct httpd_req *r) {
  if (r->n_headers > 0) {
    struct header *last = &r->headers[r->n_headers - 1];
    if (last->value_off == HEADER_NOT_STARTED) { /* a name without a value: "" */
      if (header_text_end_piece(r) != 0) return -1;
      last->value_off = r->header_text.len;
    }
    if (header_text_end_piece(r) != 0) return -1;
  }
  for (size_t i = 0; i < r->n_headers; i++) {
    r->headers[i].name = r->header_text.data + r->headers[i].name_off;
    r->headers[i].value = r->header_text.data + r->headers[i].value_off;
  }
  r->headers_ready = true;
  return 0;
}

static int on_headers_complete(http_parser *p) {
  struct conn *c = p->data;
  struct httpd_req *r = c->parsing;
  if (finish_headers(r) != 0) return -1;
  const char *method = http_method_str((enum http_method)p->method);
  size_t method_len = strnlen(method, sizeof(r->method) - 1);
  memcpy(r->method, method, method_len);
  r->method[method_len] = '\0';
  r->is_head = p->method == HTTP_HEAD;
  r->keep_alive = http_should_keep_alive(p) != 0;
  if (p->content_length != ULLONG_MAX && p->content_length > c->srv->limits.max_body_bytes)
    return fail_parse(c, 413, "request body is larger than the server accepts");
  /* curl sends "Expect: 100-continue" with large bodies and waits a second
   * for this interim answer. Sent only when no earlier answer is pending on
   * the connection, so pipelined answers keep their order. */
  const char *expect = httpd_req_header(r, "Expect");
  if (expect && strcasecmp(expect, "100-continue") == 0 && p->http_major == 1 &&
      p->http_minor >= 1 && !c->inflight && !c->queue_head) {
    static const char interim[] = "HTTP/1.1 100 Continue\r\n\r\n";
    conn_write(c, interim, sizeof(interim) - 1, NULL, 0);
  }
  /* Split the target in place: the path ends where the query begins. */
  char *url = r->url.len ? r->url.data : NULL;
  /* A fragment is the client's own (RFC 3986 §3.5): a request line never
   * carries one (RFC 9112 §3.2). Refused, so that no layer reads the path
   * with "#..." on it while another (an upstream client) cuts it off. */
  if (url && strchr(url, '#'))
    return fail_parse(c, 400,
                      "the request target has a fragment ('#'), which a request line "
                      "may not carry (RFC 9112 section 3.2)");
  char *q = url ? strchr(url, '?') : NULL;
  if (q) *q = '\0';
  r->path = url ? url : "/";
  r->query = q ? q + 1 : "";
  c->head_completed = true;
  c->header_value_last = false;
  http_parser_pause(p, 1); /* parse_read counts the head's bytes exactly */
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  struct conn *c = p->data;
  struct httpd_req *r = c->parsing;
  if (r->body.len + len > c->srv->limits.max_body_bytes)
    return fail_parse(c, 413, "request body is larger than the server accepts");
  return zg_buf_append(&r->body, at, len);
}

static void conn_enqueue(struct conn *c, struct httpd_req *r) {
  r->next = NULL;
  if (c->queue_tail)
    c->queue_tail->next = r;
  else
    c->queue_head = r;
  c->queue_tail = r;
  c->queued++;
}

static int on_message_complete(http_parser *p) {
  struct conn *c = p->data;
  struct httpd_req *r = c->parsing;
  c->parsing = NULL;
  r->received_us = zg_mono_us();
  conn_enqueue(c, r);
  c->phase = PHASE_NONE;
  c->message_completed = true;
  http_parser_pause(p, 1); /* the next head starts here (parse_read) */
  return 0;
}

/* ---- connection lifecycle ------------------------------------------- */

static void server_maybe_closed(struct httpd_server *srv) {
  if (srv->closing && srv->handles_open == 0 && srv->n_conns == 0) {
    void (*done)(void *) = srv->close_done;
    void *arg = srv->close_arg;
    zg_buf_free(&srv->head);
    free_request_pool(srv);
    if (srv->tls_ctx) SSL_CTX_free(srv->tls_ctx);
    free(srv);
    if (done) done(arg);
  }
}

static void on_conn_handle_closed(uv_handle_t *h) {
  struct conn *c = h->data;
  if (--c->handles_open > 0) return;
  struct httpd_server *srv = c->srv;
  if (c->prev)
    c->prev->next = c->next;
  else
    srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->n_conns--;
  zg_tls_free(c->tls);
  free(c);
  server_maybe_closed(srv);
}

static void conn_close(struct conn *c) {
  if (c->closing) return;
  c->closing = true;
  conn_uncork(c); /* dropped: nothing more is written */
  uv_read_stop((uv_stream_t *)&c->tcp);
  struct httpd_req *inflight = c->inflight;
  c->inflight = NULL;
  if (inflight) {
    inflight->conn = NULL;
    if (inflight->on_abort) {
      c->srv->active_requests--;
      inflight->dispatched = false;
      inflight->on_abort(inflight->abort_ud);
      if (c->srv->finish_hook) {
        inflight->status = 0;
        c->srv->finish_hook(c->srv->ctx, inflight);
      }
      req_free(inflight);
    }
    /* else: orphaned; freed when the handler answers. */
  }
  for (struct httpd_req *r = c->queue_head; r;) {
    struct httpd_req *next = r->next;
    req_free(r);
    r = next;
  }
  c->queue_head = c->queue_tail = NULL;
  req_free(c->parsing);
  c->parsing = NULL;
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->write_timer, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
}

static void on_timer(uv_timer_t *t) {
  struct conn *c = t->data;
  c->timer_armed_ms = 0;
  if (c->closing || !c->deadline_ms) return;
  uint64_t now = uv_now(c->srv->loop);
  if (now < c->deadline_ms) { /* the deadline moved later since arming */
    c->timer_armed_ms = c->deadline_ms;
    uv_timer_start(&c->timer, on_timer, c->deadline_ms - now, 0);
    return;
  }
  c->deadline_ms = 0;
  if (c->phase == PHASE_REQUEST && c->saw_bytes) {
    /* Slow or stalled client: answer 408 after earlier answers, then close. */
    if (c->parsing) {
      c->parsing->error_status = 408;
      c->parsing->error_message = "request was not received completely within client_timeout";
      struct httpd_req *r = c->parsing;
      c->parsing = NULL;
      conn_enqueue(c, r);
    }
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->read_stopped = true;
    conn_dispatch(c);
    return;
  }
  conn_close(c);
}

static void conn_arm_timer(struct conn *c) {
  if (c->closing) return;
  if (c->phase == PHASE_REQUEST) {
    /* A trickling client must not push its own deadline back. */
    if (!c->deadline_ms) conn_set_deadline(c, c->srv->limits.client_timeout_ms);
  } else if (!c->saw_bytes && !c->inflight && !c->queue_head) {
    conn_set_deadline(c, c->srv->limits.client_timeout_ms);
  } else if (!c->inflight && !c->queue_head && !c->parsing) {
    c->phase = PHASE_IDLE;
    conn_set_deadline(c, c->srv->limits.keepalive_timeout_ms);
  } else {
    conn_clear_deadline(c);
  }
}

static void conn_dispatch(struct conn *c) {
  if (c->dispatching) return;
  c->dispatching = true;
  /* A client that does not take its answers gets no further ones: the
   * next pipelined request waits until the write queue drains. */
  while (!c->closing && !c->inflight && c->queue_head && !c->write_full) {
    struct httpd_req *r = c->queue_head;
    c->queue_head = r->next;
    if (!c->queue_head) c->queue_tail = NULL;
    c->queued--;
    c->inflight = r;
    r->dispatched = true;
    c->srv->active_requests++;
    if (r->error_status) {
      r->keep_alive = false;
      c->close_after = true;
      int status = r->error_status;
      httpd_respond_error(r, status, "invalid_request_error", NULL, NULL, "%s",
                          r->error_message ? r->error_message : "malformed HTTP request");
      break;
    }
    c->srv->handler(c->srv->ctx, r);
  }
  c->dispatching = false;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char slab[READ_BUFFER_SIZE]; /* single-threaded loop: one read at a time */
  buf->base = slab;
  buf->len = sizeof(slab);
}

/* Feeds one read to the parser. The callbacks that end a head or a
 * message pause the parser, so each execute call covers either head bytes
 * or body bytes, never both: every byte of a head (request line, header
 * lines, separators, CRLFs, empty lines before it) is counted in
 * head_bytes, across reads. Returns 0, or -1 on a parse error or an
 * oversized head (c->parsing then carries the status when it is not 400). */
static int parse_read(struct conn *c, const char *data, size_t len) {
  if (c->tls && !c->tls_plain) return conn_tls_input(c, data, len);
  size_t limit = c->srv->limits.max_header_bytes;
  while (len > 0) {
    c->head_completed = c->message_completed = false;
    size_t parsed = http_parser_execute(&c->parser, &c->srv->settings, data, len);
    if (c->closing) return -1;
    enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
    if (c->in_head) {
      /* Paused at the end of a head, the parser has not consumed the final
       * LF yet: it belongs to the head. */
      c->head_bytes += parsed + (c->head_completed ? 1 : 0);
      if (c->head_bytes > limit) {
        fail_parse(c, 431, "request headers are larger than the server accepts");
        return -1;
      }
      if (c->head_completed) c->in_head = false;
    }
    if (c->message_completed) {
      c->in_head = true;
      c->head_bytes = 0;
    }
    if (err == HPE_PAUSED) {
      http_parser_pause(&c->parser, 0);
      data += parsed;
      len -= parsed;
      continue;
    }
    if (err != HPE_OK || parsed != len) return -1;
    break;
  }
  return 0;
}

/* ---- PROXY protocol header ------------------------------------------
 *
 * haproxy's doc/proxy-protocol.txt: a load balancer may start a
 * connection with one header naming the client, v1 (text: "PROXY TCP4
 * <src> <dst> <sport> <dport>\r\n", at most 107 bytes) or v2 (binary: a
 * 12-byte signature, version/command, family/transport, length, then the
 * addresses and optional TLVs, which are skipped). It is looked for only
 * on a server with httpd_set_proxy_protocol(), only at the start of a
 * connection, and parsed strictly: anything malformed closes the
 * connection. A header from a peer that is not trusted closes it too
 * (logged with the address, at most once per address every 10 s). Bytes
 * that turn out not to be a header are given to http_parser unchanged.
 * LOCAL (v2), UNKNOWN (v1) and families other than TCP over IPv4/IPv6
 * keep the socket's own address, as the spec asks. */
enum { PP_DONE = 0, PP_DETECT, PP_SKIP };
#define PP_V1_MAX 107
#define PP_TIMEOUT_MS 3000u
static const char pp_v2_sig[12] = {'\r', '\n', '\r', '\n', '\0', '\r',
                                   '\n', 'Q',  'U',  'I',  'T',  '\n'};

static void pp_log(struct conn *c, const char *event, const char *what) {
  unsigned suppressed = 0;
  if (!zg_log_throttle(&c->srv->proxy_log, c->socket_ip, &suppressed)) return;
  zg_log(ZG_WARN, event, "%s: %s; connection closed (suppressed_since_last=%u)", c->socket_ip, what,
         suppressed);
}

static bool pp_trusted(struct conn *c) {
  if (c->srv->proxy_trusted && c->srv->proxy_trusted(c->srv->proxy_ud, c->socket_ip)) return true;
  pp_log(c, "proxy_header_refused",
         "sent a PROXY protocol header but is not in listen.trusted_proxies");
  return false;
}

/* The client address the header names becomes the connection's peer. */
static void pp_set_peer(struct conn *c, int family, const void *addr) {
  char ip[INET6_ADDRSTRLEN];
  if (!inet_ntop(family, addr, ip, sizeof(ip))) return;
  const char *shown = ip;
  if (family == AF_INET6 && strncmp(ip, "::ffff:", 7) == 0 && strchr(ip + 7, '.')) shown = ip + 7;
  snprintf(c->peer_ip, sizeof(c->peer_ip), "%s", shown);
}

/* A decimal port: 0..65535, no sign, no leading zero. */
static bool pp_port(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 5 || (n > 1 && s[0] == '0')) return false;
  for (size_t i = 0; i < n; i++)
    if (s[i] < '0' || s[i] > '9') return false;
  return atol(s) <= 65535;
}

/* The v1 line without its CRLF (NUL-terminated in place). 0 ok, -1 bad. */
static int pp_parse_v1(struct conn *c, char *line) {
  char *f[7] = {0}; /* gcc -O3 -Wmaybe-uninitialized false positive otherwise */
  size_t n = 0;
  for (char *p = line; n < 7;) {
    f[n++] = p;
    char *sp = strchr(p, ' ');
    if (!sp) break;
    *sp = '\0';
    p = sp + 1;
  }
  if (n >= 2 && strcmp(f[0], "PROXY") == 0 && strcmp(f[1], "UNKNOWN") == 0) return 0;
  if (n != 6 || strcmp(f[0], "PROXY") != 0) return -1;
  int family = strcmp(f[1], "TCP4") == 0 ? AF_INET : strcmp(f[1], "TCP6") == 0 ? AF_INET6 : 0;
  unsigned char src[16], dst[16];
  if (!family || inet_pton(family, f[2], src) != 1 || inet_pton(family, f[3], dst) != 1 ||
      !pp_port(f[4]) || !pp_port(f[5]))
    return -1;
  pp_set_peer(c, family, src);
  return 0;
}

/* v2 fixed part and address block in pp.buf (need bytes). 0 ok, -1 bad. */
static int pp_parse_v2(struct conn *c) {
  const unsigned char *h = (const unsigned char *)c->pp.buf;
  unsigned version = h[12] >> 4, command = h[12] & 0x0f;
  if (version != 2 || command > 1) return -1;
  if (command == 0) return 0; /* LOCAL: the proxy's own connection (health checks) */
  switch (h[13]) {
  case 0x00: /* UNSPEC */
  case 0x31: /* UNIX stream, dgram */
  case 0x32:
    return 0;
  case 0x11: /* TCP over IPv4 */
    pp_set_peer(c, AF_INET, h + 16);
    return 0;
  case 0x21: /* TCP over IPv6 */
    pp_set_peer(c, AF_INET6, h + 16);
    return 0;
  default:
    return -1;
  }
}

/* Bytes of the v2 address block the family needs; -1 for an unknown one. */
static long pp_v2_addr_len(unsigned char fam) {
  switch (fam >> 4) {
  case 0:
    return 0;
  case 1:
    return 12;
  case 2:
    return 36;
  case 3:
    return 216;
  default:
    return -1;
  }
}

/* More header bytes are needed: they must come soon. */
static int pp_wait(struct conn *c) {
  unsigned t = c->srv->limits.client_timeout_ms;
  conn_set_deadline(c, t < PP_TIMEOUT_MS ? t : PP_TIMEOUT_MS);
  return 0;
}

/* Looks for a PROXY header at the start of a connection. Consumes header
 * bytes from *data and *len. Returns 1 when the header is done (or absent:
 * then *replay bytes held in pp.buf go to the parser before *data), 0
 * when more bytes are needed (a short deadline is set), -1 to close. */
static int proxy_consume(struct conn *c, const char **data, size_t *len, size_t *replay) {
  *replay = 0;
  if (c->pp.state == PP_SKIP) {
    size_t n = *len < c->pp.skip ? *len : c->pp.skip;
    *data += n;
    *len -= n;
    c->pp.skip -= (uint32_t)n;
    if (c->pp.skip) return pp_wait(c);
    c->pp.state = PP_DONE;
    return 1;
  }
  size_t before = c->pp.have;
  size_t take = sizeof(c->pp.buf) - before;
  if (take > *len) take = *len;
  memcpy(c->pp.buf + before, *data, take);
  size_t have = before + take;
  size_t cmp = have < sizeof(pp_v2_sig) ? have : sizeof(pp_v2_sig);
  size_t cmp1 = have < 6 ? have : 6;
  size_t header = 0; /* bytes of pp.buf that are header, once known */
  if (memcmp(c->pp.buf, pp_v2_sig, cmp) == 0) {
    if (have < 16) goto more;
    if (!pp_trusted(c)) return -1;
    const unsigned char *h = (const unsigned char *)c->pp.buf;
    size_t total = 16 + ((size_t)h[14] << 8 | h[15]);
    long addr = pp_v2_addr_len(h[13]);
    if (addr < 0 || 16 + (size_t)addr > total) {
      pp_log(c, "proxy_header_invalid", "sent a malformed PROXY v2 header");
      return -1;
    }
    size_t need = 16 + (size_t)addr;
    if (have < need) goto more;
    if (pp_parse_v2(c) != 0) {
      pp_log(c, "proxy_header_invalid", "sent an unsupported PROXY v2 header");
      return -1;
    }
    header = total < have ? total : have;
    c->pp.skip = (uint32_t)(total - header);
  } else if (memcmp(c->pp.buf, "PROXY ", cmp1) == 0) {
    if (have < 6) goto more;
    if (!pp_trusted(c)) return -1;
    char *end = memchr(c->pp.buf, '\n', have < PP_V1_MAX ? have : PP_V1_MAX);
    if (!end) {
      if (have < PP_V1_MAX) goto more;
      pp_log(c, "proxy_header_invalid", "sent a PROXY v1 header longer than 107 bytes");
      return -1;
    }
    header = (size_t)(end - c->pp.buf) + 1;
    if (header < 2 || end[-1] != '\r' || memchr(c->pp.buf, '\r', header - 2) ||
        memchr(c->pp.buf, '\0', header)) {
      pp_log(c, "proxy_header_invalid", "sent a malformed PROXY v1 header");
      return -1;
    }
    end[-1] = '\0';
    if (pp_parse_v1(c, c->pp.buf) != 0) {
      pp_log(c, "proxy_header_invalid", "sent a malformed PROXY v1 header");
      return -1;
    }
  } else {
    /* Not a header: what earlier reads held goes to the parser first. */
    c->pp.state = PP_DONE;
    *replay = before;
    return 1;
  }
  c->via_proxy = true;
  /* The header ends inside this read: the rest of it is request bytes. */
  *data += header - before;
  *len -= header - before;
  c->pp.have = 0;
  if (c->pp.skip) {
    c->pp.state = PP_SKIP;
    return proxy_consume(c, data, len, replay);
  }
  c->pp.state = PP_DONE;
  return 1;
more:
  c->pp.have = (uint16_t)have;
  *data += take;
  *len -= take;
  if (*len == 0) return pp_wait(c);
  /* The buffer is full and still no decision: only v1 can get here (a
   * v2 address block always fits), and it was refused above. */
  return -1;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct conn *c = s->data;
  if (nread == 0) return;
  if (nread < 0) {
    /* EOF while an asynchronous answer is pending (it set an abort
     * callback: an upstream call, a slot wait) means the client is gone, as
     * nginx reads it: abort, so the upstream transfer or the queue slot is
     * released now rather than when the answer fails to write. Otherwise
     * treat it as a half-close: answer what was asked, then close. */
    bool pending_async = c->inflight && c->inflight->on_abort;
    if (nread == UV_EOF && !pending_async && (c->inflight || c->queue_head) && !c->parsing) {
      uv_read_stop(s);
      c->close_after = true;
      return;
    }
    conn_close(c);
    return;
  }
  const char *data = buf->base;
  size_t len = (size_t)nread, replay = 0;
  if (c->pp.state != PP_DONE) {
    int pp = proxy_consume(c, &data, &len, &replay);
    if (pp < 0) {
      conn_close(c);
      return;
    }
    if (pp == 0) return; /* more of the header to come (deadline set) */
    if (replay + len == 0) {
      conn_arm_timer(c); /* a header alone: the request is still to come */
      return;
    }
  }
  c->saw_bytes = true;
  if (c->lingering) { /* a request after all: the usual deadlines apply */
    c->lingering = false;
    conn_clear_deadline(c);
  }
  int parsed = replay ? parse_read(c, c->pp.buf, replay) : 0;
  if (parsed == 0) parsed = parse_read(c, data, len);
  if (parsed != 0) {
    if (c->closing) return;
    struct httpd_req *r = c->parsing;
    if (!r) r = req_new(c);
    c->parsing = NULL;
    if (!r) {
      conn_close(c);
      return;
    }
    if (!r->error_status && HTTP_PARSER_ERRNO(&c->parser) == HPE_HEADER_OVERFLOW) {
      r->error_status = 431;
      r->error_message = "request headers are larger than the server accepts";
    }
    if (!r->error_status) {
      r->error_status = 400;
      r->error_message = http_errno_description(HTTP_PARSER_ERRNO(&c->parser));
    }
    conn_enqueue(c, r);
    uv_read_stop(s);
    c->read_stopped = true;
  } else if (c->queued >= MAX_QUEUED_REQUESTS) {
    uv_read_stop(s);
    c->paused_for_backlog = true;
  }
  conn_dispatch(c);
  conn_arm_timer(c);
}

static struct conn *conn_new(struct httpd_server *srv) {
  struct conn *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->srv = srv;
  uv_tcp_init(srv->loop, &c->tcp);
  uv_timer_init(srv->loop, &c->timer);
  uv_timer_init(srv->loop, &c->write_timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->write_timer.data = c;
  c->handles_open = 3;
  c->in_head = true;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->n_conns++;
  return c;
}

static void conn_start(struct conn *c) {
  struct httpd_server *srv = c->srv;
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage addr;
  int alen = sizeof(addr);
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&addr, &alen) != 0) {
    /* Reset before we got to it (e.g. a load balancer's health check that
     * gave up while this node was frozen): nobody to answer, nothing to
     * log (it used to be judged as a PROXY header from "" and logged). */
    conn_close(c);
    return;
  }
  if (addr.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&addr, c->peer_ip, sizeof(c->peer_ip));
    if (strncmp(c->peer_ip, "::ffff:", 7) == 0)
      memmove(c->peer_ip, c->peer_ip + 7, strlen(c->peer_ip + 7) + 1);
  } else {
    uv_ip4_name((struct sockaddr_in *)&addr, c->peer_ip, sizeof(c->peer_ip));
  }
  memcpy(c->socket_ip, c->peer_ip, sizeof(c->socket_ip));
  c->pp.state = srv->proxy_enabled ? PP_DETECT : PP_DONE;
  if (srv->tls_ctx && !(c->tls = zg_tls_new(srv->tls_ctx, true))) {
    conn_close(c);
    return;
  }
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  conn_arm_timer(c);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_connection(uv_stream_t *listener, int status) {
  struct httpd_server *srv = listener->data;
  if (status < 0) return;
  struct conn *c = conn_new(srv);
  if (!c) return;
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0 ||
      srv->n_conns > srv->limits.max_connections || srv->stopping) {
    conn_close(c);
    return;
  }
  conn_start(c);
}

/* Takes the connections the kernel completed but the loop has not
 * accepted yet: closing the listener would reset them, and a client (the
 * load balancer) may already have sent its request on them. */
static void accept_backlog(struct httpd_server *srv) {
  uv_os_fd_t lfd;
  if (uv_fileno((uv_handle_t *)&srv->listener, &lfd) != 0) return;
  for (int i = 0; i < 1024; i++) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    struct conn *c = srv->n_conns < srv->limits.max_connections ? conn_new(srv) : NULL;
    if (!c) {
      close(fd);
      continue;
    }
    if (uv_tcp_open(&c->tcp, fd) != 0) {
      close(fd);
      conn_close(c);
      continue;
    }
    conn_start(c);
  }
}

/* ---- server --------------------------------------------------------- */

static void apply_limit_defaults(struct httpd_limits *l) {
  if (!l->max_header_bytes) l->max_header_bytes = 16 * 1024;
  if (!l->max_body_bytes) l->max_body_bytes = 4 * 1024 * 1024;
  if (!l->client_timeout_ms) l->client_timeout_ms = 10000;
  if (!l->keepalive_timeout_ms) l->keepalive_timeout_ms = 60000;
  if (!l->max_connections) l->max_connections = 10000;
  if (!l->max_write_queue_bytes) l->max_write_queue_bytes = 1024 * 1024;
  if (!l->slow_client_timeout_ms) l->slow_client_timeout_ms = 30000;
}

void httpd_set_proxy_protocol(struct httpd_server *srv, bool (*trusted)(void *ud, const char *ip),
                              void *ud) {
  srv->proxy_enabled = true;
  srv->proxy_trusted = trusted;
  srv->proxy_ud = ud;
  srv->proxy_log.interval_ms = 10000;
}

void httpd_set_tls(struct httpd_server *srv, SSL_CTX *ctx) {
  if (srv->tls_ctx) SSL_CTX_free(srv->tls_ctx);
  srv->tls_ctx = ctx;
  if (ctx) SSL_CTX_up_ref(ctx);
}

bool httpd_req_strip_path_prefix(struct httpd_req *r, const char *prefix) {
  size_t n = strlen(prefix);
  if (strncmp(r->path, prefix, n) != 0 || r->path[n] != '/') return false;
  r->path += n;
  return true;
}

const char *httpd_req_peer_node(const struct httpd_req *r) {
  return r->peer_node[0] ? r->peer_node : NULL;
}

void httpd_set_response_header(struct httpd_server *srv, const char *line) {
  snprintf(srv->response_header, sizeof(srv->response_header), "%s", line ? line : "");
}

void httpd_set_limits(struct httpd_server *srv, const struct httpd_limits *limits) {
  srv->limits = *limits;
  apply_limit_defaults(&srv->limits);
}

int httpd_listen(uv_loop_t *loop, const char *address, const struct httpd_limits *limits,
                 httpd_handler handler, void *ctx, struct httpd_server **out, char *errmsg,
                 size_t errlen) {
  char host[128];
  int port;
  struct sockaddr_storage addr;
  if (zg_split_host_port(address, host, sizeof(host), &port) != 0) {
    snprintf(errmsg, errlen, "'%s' is not host:port", address);
    return UV_EINVAL;
  }
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
    snprintf(errmsg, errlen, "'%s' is not a numeric IP address", host);
    return UV_EINVAL;
  }
  struct httpd_server *srv = calloc(1, sizeof(*srv));
  if (!srv) return UV_ENOMEM;
  srv->loop = loop;
  srv->handler = handler;
  srv->ctx = ctx;
  if (limits) srv->limits = *limits;
  apply_limit_defaults(&srv->limits);
  srv->settings.on_message_begin = on_message_begin;
  srv->settings.on_url = on_url;
  srv->settings.on_header_field = on_header_field;
  srv->settings.on_header_value = on_header_value;
  srv->settings.on_headers_complete = on_headers_complete;
  srv->settings.on_body = on_body;
  srv->settings.on_message_complete = on_message_complete;
  uv_tcp_init(loop, &srv->listener);
  srv->listener.data = srv;
  int rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&srv->listener, 1024, on_connection);
  if (rc != 0) {
    snprintf(errmsg, errlen, "cannot listen on %s: %s", address, uv_strerror(rc));
    srv->closing = true;
    srv->handles_open = 1;
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed); /* frees srv */
    return rc;
  }
  srv->listener_open = true;
  srv->handles_open = 1;
  uv_check_init(loop, &srv->cork_check); /* both cannot fail */
  uv_prepare_init(loop, &srv->cork_prepare);
  srv->cork_check.data = srv->cork_prepare.data = srv;
  uv_unref((uv_handle_t *)&srv->cork_check);
  uv_unref((uv_handle_t *)&srv->cork_prepare);
  srv->cork_handles = true;
  srv->handles_open += 2;
  *out = srv;
  return 0;
}

static void on_listener_closed(uv_handle_t *h) {
  struct httpd_server *srv = h->data;
  srv->handles_open--;
  server_maybe_closed(srv);
}

/* Every connection that sends a request gets its answer: the listen
 * backlog is accepted before the listener closes, and a connection with
 * nothing parsed yet (its request may be in flight or unread in the socket
 * buffer) is read for STOP_LINGER_MS more before it is closed. Answers go
 * out with Connection: close. */
void httpd_stop_accepting(struct httpd_server *srv) {
  if (srv->stopping) return;
  if (srv->listener_open) accept_backlog(srv);
  srv->stopping = true;
  if (srv->listener_open) {
    srv->listener_open = false;
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
  }
  for (struct conn *c = srv->conns; c;) {
    struct conn *next = c->next;
    c->close_after = true;
    if (!c->closing && !c->inflight && !c->queue_head && !c->parsing) {
      c->lingering = true;
      conn_set_deadline(c, STOP_LINGER_MS);
    }
    c = next;
  }
}

size_t httpd_active_requests(const struct httpd_server *srv) {
  return srv->active_requests;
}

size_t httpd_open_connections(const struct httpd_server *srv) {
  return srv->n_conns;
}

void httpd_close(struct httpd_server *srv, void (*done)(void *arg), void *arg) {
  srv->close_done = done;
  srv->close_arg = arg;
  httpd_stop_accepting(srv);
  srv->closing = true;
  for (struct conn *c = srv->conns; c;) {
    struct conn *next = c->next;
    conn_close(c);
    c = next;
  }
  if (srv->cork_handles) { /* no connection is corked any more */
    srv->cork_handles = false;
    uv_close((uv_handle_t *)&srv->cork_check, on_listener_closed);
    uv_close((uv_handle_t *)&srv->cork_prepare, on_listener_closed);
  }
  server_maybe_closed(srv);
}
