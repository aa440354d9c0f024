/*
 * mockllm: a small OpenAI-compatible stand-in for the upstream model API, used as the
 * upstream by every zonegate test and benchmark.
 *
 * Happy path: one libuv loop accepts HTTP/1.x connections; http_parser splits each byte
 * stream into requests (keep-alive and pipelining: requests queue per connection and are
 * answered strictly in order). Routes: POST /v1/chat/completions, /v1/completions and
 * /v1/responses (JSON or SSE streams), /v1/embeddings, /v1/moderations,
 * /v1/audio/transcriptions and /v1/files (multipart), GET /v1/models[/{id}], /v1/files/{id},
 * GET /mock/stats, GET /mock/requests (the last 64 requests as received), POST /mock/reset.
 * Request headers X-Mock-* change one request's behaviour (latency, chunks, status,
 * injected failures and disconnects, echo, gzip, extra answer headers, determinism);
 * README.md lists them. Standalone: libuv, http_parser, cJSON, zlib.
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
#include <zlib.h>

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
  ROUTE_COMPLETIONS,
  ROUTE_EMBEDDINGS,
  ROUTE_MODERATIONS,
  ROUTE_RESPONSES,
  ROUTE_MODEL,
  ROUTE_TRANSCRIPTIONS,
  ROUTE_FILES,
  ROUTE_FILE,
  ROUTE_REQUESTS,
  ROUTE_COUNT,
};

static const char *const route_names[ROUTE_COUNT] = {
    "chat_completions", "models",     "stats",       "reset",     "not_found",
    "completions",      "embeddings", "moderations", "responses", "model",
    "transcriptions",   "files",      "file",        "requests"};

/* Stream kinds: which OpenAI event shapes a stream sends. */
enum stream_kind { STREAM_CHAT, STREAM_COMPLETION, STREAM_RESPONSE };

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
  char *name;     /* lower-cased */
  char *raw_name; /* as the client sent it */
  char *value;
} header_pair;

struct connection;

typedef struct request {
  struct request *next;
  struct connection *conn;
  uv_timer_t timer; /* latency and chunk spacing; initialised on first use */
  int timer_initialized;
  enum http_method method;
  int http_major;
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
  /* answer shaping (X-Mock-Deterministic, X-Mock-Gzip, X-Mock-Partial-Close) */
  uint64_t body_hash;
  char request_id[40]; /* x-request-id of every answer: req_<hex of the body's hashes> */
  int deterministic;
  enum stream_kind stream_kind;
  char item_id[48]; /* responses: id of the output message */
  z_stream *gz;     /* gzip state of a compressed stream */
  int partial_close;
  int cut; /* the half event went out: close now */
  int head_sent;
  long events_sent;
  long sequence_number;
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
    free(req->headers[i].raw_name);
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
  if (req->gz) {
    deflateEnd(req->gz);
    free(req->gz);
  }
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
    if (b_len) memcpy(op->data + pos, b, b_len);
    pos += b_len;
  } else {
    size_t skip = written - a_len;
    if (b_len > skip) memcpy(op->data, b + skip, b_len - skip);
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
  req->headers[req->header_count].raw_name = xstrdup(req->field.data ? req->field.data : "");
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
  req->http_major = p->http_major;
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

/* ---------- answer shaping: hashes, base64, gzip, common headers ---------- */

static uint64_t fnv1a(const void *data, size_t len, uint64_t seed) {
  const unsigned char *p = data;
  uint64_t h = 0xcbf29ce484222325ULL ^ seed;
  for (size_t i = 0; i < len; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  /* a final mix so that short inputs spread over every bit */
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return h;
}

static void base64_append(strbuf *out, const unsigned char *data, size_t len) {
  static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  sb_reserve(out, (len + 2) / 3 * 4);
  for (size_t i = 0; i < len; i += 3) {
    uint32_t v = (uint32_t)data[i] << 16;
    if (i + 1 < len) v |= (uint32_t)data[i + 1] << 8;
    if (i + 2 < len) v |= data[i + 2];
    char quad[4] = {alphabet[(v >> 18) & 63], alphabet[(v >> 12) & 63],
                    i + 1 < len ? alphabet[(v >> 6) & 63] : '=',
                    i + 2 < len ? alphabet[v & 63] : '='};
    sb_append(out, quad, 4);
  }
  sb_append(out, "", 0); /* NUL-terminated even when len is 0 */
}

/* Compresses in into out with zlib's gzip wrapper; flush is Z_SYNC_FLUSH (the receiver can
 * decode everything so far) or Z_FINISH (the gzip trailer follows). */
static void gzip_feed(z_stream *z, const char *in, size_t in_len, int flush, strbuf *out) {
  z->next_in = (Bytef *)(uintptr_t)in;
  z->avail_in = (uInt)in_len;
  for (;;) {
    sb_reserve(out, 16384);
    z->next_out = (Bytef *)out->data + out->len;
    z->avail_out = (uInt)(out->cap - out->len - 1);
    uInt before = z->avail_out;
    int rc = deflate(z, flush);
    out->len += before - z->avail_out;
    out->data[out->len] = '\0';
    if (rc == Z_STREAM_ERROR) abort();
    if (flush == Z_FINISH ? rc == Z_STREAM_END : z->avail_out != 0) break;
  }
}

static z_stream *gzip_new(void) {
  z_stream *z = calloc(1, sizeof *z);
  if (!z ||
      deflateInit2(z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    abort();
  return z;
}

static int request_is_mock_route(const request *req) {
  return req->route == ROUTE_STATS || req->route == ROUTE_RESET || req->route == ROUTE_REQUESTS;
}

static int request_wants_gzip(const request *req) {
  const char *gzip = request_header(req, "x-mock-gzip");
  return gzip && strcmp(gzip, "1") == 0 && !request_is_mock_route(req);
}

/* Header lines every answer carries: x-request-id, openai-processing-ms, on a 429 the rate
 * limit headers (and x-should-retry: false when asked), then each X-Mock-Response-Header. */
static void append_common_headers(const request *req, int status, strbuf *out) {
  sb_printf(out, "x-request-id: %s\r\nopenai-processing-ms: 1\r\n", req->request_id);
  if (status == 429) {
    sb_appends(out, "x-ratelimit-limit-requests: 60\r\nx-ratelimit-remaining-requests: 0\r\n"
                    "x-ratelimit-reset-requests: 1s\r\nretry-after-ms: 1000\r\n");
    const char *should_retry = request_header(req, "x-mock-should-retry");
    if (should_retry && strcasecmp(should_retry, "false") == 0)
      sb_appends(out, "x-should-retry: false\r\n");
  }
  for (size_t i = 0; i < req->header_count; i++) {
    if (strcmp(req->headers[i].name, "x-mock-response-header") != 0) continue;
    const char *line = req->headers[i].value;
    const char *colon = strchr(line, ':');
    if (!colon || colon == line || strpbrk(line, "\r\n")) continue;
    int token = 1;
    for (const char *c = line; c < colon; c++)
      if (*c <= ' ' || *c >= 127) token = 0;
    if (!token) continue;
    sb_appends(out, line);
    sb_appends(out, "\r\n");
  }
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
  int keep_alive = req->keep_alive && !req->forced_status;
  strbuf compressed = {0};
  if (request_wants_gzip(req)) {
    z_stream *z = gzip_new();
    gzip_feed(z, body, body_len, Z_FINISH, &compressed);
    deflateEnd(z);
    free(z);
    body_send_len = body_send_len == body_len ? compressed.len : compressed.len / 2;
    body = compressed.data;
    body_len = compressed.len;
  }
  strbuf head = {0};
  sb_printf(
      &head, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: %s\r\n",
      status, status_text(status), content_type, body_len, keep_alive ? "keep-alive" : "close");
  if (compressed.data) sb_appends(&head, "Content-Encoding: gzip\r\n");
  append_common_headers(req, status, &head);
  sb_appends(&head, extra_headers);
  sb_appends(&head, "\r\n");
  req->status_sent = status;
  if (!request_is_mock_route(req) && status >= 100 && status < 600) stats.by_status[status]++;
  connection_write2(req->conn, head.data, head.len, body, body_send_len);
  sb_free(&head);
  sb_free(&compressed);
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

static long token_estimate(size_t bytes) {
  long tokens = (long)(bytes + 3) / 4;
  return tokens < 1 ? 1 : tokens;
}

/* The request body as a JSON object, or NULL after answering 400. */
static cJSON *parse_json_body(request *req) {
  cJSON *body = cJSON_ParseWithLength(req->body.data ? req->body.data : "", req->body.len);
  if (!body || !cJSON_IsObject(body)) {
    cJSON_Delete(body);
    send_error(req, 400, "We could not parse the JSON body of your request (mockllm).",
               "invalid_request_error", NULL, "");
    request_finish(req);
    return NULL;
  }
  return body;
}

/* The answer's id (prefix + serial, or + a hash of the body with X-Mock-Deterministic) and
 * its created time (now, or derived from the body). */
static void assign_ids(request *req, const char *prefix) {
  response_serial++;
  if (req->deterministic) {
    snprintf(req->completion_id, sizeof req->completion_id, "%s%016llx", prefix,
             (unsigned long long)req->body_hash);
    req->created = 1700000000 + (int64_t)(req->body_hash % 100000000ULL);
  } else {
    snprintf(req->completion_id, sizeof req->completion_id, "%smock-%llu", prefix,
             (unsigned long long)response_serial);
    req->created = (int64_t)time(NULL);
  }
}

/* Sends a 200 JSON answer (X-Mock-Disconnect-After: half of it, then close) and finishes. */
static void finish_json(request *req, cJSON *root) {
  long disconnect_after = request_knob(req, "x-mock-disconnect-after", -1, 0, LONG_MAX);
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  size_t len = strlen(text);
  send_response_partial(req, 200, "application/json", "", text, len,
                        disconnect_after >= 0 ? len / 2 : len);
  cJSON_free(text);
  cJSON_Delete(root);
  if (disconnect_after >= 0)
    request_inject_disconnect(req);
  else
    request_finish(req);
}

static int stream_requested(const request *req, const cJSON *body) {
  if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(body, "stream"))) return 0;
  const char *as_json = request_header(req, "x-mock-stream-as-json");
  return !(as_json && strcmp(as_json, "1") == 0);
}

/* Starts an SSE stream of content (ownership taken) split into X-Mock-Chunks pieces. */
static void stream_begin(request *req, enum stream_kind kind, const char *model, strbuf *content,
                         long prompt_tokens, int include_usage) {
  if (!content->data) sb_appends(content, "");
  req->stream_kind = kind;
  if (!req->stream_model) req->stream_model = xstrdup(model);
  if (req->stream_content != content->data) {
    free(req->stream_content);
    req->stream_content = content->data;
  }
  size_t content_len = content->len;
  *content = (strbuf){0};
  req->chunks_total = request_knob(req, "x-mock-chunks", config.chunks, 0, MAX_CHUNKS);
  req->chunk_interval_ms =
      request_knob(req, "x-mock-chunk-interval-ms", config.chunk_interval_ms, 0, MAX_DELAY_MS);
  req->disconnect_after = request_knob(req, "x-mock-disconnect-after", -1, 0, LONG_MAX);
  const char *partial = request_header(req, "x-mock-partial-close");
  req->partial_close = partial && strcmp(partial, "1") == 0;
  req->include_usage = include_usage;
  req->prompt_tokens = prompt_tokens;
  req->chunked = req->http_minor >= 1;
  if (!req->chunked) req->keep_alive = 0;
  if (request_wants_gzip(req)) req->gz = gzip_new();
  /* Split the content into chunks_total pieces on UTF-8 character boundaries. */
  long pieces = req->chunks_total;
  const char *text = req->stream_content;
  req->piece_ends = xmalloc(sizeof(size_t) * (size_t)(pieces ? pieces : 1));
  for (long i = 0; i < pieces; i++) {
    size_t end = i + 1 == pieces ? content_len : content_len * (size_t)(i + 1) / (size_t)pieces;
    while (end < content_len && ((unsigned char)text[end] & 0xC0) == 0x80) end++;
    if (i > 0 && end < req->piece_ends[i - 1]) end = req->piece_ends[i - 1];
    req->piece_ends[i] = end;
  }
  stats.streams_started++;
  req->status_sent = 200;
  stats.by_status[200]++;
  stream_step(req);
}

static void respond_chat_completion(request *req) {
  cJSON *body = parse_json_body(req);
  if (!body) return;
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
  long prompt_tokens = token_estimate(all_text.len);
  long completion_tokens = token_estimate(content.len);
  sb_free(&all_text);

  const cJSON *stream_options = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
  int include_usage =
      cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(stream_options, "include_usage"));
  assign_ids(req, "chatcmpl-");

  if (stream_requested(req, body)) {
    stream_begin(req, STREAM_CHAT, model, &content, prompt_tokens, include_usage);
    cJSON_Delete(body);
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
  finish_json(req, root);
}

/* Text of a prompt / input: a string, or the strings of an array joined. */
static void append_prompt_text(strbuf *out, const cJSON *prompt) {
  if (cJSON_IsString(prompt)) {
    sb_appends(out, prompt->valuestring);
  } else if (cJSON_IsArray(prompt)) {
    const cJSON *item;
    cJSON_ArrayForEach(item, prompt) {
      if (cJSON_IsString(item)) sb_appends(out, item->valuestring);
    }
  }
}

static void respond_completions(request *req) {
  cJSON *body = parse_json_body(req);
  if (!body) return;
  const cJSON *model_item = cJSON_GetObjectItemCaseSensitive(body, "model");
  const char *model = cJSON_IsString(model_item) ? model_item->valuestring : config.model;
  strbuf prompt = {0};
  append_prompt_text(&prompt, cJSON_GetObjectItemCaseSensitive(body, "prompt"));
  strbuf content = {0};
  sb_appends(&content, "mock completion for: ");
  if (prompt.data) sb_appends(&content, prompt.data);
  long prompt_tokens = token_estimate(prompt.len);
  long completion_tokens = token_estimate(content.len);
  sb_free(&prompt);
  const cJSON *stream_options = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
  int include_usage =
      cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(stream_options, "include_usage"));
  assign_ids(req, "cmpl-");
  if (stream_requested(req, body)) {
    stream_begin(req, STREAM_COMPLETION, model, &content, prompt_tokens, include_usage);
    cJSON_Delete(body);
    return;
  }
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object", "text_completion");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", model);
  cJSON *choices = cJSON_AddArrayToObject(root, "choices");
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddItemToArray(choices, choice);
  cJSON_AddStringToObject(choice, "text", content.data);
  cJSON_AddNumberToObject(choice, "index", 0);
  cJSON_AddNullToObject(choice, "logprobs");
  cJSON_AddStringToObject(choice, "finish_reason", "stop");
  cJSON *usage = cJSON_AddObjectToObject(root, "usage");
  cJSON_AddNumberToObject(usage, "prompt_tokens", (double)prompt_tokens);
  cJSON_AddNumberToObject(usage, "completion_tokens", (double)completion_tokens);
  cJSON_AddNumberToObject(usage, "total_tokens", (double)(prompt_tokens + completion_tokens));
  sb_free(&content);
  cJSON_Delete(body);
  finish_json(req, root);
}

/* Responses API: the message output item (text so far, status) and the response object. */
static cJSON *response_message_item(const request *req, const char *text, int done) {
  cJSON *item = cJSON_CreateObject();
  cJSON_AddStringToObject(item, "id", req->item_id);
  cJSON_AddStringToObject(item, "type", "message");
  cJSON_AddStringToObject(item, "status", done ? "completed" : "in_progress");
  cJSON_AddStringToObject(item, "role", "assistant");
  cJSON *content = cJSON_AddArrayToObject(item, "content");
  if (text) {
    cJSON *part = cJSON_CreateObject();
    cJSON_AddStringToObject(part, "type", "output_text");
    cJSON_AddStringToObject(part, "text", text);
    cJSON_AddArrayToObject(part, "annotations");
    cJSON_AddItemToArray(content, part);
  }
  return item;
}

static cJSON *response_object(const request *req, int done) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object", "response");
  cJSON_AddNumberToObject(root, "created_at", (double)req->created);
  cJSON_AddStringToObject(root, "status", done ? "completed" : "in_progress");
  cJSON_AddNullToObject(root, "error");
  cJSON_AddNullToObject(root, "incomplete_details");
  cJSON_AddNullToObject(root, "instructions");
  cJSON_AddNullToObject(root, "max_output_tokens");
  cJSON_AddStringToObject(root, "model", req->stream_model);
  cJSON *output = cJSON_AddArrayToObject(root, "output");
  if (done) cJSON_AddItemToArray(output, response_message_item(req, req->stream_content, 1));
  cJSON_AddTrueToObject(root, "parallel_tool_calls");
  cJSON_AddNullToObject(root, "previous_response_id");
  cJSON_AddNumberToObject(root, "temperature", 1);
  cJSON *text = cJSON_AddObjectToObject(root, "text");
  cJSON_AddStringToObject(cJSON_AddObjectToObject(text, "format"), "type", "text");
  cJSON_AddStringToObject(root, "tool_choice", "auto");
  cJSON_AddArrayToObject(root, "tools");
  cJSON_AddNumberToObject(root, "top_p", 1);
  if (done) {
    long output_tokens = token_estimate(strlen(req->stream_content));
    cJSON *usage = cJSON_AddObjectToObject(root, "usage");
    cJSON_AddNumberToObject(usage, "input_tokens", (double)req->prompt_tokens);
    cJSON_AddNumberToObject(usage, "output_tokens", (double)output_tokens);
    cJSON_AddNumberToObject(usage, "total_tokens", (double)(req->prompt_tokens + output_tokens));
  } else {
    cJSON_AddNullToObject(root, "usage");
  }
  return root;
}

static void respond_responses(request *req) {
  cJSON *body = parse_json_body(req);
  if (!body) return;
  const cJSON *model_item = cJSON_GetObjectItemCaseSensitive(body, "model");
  const char *model = cJSON_IsString(model_item) ? model_item->valuestring : config.model;
  const cJSON *input = cJSON_GetObjectItemCaseSensitive(body, "input");
  strbuf all_text = {0};
  const cJSON *last = NULL;
  if (cJSON_IsString(input)) {
    last = input;
    sb_appends(&all_text, input->valuestring);
  } else if (cJSON_IsArray(input)) {
    const cJSON *item;
    cJSON_ArrayForEach(item, input) {
      const cJSON *content =
          cJSON_IsString(item) ? item : cJSON_GetObjectItemCaseSensitive(item, "content");
      append_content_text(&all_text, content);
      if (content) last = content;
    }
  }
  strbuf content = {0};
  sb_appends(&content, "mock reply to: ");
  if (last) append_content_text(&content, last);
  req->prompt_tokens = token_estimate(all_text.len);
  sb_free(&all_text);
  assign_ids(req, "resp_");
  snprintf(req->item_id, sizeof req->item_id, "msg_%s", req->completion_id + 5);
  req->stream_model = xstrdup(model);
  if (stream_requested(req, body)) {
    stream_begin(req, STREAM_RESPONSE, model, &content, req->prompt_tokens, 0);
    cJSON_Delete(body);
    return;
  }
  req->stream_content = content.data;
  cJSON_Delete(body);
  finish_json(req, response_object(req, 1));
}

/* Deterministic embedding values: multiples of 1/128 in [-1, 1), exact in float32. */
static float embedding_value(const char *text, size_t len, long index) {
  uint64_t h = fnv1a(text, len, (uint64_t)index * 0x9E3779B97F4A7C15ULL + 1);
  return (float)((int)(h & 0xff) - 128) / 128.0f;
}

static void respond_embeddings(request *req) {
  cJSON *body = parse_json_body(req);
  if (!body) return;
  const cJSON *model_item = cJSON_GetObjectItemCaseSensitive(body, "model");
  const char *model = cJSON_IsString(model_item) ? model_item->valuestring : config.model;
  long dims = 8;
  const cJSON *dims_item = cJSON_GetObjectItemCaseSensitive(body, "dimensions");
  if (cJSON_IsNumber(dims_item) && dims_item->valuedouble >= 1 && dims_item->valuedouble <= 4096)
    dims = (long)dims_item->valuedouble;
  const cJSON *format = cJSON_GetObjectItemCaseSensitive(body, "encoding_format");
  int base64 = cJSON_IsString(format) && strcmp(format->valuestring, "base64") == 0;
  const cJSON *input = cJSON_GetObjectItemCaseSensitive(body, "input");
  /* One input per string; an array of strings or of token arrays is many inputs. */
  int many = cJSON_IsArray(input) && cJSON_GetArraySize(input) > 0 &&
             !cJSON_IsNumber(cJSON_GetArrayItem(input, 0));
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "object", "list");
  cJSON *data = cJSON_AddArrayToObject(root, "data");
  size_t total_len = 0;
  int count = many ? cJSON_GetArraySize(input) : 1;
  for (int i = 0; i < count; i++) {
    const cJSON *one = many ? cJSON_GetArrayItem(input, i) : input;
    char *text = cJSON_IsString(one) ? NULL : cJSON_PrintUnformatted(one);
    const char *value = cJSON_IsString(one) ? one->valuestring : text ? text : "";
    size_t len = strlen(value);
    total_len += len;
    cJSON *item = cJSON_CreateObject();
    cJSON_AddStringToObject(item, "object", "embedding");
    cJSON_AddNumberToObject(item, "index", i);
    if (base64) {
      float *floats = xmalloc(sizeof(float) * (size_t)dims);
      for (long j = 0; j < dims; j++) floats[j] = embedding_value(value, len, j);
      strbuf encoded = {0};
      base64_append(&encoded, (const unsigned char *)floats, sizeof(float) * (size_t)dims);
      cJSON_AddStringToObject(item, "embedding", encoded.data);
      sb_free(&encoded);
      free(floats);
    } else {
      cJSON *vector = cJSON_AddArrayToObject(item, "embedding");
      for (long j = 0; j < dims; j++)
        cJSON_AddItemToArray(vector, cJSON_CreateNumber(embedding_value(value, len, j)));
    }
    cJSON_AddItemToArray(data, item);
    cJSON_free(text);
  }
  cJSON_AddStringToObject(root, "model", model);
  cJSON *usage = cJSON_AddObjectToObject(root, "usage");
  cJSON_AddNumberToObject(usage, "prompt_tokens", (double)token_estimate(total_len));
  cJSON_AddNumberToObject(usage, "total_tokens", (double)token_estimate(total_len));
  cJSON_Delete(body);
  finish_json(req, root);
}

static void respond_moderations(request *req) {
  static const char *const categories[] = {"harassment",
                                           "harassment/threatening",
                                           "hate",
                                           "hate/threatening",
                                           "illicit",
                                           "illicit/violent",
                                           "self-harm",
                                           "self-harm/instructions",
                                           "self-harm/intent",
                                           "sexual",
                                           "sexual/minors",
                                           "violence",
                                           "violence/graphic"};
  cJSON *body = parse_json_body(req);
  if (!body) return;
  const cJSON *model_item = cJSON_GetObjectItemCaseSensitive(body, "model");
  const char *model =
      cJSON_IsString(model_item) ? model_item->valuestring : "omni-moderation-latest";
  const cJSON *input = cJSON_GetObjectItemCaseSensitive(body, "input");
  assign_ids(req, "modr-");
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "model", model);
  cJSON *results = cJSON_AddArrayToObject(root, "results");
  int count = cJSON_IsArray(input) ? cJSON_GetArraySize(input) : 1;
  for (int i = 0; i < count; i++) {
    const cJSON *one = cJSON_IsArray(input) ? cJSON_GetArrayItem(input, i) : input;
    const cJSON *text = cJSON_IsString(one) ? one : cJSON_GetObjectItemCaseSensitive(one, "text");
    /* Flagged (as violence) when the text contains "mock-flag". */
    int flagged = cJSON_IsString(text) && strstr(text->valuestring, "mock-flag") != NULL;
    cJSON *result = cJSON_CreateObject();
    cJSON_AddBoolToObject(result, "flagged", flagged);
    cJSON *flags = cJSON_AddObjectToObject(result, "categories");
    cJSON *scores = cJSON_AddObjectToObject(result, "category_scores");
    for (size_t c = 0; c < sizeof categories / sizeof *categories; c++) {
      int hit = flagged && strcmp(categories[c], "violence") == 0;
      cJSON_AddBoolToObject(flags, categories[c], hit);
      cJSON_AddNumberToObject(scores, categories[c], hit ? 0.96875 : 0.0001220703125);
    }
    cJSON_AddItemToArray(results, result);
  }
  cJSON_Delete(body);
  finish_json(req, root);
}

/* ---------- multipart/form-data (audio transcriptions, file uploads) ---------- */

typedef struct {
  char name[64];
  char filename[256];
  const char *data;
  size_t len;
} form_part;

/* Copies the value of parameter key (name, filename) of a Content-Disposition line. */
static void disposition_param(const char *line, size_t line_len, const char *key, char *out,
                              size_t out_size) {
  out[0] = '\0';
  size_t key_len = strlen(key);
  const char *end = line + line_len;
  for (const char *p = line; p < end; p++) {
    if (*p != ';') continue;
    const char *q = p + 1;
    while (q < end && (*q == ' ' || *q == '\t')) q++;
    if ((size_t)(end - q) <= key_len || strncasecmp(q, key, key_len) != 0 || q[key_len] != '=')
      continue;
    q += key_len + 1;
    size_t n = 0;
    if (q < end && *q == '"') {
      q++;
      while (q < end && *q != '"' && n + 1 < out_size) out[n++] = *q++;
    } else {
      while (q < end && *q != ';' && *q != ' ' && n + 1 < out_size) out[n++] = *q++;
    }
    out[n] = '\0';
    return;
  }
}

/* Splits a multipart/form-data body into at most max parts; returns how many (0 if none). */
static int multipart_parts(const request *req, form_part *parts, int max) {
  const char *type = request_header(req, "content-type");
  const char *b = type ? strcasestr(type, "boundary=") : NULL;
  if (!b || !req->body.data) return 0;
  b += 9;
  char delimiter[256] = "--";
  size_t n = 2;
  if (*b == '"') b++;
  while (*b && *b != '"' && *b != ';' && n + 1 < sizeof delimiter) delimiter[n++] = *b++;
  delimiter[n] = '\0';
  const char *body = req->body.data, *end = req->body.data + req->body.len;
  const char *at = memmem(body, req->body.len, delimiter, n);
  int count = 0;
  while (at && count < max) {
    at += n;
    if (end - at >= 2 && at[0] == '-' && at[1] == '-') break;
    if (end - at >= 2 && at[0] == '\r' && at[1] == '\n') at += 2;
    const char *head_end = memmem(at, (size_t)(end - at), "\r\n\r\n", 4);
    if (!head_end) break;
    form_part *part = &parts[count];
    memset(part, 0, sizeof *part);
    for (const char *line = at; line < head_end;) {
      const char *eol = memmem(line, (size_t)(head_end - line), "\r\n", 2);
      if (!eol) eol = head_end;
      if ((size_t)(eol - line) > 20 && strncasecmp(line, "content-disposition:", 20) == 0) {
        disposition_param(line, (size_t)(eol - line), "name", part->name, sizeof part->name);
        disposition_param(line, (size_t)(eol - line), "filename", part->filename,
                          sizeof part->filename);
      }
      line = eol + 2;
    }
    part->data = head_end + 4;
    char closing[260];
    snprintf(closing, sizeof closing, "\r\n%s", delimiter);
    const char *next = memmem(part->data, (size_t)(end - part->data), closing, n + 2);
    if (!next) break;
    part->len = (size_t)(next - part->data);
    count++;
    at = next + 2;
  }
  return count;
}

static const form_part *form_find(const form_part *parts, int count, const char *name) {
  for (int i = 0; i < count; i++)
    if (strcmp(parts[i].name, name) == 0) return &parts[i];
  return NULL;
}

static void form_value(const form_part *part, char *out, size_t out_size) {
  out[0] = '\0';
  if (!part) return;
  size_t n = part->len < out_size - 1 ? part->len : out_size - 1;
  memcpy(out, part->data, n);
  out[n] = '\0';
}

/* A multipart request without a "file" part gets 400; returns the part or NULL. */
static const form_part *require_file_part(request *req, form_part *parts, int *count) {
  *count = multipart_parts(req, parts, 32);
  const form_part *file = form_find(parts, *count, "file");
  if (!file) {
    send_error(req, 400, "A multipart/form-data body with a 'file' part is required (mockllm).",
               "invalid_request_error", NULL, "");
    request_finish(req);
  }
  return file;
}

static void respond_transcriptions(request *req) {
  form_part parts[32];
  int count = 0;
  const form_part *file = require_file_part(req, parts, &count);
  if (!file) return;
  char format[32];
  form_value(form_find(parts, count, "response_format"), format, sizeof format);
  char text[64];
  snprintf(text, sizeof text, "received %zu bytes", file->len);
  if (strcmp(format, "text") == 0) {
    size_t len = strlen(text);
    send_response_partial(req, 200, "text/plain; charset=utf-8", "", text, len, len);
    request_finish(req);
    return;
  }
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "text", text);
  finish_json(req, root);
}

/* Uploaded files, remembered so that GET /v1/files/{id} finds them (the last 64). */
#define MAX_UPLOADS 64
typedef struct {
  char id[48];
  char filename[256];
  char purpose[64];
  size_t bytes;
  int64_t created_at;
} upload;
static upload uploads[MAX_UPLOADS];
static size_t upload_next;

static cJSON *file_object(const upload *u) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", u->id);
  cJSON_AddStringToObject(root, "object", "file");
  cJSON_AddNumberToObject(root, "bytes", (double)u->bytes);
  cJSON_AddNumberToObject(root, "created_at", (double)u->created_at);
  cJSON_AddStringToObject(root, "filename", u->filename);
  cJSON_AddStringToObject(root, "purpose", u->purpose);
  cJSON_AddStringToObject(root, "status", "processed");
  cJSON_AddNullToObject(root, "expires_at");
  cJSON_AddNullToObject(root, "status_details");
  return root;
}

static void respond_files_upload(request *req) {
  form_part parts[32];
  int count = 0;
  const form_part *file = require_file_part(req, parts, &count);
  if (!file) return;
  assign_ids(req, "file-");
  upload *u = &uploads[upload_next++ % MAX_UPLOADS];
  memset(u, 0, sizeof *u);
  snprintf(u->id, sizeof u->id, "%s", req->completion_id);
  snprintf(u->filename, sizeof u->filename, "%s", file->filename);
  form_value(form_find(parts, count, "purpose"), u->purpose, sizeof u->purpose);
  u->bytes = file->len;
  u->created_at = req->created;
  finish_json(req, file_object(u));
}

static void respond_file_get(request *req, const char *id, size_t id_len) {
  for (size_t i = 0; i < MAX_UPLOADS; i++) {
    if (uploads[i].id[0] && strlen(uploads[i].id) == id_len &&
        memcmp(uploads[i].id, id, id_len) == 0) {
      finish_json(req, file_object(&uploads[i]));
      return;
    }
  }
  char message[160];
  snprintf(message, sizeof message, "No such File object: %.*s", (int)(id_len > 100 ? 100 : id_len),
           id);
  send_error(req, 404, message, "invalid_request_error", NULL, "");
  request_finish(req);
}

static void respond_model(request *req, const char *id, size_t id_len) {
  char name[256];
  snprintf(name, sizeof name, "%.*s", (int)(id_len > 200 ? 200 : id_len), id);
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", name);
  cJSON_AddStringToObject(root, "object", "model");
  cJSON_AddNumberToObject(root, "created", 0);
  cJSON_AddStringToObject(root, "owned_by", "mockllm");
  finish_json(req, root);
}

/* ---------- SSE streams ---------- */

/* Appends one SSE event (`event: type` line when type is set) to plain. With
 * X-Mock-Partial-Close, the second event goes out cut in half and the stream is marked cut. */
static void stream_add_event(request *req, strbuf *plain, const char *type, const char *data,
                             size_t len) {
  if (req->cut) return;
  strbuf event = {0};
  if (type) sb_printf(&event, "event: %s\n", type);
  sb_appends(&event, "data: ");
  sb_append(&event, data, len);
  sb_appends(&event, "\n\n");
  if (req->partial_close && req->events_sent == 1) {
    sb_append(plain, event.data, event.len / 2);
    req->cut = 1;
  } else {
    sb_append(plain, event.data, event.len);
  }
  req->events_sent++;
  sb_free(&event);
}

/* Adds "sequence_number" to a typed Responses event, prints it and deletes it. */
static void stream_add_typed(request *req, strbuf *plain, const char *type, cJSON *root) {
  cJSON_AddNumberToObject(root, "sequence_number", (double)req->sequence_number++);
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  stream_add_event(req, plain, type, text, strlen(text));
  cJSON_free(text);
  cJSON_Delete(root);
}

static cJSON *typed_event(const char *type) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "type", type);
  return root;
}

static cJSON *text_part(const char *text) {
  cJSON *part = cJSON_CreateObject();
  cJSON_AddStringToObject(part, "type", "output_text");
  cJSON_AddStringToObject(part, "text", text);
  cJSON_AddArrayToObject(part, "annotations");
  return part;
}

static void response_add_indices(cJSON *root, const request *req, int content_index) {
  cJSON_AddStringToObject(root, "item_id", req->item_id);
  cJSON_AddNumberToObject(root, "output_index", 0);
  if (content_index) cJSON_AddNumberToObject(root, "content_index", 0);
}

static void response_stream_prelude(request *req, strbuf *plain) {
  cJSON *ev = typed_event("response.created");
  cJSON_AddItemToObject(ev, "response", response_object(req, 0));
  stream_add_typed(req, plain, "response.created", ev);
  ev = typed_event("response.in_progress");
  cJSON_AddItemToObject(ev, "response", response_object(req, 0));
  stream_add_typed(req, plain, "response.in_progress", ev);
  ev = typed_event("response.output_item.added");
  cJSON_AddNumberToObject(ev, "output_index", 0);
  cJSON_AddItemToObject(ev, "item", response_message_item(req, NULL, 0));
  stream_add_typed(req, plain, "response.output_item.added", ev);
  ev = typed_event("response.content_part.added");
  response_add_indices(ev, req, 1);
  cJSON_AddItemToObject(ev, "part", text_part(""));
  stream_add_typed(req, plain, "response.content_part.added", ev);
}

static void response_stream_finale(request *req, strbuf *plain) {
  cJSON *ev = typed_event("response.output_text.done");
  response_add_indices(ev, req, 1);
  cJSON_AddStringToObject(ev, "text", req->stream_content);
  cJSON_AddArrayToObject(ev, "logprobs");
  stream_add_typed(req, plain, "response.output_text.done", ev);
  ev = typed_event("response.content_part.done");
  response_add_indices(ev, req, 1);
  cJSON_AddItemToObject(ev, "part", text_part(req->stream_content));
  stream_add_typed(req, plain, "response.content_part.done", ev);
  ev = typed_event("response.output_item.done");
  cJSON_AddNumberToObject(ev, "output_index", 0);
  cJSON_AddItemToObject(ev, "item", response_message_item(req, req->stream_content, 1));
  stream_add_typed(req, plain, "response.output_item.done", ev);
  ev = typed_event("response.completed");
  cJSON_AddItemToObject(ev, "response", response_object(req, 1));
  stream_add_typed(req, plain, "response.completed", ev);
}

static void stream_append_chunk(request *req, strbuf *plain, long index) {
  size_t start = index == 0 ? 0 : req->piece_ends[index - 1];
  size_t end = req->piece_ends[index];
  char saved = req->stream_content[end];
  req->stream_content[end] = '\0';
  const char *piece = req->stream_content + start;
  int last = index + 1 == req->chunks_total;
  cJSON *root;
  if (req->stream_kind == STREAM_RESPONSE) {
    root = typed_event("response.output_text.delta");
    response_add_indices(root, req, 1);
    cJSON_AddStringToObject(root, "delta", piece);
    cJSON_AddArrayToObject(root, "logprobs");
    req->stream_content[end] = saved;
    stream_add_typed(req, plain, "response.output_text.delta", root);
    return;
  }
  root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  int chat = req->stream_kind == STREAM_CHAT;
  cJSON_AddStringToObject(root, "object", chat ? "chat.completion.chunk" : "text_completion");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", req->stream_model);
  cJSON *choices = cJSON_AddArrayToObject(root, "choices");
  cJSON *choice = cJSON_CreateObject();
  cJSON_AddItemToArray(choices, choice);
  if (req->pad_text) piece = req->pad_text;
  if (chat) {
    cJSON_AddNumberToObject(choice, "index", 0);
    cJSON *delta = cJSON_AddObjectToObject(choice, "delta");
    if (index == 0) cJSON_AddStringToObject(delta, "role", "assistant");
    cJSON_AddStringToObject(delta, "content", piece);
  } else {
    cJSON_AddStringToObject(choice, "text", piece);
    cJSON_AddNumberToObject(choice, "index", 0);
    cJSON_AddNullToObject(choice, "logprobs");
  }
  req->stream_content[end] = saved;
  if (last)
    cJSON_AddStringToObject(choice, "finish_reason", "stop");
  else
    cJSON_AddNullToObject(choice, "finish_reason");
  if (!req->deterministic)
    cJSON_AddNumberToObject(root, "mock_sent_at_ms", (double)wall_clock_ms());
  /* as OpenAI does: with include_usage every other chunk has "usage": null */
  if (req->include_usage) cJSON_AddNullToObject(root, "usage");
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  stream_add_event(req, plain, NULL, text, strlen(text));
  cJSON_free(text);
  cJSON_Delete(root);
}

static void stream_append_usage(request *req, strbuf *plain) {
  long completion_tokens = token_estimate(strlen(req->stream_content));
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "id", req->completion_id);
  cJSON_AddStringToObject(root, "object",
                          req->stream_kind == STREAM_CHAT ? "chat.completion.chunk"
                                                          : "text_completion");
  cJSON_AddNumberToObject(root, "created", (double)req->created);
  cJSON_AddStringToObject(root, "model", req->stream_model);
  cJSON_AddArrayToObject(root, "choices");
  cJSON *usage = cJSON_AddObjectToObject(root, "usage");
  cJSON_AddNumberToObject(usage, "prompt_tokens", (double)req->prompt_tokens);
  cJSON_AddNumberToObject(usage, "completion_tokens", (double)completion_tokens);
  cJSON_AddNumberToObject(usage, "total_tokens", (double)(req->prompt_tokens + completion_tokens));
  if (!req->deterministic)
    cJSON_AddNumberToObject(root, "mock_sent_at_ms", (double)wall_clock_ms());
  char *text = cJSON_PrintUnformatted(root);
  if (!text) abort();
  stream_add_event(req, plain, NULL, text, strlen(text));
  cJSON_free(text);
  cJSON_Delete(root);
}

/* Writes out (the head, if any) then plain as stream bytes: gzip-compressed when asked (each
 * write decodable on its own), chunk-framed on HTTP/1.1; final ends the body. Empties both. */
static void stream_write(request *req, strbuf *out, strbuf *plain, int final) {
  strbuf packed = {0};
  const char *payload = plain->data;
  size_t payload_len = plain->len;
  if (req->gz && (payload_len || final)) {
    gzip_feed(req->gz, plain->data ? plain->data : "", plain->len, final ? Z_FINISH : Z_SYNC_FLUSH,
              &packed);
    payload = packed.data;
    payload_len = packed.len;
  }
  if (payload_len) {
    if (req->chunked) sb_printf(out, "%zx\r\n", payload_len);
    sb_append(out, payload, payload_len);
    if (req->chunked) sb_appends(out, "\r\n");
  }
  if (final && req->chunked) sb_appends(out, "0\r\n\r\n");
  if (out->len) connection_write2(req->conn, out->data, out->len, NULL, 0);
  sb_free(out);
  sb_free(plain);
  sb_free(&packed);
}

static void on_stream_timer(uv_timer_t *timer) {
  stream_step(timer->data);
}

/* Sends what is due now: the headers (first call), chunks until the next interval, and the
 * end of the stream; arms the timer for the next chunk or finishes the request. */
static void stream_step(request *req) {
  connection *conn = req->conn;
  strbuf out = {0};
  strbuf plain = {0};
  if (!req->head_sent) {
    req->head_sent = 1;
    sb_printf(&out,
              "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              "%s%sConnection: %s\r\n",
              req->chunked ? "Transfer-Encoding: chunked\r\n" : "",
              req->gz ? "Content-Encoding: gzip\r\n" : "",
              req->keep_alive ? "keep-alive" : "close");
    append_common_headers(req, 200, &out);
    sb_appends(&out, "\r\n");
    if (req->stream_kind == STREAM_RESPONSE) response_stream_prelude(req, &plain);
  }
  for (;;) {
    if (req->cut || (req->disconnect_after >= 0 && req->chunks_sent >= req->disconnect_after)) {
      stream_write(req, &out, &plain, 0);
      request_inject_disconnect(req);
      return;
    }
    if (req->chunks_sent < req->chunks_total) {
      stream_append_chunk(req, &plain, req->chunks_sent);
      req->chunks_sent++;
      if (!req->cut && req->chunk_interval_ms > 0 && req->chunks_sent < req->chunks_total) {
        stream_write(req, &out, &plain, 0);
        if (!conn->closing) request_start_timer(req, req->chunk_interval_ms, on_stream_timer);
        return;
      }
      if (out.len + plain.len >= STREAM_WRITE_PIECE_BYTES && req->chunks_sent < req->chunks_total) {
        stream_write(req, &out, &plain, 0);
        if (conn->closing) return;
        size_t backlog = uv_stream_get_write_queue_size((uv_stream_t *)&conn->tcp);
        request_start_timer(req, backlog >= MAX_WRITE_BACKLOG_BYTES ? 5 : 0, on_stream_timer);
        return;
      }
      continue;
    }
    if (req->stream_kind == STREAM_RESPONSE) {
      response_stream_finale(req, &plain);
    } else {
      if (req->include_usage) stream_append_usage(req, &plain);
      stream_add_event(req, &plain, NULL, "[DONE]", 6);
    }
    if (req->cut) continue;
    stream_write(req, &out, &plain, 1);
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
  finish_json(req, root);
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

/* ---------- recording: the last RECORD_CAPACITY requests, exactly as they arrived ---------- */

#define RECORD_CAPACITY 64
typedef struct {
  char *method;
  char *url;
  char version[16];
  size_t header_count;
  char **names;
  char **values;
  char *body;
  size_t body_len;
} recorded_request;
static recorded_request records[RECORD_CAPACITY];
static size_t record_total; /* requests recorded since the last reset */

static void record_free(recorded_request *r) {
  free(r->method);
  free(r->url);
  for (size_t i = 0; i < r->header_count; i++) {
    free(r->names[i]);
    free(r->values[i]);
  }
  free(r->names);
  free(r->values);
  free(r->body);
  memset(r, 0, sizeof *r);
}

static void records_clear(void) {
  for (size_t i = 0; i < RECORD_CAPACITY; i++) record_free(&records[i]);
  record_total = 0;
}

static void record_request(const request *req) {
  recorded_request *r = &records[record_total++ % RECORD_CAPACITY];
  record_free(r);
  r->method = xstrdup(http_method_str(req->method));
  r->url = xstrdup(req->url.data ? req->url.data : "");
  snprintf(r->version, sizeof r->version, "HTTP/%d.%d", req->http_major, req->http_minor);
  r->header_count = req->header_count;
  r->names = xmalloc(sizeof(char *) * (req->header_count ? req->header_count : 1));
  r->values = xmalloc(sizeof(char *) * (req->header_count ? req->header_count : 1));
  for (size_t i = 0; i < req->header_count; i++) {
    r->names[i] = xstrdup(req->headers[i].raw_name);
    r->values[i] = xstrdup(req->headers[i].value);
  }
  r->body_len = req->body.len;
  r->body = xmalloc(req->body.len);
  if (req->body.len) memcpy(r->body, req->body.data, req->body.len);
}

static void respond_recorded(request *req) {
  cJSON *root = cJSON_CreateObject();
  cJSON_AddNumberToObject(root, "total", (double)record_total);
  cJSON *list = cJSON_AddArrayToObject(root, "requests");
  size_t count = record_total < RECORD_CAPACITY ? record_total : RECORD_CAPACITY;
  for (size_t k = record_total - count; k < record_total; k++) {
    const recorded_request *r = &records[k % RECORD_CAPACITY];
    cJSON *item = cJSON_CreateObject();
    cJSON_AddStringToObject(item, "method", r->method);
    cJSON_AddStringToObject(item, "path", r->url);
    cJSON_AddStringToObject(item, "version", r->version);
    cJSON *headers = cJSON_AddArrayToObject(item, "headers");
    for (size_t i = 0; i < r->header_count; i++) {
      cJSON *pair = cJSON_CreateArray();
      cJSON_AddItemToArray(pair, cJSON_CreateString(r->names[i]));
      cJSON_AddItemToArray(pair, cJSON_CreateString(r->values[i]));
      cJSON_AddItemToArray(headers, pair);
    }
    strbuf encoded = {0};
    base64_append(&encoded, (const unsigned char *)r->body, r->body_len);
    cJSON_AddStringToObject(item, "body_b64", encoded.data);
    cJSON_AddNumberToObject(item, "body_len", (double)r->body_len);
    sb_free(&encoded);
    cJSON_AddItemToArray(list, item);
  }
  send_json(req, 200, root, "");
  cJSON_Delete(root);
  request_finish(req);
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
  const char *path = req->url.data ? req->url.data : "";
  size_t path_len = strcspn(path, "?");
  switch (req->route) {
  case ROUTE_CHAT:
    respond_chat_completion(req);
    return;
  case ROUTE_COMPLETIONS:
    respond_completions(req);
    return;
  case ROUTE_EMBEDDINGS:
    respond_embeddings(req);
    return;
  case ROUTE_MODERATIONS:
    respond_moderations(req);
    return;
  case ROUTE_RESPONSES:
    respond_responses(req);
    return;
  case ROUTE_MODEL:
    respond_model(req, path + 11, path_len - 11);
    return;
  case ROUTE_TRANSCRIPTIONS:
    respond_transcriptions(req);
    return;
  case ROUTE_FILES:
    respond_files_upload(req);
    return;
  case ROUTE_FILE:
    respond_file_get(req, path + 10, path_len - 10);
    return;
  default:
    respond_models(req);
    return;
  }
}

static void request_start(request *req) {
  req->started = 1;
  const char *body_data = req->body.data ? req->body.data : "";
  req->body_hash = fnv1a(body_data, req->body.len, 0);
  snprintf(req->request_id, sizeof req->request_id, "req_%016llx%016llx",
           (unsigned long long)req->body_hash,
           (unsigned long long)fnv1a(body_data, req->body.len, 0x5bd1e995ULL));
  const char *deterministic = request_header(req, "x-mock-deterministic");
  req->deterministic = deterministic && strcmp(deterministic, "1") == 0;
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
#define PATH_HAS_ID(prefix)                                                                        \
  (path_len > sizeof(prefix) - 1 && memcmp(path, prefix, sizeof(prefix) - 1) == 0 &&               \
   !memchr(path + sizeof(prefix) - 1, '/', path_len - (sizeof(prefix) - 1)))
  if (is_post && PATH_IS("/v1/chat/completions"))
    req->route = ROUTE_CHAT;
  else if (is_get && PATH_IS("/v1/models"))
    req->route = ROUTE_MODELS;
  else if (is_get && PATH_HAS_ID("/v1/models/"))
    req->route = ROUTE_MODEL;
  else if (is_post && PATH_IS("/v1/completions"))
    req->route = ROUTE_COMPLETIONS;
  else if (is_post && PATH_IS("/v1/embeddings"))
    req->route = ROUTE_EMBEDDINGS;
  else if (is_post && PATH_IS("/v1/moderations"))
    req->route = ROUTE_MODERATIONS;
  else if (is_post && PATH_IS("/v1/responses"))
    req->route = ROUTE_RESPONSES;
  else if (is_post && PATH_IS("/v1/audio/transcriptions"))
    req->route = ROUTE_TRANSCRIPTIONS;
  else if (is_post && PATH_IS("/v1/files"))
    req->route = ROUTE_FILES;
  else if (is_get && PATH_HAS_ID("/v1/files/"))
    req->route = ROUTE_FILE;
  else if (is_get && PATH_IS("/mock/stats"))
    req->route = ROUTE_STATS;
  else if (is_get && PATH_IS("/mock/requests"))
    req->route = ROUTE_REQUESTS;
  else if (is_post && PATH_IS("/mock/reset"))
    req->route = ROUTE_RESET;
  else
    req->route = ROUTE_NOT_FOUND;
#undef PATH_IS
#undef PATH_HAS_ID
  if (req->route == ROUTE_REQUESTS) {
    respond_recorded(req);
    return;
  }
  if (req->route == ROUTE_RESET) {
    stats_reset();
    records_clear();
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
  record_request(req);
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
  records_clear();
  if (config.required_keys) {
    for (char **key = config.required_keys; *key; key++) free(*key);
    free(config.required_keys);
  }
  if (rc != 0) fprintf(stderr, "mockllm: uv_loop_close(): %s\n", uv_strerror(rc));
  return 0;
}
