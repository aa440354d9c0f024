/* upstream/lean.c: the lean HTTP/1.1 client for plain http:// upstreams,
 * on libuv TCP with http_parser for the response (lean_response.c); the
 * contract is upstream.h's, libcurl's per-transfer work is what it saves.
 *
 * Happy path: lean_start() builds the request head once, takes the most
 * recently used idle keep-alive connection to the same host and port (or
 * opens one: numeric hosts connect at once, names go through
 * uv_getaddrinfo, every address in turn), writes head and body with ONE
 * gathered uv_write (the body is not copied when the caller keeps it),
 * and reads the response straight into the callbacks (a body that goes on
 * past a read, e.g. an event stream, frees the request bytes and the header
 * text while it lasts: see on_read). A response that
 * ended cleanly and allows keep-alive, with the request fully written and
 * nothing after it, puts the connection back in the pool; anything else
 * closes it. Idle connections keep reading, so a peer that closes one is
 * noticed (and the connection dropped) before it is reused; they are
 * closed after LEAN_IDLE_TIMEOUT_MS, and at most LEAN_MAX_IDLE are kept.
 * TCP_NODELAY and keep-alive probes on every connection; never a proxy.
 *
 * Phase timers as in client.c: one uv timer per transfer armed for the
 * earliest deadline of its phase (connect here too: there is no curl to
 * enforce it), re-armed only when a deadline comes earlier.
 *
 * Failure modes: DNS, connect errors and the connect timeout are
 * CONNECT_FAILED / CONNECT_TIMEOUT; once the request is handed to a
 * connection everything is BROKEN (or a phase timeout), except that a
 * request on a REUSED connection that gets no response byte before the
 * connection fails is sent once more on a fresh connection, as libcurl
 * does. Invalid responses are BROKEN with a text that never holds a header
 * value. Callbacks may cancel, pause, resume, start and close the client:
 * connections and transfers are freed only from uv close callbacks, and
 * every path re-checks its state after a callback returns. A failure found
 * inside lean_start() is reported later from the transfer's timer.
 */
#include "upstream/lean.h"

#include "base/base.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

/* Idle keep-alive connections kept, over all hosts. */
#define LEAN_MAX_IDLE 1024
/* An idle connection older than this is closed (upstreams close theirs
 * after 5 s to a few minutes; a race with that is what the retry covers). */
#define LEAN_IDLE_TIMEOUT_MS 60000
#define LEAN_SWEEP_MS 1000
/* libcurl's built-in connect limit, kept when connect_ms is 0. */
#define LEAN_DEFAULT_CONNECT_MS 300000
/* One read, shared by every connection (reads are handled at once). */
#define LEAN_READ_BUFFER 65536
#define LEAN_TCP_KEEPALIVE_S 60
#if defined(__SANITIZE_ADDRESS__)
#define LEAN_TRANSFER_POOL_SIZE 0
#else
#define LEAN_TRANSFER_POOL_SIZE 256
#endif

struct lean_host {
  struct lean_host *next;
  struct lean_conn *idle; /* most recently used first */
  unsigned port;
  bool numeric; /* addr holds the address; no lookup */
  struct sockaddr_storage addr;
  char port_text[8];
  char *authority; /* the Host header value, as the URL wrote it */
  char name[];     /* host name or address, without IPv6 brackets */
};

enum conn_state { CONN_RESOLVING, CONN_CONNECTING, CONN_BUSY, CONN_IDLE, CONN_CLOSING };

struct lean_conn {
  uv_tcp_t tcp; /* tcp.data = this */
  struct lean_client *client;
  struct lean_host *host;
  struct lean_conn *prev, *next;           /* client->conns */
  struct lean_conn *idle_prev, *idle_next; /* host->idle while CONN_IDLE */
  struct lean_transfer *t;                 /* while busy */
  enum conn_state state;
  uv_getaddrinfo_t gai;
  bool gai_pending;
  struct addrinfo *ai_list, *ai_next; /* owned; the next address to try */
  uv_connect_t connect_req;
  uv_write_t write_req;
  bool write_pending;
  bool reading;
  bool eof_seen; /* EOF arrived while the response was held (paused) */
  struct lean_response resp;
  unsigned requests; /* requests sent on this connection */
  uint64_t idle_since_ms;
};

enum lean_phase { PHASE_CONNECTING, PHASE_WAITING_FIRST_BYTE, PHASE_RECEIVING };

struct lean_transfer {
  unsigned char engine; /* UPSTREAM_ENGINE_LEAN; first, see lean.h */
  struct lean_client *client;
  struct lean_transfer *prev, *next; /* client->transfers while linked; pool link */
  struct lean_transfer *resume_next; /* client->resume_list */
  bool linked, in_resume_list;
  struct lean_host *host;
  struct lean_conn *conn;
  struct upstream_callbacks cb;
  void *ud;
  struct upstream_timeouts timeouts;
  uv_timer_t timer;        /* phase timer; timer.data = this */
  uint64_t timer_armed_ms; /* deadline it is armed for; 0 = not armed */
  enum lean_phase phase;
  char *request; /* head, then the body when it is not kept by the caller */
  size_t head_len;
  const char *body;
  size_t body_len;
  bool head_request;
  bool cancelled, finished, pause_wanted, retried;
  bool request_dropped; /* sent whole, response under way: request and body not read again */
  bool fail_pending;    /* a failure found in lean_start, reported by the timer */
  enum upstream_result fail_result;
  uint64_t start_us, connected_us, first_byte_us, done_us;
  uint64_t start_loop_ms, connect_start_loop_ms, request_sent_loop_ms, last_activity_loop_ms;
  char error_text[192];
};

struct lean_client {
  uv_loop_t *loop;
  struct lean_host *hosts;
  struct lean_conn *conns;
  struct lean_transfer *transfers;
  struct lean_transfer *pool;
  size_t pool_count;
  struct lean_transfer *resume_list;
  uv_timer_t sweep_timer, resume_timer;
  size_t active, idle_count, open_handles;
  bool closing;
  void (*close_done)(void *arg);
  void *close_arg;
  struct lean_stats stats;
  char read_buffer[LEAN_READ_BUFFER];
};

static uint64_t monotonic_us(void) {
  return uv_hrtime() / 1000;
}

/* ---- URL ------------------------------------------------------------------ */

struct lean_url {
  const char *host; /* without brackets */
  size_t host_len;
  const char *authority; /* host[:port] as written */
  size_t authority_len;
  unsigned port;
  const char *path; /* from '/' or '?' up to '#' or the end; "" = "/" */
  size_t path_len;
};

/* Parses "http://host[:port][/path][?query][#fragment]". Refused (-1): no
 * host, user info, a bad port, bytes that would need encoding. */
static int parse_url(const char *url, struct lean_url *u) {
  if (strncasecmp(url, "http://", 7) != 0) return -1;
  for (const unsigned char *p = (const unsigned char *)url; *p; p++)
    if ((unsigned char)(*p - 0x21) >= 0x7f - 0x21) return -1; /* CTL, space, DEL, non-ASCII */
  const char *auth = url + 7;
  size_t auth_len = strcspn(auth, "/?#");
  if (auth_len == 0 || memchr(auth, '@', auth_len)) return -1;
  u->authority = auth;
  u->authority_len = auth_len;
  const char *port_at = NULL;
  if (auth[0] == '[') {
    const char *close = memchr(auth, ']', auth_len);
    if (!close || close == auth + 1) return -1;
    u->host = auth + 1;
    u->host_len = (size_t)(close - auth - 1);
    if (close + 1 < auth + auth_len) {
      if (close[1] != ':') return -1;
      port_at = close + 2;
    }
  } else {
    const char *colon = memchr(auth, ':', auth_len);
    u->host = auth;
    u->host_len = colon ? (size_t)(colon - auth) : auth_len;
    if (colon) port_at = colon + 1;
  }
  if (u->host_len == 0 || u->host_len > 253) return -1;
  u->port = 80;
  if (port_at) {
    const char *end = auth + auth_len;
    if (port_at == end || end - port_at > 5) return -1;
    unsigned port = 0;
    for (const char *p = port_at; p < end; p++) {
      if (*p < '0' || *p > '9') return -1;
      port = port * 10 + (unsigned)(*p - '0');
    }
    if (port == 0 || port > 65535) return -1;
    u->port = port;
  }
  u->path = auth + auth_len;
  u->path_len = strcspn(u->path, "#");
  return 0;
}

bool lean_accepts(const struct upstream_request *req) {
  struct lean_url u;
  return req && req->url && !req->curl_only && !req->tls && parse_url(req->url, &u) == 0;
}

/* ---- client bookkeeping ----------------------------------------------------- */

static void maybe_free_client(struct lean_client *c) {
  if (!c->closing || c->open_handles > 0) return;
  while (c->hosts) {
    struct lean_host *h = c->hosts;
    c->hosts = h->next;
    free(h->authority);
    free(h);
  }
  while (c->pool) {
    struct lean_transfer *t = c->pool;
    c->pool = t->next;
    free(t);
  }
  void (*done)(void *) = c->close_done;
  void *arg = c->close_arg;
  free(c);
  if (done) done(arg);
}

static struct lean_host *find_host(struct lean_client *c, const struct lean_url *u) {
  for (struct lean_host *h = c->hosts; h; h = h->next)
    if (h->port == u->port && strlen(h->name) == u->host_len &&
        strncasecmp(h->name, u->host, u->host_len) == 0)
      return h;
  struct lean_host *h = calloc(1, sizeof *h + u->host_len + 1);
  if (!h) return NULL;
  h->authority = malloc(u->authority_len + 1);
  if (!h->authority) {
    free(h);
    return NULL;
  }
  memcpy(h->authority, u->authority, u->authority_len);
  h->authority[u->authority_len] = '\0';
  memcpy(h->name, u->host, u->host_len);
  h->port = u->port;
  snprintf(h->port_text, sizeof h->port_text, "%u", u->port);
  if (uv_ip4_addr(h->name, (int)h->port, (struct sockaddr_in *)&h->addr) == 0 ||
      uv_ip6_addr(h->name, (int)h->port, (struct sockaddr_in6 *)&h->addr) == 0)
    h->numeric = true;
  h->next = c->hosts;
  c->hosts = h;
  return h;
}

/* ---- connections ------------------------------------------------------------ */

static void conn_free(struct lean_conn *k) {
  struct lean_client *c = k->client;
  lean_response_free(&k->resp);
  if (k->ai_list) uv_freeaddrinfo(k->ai_list);
  free(k);
  c->open_handles--;
  maybe_free_client(c);
}

static void on_tcp_closed(uv_handle_t *h) {
  struct lean_conn *k = h->data;
  k->tcp.data = NULL; /* marks the handle closed */
  if (!k->gai_pending) conn_free(k);
}

static void idle_unlink(struct lean_conn *k) {
  if (k->idle_prev)
    k->idle_prev->idle_next = k->idle_next;
  else
    k->host->idle = k->idle_next;
  if (k->idle_next) k->idle_next->idle_prev = k->idle_prev;
  k->idle_prev = k->idle_next = NULL;
  k->client->idle_count--;
}

/* Closes k (once); its transfer, if any, is only unhooked. */
static void conn_close(struct lean_conn *k) {
  if (k->state == CONN_CLOSING) return;
  struct lean_client *c = k->client;
  if (k->state == CONN_IDLE) idle_unlink(k);
  k->state = CONN_CLOSING;
  if (k->prev)
    k->prev->next = k->next;
  else
    c->conns = k->next;
  if (k->next) k->next->prev = k->prev;
  k->prev = k->next = NULL;
  if (k->t) {
    k->t->conn = NULL;
    k->t = NULL;
  }
  k->resp.stop = true;
  if (k->gai_pending) uv_cancel((uv_req_t *)&k->gai); /* its callback still comes */
  uv_close((uv_handle_t *)&k->tcp, on_tcp_closed);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct lean_conn *k = h->data;
  *buf = uv_buf_init(k->client->read_buffer, sizeof k->client->read_buffer);
}

static void conn_read(struct lean_conn *k, bool on) {
  if (k->reading == on || k->state == CONN_CLOSING) return;
  if (on) {
    if (uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read) != 0) return;
  } else {
    uv_read_stop((uv_stream_t *)&k->tcp);
  }
  k->reading = on;
}

static void sweep_idle(uv_timer_t *h);

/* After a complete response: back to the pool (or closed when full). */
static void conn_make_idle(struct lean_conn *k) {
  struct lean_client *c = k->client;
  k->t = NULL;
  if (c->closing || c->idle_count >= LEAN_MAX_IDLE) {
    conn_close(k);
    return;
  }
  k->state = CONN_IDLE;
  k->idle_since_ms = uv_now(c->loop);
  k->idle_prev = NULL;
  k->idle_next = k->host->idle;
  if (k->host->idle) k->host->idle->idle_prev = k;
  k->host->idle = k;
  c->idle_count++;
  conn_read(k, true); /* a close by the peer is noticed while idle */
  uv_unref((uv_handle_t *)&k->tcp);
  if (!uv_is_active((uv_handle_t *)&c->sweep_timer))
    uv_timer_start(&c->sweep_timer, sweep_idle, LEAN_SWEEP_MS, LEAN_SWEEP_MS);
}

static void sweep_idle(uv_timer_t *h) {
  struct lean_client *c = h->data;
  uint64_t now = uv_now(c->loop);
  for (struct lean_host *host = c->hosts; host; host = host->next) {
    struct lean_conn *k = host->idle;
    while (k) {
      struct lean_conn *next = k->idle_next;
      if (k->idle_since_ms + LEAN_IDLE_TIMEOUT_MS <= now) conn_close(k);
      k = next;
    }
  }
  if (c->idle_count == 0) uv_timer_stop(&c->sweep_timer);
}

/* ---- transfers: timers and the end ----------------------------------------- */

static void on_transfer_timer_closed(uv_handle_t *h) {
  struct lean_transfer *t = h->data;
  struct lean_client *c = t->client;
  if (!c->closing && c->pool_count + 1 <= LEAN_TRANSFER_POOL_SIZE) {
    t->next = c->pool;
    c->pool = t;
    c->pool_count++;
  } else {
    free(t);
  }
  c->open_handles--;
  maybe_free_client(c);
}

/* Takes t out of the client's lists and off its connection (which is
 * closed: a transfer that ends without a complete response leaves it in an
 * unknown state). No callback after this. */
static void detach_transfer(struct lean_transfer *t) {
  struct lean_client *c = t->client;
  if (!t->cancelled && !t->finished) c->active--;
  t->finished = true;
  uv_timer_stop(&t->timer);
  t->timer_armed_ms = 0;
  if (t->conn) conn_close(t->conn);
  if (t->in_resume_list) {
    for (struct lean_transfer **at = &c->resume_list; *at; at = &(*at)->resume_next)
      if (*at == t) {
        *at = t->resume_next;
        t->in_resume_list = false;
        break;
      }
  }
  if (t->linked) {
    if (t->prev)
      t->prev->next = t->next;
    else
      c->transfers = t->next;
    if (t->next) t->next->prev = t->prev;
    t->prev = t->next = NULL;
    t->linked = false;
  }
}

static void dispose_transfer(struct lean_transfer *t) {
  free(t->request);
  t->request = NULL;
  uv_close((uv_handle_t *)&t->timer, on_transfer_timer_closed);
}

static void finish_transfer(struct lean_transfer *t, enum upstream_result result,
                            const char *text) {
  if (t->finished) return;
  bool notify = !t->cancelled;
  t->done_us = monotonic_us();
  detach_transfer(t);
  if (notify && t->cb.on_done) t->cb.on_done(t->ud, result, text ? text : "");
  dispose_transfer(t);
}

/* Ends t with `result` and the text what + detail. */
static void fail_transfer(struct lean_transfer *t, enum upstream_result result, const char *what,
                          const char *detail) {
  snprintf(t->error_text, sizeof t->error_text, "%s%s", what, detail);
  finish_transfer(t, result, t->error_text);
}

typedef void (*phase_timeout_fn)(struct lean_transfer *t);

static void on_connect_timeout(struct lean_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "no connection to %s within %u ms", t->host->name,
           t->timeouts.connect_ms ? t->timeouts.connect_ms : LEAN_DEFAULT_CONNECT_MS);
  finish_transfer(t, UPSTREAM_CONNECT_TIMEOUT, t->error_text);
}

static void on_first_byte_timeout(struct lean_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "no response byte within %u ms",
           t->timeouts.first_byte_ms);
  finish_transfer(t, UPSTREAM_FIRST_BYTE_TIMEOUT, t->error_text);
}

static void on_idle_timeout(struct lean_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "response idle for %u ms", t->timeouts.idle_ms);
  finish_transfer(t, UPSTREAM_IDLE_TIMEOUT, t->error_text);
}

static void on_total_timeout(struct lean_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "transfer exceeded %u ms total",
           t->timeouts.total_ms);
  finish_transfer(t, UPSTREAM_TOTAL_TIMEOUT, t->error_text);
}

static void on_start_failure(struct lean_transfer *t) {
  finish_transfer(t, t->fail_result, t->error_text);
}

/* The earliest deadline (loop ms) of the current phase and the timeout it
 * names; UINT64_MAX and NULL when none applies. */
static uint64_t phase_deadline(const struct lean_transfer *t, phase_timeout_fn *fire) {
  if (t->fail_pending) {
    *fire = on_start_failure;
    return 0;
  }
  uint64_t deadline = UINT64_MAX;
  *fire = NULL;
  if (t->timeouts.total_ms) {
    deadline = t->start_loop_ms + t->timeouts.total_ms;
    *fire = on_total_timeout;
  }
  if (t->phase == PHASE_CONNECTING) {
    unsigned ms = t->timeouts.connect_ms ? t->timeouts.connect_ms : LEAN_DEFAULT_CONNECT_MS;
    if (t->connect_start_loop_ms + ms < deadline) {
      deadline = t->connect_start_loop_ms + ms;
      *fire = on_connect_timeout;
    }
  }
  if (t->phase == PHASE_WAITING_FIRST_BYTE && t->timeouts.first_byte_ms && !t->pause_wanted) {
    uint64_t d = t->request_sent_loop_ms + t->timeouts.first_byte_ms;
    if (d < deadline) {
      deadline = d;
      *fire = on_first_byte_timeout;
    }
  }
  if (t->phase == PHASE_RECEIVING && t->timeouts.idle_ms && !t->pause_wanted) {
    uint64_t d = t->last_activity_loop_ms + t->timeouts.idle_ms;
    if (d < deadline) {
      deadline = d;
      *fire = on_idle_timeout;
    }
  }
  return deadline;
}

static void on_phase_timer(uv_timer_t *h);

static void start_timer(struct lean_transfer *t, uint64_t deadline) {
  uint64_t now = uv_now(t->client->loop);
  t->timer_armed_ms = deadline ? deadline : 1;
  uv_timer_start(&t->timer, on_phase_timer, deadline > now ? deadline - now : 0, 0);
}

static void arm_timer(struct lean_transfer *t) {
  phase_timeout_fn fire;
  uint64_t deadline = phase_deadline(t, &fire);
  if (!fire) return;
  if (t->timer_armed_ms && t->timer_armed_ms <= deadline) return;
  start_timer(t, deadline);
}

static void on_phase_timer(uv_timer_t *h) {
  struct lean_transfer *t = h->data;
  t->timer_armed_ms = 0;
  phase_timeout_fn fire;
  uint64_t deadline = phase_deadline(t, &fire);
  if (!fire) return;
  if (deadline > uv_now(t->client->loop)) {
    start_timer(t, deadline);
    return;
  }
  fire(t);
}

/* ---- sending ------------------------------------------------------------------ */

static int conn_open(struct lean_transfer *t, struct addrinfo *ai_list, struct addrinfo *ai_next);
static void conn_failed(struct lean_conn *k, int status);

static void on_written(uv_write_t *req, int status) {
  struct lean_conn *k = req->data;
  k->write_pending = false;
  if (k->state == CONN_CLOSING || status == 0) return;
  conn_failed(k, status);
}

/* Hands t's request to k (connected, idle or new). Returns a uv error when
 * the write could not even be queued. */
static int conn_send(struct lean_conn *k, struct lean_transfer *t) {
  struct lean_client *c = k->client;
  k->t = t;
  t->conn = k;
  k->state = CONN_BUSY;
  k->requests++;
  lean_response_reset(&k->resp, t->head_request);
  k->resp.stop = t->pause_wanted;
  uv_buf_t bufs[2] = {uv_buf_init(t->request, (unsigned)t->head_len),
                      uv_buf_init((char *)(uintptr_t)t->body, (unsigned)t->body_len)};
  unsigned nbufs = t->body_len ? 2 : 1;
  /* The socket at once first (one writev, no write request): a uv_write
   * that completes costs libuv an epoll_ctl(MOD) when it drains, one per
   * request. What is left goes through uv_write; an immediate error takes
   * that path too, so it is reported by on_written as before. */
  int n = uv_try_write((uv_stream_t *)&k->tcp, bufs, nbufs);
  if (n > 0) zg_bufs_consume(bufs, &nbufs, (size_t)n);
  if (nbufs > 0) {
    k->write_req.data = k;
    int rv = uv_write(&k->write_req, (uv_stream_t *)&k->tcp, bufs, nbufs, on_written);
    if (rv != 0) return rv;
    k->write_pending = true;
  }
  t->connected_us = t->connected_us ? t->connected_us : monotonic_us();
  t->phase = PHASE_WAITING_FIRST_BYTE;
  t->request_sent_loop_ms = uv_now(c->loop);
  arm_timer(t);
  return 0;
}

static void retry_on_fresh_connection(struct lean_transfer *t) {
  struct lean_client *c = t->client;
  t->retried = true;
  c->stats.retries++;
  t->phase = PHASE_CONNECTING;
  t->connected_us = 0;
  t->connect_start_loop_ms = uv_now(c->loop);
  t->timer_armed_ms = 0;
  uv_timer_stop(&t->timer);
  arm_timer(t);
  int rv = conn_open(t, NULL, NULL);
  if (rv != 0)
    fail_transfer(t, UPSTREAM_BROKEN,
                  "cannot open a new connection for the retry: ", uv_strerror(rv));
}

/* The connection broke (EOF, reset, write error) while busy: retry once
 * when a reused connection got nothing back, else BROKEN. */
static void conn_failed(struct lean_conn *k, int status) {
  struct lean_transfer *t = k->t;
  if (!t) {
    conn_close(k);
    return;
  }
  bool nothing_back = !lean_response_started(&k->resp);
  bool reused = k->requests > 1;
  const char *why = status == UV_EOF ? (nothing_back ? "server closed the connection without "
                                                       "answering"
                                                     : "connection closed before the end of the "
                                                       "response")
                                     : uv_strerror(status);
  if (status == UV_EOF && !nothing_back) {
    enum lean_feed_result r = lean_response_eof(&k->resp);
    if (r == LEAN_FEED_COMPLETE) { /* a body that ends with the connection */
      conn_close(k);
      t->conn = NULL;
      finish_transfer(t, UPSTREAM_OK, "");
      return;
    }
    if (r == LEAN_FEED_MORE) { /* ended, but held while paused: resume finishes it */
      k->eof_seen = true;
      conn_read(k, false);
      return;
    }
    why = k->resp.error;
  }
  conn_close(k); /* unhooks t */
  if (nothing_back && reused && !t->retried && !t->client->closing) {
    retry_on_fresh_connection(t);
    return;
  }
  fail_transfer(t, UPSTREAM_BROKEN, "", why);
}

/* The response is complete and delivered: pool or close the connection,
 * then on_done. */
static void complete_transfer(struct lean_transfer *t) {
  struct lean_conn *k = t->conn;
  if (k) {
    t->conn = NULL;
    if (k->resp.keep_alive && !k->write_pending && !k->eof_seen)
      conn_make_idle(k);
    else
      conn_close(k);
  }
  finish_transfer(t, UPSTREAM_OK, "");
}

/* ---- receiving -------------------------------------------------------------- */

static void resp_on_head(void *ud, int status, const char *content_type,
                         const char *const *headers) {
  struct lean_conn *k = ud;
  struct lean_transfer *t = k->t;
  if (!t || t->cancelled) {
    k->resp.stop = true;
    return;
  }
  if (t->cb.on_response) t->cb.on_response(t->ud, status, content_type, headers);
  if (k->t != t || t->cancelled || t->pause_wanted) k->resp.stop = true;
}

static void resp_on_body(void *ud, const char *data, size_t len) {
  struct lean_conn *k = ud;
  struct lean_transfer *t = k->t;
  if (!t || t->cancelled) {
    k->resp.stop = true;
    return;
  }
  if (t->cb.on_data && t->cb.on_data(t->ud, data, len) != 0) lean_cancel(t);
  if (k->t != t || t->cancelled || t->pause_wanted) k->resp.stop = true;
}

static const struct lean_response_callbacks response_callbacks = {resp_on_head, resp_on_body};

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct lean_conn *k = s->data;
  if (!k || k->state == CONN_CLOSING || nread == 0) return;
  struct lean_transfer *t = k->t;
  if (!t) { /* idle: a close, a reset or bytes nobody asked for */
    conn_close(k);
    return;
  }
  if (nread < 0) {
    conn_failed(k, (int)nread);
    return;
  }
  struct lean_client *c = k->client;
  if (t->phase != PHASE_RECEIVING) {
    t->phase = PHASE_RECEIVING;
    t->first_byte_us = monotonic_us();
  }
  t->last_activity_loop_ms = uv_now(c->loop);
  arm_timer(t);
  size_t used;
  enum lean_feed_result r = lean_response_feed(&k->resp, buf->base, (size_t)nread, &used);
  if (k->state == CONN_CLOSING || k->t != t || t->finished) return; /* ended in a callback */
  if (r == LEAN_FEED_ERROR) {
    fail_transfer(t, UPSTREAM_BROKEN, "", k->resp.error);
    return;
  }
  if (r == LEAN_FEED_COMPLETE) {
    complete_transfer(t);
    return;
  }
  if (k->resp.head_delivered && !k->write_pending) {
    /* The body goes on past this read (an event stream may last minutes):
     * the request bytes (a response started, so no retry sends them) and
     * the response's header text are not needed while it lasts. */
    free(t->request);
    t->request = NULL;
    t->body = NULL;
    t->head_len = t->body_len = 0;
    t->request_dropped = true;
    lean_response_trim(&k->resp);
  }
  if (t->pause_wanted) conn_read(k, false);
}

/* ---- connecting ---------------------------------------------------------------- */

static void on_connected(uv_connect_t *req, int status) {
  struct lean_conn *k = req->data;
  if (k->state == CONN_CLOSING) return;
  struct lean_transfer *t = k->t;
  if (status != 0) {
    if (k->ai_next && t) { /* the next address, on a new socket */
      struct addrinfo *list = k->ai_list, *next = k->ai_next;
      k->ai_list = k->ai_next = NULL;
      conn_close(k);
      int rv = conn_open(t, list, next);
      if (rv != 0) fail_transfer(t, UPSTREAM_CONNECT_FAILED, "connect(): ", uv_strerror(rv));
      return;
    }
    conn_close(k);
    if (t) {
      snprintf(t->error_text, sizeof t->error_text, "connect() to %s port %u: %s", t->host->name,
               t->host->port, uv_strerror(status));
      finish_transfer(t, UPSTREAM_CONNECT_FAILED, t->error_text);
    }
    return;
  }
  if (k->ai_list) {
    uv_freeaddrinfo(k->ai_list);
    k->ai_list = k->ai_next = NULL;
  }
  uv_tcp_nodelay(&k->tcp, 1);
  uv_tcp_keepalive(&k->tcp, 1, LEAN_TCP_KEEPALIVE_S);
  conn_read(k, !(t && t->pause_wanted));
  if (!t) { /* cannot happen: a conn without its transfer is closed */
    conn_close(k);
    return;
  }
  t->connected_us = monotonic_us();
  int rv = conn_send(k, t);
  if (rv != 0) conn_failed(k, rv);
}

/* Starts connecting k to addr. Returns a uv error on an immediate failure. */
static int conn_connect(struct lean_conn *k, const struct sockaddr *addr) {
  k->state = CONN_CONNECTING;
  k->connect_req.data = k;
  return uv_tcp_connect(&k->connect_req, &k->tcp, addr, on_connected);
}

/* Connects to the first usable address from k->ai_next on. */
static int conn_connect_next(struct lean_conn *k) {
  int rv = UV_EAI_NONAME;
  while (k->ai_next) {
    struct addrinfo *ai = k->ai_next;
    k->ai_next = ai->ai_next;
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
    rv = conn_connect(k, ai->ai_addr);
    if (rv == 0) return 0;
    break; /* a failed handle is not reused; the caller opens a new one */
  }
  return rv;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  struct lean_conn *k = req->data;
  k->gai_pending = false;
  if (k->state == CONN_CLOSING) {
    if (res) uv_freeaddrinfo(res);
    if (!k->tcp.data) conn_free(k); /* the handle closed first */
    return;
  }
  struct lean_transfer *t = k->t;
  if (status != 0 || !res) {
    if (res) uv_freeaddrinfo(res);
    conn_close(k);
    if (t) {
      snprintf(t->error_text, sizeof t->error_text, "cannot resolve %s: %s", t->host->name,
               uv_strerror(status ? status : UV_EAI_NONAME));
      finish_transfer(t, UPSTREAM_CONNECT_FAILED, t->error_text);
    }
    return;
  }
  k->ai_list = k->ai_next = res;
  int rv = conn_connect_next(k);
  if (rv == 0) return;
  struct addrinfo *list = k->ai_list, *next = k->ai_next;
  k->ai_list = k->ai_next = NULL;
  conn_close(k);
  if (!t) {
    uv_freeaddrinfo(list);
    return;
  }
  if (next) {
    rv = conn_open(t, list, next);
    if (rv == 0) return;
  } else {
    uv_freeaddrinfo(list);
  }
  fail_transfer(t, UPSTREAM_CONNECT_FAILED, "connect(): ", uv_strerror(rv));
}

/* Opens a new connection for t: to ai_next (taking ai_list) when given,
 * else by t->host (numeric: at once; a name: lookup first). Returns a uv
 * error when nothing was started (ai_list is then freed). */
static int conn_open(struct lean_transfer *t, struct addrinfo *ai_list, struct addrinfo *ai_next) {
  struct lean_client *c = t->client;
  struct lean_conn *k = calloc(1, sizeof *k);
  if (!k) {
    if (ai_list) uv_freeaddrinfo(ai_list);
    return UV_ENOMEM;
  }
  int rv = uv_tcp_init(c->loop, &k->tcp);
  if (rv != 0) {
    free(k);
    if (ai_list) uv_freeaddrinfo(ai_list);
    return rv;
  }
  k->tcp.data = k;
  k->client = c;
  k->host = t->host;
  k->t = t;
  t->conn = k;
  k->next = c->conns;
  if (c->conns) c->conns->prev = k;
  c->conns = k;
  c->open_handles++;
  c->stats.connections_opened++;
  lean_response_init(&k->resp, &response_callbacks, k, t->head_request);
  if (ai_list) {
    k->ai_list = ai_list;
    k->ai_next = ai_next;
    rv = conn_connect_next(k);
  } else if (t->host->numeric) {
    rv = conn_connect(k, (const struct sockaddr *)&t->host->addr);
  } else {
    static const struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
    k->state = CONN_RESOLVING;
    k->gai.data = k;
    rv = uv_getaddrinfo(c->loop, &k->gai, on_resolved, t->host->name, t->host->port_text, &hints);
    if (rv == 0) k->gai_pending = true;
  }
  if (rv != 0) conn_close(k); /* unhooks t */
  return rv;
}

/* ---- request head ------------------------------------------------------------- */

/* True when the header line is named `name` (n bytes, lower case). */
static bool names(const char *line, const char *name, size_t n) {
  return (line[0] | 0x20) == name[0] && strncasecmp(line, name, n) == 0 &&
         (line[n] == ':' || line[n] == ';');
}

/* Writes "Content-Length: <len>\r\n" at p; returns its length. */
static size_t put_content_length(char *p, size_t len) {
  static const char name[] = "Content-Length: ";
  char digits[24];
  size_t n = 0;
  do {
    digits[n++] = (char)('0' + len % 10);
    len /= 10;
  } while (len);
  memcpy(p, name, sizeof name - 1);
  size_t at = sizeof name - 1;
  while (n) p[at++] = digits[--n];
  p[at++] = '\r';
  p[at++] = '\n';
  return at;
}

/* True when every CR of head[0..len) is followed by LF and every LF follows
 * a CR: no line can end early. */
static bool crlf_only(const char *head, size_t len) {
  size_t crs = 0, lfs = 0;
  for (const char *at = head, *end = head + len; (at = memchr(at, '\r', (size_t)(end - at)));
       at++) {
    if (at + 1 >= end || at[1] != '\n') return false;
    crs++;
  }
  for (const char *at = head, *end = head + len; (at = memchr(at, '\n', (size_t)(end - at))); at++)
    lfs++;
  return crs == lfs;
}

static bool is_method_char(unsigned char ch) {
  return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || ch == '-' || ch == '_';
}

/* Builds t->request: the head (request line, Host, the caller's lines,
 * Content-Length, and the defaults libcurl adds: Accept, the encodings it
 * decodes, a form Content-Type for a POST that names none), then the body
 * when the caller does not keep it. A caller line "Name:" with no value
 * sends nothing and suppresses the default of that name; "Name;" sends an
 * empty value (libcurl's rules). Returns -1 with errmsg (the header's name
 * only, never its value). */
static int build_request(struct lean_transfer *t, const struct upstream_request *req,
                         const struct lean_url *u, char *errmsg, size_t errlen) {
  const char *method = req->method;
  size_t method_len = strlen(method);
  if (method_len == 0 || method_len > 32) goto bad_method;
  for (size_t i = 0; i < method_len; i++)
    if (!is_method_char((unsigned char)method[i])) goto bad_method;
  bool post = strcmp(method, "POST") == 0;
  bool has_host = false, has_accept = false, has_encoding = false, has_type = false;
  size_t need = method_len + u->path_len + 16 + 8 + strlen(t->host->authority) + 2;
  for (size_t i = 0; req->headers && req->headers[i]; i++) {
    const char *line = req->headers[i];
    size_t len = strlen(line);
    if (strpbrk(line, "\r\n")) {
      size_t name_len = strcspn(line, ":\r\n");
      snprintf(errmsg, errlen, "request header %d (\"%.*s\") contains CR or LF", (int)i,
               (int)(name_len > 64 ? 64 : name_len), line);
      return -1;
    }
    has_host |= names(line, "host", 4);
    has_accept |= names(line, "accept", 6);
    has_encoding |= names(line, "accept-encoding", 15);
    has_type |= names(line, "content-type", 12);
    need += len + 3;
  }
  static const char accept_line[] = "Accept: */*\r\n";
  static const char encoding_line[] = "Accept-Encoding: deflate, gzip\r\n";
  static const char form_type_line[] = "Content-Type: application/x-www-form-urlencoded\r\n";
  need += sizeof accept_line + sizeof encoding_line + sizeof form_type_line + 48 + 2;
  bool send_length = post || req->body_len > 0;
  bool copy_body = req->body_len > 0 && !req->body_kept;
  char *out = malloc(need + (copy_body ? req->body_len : 0));
  if (!out) {
    snprintf(errmsg, errlen, "upstream_start(): out of memory");
    return -1;
  }
  char *p = out;
#define PUT(s, n)                                                                                  \
  do {                                                                                             \
    memcpy(p, (s), (n));                                                                           \
    p += (n);                                                                                      \
  } while (0)
  PUT(method, method_len);
  PUT(" ", 1);
  if (u->path_len == 0 || u->path[0] != '/') PUT("/", 1);
  PUT(u->path, u->path_len);
  PUT(" HTTP/1.1\r\n", 11);
  if (!has_host) {
    PUT("Host: ", 6);
    PUT(t->host->authority, strlen(t->host->authority));
    PUT("\r\n", 2);
  }
  if (!has_accept) PUT(accept_line, sizeof accept_line - 1);
  for (size_t i = 0; req->headers && req->headers[i]; i++) {
    const char *line = req->headers[i];
    size_t len = strlen(line);
    size_t name_len = strcspn(line, ":;");
    if (name_len == 0 || !line[name_len]) continue; /* not a header line */
    if (line[name_len] == ';') {
      if (line[name_len + 1] != '\0') continue; /* libcurl sends only a bare "Name;" */
      PUT(line, name_len);
      PUT(":\r\n", 3);
      continue;
    }
    const char *value = line + name_len + 1;
    while (*value == ' ' || *value == '\t') value++;
    if (!*value) continue; /* "Name:" suppresses, sends nothing */
    PUT(line, len);
    PUT("\r\n", 2);
  }
  if (send_length) p += put_content_length(p, req->body_len);
  if (post && !has_type) PUT(form_type_line, sizeof form_type_line - 1);
  if (!has_encoding) PUT(encoding_line, sizeof encoding_line - 1);
  PUT("\r\n", 2);
#undef PUT
  t->head_len = (size_t)(p - out);
  /* Nothing the caller wrote can end a line early: every CR and LF of the
   * head is one of ours, in a CRLF pair. */
  if (!crlf_only(out, t->head_len)) {
    free(out);
    snprintf(errmsg, errlen, "upstream_start(): request head with a stray CR or LF");
    return -1;
  }
  t->request = out;
  if (copy_body) {
    memcpy(out + t->head_len, req->body, req->body_len);
    t->body = out + t->head_len;
  } else {
    t->body = req->body_len ? req->body : NULL;
  }
  t->body_len = req->body_len;
  return 0;

bad_method:
  snprintf(errmsg, errlen, "upstream_start(): invalid method");
  return -1;
}

/* ---- public ------------------------------------------------------------------- */

int lean_client_create(uv_loop_t *loop, struct lean_client **out, char *errmsg, size_t errlen) {
  struct lean_client *c = calloc(1, sizeof *c);
  if (!c) {
    snprintf(errmsg, errlen, "lean client: out of memory");
    return -1;
  }
  c->loop = loop;
  uv_timer_init(loop, &c->sweep_timer); /* cannot fail for a live loop */
  c->sweep_timer.data = c;
  uv_unref((uv_handle_t *)&c->sweep_timer);
  uv_timer_init(loop, &c->resume_timer);
  c->resume_timer.data = c;
  c->open_handles = 2;
  *out = c;
  return 0;
}

static void on_client_timer_closed(uv_handle_t *h) {
  struct lean_client *c = h->data;
  c->open_handles--;
  maybe_free_client(c);
}

void lean_client_close(struct lean_client *c, void (*done)(void *arg), void *arg) {
  if (!c || c->closing) return;
  c->closing = true;
  c->close_done = done;
  c->close_arg = arg;
  while (c->transfers) {
    struct lean_transfer *t = c->transfers;
    t->cancelled = true; /* no callback */
    detach_transfer(t);
    dispose_transfer(t);
  }
  c->active = 0;
  while (c->conns) conn_close(c->conns);
  uv_close((uv_handle_t *)&c->sweep_timer, on_client_timer_closed);
  uv_close((uv_handle_t *)&c->resume_timer, on_client_timer_closed);
}

size_t lean_active_count(const struct lean_client *c) {
  return c ? c->active : 0;
}

void lean_get_stats(const struct lean_client *c, struct lean_stats *out) {
  memset(out, 0, sizeof *out);
  if (c) *out = c->stats;
}

int lean_start(struct lean_client *c, const struct upstream_request *req,
               const struct upstream_callbacks *cb, void *ud, struct lean_transfer **out,
               char *errmsg, size_t errlen) {
  struct lean_url u;
  if (out) *out = NULL;
  if (c->closing) {
    snprintf(errmsg, errlen, "upstream_start(): client is closing");
    return -1;
  }
  if (parse_url(req->url, &u) != 0) {
    snprintf(errmsg, errlen, "upstream_start(): not a plain http:// URL");
    return -1;
  }
  struct lean_transfer *t = c->pool;
  if (t) {
    c->pool = t->next;
    c->pool_count--;
    memset(t, 0, sizeof *t);
  } else if (!(t = calloc(1, sizeof *t))) {
    snprintf(errmsg, errlen, "upstream_start(): out of memory");
    return -1;
  }
  t->engine = UPSTREAM_ENGINE_LEAN;
  t->client = c;
  t->cb = *cb;
  t->ud = ud;
  t->timeouts = req->timeouts;
  t->head_request = strcmp(req->method, "HEAD") == 0;
  t->host = find_host(c, &u);
  if (!t->host) {
    snprintf(errmsg, errlen, "upstream_start(): out of memory");
    free(t);
    return -1;
  }
  if (build_request(t, req, &u, errmsg, errlen) != 0) {
    free(t);
    return -1;
  }
  t->start_us = monotonic_us();
  t->start_loop_ms = t->connect_start_loop_ms = uv_now(c->loop);
  t->phase = PHASE_CONNECTING;
  uv_timer_init(c->loop, &t->timer); /* cannot fail for a live loop */
  t->timer.data = t;
  c->open_handles++;
  t->next = c->transfers;
  if (c->transfers) c->transfers->prev = t;
  c->transfers = t;
  t->linked = true;
  c->active++;

  int rv = -1;
  struct lean_conn *k = t->host->idle;
  if (k) {
    idle_unlink(k);
    uv_ref((uv_handle_t *)&k->tcp);
    c->stats.requests_on_reused++;
    t->connected_us = monotonic_us();
    rv = conn_send(k, t);
    if (rv != 0) {
      conn_close(k);
      t->connected_us = 0;
    }
  }
  if (rv != 0) {
    rv = conn_open(t, NULL, NULL);
    if (rv != 0) {
      /* Reported from the loop: no callback inside upstream_start(). */
      snprintf(t->error_text, sizeof t->error_text, "connect() to %s port %u: %s", t->host->name,
               t->host->port, uv_strerror(rv));
      t->fail_pending = true;
      t->fail_result = UPSTREAM_CONNECT_FAILED;
    }
  }
  arm_timer(t);
  if (out) *out = t;
  return 0;
}

void lean_cancel(struct lean_transfer *t) {
  if (!t || t->cancelled || t->finished) return;
  t->cancelled = true;
  t->client->active--;
  detach_transfer(t);
  dispose_transfer(t);
}

void lean_pause(struct lean_transfer *t) {
  if (!t || t->cancelled || t->finished) return;
  t->pause_wanted = true;
  if (t->conn) {
    t->conn->resp.stop = true; /* later body bytes are held, not delivered */
    if (t->conn->state == CONN_BUSY) conn_read(t->conn, false);
  }
}

static void on_resume_timer(uv_timer_t *h);

void lean_resume(struct lean_transfer *t) {
  if (!t || t->cancelled || t->finished || !t->pause_wanted) return;
  struct lean_client *c = t->client;
  t->pause_wanted = false;
  uint64_t now = uv_now(c->loop);
  t->last_activity_loop_ms = now; /* idle counts from the resume */
  if (t->phase == PHASE_WAITING_FIRST_BYTE) t->request_sent_loop_ms = now;
  arm_timer(t);
  if (!t->in_resume_list) {
    t->in_resume_list = true;
    t->resume_next = c->resume_list;
    c->resume_list = t;
  }
  if (!uv_is_active((uv_handle_t *)&c->resume_timer))
    uv_timer_start(&c->resume_timer, on_resume_timer, 0, 0);
}

/* Delivers what was held while t was paused, then reads on (or ends). */
static void resume_one(struct lean_transfer *t) {
  struct lean_conn *k = t->conn;
  if (!k || k->state != CONN_BUSY) return; /* still connecting: nothing held */
  k->resp.stop = false;
  enum lean_feed_result r = lean_response_resume_body(&k->resp);
  if (k->state == CONN_CLOSING || k->t != t || t->finished) return;
  switch (r) {
  case LEAN_FEED_ERROR:
    fail_transfer(t, UPSTREAM_BROKEN, "", k->resp.error);
    return;
  case LEAN_FEED_COMPLETE:
    complete_transfer(t);
    return;
  case LEAN_FEED_STOPPED:
    return; /* paused again from on_data */
  case LEAN_FEED_MORE:
    if (k->eof_seen) {
      conn_failed(k, UV_EOF);
      return;
    }
    conn_read(k, true);
    return;
  }
}

static void on_resume_timer(uv_timer_t *h) {
  struct lean_client *c = h->data;
  struct lean_transfer *list = c->resume_list;
  c->resume_list = NULL;
  /* A transfer that ended before this call left the list (detach_transfer);
   * one that ends during it stays allocated until its timer's close
   * callback, which runs after this one. */
  while (list && !c->closing) {
    struct lean_transfer *t = list;
    list = t->resume_next;
    t->in_resume_list = false;
    if (!t->cancelled && !t->finished && !t->pause_wanted) resume_one(t);
  }
}

/* The request went out whole (no write pending) and a response started,
 * so no retry sends it again: the body is not read any more. */
bool lean_body_done(const struct lean_transfer *t) {
  if (!t || t->finished || t->cancelled) return false;
  if (t->request_dropped) return true;
  const struct lean_conn *k = t->conn;
  return k && k->t == t && !k->write_pending && lean_response_started(&k->resp);
}

void lean_get_timing(const struct lean_transfer *t, struct upstream_timing *out) {
  memset(out, 0, sizeof *out);
  if (!t) return;
  uint64_t end_us = t->done_us ? t->done_us : monotonic_us();
  if (t->connected_us) out->connect_us = t->connected_us - t->start_us;
  if (t->first_byte_us) out->first_byte_us = t->first_byte_us - t->start_us;
  out->total_us = end_us - t->start_us;
}
