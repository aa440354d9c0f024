/* fuzz_http_request: bytes as a client sends them, through the real client
 * port. A real gateway (gateway_start: httpd, its http_parser callbacks,
 * head/body limits, the router, path checks, the chat validation with the
 * one strict body parse, model defaults and the cache key) listens on
 * 127.0.0.1 on this process's uv loop; each input is written on a fresh
 * loopback connection, the write side is shut down, and everything the
 * server answers is read until it closes.
 *
 * No upstream is configured, so a chat request that passes validation is
 * answered 502 "no_endpoint" without any network traffic; auth is off
 * (the token path needs a cluster); temperature 0 is a model default, so
 * the cache key is computed for every valid chat request.
 *
 * Invariants, with the input also parsed by an independent http_parser
 * (requests, methods, decoded bodies):
 *  - the whole answer parses as a sequence of HTTP/1.1 responses (1xx
 *    interim answers aside), ends on a message boundary, has no byte after
 *    a "Connection: close" response, and uses only known status codes and
 *    header names (nothing a client sent becomes a header);
 *  - at most one response per complete request, plus one error answer for
 *    a bad trailing request; at least one when a request was complete;
 *  - every JSON body parses; every 4xx/5xx body has OpenAI's error shape;
 *  - a POST /v1/chat/completions answered 502 had a body body_scan
 *    accepts, with "messages" a non-empty array; one refused as
 *    invalid_json/duplicate_member had a body body_scan refuses;
 *  - the server ends with no open connection and no request in flight
 *    (no leak, no hang; ASan checks the memory).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <http_parser.h>
#include <uv.h>

#include "base/base.h"
#include "config/config.h"
#include "gateway/body.h"
#include "gateway/internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

static uv_loop_t loop;
static struct gateway *gw;
static int port;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  zg_log_set_level(ZG_ERROR + 1);
  uv_loop_init(&loop);
  for (int attempt = 0; attempt < 200 && !gw; attempt++) {
    port = 20000 + (int)((getpid() * 7 + attempt * 131) % 40000);
    char text[512], err[512];
    snprintf(text, sizeof text,
             "{\"node\":{\"id\":\"fuzz\"},\"listen\":{\"gateway\":\"127.0.0.1:%d\"},"
             "\"auth\":{\"mode\":\"none\"},\"model\":{\"temperature\":0,\"top_p\":0.9},"
             "\"performance\":{\"max_body_bytes\":8192,\"max_header_bytes\":2048,"
             "\"cache_size\":\"1MB\"}}",
             port);
    struct zg_config *cfg = zg_config_parse(text, "fuzz", err, sizeof err);
    CHECK(cfg != NULL);
    if (gateway_start(&loop, cfg, &gw, err, sizeof err) != 0) {
      gw = NULL;
      uv_run(&loop, UV_RUN_NOWAIT);
    }
    zg_config_free(cfg);
  }
  CHECK(gw != NULL);
  return 0;
}

/* ---- the client side -------------------------------------------------- */

struct client {
  uv_tcp_t tcp;
  uv_connect_t connect;
  uv_write_t write;
  uv_shutdown_t shutdown;
  const uint8_t *data;
  size_t size;
  zg_buf answer;
  bool closed;
};

static void on_client_closed(uv_handle_t *h) {
  ((struct client *)h->data)->closed = true;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char slab[65536];
  *buf = uv_buf_init(slab, sizeof slab);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  struct client *c = s->data;
  if (n > 0) zg_buf_append(&c->answer, buf->base, (size_t)n);
  if (n < 0 && !uv_is_closing((uv_handle_t *)s)) uv_close((uv_handle_t *)s, on_client_closed);
}

static void on_shutdown(uv_shutdown_t *r, int status) {}

static void on_written(uv_write_t *w, int status) {
  struct client *c = w->data;
  if (status == 0) uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown);
}

static void on_connect(uv_connect_t *r, int status) {
  struct client *c = r->data;
  CHECK(status == 0);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  c->write.data = c;
  if (c->size) {
    uv_buf_t buf = uv_buf_init((char *)c->data, (unsigned)c->size);
    CHECK(uv_write(&c->write, (uv_stream_t *)&c->tcp, &buf, 1, on_written) == 0);
  } else {
    uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown);
  }
}

/* ---- the requests, parsed independently -------------------------------- */

#define MAX_REQS 64

struct request {
  int method;
  zg_buf url, body;
  bool complete;
};

struct req_parse {
  struct request reqs[MAX_REQS];
  size_t n; /* started */
};

static struct request *cur_req(http_parser *p) {
  struct req_parse *rp = p->data;
  return rp->n ? &rp->reqs[rp->n - 1] : NULL;
}

static int rq_begin(http_parser *p) {
  struct req_parse *rp = p->data;
  if (rp->n == MAX_REQS) return -1;
  rp->n++;
  return 0;
}

static int rq_url(http_parser *p, const char *at, size_t len) {
  return zg_buf_append(&cur_req(p)->url, at, len);
}

static int rq_body(http_parser *p, const char *at, size_t len) {
  return zg_buf_append(&cur_req(p)->body, at, len);
}

static int rq_headers(http_parser *p) {
  cur_req(p)->method = p->method;
  return 0;
}

/* The request line is complete: what httpd also takes as the method, so a
 * HEAD whose headers it then refuses is answered without a body. */
static int rq_field(http_parser *p, const char *at, size_t len) {
  (void)at, (void)len;
  cur_req(p)->method = p->method;
  return 0;
}

static int rq_complete(http_parser *p) {
  cur_req(p)->complete = true;
  return 0;
}

/* ---- the answers -------------------------------------------------------- */

struct resp_parse {
  const struct req_parse *rp;
  size_t n_final; /* non-1xx responses seen */
  bool in_message, after_close, saw_close_header;
  int status;
  char content_type[128];
  char header_name[64];
  bool header_name_done;
  zg_buf body;
  bool chat_502_valid_checked;
};

static const char *const known_headers[] = {
    "Content-Type",    "Content-Length",  "Transfer-Encoding", "Connection",
    "X-Zonegate-Node", "X-Zonegate-Role", "X-Zonegate-Leader", "Allow",
    "Retry-After",     "X-Cache",         "Cache-Control",     "ETag",
};

static int rs_begin(http_parser *p) {
  struct resp_parse *r = p->data;
  CHECK(!r->after_close); /* nothing after a Connection: close answer */
  r->in_message = true;
  r->saw_close_header = false;
  r->content_type[0] = '\0';
  r->header_name[0] = '\0';
  r->header_name_done = true;
  zg_buf_reset(&r->body);
  return 0;
}

static int rs_status(http_parser *p, const char *at, size_t len) {
  CHECK(!(len == 7 && memcmp(at, "Unknown", 7) == 0)); /* only statuses httpd knows */
  return 0;
}

static bool header_value_is(const char *name, const char *want) {
  return strcasecmp(name, want) == 0;
}

static char value_buf[256];
static size_t value_len;

static void finish_header(struct resp_parse *r) {
  if (!r->header_name[0]) return;
  bool known = false;
  for (size_t i = 0; i < sizeof(known_headers) / sizeof(known_headers[0]); i++)
    known = known || header_value_is(r->header_name, known_headers[i]);
  if (!known) fprintf(stderr, "unexpected response header \"%s\"\n", r->header_name);
  CHECK(known);
  value_buf[value_len] = '\0';
  if (header_value_is(r->header_name, "Content-Type"))
    snprintf(r->content_type, sizeof r->content_type, "%s", value_buf);
  if (header_value_is(r->header_name, "Connection") && strcasecmp(value_buf, "close") == 0)
    r->saw_close_header = true;
  r->header_name[0] = '\0';
}

static int rs_field(http_parser *p, const char *at, size_t len) {
  struct resp_parse *r = p->data;
  if (r->header_name_done) {
    finish_header(r);
    r->header_name_done = false;
    value_len = 0;
  }
  size_t have = strlen(r->header_name);
  CHECK(have + len < sizeof r->header_name);
  memcpy(r->header_name + have, at, len);
  r->header_name[have + len] = '\0';
  return 0;
}

static int rs_value(http_parser *p, const char *at, size_t len) {
  struct resp_parse *r = p->data;
  r->header_name_done = true;
  size_t take = len < sizeof(value_buf) - 1 - value_len ? len : sizeof(value_buf) - 1 - value_len;
  memcpy(value_buf + value_len, at, take);
  value_len += take;
  return 0;
}

static int rs_headers(http_parser *p) {
  struct resp_parse *r = p->data;
  finish_header(r);
  r->status = p->status_code;
  if (r->status >= 100 && r->status < 200) return 0;
  /* The answer to a HEAD request has no body whatever its length says. */
  size_t i = r->n_final;
  if (i < r->rp->n && r->rp->reqs[i].method == HTTP_HEAD) return 1;
  return 0;
}

static int rs_body(http_parser *p, const char *at, size_t len) {
  struct resp_parse *r = p->data;
  return zg_buf_append(&r->body, at, len);
}

static void check_chat(const struct request *q, int status, const cJSON *json) {
  const char *url = q->url.data ? q->url.data : "";
  size_t path_len = strcspn(url, "?");
  if (q->method != HTTP_POST || path_len != 20 || strncmp(url, "/v1/chat/completions", 20) != 0)
    return;
  const char *const names[] = {"messages", "model", "stream"};
  struct body_value v[3];
  char err[160];
  size_t end, members;
  int rc = body_scan(q->body.data ? q->body.data : "", q->body.len, names, v, 3, &end, &members,
                     err, sizeof err);
  if (status == 502) { /* went upstream: the gateway's own checks passed (what the
                        * request means, e.g. "messages", is the upstream's to judge) */
    CHECK(rc == 0);
    CHECK(v[1].type == BODY_ABSENT || v[1].type == BODY_STRING);
    CHECK(v[2].type == BODY_ABSENT || v[2].type == BODY_TRUE || v[2].type == BODY_FALSE ||
          v[2].type == BODY_NULL);
  }
  const cJSON *code =
      cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(json, "error"), "code");
  if (status == 400 && cJSON_IsString(code) &&
      (strcmp(code->valuestring, "invalid_json") == 0 ||
       strcmp(code->valuestring, "duplicate_member") == 0))
    CHECK(rc != 0);
}

static int rs_complete(http_parser *p) {
  struct resp_parse *r = p->data;
  r->in_message = false;
  if (r->status >= 100 && r->status < 200) return 0; /* interim: 100 Continue */
  size_t i = r->n_final++;
  bool head = i < r->rp->n && r->rp->reqs[i].method == HTTP_HEAD;
  cJSON *json = NULL;
  if (!head && strncmp(r->content_type, "application/json", 16) == 0) {
    json = cJSON_ParseWithLength(r->body.data ? r->body.data : "", r->body.len);
    if (!json)
      fprintf(stderr, "status %d body not JSON: %.*s\n", r->status, (int)r->body.len,
              r->body.data ? r->body.data : "");
    CHECK(json != NULL);
  }
  /* Health answers carry their own JSON (503 = not active/degraded). */
  bool health = i < r->rp->n && r->rp->reqs[i].url.data &&
                strncmp(r->rp->reqs[i].url.data, "/health", 7) == 0;
  if (r->status >= 400 && !head && !health) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(json, "error");
    CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "message")));
    CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "type")));
  }
  if (i < r->rp->n && r->rp->reqs[i].complete) check_chat(&r->rp->reqs[i], r->status, json);
  cJSON_Delete(json);
  if (r->saw_close_header) r->after_close = true;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 32 * 1024) return 0;
  /* The requests as an independent parser sees them. */
  static struct req_parse rp;
  memset(&rp, 0, sizeof rp);
  http_parser_settings rs = {0};
  rs.on_message_begin = rq_begin;
  rs.on_url = rq_url;
  rs.on_header_field = rq_field;
  rs.on_headers_complete = rq_headers;
  rs.on_body = rq_body;
  rs.on_message_complete = rq_complete;
  http_parser req_parser;
  http_parser_init(&req_parser, HTTP_REQUEST);
  req_parser.data = &rp;
  http_parser_execute(&req_parser, &rs, (const char *)data, size);
  size_t complete = 0;
  while (complete < rp.n && rp.reqs[complete].complete) complete++;

  /* One connection through the real server. */
  struct client c;
  memset(&c, 0, sizeof c);
  c.data = data;
  c.size = size;
  uv_tcp_init(&loop, &c.tcp);
  c.tcp.data = &c;
  c.connect.data = &c;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  CHECK(uv_tcp_connect(&c.connect, &c.tcp, (const struct sockaddr *)&addr, on_connect) == 0);
  uint64_t start = uv_hrtime();
  while (!c.closed || httpd_open_connections(gw->http) > 0 || gateway_active_requests(gw) > 0) {
    uv_run(&loop, UV_RUN_ONCE);
    if (uv_hrtime() - start > 5000000000ull) {
      fprintf(stderr, "no end after 5 s: client closed %d, server connections %zu\n", c.closed,
              httpd_open_connections(gw->http));
      abort();
    }
  }

  /* The answers. */
  struct resp_parse r;
  memset(&r, 0, sizeof r);
  r.rp = &rp;
  http_parser_settings ss = {0};
  ss.on_message_begin = rs_begin;
  ss.on_status = rs_status;
  ss.on_header_field = rs_field;
  ss.on_header_value = rs_value;
  ss.on_headers_complete = rs_headers;
  ss.on_body = rs_body;
  ss.on_message_complete = rs_complete;
  http_parser resp_parser;
  http_parser_init(&resp_parser, HTTP_RESPONSE);
  resp_parser.data = &r;
  size_t parsed =
      http_parser_execute(&resp_parser, &ss, c.answer.data ? c.answer.data : "", c.answer.len);
  if (parsed != c.answer.len || HTTP_PARSER_ERRNO(&resp_parser) != HPE_OK)
    fprintf(stderr, "answer does not parse (%s) at %zu of %zu: %.*s\n",
            http_errno_name(HTTP_PARSER_ERRNO(&resp_parser)), parsed, c.answer.len,
            (int)c.answer.len, c.answer.data ? c.answer.data : "");
  CHECK(parsed == c.answer.len && HTTP_PARSER_ERRNO(&resp_parser) == HPE_OK);
  CHECK(!r.in_message);
  if (r.n_final > complete + 1)
    fprintf(stderr, "%zu answers to %zu complete requests\n", r.n_final, complete);
  CHECK(r.n_final <= complete + 1);
  if (complete > 0) CHECK(r.n_final >= 1);

  zg_buf_free(&c.answer);
  zg_buf_free(&r.body);
  for (size_t i = 0; i < rp.n; i++) {
    zg_buf_free(&rp.reqs[i].url);
    zg_buf_free(&rp.reqs[i].body);
  }
  return 0;
}
