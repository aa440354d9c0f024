/* Unit tests for upstream/: the HTTP client on a uv loop, run twice: with
 * the lean client (plain http:// URLs, the default) and with libcurl
 * (curl_only), so both engines keep the same contract.
 *
 * Each test runs a tiny canned HTTP/1.1 server on 127.0.0.1 (ephemeral port)
 * on the same loop as the client. The request path picks a script (echo the
 * body, stream chunks with delays, never answer, stall, drip forever, close
 * mid-body). Every loop run is bounded by a guard timer, and every test ends
 * with all handles closed and uv_loop_close() == 0.
 */
#define _GNU_SOURCE /* strcasestr */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "upstream/upstream.h"

/* ---- canned HTTP server ----------------------------------------------- */

/* STEP_CLOSE_IF_REUSED: close without answering when the connection has
 * already served a request (a keep-alive close racing a new request). */
enum step_kind { STEP_SEND, STEP_CLOSE, STEP_HANG, STEP_DONE, STEP_ECHO, STEP_CLOSE_IF_REUSED };

struct step {
  unsigned delay_ms; /* before this step */
  enum step_kind kind;
  const char *data;
  unsigned repeat; /* STEP_SEND only: extra times to send it (with the same delay) */
};

struct scenario {
  const char *path;
  struct step steps[8];
};

static const struct scenario scenarios[] = {
    {"/echo", {{0, STEP_ECHO, NULL, 0}, {0, STEP_DONE, NULL, 0}}},
    {"/stream",
     {{0, STEP_SEND,
       "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
       0},
      {100, STEP_SEND, "9\r\ndata: 0\n\n\r\n", 0},
      {100, STEP_SEND, "9\r\ndata: 1\n\n\r\n", 0},
      {100, STEP_SEND, "9\r\ndata: 2\n\n\r\n", 0},
      {0, STEP_SEND, "0\r\n\r\n", 0},
      {0, STEP_DONE, NULL, 0}}},
    {"/silent", {{0, STEP_HANG, NULL, 0}}},
    {"/stall",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 0},
      {0, STEP_HANG, NULL, 0}}},
    {"/drip",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0},
      {50, STEP_SEND, "1\r\n.\r\n", 200},
      {0, STEP_HANG, NULL, 0}}},
    {"/break",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", 0},
      {50, STEP_CLOSE, NULL, 0}}},
    {"/head",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Test: yes\r\n\r\n", 0},
      {0, STEP_DONE, NULL, 0}}},
    {"/nocontent", {{0, STEP_SEND, "HTTP/1.1 204 No Content\r\n\r\n", 0}, {0, STEP_DONE, NULL, 0}}},
    {"/continue",
     {{0, STEP_SEND, "HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n", 0},
      {20, STEP_SEND, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Test: yes\r\n\r\nok", 0},
      {0, STEP_DONE, NULL, 0}}},
    {"/closing",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", 0},
      {0, STEP_CLOSE, NULL, 0}}},
    {"/eof-body",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nX-Test: yes\r\n\r\nuntil the end", 0},
      {30, STEP_CLOSE, NULL, 0}}},
    {"/trailers",
     {{0, STEP_SEND,
       "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n"
       "0\r\nX-Trailer: t\r\n\r\n",
       0},
      {0, STEP_DONE, NULL, 0}}},
    {"/badchunk",
     {{0, STEP_SEND, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 0},
      {0, STEP_HANG, NULL, 0}}},
    {"/echo-then-close", {{0, STEP_ECHO, NULL, 0}, {20, STEP_CLOSE, NULL, 0}}},
    {"/vanish",
     {{0, STEP_CLOSE_IF_REUSED, NULL, 0}, {0, STEP_ECHO, NULL, 0}, {0, STEP_DONE, NULL, 0}}},
};

struct test_server;

struct server_conn {
  uv_tcp_t tcp;
  uv_timer_t step_timer;
  struct test_server *srv;
  struct server_conn *next, *prev;
  int open_handles;
  bool closing;
  char *in; /* request bytes received, NUL-terminated; grows */
  size_t in_len, in_cap;
  const struct scenario *script; /* NULL: waiting for a request */
  unsigned served;               /* requests read on this connection */
  size_t step;
  unsigned repeats_done;
  char *request_body;
  size_t request_body_len;
};

struct test_server {
  uv_loop_t *loop;
  uv_tcp_t listener;
  int port;
  int connections_accepted;
  int requests_seen;
  char last_request_head[8192];
  struct server_conn *conns;
};

static void on_conn_handle_closed(uv_handle_t *h) {
  struct server_conn *conn = h->data;
  if (--conn->open_handles == 0) {
    free(conn->request_body);
    free(conn->in);
    free(conn);
  }
}

static void close_conn(struct server_conn *conn) {
  if (conn->closing) return;
  conn->closing = true;
  struct test_server *srv = conn->srv;
  if (conn->prev)
    conn->prev->next = conn->next;
  else
    srv->conns = conn->next;
  if (conn->next) conn->next->prev = conn->prev;
  uv_close((uv_handle_t *)&conn->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&conn->step_timer, on_conn_handle_closed);
}

static void on_write_done(uv_write_t *req, int status) {
  free(req); /* data was allocated in the same block */
}

static void send_bytes(struct server_conn *conn, const char *data, size_t len) {
  uv_write_t *req = malloc(sizeof *req + len);
  assert_non_null(req);
  char *copy = (char *)(req + 1);
  memcpy(copy, data, len);
  uv_buf_t buf = uv_buf_init(copy, (unsigned)len);
  if (uv_write(req, (uv_stream_t *)&conn->tcp, &buf, 1, on_write_done) != 0) free(req);
}

static void process_input(struct server_conn *conn);

static void run_script(struct server_conn *conn);

static void on_step_timer(uv_timer_t *h) {
  run_script(h->data);
}

/* Runs steps until one needs a delay, hangs, closes or finishes. */
static void run_script(struct server_conn *conn) {
  while (conn->script && !conn->closing) {
    const struct step *s = &conn->script->steps[conn->step];
    switch (s->kind) {
    case STEP_SEND:
      send_bytes(conn, s->data, strlen(s->data));
      if (conn->repeats_done < s->repeat)
        conn->repeats_done++;
      else {
        conn->repeats_done = 0;
        conn->step++;
      }
      break;
    case STEP_ECHO: {
      char head[256];
      int n = snprintf(head, sizeof head,
                       "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Test: yes\r\n"
                       "Content-Length: %zu\r\n\r\n",
                       conn->request_body_len);
      send_bytes(conn, head, (size_t)n);
      if (conn->request_body_len) send_bytes(conn, conn->request_body, conn->request_body_len);
      conn->step++;
      break;
    }
    case STEP_CLOSE:
      close_conn(conn);
      return;
    case STEP_CLOSE_IF_REUSED:
      if (conn->served > 1) {
        close_conn(conn);
        return;
      }
      conn->step++;
      break;
    case STEP_HANG:
      return;
    case STEP_DONE:
      conn->script = NULL; /* keep-alive: ready for the next request */
      process_input(conn);
      return;
    }
    if (!conn->script) return;
    const struct step *next = &conn->script->steps[conn->step];
    unsigned delay =
        (s->kind == STEP_SEND && conn->repeats_done > 0) ? s->delay_ms : next->delay_ms;
    if (delay > 0) {
      uv_timer_start(&conn->step_timer, on_step_timer, delay, 0);
      return;
    }
  }
}

/* Parses one complete request out of conn->in, if there is one. */
static void process_input(struct server_conn *conn) {
  if (conn->script || conn->closing) return;
  char *head_end = strstr(conn->in, "\r\n\r\n");
  if (!head_end) return;
  size_t head_len = (size_t)(head_end - conn->in) + 4;
  size_t body_len = 0;
  const char *cl = strcasestr(conn->in, "\r\ncontent-length:");
  if (cl && cl < head_end) body_len = strtoul(cl + 17, NULL, 10);
  if (conn->in_len < head_len + body_len) return;

  struct test_server *srv = conn->srv;
  srv->requests_seen++;
  conn->served++;
  snprintf(srv->last_request_head, sizeof srv->last_request_head, "%.*s", (int)head_len, conn->in);
  free(conn->request_body);
  conn->request_body = malloc(body_len + 1);
  assert_non_null(conn->request_body);
  memcpy(conn->request_body, conn->in + head_len, body_len);
  conn->request_body_len = body_len;

  char path[128] = "";
  sscanf(conn->in, "%*s %127s", path);
  memmove(conn->in, conn->in + head_len + body_len, conn->in_len - head_len - body_len);
  conn->in_len -= head_len + body_len;
  conn->in[conn->in_len] = '\0';

  conn->script = NULL;
  for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
    if (strcmp(scenarios[i].path, path) == 0) conn->script = &scenarios[i];
  if (!conn->script) {
    static const char not_found[] = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
    send_bytes(conn, not_found, sizeof not_found - 1);
    process_input(conn);
    return;
  }
  conn->step = 0;
  conn->repeats_done = 0;
  run_script(conn);
}

static void on_conn_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct server_conn *conn = h->data;
  if (conn->in_cap - conn->in_len < 65536 + 1) {
    conn->in_cap = conn->in_cap * 2 + 65536 + 1;
    conn->in = realloc(conn->in, conn->in_cap);
    assert_non_null(conn->in);
  }
  *buf = uv_buf_init(conn->in + conn->in_len, (unsigned)(conn->in_cap - conn->in_len - 1));
}

static void on_conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct server_conn *conn = s->data;
  if (nread < 0) {
    close_conn(conn);
    return;
  }
  conn->in_len += (size_t)nread;
  conn->in[conn->in_len] = '\0';
  process_input(conn);
}

static void on_server_connection(uv_stream_t *listener, int status) {
  struct test_server *srv = listener->data;
  if (status != 0) return;
  struct server_conn *conn = calloc(1, sizeof *conn);
  assert_non_null(conn);
  conn->srv = srv;
  uv_tcp_init(srv->loop, &conn->tcp);
  uv_timer_init(srv->loop, &conn->step_timer);
  conn->tcp.data = conn;
  conn->step_timer.data = conn;
  conn->open_handles = 2;
  if (uv_accept(listener, (uv_stream_t *)&conn->tcp) != 0) {
    conn->closing = true;
    uv_close((uv_handle_t *)&conn->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&conn->step_timer, on_conn_handle_closed);
    return;
  }
  srv->connections_accepted++;
  conn->next = srv->conns;
  if (srv->conns) srv->conns->prev = conn;
  srv->conns = conn;
  uv_read_start((uv_stream_t *)&conn->tcp, on_conn_alloc, on_conn_read);
}

static int bound_port(uv_tcp_t *tcp) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  assert_int_equal(uv_tcp_getsockname(tcp, (struct sockaddr *)&ss, &len), 0);
  return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void server_start(struct test_server *srv, uv_loop_t *loop) {
  memset(srv, 0, sizeof *srv);
  srv->loop = loop;
  struct sockaddr_in addr;
  assert_int_equal(uv_ip4_addr("127.0.0.1", 0, &addr), 0);
  assert_int_equal(uv_tcp_init(loop, &srv->listener), 0);
  srv->listener.data = srv;
  assert_int_equal(uv_tcp_bind(&srv->listener, (const struct sockaddr *)&addr, 0), 0);
  assert_int_equal(uv_listen((uv_stream_t *)&srv->listener, 256, on_server_connection), 0);
  srv->port = bound_port(&srv->listener);
}

static void server_stop(struct test_server *srv) {
  while (srv->conns) close_conn(srv->conns);
  uv_close((uv_handle_t *)&srv->listener, NULL);
}

/* ---- per-test environment --------------------------------------------- */

/* Every request of a run sets curl_only to this: main() runs all tests
 * with the lean client (false) and then with libcurl (true). */
static bool force_curl;

struct env {
  uv_loop_t loop;
  uv_timer_t guard;
  bool guard_expired;
  struct test_server srv;
  struct upstream_client *client;
  bool client_closed;
  int close_done_calls;
};

static void on_guard(uv_timer_t *h) {
  *(bool *)h->data = true;
}

static int setup(void **state) {
  struct env *e = calloc(1, sizeof *e);
  assert_non_null(e);
  assert_int_equal(uv_loop_init(&e->loop), 0);
  assert_int_equal(uv_timer_init(&e->loop, &e->guard), 0);
  e->guard.data = &e->guard_expired;
  server_start(&e->srv, &e->loop);
  char err[256] = "";
  assert_int_equal(upstream_client_create(&e->loop, &e->client, err, sizeof err), 0);
  *state = e;
  return 0;
}

static void on_client_closed(void *arg) {
  ((struct env *)arg)->close_done_calls++;
}

static int teardown(void **state) {
  struct env *e = *state;
  if (!e->client_closed) upstream_client_close(e->client, on_client_closed, e);
  server_stop(&e->srv);
  uv_close((uv_handle_t *)&e->guard, NULL);
  for (int i = 0; i < 1000 && uv_loop_alive(&e->loop); i++) uv_run(&e->loop, UV_RUN_NOWAIT);
  assert_int_equal(e->close_done_calls, 1);
  assert_int_equal(uv_loop_close(&e->loop), 0);
  free(e);
  return 0;
}

/* Runs the loop until *counter >= target or timeout_ms passed. */
static bool run_until(struct env *e, const int *counter, int target, unsigned timeout_ms) {
  e->guard_expired = false;
  uv_timer_start(&e->guard, on_guard, timeout_ms, 0);
  for (int i = 0; i < 1000000 && *counter < target && !e->guard_expired; i++)
    uv_run(&e->loop, UV_RUN_ONCE);
  uv_timer_stop(&e->guard);
  return *counter >= target;
}

static void run_for(struct env *e, unsigned ms) {
  static const int never = 0;
  run_until(e, &never, 1, ms);
}

static uint64_t now_ms(void) {
  return uv_hrtime() / 1000000;
}

/* ---- a recording set of callbacks -------------------------------------- */

struct probe {
  struct upstream_transfer *t;
  int response_calls, data_calls, done_calls;
  int status;
  char content_type[64];
  bool saw_x_test_header;
  char body[16384];
  size_t body_len;
  uint64_t start_ms, data_ms[16], done_ms;
  enum upstream_result result;
  char curl_error[256];
  struct upstream_timing timing;
  bool cancel_on_first_data;
  bool cancel_on_response;
  bool pause_on_first_data;
  bool saw_interim_header;
  struct env *close_client_on_data; /* closes this env's client from on_data */
  struct env *close_client_on_done; /* closes this env's client from on_done */
  int on_data_return;
  int *completed; /* incremented on done, optional */
};

static void probe_on_response(void *ud, int status, const char *content_type,
                              const char *const *headers) {
  struct probe *p = ud;
  p->response_calls++;
  p->status = status;
  snprintf(p->content_type, sizeof p->content_type, "%s", content_type ? content_type : "");
  for (size_t i = 0; headers[i]; i++)
    if (strcmp(headers[i], "X-Test: yes") == 0)
      p->saw_x_test_header = true;
    else if (strncasecmp(headers[i], "X-Interim", 9) == 0 ||
             strncasecmp(headers[i], "X-Trailer", 9) == 0)
      p->saw_interim_header = true;
  if (p->cancel_on_response) upstream_cancel(p->t);
}

static int probe_on_data(void *ud, const char *data, size_t len) {
  struct probe *p = ud;
  if (p->data_calls < 16) p->data_ms[p->data_calls] = now_ms();
  p->data_calls++;
  if (p->body_len + len < sizeof p->body) {
    memcpy(p->body + p->body_len, data, len);
    p->body_len += len;
  }
  if (p->cancel_on_first_data) {
    upstream_cancel(p->t);
    return 0;
  }
  if (p->pause_on_first_data && p->data_calls == 1) upstream_pause(p->t);
  if (p->close_client_on_data) {
    upstream_client_close(p->close_client_on_data->client, on_client_closed,
                          p->close_client_on_data);
    p->close_client_on_data->client_closed = true;
    p->close_client_on_data = NULL;
  }
  return p->on_data_return;
}

static void probe_on_done(void *ud, enum upstream_result result, const char *curl_error) {
  struct probe *p = ud;
  p->done_calls++;
  p->done_ms = now_ms();
  p->result = result;
  snprintf(p->curl_error, sizeof p->curl_error, "%s", curl_error);
  upstream_get_timing(p->t, &p->timing);
  if (p->completed) (*p->completed)++;
  if (p->close_client_on_done) {
    upstream_client_close(p->close_client_on_done->client, on_client_closed,
                          p->close_client_on_done);
    p->close_client_on_done->client_closed = true;
    p->close_client_on_done = NULL;
  }
}

static const struct upstream_callbacks probe_callbacks = {probe_on_response, probe_on_data,
                                                          probe_on_done};

static void start_probe(struct env *e, struct probe *p, const char *method, const char *path,
                        const char *body, struct upstream_timeouts timeouts) {
  static const char *const headers[] = {"Content-Type: application/json",
                                        "Authorization: Bearer sk-test-secret", "X-Req: 1", NULL};
  char url[256];
  snprintf(url, sizeof url, "http://127.0.0.1:%d%s", e->srv.port, path);
  struct upstream_request req = {
      .url = url,
      .method = method,
      .curl_only = force_curl,
      .headers = headers,
      .body = body,
      .body_len = body ? strlen(body) : 0,
      .timeouts = timeouts,
  };
  char err[256] = "";
  p->start_ms = now_ms();
  assert_int_equal(upstream_start(e->client, &req, &probe_callbacks, p, &p->t, err, sizeof err), 0);
  assert_non_null(p->t);
}

static const struct upstream_timeouts generous = {2000, 2000, 2000, 5000};

/* ---- tests ------------------------------------------------------------- */

static void test_body_passes_through_with_status_and_headers(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  const char *body = "{\"model\":\"m\",\"messages\":[]}";
  start_probe(e, &p, "POST", "/echo", body, generous);
  assert_int_equal(upstream_active_count(e->client), 1);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_OK);
  assert_string_equal(p.curl_error, "");
  assert_int_equal(p.response_calls, 1);
  assert_int_equal(p.status, 200);
  assert_string_equal(p.content_type, "application/json");
  assert_true(p.saw_x_test_header);
  assert_int_equal(p.body_len, strlen(body));
  assert_memory_equal(p.body, body, strlen(body));
  assert_int_equal(upstream_active_count(e->client), 0);
  /* Request headers reached the server; no Expect round trip. */
  assert_non_null(strstr(e->srv.last_request_head, "POST /echo HTTP/1.1\r\n"));
  assert_non_null(strstr(e->srv.last_request_head, "\r\nX-Req: 1\r\n"));
  assert_null(strcasestr(e->srv.last_request_head, "\r\nExpect:"));
  /* Timing is ordered and plausible. */
  assert_true(p.timing.total_us > 0);
  assert_true(p.timing.connect_us <= p.timing.first_byte_us);
  assert_true(p.timing.first_byte_us <= p.timing.total_us);
}

/* A body over curl's 100-continue threshold (1 MiB) goes out at once: no
 * "Expect: 100-continue" wait, and every byte arrives intact. */
static void test_large_body_is_sent_without_expect(void **state) {
  struct env *e = *state;
  size_t len = 2u << 20;
  char *body = malloc(len + 1);
  assert_non_null(body);
  for (size_t i = 0; i < len; i++) body[i] = (char)('a' + i % 26);
  body[len] = '\0';
  struct probe *p = calloc(1, sizeof *p);
  assert_non_null(p);
  start_probe(e, p, "POST", "/echo", body, generous);
  free(body); /* copied by upstream_start */
  assert_true(run_until(e, &p->done_calls, 1, 5000));

  assert_int_equal(p->result, UPSTREAM_OK);
  assert_null(strcasestr(e->srv.last_request_head, "\r\nExpect:"));
  assert_non_null(strstr(e->srv.last_request_head, "\r\nContent-Length: 2097152\r\n"));
  assert_true(p->done_ms - p->start_ms < 900); /* no 1 s Expect timeout */
  free(p);
}

static void test_stream_chunks_arrive_separately_as_sent(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/stream", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_OK);
  assert_string_equal(p.content_type, "text/event-stream");
  assert_int_equal(p.data_calls, 3);
  assert_int_equal(p.body_len, 27);
  assert_memory_equal(p.body, "data: 0\n\ndata: 1\n\ndata: 2\n\n", 27);
  /* Spaced like the server sent them (100 ms apart), not buffered. */
  assert_true(p.data_ms[1] - p.data_ms[0] >= 60);
  assert_true(p.data_ms[2] - p.data_ms[1] >= 60);
  assert_true(p.done_ms - p.data_ms[0] >= 150);
}

static void test_connection_refused_is_connect_failed(void **state) {
  struct env *e = *state;
  /* A port that was free a moment ago and has no listener now. */
  uv_tcp_t probe_socket;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(&e->loop, &probe_socket);
  assert_int_equal(uv_tcp_bind(&probe_socket, (const struct sockaddr *)&addr, 0), 0);
  int dead_port = bound_port(&probe_socket);
  uv_close((uv_handle_t *)&probe_socket, NULL);
  run_for(e, 10);

  struct probe p = {0};
  char url[128];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/chat/completions", dead_port);
  struct upstream_request req = {
      .url = url, .method = "GET", .timeouts = generous, .curl_only = force_curl};
  char err[256];
  assert_int_equal(upstream_start(e->client, &req, &probe_callbacks, &p, &p.t, err, sizeof err), 0);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_CONNECT_FAILED);
  assert_string_equal(upstream_result_name(p.result), "connect_failed");
  assert_true(strlen(p.curl_error) > 0);
  assert_int_equal(p.response_calls, 0);
  assert_int_equal(p.timing.connect_us, 0);
}

/* A listener whose accept queue is full (backlog 0, never accepted, already
 * holding connections) makes Linux drop further SYNs, so connect() hangs on
 * loopback: the classic way to get a connect timeout without a blackhole. */
static void test_connect_timeout(void **state) {
  struct env *e = *state;
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(listener >= 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  assert_int_equal(bind(listener, (struct sockaddr *)&addr, sizeof addr), 0);
  assert_int_equal(listen(listener, 0), 0);
  socklen_t len = sizeof addr;
  assert_int_equal(getsockname(listener, (struct sockaddr *)&addr, &len), 0);
  int fillers[4];
  for (int i = 0; i < 4; i++) {
    fillers[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    assert_true(fillers[i] >= 0);
    (void)connect(fillers[i], (struct sockaddr *)&addr, sizeof addr); /* EINPROGRESS is fine */
  }
  run_for(e, 50);

  struct probe p = {0};
  char url[128];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/models", ntohs(addr.sin_port));
  struct upstream_request req = {.url = url,
                                 .method = "GET",
                                 .timeouts = {.connect_ms = 200, .total_ms = 5000},
                                 .curl_only = force_curl};
  char err[256];
  p.start_ms = now_ms();
  assert_int_equal(upstream_start(e->client, &req, &probe_callbacks, &p, &p.t, err, sizeof err), 0);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  for (int i = 0; i < 4; i++) close(fillers[i]);
  close(listener);

  assert_int_equal(p.result, UPSTREAM_CONNECT_TIMEOUT);
  assert_string_equal(upstream_result_name(p.result), "connect_timeout");
  uint64_t elapsed = p.done_ms - p.start_ms;
  assert_true(elapsed >= 180 && elapsed < 2000);
  assert_int_equal(p.response_calls, 0);
}

static void test_first_byte_timeout(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  struct upstream_timeouts t = {.connect_ms = 1000, .first_byte_ms = 200, .total_ms = 5000};
  start_probe(e, &p, "POST", "/silent", "{}", t);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_FIRST_BYTE_TIMEOUT);
  assert_string_equal(upstream_result_name(p.result), "first_byte_timeout");
  assert_int_equal(p.response_calls, 0);
  uint64_t elapsed = p.done_ms - p.start_ms;
  assert_true(elapsed >= 180 && elapsed < 2000);
  assert_true(p.timing.connect_us > 0 || p.timing.total_us > 0);
}

static void test_idle_timeout_between_chunks(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  struct upstream_timeouts t = {.first_byte_ms = 1000, .idle_ms = 200, .total_ms = 5000};
  start_probe(e, &p, "GET", "/stall", NULL, t);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_IDLE_TIMEOUT);
  assert_int_equal(p.response_calls, 1);
  assert_int_equal(p.data_calls, 1);
  assert_memory_equal(p.body, "hello", 5);
  uint64_t idle = p.done_ms - p.data_ms[0];
  assert_true(idle >= 180 && idle < 2000);
}

static void test_total_timeout_while_data_keeps_flowing(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  struct upstream_timeouts t = {.first_byte_ms = 1000, .idle_ms = 200, .total_ms = 500};
  start_probe(e, &p, "GET", "/drip", NULL, t);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_TOTAL_TIMEOUT);
  assert_true(p.data_calls >= 4); /* idle never fired: data every 50 ms */
  uint64_t elapsed = p.done_ms - p.start_ms;
  assert_true(elapsed >= 480 && elapsed < 2500);
}

static void test_server_closing_mid_body_is_broken(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/break", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));

  assert_int_equal(p.result, UPSTREAM_BROKEN);
  assert_int_equal(p.status, 200);
  assert_int_equal(p.body_len, 10);
  assert_true(strlen(p.curl_error) > 0);
}

static void test_cancel_inside_on_data_stops_all_callbacks(void **state) {
  struct env *e = *state;
  struct probe p = {.cancel_on_first_data = true};
  start_probe(e, &p, "GET", "/stream", NULL, generous);
  assert_true(run_until(e, &p.data_calls, 1, 3000));
  run_for(e, 500); /* the rest of the stream would have arrived by now */

  assert_int_equal(p.data_calls, 1);
  assert_int_equal(p.done_calls, 0);
  assert_int_equal(upstream_active_count(e->client), 0);

  /* The client is still fine afterwards. */
  struct probe next = {0};
  start_probe(e, &next, "POST", "/echo", "again", generous);
  assert_true(run_until(e, &next.done_calls, 1, 3000));
  assert_int_equal(next.result, UPSTREAM_OK);
  assert_memory_equal(next.body, "again", 5);
}

static void test_cancel_inside_on_response_stops_all_callbacks(void **state) {
  struct env *e = *state;
  struct probe p = {.cancel_on_response = true};
  start_probe(e, &p, "GET", "/stream", NULL, generous);
  assert_true(run_until(e, &p.response_calls, 1, 3000));
  run_for(e, 500);

  assert_int_equal(p.response_calls, 1);
  assert_int_equal(p.data_calls, 0);
  assert_int_equal(p.done_calls, 0);
  assert_int_equal(upstream_active_count(e->client), 0);
}

static void test_nonzero_from_on_data_aborts_without_on_done(void **state) {
  struct env *e = *state;
  struct probe p = {.on_data_return = 1};
  start_probe(e, &p, "GET", "/stream", NULL, generous);
  assert_true(run_until(e, &p.data_calls, 1, 3000));
  run_for(e, 500);

  assert_int_equal(p.data_calls, 1);
  assert_int_equal(p.done_calls, 0);
  assert_int_equal(upstream_active_count(e->client), 0);
}

static void test_cancel_outside_callbacks(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "POST", "/silent", "{}", generous);
  run_for(e, 100);
  upstream_cancel(p.t);
  assert_int_equal(upstream_active_count(e->client), 0);
  run_for(e, 200);
  assert_int_equal(p.done_calls, 0);
}

#define CONCURRENT 100

static void test_hundred_concurrent_transfers_all_complete(void **state) {
  struct env *e = *state;
  static struct probe probes[CONCURRENT];
  char bodies[CONCURRENT][32];
  int completed = 0;
  memset(probes, 0, sizeof probes);
  for (int i = 0; i < CONCURRENT; i++) {
    snprintf(bodies[i], sizeof bodies[i], "request-%d", i);
    probes[i].completed = &completed;
    start_probe(e, &probes[i], "POST", "/echo", bodies[i], generous);
  }
  assert_int_equal(upstream_active_count(e->client), CONCURRENT);
  assert_true(run_until(e, &completed, CONCURRENT, 10000));

  for (int i = 0; i < CONCURRENT; i++) {
    assert_int_equal(probes[i].done_calls, 1);
    assert_int_equal(probes[i].result, UPSTREAM_OK);
    assert_int_equal(probes[i].body_len, strlen(bodies[i]));
    assert_memory_equal(probes[i].body, bodies[i], strlen(bodies[i]));
  }
  assert_int_equal(upstream_active_count(e->client), 0);
  assert_int_equal(e->srv.requests_seen, CONCURRENT);
}

static void test_sequential_requests_reuse_the_connection(void **state) {
  struct env *e = *state;
  struct probe p[3];
  memset(p, 0, sizeof p);
  for (int i = 0; i < 3; i++) {
    start_probe(e, &p[i], "POST", "/echo", "x", generous);
    assert_true(run_until(e, &p[i].done_calls, 1, 3000));
    assert_int_equal(p[i].result, UPSTREAM_OK);
  }
  assert_int_equal(e->srv.requests_seen, 3);
  assert_int_equal(e->srv.connections_accepted, 1);
  assert_true(p[2].timing.connect_us < p[0].timing.connect_us + 1000);
}

static void test_close_with_transfers_in_flight_makes_no_callbacks(void **state) {
  struct env *e = *state;
  struct probe p[5];
  memset(p, 0, sizeof p);
  for (int i = 0; i < 5; i++) start_probe(e, &p[i], "POST", "/silent", "{}", generous);
  run_for(e, 100);
  upstream_client_close(e->client, on_client_closed, e);
  e->client_closed = true;
  run_for(e, 100);
  for (int i = 0; i < 5; i++) assert_int_equal(p[i].done_calls, 0);
  assert_int_equal(e->close_done_calls, 1);
}

/* Closing the client from a transfer's on_done (the node's shutdown does:
 * the last usage relay's answer ends the shutdown flush) waits until that
 * transfer has released its handle; everything is freed (under ASan the
 * leak check fails otherwise: libcurl's share was still in use by it). */
static void test_close_from_on_done_frees_everything(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  p.close_client_on_done = e;
  start_probe(e, &p, "POST", "/echo", "{}", generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  run_for(e, 50);
  assert_int_equal(e->close_done_calls, 1);
}

static void test_header_with_newline_is_refused_without_echoing_value(void **state) {
  struct env *e = *state;
  const char *const headers[] = {"Authorization: Bearer sk-secret\r\nX-Evil: 1", NULL};
  char url[128];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/echo", e->srv.port);
  struct upstream_request req = {
      .url = url, .method = "GET", .headers = headers, .curl_only = force_curl};
  struct probe p = {0};
  char err[256] = "";
  struct upstream_transfer *t = (struct upstream_transfer *)&p; /* overwritten with NULL */
  assert_int_not_equal(upstream_start(e->client, &req, &probe_callbacks, &p, &t, err, sizeof err),
                       0);
  assert_null(t);
  assert_non_null(strstr(err, "Authorization"));
  assert_null(strstr(err, "sk-secret"));
  assert_int_equal(upstream_active_count(e->client), 0);
}

/* HEAD: the answer's Content-Length announces a body that never comes. */
static void test_head_answer_has_no_body_and_the_connection_is_reused(void **state) {
  struct env *e = *state;
  struct probe p = {0}, q = {0};
  start_probe(e, &p, "HEAD", "/head", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.status, 200);
  assert_true(p.saw_x_test_header);
  assert_int_equal(p.body_len, 0);
  start_probe(e, &q, "POST", "/echo", "after head", generous);
  assert_true(run_until(e, &q.done_calls, 1, 3000));
  assert_int_equal(q.result, UPSTREAM_OK);
  assert_memory_equal(q.body, "after head", 10);
  assert_int_equal(e->srv.connections_accepted, 1);
}

static void test_204_has_no_body(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/nocontent", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.status, 204);
  assert_int_equal(p.body_len, 0);
}

/* A 100 Continue before the answer: on_response once, for the 200. */
static void test_interim_response_is_skipped(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "POST", "/continue", "{}", generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.response_calls, 1);
  assert_int_equal(p.status, 200);
  assert_true(p.saw_x_test_header);
  assert_false(p.saw_interim_header);
  assert_memory_equal(p.body, "ok", 2);
}

/* "Connection: close": the answer is whole, the next request goes on a new
 * connection. */
static void test_connection_close_answer_is_not_reused(void **state) {
  struct env *e = *state;
  struct probe p = {0}, q = {0};
  start_probe(e, &p, "GET", "/closing", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_memory_equal(p.body, "ok", 2);
  start_probe(e, &q, "POST", "/echo", "next", generous);
  assert_true(run_until(e, &q.done_calls, 1, 3000));
  assert_int_equal(q.result, UPSTREAM_OK);
  assert_int_equal(e->srv.connections_accepted, 2);
}

/* No Content-Length, no chunks: the body ends with the connection. */
static void test_close_delimited_body(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/eof-body", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.body_len, 13);
  assert_memory_equal(p.body, "until the end", 13);
}

/* Chunk extensions are ignored and trailers are not passed as headers. */
static void test_chunk_extensions_and_trailers(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/trailers", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.body_len, 5);
  assert_memory_equal(p.body, "abcde", 5);
  assert_false(p.saw_interim_header);
}

static void test_bad_chunk_size_is_broken(void **state) {
  struct env *e = *state;
  struct probe p = {0};
  start_probe(e, &p, "GET", "/badchunk", NULL, generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_BROKEN);
  assert_int_equal(p.status, 200);
  assert_true(strlen(p.curl_error) > 0);
}

/* The upstream closes an idle keep-alive connection: the next request
 * still succeeds (on a new connection). */
static void test_idle_connection_closed_by_the_upstream_is_not_used(void **state) {
  struct env *e = *state;
  struct probe p = {0}, q = {0};
  start_probe(e, &p, "POST", "/echo-then-close", "first", generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  run_for(e, 100); /* the close arrives while the connection idles */
  start_probe(e, &q, "POST", "/echo", "second", generous);
  assert_true(run_until(e, &q.done_calls, 1, 3000));
  assert_int_equal(q.result, UPSTREAM_OK);
  assert_memory_equal(q.body, "second", 6);
  assert_int_equal(e->srv.connections_accepted, 2);
}

/* The upstream closes a reused connection as the request arrives, without
 * a byte of answer: the request is sent once more on a fresh connection. */
static void test_request_on_a_reused_connection_closed_unanswered_is_retried(void **state) {
  struct env *e = *state;
  struct probe p = {0}, q = {0};
  start_probe(e, &p, "POST", "/echo", "first", generous);
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  start_probe(e, &q, "POST", "/vanish", "second", generous);
  assert_true(run_until(e, &q.done_calls, 1, 3000));
  assert_int_equal(q.result, UPSTREAM_OK);
  assert_int_equal(q.body_len, 6);
  assert_memory_equal(q.body, "second", 6);
  assert_int_equal(e->srv.connections_accepted, 2);
  assert_int_equal(e->srv.requests_seen, 3);
}

/* Paused: nothing is delivered and the idle timeout does not run; resumed:
 * the rest arrives. */
static void test_pause_and_resume(void **state) {
  struct env *e = *state;
  struct probe p = {.pause_on_first_data = true};
  struct upstream_timeouts t = {.first_byte_ms = 1000, .idle_ms = 150, .total_ms = 5000};
  start_probe(e, &p, "GET", "/stream", NULL, t);
  assert_true(run_until(e, &p.data_calls, 1, 3000));
  run_for(e, 400); /* longer than idle_ms, and every chunk has been sent */
  assert_int_equal(p.data_calls, 1);
  assert_int_equal(p.done_calls, 0);
  upstream_resume(p.t);
  assert_int_equal(p.data_calls, 1); /* never from inside the call */
  assert_true(run_until(e, &p.done_calls, 1, 3000));
  assert_int_equal(p.result, UPSTREAM_OK);
  assert_int_equal(p.body_len, 27);
  assert_memory_equal(p.body, "data: 0\n\ndata: 1\n\ndata: 2\n\n", 27);
}

static void test_client_close_inside_on_data(void **state) {
  struct env *e = *state;
  struct probe p = {.close_client_on_data = e};
  start_probe(e, &p, "GET", "/stream", NULL, generous);
  assert_true(run_until(e, &p.data_calls, 1, 3000));
  run_for(e, 400);
  assert_int_equal(p.data_calls, 1);
  assert_int_equal(p.done_calls, 0);
  assert_int_equal(e->close_done_calls, 1);
}

static void test_result_names(void **state) {
  assert_string_equal(upstream_result_name(UPSTREAM_OK), "ok");
  assert_string_equal(upstream_result_name(UPSTREAM_CONNECT_TIMEOUT), "connect_timeout");
  assert_string_equal(upstream_result_name(UPSTREAM_IDLE_TIMEOUT), "idle_timeout");
  assert_string_equal(upstream_result_name(UPSTREAM_TOTAL_TIMEOUT), "total_timeout");
  assert_string_equal(upstream_result_name(UPSTREAM_BROKEN), "broken");
  assert_string_equal(upstream_result_name((enum upstream_result)99), "unknown");
}

int main(void) {
  /* Loopback tests must not go through a proxy from the environment. */
  unsetenv("http_proxy");
  unsetenv("HTTP_PROXY");
  unsetenv("https_proxy");
  unsetenv("HTTPS_PROXY");
  unsetenv("ALL_PROXY");
  unsetenv("all_proxy");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_body_passes_through_with_status_and_headers, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_large_body_is_sent_without_expect, setup, teardown),
      cmocka_unit_test_setup_teardown(test_stream_chunks_arrive_separately_as_sent, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_connection_refused_is_connect_failed, setup, teardown),
      cmocka_unit_test_setup_teardown(test_connect_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_first_byte_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_idle_timeout_between_chunks, setup, teardown),
      cmocka_unit_test_setup_teardown(test_total_timeout_while_data_keeps_flowing, setup, teardown),
      cmocka_unit_test_setup_teardown(test_server_closing_mid_body_is_broken, setup, teardown),
      cmocka_unit_test_setup_teardown(test_cancel_inside_on_data_stops_all_callbacks, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_cancel_inside_on_response_stops_all_callbacks, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_nonzero_from_on_data_aborts_without_on_done, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_cancel_outside_callbacks, setup, teardown),
      cmocka_unit_test_setup_teardown(test_hundred_concurrent_transfers_all_complete, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_sequential_requests_reuse_the_connection, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_close_with_transfers_in_flight_makes_no_callbacks, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_close_from_on_done_frees_everything, setup, teardown),
      cmocka_unit_test_setup_teardown(test_header_with_newline_is_refused_without_echoing_value,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_head_answer_has_no_body_and_the_connection_is_reused,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_204_has_no_body, setup, teardown),
      cmocka_unit_test_setup_teardown(test_interim_response_is_skipped, setup, teardown),
      cmocka_unit_test_setup_teardown(test_connection_close_answer_is_not_reused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_close_delimited_body, setup, teardown),
      cmocka_unit_test_setup_teardown(test_chunk_extensions_and_trailers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bad_chunk_size_is_broken, setup, teardown),
      cmocka_unit_test_setup_teardown(test_idle_connection_closed_by_the_upstream_is_not_used,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(
          test_request_on_a_reused_connection_closed_unanswered_is_retried, setup, teardown),
      cmocka_unit_test_setup_teardown(test_pause_and_resume, setup, teardown),
      cmocka_unit_test_setup_teardown(test_client_close_inside_on_data, setup, teardown),
      cmocka_unit_test(test_result_names),
  };
  force_curl = false;
  int failed = cmocka_run_group_tests_name("lean client (plain http://)", tests, NULL, NULL);
  force_curl = true;
  failed += cmocka_run_group_tests_name("libcurl (curl_only)", tests, NULL, NULL);
  return failed;
}
