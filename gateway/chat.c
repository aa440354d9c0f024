/* chat.c: POST /v1/chat/completions and GET /v1/models.
 *
 * Happy path: authenticate → parse and check the JSON body → fill model
 * defaults the client left out → cache lookup → wait for an upstream slot
 * → send upstream with the provider key → pass the answer through (SSE
 * streams chunk by chunk as they arrive) → cache it when allowed.
 *
 * Failure modes, each answered in OpenAI's error shape: 400 malformed
 * body, 401 token, 429 no slot in time (Retry-After), 502 upstream
 * unreachable, 504 upstream timeout. Connect failures and 5xx answers
 * before the first byte reaches the client move on to the next provider
 * key / fallback endpoint; an upstream 401 marks that key rejected and
 * tries the next key. A stream that breaks after it started ends with an
 * error event and an incomplete HTTP response, never a clean finish. A
 * client that disconnects cancels its upstream transfer.
 */
#include "gateway/internal.h"

#include <openssl/crypto.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_ATTEMPTS 16
/* Attempts held inside struct chat; more (several keys, fallbacks) go to
 * the heap, so the common request allocates little. */
#define INLINE_ATTEMPTS 2
#define MAX_BUFFERED_RESPONSE (64u * 1024u * 1024u)
/* Finished chats kept for reuse, so a request does not allocate its
 * (several KiB) struct; response buffers larger than this are not kept.
 * Under AddressSanitizer nothing is pooled, so a use after the end of a
 * request is still caught. */
#if defined(__SANITIZE_ADDRESS__)
#define CHAT_POOL_SIZE 0
#else
#define CHAT_POOL_SIZE 256
#endif
#define CHAT_POOLED_RESPONSE_MAX (64u * 1024u)

struct attempt {
  char url[600];
  char upstream_id[16];
  char key_id[48];
  char *api_key; /* owned */
};

struct chat {
  /* Kept while the chat sits in the gateway's pool (capacity reused). */
  zg_buf response;
  struct chat *next_pooled;
  /* Per request: chat_new zeroes everything from here on. */
  struct gateway *gw;
  struct httpd_req *req;
  const char *route;
  char upstream_path[32]; /* "/chat/completions" or "/models" */
  const char *method;
  /* Request body sent upstream: owned (body_owned) when it was re-printed
   * with model defaults or copied for forwarding, else it points into the
   * client request's body, which httpd keeps until the request is answered
   * (after which c->body is never read). */
  const char *body;
  bool body_owned;
  size_t body_len;
  bool stream;
  bool cacheable;
  uint8_t cache_key[32];
  struct gateway_token token;
  bool has_token;
  char *forwarded_auth; /* client Authorization when forwarding to the active (owned) */
  bool forwarding;
  struct limiter_waiter *waiter;
  uv_timer_t *hold_timer; /* waiting for an active node (GATEWAY_HOLD) */
  uint64_t hold_deadline_ms;
  bool holds_slot;
  struct upstream_transfer *transfer;
  struct attempt *attempts; /* inline_attempts, or a heap array of MAX_ATTEMPTS */
  struct attempt inline_attempts[INLINE_ATTEMPTS];
  size_t n_attempts, current;
  /* response */
  int status;
  char content_type[128];
  char retry_after[32];
  bool streaming_to_client;
  bool finished;
};

static void stop_hold(struct chat *c);

/* Copies src into dst[size], cut to fit and NUL-terminated: what
 * snprintf(dst, size, "%s", src) does, without the format machinery (this
 * runs several times per request). */
static size_t bounded_len(const char *s, size_t max) {
  size_t len = 0;
  while (len < max && s[len]) len++;
  return len;
}

static void copy_cut(char *dst, size_t size, const char *src) {
  size_t len = bounded_len(src, size - 1);
  memcpy(dst, src, len);
  dst[len] = '\0';
}

/* Releases what the request owns; the struct goes back to the gateway's
 * pool (its response buffer kept when small), or is freed. */
static void chat_free(struct chat *c) {
  struct gateway *gw = c->gw;
  stop_hold(c);
  for (size_t i = 0; i < c->n_attempts; i++) zg_secret_free(c->attempts[i].api_key);
  if (c->attempts != c->inline_attempts) free(c->attempts);
  if (c->body_owned) free((char *)c->body);
  if (c->forwarded_auth) zg_secret_free(c->forwarded_auth);
  if (c->response.cap > CHAT_POOLED_RESPONSE_MAX) zg_buf_free(&c->response);
  if (gw->chat_pool_count + 1 <= CHAT_POOL_SIZE) {
    c->next_pooled = gw->chat_pool;
    gw->chat_pool = c;
    gw->chat_pool_count++;
    return;
  }
  zg_buf_free(&c->response);
  free(c);
}

void gateway_free_chat_pool(struct gateway *gw) {
  while (gw->chat_pool) {
    struct chat *c = gw->chat_pool;
    gw->chat_pool = c->next_pooled;
    zg_buf_free(&c->response);
    free(c);
  }
  gw->chat_pool_count = 0;
}

/* The next free attempt slot, or NULL when MAX_ATTEMPTS are used (or out
 * of memory). */
static struct attempt *new_attempt(struct chat *c) {
  if (c->n_attempts >= MAX_ATTEMPTS) return NULL;
  if (c->n_attempts == INLINE_ATTEMPTS && c->attempts == c->inline_attempts) {
    struct attempt *heap = calloc(MAX_ATTEMPTS, sizeof(*heap));
    if (!heap) return NULL;
    memcpy(heap, c->inline_attempts, sizeof(c->inline_attempts));
    c->attempts = heap;
  }
  struct attempt *a = &c->attempts[c->n_attempts++];
  memset(a, 0, sizeof(*a));
  return a;
}

static void release_slot(struct chat *c) {
  if (c->holds_slot) {
    c->holds_slot = false;
    limiter_release(c->gw->limiter);
  }
}

/* Adds what this request did to its access line (written by httpd's
 * finish hook in gateway.c). Call before answering. */
static void note_fields(struct chat *c, const char *cache, const char *result, uint64_t upstream_us,
                        uint64_t ttfb_us) {
  struct gateway_access *f = gateway_access_of(c->req);
  if (!f) return;
  f->noted = true;
  f->cache = cache;
  f->stream = c->stream;
  f->has_token = c->has_token;
  if (c->has_token) copy_cut(f->token, sizeof(f->token), c->token.name);
  f->has_upstream = c->n_attempts > 0;
  if (c->n_attempts > 0) {
    struct attempt *a = &c->attempts[c->current < c->n_attempts ? c->current : c->n_attempts - 1];
    copy_cut(f->upstream, sizeof(f->upstream), a->upstream_id);
    copy_cut(f->key_id, sizeof(f->key_id), a->key_id);
    f->attempts = (unsigned)(c->current + 1);
  }
  copy_cut(f->upstream_result, sizeof(f->upstream_result), result ? result : "");
  f->upstream_us = upstream_us;
  f->ttfb_us = ttfb_us;
}

/* The request has been answered (httpd owns and frees it); free ours. */
static void chat_done(struct chat *c) {
  release_slot(c);
  chat_free(c);
}

static void respond_error(struct chat *c, int status, const char *type, const char *code,
                          const char *const *headers, const char *message, const char *result) {
  note_fields(c, "none", result, 0, 0);
  httpd_req_set_abort(c->req, NULL, NULL);
  httpd_respond_error(c->req, status, type, code, headers, "%s", message);
  chat_done(c);
}

/* ---- upstream callbacks ---------------------------------------------- */

static void start_attempt(struct chat *c);
static void retry_route_later(struct chat *c);
static bool gw_has_cluster(const struct chat *c) {
  return c->gw->cluster != NULL;
}

static bool have_next_attempt(struct chat *c) {
  return c->current + 1 < c->n_attempts;
}

static void on_upstream_response(void *ud, int status, const char *content_type,
                                 const char *const *headers) {
  struct chat *c = ud;
  struct attempt *a = &c->attempts[c->current];
  c->status = status;
  copy_cut(c->content_type, sizeof(c->content_type),
           content_type ? content_type : "application/json");
  c->retry_after[0] = '\0';
  for (size_t i = 0; headers && headers[i]; i++)
    if (strncasecmp(headers[i], "Retry-After:", 12) == 0)
      snprintf(c->retry_after, sizeof(c->retry_after), "%s",
               headers[i] + 12 + (headers[i][12] == ' '));

  if (c->forwarding && status == 503 && gw_has_cluster(c)) {
    /* The node we forwarded to is not active (any more): nothing reached the
     * client yet, so decide again within the hold deadline. */
    upstream_cancel(c->transfer);
    c->transfer = NULL;
    retry_route_later(c);
    return;
  }
  bool retry = false;
  if (status == 401 && !c->forwarding) {
    zg_log(ZG_WARN, "upstream_key_rejected", "upstream %s answered 401 for key %s", a->upstream_id,
           a->key_id[0] ? a->key_id : "(config api_key)");
    metrics_counter_add(c->gw->m_upstream_errors, 1, a->upstream_id, "unauthorized");
    if (c->gw->cluster && c->gw->cluster->key_rejected && a->key_id[0])
      c->gw->cluster->key_rejected(c->gw->cluster->ud, a->key_id, a->upstream_id);
    retry = have_next_attempt(c);
  } else if (status >= 500 && !c->forwarding) {
    metrics_counter_add(c->gw->m_upstream_errors, 1, a->upstream_id, "status_5xx");
    gateway_note_upstream(c->gw, false, "upstream answered 5xx");
    retry = have_next_attempt(c);
  }
  if (retry) {
    upstream_cancel(c->transfer);
    c->transfer = NULL;
    c->current++;
    start_attempt(c);
    return;
  }
  if (c->stream && status == 200) {
    c->streaming_to_client = true;
    const char *extra[] = {"Cache-Control: no-cache", "X-Accel-Buffering: no", NULL};
    httpd_stream_begin(c->req, 200, "text/event-stream", extra);
  }
}

static void on_client_drained(void *ud) {
  struct chat *c = ud;
  upstream_resume(c->transfer);
}

static int on_upstream_data(void *ud, const char *data, size_t len) {
  struct chat *c = ud;
  if (c->streaming_to_client) {
    if (httpd_stream_write(c->req, data, len) != 0) return 1; /* client gone */
    if (httpd_req_write_full(c->req)) { /* slow reader: pause only its own transfer */
      httpd_req_set_drain(c->req, on_client_drained, c);
      upstream_pause(c->transfer);
    }
    return 0;
  }
  if (c->response.len + len > MAX_BUFFERED_RESPONSE) return 1;
  zg_buf_append(&c->response, data, len);
  return 0;
}

static void on_upstream_done(void *ud, enum upstream_result result, const char *curl_error) {
  struct chat *c = ud;
  struct gateway *gw = c->gw;
  struct attempt *a = &c->attempts[c->current];
  struct upstream_timing timing = {0};
  upstream_get_timing(c->transfer, &timing);
  c->transfer = NULL;
  httpd_req_set_abort(c->req, NULL, NULL);
  if (result == UPSTREAM_OK) {
    if (!c->forwarding) {
      metrics_histogram_observe(gw->m_upstream_latency, (double)timing.total_us / 1e6,
                                a->upstream_id);
      metrics_histogram_observe(gw->m_ttfb, (double)timing.first_byte_us / 1e6, a->upstream_id);
      if (c->status < 500) gateway_note_upstream(gw, true, NULL);
    }
    note_fields(c, c->cacheable ? "miss" : "none", "ok", timing.total_us, timing.first_byte_us);
    if (c->streaming_to_client) {
      httpd_stream_end(c->req);
    } else {
      if (c->cacheable && c->status == 200)
        response_cache_put(gw->cache, c->cache_key, c->status, c->content_type, c->response.data,
                           c->response.len, (uint64_t)gw->cfg->cache_ttl_s * 1000u);
      char retry[64];
      const char *extra[3] = {NULL, NULL, NULL};
      size_t n = 0;
      if (c->cacheable) extra[n++] = "X-Cache: MISS";
      if (c->retry_after[0]) {
        snprintf(retry, sizeof(retry), "Retry-After: %s", c->retry_after);
        extra[n++] = retry;
      }
      httpd_respond(c->req, c->status, c->content_type, extra,
                    c->response.data ? c->response.data : "", c->response.len);
    }
    chat_done(c);
    return;
  }

  const char *kind = upstream_result_name(result);
  if (!c->forwarding) {
    metrics_counter_add(gw->m_upstream_errors, 1, a->upstream_id, kind);
    gateway_note_upstream(gw, false, kind);
  }
  zg_log(ZG_WARN, "upstream_failed", "%s %s: %s (%s)",
         c->forwarding ? "active node" : a->upstream_id, kind, curl_error ? curl_error : "",
         c->streaming_to_client ? "mid-stream" : "before response");
  bool never_sent = result == UPSTREAM_CONNECT_FAILED || result == UPSTREAM_CONNECT_TIMEOUT;
  if (c->forwarding && never_sent && gw->cluster && !c->streaming_to_client) {
    /* The active we forwarded to is gone (failover in progress): ask the
     * role again and wait for the next active, within the hold deadline. */
    retry_route_later(c);
    return;
  }
  if (!c->streaming_to_client && never_sent && have_next_attempt(c)) {
    c->current++;
    c->response.len = 0;
    httpd_req_set_abort(c->req, NULL, NULL);
    start_attempt(c);
    return;
  }
  bool timeout = result == UPSTREAM_CONNECT_TIMEOUT || result == UPSTREAM_FIRST_BYTE_TIMEOUT ||
                 result == UPSTREAM_IDLE_TIMEOUT || result == UPSTREAM_TOTAL_TIMEOUT;
  if (c->streaming_to_client) {
    char event[512];
    int n = snprintf(
        event, sizeof(event),
        "data: {\"error\":{\"message\":\"upstream stream failed: %s\",\"type\":\"upstream_error\","
        "\"code\":\"%s\"}}\n\n",
        kind, timeout ? "upstream_timeout" : "upstream_broken");
    note_fields(c, "none", kind, timing.total_us, timing.first_byte_us);
    httpd_stream_write(c->req, event, (size_t)n);
    httpd_stream_abort(c->req);
    chat_done(c);
    return;
  }
  char message[256];
  if (timeout) {
    snprintf(message, sizeof(message), "the upstream model API did not answer in time (%s)", kind);
    respond_error(c, 504, "upstream_error", "upstream_timeout", NULL, message, kind);
  } else {
    snprintf(message, sizeof(message), "the upstream model API is unreachable or failed (%s)",
             kind);
    respond_error(c, 502, "upstream_error", "upstream_unreachable", NULL, message, kind);
  }
}

static void on_client_abort(void *ud) {
  struct chat *c = ud;
  stop_hold(c);
  if (c->transfer) upstream_cancel(c->transfer);
  c->transfer = NULL;
  if (c->waiter) limiter_cancel(c->waiter);
  c->waiter = NULL;
  note_fields(c, "none", "client_disconnected", 0, 0);
  chat_done(c);
}

/* Client headers that are not passed upstream: hop-by-hop ones, the
 * client's own credentials (replaced by the provider key), and the ones
 * the gateway sets itself. Everything else passes through, as nginx's
 * proxy_pass does. */
static bool header_passes(const char *name) {
  static const char *const dropped[] = {"authorization",
                                        "host",
                                        "content-length",
                                        "content-type",
                                        "accept",
                                        "connection",
                                        "keep-alive",
                                        "transfer-encoding",
                                        "te",
                                        "trailer",
                                        "upgrade",
                                        "expect",
                                        "proxy-authorization",
                                        "proxy-connection",
                                        "cookie",
                                        "accept-encoding",
                                        "x-forwarded-for"};
  for (size_t i = 0; i < ZG_ARRAY_LEN(dropped); i++)
    if (strcasecmp(name, dropped[i]) == 0) return false;
  return strncasecmp(name, "x-zonegate-", 11) != 0;
}

/* Header lines per attempt held on the stack; more go to the heap. */
#define INLINE_UPSTREAM_HEADERS 32

static void start_attempt(struct chat *c) {
  struct gateway *gw = c->gw;
  struct attempt *a = &c->attempts[c->current];
  size_t n_client = httpd_req_header_count(c->req);
  const char *inline_headers[INLINE_UPSTREAM_HEADERS];
  size_t max_headers = n_client + 8;
  const char **headers = inline_headers;
  if (max_headers > INLINE_UPSTREAM_HEADERS) headers = calloc(max_headers, sizeof(*headers));
  size_t n = 0;
  char auth[1100] = "";
  char forwarded_for[128];
  if (!headers) {
    respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
    return;
  }
  /* The passing client headers, "Name: value\0" one after the other in the
   * gateway's reused buffer (upstream_start copies them); pointed at once
   * the buffer stops growing. */
  zg_buf *lines = &gw->upstream_header_lines;
  zg_buf_reset(lines);
  size_t n_lines = 0;
  for (size_t i = 0; i < n_client; i++) {
    const char *name, *value;
    httpd_req_header_at(c->req, i, &name, &value);
    if (!header_passes(name)) continue;
    if (zg_buf_append(lines, name, strlen(name)) != 0 || zg_buf_append(lines, ": ", 2) != 0 ||
        zg_buf_append(lines, value, strlen(value) + 1) != 0)
      break; /* out of memory: the lines so far are complete */
    n_lines++;
  }
  for (size_t i = 0, at = 0; i < n_lines; i++) {
    headers[n++] = lines->data + at;
    at += strlen(lines->data + at) + 1;
  }
  const char *prior = httpd_req_header(c->req, "X-Forwarded-For");
  snprintf(forwarded_for, sizeof(forwarded_for), "X-Forwarded-For: %.60s%s%s", prior ? prior : "",
           prior ? ", " : "", httpd_req_peer_ip(c->req));
  headers[n++] = forwarded_for;
  if (c->forwarding) {
    if (c->forwarded_auth && c->forwarded_auth[0]) {
      snprintf(auth, sizeof(auth), "Authorization: %s", c->forwarded_auth);
      headers[n++] = auth;
    }
    headers[n++] = "X-Zonegate-Forwarded: 1";
  } else if (a->api_key && a->api_key[0]) {
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", a->api_key);
    headers[n++] = auth;
  }
  if (c->body) headers[n++] = "Content-Type: application/json";
  headers[n++] = c->stream ? "Accept: text/event-stream" : "Accept: application/json";
  headers[n] = NULL;
  struct upstream_request ureq = {0};
  ureq.url = a->url;
  ureq.method = c->method;
  ureq.headers = headers;
  ureq.body = c->body;
  ureq.body_len = c->body_len;
  const struct zg_config *cfg = gw->cfg;
  ureq.timeouts.connect_ms = cfg->connect_timeout_ms;
  ureq.timeouts.first_byte_ms = cfg->first_byte_timeout_ms;
  ureq.timeouts.idle_ms = c->stream ? cfg->idle_timeout_ms : 0;
  ureq.timeouts.total_ms = c->stream ? cfg->stream_timeout_ms : cfg->request_timeout_ms;
  static const struct upstream_callbacks callbacks = {on_upstream_response, on_upstream_data,
                                                      on_upstream_done};
  char err[256];
  c->status = 0;
  c->response.len = 0;
  int rc = upstream_start(gw->upstream, &ureq, &callbacks, c, &c->transfer, err, sizeof(err));
  OPENSSL_cleanse(auth, sizeof(auth));
  if (headers != inline_headers) free(headers);
  if (rc != 0) {
    zg_log(ZG_ERROR, "upstream_start_failed", "%s", err);
    respond_error(c, 502, "upstream_error", "upstream_unreachable", NULL,
                  "the gateway could not start the upstream request", "start_failed");
    return;
  }
  httpd_req_set_abort(c->req, on_client_abort, c);
}

static void on_slot(void *ud, enum limiter_verdict verdict) {
  struct chat *c = ud;
  c->waiter = NULL;
  if (verdict != LIMITER_GRANTED) {
    char retry[48];
    snprintf(retry, sizeof(retry), "Retry-After: %u", limiter_retry_after_s(c->gw->limiter));
    const char *headers[] = {retry, NULL};
    httpd_req_set_abort(c->req, NULL, NULL);
    respond_error(c, verdict == LIMITER_SHUTDOWN ? 503 : 429, "rate_limit_error",
                  verdict == LIMITER_QUEUE_FULL ? "queue_full" : "queue_timeout", headers,
                  verdict == LIMITER_QUEUE_FULL
                      ? "too many requests in flight and the wait queue is full; retry later"
                      : "no upstream slot became free within queue_timeout; retry later",
                  "rejected");
    return;
  }
  c->holds_slot = true;
  start_attempt(c);
}

/* The attempt goes to ep: url = base_url + upstream path, and its id. */
static void attempt_set_endpoint(const struct chat *c, struct attempt *a,
                                 const struct gateway_endpoint *ep) {
  size_t base_len = bounded_len(ep->base_url, sizeof(a->url) - 1);
  memcpy(a->url, ep->base_url, base_len);
  copy_cut(a->url + base_len, sizeof(a->url) - base_len, c->upstream_path);
  copy_cut(a->upstream_id, sizeof(a->upstream_id), ep->upstream_id);
}

/* Builds the attempt list: provider keys of the primary endpoint in
 * priority order (replicated keys first, else the config api_key), then
 * each fallback endpoint with its own key. */
static void build_attempts(struct chat *c) {
  struct gateway *gw = c->gw;
  for (size_t e = 0; e < gw->n_endpoints && c->n_attempts < MAX_ATTEMPTS; e++) {
    struct gateway_endpoint *ep = &gw->endpoints[e];
    struct gateway_key keys[8];
    size_t n_keys = 0;
    if (gw->cluster && gw->cluster->usable_keys)
      n_keys = gw->cluster->usable_keys(gw->cluster->ud, ep->upstream_id, keys, ZG_ARRAY_LEN(keys));
    if (n_keys == 0) {
      struct attempt *a = new_attempt(c);
      if (!a) break;
      attempt_set_endpoint(c, a, ep);
      a->api_key = ep->api_key ? strdup(ep->api_key) : NULL;
      continue;
    }
    for (size_t k = 0; k < n_keys; k++) {
      struct attempt *a = new_attempt(c);
      if (!a) {
        zg_secret_free(keys[k].secret);
        continue;
      }
      attempt_set_endpoint(c, a, ep);
      snprintf(a->key_id, sizeof(a->key_id), "%.47s", keys[k].id);
      a->api_key = keys[k].secret;
    }
  }
}

static struct chat *chat_new(struct gateway *gw, struct httpd_req *req, const char *route,
                             const char *upstream_path) {
  struct chat *c = gw->chat_pool;
  if (c) {
    gw->chat_pool = c->next_pooled;
    gw->chat_pool_count--;
    zg_buf_reset(&c->response);
    memset(&c->gw, 0, sizeof(*c) - offsetof(struct chat, gw));
  } else {
    c = calloc(1, sizeof(*c));
  }
  if (!c) {
    httpd_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  c->gw = gw;
  c->req = req;
  c->route = route;
  c->attempts = c->inline_attempts;
  c->method = httpd_req_method(req);
  copy_cut(c->upstream_path, sizeof(c->upstream_path), upstream_path);
  return c;
}

static void hold_timer_closed(uv_handle_t *h) {
  free(h);
}

static void stop_hold(struct chat *c) {
  if (c->hold_timer) {
    uv_close((uv_handle_t *)c->hold_timer, hold_timer_closed);
    c->hold_timer = NULL;
  }
}

static void proceed_local(struct chat *c);
static void decide_route(struct chat *c);

static void on_hold_tick(uv_timer_t *t) {
  struct chat *c = t->data;
  decide_route(c);
}

static void proceed_forward(struct chat *c, const char *forward_to) {
  size_t body_len;
  const char *body = httpd_req_body(c->req, &body_len);
  c->forwarding = true;
  const char *auth = httpd_req_header(c->req, "Authorization");
  if (c->forwarded_auth) zg_secret_free(c->forwarded_auth);
  c->forwarded_auth = strndup(auth ? auth : "", 1023);
  struct attempt *a = new_attempt(c);
  if (!a || !c->forwarded_auth) {
    respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
    return;
  }
  snprintf(a->url, sizeof(a->url), "http://%s/v1%s", forward_to, c->upstream_path);
  snprintf(a->upstream_id, sizeof(a->upstream_id), "active");
  if (body_len) {
    /* Borrowed: the request lives until it is answered. */
    c->body = body;
    c->body_owned = false;
    c->body_len = body_len;
  }
  /* Only the stream flag matters here; the active node checks the rest. */
  const char *stream = body_len ? strstr(body, "\"stream\"") : NULL;
  if (stream) {
    stream += 8;
    while (*stream == ' ' || *stream == ':') stream++;
    c->stream = strncmp(stream, "true", 4) == 0;
  }
  start_attempt(c);
}

/* Serve here, forward to the active node, wait for one, or refuse. */
static void decide_route(struct chat *c) {
  struct gateway *gw = c->gw;
  if (!gw->cluster || !gw->cluster->serve_mode) {
    proceed_local(c);
    return;
  }
  bool forwarded = httpd_req_header(c->req, "X-Zonegate-Forwarded") != NULL;
  char forward_to[160] = "";
  enum gateway_serve_mode mode =
      gw->cluster->serve_mode(gw->cluster->ud, forwarded, forward_to, sizeof(forward_to));
  if (mode == GATEWAY_HOLD && !c->hold_deadline_ms)
    c->hold_deadline_ms = zg_mono_ms() + gw->cluster->hold_timeout_ms;
  if (mode == GATEWAY_HOLD && zg_mono_ms() < c->hold_deadline_ms) {
    if (!c->hold_timer) {
      c->hold_timer = malloc(sizeof(*c->hold_timer));
      if (!c->hold_timer) {
        respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
        return;
      }
      uv_timer_init(gw->loop, c->hold_timer);
      c->hold_timer->data = c;
      httpd_req_set_abort(c->req, on_client_abort, c);
    }
    uv_timer_start(c->hold_timer, on_hold_tick, 10, 0);
    return;
  }
  stop_hold(c);
  if (mode == GATEWAY_SERVE) {
    proceed_local(c);
    return;
  }
  if (mode == GATEWAY_FORWARD && !forwarded && forward_to[0]) {
    proceed_forward(c, forward_to);
    return;
  }
  const char *retry[] = {"Retry-After: 1", NULL};
  respond_error(c, 503, "service_unavailable", "no_active_node", retry,
                forwarded ? "this node is not active; a forwarded request is never forwarded again"
                          : "no active node is available right now; retry shortly",
                "not_active");
}

/* Forwarding failed before anything was sent: forget the forward and
 * decide again shortly (the hold deadline still bounds the wait). */
static void retry_route_later(struct chat *c) {
  c->forwarding = false;
  for (size_t i = 0; i < c->n_attempts; i++) zg_secret_free(c->attempts[i].api_key);
  c->n_attempts = 0;
  c->current = 0;
  if (c->body_owned) free((char *)c->body);
  c->body = NULL;
  c->body_owned = false;
  c->body_len = 0;
  if (!c->hold_deadline_ms) c->hold_deadline_ms = zg_mono_ms() + c->gw->cluster->hold_timeout_ms;
  if (zg_mono_ms() >= c->hold_deadline_ms) {
    const char *retry[] = {"Retry-After: 1", NULL};
    respond_error(c, 503, "service_unavailable", "no_active_node", retry,
                  "no active node is reachable right now; retry shortly", "not_active");
    return;
  }
  if (!c->hold_timer) {
    c->hold_timer = malloc(sizeof(*c->hold_timer));
    if (!c->hold_timer) {
      respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
      return;
    }
    uv_timer_init(c->gw->loop, c->hold_timer);
    c->hold_timer->data = c;
  }
  httpd_req_set_abort(c->req, on_client_abort, c);
  uv_timer_start(c->hold_timer, on_hold_tick, 20, 0);
}

void gateway_handle_chat(struct gateway *gw, struct httpd_req *req) {
  struct chat *c = chat_new(gw, req, "/v1/chat/completions", "/chat/completions");
  if (c) decide_route(c);
}

/* Asks the limiter for an upstream slot. When the answer comes at once,
 * on_slot has already run and may have answered and freed c: c is touched
 * only when the request was queued (a waiter came back). */
static void wait_for_slot(struct chat *c) {
  struct httpd_req *req = c->req;
  struct limiter_waiter *waiter = limiter_acquire(c->gw->limiter, on_slot, c);
  if (!waiter) return;
  c->waiter = waiter;
  httpd_req_set_abort(req, on_client_abort, c);
}

/* Local serve: the provider keys / endpoints to try, then an upstream
 * slot. */
static void send_upstream(struct chat *c) {
  if (c->gw->n_endpoints == 0) {
    respond_error(c, 502, "upstream_error", "no_endpoint", NULL,
                  "no upstream endpoint is configured (set \"endpoint\" in the config)",
                  "no_endpoint");
    return;
  }
  build_attempts(c);
  wait_for_slot(c);
}

static void proceed_local(struct chat *c) {
  struct gateway *gw = c->gw;
  struct httpd_req *req = c->req;
  if (strcmp(c->upstream_path, "/models") == 0) {
    if (gateway_authenticate(gw, req, &c->token) != 0) {
      chat_free(c);
      return;
    }
    c->has_token = c->token.name[0] != '\0';
    send_upstream(c);
    return;
  }
  size_t body_len;
  const char *body = httpd_req_body(req, &body_len);
  cJSON *json = NULL;
  if (gateway_authenticate(gw, req, &c->token) != 0) {
    chat_free(c);
    return;
  }
  c->has_token = c->token.name[0] != '\0';
  const char *error_ptr = NULL;
  json = body_len ? cJSON_ParseWithLengthOpts(body, body_len, &error_ptr, 0) : NULL;
  if (json) { /* trailing bytes after the JSON value are an error too */
    const char *rest = error_ptr ? error_ptr : body + body_len;
    while (rest < body + body_len &&
           (*rest == ' ' || *rest == '\n' || *rest == '\r' || *rest == '\t'))
      rest++;
    if (rest < body + body_len) {
      cJSON_Delete(json);
      json = NULL;
      error_ptr = rest;
    }
  }
  if (!json) {
    char msg[256];
    if (!body_len)
      snprintf(msg, sizeof(msg),
               "the request body is empty; expected a JSON object with \"messages\"");
    else
      snprintf(msg, sizeof(msg), "the request body is not valid JSON (error at byte %ld)",
               error_ptr ? (long)(error_ptr - body) : 0L);
    respond_error(c, 400, "invalid_request_error", "invalid_json", NULL, msg, "bad_request");
    return;
  }
  const cJSON *messages = cJSON_GetObjectItemCaseSensitive(json, "messages");
  const cJSON *stream = cJSON_GetObjectItemCaseSensitive(json, "stream");
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(json, "model");
  const char *problem = NULL;
  if (!cJSON_IsObject(json))
    problem = "the request body must be a JSON object";
  else if (!cJSON_IsArray(messages) || cJSON_GetArraySize(messages) == 0)
    problem = "\"messages\" must be a non-empty array";
  else if (stream && !cJSON_IsBool(stream))
    problem = "\"stream\" must be true or false";
  else if (model && !cJSON_IsString(model))
    problem = "\"model\" must be a string";
  if (problem) {
    cJSON_Delete(json);
    respond_error(c, 400, "invalid_request_error", "invalid_request", NULL, problem, "bad_request");
    return;
  }
  c->stream = cJSON_IsTrue(stream);
  bool added_default = false;
  {
    /* Model defaults fill only what the client left out. */
    if (gw->cfg->has_temperature && !cJSON_GetObjectItemCaseSensitive(json, "temperature")) {
      cJSON_AddNumberToObject(json, "temperature", gw->cfg->temperature);
      added_default = true;
    }
    if (gw->cfg->has_top_p && !cJSON_GetObjectItemCaseSensitive(json, "top_p")) {
      cJSON_AddNumberToObject(json, "top_p", gw->cfg->top_p);
      added_default = true;
    }
    c->cacheable = gw->cfg->cache_size_bytes > 0 &&
                   response_cache_cacheable(json, gw->cfg->cache_all_temperatures) &&
                   response_cache_key(json, "default", c->cache_key) == 0;
  }
  if (added_default) {
    char *printed = cJSON_PrintUnformatted(json);
    c->body = printed;
    c->body_owned = printed != NULL;
    c->body_len = printed ? strlen(printed) : 0;
  } else {
    /* Nothing to add: the client's own bytes go upstream as they came
     * (borrowed; the request lives until it is answered). */
    c->body = body;
    c->body_owned = false;
    c->body_len = body_len;
  }
  cJSON_Delete(json);
  if (c->cacheable) {
    const char *cached;
    size_t cached_len;
    int status;
    const char *ctype;
    if (response_cache_get(gw->cache, c->cache_key, &cached, &cached_len, &status, &ctype)) {
      const char *extra[] = {"X-Cache: HIT", NULL};
      note_fields(c, "hit", NULL, 0, 0);
      httpd_respond(req, status, ctype, extra, cached, cached_len);
      chat_done(c);
      return;
    }
  }
  send_upstream(c);
}

void gateway_handle_models(struct gateway *gw, struct httpd_req *req) {
  struct chat *c = chat_new(gw, req, "/v1/models", "/models");
  if (!c) return;
  c->method = "GET";
  decide_route(c);
}

static void endpoint_set(struct gateway_endpoint *ep, const char *url, const char *key_spec,
                         const char *upstream_id) {
  size_t len = strlen(url);
  while (len > 0 && url[len - 1] == '/') len--;
  /* "https://api.example.com" → ".../v1/chat/completions";
   * "https://api.example.com/v1" → the same, not /v1/v1. */
  if (len >= 3 && strncmp(url + len - 3, "/v1", 3) == 0) len -= 3;
  snprintf(ep->base_url, sizeof(ep->base_url), "%.*s/v1", (int)len, url);
  snprintf(ep->upstream_id, sizeof(ep->upstream_id), "%s", upstream_id);
  ep->api_key = NULL;
  if (key_spec && key_spec[0]) {
    char err[256];
    if (zg_secret_resolve(key_spec, &ep->api_key, NULL, err, sizeof(err)) != 0)
      zg_log(ZG_WARN, "api_key_unresolved", "%s: %s", upstream_id, err);
  }
}

void gateway_free_endpoints(struct gateway *gw) {
  for (size_t i = 0; i < gw->n_endpoints; i++) zg_secret_free(gw->endpoints[i].api_key);
  gw->n_endpoints = 0;
}

void gateway_reload_endpoints(struct gateway *gw) {
  gateway_free_endpoints(gw);
  const struct zg_config *cfg = gw->cfg;
  if (!cfg->endpoint[0]) return;
  endpoint_set(&gw->endpoints[gw->n_endpoints++], cfg->endpoint, cfg->api_key, "default");
  for (size_t i = 0; i < cfg->n_fallbacks; i++) {
    char id[16];
    snprintf(id, sizeof(id), "fallback-%u", (unsigned)(i + 1) % 100u);
    endpoint_set(&gw->endpoints[gw->n_endpoints++], cfg->fallbacks[i].endpoint,
                 cfg->fallbacks[i].api_key, id);
  }
}
