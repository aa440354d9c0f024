/* chat.c: the proxy for every OpenAI endpoint under /v1/ (chat
 * completions, responses, embeddings, completions, moderations, models,
 * audio, files, ...).
 *
 * Happy path: authenticate → one strict parse of a JSON body (body.c; other
 * bodies pass as bytes) → for chat completions: check it, splice in the
 * model defaults the client left out, cache lookup → wait for an upstream
 * slot → send upstream with the provider key, the client's other
 * end-to-end headers and its body bytes → pass the answer back: status,
 * end-to-end headers and body as they came (an event stream chunk by chunk,
 * event by event; once it flows and the upstream no longer reads the
 * request body, that body is freed: release_body) → cache it when allowed.
 *
 * Failure modes, each answered in OpenAI's error shape: 400 malformed
 * body, 401 token, 429 no slot in time (Retry-After), 502 upstream
 * unreachable, 504 upstream timeout. Connect failures and 5xx answers
 * before the first byte reaches the client move on to the next provider
 * key / fallback endpoint; an upstream 401 retires a key only when a probe
 * without client data is refused too (see the key check below). A stream
 * that breaks after it started ends with an error event on an event
 * boundary and an incomplete HTTP response, never a clean finish. A
 * client that disconnects cancels its upstream transfer.
 *
 * In a cluster, a standby forwards the request to the active node (see
 * decide_route). While no active is known, or the one it forwarded to is
 * unreachable or answers 503 before anything reached the client, it holds
 * the request and decides again (every 10 ms while no active is known,
 * 20 ms after a failed forward) until the cluster's hold_timeout_ms, then
 * answers 503 no_active_node. The deadline and the retry timer are base's
 * zg_hold (allocated only once a request waits); a held request logs
 * upstream_failed at WARN once and its retries at DEBUG.
 */
#define _GNU_SOURCE /* memmem */
#include "gateway/body.h"
#include "gateway/routes.h"
#include "gateway/sse.h"
#include "gateway/usage.h"
#include "gateway/internal.h"

#include <openssl/evp.h>
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
/* An answer larger than this is passed through as it arrives instead of
 * being held whole (raw_pass); the last PASSTHROUGH_TAIL bytes are kept
 * for its usage object. */
#define PASSTHROUGH_AFTER (1024u * 1024u)
#define PASSTHROUGH_TAIL (64u * 1024u)
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

/* Longest path + query (after "/v1") passed upstream; longer is a 414. */
#define UPSTREAM_PATH_MAX 2048
/* The upstream path and each attempt's URL are held inside struct chat up
 * to these lengths (NUL included), longer ones on the heap: a chat lives
 * as long as its stream, so its size is memory per open stream. */
#define UPSTREAM_PATH_INLINE 128
#define ATTEMPT_URL_INLINE 192
/* End-to-end headers of an upstream answer passed to the client. */
#define MAX_RESPONSE_HEADERS 64

struct attempt {
  size_t base_len; /* attempt_url()[0..base_len) is the endpoint's base (".../v1") */
  char upstream_id[64];
  char key_id[48];
  char *api_key;   /* owned */
  char model[128]; /* routing: the upstream's model name, "" = the client's */
  char *body;      /* owned: c->body with the model rewritten (NULL = c->body) */
  size_t body_len;
  char *url_heap; /* owned: the URL when it does not fit url_inline, else NULL */
  /* Last: new_attempt zeroes only what comes before it (a string, NUL-terminated). */
  char url_inline[ATTEMPT_URL_INLINE];
};

/* The attempt's upstream URL (set by attempt_store_url). */
static const char *attempt_url(const struct attempt *a) {
  return a->url_heap ? a->url_heap : a->url_inline;
}

/* Sets the attempt's URL to x[0..xlen) followed by y[0..ylen). 0, or -1
 * out of memory (the URL is then ""). */
static int attempt_store_url(struct attempt *a, const char *x, size_t xlen, const char *y,
                             size_t ylen) {
  free(a->url_heap);
  a->url_heap = NULL;
  char *url = a->url_inline;
  if (xlen + ylen >= sizeof(a->url_inline)) {
    url = a->url_heap = malloc(xlen + ylen + 1);
    if (!url) {
      a->url_inline[0] = '\0';
      return -1;
    }
  }
  memcpy(url, x, xlen);
  memcpy(url + xlen, y, ylen);
  url[xlen + ylen] = '\0';
  return 0;
}

struct chat {
  /* Kept while the chat sits in the gateway's pool (capacity reused). */
  zg_buf response;
  zg_buf response_headers; /* end-to-end upstream headers, "Name: value\0" each */
  /* SSE passthrough: bytes after the last event boundary are held back
   * until the event is complete, so an error event after a broken stream
   * always starts on a boundary (never glued to half an event). */
  zg_buf sse_partial;
  struct chat *next_pooled;
  /* Per request: chat_new zeroes everything from here on. */
  struct gateway *gw;
  struct httpd_req *req;
  const char *route;
  bool chat;                  /* POST /v1/chat/completions */
  bool json_body;             /* the body was parsed as JSON (and has no Content-Type of its own) */
  char model[128];            /* the request's "model" (unescaped), "" when none */
  bool routed;                /* the models table decides the upstream (routes.h) */
  bool model_bad;             /* \"model\" is a string no model can have (NUL inside, too long) */
  size_t model_at, model_len; /* the "model" value's bytes in c->body (routing) */
  bool account;               /* usage is read from the answer and counted (accounting.h) */
  bool strip_usage;           /* the gateway asked the stream for usage: remove it again */
  struct usage_counts usage;
  const char *method;
  /* Request body sent upstream: owned (body_owned) when it was re-printed
   * with model defaults or copied for forwarding, else it points into the
   * client request's body, which httpd keeps until the request is answered
   * (after which c->body is never read). Released (NULL) once a stream is
   * under way and the upstream transfer is done with it (release_body). */
  const char *body;
  bool body_owned;
  bool body_released;
  size_t body_len;
  bool stream;
  bool cacheable;
  uint8_t cache_key[32];
  /* The client token's name (the rest of struct gateway_token is checked
   * by gateway_authenticate and not kept: a chat lives as long as its
   * stream). */
  char token_name[sizeof(((struct gateway_token *)0)->name)];
  bool has_token;
  char *forwarded_auth;  /* client Authorization when forwarding to the active (owned) */
  char forward_node[64]; /* forwarding over mutual TLS: the active's node id */
  bool forwarding;
  struct limiter_waiter *waiter;
  /* Waiting for an active node (GATEWAY_HOLD) or for a new one after a
   * failed forward: the cluster's hold_timeout_ms (zeroed by chat_new: a
   * stopped hold; set up only with a cluster, allocates only when used). */
  struct zg_hold hold;
  bool holds_slot;
  bool forward_fail_logged; /* one upstream_failed WARN per held request */
  struct upstream_transfer *transfer;
  /* Upstream 401 with a provider key: the key is checked by a probe that
   * carries nothing of the client's (see on_upstream_done). */
  bool check_key;       /* the 401 being buffered needs a probe */
  bool key_invalidated; /* this request already retired one key */
  struct upstream_transfer *probe;
  int probe_status;
  struct attempt *attempts; /* inline_attempts, or a heap array of MAX_ATTEMPTS */
  size_t n_attempts, current;
  /* response */
  int status;
  char content_type[128];
  size_t n_response_headers; /* lines in response_headers */
  struct sse_cursor sse;     /* where the passed-through event stream stands */
  bool drop_next_lf;         /* a dropped usage chunk ended on CR: its LF, when next, goes too */
  bool streaming_to_client;
  bool raw_passthrough; /* a large non-stream answer, passed through (raw_pass) */
  bool finished;
  /* After "/v1": "/chat/completions?x=1"; upstream_path_inline, or owned
   * when longer. */
  char *upstream_path;
  /* The large buffers last: chat_new zeroes only what comes before them
   * (less memset per request); upstream_path_inline is set by chat_new,
   * and each attempt is zeroed by new_attempt. */
  char upstream_path_inline[UPSTREAM_PATH_INLINE];
  struct attempt inline_attempts[INLINE_ATTEMPTS];
};

/* strlen(s), at most max. */
static size_t bounded_len(const char *s, size_t max) {
  size_t len = 0;
  while (len < max && s[len]) len++;
  return len;
}

/* Releases what the request owns; the struct goes back to the gateway's
 * pool (its response buffer kept when small), or is freed. */
static void chat_free(struct chat *c) {
  struct gateway *gw = c->gw;
  zg_hold_stop(&c->hold);
  if (c->probe) upstream_cancel(c->probe);
  c->probe = NULL;
  for (size_t i = 0; i < c->n_attempts; i++) {
    zg_secret_free(c->attempts[i].api_key);
    free(c->attempts[i].body);
    free(c->attempts[i].url_heap);
  }
  if (c->attempts != c->inline_attempts) free(c->attempts);
  if (c->body_owned) free((char *)c->body);
  if (c->forwarded_auth) zg_secret_free(c->forwarded_auth);
  if (c->upstream_path != c->upstream_path_inline) free(c->upstream_path);
  c->upstream_path = NULL;
  if (c->response.cap > CHAT_POOLED_RESPONSE_MAX) zg_buf_free(&c->response);
  if (c->response_headers.cap > CHAT_POOLED_RESPONSE_MAX) zg_buf_free(&c->response_headers);
  if (c->sse_partial.cap > CHAT_POOLED_RESPONSE_MAX) zg_buf_free(&c->sse_partial);
  if (gw->chat_pool_count + 1 <= CHAT_POOL_SIZE) {
    c->next_pooled = gw->chat_pool;
    gw->chat_pool = c;
    gw->chat_pool_count++;
    return;
  }
  zg_buf_free(&c->response);
  zg_buf_free(&c->response_headers);
  zg_buf_free(&c->sse_partial);
  free(c);
}

void gateway_free_chat_pool(struct gateway *gw) {
  while (gw->chat_pool) {
    struct chat *c = gw->chat_pool;
    gw->chat_pool = c->next_pooled;
    zg_buf_free(&c->response);
    zg_buf_free(&c->response_headers);
    zg_buf_free(&c->sse_partial);
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
  memset(a, 0, offsetof(struct attempt, url_inline));
  a->url_inline[0] = '\0';
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
  if (c->has_token) zg_copy_cut(f->token, sizeof(f->token), c->token_name);
  f->has_upstream = c->n_attempts > 0;
  if (c->n_attempts > 0) {
    struct attempt *a = &c->attempts[c->current < c->n_attempts ? c->current : c->n_attempts - 1];
    zg_copy_cut(f->upstream, sizeof(f->upstream), a->upstream_id);
    zg_copy_cut(f->key_id, sizeof(f->key_id), a->key_id);
    f->attempts = (unsigned)(c->current + 1);
  }
  zg_copy_cut(f->upstream_result, sizeof(f->upstream_result), result ? result : "");
  f->upstream_us = upstream_us;
  f->ttfb_us = ttfb_us;
}

/* The request has been answered (httpd owns and frees it); free ours. */
static void chat_done(struct chat *c) {
  release_slot(c);
  chat_free(c);
}

/* A node's own "not active here" answer carries this header, so that a
 * standby tells it from a 503 the model provider gave the active. */
#define NODE_REFUSAL_HEADER "X-Zonegate-Refused: not_active"

static bool refused_by_node(const char *const *headers) {
  for (size_t i = 0; headers && headers[i]; i++)
    if (strncasecmp(headers[i], "X-Zonegate-Refused:", 19) == 0) return true;
  return false;
}

static void respond_error(struct chat *c, int status, const char *type, const char *code,
                          const char *const *headers, const char *message, const char *result) {
  note_fields(c, "none", result, 0, 0);
  httpd_req_set_abort(c->req, NULL, NULL);
  httpd_respond_error(c->req, status, type, code, headers, "%s", message);
  chat_done(c);
}

/* This node can neither serve nor forward the request, and has sent it
 * nowhere. Behind a trusted load balancer (a PROXY header or
 * X-Forwarded-For from listen.trusted_proxies) the connection closes
 * without a response byte, which the LB reads as "send it to another
 * server" (deploy/haproxy.cfg: retry-on empty-response; nginx.conf:
 * proxy_next_upstream error): a 503 it could only retry by status, and so
 * re-send a model provider's 503 too. Anyone else (a client, a standby
 * forwarding to us) gets the 503 with X-Zonegate-Refused. */
static void close_for_lb_retry(struct chat *c) {
  note_fields(c, "none", "closed_for_lb_retry", 0, 0);
  httpd_req_set_abort(c->req, NULL, NULL);
  httpd_req_close_unanswered(c->req);
  chat_done(c);
}

static void refuse_here(struct chat *c, const char *code, const char *const *headers,
                        const char *message, const char *result) {
  if (gateway_request_via_lb(c->req)) {
    close_for_lb_retry(c);
    return;
  }
  respond_error(c, 503, "service_unavailable", code, headers, message, result);
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

/* ---- headers: what passes, each way ----------------------------------
 *
 * RFC 9110 §7.6.1: a proxy removes the hop-by-hop headers and every header
 * the Connection header names; end-to-end headers pass. Also not passed:
 * framing (Content-Length, Transfer-Encoding: each hop frames its own),
 * cookies, X-Zonegate-* (internal), and towards the upstream the client's
 * credentials (replaced by the provider key) and Accept-Encoding (the
 * gateway asks for identity and decodes what comes encoded anyway). */

struct header_name {
  const char *name;
  size_t len;
};
#define HEADER_NAME(s)                                                                             \
  { s, sizeof(s) - 1 }

/* True when name[0..len) is one of table[0..n) (case-insensitive). The
 * lengths are compared first: most names are ruled out without a call. */
static bool name_in(const struct header_name *table, size_t n, const char *name, size_t len) {
  for (size_t i = 0; i < n; i++)
    if (table[i].len == len && strncasecmp(name, table[i].name, len) == 0) return true;
  return false;
}

/* name[0..len) is a hop-by-hop header (RFC 9110 §7.6.1). */
static bool is_hop_by_hop(const char *name, size_t len) {
  static const struct header_name names[] = {
      HEADER_NAME("connection"), HEADER_NAME("keep-alive"),      HEADER_NAME("te"),
      HEADER_NAME("trailer"),    HEADER_NAME("trailers"),        HEADER_NAME("transfer-encoding"),
      HEADER_NAME("upgrade"),    HEADER_NAME("proxy-connection")};
  return name_in(names, ZG_ARRAY_LEN(names), name, len);
}

/* True when the comma-separated token list `list` names name[0..len). */
static bool list_names(const char *list, const char *name, size_t len) {
  while (list && *list) {
    while (*list == ' ' || *list == '\t' || *list == ',') list++;
    size_t n = strcspn(list, ", \t");
    if (n == len && n && strncasecmp(list, name, len) == 0) return true;
    list += n;
  }
  return false;
}

/* line is a "Connection: ..." header line. */
static bool is_connection_line(const char *line) {
  return (line[0] | 0x20) == 'c' && strncasecmp(line, "Connection:", 11) == 0;
}

/* Connection lines looked at apart; with more than this many in one
 * answer, every line is looked for again for each header. */
#define MAX_CONNECTION_LINES 8

/* The upstream's answer headers the client gets: end-to-end ones, minus
 * what the gateway writes itself (Content-Type is passed separately;
 * Content-Length and Date/Server are the gateway's own; Content-Encoding
 * is gone because the body arrives decoded). Kept in c->response_headers. */
static void keep_response_headers(struct chat *c, const char *const *headers) {
  static const struct header_name own[] = {HEADER_NAME("content-length"),
                                           HEADER_NAME("content-type"),
                                           HEADER_NAME("content-encoding"),
                                           HEADER_NAME("date"),
                                           HEADER_NAME("server"),
                                           HEADER_NAME("set-cookie"),
                                           HEADER_NAME("proxy-authenticate"),
                                           HEADER_NAME("proxy-authorization")};
  zg_buf_reset(&c->response_headers);
  c->n_response_headers = 0;
  /* every Connection line counts: several lines are one list (RFC 9110
   * §5.3); found once, not once per header */
  const char *lists[MAX_CONNECTION_LINES];
  size_t n_lists = 0;
  bool many_lists = false;
  for (size_t k = 0; headers && headers[k]; k++)
    if (is_connection_line(headers[k])) {
      if (n_lists == MAX_CONNECTION_LINES) {
        many_lists = true;
        break;
      }
      lists[n_lists++] = headers[k] + 11;
    }
  for (size_t i = 0; headers && headers[i] && c->n_response_headers < MAX_RESPONSE_HEADERS; i++) {
    const char *line = headers[i];
    size_t len = strcspn(line, ":");
    if (!line[len] || len == 0) continue;
    bool named = false;
    if (many_lists) {
      for (size_t k = 0; headers[k] && !named; k++)
        if (is_connection_line(headers[k])) named = list_names(headers[k] + 11, line, len);
    } else {
      for (size_t k = 0; k < n_lists && !named; k++) named = list_names(lists[k], line, len);
    }
    bool drop = named || is_hop_by_hop(line, len) || name_in(own, ZG_ARRAY_LEN(own), line, len);
    if (!drop && c->cacheable && len == 7 && strncasecmp(line, "x-cache", 7) == 0)
      drop = true; /* the gateway's own X-Cache tells this cache's story */
    if (!drop && !c->forwarding && len >= 11 && strncasecmp(line, "x-zonegate-", 11) == 0)
      drop = true; /* only our own nodes speak for zonegate */
    if (drop) continue;
    if (zg_buf_append(&c->response_headers, line, len + strlen(line + len) + 1) != 0) break;
    c->n_response_headers++;
  }
}

/* out: the kept response headers, then `extra` (may be NULL), then NULL.
 * out has room for MAX_RESPONSE_HEADERS + 2 pointers. */
static void response_header_list(struct chat *c, const char **out, const char *extra) {
  size_t n = 0, at = 0;
  for (size_t i = 0; i < c->n_response_headers; i++) {
    out[n++] = c->response_headers.data + at;
    at += strlen(c->response_headers.data + at) + 1;
  }
  if (extra) out[n++] = extra;
  out[n] = NULL;
}

/* ---- provider-key check after an upstream 401 ------------------------
 *
 * An upstream 401 marks a provider key invalid only when a probe that
 * carries nothing of the client's (GET <endpoint>/models with the key
 * alone) is refused too; then this request goes on with the next usable
 * key. At most one key is retired (cluster-wide) per client request; a
 * second key the probe finds bad in the same request is skipped, not
 * retired, and the next request retires it. When the probe succeeds the
 * 401 was the request's own doing and the client gets the upstream's
 * answer as it came. A probe's verdict is kept for KEY_GOOD_MS, so 401s a
 * client provokes cost at most one probe per key in that window, and a key
 * found bad is not tried again meanwhile. A probe that fails for another
 * reason retires nothing. */
#define KEY_GOOD_MS 30000u
#define KEY_PROBE_TIMEOUT_MS 10000u

static void key_ident(const struct attempt *a, char *out, size_t size) {
  snprintf(out, size, "%s/%s", a->upstream_id, a->key_id);
}

/* The last probe verdict on a key within KEY_GOOD_MS: 1 good, -1 bad, 0
 * none. */
static int key_verdict(struct gateway *gw, const struct attempt *a) {
  char id[sizeof(gw->key_good[0].id)];
  key_ident(a, id, sizeof(id));
  uint64_t now = zg_mono_ms();
  for (size_t i = 0; i < ZG_ARRAY_LEN(gw->key_good); i++)
    if (gw->key_good[i].until_ms > now && strcmp(gw->key_good[i].id, id) == 0)
      return gw->key_good[i].good ? 1 : -1;
  return 0;
}

static bool key_recently_good(struct gateway *gw, const struct attempt *a) {
  return key_verdict(gw, a) > 0;
}

static void key_mark(struct gateway *gw, const struct attempt *a, bool good) {
  char id[sizeof(gw->key_good[0].id)];
  key_ident(a, id, sizeof(id));
  size_t slot = gw->key_good_next++ % ZG_ARRAY_LEN(gw->key_good);
  for (size_t i = 0; i < ZG_ARRAY_LEN(gw->key_good); i++)
    if (strcmp(gw->key_good[i].id, id) == 0) slot = i; /* one entry per key */
  memcpy(gw->key_good[slot].id, id, sizeof(id));
  gw->key_good[slot].good = good;
  gw->key_good[slot].until_ms = zg_mono_ms() + KEY_GOOD_MS;
}

static void answer_buffered(struct chat *c);
static void respond_buffered(struct chat *c);
static void on_client_abort(void *ud);

static void on_probe_response(void *ud, int status, const char *content_type,
                              const char *const *headers) {
  struct chat *c = ud;
  c->probe_status = status;
}

static int on_probe_data(void *ud, const char *data, size_t len) {
  return 0; /* the probe's body is not needed */
}

static void on_probe_done(void *ud, enum upstream_result result, const char *curl_error) {
  struct chat *c = ud;
  struct gateway *gw = c->gw;
  struct attempt *a = &c->attempts[c->current];
  c->probe = NULL;
  httpd_req_set_abort(c->req, NULL, NULL);
  c->check_key = false;
  if (result == UPSTREAM_OK && c->probe_status == 401) {
    /* The key itself is refused: retire it (one per request) and go on. */
    key_mark(gw, a, false);
    if (!c->key_invalidated) {
      c->key_invalidated = true;
      zg_log(ZG_WARN, "upstream_key_invalid",
             "upstream %s refused provider key %s (confirmed by a probe without client data)",
             a->upstream_id, a->key_id[0] ? a->key_id : "(config api_key)");
      if (gw->cluster && gw->cluster->key_rejected && a->key_id[0])
        gw->cluster->key_rejected(gw->cluster->ud, a->key_id, a->upstream_id);
    }
    while (have_next_attempt(c)) {
      c->current++;
      if (key_verdict(gw, &c->attempts[c->current]) < 0) continue; /* found bad lately */
      start_attempt(c);
      return;
    }
    respond_error(c, 502, "upstream_error", "upstream_key_invalid", NULL,
                  "the upstream refused the gateway's provider key and no other usable key is "
                  "configured (operators: zonegate keys add)",
                  "key_invalid");
    return;
  }
  if (result == UPSTREAM_OK && c->probe_status >= 200 && c->probe_status < 300)
    key_mark(gw, a, true);
  else
    zg_log(ZG_INFO, "upstream_key_probe_inconclusive",
           "upstream %s key %s: probe %s status %d; key kept", a->upstream_id,
           a->key_id[0] ? a->key_id : "(config api_key)", upstream_result_name(result),
           c->probe_status);
  respond_buffered(c);
}

static void start_key_probe(struct chat *c) {
  struct gateway *gw = c->gw;
  struct attempt *a = &c->attempts[c->current];
  char url[sizeof(((struct gateway_endpoint *)0)->base_url) + 8];
  snprintf(url, sizeof(url), "%.*s/models", (int)a->base_len, attempt_url(a));
  char auth[1100];
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", a->api_key);
  const char *headers[] = {auth, "Accept: application/json", NULL};
  struct upstream_request ureq = {0};
  ureq.url = url;
  ureq.method = "GET";
  ureq.headers = headers;
  ureq.timeouts.connect_ms = gw->cfg->connect_timeout_ms;
  ureq.timeouts.first_byte_ms = gw->cfg->first_byte_timeout_ms;
  ureq.timeouts.total_ms = KEY_PROBE_TIMEOUT_MS;
  ureq.curl_only = strcmp(gw->cfg->upstream_client, "curl") == 0;
  static const struct upstream_callbacks callbacks = {on_probe_response, on_probe_data,
                                                      on_probe_done};
  char err[256];
  c->probe_status = 0;
  int rc = upstream_start(gw->upstream, &ureq, &callbacks, c, &c->probe, err, sizeof(err));
  OPENSSL_cleanse(auth, sizeof(auth));
  if (rc != 0) {
    c->check_key = false;
    respond_buffered(c);
    return;
  }
  httpd_req_set_abort(c->req, on_client_abort, c);
}

static void on_upstream_response(void *ud, int status, const char *content_type,
                                 const char *const *headers) {
  struct chat *c = ud;
  struct attempt *a = &c->attempts[c->current];
  c->status = status;
  zg_copy_cut(c->content_type, sizeof(c->content_type),
              content_type ? content_type : "application/json");
  keep_response_headers(c, headers);

  if (c->forwarding && status == 503 && gw_has_cluster(c) && refused_by_node(headers)) {
    /* The node we forwarded to is not active (any more): nothing reached the
     * client yet, so decide again within the hold deadline. A 503 without
     * the marker is the model provider's, already tried on every key by
     * the active: it goes to the client (sending it again would call the
     * provider again, and bill it). */
    upstream_cancel(c->transfer);
    c->transfer = NULL;
    retry_route_later(c);
    return;
  }
  bool retry = false;
  c->check_key = false;
  if (status == 401 && !c->forwarding) {
    /* Whose fault is it? Something the client sent (a header naming an
     * organization the key does not belong to, ...) or the key itself. The
     * answer is buffered; on_upstream_done decides once it is complete. */
    metrics_counter_add(c->gw->m_upstream_errors, 1, a->upstream_id, "unauthorized");
    c->check_key = a->api_key && a->api_key[0] && !key_recently_good(c->gw, a);
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
  /* An event stream passes through as it arrives; any other answer
   * (JSON, an error, JSON to a stream request) is buffered and sent whole
   * with its own Content-Type. */
  if (status >= 200 && status < 300 && strncasecmp(c->content_type, "text/event-stream", 17) == 0) {
    c->streaming_to_client = true;
    sse_cursor_init(&c->sse);
    const char *extra[MAX_RESPONSE_HEADERS + 2];
    response_header_list(c, extra, NULL);
    httpd_stream_begin(c->req, status, c->content_type, extra);
  }
}

static void on_client_drained(void *ud) {
  struct chat *c = ud;
  upstream_resume(c->transfer);
}

/* Writes whole events to the client. With accounting, each event that
 * mentions "usage" is read (and, when the gateway asked for the usage,
 * the usage chunk dropped and `"usage":null` members removed); the others
 * pass untouched. Returns 0, or 1 when the client is gone. */
static int sse_write_events(struct chat *c, const char *data, size_t len) {
  if (c->drop_next_lf) { /* the CRLF of the chunk dropped last came in two reads */
    c->drop_next_lf = false;
    if (len && data[0] == '\n') data++, len--;
    if (!len) return 0;
  }
  if (!c->account || !usage_find_name(data, len))
    return httpd_stream_write(c->req, data, len) != 0 ? 1 : 0;
  zg_buf *out = &c->gw->sse_scratch;
  zg_buf_reset(out);
  struct sse_cursor cur;
  sse_cursor_init(&cur);
  size_t at = 0;
  while (at < len) {
    size_t n = sse_next_boundary(&cur, data + at, len - at);
    if (n == 0) n = len - at;
    size_t keep;
    bool edited;
    char *edit = NULL;
    if (c->strip_usage) {
      zg_buf_reset(&c->gw->sse_edit);
      if (zg_buf_reserve(&c->gw->sse_edit, n) != 0) return 1;
      edit = c->gw->sse_edit.data;
    }
    usage_stream_event(data + at, n, c->strip_usage, &c->usage, edit, &keep, &edited);
    if (keep && zg_buf_append(out, edited ? edit : data + at, keep) != 0) return 1;
    at += n;
    /* A dropped event that ends this piece on CR: an LF that comes next
     * is that CR's (its CRLF), so it is dropped with it (sse.h). */
    c->drop_next_lf = !keep && at == len && data[len - 1] == '\r';
  }
  if (out->len == 0) return 0;
  return httpd_stream_write(c->req, out->data, out->len) != 0 ? 1 : 0;
}

/* Writes the complete events of data to the client and holds the rest.
 * Returns 0, or 1 when the client is gone. A client whose write queue is
 * full pauses its own upstream transfer until it drains. */
static int sse_pass(struct chat *c, const char *data, size_t len) {
  size_t boundary = sse_last_boundary(&c->sse, data, len);
  if (boundary == 0) /* still inside an event */
    return zg_buf_append(&c->sse_partial, data, len) == 0 ? 0 : 1;
  if (c->sse_partial.len) {
    if (zg_buf_append(&c->sse_partial, data, boundary) != 0) return 1;
    if (sse_write_events(c, c->sse_partial.data, c->sse_partial.len) != 0) return 1;
    zg_buf_reset(&c->sse_partial);
  } else if (sse_write_events(c, data, boundary) != 0) {
    return 1; /* client gone */
  }
  if (boundary < len && zg_buf_append(&c->sse_partial, data + boundary, len - boundary) != 0)
    return 1;
  if (httpd_req_write_full(c->req)) { /* slow reader: pause only its own transfer */
    httpd_req_set_drain(c->req, on_client_drained, c);
    upstream_pause(c->transfer);
  }
  return 0;
}

/* A large answer that is not an event stream goes to the client as it
 * arrives (chunked), under the same per-connection write-queue bound and
 * upstream pause as a stream: memory per client stays bounded whatever the
 * answer's size. Only the last PASSTHROUGH_TAIL bytes are kept, to read
 * the usage object (it is the last member of OpenAI's answers); the answer
 * is then not cached. Returns 0, or 1 when the client is gone. */
static int raw_pass(struct chat *c, const char *data, size_t len) {
  if (httpd_stream_write(c->req, data, len) != 0) return 1;
  if (c->account) { /* keep the tail */
    if (len >= PASSTHROUGH_TAIL) {
      zg_buf_reset(&c->response);
      zg_buf_append(&c->response, data + len - PASSTHROUGH_TAIL, PASSTHROUGH_TAIL);
    } else {
      if (c->response.len + len > PASSTHROUGH_TAIL) {
        size_t drop = c->response.len + len - PASSTHROUGH_TAIL;
        memmove(c->response.data, c->response.data + drop, c->response.len - drop);
        c->response.len -= drop;
      }
      zg_buf_append(&c->response, data, len);
    }
  }
  if (httpd_req_write_full(c->req)) {
    httpd_req_set_drain(c->req, on_client_drained, c);
    upstream_pause(c->transfer);
  }
  return 0;
}

/* An answer passing through to the client: no other attempt follows, and
 * once the upstream transfer no longer reads the request body nothing
 * does, so a long stream does not hold its prompt (the client request's
 * body, or the copies made for defaults and model routing). */
static void release_body(struct chat *c) {
  c->body_released = true;
  for (size_t i = 0; i < c->n_attempts; i++) {
    free(c->attempts[i].body);
    c->attempts[i].body = NULL;
    c->attempts[i].body_len = 0;
  }
  if (c->body_owned)
    free((char *)c->body);
  else
    httpd_req_release_body(c->req);
  c->body = NULL;
  c->body_owned = false;
  c->body_len = 0;
}

static int on_upstream_data(void *ud, const char *data, size_t len) {
  struct chat *c = ud;
  if (c->streaming_to_client) {
    int rc = c->raw_passthrough ? raw_pass(c, data, len) : sse_pass(c, data, len);
    /* After the pass, so the first chunk is not held behind the frees (a
     * long prompt's is a munmap); not when the client is gone (c may be
     * freed by then). */
    if (rc == 0 && !c->body_released && upstream_body_done(c->transfer)) release_body(c);
    return rc;
  }
  if (c->response.len + len > PASSTHROUGH_AFTER && !c->check_key) {
    /* too big to hold for one client: pass it through from here on */
    c->raw_passthrough = true;
    c->streaming_to_client = true;
    c->cacheable = false;
    const char *extra[MAX_RESPONSE_HEADERS + 2];
    response_header_list(c, extra, NULL);
    httpd_stream_begin(c->req, c->status, c->content_type, extra);
    zg_buf held = c->response;
    zg_buf_init(&c->response);
    int rc = raw_pass(c, held.data ? held.data : "", held.len);
    zg_buf_free(&held);
    return rc ? rc : raw_pass(c, data, len);
  }
  if (c->response.len + len > MAX_BUFFERED_RESPONSE) return 1;
  zg_buf_append(&c->response, data, len);
  return 0;
}

/* The model a request is counted under: a routed model's name (its
 * aliases count as the model), else the client's model while fewer than
 * MAX_MODEL_LABELS distinct ones were seen, then "other": a client
 * cannot grow the usage table or the metrics without bound by inventing
 * model names. */
#define MAX_MODEL_LABELS 256
static const char *usage_model_label(struct chat *c) {
  struct gateway *gw = c->gw;
  if (!c->model[0]) return "-";
  const struct model_route *route = c->routed ? routes_find(&gw->routes, c->model) : NULL;
  if (route) return route->name;
  for (size_t i = 0; i < gw->n_model_labels; i++)
    if (!strcmp(gw->model_labels[i], c->model)) return gw->model_labels[i];
  if (gw->n_model_labels >= MAX_MODEL_LABELS) return "other";
  if (!gw->model_labels) {
    gw->model_labels = calloc(MAX_MODEL_LABELS, sizeof(*gw->model_labels));
    if (!gw->model_labels) return "other";
  }
  char *copy = strdup(c->model);
  if (!copy) return "other";
  gw->model_labels[gw->n_model_labels++] = copy;
  return copy;
}

/* Counts the answer's usage once (accounting.h): by token, model and
 * provider key; an answer without usage counts as unknown, never guessed.
 * Only 2xx answers the upstream gave count tokens. */
static void record_usage(struct chat *c) {
  struct gateway *gw = c->gw;
  if (!c->account || !gw->accounting) return;
  c->account = false;
  if (c->status < 200 || c->status >= 300) return;
  const struct attempt *a = &c->attempts[c->current < c->n_attempts ? c->current : 0];
  const char *token = c->has_token ? c->token_name : "-";
  const char *model = usage_model_label(c);
  struct acct_counts t = {
      0, c->usage.prompt, c->usage.completion, c->usage.total, c->usage.cached, c->usage.reasoning,
      0};
  accounting_usage(gw->accounting, token, model, c->n_attempts ? a->key_id : "", c->usage.known, &t,
                   zg_wall_ms() / 1000);
  if (!c->usage.known) {
    metrics_counter_add(gw->m_tokens, 1, token, model, "unknown_requests");
    return;
  }
  metrics_counter_add(gw->m_tokens, (double)t.prompt, token, model, "prompt");
  metrics_counter_add(gw->m_tokens, (double)t.completion, token, model, "completion");
  if (t.cached) metrics_counter_add(gw->m_tokens, (double)t.cached, token, model, "cached");
  if (t.reasoning)
    metrics_counter_add(gw->m_tokens, (double)t.reasoning, token, model, "reasoning");
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
    bool key_probe = c->check_key && c->status == 401;
    if (!key_probe) {
      /* The answer first, the bookkeeping after it (the client does not
       * wait for metrics and usage): httpd frees c->req once it is
       * answered, and nothing below reads it. */
      note_fields(c, c->cacheable ? "miss" : "none", "ok", timing.total_us, timing.first_byte_us);
      if (c->streaming_to_client) {
        /* a clean end: whatever followed the last boundary goes out as is */
        if (c->sse_partial.len && !c->raw_passthrough)
          httpd_stream_write(c->req, c->sse_partial.data, c->sse_partial.len);
        httpd_stream_end(c->req);
      } else {
        answer_buffered(c);
      }
      c->req = NULL;
    }
    if (!c->forwarding) {
      metrics_histogram_observe(gw->m_upstream_latency, (double)timing.total_us / 1e6,
                                a->upstream_id);
      metrics_histogram_observe(gw->m_ttfb, (double)timing.first_byte_us / 1e6, a->upstream_id);
      if (c->status < 500) gateway_note_upstream(gw, true, NULL);
    }
    if (key_probe) {
      start_key_probe(c);
      return;
    }
    if (c->account && c->status >= 200 && c->status < 300 && !c->streaming_to_client)
      usage_from_answer(c->response.data, c->response.len, &c->usage);
    else if (c->account && c->raw_passthrough && c->status >= 200 && c->status < 300)
      usage_from_tail(c->response.data, c->response.len, &c->usage);
    record_usage(c);
    chat_done(c);
    return;
  }

  const char *kind = upstream_result_name(result);
  if (!c->forwarding) {
    metrics_counter_add(gw->m_upstream_errors, 1, a->upstream_id, kind);
    gateway_note_upstream(gw, false, kind);
  }
  bool never_sent = result == UPSTREAM_CONNECT_FAILED || result == UPSTREAM_CONNECT_TIMEOUT;
  /* The active we forwarded to was never reached (failover in progress):
   * ask the role again and wait for the next active, within the hold
   * deadline. A held request retries a gone active every 20 ms: one WARN
   * line for it, the retries at DEBUG. */
  bool held_retry = c->forwarding && never_sent && gw->cluster && !c->streaming_to_client;
  zg_log(held_retry && c->forward_fail_logged ? ZG_DEBUG : ZG_WARN, "upstream_failed",
         "%s %s: %s (%s)", c->forwarding ? "active node" : a->upstream_id, kind,
         curl_error ? curl_error : "",
         c->streaming_to_client ? "mid-stream"
         : held_retry           ? "before response; holding until a new active answers"
                                : "before response");
  if (held_retry) {
    c->forward_fail_logged = true;
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
  if (c->raw_passthrough) { /* no event stream: an incomplete response says it */
    record_usage(c);
    note_fields(c, "none", kind, timing.total_us, timing.first_byte_us);
    httpd_stream_abort(c->req);
    chat_done(c);
    return;
  }
  if (c->streaming_to_client) {
    char event[512];
    int n = snprintf(
        event, sizeof(event),
        "data: {\"error\":{\"message\":\"upstream stream failed: %s\",\"type\":\"upstream_error\","
        "\"code\":\"%s\"}}\n\n",
        kind, timeout ? "upstream_timeout" : "upstream_broken");
    record_usage(c);
    note_fields(c, "none", kind, timing.total_us, timing.first_byte_us);
    httpd_stream_write(c->req, event, (size_t)n);
    httpd_stream_abort(c->req);
    chat_done(c);
    return;
  }
  /* The active broke the forward before one byte of its answer (killed
   * with the request in flight, or an answer this node could not read).
   * Sending it again from here was tried: a request that crashes the node
   * serving it then took down the last gateway too, and an unreadable
   * answer from a live active was asked for again every 20 ms (146
   * provider calls for one request). The LB owns that choice, as for a
   * request that reached the dying active straight: its connection closes
   * unanswered (retry-on empty-response, at most `retries` more); a client
   * gets the 502. */
  if (c->forwarding && result == UPSTREAM_BROKEN && c->status == 0 &&
      gateway_request_via_lb(c->req)) {
    close_for_lb_retry(c);
    return;
  }
  char message[256];
  const char *who = c->forwarding ? "the active node" : "the upstream model API";
  if (timeout) {
    snprintf(message, sizeof(message), "%s did not answer in time (%s)", who, kind);
    respond_error(c, 504, "upstream_error", "upstream_timeout", NULL, message, kind);
  } else {
    snprintf(message, sizeof(message), "%s is unreachable or failed (%s)", who, kind);
    respond_error(c, 502, "upstream_error", "upstream_unreachable", NULL, message, kind);
  }
}

/* Answers with the buffered upstream response (status, body, the headers
 * kept); httpd then finishes and frees c->req. */
static void answer_buffered(struct chat *c) {
  struct gateway *gw = c->gw;
  if (c->cacheable && c->status == 200)
    response_cache_put(gw->cache, c->cache_key, c->status, c->content_type, c->response.data,
                       c->response.len, (uint64_t)gw->cfg->cache_ttl_s * 1000u);
  const char *extra[MAX_RESPONSE_HEADERS + 2];
  response_header_list(c, extra, c->cacheable ? "X-Cache: MISS" : NULL);
  httpd_respond(c->req, c->status, c->content_type, extra, c->response.data ? c->response.data : "",
                c->response.len);
}

/* answer_buffered, then the request is done. */
static void respond_buffered(struct chat *c) {
  answer_buffered(c);
  chat_done(c);
}

static void on_client_abort(void *ud) {
  struct chat *c = ud;
  zg_hold_stop(&c->hold);
  if (c->transfer) upstream_cancel(c->transfer);
  c->transfer = NULL;
  if (c->probe) upstream_cancel(c->probe);
  c->probe = NULL;
  if (c->waiter) limiter_cancel(c->waiter);
  c->waiter = NULL;
  note_fields(c, "none", "client_disconnected", 0, 0);
  /* An answer had begun (the upstream is producing, and billing, tokens):
   * counted with the usage read so far, else as an unknown request, so a
   * client cannot pass its budget by leaving before the usage chunk. */
  record_usage(c);
  chat_done(c);
}

/* Client headers that are not passed upstream (besides the hop-by-hop
 * ones and those named in Connection, see is_hop_by_hop): the client's
 * credentials (replaced by the provider key), the ones libcurl sets for
 * the upstream (Host, Content-Length, Expect), cookies, Accept-Encoding,
 * X-Forwarded-For (sent only when upstream.forwarded_for is on) and
 * X-Zonegate-* (internal). */
/* The client's Connection values (RFC 9110 §7.6.1: every line counts;
 * several lines are one list), found once per request, as for the
 * answer (keep_response_headers). */
struct connection_lines {
  const char *value[MAX_CONNECTION_LINES];
  size_t n;
  bool overflow; /* more lines than we keep: then every header is looked up again */
};

static bool header_passes(struct httpd_req *req, const struct connection_lines *conn,
                          const char *name) {
  static const char *const dropped[] = {
      "authorization",       "host",   "content-length",  "expect",
      "proxy-authorization", "cookie", "accept-encoding", "x-forwarded-for"};
  size_t len = strlen(name);
  if (is_hop_by_hop(name, len)) return false;
  if (conn->overflow) {
    size_t n = httpd_req_header_count(req);
    for (size_t i = 0; i < n; i++) {
      const char *h, *value;
      httpd_req_header_at(req, i, &h, &value);
      if (strcasecmp(h, "Connection") == 0 && list_names(value, name, len)) return false;
    }
  } else {
    for (size_t i = 0; i < conn->n; i++)
      if (list_names(conn->value[i], name, len)) return false;
  }
  for (size_t i = 0; i < ZG_ARRAY_LEN(dropped); i++)
    if (strcasecmp(name, dropped[i]) == 0) return false;
  return strncasecmp(name, "x-zonegate-", 11) != 0;
}

/* The client headers that pass upstream, "Name: value\0" one after the
 * other in lines (reset first); returns how many. Pointers into lines are
 * taken only once it stops growing. Out of memory: the lines so far. */
static size_t collect_passing_headers(struct chat *c, zg_buf *lines) {
  zg_buf_reset(lines);
  size_t n_lines = 0, n_client = httpd_req_header_count(c->req);
  struct connection_lines conn = {.n = 0, .overflow = false};
  for (size_t i = 0; i < n_client; i++) {
    const char *name, *value;
    httpd_req_header_at(c->req, i, &name, &value);
    if ((name[0] | 0x20) != 'c' || strcasecmp(name, "Connection") != 0) continue;
    if (conn.n == MAX_CONNECTION_LINES)
      conn.overflow = true;
    else
      conn.value[conn.n++] = value;
  }
  for (size_t i = 0; i < n_client; i++) {
    const char *name, *value;
    httpd_req_header_at(c->req, i, &name, &value);
    if (!header_passes(c->req, &conn, name)) continue;
    if (zg_buf_append(lines, name, strlen(name)) != 0 || zg_buf_append(lines, ": ", 2) != 0 ||
        zg_buf_append(lines, value, strlen(value) + 1) != 0)
      break;
    n_lines++;
  }
  return n_lines;
}

/* Header lines per attempt held on the stack; more go to the heap. */
#define INLINE_UPSTREAM_HEADERS 32

/* Writes "<name><value>" into line[size], the value cut to fit (as
 * snprintf(line, size, "%s%s", name, value)). Returns the bytes written. */
static size_t header_line(char *line, size_t size, const char *name, const char *value) {
  size_t at = zg_copy_cut(line, size, name);
  return at + zg_copy_cut(line + at, size - at, value);
}

/* a->body = c->body with the "model" value replaced by a->model (the
 * upstream's name for a routed model); every other byte stays. Returns 0,
 * or -1 (no model member, or out of memory: the body goes as it is). */
static int attempt_body(struct chat *c, struct attempt *a) {
  if (a->body) return 0;
  if (!c->model_len) {
    static const char *const names[] = {"model"};
    struct body_value v[1];
    char err[96];
    if (body_scan(c->body, c->body_len, names, v, 1, NULL, NULL, err, sizeof(err)) != 0 ||
        v[0].type != BODY_STRING)
      return -1;
    c->model_at = (size_t)(v[0].value - c->body);
    c->model_len = v[0].len;
  }
  size_t name_len = strlen(a->model);
  size_t len = c->body_len - c->model_len + name_len + 2;
  char *out = malloc(len);
  if (!out) return -1;
  memcpy(out, c->body, c->model_at);
  out[c->model_at] = '"';
  memcpy(out + c->model_at + 1, a->model, name_len);
  out[c->model_at + 1 + name_len] = '"';
  memcpy(out + c->model_at + name_len + 2, c->body + c->model_at + c->model_len,
         c->body_len - c->model_at - c->model_len);
  a->body = out;
  a->body_len = len;
  return 0;
}

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
  size_t auth_len = 0; /* bytes of auth written, cleansed at the end */
  char forwarded_for[128];
  char forward_auth[256];
  if (!headers) {
    respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
    return;
  }
  zg_buf *lines = &gw->upstream_header_lines;
  size_t n_lines = collect_passing_headers(c, lines);
  for (size_t i = 0, at = 0; i < n_lines; i++) {
    headers[n++] = lines->data + at;
    at += strlen(lines->data + at) + 1;
  }
  if (!c->forwarding && gw->cfg->upstream_forwarded_for) {
    /* The client's address goes to a third-party API only when asked for:
     * the address ident.c decided, not what the client wrote. */
    snprintf(forwarded_for, sizeof(forwarded_for), "X-Forwarded-For: %s",
             gateway_client_ip(c->req));
    headers[n++] = forwarded_for;
  }
  if (c->forwarding) {
    if (c->forwarded_auth && c->forwarded_auth[0]) {
      auth_len = header_line(auth, sizeof(auth), "Authorization: ", c->forwarded_auth);
      headers[n++] = auth;
    }
    /* The client's address, signed for the active (ident.c); the plain
     * flag is for nodes of the previous version during an upgrade (this
     * version strips it at entry and believes only the signature). */
    if (gateway_forward_sign(gw, c->method, httpd_req_path(c->req), httpd_req_query(c->req),
                             gateway_client_ip(c->req), c->body, c->body_len, forward_auth,
                             sizeof(forward_auth)) == 0)
      headers[n++] = forward_auth;
    headers[n++] = "X-Zonegate-Forwarded: 1";
  } else if (a->api_key && a->api_key[0]) {
    auth_len = header_line(auth, sizeof(auth), "Authorization: Bearer ", a->api_key);
    headers[n++] = auth;
  }
  /* "Name:" with nothing after it stops libcurl from adding its own. */
  if (!httpd_req_header(c->req, "Content-Type"))
    headers[n++] = c->json_body ? "Content-Type: application/json" : "Content-Type:";
  if (!httpd_req_header(c->req, "Accept")) headers[n++] = "Accept:";
  headers[n++] = "Accept-Encoding: identity";
  headers[n] = NULL;
  struct upstream_request ureq = {0};
  ureq.url = attempt_url(a);
  ureq.method = c->method;
  ureq.headers = headers;
  ureq.body = c->body;
  ureq.body_len = c->body_len;
  /* c->body (the client request's body, or owned by c) and a->body live
   * until chat_free, which comes after on_done or upstream_cancel (a client
   * abort cancels the transfer before httpd frees the request): curl sends
   * the body from there instead of copying it. */
  ureq.body_kept = true;
  if (a->model[0] && strcmp(a->model, c->model) != 0 && c->body && attempt_body(c, a) == 0) {
    ureq.body = a->body;
    ureq.body_len = a->body_len;
  }
  const struct zg_config *cfg = gw->cfg;
  ureq.curl_only = strcmp(cfg->upstream_client, "curl") == 0;
  ureq.timeouts.connect_ms = cfg->connect_timeout_ms;
  ureq.timeouts.first_byte_ms = cfg->first_byte_timeout_ms;
  ureq.timeouts.idle_ms = c->stream ? cfg->idle_timeout_ms : 0;
  ureq.timeouts.total_ms = c->stream ? cfg->stream_timeout_ms : cfg->request_timeout_ms;
  if (c->forwarding && gw->cluster && gw->cluster->hold_timeout_ms) {
    /* The active is a peer on the private network: it accepts (TCP + TLS)
     * at once, or it is gone (killed, frozen, cut off), and then a connect
     * to it only ends with the timeout. Never wait the model API's connect
     * timeout (5 s) for it: one election timeout, then decide again
     * (retry_route_later; a new active may exist by then, maybe this
     * node). Without this a request held during a failover waited 5 s. */
    unsigned cap = gw->cluster->hold_timeout_ms / 3;
    if (cap < 200) cap = 200;
    if (!ureq.timeouts.connect_ms || ureq.timeouts.connect_ms > cap) ureq.timeouts.connect_ms = cap;
  }
  struct upstream_tls forward_tls;
  if (c->forwarding && gateway_forward_tls(gw, c->forward_node, &forward_tls))
    ureq.tls = &forward_tls;
  static const struct upstream_callbacks callbacks = {on_upstream_response, on_upstream_data,
                                                      on_upstream_done};
  char err[256];
  c->status = 0;
  c->response.len = 0;
  int rc = upstream_start(gw->upstream, &ureq, &callbacks, c, &c->transfer, err, sizeof(err));
  OPENSSL_cleanse(auth, auth_len);
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
    if (verdict == LIMITER_SHUTDOWN) { /* this node is exiting */
      const char *refusal[] = {retry, NODE_REFUSAL_HEADER, NULL};
      refuse_here(c, "shutting_down", refusal, "this node is shutting down; retry", "rejected");
      return;
    }
    respond_error(c, 429, "rate_limit_error",
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

/* The attempt goes to ep: url = base_url + upstream path, and its id.
 * 0, or -1 out of memory. */
static int attempt_set_endpoint(const struct chat *c, struct attempt *a,
                                const struct gateway_endpoint *ep) {
  size_t base_len = bounded_len(ep->base_url, sizeof(ep->base_url) - 1);
  a->base_len = base_len;
  zg_copy_cut(a->upstream_id, sizeof(a->upstream_id), ep->upstream_id);
  return attempt_store_url(a, ep->base_url, base_len, c->upstream_path, strlen(c->upstream_path));
}

/* Builds the attempt list: per endpoint (primary, then each fallback),
 * its replicated provider keys in priority order, then the endpoint's
 * api_key from the config file when it has one (so a bad replicated key
 * never hides a working configured one). */
/* Attempts of a routed model: its endpoints in order, each with its own
 * keys by id (the config file's api_key when it names none). */
static void build_route_attempts(struct chat *c, const struct model_route *route) {
  struct gateway *gw = c->gw;
  for (size_t e = 0; e < route->n_endpoints && c->n_attempts < MAX_ATTEMPTS; e++) {
    const struct route_endpoint *rep = &route->endpoints[e];
    struct gateway_endpoint ep;
    snprintf(ep.base_url, sizeof(ep.base_url), "%s", rep->base_url);
    snprintf(ep.upstream_id, sizeof(ep.upstream_id), "%.40s#%zu", route->name, e + 1);
    for (size_t k = 0; k < rep->n_keys; k++) {
      struct gateway_key key = {{0}, NULL};
      if (!gw->cluster || !gw->cluster->key_by_id ||
          !gw->cluster->key_by_id(gw->cluster->ud, rep->keys[k], &key))
        continue; /* revoked, invalid or unknown: not usable */
      struct attempt *a = new_attempt(c);
      if (!a) {
        zg_secret_free(key.secret);
        return;
      }
      if (attempt_set_endpoint(c, a, &ep) != 0) {
        c->n_attempts--; /* out of memory: the attempt is not made */
        zg_secret_free(key.secret);
        return;
      }
      snprintf(a->key_id, sizeof(a->key_id), "%.47s", key.id);
      a->api_key = key.secret;
      zg_copy_cut(a->model, sizeof(a->model), rep->model);
    }
    if (rep->n_keys == 0) {
      struct attempt *a = new_attempt(c);
      if (!a) return;
      if (attempt_set_endpoint(c, a, &ep) != 0) {
        c->n_attempts--;
        return;
      }
      const char *key = gw->n_endpoints ? gw->endpoints[0].api_key : gw->routes_api_key;
      a->api_key = key ? strdup(key) : NULL;
      zg_copy_cut(a->model, sizeof(a->model), rep->model);
    }
  }
}

static void build_attempts(struct chat *c) {
  struct gateway *gw = c->gw;
  if (c->routed) {
    const struct model_route *route = routes_find(&gw->routes, c->model);
    if (!route && !c->model[0] && gw->routes.n && !gw->n_endpoints) route = &gw->routes.models[0];
    if (route) {
      build_route_attempts(c, route);
      return;
    }
  }
  for (size_t e = 0; e < gw->n_endpoints && c->n_attempts < MAX_ATTEMPTS; e++) {
    struct gateway_endpoint *ep = &gw->endpoints[e];
    struct gateway_key keys[8];
    size_t n_keys = 0;
    if (gw->cluster && gw->cluster->usable_keys)
      n_keys = gw->cluster->usable_keys(gw->cluster->ud, ep->upstream_id, keys, ZG_ARRAY_LEN(keys));
    for (size_t k = 0; k < n_keys; k++) {
      struct attempt *a = new_attempt(c);
      if (!a) {
        zg_secret_free(keys[k].secret);
        continue;
      }
      if (attempt_set_endpoint(c, a, ep) != 0) {
        c->n_attempts--;
        zg_secret_free(keys[k].secret);
        continue;
      }
      snprintf(a->key_id, sizeof(a->key_id), "%.47s", keys[k].id);
      a->api_key = keys[k].secret;
    }
    if (n_keys == 0 || (ep->api_key && ep->api_key[0])) {
      struct attempt *a = new_attempt(c);
      if (!a) break;
      if (attempt_set_endpoint(c, a, ep) != 0) {
        c->n_attempts--;
        break;
      }
      a->api_key = ep->api_key ? strdup(ep->api_key) : NULL;
    }
  }
}

static struct chat *chat_new(struct gateway *gw, struct httpd_req *req, const char *route,
                             const char *upstream_path) {
  size_t path_len = strlen(upstream_path);
  char *path_heap = NULL;
  if (path_len >= UPSTREAM_PATH_INLINE && !(path_heap = malloc(path_len + 1))) {
    httpd_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  struct chat *c = gw->chat_pool;
  if (c) {
    gw->chat_pool = c->next_pooled;
    gw->chat_pool_count--;
    zg_buf_reset(&c->response);
    zg_buf_reset(&c->response_headers);
    zg_buf_reset(&c->sse_partial);
    memset(&c->gw, 0, offsetof(struct chat, upstream_path_inline) - offsetof(struct chat, gw));
  } else {
    c = calloc(1, sizeof(*c));
  }
  if (!c) {
    free(path_heap);
    httpd_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  c->gw = gw;
  c->req = req;
  c->route = route;
  c->attempts = c->inline_attempts;
  c->method = httpd_req_method(req);
  c->upstream_path = path_heap ? path_heap : c->upstream_path_inline;
  memcpy(c->upstream_path, upstream_path, path_len + 1);
  return c;
}

/* Top-level members the gateway reads from a chat request body; the one
 * parse (body.c) finds them, every decision below reads these slots. */
enum { F_MESSAGES, F_STREAM, F_MODEL, F_TEMPERATURE, F_TOP_P, F_N, F_STREAM_OPTIONS, F_COUNT };
static const char *const chat_fields[F_COUNT] = {
    "messages", "stream", "model", "temperature", "top_p", "n", "stream_options"};

/* The one strict parse of the request body. 0 with v[] filled, or it
 * answered 400 naming the problem and freed c (-1). */
static int parse_body(struct chat *c, const char *body, size_t body_len, struct body_value *v,
                      size_t *object_end, size_t *members) {
  char err[160];
  if (body_scan(body, body_len, chat_fields, v, F_COUNT, object_end, members, err, sizeof(err)) ==
      0)
    return 0;
  char msg[256];
  if (!body_len)
    snprintf(msg, sizeof(msg),
             "the request body is empty; expected a JSON object with \"messages\"");
  else
    snprintf(msg, sizeof(msg), "the request body is not valid JSON: %s", err);
  respond_error(c, 400, "invalid_request_error",
                strncmp(err, "duplicate member", 16) == 0 ? "duplicate_member" : "invalid_json",
                NULL, msg, "bad_request");
  return -1;
}

/* True for a Content-Type whose body is not JSON text: multipart forms
 * (file and audio uploads) and binary media. Anything else (JSON, a
 * missing or a wrong text type) is read as JSON, so that no upstream that
 * parses JSON whatever the label can see another request than the
 * gateway. */
static bool is_binary_type(const char *ct) {
  static const char *const prefixes[] = {"multipart/", "application/octet-stream", "audio/",
                                         "image/", "video/"};
  for (size_t i = 0; i < ZG_ARRAY_LEN(prefixes); i++)
    if (strncasecmp(ct, prefixes[i], strlen(prefixes[i])) == 0) return true;
  return false;
}

/* The body is parsed (strictly, once) unless it is a multipart form or
 * binary media (is_binary_type), which pass as bytes; a chat completion is
 * always parsed. Returns 0 (v[] filled when
 * *parsed), or -1 after answering 400. */
static int read_body(struct chat *c, const char *body, size_t body_len, struct body_value *v,
                     size_t *object_end, size_t *members, bool *parsed) {
  const char *ct = httpd_req_header(c->req, "Content-Type");
  *parsed = c->chat || (body_len > 0 && (!ct || !is_binary_type(ct)));
  if (!*parsed) return 0;
  if (parse_body(c, body, body_len, v, object_end, members) != 0) return -1;
  c->json_body = !ct;
  if (v[F_STREAM].type != BODY_ABSENT && v[F_STREAM].type != BODY_TRUE &&
      v[F_STREAM].type != BODY_FALSE && v[F_STREAM].type != BODY_NULL) {
    respond_error(c, 400, "invalid_request_error", "invalid_request", NULL,
                  "\"stream\" must be true, false or null", "bad_request");
    return -1;
  }
  c->stream = v[F_STREAM].type == BODY_TRUE;
  return 0;
}

/* The cache key: SHA-256 over everything the upstream will see that can
 * change its answer: upstream id, path, the client headers that pass
 * upstream (as sent) and the body bytes as sent (defaults included). */
static int compute_cache_key(struct chat *c, const char *upstream_id) {
  zg_buf *lines = &c->gw->upstream_header_lines;
  size_t n_lines = collect_passing_headers(c, lines);
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  unsigned int out_len = 0;
  int ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1;
  char counts[64];
  int n =
      snprintf(counts, sizeof(counts), "%zu:%zu:%zu:", strlen(upstream_id), n_lines, lines->len);
  ok = ok && EVP_DigestUpdate(md, counts, (size_t)n) == 1;
  ok = ok && EVP_DigestUpdate(md, upstream_id, strlen(upstream_id) + 1) == 1;
  ok = ok && EVP_DigestUpdate(md, c->upstream_path, strlen(c->upstream_path) + 1) == 1;
  ok = ok && (!lines->len || EVP_DigestUpdate(md, lines->data, lines->len) == 1);
  ok = ok && (!c->body_len || EVP_DigestUpdate(md, c->body, c->body_len) == 1);
  ok = ok && EVP_DigestFinal_ex(md, c->cache_key, &out_len) == 1 && out_len == 32;
  EVP_MD_CTX_free(md);
  return ok ? 0 : -1;
}

/* The changes the gateway makes to a JSON body, as byte splices: text
 * inserted at an offset, replacing `remove` bytes there. Everything else
 * stays the client's bytes (nothing is re-printed). */
struct splice {
  size_t at, remove;
  char text[96];
  size_t len;
};
#define MAX_SPLICES 4

static void splice_add(struct splice *sp, size_t *n, size_t at, size_t remove, const char *text) {
  if (*n >= MAX_SPLICES) return;
  struct splice *x = &sp[(*n)++];
  x->at = at;
  x->remove = remove;
  x->len = bounded_len(text, sizeof(x->text) - 1);
  memcpy(x->text, text, x->len);
}

/* What ask_stream_usage found. */
enum ask_usage { ASK_NOT_NEEDED, ASK_ASKED, ASK_INVALID };

/* A JSON value's type as OpenAI's errors name it ("expected an object,
 * but got a string instead"). */
static const char *json_type_name(enum body_type t) {
  switch (t) {
  case BODY_STRING:
    return "a string";
  case BODY_NUMBER:
    return "a number";
  case BODY_TRUE:
  case BODY_FALSE:
    return "a boolean";
  case BODY_ARRAY:
    return "an array";
  case BODY_OBJECT:
    return "an object";
  default:
    return "null";
  }
}

/* Asks a stream for its usage when the client did not (issue: usage from
 * every answer): "stream_options":{"include_usage":true} is added, or
 * include_usage set inside the client's stream_options. ASK_ASKED when the
 * gateway asked (the usage chunk is then removed from the client's
 * stream), ASK_NOT_NEEDED when the client asked itself. ASK_INVALID, with
 * OpenAI's message in msg, when stream_options is not an object or its
 * include_usage not a boolean (or null): such a stream could not be
 * counted, so it is refused like OpenAI refuses it (400), never sent
 * uncounted. */
static enum ask_usage ask_stream_usage(const char *body, const struct body_value *v,
                                       size_t object_end, size_t members, struct splice *sp,
                                       size_t *n, char *msg, size_t msg_size) {
  const struct body_value *so = &v[F_STREAM_OPTIONS];
  if (so->type == BODY_ABSENT) {
    splice_add(sp, n, object_end, 0,
               members ? ",\"stream_options\":{\"include_usage\":true}"
                       : "\"stream_options\":{\"include_usage\":true}");
    return ASK_ASKED;
  }
  if (so->type == BODY_NULL) { /* null means "no options": the same as absent */
    splice_add(sp, n, (size_t)(so->value - body), so->len, "{\"include_usage\":true}");
    return ASK_ASKED;
  }
  if (so->type != BODY_OBJECT) {
    snprintf(msg, msg_size,
             "Invalid type for 'stream_options': expected an object, but got %s instead.",
             json_type_name(so->type));
    return ASK_INVALID;
  }
  static const char *const inner[] = {"include_usage"};
  struct body_value iu[1];
  size_t end, count;
  char err[96];
  if (body_scan(so->value, so->len, inner, iu, 1, &end, &count, err, sizeof(err)) != 0) {
    snprintf(msg, msg_size, "Invalid 'stream_options': %s.", err);
    return ASK_INVALID;
  }
  if (iu[0].type == BODY_TRUE) return ASK_NOT_NEEDED; /* the client asked itself */
  if (iu[0].type == BODY_ABSENT) {
    splice_add(sp, n, (size_t)(so->value - body) + 1, 0,
               count ? "\"include_usage\":true," : "\"include_usage\":true");
    return ASK_ASKED;
  }
  if (iu[0].type == BODY_FALSE || iu[0].type == BODY_NULL) {
    splice_add(sp, n, (size_t)(iu[0].value - body), iu[0].len, "true");
    return ASK_ASKED;
  }
  snprintf(msg, msg_size,
           "Invalid type for 'stream_options.include_usage': expected a boolean, but got %s "
           "instead.",
           json_type_name(iu[0].type));
  return ASK_INVALID;
}

/* Model defaults fill only the members the client left out (chat
 * completions): spliced in before the object's closing brace. */
static void add_defaults(struct chat *c, const struct body_value *v, size_t object_end,
                         size_t members, struct splice *sp, size_t *n) {
  const struct zg_config *cfg = c->gw->cfg;
  char added[96];
  size_t len = 0;
  bool comma = members > 0;
  const struct {
    bool on;
    double value;
    const char *name;
    int field;
  } defaults[] = {{cfg->has_temperature, cfg->temperature, "temperature", F_TEMPERATURE},
                  {cfg->has_top_p, cfg->top_p, "top_p", F_TOP_P}};
  for (size_t i = 0; i < ZG_ARRAY_LEN(defaults); i++) {
    if (!defaults[i].on || v[defaults[i].field].type != BODY_ABSENT) continue;
    char number[40];
    body_format_number(defaults[i].value, number, sizeof(number));
    len += (size_t)snprintf(added + len, sizeof(added) - len, "%s\"%s\":%s", comma ? "," : "",
                            defaults[i].name, number);
    comma = true;
  }
  if (len) splice_add(sp, n, object_end, 0, added);
}

/* c->body = body with the splices applied (sorted by offset; the same
 * offset keeps the order they were added in), or body itself (borrowed)
 * when there are none. Returns 0, -1 out of memory. */
static int apply_splices(struct chat *c, const char *body, size_t body_len, struct splice *sp,
                         size_t n) {
  if (n == 0) {
    c->body = body; /* borrowed: the request lives until it is answered */
    c->body_owned = false;
    c->body_len = body_len;
    return 0;
  }
  for (size_t i = 1; i < n; i++) /* insertion sort, stable */
    for (size_t j = i; j > 0 && sp[j - 1].at > sp[j].at; j--) {
      struct splice t = sp[j];
      sp[j] = sp[j - 1];
      sp[j - 1] = t;
    }
  size_t out_len = body_len;
  for (size_t i = 0; i < n; i++) out_len = out_len - sp[i].remove + sp[i].len;
  char *out = malloc(out_len ? out_len : 1);
  if (!out) return -1;
  size_t from = 0, to = 0;
  for (size_t i = 0; i < n; i++) {
    memcpy(out + to, body + from, sp[i].at - from);
    to += sp[i].at - from;
    memcpy(out + to, sp[i].text, sp[i].len);
    to += sp[i].len;
    from = sp[i].at + sp[i].remove;
  }
  memcpy(out + to, body + from, body_len - from);
  c->body = out;
  c->body_owned = true;
  c->body_len = out_len;
  return 0;
}

static void proceed_local(struct chat *c);
static void decide_route(struct chat *c);

/* A held request's next try (c->hold: every 10 ms while no active is
 * known, 20 ms after a failed forward). */
static void on_hold_tick(void *ud) {
  decide_route(ud);
}

static void proceed_forward(struct chat *c, const char *forward_to) {
  size_t body_len;
  const char *body = httpd_req_body(c->req, &body_len);
  /* The standby parses the body the same way the active will (a body the
   * active would refuse is refused here with the same answer); only the
   * stream flag is used here. */
  struct body_value v[F_COUNT];
  size_t object_end, members;
  bool parsed;
  if (read_body(c, body, body_len, v, &object_end, &members, &parsed) != 0) return;
  c->forwarding = true;
  const char *auth = httpd_req_header(c->req, "Authorization");
  if (c->forwarded_auth) zg_secret_free(c->forwarded_auth);
  c->forwarded_auth = strndup(auth ? auth : "", 1023);
  struct attempt *a = new_attempt(c);
  char url[UPSTREAM_PATH_MAX + 600];
  if (a)
    gateway_forward_url(c->gw, forward_to, c->upstream_path, url, sizeof(url), c->forward_node,
                        sizeof(c->forward_node));
  if (!a || !c->forwarded_auth || attempt_store_url(a, url, strlen(url), "", 0) != 0) {
    respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
    return;
  }
  snprintf(a->upstream_id, sizeof(a->upstream_id), "active");
  if (body_len) {
    /* Borrowed: the request lives until it is answered. */
    c->body = body;
    c->body_owned = false;
    c->body_len = body_len;
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
  bool forwarded = gateway_request_forwarded(c->req); /* signature verified at entry */
  char forward_to[160] = "";
  enum gateway_serve_mode mode =
      gw->cluster->serve_mode(gw->cluster->ud, forwarded, forward_to, sizeof(forward_to));
  if (mode == GATEWAY_HOLD) {
    if (zg_hold_later(&c->hold, 10)) {
      httpd_req_set_abort(c->req, on_client_abort, c);
      return;
    }
    if (!zg_hold_expired(&c->hold)) { /* no timer */
      respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
      return;
    }
  }
  zg_hold_stop(&c->hold);
  if (mode == GATEWAY_SERVE) {
    proceed_local(c);
    return;
  }
  if (mode == GATEWAY_FORWARD && !forwarded && forward_to[0]) {
    proceed_forward(c, forward_to);
    return;
  }
  if (mode == GATEWAY_REFUSE_SUPERSEDED) {
    const char *none[] = {NODE_REFUSAL_HEADER, NULL};
    refuse_here(c, "superseded", none,
                "this node's data is from an older incarnation of the cluster (the cluster was "
                "recovered elsewhere with zonegate recover --force): it serves nothing; send "
                "requests to the recovered cluster",
                "superseded");
    return;
  }
  const char *retry[] = {"Retry-After: 1", NODE_REFUSAL_HEADER, NULL};
  refuse_here(c, "no_active_node", retry,
              forwarded ? "this node is not active; a forwarded request is never forwarded again"
                        : "no active node is available right now; retry shortly",
              "not_active");
}

/* Forwarding failed before anything was sent: forget the forward and
 * decide again shortly (the hold deadline still bounds the wait). */
static void retry_route_later(struct chat *c) {
  c->forwarding = false;
  for (size_t i = 0; i < c->n_attempts; i++) {
    zg_secret_free(c->attempts[i].api_key);
    free(c->attempts[i].body);
    free(c->attempts[i].url_heap);
  }
  c->n_attempts = 0;
  c->current = 0;
  if (c->body_owned) free((char *)c->body);
  c->body = NULL;
  c->body_owned = false;
  c->body_len = 0;
  if (!zg_hold_later(&c->hold, 20)) {
    if (!zg_hold_expired(&c->hold)) { /* no timer */
      respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
      return;
    }
    const char *retry[] = {"Retry-After: 1", NODE_REFUSAL_HEADER, NULL};
    refuse_here(c, "no_active_node", retry, "no active node is reachable right now; retry shortly",
                "not_active");
    return;
  }
  httpd_req_set_abort(c->req, on_client_abort, c);
}

/* Path segments a client cannot use to climb out of the upstream's /v1:
 * "." and ".." (also percent-encoded) and encoded slashes or backslashes. */
static bool path_is_safe(const char *path) {
  if (strchr(path, '\\')) return false;
  for (const char *p = path; *p; p++)
    if (*p == '%' && p[1] && p[2]) {
      char hex[3] = {p[1], p[2], 0};
      long ch = strtol(hex, NULL, 16);
      if (ch == '.' || ch == '/' || ch == '\\' || ch == 0) return false;
    }
  for (const char *seg = path; seg; seg = strchr(seg + 1, '/')) {
    const char *s = seg + 1;
    size_t len = strcspn(s, "/");
    if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.')) return false;
  }
  return true;
}

void gateway_handle_proxy(struct gateway *gw, struct httpd_req *req, const char *route) {
  const char *path = httpd_req_path(req);
  const char *query = httpd_req_query(req);
  char upstream_path[UPSTREAM_PATH_MAX];
  if (!path_is_safe(path)) {
    httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL,
                        "no route for %s: dot segments and encoded slashes are refused",
                        httpd_req_method(req));
    return;
  }
  /* "<path without /v1>[?<query>]", built by hand: it runs per request */
  size_t path_len = strlen(path + 3), query_len = strlen(query);
  size_t n = path_len + (query_len ? 1 + query_len : 0);
  if (n < sizeof(upstream_path)) {
    memcpy(upstream_path, path + 3, path_len);
    if (query_len) {
      upstream_path[path_len] = '?';
      memcpy(upstream_path + path_len + 1, query, query_len);
    }
    upstream_path[n] = '\0';
  } else {
    httpd_respond_error(req, 414, "invalid_request_error", "uri_too_long", NULL,
                        "the request path and query are longer than %d bytes",
                        UPSTREAM_PATH_MAX - 1);
    return;
  }
  struct chat *c = chat_new(gw, req, route, upstream_path);
  if (!c) return;
  c->chat = strcmp(route, "/v1/chat/completions") == 0 && strcmp(c->method, "POST") == 0;
  if (gw->cluster) zg_hold_init(&c->hold, gw->loop, gw->cluster->hold_timeout_ms, on_hold_tick, c);
  decide_route(c);
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
  if (c->gw->n_endpoints == 0 && !c->routed) {
    respond_error(c, 502, "upstream_error", "no_endpoint", NULL,
                  "no upstream endpoint is configured (set \"endpoint\" or \"models\" in the "
                  "config)",
                  "no_endpoint");
    return;
  }
  build_attempts(c);
  /* keys a probe found bad lately (not yet retired cluster-wide) are not
   * tried first */
  while (c->current + 1 < c->n_attempts && key_verdict(c->gw, &c->attempts[c->current]) < 0)
    c->current++;
  if (c->n_attempts == 0) {
    respond_error(c, 502, "upstream_error", "no_usable_key", NULL,
                  "no usable provider key for this model (operators: zonegate keys list; the "
                  "\"keys\" of its endpoints in \"models\")",
                  "no_usable_key");
    return;
  }
  wait_for_slot(c);
}

/* GET /v1/models and /v1/models/{id} from the models table. */
static void answer_models(struct chat *c) {
  const char *path = httpd_req_path(c->req);
  const char *id = strlen(path) > 11 ? path + 11 : NULL; /* after "/v1/models/" */
  char *text = routes_models_json(&c->gw->routes, id);
  if (!text) {
    char known[512];
    routes_names(&c->gw->routes, known, sizeof(known));
    char msg[700];
    snprintf(msg, sizeof(msg), "The model '%.100s' does not exist; known models: %s", id, known);
    respond_error(c, 404, "invalid_request_error", "model_not_found", NULL, msg, "unknown_model");
    return;
  }
  note_fields(c, "none", "local", 0, 0);
  httpd_respond(c->req, 200, "application/json", NULL, text, strlen(text));
  free(text);
  chat_done(c);
}

/* The models table decides where a request goes: by its "model" (an
 * unknown one is a 404 naming the known ones); a request without one goes
 * to `endpoint`, or to the first model when there is none. Returns false
 * after answering. */
static bool route_model(struct chat *c, bool parsed) {
  struct gateway *gw = c->gw;
  if (!gw->routes.n) return true;
  if (strcmp(c->method, "GET") == 0 &&
      (!strcmp(c->route, "/v1/models") || !strcmp(c->route, "/v1/models/{id}"))) {
    answer_models(c);
    return false;
  }
  if (parsed && (c->model[0] || c->model_bad)) {
    if (c->model_bad || !routes_find(&gw->routes, c->model)) {
      char known[512];
      routes_names(&gw->routes, known, sizeof(known));
      char msg[700];
      snprintf(msg, sizeof(msg), "The model '%.100s' does not exist; known models: %s", c->model,
               known);
      respond_error(c, 404, "invalid_request_error", "model_not_found", NULL, msg, "unknown_model");
      return false;
    }
    c->routed = true;
  } else if (!gw->n_endpoints) {
    c->routed = true;
  }
  return true;
}

/* What the cache key names as the upstream: "default", or for a routed
 * model its first endpoint and the model name the upstream is sent (a
 * routing change is a new key, never a stale answer). */
static const char *cache_upstream_id(struct chat *c, char *out, size_t size) {
  const struct model_route *route = c->routed ? routes_find(&c->gw->routes, c->model) : NULL;
  if (!route && c->routed && c->gw->routes.n) route = &c->gw->routes.models[0];
  if (!route) return "default";
  snprintf(out, size, "%s|%s|%s", route->name, route->endpoints[0].base_url,
           route->endpoints[0].model);
  return out;
}

static void proceed_local(struct chat *c) {
  struct gateway *gw = c->gw;
  struct httpd_req *req = c->req;
  struct gateway_token token;
  if (gateway_authenticate(gw, req, &token) != 0) {
    chat_free(c);
    return;
  }
  memcpy(c->token_name, token.name, sizeof(c->token_name));
  c->has_token = c->token_name[0] != '\0';
  size_t body_len, object_end = 0, members = 0;
  const char *body = httpd_req_body(req, &body_len);
  struct body_value v[F_COUNT];
  bool parsed;
  if (read_body(c, body, body_len, v, &object_end, &members, &parsed) != 0) return;
  struct splice sp[MAX_SPLICES];
  size_t n_sp = 0;
  if (parsed && v[F_MODEL].type == BODY_STRING &&
      !body_string(&v[F_MODEL], c->model, sizeof(c->model)) && v[F_MODEL].len > 2)
    c->model_bad = true; /* a NUL inside, or too long: it names no model */
  if (!route_model(c, parsed)) return;
  c->account = parsed && gw->accounting != NULL;
  bool usage_route = c->chat || strcmp(c->route, "/v1/completions") == 0;
  if (c->account && c->stream && usage_route && strcmp(c->method, "POST") == 0) {
    char msg[200];
    enum ask_usage asked =
        ask_stream_usage(body, v, object_end, members, sp, &n_sp, msg, sizeof(msg));
    if (asked == ASK_INVALID) {
      respond_error(c, 400, "invalid_request_error", "invalid_type", NULL, msg, "bad_request");
      return;
    }
    c->strip_usage = asked == ASK_ASKED;
  }
  if (!c->chat) {
    if (apply_splices(c, body, body_len, sp, n_sp) != 0) {
      respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
      return;
    }
    send_upstream(c);
    return;
  }
  /* Only what the gateway itself reads is checked here (the JSON, stream,
   * model); what the request means is the upstream's to judge, and its
   * answer reaches the client as it came. */
  if (v[F_MODEL].type != BODY_ABSENT && v[F_MODEL].type != BODY_STRING) {
    respond_error(c, 400, "invalid_request_error", "invalid_request", NULL,
                  "\"model\" must be a string", "bad_request");
    return;
  }
  add_defaults(c, v, object_end, members, sp, &n_sp);
  if (apply_splices(c, body, body_len, sp, n_sp) != 0) {
    respond_error(c, 500, "server_error", NULL, NULL, "out of memory", "oom");
    return;
  }
  /* Cacheable: not a stream, one answer (n <= 1), and deterministic
   * (temperature 0, the default counted when it was inserted) unless every
   * temperature is cached. */
  char upstream_id[800];
  bool deterministic = gw->cfg->cache_all_temperatures;
  if (v[F_TEMPERATURE].type == BODY_NUMBER)
    deterministic = deterministic || body_number(&v[F_TEMPERATURE]) == 0;
  else if (v[F_TEMPERATURE].type == BODY_ABSENT && gw->cfg->has_temperature)
    deterministic = deterministic || gw->cfg->temperature == 0;
  c->cacheable = gw->cfg->cache_size_bytes > 0 && !c->stream && deterministic &&
                 !(v[F_N].type == BODY_NUMBER && body_number(&v[F_N]) > 1) &&
                 compute_cache_key(c, cache_upstream_id(c, upstream_id, sizeof(upstream_id))) == 0;
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
  routes_free(&gw->routes);
  zg_secret_free(gw->routes_api_key);
  gw->routes_api_key = NULL;
}

void gateway_reload_endpoints(struct gateway *gw) {
  gateway_free_endpoints(gw);
  const struct zg_config *cfg = gw->cfg;
  char err[256];
  const cJSON *models =
      cfg->effective ? cJSON_GetObjectItemCaseSensitive(cfg->effective, "models") : NULL;
  if (routes_parse(models, &gw->routes, err, sizeof(err)) != 0)
    zg_log(ZG_ERROR, "models_table_refused", "%s (model routing off until fixed)", err);
  if (!cfg->endpoint[0]) {
    /* no single endpoint: the api_key serves routed endpoints without keys */
    if (cfg->api_key[0] &&
        zg_secret_resolve(cfg->api_key, &gw->routes_api_key, NULL, err, sizeof(err)) != 0)
      zg_log(ZG_WARN, "api_key_unresolved", "api_key: %s", err);
    return;
  }
  endpoint_set(&gw->endpoints[gw->n_endpoints++], cfg->endpoint, cfg->api_key, "default");
  for (size_t i = 0; i < cfg->n_fallbacks; i++) {
    char id[16];
    snprintf(id, sizeof(id), "fallback-%u", (unsigned)(i + 1) % 100u);
    endpoint_set(&gw->endpoints[gw->n_endpoints++], cfg->fallbacks[i].endpoint,
                 cfg->fallbacks[i].api_key, id);
  }
}

int gateway_models_validate(const cJSON *models, char *err, size_t errlen) {
  struct routes r;
  if (routes_parse(models, &r, err, errlen) != 0) return -1;
  routes_free(&r);
  return 0;
}
