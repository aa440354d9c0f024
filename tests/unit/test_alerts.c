/* Unit tests for alerts/: strict validation of the "alerts" config
 * section (errors name the JSON path and never echo a URL), the per-alert
 * state machine on a virtual clock (firing after the duration, resolved
 * after recovery, dedup and repeat), the 5xx window, the /proc parsers, and
 * the engine on a real uv loop in standalone mode: a firing alert is posted
 * to a local webhook receiver, a dead channel is retried retry_max times,
 * sixteen channels at a blackhole neither delay the loop nor hold libuv's
 * threadpool (uv_queue_work and uv_getaddrinfo finish at once meanwhile),
 * and close always completes with uv_loop_close() == 0. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "base/base.h"
#include "alerts/alerts.h"

/* ---- validation ------------------------------------------------------- */

static const char *const good_config =
    "{\"channels\": ["
    "  {\"type\": \"webhook\", \"url\": \"env:ALERT_WEBHOOK_URL\", \"headers\": {\"X-Token\": "
    "\"env:TOKEN\"}},"
    "  {\"type\": \"email\", \"smtp_url\": \"smtp://127.0.0.1:25\", \"from\": \"zonegate@x\", "
    "\"to\": [\"ops@x\"],"
    "   \"username\": \"u\", \"password\": \"env:SMTP_PASSWORD\"},"
    "  {\"type\": \"sms\", \"url\": \"https://sms.example/send\", \"to\": \"+15550100\"}],"
    " \"rules\": {\"cpu_percent\": 80, \"cpu_for_s\": 300, \"memory_percent\": 90, "
    "\"memory_for_s\": 0,"
    "   \"error_ratio\": 0.05, \"error_window_s\": 300, \"error_min_requests\": 20, "
    "\"no_active_for_s\": 10,"
    "   \"key_rotation\": true, \"key_invalid\": true, \"leader_changed\": false},"
    " \"eval_interval_ms\": 5000, \"retry_max\": 5, \"retry_base_ms\": 1000, \"repeat_after_s\": "
    "3600}";

static int validate_text(const char *text, char *err, size_t errlen) {
  cJSON *doc = cJSON_Parse(text);
  assert_non_null(doc);
  err[0] = '\0';
  int rc = alerts_validate(doc, err, errlen);
  cJSON_Delete(doc);
  return rc;
}

static void test_validate_accepts_good_configs(void **state) {
  char err[512];
  assert_int_equal(validate_text(good_config, err, sizeof(err)), 0);
  assert_int_equal(validate_text("{}", err, sizeof(err)), 0);
  assert_int_equal(validate_text("{\"rules\": {}}", err, sizeof(err)), 0);
  assert_int_equal(
      validate_text("{\"channels\": [{\"type\": \"email\", \"smtp_url\": \"file:/run/smtp\", "
                    "\"from\": \"a@b\", \"to\": \"c@d\"}]}",
                    err, sizeof(err)),
      0);
  assert_int_equal(alerts_validate(NULL, err, sizeof(err)), 0);
}

struct bad_case {
  const char *json;
  const char *must_contain;
};

static void test_validate_rejects_naming_the_path(void **state) {
  static const struct bad_case cases[] = {
      {"[]", "alerts: expected an object"},
      {"{\"eval_intervall_ms\": 100}",
       "alerts.eval_intervall_ms: unknown key (did you mean \"eval_interval_ms\"?)"},
      {"{\"rules\": {\"cpu_precent\": 50}}",
       "alerts.rules.cpu_precent: unknown key (did you mean \"cpu_percent\"?)"},
      {"{\"rules\": []}", "alerts.rules: expected an object"},
      {"{\"rules\": {\"cpu_percent\": 150}}",
       "alerts.rules.cpu_percent: expected a number from 0 to 100, found 150"},
      {"{\"rules\": {\"cpu_for_s\": 2.5}}", "alerts.rules.cpu_for_s: expected a whole number"},
      {"{\"rules\": {\"key_rotation\": 1}}",
       "alerts.rules.key_rotation: expected true or false, found a number"},
      {"{\"rules\": {\"error_ratio\": \"5%\"}}",
       "alerts.rules.error_ratio: expected a number from 0 to 1"},
      {"{\"retry_max\": -1}", "alerts.retry_max: expected a whole number from 0 to 20"},
      {"{\"eval_interval_ms\": 10}", "alerts.eval_interval_ms: expected a whole number from 100"},
      {"{\"channels\": {}}", "alerts.channels: expected an array"},
      {"{\"channels\": [{\"url\": \"http://x\"}]}",
       "alerts.channels[0].type: expected \"webhook\", \"email\" or"},
      {"{\"channels\": [{\"type\": \"pager\"}]}", "alerts.channels[0].type: expected"},
      {"{\"channels\": [{\"type\": \"webhook\"}]}",
       "alerts.channels[0].url: expected an http:// or https:// URL"},
      {"{\"channels\": [{\"type\": \"webhook\", \"url\": \"http://x\"}, {\"type\": \"webhook\", "
       "\"url\": \"http://x\", "
       "\"header\": {}}]}",
       "alerts.channels[1].header: unknown key (did you mean \"headers\"?)"},
      {"{\"channels\": [{\"type\": \"webhook\", \"url\": \"http://x\", \"headers\": {\"X-A\": "
       "5}}]}",
       "alerts.channels[0].headers.X-A: expected a non-empty string"},
      {"{\"channels\": [{\"type\": \"webhook\", \"url\": \"http://x\", \"headers\": {\"Bad Name\": "
       "\"v\"}}]}",
       "alerts.channels[0].headers: expected header names"},
      {"{\"channels\": [{\"type\": \"sms\", \"url\": \"https://x\"}]}",
       "alerts.channels[0].to: expected a string"},
      {"{\"channels\": [{\"type\": \"email\", \"smtp_url\": \"http://x\", \"from\": \"a@b\", "
       "\"to\": \"c@d\"}]}",
       "alerts.channels[0].smtp_url: expected an smtp:// or smtps:// URL"},
      {"{\"channels\": [{\"type\": \"email\", \"smtp_url\": \"smtp://x\", \"from\": \"a@b\", "
       "\"to\": [\"c@d\", "
       "\"nobody\"]}]}",
       "alerts.channels[0].to[1]: expected an email address"},
      {"{\"channels\": [{\"type\": \"email\", \"smtp_url\": \"smtp://x\", \"from\": \"a@b\", "
       "\"to\": []}]}",
       "alerts.channels[0].to: expected an email address or an array"},
      {"{\"channels\": [{\"type\": \"email\", \"smtp_url\": \"smtp://x\", \"from\": \"a@b\", "
       "\"to\": \"c@d\", "
       "\"url\": \"http://x\"}]}",
       "alerts.channels[0].url: unknown key"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    char err[512];
    int rc = validate_text(cases[i].json, err, sizeof(err));
    if (rc == 0 || !strstr(err, cases[i].must_contain))
      fail_msg("case %zu: %s\n  got rc=%d err=\"%s\"\n  wanted \"%s\"", i, cases[i].json, rc, err,
               cases[i].must_contain);
  }
}

static void test_validate_never_echoes_a_url(void **state) {
  char err[512];
  assert_int_not_equal(
      validate_text(
          "{\"channels\": [{\"type\": \"webhook\", \"url\": \"ftp://user:TOPSECRET@host/x\"}]}",
          err, sizeof(err)),
      0);
  assert_non_null(strstr(err, "alerts.channels[0].url"));
  assert_null(strstr(err, "TOPSECRET"));
  assert_int_not_equal(
      validate_text("{\"channels\": [{\"type\": \"webhook\", \"url\": \"http://x\", \"headers\": "
                    "{\"X-Token\": \"TOPSECRET\\r\\nX-Evil: 1\"}}]}",
                    err, sizeof(err)),
      0);
  assert_null(strstr(err, "TOPSECRET"));
}

/* ---- state machine ------------------------------------------------------ */

#define MIN5 (300u * 1000u)
#define HOUR (3600u * 1000u)

static void test_fires_after_duration_then_resolves(void **state) {
  struct alert_state s = {0};
  uint64_t t = 1000000;
  assert_int_equal(alert_state_step(&s, false, t, MIN5, HOUR), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, t, MIN5, HOUR), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, t + MIN5 - 1, MIN5, HOUR), ALERT_NONE);
  assert_false(s.firing);
  assert_int_equal(alert_state_step(&s, true, t + MIN5, MIN5, HOUR), ALERT_FIRE);
  assert_true(s.firing);
  /* Dedup: still firing, nothing sent until repeat_after. */
  assert_int_equal(alert_state_step(&s, true, t + MIN5 + 5000, MIN5, HOUR), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, t + MIN5 + HOUR - 1, MIN5, HOUR), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, t + MIN5 + HOUR, MIN5, HOUR), ALERT_REPEAT);
  assert_int_equal(alert_state_step(&s, true, t + MIN5 + HOUR + 1, MIN5, HOUR), ALERT_NONE);
  /* Recovery resolves once. */
  assert_int_equal(alert_state_step(&s, false, t + 2 * HOUR, MIN5, HOUR), ALERT_RESOLVE);
  assert_false(s.firing);
  assert_int_equal(alert_state_step(&s, false, t + 2 * HOUR + 1, MIN5, HOUR), ALERT_NONE);
}

static void test_a_dip_restarts_the_duration(void **state) {
  struct alert_state s = {0};
  assert_int_equal(alert_state_step(&s, true, 0, MIN5, 0), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, MIN5 - 1000, MIN5, 0), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, false, MIN5 - 500, MIN5, 0),
                   ALERT_NONE); /* not firing: no resolve */
  assert_int_equal(alert_state_step(&s, true, MIN5, MIN5, 0), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, 2 * MIN5 - 1, MIN5, 0), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, true, 2 * MIN5, MIN5, 0), ALERT_FIRE);
}

static void test_immediate_rule_and_no_repeat(void **state) {
  struct alert_state s = {0};
  assert_int_equal(alert_state_step(&s, true, 5, 0, 0), ALERT_FIRE);
  for (uint64_t t = 6; t < 10 * HOUR; t += HOUR / 2)
    assert_int_equal(alert_state_step(&s, true, t, 0, 0), ALERT_NONE);
  assert_int_equal(alert_state_step(&s, false, 10 * HOUR, 0, 0), ALERT_RESOLVE);
  /* A new episode fires again. */
  assert_int_equal(alert_state_step(&s, true, 11 * HOUR, 0, 0), ALERT_FIRE);
}

/* ---- 5xx window --------------------------------------------------------- */

static void test_error_window_counts_the_last_window(void **state) {
  struct error_window w;
  error_window_reset(&w);
  const uint64_t window = 2000;
  uint64_t req, err;
  error_window_push(&w, 0, window, 0, 0);
  error_window_delta(&w, 0, window, &req, &err);
  assert_int_equal(req, 0);
  /* 10 requests, 6 of them 5xx, during the first second. */
  error_window_push(&w, 500, window, 5, 3);
  error_window_push(&w, 1000, window, 10, 6);
  error_window_delta(&w, 1000, window, &req, &err);
  assert_int_equal(req, 10);
  assert_int_equal(err, 6);
  /* Traffic stops: the errors leave the window once it has passed. */
  error_window_push(&w, 2000, window, 10, 6);
  error_window_delta(&w, 2000, window, &req, &err);
  assert_int_equal(req, 10);
  error_window_push(&w, 3000, window, 10, 6);
  error_window_delta(&w, 3000, window, &req, &err);
  assert_int_equal(req, 0);
  assert_int_equal(err, 0);
  /* New healthy traffic. */
  error_window_push(&w, 3500, window, 30, 6);
  error_window_delta(&w, 3500, window, &req, &err);
  assert_int_equal(req, 20);
  assert_int_equal(err, 0);
}

static void test_error_window_is_bounded_with_fast_sampling(void **state) {
  struct error_window w;
  error_window_reset(&w);
  const uint64_t window = 300000; /* 5 min sampled every 10 ms */
  uint64_t total = 0, errors = 0, req, err;
  for (uint64_t t = 0; t <= 600000; t += 10) {
    total += 2;
    if (t >= 450000) errors += 1; /* half the requests fail in the last 150 s */
    error_window_push(&w, t, window, total, errors);
    assert_true(w.count <= ERROR_WINDOW_SLOTS + 4);
  }
  error_window_delta(&w, 600000, window, &req, &err);
  /* ~300 s of traffic at 200 req/s; merging may stretch it by one slot. */
  assert_true(req >= 60000 && req <= 60000 + 2 * (window / ERROR_WINDOW_SLOTS) / 10 * 2);
  double ratio = (double)err / (double)req;
  assert_true(ratio > 0.24 && ratio < 0.26);
}

/* ---- /proc parsers ------------------------------------------------------ */

static void test_proc_parsers(void **state) {
  uint64_t busy, total;
  assert_int_equal(
      zg_parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n", &busy, &total), 0);
  assert_int_equal(total, 1000);
  assert_int_equal(busy, 150);
  assert_int_equal(zg_parse_proc_stat("intr 5\n", &busy, &total), -1);
  double pct;
  assert_int_equal(zg_parse_meminfo("MemTotal:       4000000 kB\nMemFree:  100 kB\n"
                                    "MemAvailable:    400000 kB\n",
                                    &pct),
                   0);
  assert_true(pct > 89.99 && pct < 90.01);
  assert_int_equal(zg_parse_meminfo("MemTotal: 100 kB\n", &pct), -1);
}

/* ---- the engine on a real loop ----------------------------------------- */

/* A one-shot-per-connection HTTP receiver: reads a request with a
 * Content-Length body, keeps the body, answers `status`. */
struct receiver {
  uv_tcp_t server;
  int port;
  int status;
  int requests;
  char bodies[8][2048];
};

struct conn {
  uv_tcp_t tcp;
  struct receiver *rx;
  char buf[8192];
  size_t len;
  uv_write_t write_req;
  bool answered;
};

static void on_conn_closed(uv_handle_t *h) {
  free(h->data);
}

static void on_written(uv_write_t *w, int status) {
  struct conn *c = w->data;
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct conn *c = h->data;
  buf->base = c->buf + c->len;
  buf->len = sizeof(c->buf) - 1 - c->len;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  struct conn *c = s->data;
  if (n < 0) {
    if (!c->answered) uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    return;
  }
  c->len += (size_t)n;
  c->buf[c->len] = '\0';
  char *end = strstr(c->buf, "\r\n\r\n");
  char *cl = strstr(c->buf, "Content-Length:");
  if (!end || !cl || c->answered) return;
  size_t want = (size_t)strtoul(cl + 15, NULL, 10);
  if (c->len - (size_t)(end + 4 - c->buf) < want) return;
  struct receiver *rx = c->rx;
  if (rx->requests < 8)
    snprintf(rx->bodies[rx->requests], sizeof(rx->bodies[0]), "%.*s", (int)want, end + 4);
  rx->requests++;
  c->answered = true;
  uv_read_stop(s);
  static char answer[128];
  snprintf(answer, sizeof(answer),
           "HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", rx->status);
  uv_buf_t out = uv_buf_init(answer, (unsigned)strlen(answer));
  c->write_req.data = c;
  uv_write(&c->write_req, s, &out, 1, on_written);
}

static void on_connection(uv_stream_t *server, int status) {
  struct receiver *rx = server->data;
  struct conn *c = calloc(1, sizeof(*c));
  c->rx = rx;
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  assert_int_equal(uv_accept(server, (uv_stream_t *)&c->tcp), 0);
  uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read);
}

static void receiver_start(uv_loop_t *loop, struct receiver *rx, int status) {
  memset(rx, 0, sizeof(*rx));
  rx->status = status;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, &rx->server);
  rx->server.data = rx;
  assert_int_equal(uv_tcp_bind(&rx->server, (const struct sockaddr *)&addr, 0), 0);
  assert_int_equal(uv_listen((uv_stream_t *)&rx->server, 16, on_connection), 0);
  struct sockaddr_storage bound;
  int len = sizeof(bound);
  uv_tcp_getsockname(&rx->server, (struct sockaddr *)&bound, &len);
  rx->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
}

static void on_closed(void *arg) {
  (*(int *)arg)++;
}

/* Runs the loop until cond() or timeout_ms (bounded). */
static bool run_until(uv_loop_t *loop, bool (*cond)(void *), void *ud, uint64_t timeout_ms) {
  uint64_t deadline = zg_mono_ms() + timeout_ms;
  while (zg_mono_ms() < deadline) {
    if (cond(ud)) return true;
    uv_run(loop, UV_RUN_ONCE);
  }
  return cond(ud);
}

static bool received_one(void *ud) {
  return ((struct receiver *)ud)->requests >= 1;
}

struct status_probe {
  struct alerts *alerts;
  int want_failed_attempts;
};

static bool delivery_given_up(void *ud) {
  struct status_probe *p = ud;
  cJSON *doc = cJSON_CreateObject();
  alerts_status_json(p->alerts, doc);
  cJSON *recent = cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "alerts"), "recent_deliveries");
  cJSON *first = cJSON_GetArrayItem(recent, 0);
  bool done = first && cJSON_IsFalse(cJSON_GetObjectItem(first, "ok")) &&
              cJSON_GetObjectItem(first, "attempts")->valueint == p->want_failed_attempts;
  cJSON_Delete(doc);
  return done;
}

/* memory_percent 0.001: any running system is above it, so the memory rule
 * fires on the first evaluation. */
static cJSON *config_with_webhook(const char *url, unsigned retry_max, unsigned retry_base_ms) {
  char text[1024];
  snprintf(text, sizeof(text),
           "{\"channels\": [{\"type\": \"webhook\", \"url\": \"%s\", \"headers\": {\"X-Token\": "
           "\"env:ZG_TEST_TOKEN\"}}],"
           " \"rules\": {\"memory_percent\": 0.001, \"cpu_percent\": 0},"
           " \"eval_interval_ms\": 100, \"retry_max\": %u, \"retry_base_ms\": %u}",
           url, retry_max, retry_base_ms);
  cJSON *doc = cJSON_Parse(text);
  assert_non_null(doc);
  return doc;
}

static void test_engine_posts_a_firing_alert(void **state) {
  setenv("ZG_TEST_TOKEN", "token-value-123", 1);
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct receiver rx;
  receiver_start(&loop, &rx, 200);
  struct alerts *a = NULL;
  char err[256];
  assert_int_equal(alerts_start(&loop, "gw-test", NULL, NULL, NULL, &a, err, sizeof(err)), 0);
  char url[128];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/hook", rx.port);
  cJSON *cfg = config_with_webhook(url, 0, 10);
  alerts_apply_config(a, cfg);
  cJSON_Delete(cfg);
  assert_true(run_until(&loop, received_one, &rx, 5000));
  cJSON *body = cJSON_Parse(rx.bodies[0]);
  assert_non_null(body);
  assert_string_equal(cJSON_GetObjectItem(body, "alert")->valuestring, "memory");
  assert_string_equal(cJSON_GetObjectItem(body, "status")->valuestring, "firing");
  assert_string_equal(cJSON_GetObjectItem(body, "node")->valuestring, "gw-test");
  assert_true(cJSON_IsFalse(cJSON_GetObjectItem(body, "cluster_wide")));
  assert_non_null(cJSON_GetObjectItem(body, "started_at"));
  assert_null(cJSON_GetObjectItem(body, "resolved_at"));
  assert_true(
      cJSON_IsNumber(cJSON_GetObjectItem(cJSON_GetObjectItem(body, "details"), "memory_percent")));
  cJSON_Delete(body);
  /* Dedup: the alert keeps firing but is not sent again. */
  uint64_t until = zg_mono_ms() + 500;
  while (zg_mono_ms() < until) uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(rx.requests, 1);

  cJSON *doc = cJSON_CreateObject();
  alerts_status_json(a, doc);
  cJSON *firing = cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "alerts"), "firing");
  assert_int_equal(cJSON_GetArraySize(firing), 1);
  char *text = cJSON_PrintUnformatted(doc);
  assert_null(strstr(text, "token-value-123"));
  free(text);
  cJSON_Delete(doc);

  int closed = 0;
  alerts_close(a, on_closed, &closed);
  uv_close((uv_handle_t *)&rx.server, NULL);
  for (int i = 0; i < 1000 && closed == 0; i++) uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(closed, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_engine_retries_then_gives_up(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct receiver rx;
  receiver_start(&loop, &rx, 503);
  struct alerts *a = NULL;
  char err[256];
  assert_int_equal(alerts_start(&loop, "gw-test", NULL, NULL, NULL, &a, err, sizeof(err)), 0);
  char url[128];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/hook", rx.port);
  cJSON *cfg = config_with_webhook(url, 2, 20);
  alerts_apply_config(a, cfg);
  cJSON_Delete(cfg);
  struct status_probe probe = {a, 3}; /* the first attempt and 2 retries */
  assert_true(run_until(&loop, delivery_given_up, &probe, 5000));
  assert_int_equal(rx.requests, 3);
  int closed = 0;
  alerts_close(a, on_closed, &closed);
  uv_close((uv_handle_t *)&rx.server, NULL);
  for (int i = 0; i < 1000 && closed == 0; i++) uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(closed, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

static bool retry_pending(void *ud) {
  struct receiver *rx = ud;
  return rx->requests >= 1;
}

static void test_close_with_a_retry_pending(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  struct receiver rx;
  receiver_start(&loop, &rx, 500);
  struct alerts *a = NULL;
  char err[256];
  assert_int_equal(alerts_start(&loop, "gw-test", NULL, NULL, NULL, &a, err, sizeof(err)), 0);
  char url[128];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/hook", rx.port);
  cJSON *cfg = config_with_webhook(url, 5, 600000); /* next retry in 10 min */
  alerts_apply_config(a, cfg);
  cJSON_Delete(cfg);
  assert_true(run_until(&loop, retry_pending, &rx, 5000));
  /* Let the after-work callback schedule the retry. */
  for (int i = 0; i < 20; i++) uv_run(&loop, UV_RUN_NOWAIT);
  uint64_t started = zg_mono_ms();
  int closed = 0;
  alerts_close(a, on_closed, &closed);
  uv_close((uv_handle_t *)&rx.server, NULL);
  for (int i = 0; i < 1000 && closed == 0; i++) uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(closed, 1);
  assert_true(zg_mono_ms() - started < 5000);
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- dead targets do not hold the loop or libuv's threadpool ---------- */

struct pool_probe {
  int work_done, resolved;
  uint64_t queued_at, work_ms, resolve_ms;
};

static void probe_work(uv_work_t *req) {
  (void)req;
}

static void probe_after_work(uv_work_t *req, int status) {
  struct pool_probe *p = req->data;
  p->work_done++;
  p->work_ms = zg_mono_ms() - p->queued_at;
}

static void probe_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  struct pool_probe *p = req->data;
  p->resolved++;
  p->resolve_ms = zg_mono_ms() - p->queued_at;
  uv_freeaddrinfo(res);
}

static bool pending_many(void *ud) {
  struct alerts *a = ud;
  cJSON *doc = cJSON_CreateObject();
  alerts_status_json(a, doc);
  const cJSON *n = cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "alerts"), "pending_deliveries");
  bool many = cJSON_IsNumber(n) && n->valuedouble >= 16;
  cJSON_Delete(doc);
  return many;
}

/* Sixteen channels (eight SMTP, eight webhooks) point at a blackhole: a
 * listening socket that never accepts, so every connection hangs until
 * curl's 10 s timeout. While they hang, the loop keeps its 10 ms timer
 * on time and a uv_queue_work job and a uv_getaddrinfo (what peer
 * connections do during a failover) finish at once: delivery holds no
 * threadpool worker. With deliveries on the threadpool, four hanging jobs
 * would hold every worker for 10 s. */
static void test_dead_targets_do_not_block_loop_or_threadpool(void **state) {
  uv_loop_t loop;
  assert_int_equal(uv_loop_init(&loop), 0);
  int hole = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(hole >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  assert_int_equal(bind(hole, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(listen(hole, 1), 0);
  socklen_t len = sizeof(sa);
  getsockname(hole, (struct sockaddr *)&sa, &len);
  int port = ntohs(sa.sin_port);

  zg_buf cfg;
  zg_buf_init(&cfg);
  zg_buf_appendf(&cfg, "{\"channels\": [");
  for (int i = 0; i < 16; i++)
    zg_buf_appendf(&cfg,
                   i % 2 ? "%s{\"type\": \"webhook\", \"url\": \"http://127.0.0.1:%d/hook\"}"
                         : "%s{\"type\": \"email\", \"smtp_url\": \"smtp://127.0.0.1:%d\", "
                           "\"from\": \"zg@example.com\", \"to\": \"ops@example.com\"}",
                   i ? "," : "", port);
  zg_buf_appendf(&cfg, "], \"rules\": {\"memory_percent\": 0.001, \"cpu_percent\": 0},"
                       " \"eval_interval_ms\": 100, \"retry_max\": 0}");
  cJSON *doc = cJSON_Parse(cfg.data);
  zg_buf_free(&cfg);
  assert_non_null(doc);
  struct alerts *a = NULL;
  char err[256];
  assert_int_equal(alerts_start(&loop, "gw-test", NULL, NULL, NULL, &a, err, sizeof(err)), 0);
  alerts_apply_config(a, doc);
  cJSON_Delete(doc);
  assert_true(run_until(&loop, pending_many, a, 5000));
  /* Let every delivery reach its hanging connection. */
  uint64_t until = zg_mono_ms() + 300;
  while (zg_mono_ms() < until) uv_run(&loop, UV_RUN_NOWAIT);

  struct pool_probe probe = {0};
  uv_work_t works[8];
  uv_getaddrinfo_t gai;
  probe.queued_at = zg_mono_ms();
  for (int i = 0; i < 8; i++) {
    works[i].data = &probe;
    assert_int_equal(uv_queue_work(&loop, &works[i], probe_work, probe_after_work), 0);
  }
  gai.data = &probe;
  struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
  assert_int_equal(uv_getaddrinfo(&loop, &gai, probe_resolved, "localhost", "18791", &hints), 0);
  uint64_t last = zg_mono_ms(), worst_gap = 0;
  while (probe.work_done < 8 || probe.resolved < 1) {
    uv_run(&loop, UV_RUN_NOWAIT);
    uint64_t now = zg_mono_ms();
    if (now - last > worst_gap) worst_gap = now - last;
    last = now;
    if (now - probe.queued_at > 3000) break;
    usleep(1000);
  }
  assert_int_equal(probe.work_done, 8);
  assert_int_equal(probe.resolved, 1);
  assert_true(probe.work_ms < 1000);
  assert_true(probe.resolve_ms < 1000);
  assert_true(worst_gap < 200); /* the loop itself never waited on a delivery */
  assert_true(pending_many(a)); /* the deliveries are still hanging */

  uint64_t started = zg_mono_ms();
  int closed = 0;
  alerts_close(a, on_closed, &closed);
  for (int i = 0; i < 1000 && closed == 0; i++) uv_run(&loop, UV_RUN_ONCE);
  assert_int_equal(closed, 1);
  assert_true(zg_mono_ms() - started < 1000); /* close cancels hanging deliveries at once */
  uv_run(&loop, UV_RUN_DEFAULT);
  assert_int_equal(uv_loop_close(&loop), 0);
  close(hole);
}

int main(void) {
  zg_log_set_level(ZG_ERROR);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_validate_accepts_good_configs),
      cmocka_unit_test(test_validate_rejects_naming_the_path),
      cmocka_unit_test(test_validate_never_echoes_a_url),
      cmocka_unit_test(test_fires_after_duration_then_resolves),
      cmocka_unit_test(test_a_dip_restarts_the_duration),
      cmocka_unit_test(test_immediate_rule_and_no_repeat),
      cmocka_unit_test(test_error_window_counts_the_last_window),
      cmocka_unit_test(test_error_window_is_bounded_with_fast_sampling),
      cmocka_unit_test(test_proc_parsers),
      cmocka_unit_test(test_engine_posts_a_firing_alert),
      cmocka_unit_test(test_engine_retries_then_gives_up),
      cmocka_unit_test(test_close_with_a_retry_pending),
      cmocka_unit_test(test_dead_targets_do_not_block_loop_or_threadpool),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
