/*
 * mockllm: a small OpenAI-compatible stand-in for the upstream model API, used as the
 * upstream by every zonegate test and benchmark. Standalone: libuv, http_parser, cJSON.
 *
 * Happy path: one libuv loop accepts HTTP/1.x connections; http_parser splits each byte
 * stream into requests (keep-alive and pipelining: requests queue per connection and are
 * answered strictly in order). Routes: POST /v1/chat/completions (JSON or an SSE stream of
 * chat.completion.chunk events), GET /v1/models, GET /mock/stats, POST /mock/reset.
 * Request headers X-Mock-* change one request's behaviour (latency, chunks, status,
 * injected failures and disconnects, echo); README.md lists them.
 *
 * Failure modes: cannot bind or listen -> message on stderr, exit 1. Bad HTTP -> 400 and
 * close; a body over 16 MiB -> 413 and close; malformed JSON -> 400 (connection kept). A
 * client that goes away while a request is pending is counted in "disconnects", its timers
 * are stopped and its memory freed; nothing a client does ends the process. Out of memory
 * -> abort (a test tool has no better answer). SIGTERM/SIGINT close everything, exit 0.
 */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <http_parser.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define MAX_BODY_BYTES (16u * 1024u * 1024u)
#define MAX_URL_BYTES 8192u
#define MAX_HEADER_COUNT 200u
#define MAX_QUEUED_REQUESTS 64u /* per connection; reading pauses above this */
#define MAX_WRITE_BACKLOG_BYTES (4u * 1024u * 1024u)
#define READ_BUFFER_BYTES 65536u
#define MAX_DELAY_MS 600000L
#define MAX_CHUNKS 100000L
#define MAX_PAD_BYTES (64L * 1024L * 1024L) /* X-Mock-Pad-Bytes */
/* A stream without a chunk interval is written in pieces of about this
 * size, waiting while the connection's write queue is over
 * MAX_WRITE_BACKLOG_BYTES (a client that does not read costs mockllm at
 * most that, however long the stream). */
#define STREAM_WRITE_PIECE_BYTES (256u * 1024u)

/* ---------- small helpers ---------- */

static void *xmalloc(size_t size) {
  void *p = malloc(size ? size : 1);
  if (!p) {
    fputs("mockllm: out of memory\n", stderr);
    abort();
  }
  return p;
}

static void *xrealloc(void *old, size_t size) {
  void *p = realloc(old, size ? size : 1);
  if (!p) {
    fputs("mockllm: out of memory\n", stderr);
    abort();
  }
  return p;
}

static char *xstrdup(const char *s) {
  size_t n = strlen(s) + 1;
  return memcpy(xmalloc(n), s, n);
}

/* A growable byte buffer; always NUL-terminated once anything was appended. */
typedef struct {
  char *data;
  size_t len;
  size_t cap;
} strbuf;

static void sb_reserve(strbuf *b, size_t extra) {
  if (b->len + extra + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + extra + 1) cap *= 2;
  b->data = xrealloc(b->data, cap);
  b->cap = cap;
}

static void sb_append(strbuf *b, const char *s, size_t n) {
  sb_reserve(b, n);
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

static void sb_appends(strbuf *b, const char *s) {
  sb_append(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static void sb_printf(strbuf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  sb_reserve(b, (size_t)n);
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

static void sb_free(strbuf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

static int64_t wall_clock_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t random_state;

static uint64_t random_next(void) {
  /* xorshift64*: fast and good enough for failure injection and jitter. */
  random_state ^= random_state >> 12;
  random_state ^= random_state << 25;
  random_state ^= random_state >> 27;
  return random_state * 2685821657736338717ULL;
}

/* ---------- configuration and counters ---------- */

typedef struct {
  const char *listen_address;
  long latency_ms;
  long jitter_ms;
  long chunks;
  long chunk_interval_ms;
  long fail_percent;
  char **required_keys; /* NULL-terminated; NULL when no key is required */
  const char *model;
  int verbose;
} mock_config;

enum route {
  ROUTE_CHAT,
  ROUTE_MODELS,
  ROUTE_STATS,
  ROUTE_RESET,
  ROUTE_NOT_FOUND,
  ROUTE_COUNT,
};

static const char *const route_names[ROUTE_COUNT] = {"chat_completions", "models", "stats", "reset",
                                                     "not_found"};

typedef struct {
  uint64_t total_requests; /* every request except /mock/stats and /mock/reset */
  uint64_t by_route[ROUTE_COUNT];
  uint64_t by_status[600];
  uint64_t streams_started;
  uint64_t streams_completed;
  uint64_t disconnects;          /* client went away while a request was pending */
  uint64_t injected_disconnects; /* X-Mock-Disconnect-After */
  uint64_t injected_failures;    /* X-Mock-Status / fail percent */
  uint64_t auth_failures;
  uint64_t connections_accepted;
  uint64_t bad_requests; /* HTTP that did not parse, or too large */
  strbuf last_method;
  strbuf last_path;
  strbuf last_headers; /* "name\0value\0" pairs, names lower-cased */
  size_t last_header_count;
  char *last_auth; /* raw Authorization header of the last counted request, or NULL */
} mock_stats;

static mock_config config = {
    .listen_address = NULL,
    .latency_ms = 0,
    .jitter_ms = 0,
    .chunks = 5,
    .chunk_interval_ms = 0,
    .fail_percent = 0,
    .required_keys = NULL,
    .model = "mock-gpt",
    .verbose = 0,
};
static mock_stats stats;
static uint64_t in_flight; /* requests fully received and not yet answered */
static uint64_t open_connections;
static uint64_t response_serial; /* for unique completion ids */

/* ---------- connections and requests ---------- */

typedef struct {
  char *name; /* lower-cased */
  char *value;
} header_pair;

struct connection;

typedef struct request {
  struct request *next;
  struct connection *conn;
  uv_timer_t timer; /* latency and chunk spacing; initialised on first use */
  int timer_initialized;
  enum http_method method;
  int http_minor;
  int keep_alive;
  int forced_status; /* nonzero: the parser rejected this request; answer it and close */
  int started;
  enum route route;
  strbuf url;
  strbuf body;
  header_pair *headers;
  size_t header_count;
  size_t header_cap;
  strbuf field; /* header being parsed */
  strbuf value;
  int in_value;
  int status_sent;
  /* streaming state, owned by the request */
  char *stream_model;
  char *stream_content;
  char *pad_text;     /* X-Mock-Pad-Bytes: every chunk's content instead, or NULL */
  size_t *piece_ends; /* chunks_total entries: end offset of each content piece */
  long chunks_total;
  long chunks_sent;
  long chunk_interval_ms;
  long disconnect_after; /* -1: never */
  int include_usage;
  int chunked;
  int64_t created;
  char completion_id[48];
  long prompt_tokens;
} request;

typedef struct connection {
  uv_tcp_t tcp;
  http_parser parser;
  struct connection *prev;
  struct connection *next;
  request *parsing; /* the request whose bytes are arriving, or NULL */
  request *queue_head;
  request *queue_tail;
  size_t queue_length;
  int parse_error_status; /* status a parser callback chose when it failed (413, 400) */
  int parse_stopped;      /* no more requests are read from this connection */
  int reading;
  int pumping;
  int shutting_down;
  int closing;
  uv_shutdown_t shutdown_req;
} connection;

typedef struct {
  uv_write_t req;
  connection *conn;
  char data[];
} write_op;

static uv_loop_t *loop;
static uv_tcp_t server;
static uv_signal_t sigterm_watcher;
static uv_signal_t sigint_watcher;
static connection *all_connections;
static http_parser_settings parser_settings;
static char read_buffer[READ_BUFFER_BYTES]; /* each read is parsed before the next one */

static void connection_abort(connection *conn, int client_gone);
static void connection_pump(connection *conn);
static void request_respond(request *req);
static void stream_step(request *req);

static const char *request_header(const request *req, const char *lower_name) {
  for (size_t i = 0; i < req->header_count; i++)
    if (strcmp(req->headers[i].name, lower_name) == 0) return req->headers[i].value;
  return NULL;
}

/* A numeric knob: the header's value when present and in [min, max], else fallback. */
static long request_knob(const request *req, const char *lower_name, long fallback, long min,
                         long max) {
  const char *text = request_header(req, lower_name);
  if (!text) return fallback;
  char *end = NULL;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno || end == text || *end != '\0' || value < min || value > max) return fallback;
  return value;
}

static request *request_new(connection *conn) {
  request *req = calloc(1, sizeof *req);
  if (!req) abort();
  req->conn = conn;
  req->disconnect_after = -1;
  return req;
}

static void request_free_memory(request *req) {
  for (size_t i = 0; i < req->header_count; i++) {
    free(req->headers[i].name);
    free(req->headers[i].value);
  }
  free(req->headers);
  sb_free(&req->url);
  sb_free(&req->body);
  sb_free(&req->field);
  sb_free(&req->value);
  free(req->stream_model);
  free(req->pad_text);
  free(req->stream_content);
  free(req->piece_ends);
  free(req);
}

static void on_request_timer_closed(uv_handle_t *handle) {
  request_free_memory(handle->data);
}

/* Frees a request that is no longer in any queue; the timer, if any, is closed first. */
static void request_free(request *req) {
  if (req->timer_initialized) {
    uv_timer_stop(&req->timer);
    uv_close((uv_handle_t *)&req->timer, on_request_timer_closed);
  } else {
    request_free_memory(req);
  }
}

static void request_start_timer(request *req, long delay_ms, uv_timer_cb callback) {
  if (!req->timer_initialized) {
    uv_timer_init(loop, &req->timer);
    req->timer.data = req;
    req->timer_initialized = 1;
  }
  uv_timer_start(&req->timer, callback, (uint64_t)delay_ms, 0);
}

/* ---------- writing ---------- */

static void connection_update_reading(connection *conn);

static void on_write_done(uv_write_t *w, int status) {
  write_op *op = (write_op *)w;
  connection *conn = op->conn;
  free(op);
  if (status < 0) {
    if (status != UV_ECANCELED) connection_abort(conn, 1);
    return;
  }
  connection_update_reading(conn);
}

/* Writes a then b (either may be empty) in order after everything written before. */
static void connection_write2(connection *conn, const char *a, size_t a_len, const char *b,
                              size_t b_len) {
  if (conn->closing || conn->shutting_down) return;
  uv_stream_t *stream = (uv_stream_t *)&conn->tcp;
  uv_buf_t bufs[2] = {uv_buf_init((char *)a, (unsigned)a_len),
                      uv_buf_init((char *)b, (unsigned)b_len)};
  size_t total = a_len + b_len;
  size_t written = 0;
  int rc = uv_try_write(stream, bufs, 2);
  if (rc > 0)
    written = (size_t)rc;
  else if (rc < 0 && rc != UV_EAGAIN) {
    connection_abort(conn, 1);
    return;
  }
  if (written == total) return;

  write_op *op = xmalloc(sizeof *op + (total - written));
  op->conn = conn;
  size_t pos = 0;
  if (written < a_len) {
    memcpy(op->data, a + written, a_len - written);
    pos = a_len - written;
    memcpy(op->data + pos, b, b_len);
    pos += b_len;
  } else {
    size_t skip = written - a_len;
    memcpy(op->data, b + skip, b_len - skip);
    pos = b_len - skip;
  }
  uv_buf_t buf = uv_buf_init(op->data, (unsigned)pos);
  rc = uv_write(&op->req, stream, &buf, 1, on_write_done);
  if (rc < 0) {
    free(op);
    connection_abort(conn, 1);
  }
}

/* ---------- connection lifecycle ---------- */

static void drop_queued_requests(connection *conn);

/* Requests still queued are freed here, never earlier: a caller up the stack may be in the
 * middle of answering one of them when the connection fails. */
static void on_connection_closed(uv_handle_t *handle) {
  connection *conn = handle->data;
  drop_queued_requests(conn);
  if (conn->prev)
    conn->prev->next = conn->next;
  else
    all_connections = conn->next;
  if (conn->next) conn->next->prev = conn->prev;
  open_connections--;
  free(conn);
}

static void drop_queued_requests(connection *conn) {
  request *req = conn->queue_head;
  while (req) {
    request *next = req->next;
    in_flight--;
    request_free(req);
    req = next;
  }
  conn->queue_head = conn->queue_tail = NULL;
  conn->queue_length = 0;
  if (conn->parsing) {
    request_free(conn->parsing);
    conn->parsing = NULL;
  }
}

/* Closes now. client_gone: the peer left (EOF, reset, write error); a pending request then
 * counts as a disconnect. Safe to call more than once; memory is freed in the close cb. */
static void connection_abort(connection *conn, int client_gone) {
  if (conn->closing) return;
  conn->closing = 1;
  if (client_gone && conn->queue_head) stats.disconnects++;
  for (request *req = conn->queue_head; req; req = req->next)
    if (req->timer_initialized) uv_timer_stop(&req->timer);
  uv_close((uv_handle_t *)&conn->tcp, on_connection_closed);
}

static void on_shutdown_done(uv_shutdown_t *shutdown_req, int status) {
  (void)status;
  connection_abort(shutdown_req->data, 0);
}

/* Stops reading, lets queued writes drain, sends FIN, then closes. */
static void connection_close_after_writes(connection *conn) {
  if (conn->closing || conn->shutting_down) return;
  if (conn->reading) uv_read_stop((uv_stream_t *)&conn->tcp);
  conn->reading = 0;
  conn->shutting_down = 1;
  conn->shutdown_req.data = conn;
  if (uv_shutdown(&conn->shutdown_req, (uv_stream_t *)&conn->tcp, on_shutdown_done) < 0)
    connection_abort(conn, 0);
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  (void)handle;
  (void)suggested;
  buf->base = read_buffer;
  buf->len = sizeof read_buffer;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void connection_update_reading(connection *conn) {
  if (conn->closing || conn->shutting_down || conn->parse_stopped) return;
  int want = conn->queue_length < MAX_QUEUED_REQUESTS &&
             uv_stream_get_write_queue_size((uv_stream_t *)&conn->tcp) < MAX_WRITE_BACKLOG_BYTES;
  if (want && !conn->reading) {
    if (uv_read_start((uv_stream_t *)&conn->tcp, on_alloc, on_read) == 0) conn->reading = 1;
  } else if (!want && conn->reading) {
    uv_read_stop((uv_stream_t *)&conn->tcp);
    conn->reading = 0;
  }
}

static void connection_enqueue(connection *conn, request *req) {
  req->next = NULL;
  if (conn->queue_tail)
    conn->queue_tail->next = req;
  else
    conn->queue_head = req;
  conn->queue_tail = req;
  conn->queue_length++;
  in_flight++;
}

/* The head request has been answered completely: drop it, then close or go on. */
static void request_finish(request *req) {
  connection *conn = req->conn;
  int keep_alive = req->keep_alive && !req->forced_status;
  if (config.verbose)
    fprintf(stderr, "mockllm: %s %s -> %d\n", http_method_str(req->method),
            req->url.data ? req->url.data : "", req->status_sent);
  conn->queue_head = req->next;
  if (!conn->queue_head) conn->queue_tail = NULL;
  conn->queue_length--;
  in_flight--;
  request_free(req);
  if (!keep_alive) {
    connection_close_after_writes(conn);
    return;
  }
  connection_update_reading(conn);
  connection_pump(conn);
}

/* Sends what is queued, then closes without finishing the response (fault injection). */
static void request_inject_disconnect(request *req) {
  stats.injected_disconnects++;
  req->keep_alive = 0;
  request_finish(req);
}

/* ---------- HTTP parsing ---------- */

static connection *parser_connection(http_parser *p) {
  return p->data;
}

static int parse_fail(connection *conn, int status) {
  conn->parse_error_status = status;
  return -1;
}

static int on_message_begin(http_parser *p) {
  connection *conn = parser_connection(p);
  if (conn->parsing) request_free(conn->parsing);
  conn->parsing = request_new(conn);
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t length) {
  connection *conn = parser_connection(p);
  if (conn->parsing->url.len + length > MAX_URL_BYTES) return parse_fail(conn, 414);
  sb_append(&conn->parsing->url, at, length);
  return 0;
}

static void request_store_header(request *req) {
  if (!req->in_value) return;
  if (req->header_count == req->header_cap) {
    req->header_cap = req->header_cap ? req->header_cap * 2 : 16;
    req->headers = xrealloc(req->headers, req->header_cap * sizeof *req->headers);
  }
  for (size_t i = 0; i < req->field.len; i++)
    req->field.data[i] = (char)tolower((unsigned char)req->field.data[i]);
  req->headers[req->header_count].name = req->field.data ? req->field.data : xstrdup("");
  req->headers[req->header_count].value = req->value.data ? req->value.data : xstrdup("");
  req->header_count++;
  req->field = (strbuf){0};
  req->value = (strbuf){0};
  req->in_value = 0;
}

static int on_header_field(http_parser *p, const char *at, size_t length) {
  connection *conn = parser_connection(p);
  request *req = conn->parsing;
  if (req->in_value) {
    request_store_header(req);
    if (req->header_count >= MAX_HEADER_COUNT) return parse_fail(conn, 431);
  }
  sb_append(&req->field, at, length);
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t length) {
  request *req = parser_connection(p)->parsing;
  req->in_value = 1;
  sb_append(&req->value, at, length);
  return 0;
}

static int on_headers_complete(http_parser *p) {
  connection *conn = parser_connection(p);
  request *req = conn->parsing;
  request_store_header(req);
  req->method = (enum http_method)p->method;
  req->http_minor = p->http_major == 1 ? p->http_minor : 0;
  if (p->content_length != ULLONG_MAX && p->content_length > MAX_BODY_BYTES)
    return parse_fail(conn, 413);
  const char *expect = request_header(req, "expect");
  if (expect && strcasecmp(expect, "100-continue") == 0 && !conn->queue_head) {
    static const char interim[] = "HTTP/1.1 100 Continue\r\n\r\n";
    connection_write2(conn, interim, sizeof interim - 1, NULL, 0);
  }
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t length) {
  connection *conn = parser_connection(p);
  if (conn->parsing->body.len + length > MAX_BODY_BYTES) return parse_fail(conn, 413);
  sb_append(&conn->parsing->body, at, length);
  return 0;
}

static int on_message_complete(http_parser *p) {
  connection *conn = parser_connection(p);
  request *req = conn->parsing;
  conn->parsing = NULL;
  req->keep_alive = http_should_keep_alive(p);
  connection_enqueue(conn, req);
  return 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  connection *conn = stream->data;
  if (nread == 0) return;
  if (nread < 0) {
    /* EOF or reset: a client that half-closes mid-request is treated as gone. */
    connection_abort(conn, 1);
    return;
  }
  if (conn->closing || conn->shutting_down || conn->parse_stopped) return;

  size_t parsed = http_parser_execute(&conn->parser, &parser_settings, buf->base, (size_t)nread);
  if (conn->parser.upgrade || parsed != (size_t)nread ||
      HTTP_PARSER_ERRNO(&conn->parser) != HPE_OK) {
    /* Bad HTTP: answer after what is already queued, then close. */
    stats.bad_requests++;
    if (conn->parsing) {
      request_free(conn->parsing);
      conn->parsing = NULL;
    }
    request *error_req = request_new(conn);
    error_req->forced_status = conn->parse_error_status ? conn->parse_error_status : 400;
    error_req->method = HTTP_GET;
    connection_enqueue(conn, error_req);
    conn->parse_stopped = 1;
    uv_read_stop(stream);
    conn->reading = 0;
  }
  connection_update_reading(conn);
  connection_pump(conn);
}

/* ---------- responses ---------- */

static const char *status_text(int status) {
  const char *text = http_status_str((enum http_status)status);
  return text && *text && strcmp(text, "<unknown>") != 0 ? text : "Status";
}

/* Writes a complete response. extra_headers: "" or lines each ending in CRLF.
 * body_send_len < body_len sends a truncated body (the Content-Length stays full). */
static void send_response_partial(request *req, int status, const char *content_type,
                                  const char *extra_headers, const char *body, size_t body_len,
                                  size_t body_send_len) {
  char head[512];
  int keep_alive = req->keep_alive && !req->forced_status;
  int n = snprintf(head, sizeof head,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                   "Connection: %s\r\n%s\r\n",
                   status, status_text(status), content_type, body_len,
                   keep_alive ? "keep-alive" : "close", extra_headers);
  if (n < 0 || (size_t)n >= sizeof head) n = 0;
  req->status_sent = status;
  if (req->route != ROUTE_STATS && req->route != ROUTE_RESET && status >= 100 && status < 600)
    stats.by_status[status]++;
  connection_write2(req->conn, head, (size_t)n, body, body_send_len);
}

static void send_json(request *req, int status, cJSON *json, const char *extra_headers) {
  char *text = cJSON_PrintUnformatted(json);
  if (!text) abort();
  size_t len = strlen(text);
  send_response_partial(req, status, "application/json", extra_headers, text, len, len);
  cJSON_free(text);
}

/* An OpenAI error body. code may be NULL (JSON null). */
static void send_error(request *req, int status, const char *message, const char *type,
                       const char *code, const char *extra_headers) {
  cJSON *root = cJSON_CreateObject();
  cJSON *error = cJSON_AddObjectToObject(root, "error");
  cJSON_AddStringToObject(error, "message", message);
  cJSON_AddStringToObject(error, "type", type);
  cJSON_AddNullToObject(error, "param");
  if (code)
    cJSON_AddStringToObject(error, "code", code);
  else
    cJSON_AddNullToObject(error, "code");
  send_json(req, status, root, extra_headers);
  cJSON_Delete(root);
}

static void send_status_error(request *req, int status) {
  char message[128];
  switch (status) {
  case 401:
    send_error(req, 401, "Incorrect API key provided (mockllm).", "invalid_request_error",
               "invalid_api_key", "");
    return;
  case 429:
    send_error(req, 429, "Rate limit reached (mockllm).", "requests", "rate_limit_exceeded",
               "Retry-After: 1\r\n");
    return;
  case 503:
    send_error(req, 503, "The engine is currently overloaded (mockllm).", "server_error", NULL, "");
    return;
  default:
    snprintf(message, sizeof message, "mockllm injected status %d.", status);
    send_error(req, status, message, status >= 500 ? "server_error" : "invalid_request_error", NULL,
               "");
    return;
  }
}

static int authorization_ok(const request *req) {
  if (!config.required_keys) return 1;
  const char *auth = request_header(req, "authorization");
  if (!auth || strncmp(auth, "Bearer ", 7) != 0) return 0;
  for (char **key = config.required_keys; *key; key++)
    if (strcmp(auth + 7, *key) == 0) return 1;
  return 0;
}

static cJSON *headers_as_json(const request *req) {
  cJSON *object = cJSON_CreateObject();
  for (size_t i = 0; i < req->header_count; i++) {
    cJSON *existing = cJSON_GetObjectItemCaseSensitive(object, req->headers[i].name);
    if (existing && cJSON_IsString(existing)) {
      strbuf joined = {0};
      sb_printf(&joined, "%s, %s", existing->valuestring, req->headers[i].value);
      cJSON_ReplaceItemInObjectCaseSensitive(object, req->headers[i].name,
                                             cJSON_CreateString(joined.data));
      sb_free(&joined);
    } else {
      cJSON_AddStringToObject(object, req->headers[i].name, req->headers[i].value);
    }
  }
  return object;
}

/* Appends the text of a message content (string, or an array of {type:text,text} parts). */
static void append_content_text(strbuf *out, const cJSON *content) {
  if (cJSON_IsString(content)) {
    sb_appends(out, content->valuestring);
  } else if (cJSON_IsArray(content)) {
    const cJSON *part;
    cJSON_ArrayForEach(part, content) {
      const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
      if (cJSON_IsString(text)) sb_appends(out, text->valuestring);
    }
  }
}

static void respond_chat_completion(request *req) {
  cJSON *body = cJSON_ParseWithLength(req->body.data ? req->body.data : "", req->body.len);
  if (!body || !cJSON_IsObject(body)) {
    cJSON_Delete(body);
    send_error(req, 400, "We could not parse the JSON body of your request (mockllm).",
               "invalid_request_error", NULL, "");
    request_finish(req);
    return;
  }
  const cJSON *messages = cJSON_GetObjectItemCaseSensitive(body, "messages");
  if (!cJSON_IsArray(messages)) {
    cJSON_Delete(body);
    send_error(req, 400, "'messages' is a required property and must be an array (mockllm).",
               "invalid_request_error", NULL, "");
    request_finish(req);
    return;
  }
  const cJSON *model_item = cJSON_GetObjectItemCaseSensitive(body, "model");
  const char *model = cJSON_IsString(model_item) ? model_item->valuestring : config.model;

  /* Deterministic content: from the last user message, or the echo document. */
  strbuf content = {0};
  strbuf all_text = {0};
  const cJSON *last_user = NULL;
  const cJSON *message;
  cJSON_ArrayForEach(message, messages) {
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(message, "role");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(message, "content");
    append_content_text(&all_text, text);
    if (cJSON_IsString(role) && strcmp(role->valuestring, "user") == 0) last_user = text;
  }
  const char *echo = request_header(req, "x-mock-echo");
  if (echo && (strcmp(echo, "1") == 0 || strcmp(echo, "raw") == 0)) {
    cJSON *doc = cJSON_CreateObject();
    if (strcmp(echo, "raw") == 0) /* the request body exactly as received, as a string */
      cJSON_AddItemToObject(doc, "body", cJSON_CreateString(req->body.data ? req->body.data : ""));
    else
      cJSON_AddItemReferenceToObject(doc, "body", body);
    cJSON_AddItemToObject(doc, "headers", headers_as_json(req));
    char *printed = cJSON_PrintUnformatted(doc);
    if (!printed) abort();
    sb_appends(&content, printed);
    cJSON_free(printed);
    cJSON_Delete(doc);
  } else {
    sb_appends(&content, "mock reply to: ");
    if (last_user) append_content_text(&content, last_user);
  }
  if (!content.data) sb_appends(&content, "");
  long pad_bytes = request_knob(req, "x-mock-pad-bytes", 0, 0, MAX_PAD_BYTES);
  const cJSON *stream = cJSON_GetObjectItemCaseSensitive(body, "stream");
  if (pad_bytes > 0 && cJSON_IsTrue(stream)) {
    req->pad_text = xmalloc((size_t)pad_bytes + 1);
    memset(req->pad_text, 'x', (size_t)pad_bytes);
    req->pad_text[pad_bytes] = '\0';
  } else if (pad_bytes > 0) {
    sb_reserve(&content, (size_t)pad_bytes);
    memset(content.data + content.len, 'x', (size_t)pad_bytes);
    content.len += (size_t)pad_bytes;
    content.data[content.len] = '\0';
  }
  long prompt_tokens = (long)(all_text.len + 3) / 4;
  if (prompt_tokens < 1) prompt_tokens = 1;
  long completion_tokens = (long)(content.len + 3) / 4;
  if (completion_tokens < 1) completion_tokens = 1;
  sb_free(&all_text);

  const cJSON *stream_options = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
  int include_usage =
      cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(stream_options, "include_usage"));
  long disconnect_after = request_knob(req, "x-mock-disconnect-after", -1, 0, LONG_MAX);
  response_serial++;
  snprintf(req->completion_id, sizeof req->completion_id, "chatcmpl-mock-%llu",
           (unsigned long long)response_serial);
  req->created = (int64_t)time(NULL);

  if (cJSON_IsTrue(stream)) {
    req->stream_model = xstrdup(model);
    cJSON_Delete(body);
    req->stream_content = content.data;
    req->chunks_total = request_knob(req, "x-mock-chunks", config.chunks, 0, MAX_CHUNKS);
    req->chunk_interval_ms =
        request_knob(req, "x-mock-chunk-interval-ms", config.chunk_interval_ms, 0, MAX_DELAY_MS);
    req->disconnect_after = disconnect_after;
    req->include_usage = include_usage;
    req->prompt_tokens = prompt_tokens;
    req->chunked = req->http_minor >= 1;
    if (!req->chunked) req->keep_alive = 0;
    /* Split the content into chunks_total pieces on UTF-8 character boundaries. */
    long pieces = req->chunks_total;
    req->piece_ends = xmalloc(sizeof(size_t) * (size_t)(pieces ? pieces : 1));
    for (long i = 0; i < pieces; i++) {
      size_t end = i + 1 == pieces ? content.len : content.len * (size_t)(i + 1) / (size_t)pieces;
      while (end < content.len && ((unsigned char)content.data[end] & 0xC0) == 0x80) end++;
      if (i > 0 && end < req->piece_ends[i - 1]) end = req->piece_ends[i - 1];
      req->piece_ends[i] = end;
    }
    stats.streams_started++;
    req->status_sent = 200;
    stats.by_status[200]++;
    stream_step(req);
    return;
  }

  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object", "chat.completion");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", model);
  cJSON *choices = cJSON_AddArrayToObject(root, "choices");
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddItemToArray(choices, choice);
  cJSON_AddNumberToObject(choice, "index", 0);
  cJSON *reply = cJSON_AddObjectToObject(choice, "message");
  cJSON_AddStringToObject(reply, "role", "assistant");
  cJSON_AddStringToObject(reply, "content", content.data);
  cJSON_AddStringToObject(choice, "finish_reason", "stop");
  cJSON *usage = cJSON_AddObjectToObject(root, "usage");
  cJSON_AddNumberToObject(usage, "prompt_tokens", (double)prompt_tokens);
  cJSON_AddNumberToObject(usage, "completion_tokens", (double)completion_tokens);
  cJSON_AddNumberToObject(usage, "total_tokens", (double)(prompt_tokens + completion_tokens));
  sb_free(&content);
  cJSON_Delete(body);

  if (disconnect_after >= 0) {
    char *text = cJSON_PrintUnformatted(root);
    if (!text) abort();
    size_t len = strlen(text);
    send_response_partial(req, 200, "application/json", "", text, len, len / 2);
    cJSON_free(text);
    cJSON_Delete(root);
    request_inject_disconnect(req);
    return;
  }
  send_json(req, 200, root, "");
  cJSON_Delete(root);
  request_finish(req);
}

/* Appends one SSE event (with chunked framing when the response is chunked). */
static void stream_append_event(request *req, strbuf *out, const char *payload, size_t len) {
  if (req->chunked) sb_printf(out, "%zx\r\n", len + 8);
  sb_appends(out, "data: ");
  sb_append(out, payload, len);
  sb_appends(out, "\n\n");
  if (req->chunked) sb_appends(out, "\r\n");
}

static void stream_append_chunk(request *req, strbuf *out, long index) {
  size_t start = index == 0 ? 0 : req->piece_ends[index - 1];
  size_t end = req->piece_ends[index];
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object", "chat.completion.chunk");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", req->stream_model);
  cJSON *choices = cJSON_AddArrayToObject(root, "choices");
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddItemToArray(choices, choice);
  cJSON_AddNumberToObject(choice, "index", 0);
  cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
  if (index == 0) cJSON_AddStringToObject(delta, "role", "assistant");
  if (req->pad_text) {
    cJSON_AddStringToObject(delta, "content", req->pad_text);
  } else {
    char saved = req->stream_content[end];
    req->stream_content[end] = '\0';
    cJSON_AddStringToObject(delta, "content", req->stream_content + start);
    req->stream_content[end] = saved;
  }
  if (index + 1 == req->chunks_total)
    cJSON_AddStringToObject(choice, "finish_reason", "stop");
  else
    cJSON_AddNullToObject(choice, "finish_reason");
  cJSON_AddNumberToObject(root, "mock_sent_at_ms", (double)wall_clock_ms());
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  stream_append_event(req, out, text, strlen(text));
  cJSON_free(text);
  cJSON_Delete(root);
}

static void stream_append_usage(request *req, strbuf *out) {
  long completion_tokens = (long)(strlen(req->stream_content) + 3) / 4;
  if (completion_tokens < 1) completion_tokens = 1;
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object", "chat.completion.chunk");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", req->stream_model);
  cJSON_AddArrayToObject(root, "choices");
  cJSON *usage = cJSON_AddObjectToObject(root, "usage");
  cJSON_AddNumberToObject(usage, "prompt_tokens", (double)req->prompt_tokens);
  cJSON_AddNumberToObject(usage, "completion_tokens", (double)completion_tokens);
  cJSON_AddNumberToObject(usage, "total_tokens", (double)(req->prompt_tokens + completion_tokens));
  cJSON_AddNumberToObject(root, "mock_sent_at_ms", (double)wall_clock_ms());
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  stream_append_event(req, out, text, strlen(text));
  cJSON_free(text);
  cJSON_Delete(root);
}

static void on_stream_timer(uv_timer_t *timer) {
  stream_step(timer->data);
}

/* Sends what is due now: the headers (first call), chunks until the next interval, and the
 * end of the stream; arms the timer for the next chunk or finishes the request. */
static void stream_step(request *req) {
  connection *conn = req->conn;
  strbuf out = {0};
  if (req->chunks_sent == 0) {
    sb_printf(&out,
              "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              "%sConnection: %s\r\n\r\n",
              req->chunked ? "Transfer-Encoding: chunked\r\n" : "",
              req->keep_alive ? "keep-alive" : "close");
  }
  for (;;) {
    if (req->disconnect_after >= 0 && req->chunks_sent >= req->disconnect_after) {
      connection_write2(conn, out.data, out.len, NULL, 0);
      sb_free(&out);
      request_inject_disconnect(req);
      return;
    }
    if (req->chunks_sent < req->chunks_total) {
      stream_append_chunk(req, &out, req->chunks_sent);
      req->chunks_sent++;
      if (req->chunk_interval_ms > 0 && req->chunks_sent < req->chunks_total) {
        connection_write2(conn, out.data, out.len, NULL, 0);
        sb_free(&out);
        if (!conn->closing) request_start_timer(req, req->chunk_interval_ms, on_stream_timer);
        return;
      }
      if (out.len >= STREAM_WRITE_PIECE_BYTES && req->chunks_sent < req->chunks_total) {
        connection_write2(conn, out.data, out.len, NULL, 0);
        sb_free(&out);
        if (conn->closing) return;
        size_t backlog = uv_stream_get_write_queue_size((uv_stream_t *)&conn->tcp);
        request_start_timer(req, backlog >= MAX_WRITE_BACKLOG_BYTES ? 5 : 0, on_stream_timer);
        return;
      }
      continue;
    }
    if (req->include_usage) stream_append_usage(req, &out);
    stream_append_event(req, &out, "[DONE]", 6);
    if (req->chunked) sb_appends(&out, "0\r\n\r\n");
    connection_write2(conn, out.data, out.len, NULL, 0);
    sb_free(&out);
    stats.streams_completed++;
    request_finish(req);
    return;
  }
}

static void respond_models(request *req) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "object", "list");
  cJSON *data = cJSON_AddArrayToObject(root, "data");
  cJSON *model = cJSON_CreateObject();
  cJSON_AddItemToArray(data, model);
  cJSON_AddStringToObject(model, "id", config.model);
  cJSON_AddStringToObject(model, "object", "model");
  cJSON_AddNumberToObject(model, "created", 0);
  cJSON_AddStringToObject(model, "owned_by", "mockllm");
  send_json(req, 200, root, "");
  cJSON_Delete(root);
  request_finish(req);
}

static void respond_stats(request *req) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddNumberToObject(root, "total_requests", (double)stats.total_requests);
  /* in_flight leaves out this stats request itself. */
  cJSON_AddNumberToObject(root, "in_flight", (double)(in_flight - 1));
  cJSON_AddNumberToObject(root, "connections_accepted", (double)stats.connections_accepted);
  cJSON_AddNumberToObject(root, "connections_open", (double)open_connections);
  cJSON *by_route = cJSON_AddObjectToObject(root, "by_route");
  for (int r = 0; r < ROUTE_COUNT; r++)
    cJSON_AddNumberToObject(by_route, route_names[r], (double)stats.by_route[r]);
  cJSON *by_status = cJSON_AddObjectToObject(root, "by_status");
  for (int s = 100; s < 600; s++) {
    if (!stats.by_status[s]) continue;
    char name[16];
    snprintf(name, sizeof name, "%d", s);
    cJSON_AddNumberToObject(by_status, name, (double)stats.by_status[s]);
  }
  cJSON_AddNumberToObject(root, "streams_started", (double)stats.streams_started);
  cJSON_AddNumberToObject(root, "streams_completed", (double)stats.streams_completed);
  cJSON_AddNumberToObject(root, "disconnects", (double)stats.disconnects);
  cJSON_AddNumberToObject(root, "injected_disconnects", (double)stats.injected_disconnects);
  cJSON_AddNumberToObject(root, "injected_failures", (double)stats.injected_failures);
  cJSON_AddNumberToObject(root, "auth_failures", (double)stats.auth_failures);
  cJSON_AddNumberToObject(root, "bad_requests", (double)stats.bad_requests);
  if (stats.last_method.data) {
    cJSON *last = cJSON_AddObjectToObject(root, "last_request");
    cJSON_AddStringToObject(last, "method", stats.last_method.data);
    cJSON_AddStringToObject(last, "path", stats.last_path.data ? stats.last_path.data : "");
    cJSON *headers = cJSON_AddObjectToObject(last, "headers");
    const char *cursor = stats.last_headers.data;
    for (size_t i = 0; i < stats.last_header_count; i++) {
      const char *name = cursor;
      const char *value = name + strlen(name) + 1;
      cursor = value + strlen(value) + 1;
      cJSON_DeleteItemFromObjectCaseSensitive(headers, name);
      cJSON_AddStringToObject(headers, name, value);
    }
  } else {
    cJSON_AddNullToObject(root, "last_request");
  }
  if (stats.last_auth)
    cJSON_AddStringToObject(root, "last_auth", stats.last_auth);
  else
    cJSON_AddNullToObject(root, "last_auth");
  send_json(req, 200, root, "");
  cJSON_Delete(root);
  request_finish(req);
}

static void stats_reset(void) {
  sb_free(&stats.last_method);
  sb_free(&stats.last_path);
  sb_free(&stats.last_headers);
  free(stats.last_auth);
  memset(&stats, 0, sizeof stats);
}

static void stats_record_request(const request *req, const char *path, size_t path_len) {
  stats.total_requests++;
  stats.last_method.len = 0;
  sb_appends(&stats.last_method, http_method_str(req->method));
  stats.last_path.len = 0;
  sb_append(&stats.last_path, path, path_len);
  stats.last_headers.len = 0;
  stats.last_header_count = req->header_count;
  for (size_t i = 0; i < req->header_count; i++) {
    sb_append(&stats.last_headers, req->headers[i].name, strlen(req->headers[i].name) + 1);
    sb_append(&stats.last_headers, req->headers[i].value, strlen(req->headers[i].value) + 1);
  }
  free(stats.last_auth);
  const char *auth = request_header(req, "authorization");
  stats.last_auth = auth ? xstrdup(auth) : NULL;
}

static void on_latency_timer(uv_timer_t *timer) {
  request_respond(timer->data);
}

/* After the latency: auth, injected status, injected failure, then the route itself. */
static void request_respond(request *req) {
  if (!authorization_ok(req)) {
    stats.auth_failures++;
    send_status_error(req, 401);
    request_finish(req);
    return;
  }
  long forced = request_knob(req, "x-mock-status", 0, 100, 599);
  if (forced >= 400) {
    stats.injected_failures++;
    send_status_error(req, (int)forced);
    request_finish(req);
    return;
  }
  long fail_percent = request_knob(req, "x-mock-fail-percent", config.fail_percent, 0, 100);
  if (fail_percent > 0 && (long)(random_next() % 100) < fail_percent) {
    stats.injected_failures++;
    send_error(req, 500, "mockllm injected failure.", "server_error", NULL, "");
    request_finish(req);
    return;
  }
  if (req->route == ROUTE_CHAT)
    respond_chat_completion(req);
  else
    respond_models(req);
}

static void request_start(request *req) {
  req->started = 1;
  if (req->forced_status) {
    const char *message = req->forced_status == 413   ? "Request body larger than 16 MiB (mockllm)."
                          : req->forced_status == 414 ? "Request URL too long (mockllm)."
                          : req->forced_status == 431 ? "Too many request headers (mockllm)."
                                                      : "Malformed HTTP request (mockllm).";
    req->route = ROUTE_NOT_FOUND;
    send_error(req, req->forced_status, message, "invalid_request_error", NULL, "");
    request_finish(req);
    return;
  }
  const char *path = req->url.data ? req->url.data : "";
  size_t path_len = strcspn(path, "?");
  int is_get = req->method == HTTP_GET, is_post = req->method == HTTP_POST;
#define PATH_IS(literal) (path_len == sizeof(literal) - 1 && memcmp(path, literal, path_len) == 0)
  if (is_post && PATH_IS("/v1/chat/completions"))
    req->route = ROUTE_CHAT;
  else if (is_get && PATH_IS("/v1/models"))
    req->route = ROUTE_MODELS;
  else if (is_get && PATH_IS("/mock/stats"))
    req->route = ROUTE_STATS;
  else if (is_post && PATH_IS("/mock/reset"))
    req->route = ROUTE_RESET;
  else
    req->route = ROUTE_NOT_FOUND;
#undef PATH_IS
  if (req->route == ROUTE_RESET) {
    stats_reset();
    stats.by_route[ROUTE_RESET]++;
    send_response_partial(req, 200, "application/json", "", "{\"reset\":true}", 14, 14);
    request_finish(req);
    return;
  }
  stats.by_route[req->route]++;
  if (req->route == ROUTE_STATS) {
    respond_stats(req);
    return;
  }
  stats_record_request(req, path, path_len);
  if (req->route == ROUTE_NOT_FOUND) {
    char message[160];
    snprintf(message, sizeof message, "Unknown request URL: %s %.*s (mockllm).",
             http_method_str(req->method), (int)(path_len > 100 ? 100 : path_len), path);
    send_error(req, 404, message, "invalid_request_error", "unknown_url", "");
    request_finish(req);
    return;
  }
  long latency = request_knob(req, "x-mock-latency-ms", config.latency_ms, 0, MAX_DELAY_MS);
  long jitter = request_knob(req, "x-mock-jitter-ms", config.jitter_ms, 0, MAX_DELAY_MS);
  if (jitter > 0) latency += (long)(random_next() % (uint64_t)(jitter + 1));
  if (latency > 0) {
    request_start_timer(req, latency, on_latency_timer);
    return;
  }
  request_respond(req);
}

/* Starts the head request when it has not started; repeats while requests finish at once. */
static void connection_pump(connection *conn) {
  if (conn->pumping) return;
  conn->pumping = 1;
  while (!conn->closing && !conn->shutting_down && conn->queue_head && !conn->queue_head->started)
    request_start(conn->queue_head);
  conn->pumping = 0;
}

/* ---------- accept, signals, main ---------- */

static void on_connection(uv_stream_t *listener, int status) {
  if (status < 0) return;
  connection *conn = calloc(1, sizeof *conn);
  if (!conn) abort();
  uv_tcp_init(loop, &conn->tcp);
  conn->tcp.data = conn;
  conn->next = all_connections;
  if (all_connections) all_connections->prev = conn;
  all_connections = conn;
  open_connections++;
  if (uv_accept(listener, (uv_stream_t *)&conn->tcp) < 0) {
    connection_abort(conn, 0);
    return;
  }
  stats.connections_accepted++;
  uv_tcp_nodelay(&conn->tcp, 1);
  http_parser_init(&conn->parser, HTTP_REQUEST);
  conn->parser.data = conn;
  connection_update_reading(conn);
}

static void on_signal(uv_signal_t *watcher, int signum) {
  (void)watcher;
  (void)signum;
  uv_close((uv_handle_t *)&server, NULL);
  uv_close((uv_handle_t *)&sigterm_watcher, NULL);
  uv_close((uv_handle_t *)&sigint_watcher, NULL);
  for (connection *conn = all_connections; conn; conn = conn->next) connection_abort(conn, 0);
}

static void usage(FILE *out) {
  fputs("usage: mockllm --listen HOST:PORT [--latency-ms N] [--jitter-ms N] [--chunks N]\n"
        "               [--chunk-interval-ms N] [--fail-percent P] [--require-key KEY[,KEY...]]\n"
        "               [--model NAME] [--verbose]\n",
        out);
}

static int parse_long_option(const char *name, const char *text, long min, long max, long *out) {
  char *end = NULL;
  errno = 0;
  long value = strtol(text, &end, 10);
  if (errno || end == text || *end != '\0' || value < min || value > max) {
    fprintf(stderr, "mockllm: --%s expects an integer in [%ld, %ld], got '%s'\n", name, min, max,
            text);
    return -1;
  }
  *out = value;
  return 0;
}

static char **split_keys(const char *list) {
  size_t count = 1;
  for (const char *c = list; *c; c++) count += *c == ',';
  char **keys = xmalloc((count + 1) * sizeof *keys);
  size_t n = 0;
  const char *start = list;
  for (;;) {
    size_t len = strcspn(start, ",");
    if (len > 0) {
      keys[n] = xmalloc(len + 1);
      memcpy(keys[n], start, len);
      keys[n][len] = '\0';
      n++;
    }
    if (start[len] == '\0') break;
    start += len + 1;
  }
  keys[n] = NULL;
  return keys;
}

static int parse_arguments(int argc, char **argv) {
  enum {
    OPT_LISTEN = 1,
    OPT_LATENCY,
    OPT_JITTER,
    OPT_CHUNKS,
    OPT_INTERVAL,
    OPT_FAIL,
    OPT_KEY,
    OPT_MODEL,
    OPT_VERBOSE,
    OPT_HELP
  };
  static const struct option options[] = {
      {"listen", required_argument, NULL, OPT_LISTEN},
      {"latency-ms", required_argument, NULL, OPT_LATENCY},
      {"jitter-ms", required_argument, NULL, OPT_JITTER},
      {"chunks", required_argument, NULL, OPT_CHUNKS},
      {"chunk-interval-ms", required_argument, NULL, OPT_INTERVAL},
      {"fail-percent", required_argument, NULL, OPT_FAIL},
      {"require-key", required_argument, NULL, OPT_KEY},
      {"model", required_argument, NULL, OPT_MODEL},
      {"verbose", no_argument, NULL, OPT_VERBOSE},
      {"help", no_argument, NULL, OPT_HELP},
      {NULL, 0, NULL, 0},
  };
  int opt;
  while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
    int rc = 0;
    switch (opt) {
    case OPT_LISTEN:
      config.listen_address = optarg;
      break;
    case OPT_LATENCY:
      rc = parse_long_option("latency-ms", optarg, 0, MAX_DELAY_MS, &config.latency_ms);
      break;
    case OPT_JITTER:
      rc = parse_long_option("jitter-ms", optarg, 0, MAX_DELAY_MS, &config.jitter_ms);
      break;
    case OPT_CHUNKS:
      rc = parse_long_option("chunks", optarg, 0, MAX_CHUNKS, &config.chunks);
      break;
    case OPT_INTERVAL:
      rc = parse_long_option("chunk-interval-ms", optarg, 0, MAX_DELAY_MS,
                             &config.chunk_interval_ms);
      break;
    case OPT_FAIL:
      rc = parse_long_option("fail-percent", optarg, 0, 100, &config.fail_percent);
      break;
    case OPT_KEY:
      config.required_keys = split_keys(optarg);
      if (!config.required_keys[0]) {
        fputs("mockllm: --require-key needs at least one non-empty key\n", stderr);
        rc = -1;
      }
      break;
    case OPT_MODEL:
      config.model = optarg;
      break;
    case OPT_VERBOSE:
      config.verbose = 1;
      break;
    case OPT_HELP:
      usage(stdout);
      exit(0);
    default:
      usage(stderr);
      return -1;
    }
    if (rc < 0) return -1;
  }
  if (optind < argc) {
    fprintf(stderr, "mockllm: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    return -1;
  }
  if (!config.listen_address) {
    fputs("mockllm: --listen HOST:PORT is required\n", stderr);
    usage(stderr);
    return -1;
  }
  return 0;
}

/* Binds and listens on "HOST:PORT" ("[v6]:PORT" too). Writes the reason into errmsg. */
static int start_listening(const char *address, char *errmsg, size_t errmsg_size) {
  const char *colon = strrchr(address, ':');
  if (!colon || colon == address) {
    snprintf(errmsg, errmsg_size, "--listen expects HOST:PORT, got '%s'", address);
    return -1;
  }
  char host[128];
  size_t host_len = (size_t)(colon - address);
  if (address[0] == '[' && host_len >= 2 && address[host_len - 1] == ']') {
    address++;
    host_len -= 2;
  }
  if (host_len >= sizeof host) {
    snprintf(errmsg, errmsg_size, "--listen host is too long");
    return -1;
  }
  memcpy(host, address, host_len);
  host[host_len] = '\0';
  char *end = NULL;
  long port = strtol(colon + 1, &end, 10);
  if (end == colon + 1 || *end != '\0' || port < 0 || port > 65535) {
    snprintf(errmsg, errmsg_size, "--listen port must be 0..65535, got '%s'", colon + 1);
    return -1;
  }
  struct sockaddr_storage addr;
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)&addr) != 0) {
    snprintf(errmsg, errmsg_size, "--listen host '%s' is not an IP address", host);
    return -1;
  }
  int rc = uv_tcp_init(loop, &server);
  if (rc == 0) rc = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&server, 1024, on_connection);
  if (rc < 0) {
    snprintf(errmsg, errmsg_size, "cannot listen on %s:%ld: %s", host, port, uv_strerror(rc));
    return -1;
  }
  struct sockaddr_storage bound;
  int bound_len = sizeof bound;
  char bound_host[64] = "?";
  int bound_port = (int)port;
  if (uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &bound_len) == 0) {
    if (bound.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&bound, bound_host, sizeof bound_host);
      bound_port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&bound, bound_host, sizeof bound_host);
      bound_port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }
  }
  printf("mockllm listening on %s:%d\n", bound_host, bound_port);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (parse_arguments(argc, argv) < 0) return 2;
  signal(SIGPIPE, SIG_IGN);
  random_state = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ 0x9E3779B97F4A7C15ULL;
  if (!random_state) random_state = 1;

  parser_settings.on_message_begin = on_message_begin;
  parser_settings.on_url = on_url;
  parser_settings.on_header_field = on_header_field;
  parser_settings.on_header_value = on_header_value;
  parser_settings.on_headers_complete = on_headers_complete;
  parser_settings.on_body = on_body;
  parser_settings.on_message_complete = on_message_complete;

  loop = uv_default_loop();
  char errmsg[512];
  if (start_listening(config.listen_address, errmsg, sizeof errmsg) < 0) {
    fprintf(stderr, "mockllm: %s\n", errmsg);
    return 1;
  }
  uv_signal_init(loop, &sigterm_watcher);
  uv_signal_init(loop, &sigint_watcher);
  uv_signal_start(&sigterm_watcher, on_signal, SIGTERM);
  uv_signal_start(&sigint_watcher, on_signal, SIGINT);

  uv_run(loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(loop);
  stats_reset();
  if (config.required_keys) {
    for (char **key = config.required_keys; *key; key++) free(*key);
    free(config.required_keys);
  }
  if (rc != 0) fprintf(stderr, "mockllm: uv_loop_close(): %s\n", uv_strerror(rc));
  return 0;
}
