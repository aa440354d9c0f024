/* gateway.c: start and stop of the client-facing side, the router, the
 * access log and request metrics. Routes: the whole OpenAI API under /v1/
 * (passed through by chat.c, labelled by endpoint) and the /health family;
 * anything else is 404, a known path with the wrong method 405. /metrics
 * is not served on the client port (it is public behind the LB): the
 * admin API answers it (gateway_metrics_respond), and listen.metrics can
 * add a listener of its own (gateway_metrics_listen). Every request's
 * client address is decided first (ident.c). Start fails only when the
 * client port cannot be bound or memory runs out. */
#include "gateway/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct httpd_limits limits_from(const struct zg_config *cfg) {
  struct httpd_limits l = {0};
  l.max_body_bytes = cfg->max_body_bytes;
  l.max_header_bytes = cfg->max_header_bytes;
  l.client_timeout_ms = cfg->client_timeout_ms;
  l.keepalive_timeout_ms = 75000;
  l.slow_client_timeout_ms = cfg->slow_client_timeout_ms;
  return l;
}

void gateway_access_route(struct httpd_req *req, const char *route) {
  struct gateway_access *a = httpd_req_user(req);
  if (a) a->route = route;
}

struct gateway_access *gateway_access_of(struct httpd_req *req) {
  return httpd_req_user(req);
}

/* Appends s as a JSON string (quotes included). Bytes from 0x80 up pass
 * through, as cJSON does. */
static void append_json_string(zg_buf *out, const char *s) {
  static const char hex[] = "0123456789abcdef";
  zg_buf_append(out, "\"", 1);
  const char *run = s;
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch >= 0x20 && ch != '"' && ch != '\\') continue;
    zg_buf_append(out, run, (size_t)(s - run));
    run = s + 1;
    char esc[6] = {'\\', (char)ch, 0, 0, 0, 0};
    size_t n = 2;
    switch (ch) {
    case '"':
    case '\\':
      break;
    case '\n':
      esc[1] = 'n';
      break;
    case '\r':
      esc[1] = 'r';
      break;
    case '\t':
      esc[1] = 't';
      break;
    default:
      esc[1] = 'u';
      esc[2] = '0';
      esc[3] = '0';
      esc[4] = hex[ch >> 4];
      esc[5] = hex[ch & 15];
      n = 6;
    }
    zg_buf_append(out, esc, n);
  }
  zg_buf_append(out, run, (size_t)(s - run));
  zg_buf_append(out, "\"", 1);
}

static void append_field(zg_buf *out, const char *name, const char *value) {
  zg_buf_append(out, ",\"", 2);
  zg_buf_append(out, name, strlen(name));
  zg_buf_append(out, "\":", 2);
  append_json_string(out, value);
}

/* One access line, formatted directly (no cJSON tree): the same shape as
 * zg_log_fields() writes: ts, level, node, event, then the fields. */
static void write_access_line(struct gateway *gw, enum zg_log_level level,
                              const struct gateway_access *a, struct httpd_req *req,
                              const char *route, int status, uint64_t elapsed_us) {
  zg_buf *out = &gw->access_line;
  zg_buf_reset(out);
  char ts[32];
  zg_iso8601(zg_wall_ms(), ts);
  zg_buf_append(out, "{\"ts\":", 6);
  append_json_string(out, ts);
  append_field(out, "level", level == ZG_DEBUG ? "debug" : "info");
  if (gw->cfg->node_id[0]) {
    char node[64];
    snprintf(node, sizeof(node), "%.63s", gw->cfg->node_id);
    append_field(out, "node", node);
  }
  append_field(out, "event", "access");
  if (a && a->noted) {
    append_field(out, "cache", a->cache ? a->cache : "none");
    zg_buf_appendf(out, ",\"stream\":%s", a->stream ? "true" : "false");
    if (a->has_token) append_field(out, "token", a->token);
    if (a->has_upstream) {
      append_field(out, "upstream", a->upstream);
      if (a->key_id[0]) append_field(out, "key_id", a->key_id);
      zg_buf_appendf(out, ",\"attempts\":%u", a->attempts);
    }
    if (a->upstream_result[0]) append_field(out, "upstream_result", a->upstream_result);
    if (a->upstream_us)
      zg_buf_appendf(out, ",\"upstream_ms\":%llu.%03u", (unsigned long long)(a->upstream_us / 1000),
                     (unsigned)(a->upstream_us % 1000));
    if (a->ttfb_us)
      zg_buf_appendf(out, ",\"ttfb_ms\":%llu.%03u", (unsigned long long)(a->ttfb_us / 1000),
                     (unsigned)(a->ttfb_us % 1000));
  }
  append_field(out, "method", httpd_req_method(req));
  append_field(out, "route", route);
  zg_buf_appendf(out, ",\"status\":%d,\"latency_ms\":%llu.%03u,\"bytes\":%llu", status,
                 (unsigned long long)(elapsed_us / 1000), (unsigned)(elapsed_us % 1000),
                 (unsigned long long)httpd_req_bytes_sent(req));
  append_field(out, "client_ip", a && a->client_ip[0] ? a->client_ip : httpd_req_peer_ip(req));
  if (strcmp(httpd_req_socket_ip(req), a && a->client_ip[0] ? a->client_ip : "") != 0)
    append_field(out, "peer_ip", httpd_req_socket_ip(req)); /* the LB or the forwarding node */
  if (a && a->forwarded) zg_buf_appendf(out, ",\"forwarded\":true");
  zg_buf_append(out, "}\n", 2);
  if (out->data) {
    fwrite(out->data, 1, out->len, stdout);
    fflush(stdout);
  }
}

/* httpd finish hook: metrics and one access line per request. */
static void on_request_finished(void *ctx, struct httpd_req *req) {
  struct gateway *gw = ctx;
  struct gateway_access *a = httpd_req_user(req);
  int status = httpd_req_status(req);
  if (status == 0) status = 499; /* client closed before the answer was complete */
  const char *route = a ? a->route : "invalid";
  char code[8] = "499";
  if (status >= 100 && status <= 999) { /* always, from httpd; hand-written: runs per request */
    code[0] = (char)('0' + status / 100);
    code[1] = (char)('0' + status / 10 % 10);
    code[2] = (char)('0' + status % 10);
  } else {
    snprintf(code, sizeof(code), "%d", status);
  }
  metrics_counter_add(gw->m_requests, 1, route, code);
  uint64_t received = httpd_req_received_us(req);
  uint64_t elapsed_us = received ? zg_mono_us() - received : 0;
  metrics_histogram_observe(gw->m_latency, (double)elapsed_us / 1e6, route);
  gw->requests_total++;
  if (status >= 500) gw->requests_5xx++;
  /* Load-balancer probes and scrapes arrive several times a second: they
   * are logged at debug level unless they fail. */
  bool probe = strncmp(route, "/health", 7) == 0;
  enum zg_log_level level = probe && status < 500 ? ZG_DEBUG : ZG_INFO;
  if (zg_log_enabled(level)) write_access_line(gw, level, a, req, route, status, elapsed_us);
  free(a);
  httpd_req_set_user(req, NULL);
}

void gateway_note_upstream(struct gateway *gw, bool ok, const char *error) {
  if (ok) {
    gw->upstream_consecutive_failures = 0;
    gw->upstream_last_ok_ms = zg_wall_ms();
    return;
  }
  gw->upstream_consecutive_failures++;
  gw->upstream_last_error_ms = zg_wall_ms();
  snprintf(gw->upstream_last_error, sizeof(gw->upstream_last_error), "%s", error ? error : "");
}

bool gateway_upstream_healthy(const struct gateway *gw) {
  return gw->upstream_consecutive_failures < GATEWAY_UPSTREAM_FAILURE_THRESHOLD;
}

void gateway_metrics_respond(struct gateway *gw, struct httpd_req *req) {
  const char *method = httpd_req_method(req);
  if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
    const char *headers[] = {"Allow: GET, HEAD", NULL};
    httpd_respond_error(req, 405, "invalid_request_error", "method_not_allowed", headers,
                        "method %s is not allowed on /metrics", method);
    return;
  }
  zg_buf out;
  zg_buf_init(&out);
  metrics_render(gw->metrics, &out);
  for (size_t i = 0; i < gw->n_collectors; i++)
    gw->collectors[i].collect(gw->collectors[i].ud, &out);
  httpd_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL,
                out.data ? out.data : "", out.len);
  zg_buf_free(&out);
}

/* The route label of a /health path: one of the fixed endpoints, else
 * "unknown", so client-chosen paths cannot grow the metric series. */
static const char *health_route(const char *path) {
  static const char *const known[] = {"/health", "/health/live", "/health/ready", "/health/active",
                                      "/health/standby"};
  for (size_t i = 0; i < ZG_ARRAY_LEN(known); i++)
    if (strcmp(path, known[i]) == 0) return known[i];
  return "unknown";
}

/* The OpenAI endpoints by path template ("{id}" is one path segment): the route label of metrics
 * and access lines, so that ids never become label values. A path under /v1 that matches none is
 * "/v1/other". */
static const char *const api_routes[] = {
    "/v1/chat/completions",
    "/v1/chat/completions/{id}",
    "/v1/chat/completions/{id}/messages",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/responses",
    "/v1/responses/{id}",
    "/v1/responses/{id}/cancel",
    "/v1/responses/{id}/input_items",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/files",
    "/v1/files/{id}",
    "/v1/files/{id}/content",
    "/v1/uploads",
    "/v1/uploads/{id}/parts",
    "/v1/uploads/{id}/complete",
    "/v1/uploads/{id}/cancel",
    "/v1/batches",
    "/v1/batches/{id}",
    "/v1/batches/{id}/cancel",
    "/v1/fine_tuning/jobs",
    "/v1/fine_tuning/jobs/{id}",
    "/v1/fine_tuning/jobs/{id}/cancel",
    "/v1/fine_tuning/jobs/{id}/events",
    "/v1/vector_stores",
    "/v1/vector_stores/{id}",
    "/v1/vector_stores/{id}/files",
    "/v1/vector_stores/{id}/files/{id}",
    "/v1/assistants",
    "/v1/assistants/{id}",
    "/v1/threads",
    "/v1/threads/{id}",
    "/v1/threads/{id}/messages",
    "/v1/threads/{id}/runs",
    "/v1/threads/{id}/runs/{id}",
};

/* Segment by segment; empty segments of the path ("//", a trailing "/")
 * are skipped, so /v1//chat/completions/ is /v1/chat/completions: an
 * upstream that merges slashes serves it as that endpoint, so the gateway
 * treats it as one too (usage asked for and counted, the same label). */
static bool route_matches(const char *tpl, const char *path) {
  for (;;) {
    while (*tpl == '/') tpl++;
    while (*path == '/') path++;
    if (!*tpl || !*path) return !*tpl && !*path;
    size_t seg = strcspn(path, "/"), tseg = strcspn(tpl, "/");
    if (tpl[0] != '{' && (seg != tseg || memcmp(tpl, path, seg) != 0)) return false;
    tpl += tseg; /* "{id}": any one segment */
    path += seg;
  }
}

static const char *api_route(const char *path) {
  for (size_t i = 0; i < ZG_ARRAY_LEN(api_routes); i++)
    if (route_matches(api_routes[i], path)) return api_routes[i];
  return "/v1/other";
}

static void on_request(void *ctx, struct httpd_req *req) {
  struct gateway *gw = ctx;
  struct gateway_access *access = calloc(1, sizeof(*access));
  if (!access) {
    httpd_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return;
  }
  access->route = "unknown";
  httpd_req_set_user(req, access);
  if (gateway_identify(gw, req, access) != 0) return; /* answered 401 */
  const char *path = httpd_req_path(req);
  const char *method = httpd_req_method(req);
  bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
  bool post = strcmp(method, "POST") == 0;
  const char *route = NULL;
  const char *allowed = NULL;

  if (strncmp(path, "/v1/", 4) == 0) {
    /* The whole OpenAI API under /v1 passes through (the upstream answers
     * for what it does not know); the metrics label is the endpoint. */
    route = api_route(path);
    gateway_access_route(req, route);
    gateway_handle_proxy(gw, req, route);
    return;
  } else if (strcmp(path, "/health") == 0 || strncmp(path, "/health/", 8) == 0) {
    route = "/health";
    gateway_access_route(req, health_route(path));
    if (get || post) {
      gateway_handle_health(gw, req);
      return;
    }
    allowed = "Allow: GET, HEAD, POST";
  } else if (strcmp(path, "/metrics") == 0) {
    httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL,
                        "/metrics is not served on the client port: scrape the admin port "
                        "(listen.admin) or listen.metrics");
    return;
  }
  if (route) {
    const char *headers[] = {allowed, NULL};
    httpd_respond_error(req, 405, "invalid_request_error", "method_not_allowed", headers,
                        "method %s is not allowed on %s", method, path);
    return;
  }
  httpd_respond_error(
      req, 404, "invalid_request_error", "not_found", NULL,
      "no route for %s %s; the OpenAI API is under /v1/ (e.g. /v1/chat/completions), "
      "health checks under /health",
      method, path);
}

static double gauge_in_flight(void *ud) {
  struct gateway *gw = ud;
  return gw->limiter ? limiter_in_flight(gw->limiter) : 0;
}
static double gauge_queue(void *ud) {
  struct gateway *gw = ud;
  return gw->limiter ? limiter_queue_depth(gw->limiter) : 0;
}
static double gauge_cache_hits(void *ud) {
  struct response_cache_stats s;
  response_cache_stats(((struct gateway *)ud)->cache, &s);
  return (double)s.hits;
}
static double gauge_cache_misses(void *ud) {
  struct response_cache_stats s;
  response_cache_stats(((struct gateway *)ud)->cache, &s);
  return (double)s.misses;
}
static double gauge_cache_bytes(void *ud) {
  struct response_cache_stats s;
  response_cache_stats(((struct gateway *)ud)->cache, &s);
  return (double)s.bytes;
}
static double gauge_cache_entries(void *ud) {
  struct response_cache_stats s;
  response_cache_stats(((struct gateway *)ud)->cache, &s);
  return (double)s.entries;
}
static double gauge_rss(void *ud) {
  return (double)zg_process_rss_bytes();
}
static double gauge_cpu(void *ud) {
  return zg_process_cpu_seconds();
}
static double gauge_connections(void *ud) {
  struct gateway *gw = ud;
  return gw->http ? (double)httpd_open_connections(gw->http) : 0;
}
static double gauge_loop_lag(void *ud) {
  return (double)((struct gateway *)ud)->loop_lag_ms / 1000.0;
}

static void register_metrics(struct gateway *gw) {
  struct metrics *m = gw->metrics;
  gw->m_requests = metrics_counter(m, "zonegate_requests_total",
                                   "Client requests by route and status code", "route,code");
  gw->m_latency = metrics_histogram(
      m, "zonegate_request_duration_seconds", "Client request latency, gateway in to last byte out",
      "route", metrics_default_latency_buckets, metrics_default_latency_buckets_count);
  gw->m_upstream_latency = metrics_histogram(
      m, "zonegate_upstream_duration_seconds", "Upstream transfer time", "upstream",
      metrics_default_latency_buckets, metrics_default_latency_buckets_count);
  gw->m_ttfb = metrics_histogram(m, "zonegate_upstream_ttfb_seconds", "Upstream time to first byte",
                                 "upstream", metrics_default_latency_buckets,
                                 metrics_default_latency_buckets_count);
  gw->m_upstream_errors = metrics_counter(m, "zonegate_upstream_errors_total",
                                          "Upstream failures by kind", "upstream,kind");
  gw->m_tokens = metrics_counter(m, "zonegate_tokens_total",
                                 "Tokens the upstream reported, by client token, model and kind "
                                 "(prompt, completion, cached, reasoning; unknown_requests counts "
                                 "answers without usage)",
                                 "token,model,kind");
  gw->m_auth_failures = metrics_counter(m, "zonegate_auth_failures_total",
                                        "Rejected client credentials by reason", "reason");
  metrics_gauge_fn(m, "zonegate_in_flight", "Upstream requests in flight", gauge_in_flight, gw);
  metrics_gauge_fn(m, "zonegate_queue_depth", "Requests waiting for an upstream slot", gauge_queue,
                   gw);
  metrics_counter_fn(m, "zonegate_cache_hits_total", "Response cache hits", gauge_cache_hits, gw);
  metrics_counter_fn(m, "zonegate_cache_misses_total", "Response cache misses", gauge_cache_misses,
                     gw);
  metrics_gauge_fn(m, "zonegate_cache_bytes", "Bytes held by the response cache", gauge_cache_bytes,
                   gw);
  metrics_gauge_fn(m, "zonegate_cache_entries", "Entries in the response cache",
                   gauge_cache_entries, gw);
  metrics_gauge_fn(m, "zonegate_open_connections", "Open client connections", gauge_connections,
                   gw);
  metrics_gauge_fn(m, "zonegate_loop_lag_seconds", "Event loop lag at the last tick",
                   gauge_loop_lag, gw);
  metrics_gauge_fn(m, "process_resident_memory_bytes", "Resident memory size in bytes", gauge_rss,
                   gw);
  metrics_counter_fn(m, "process_cpu_seconds_total", "User and system CPU time in seconds",
                     gauge_cpu, gw);
}

/* ---- usage flush (accounting.h) ----------------------------------------
 * One usage.add write per usage.flush_ms while there are counts, through
 * the cluster's usage_write; one write in flight at a time. A ticket
 * outlives the gateway so a write that completes after gateway_close
 * touches nothing. */
struct usage_ticket {
  struct gateway *gw; /* NULL once the gateway closed */
};

static void usage_waiters_done(struct gateway *gw) {
  size_t n = gw->n_usage_waiters;
  struct usage_flush_waiter waiters[ZG_ARRAY_LEN(gw->usage_waiters)];
  memcpy(waiters, gw->usage_waiters, sizeof(waiters));
  gw->n_usage_waiters = 0;
  for (size_t i = 0; i < n; i++) waiters[i].done(waiters[i].arg);
}

static void on_usage_written(void *arg, bool committed) {
  struct usage_ticket *t = arg;
  struct gateway *gw = t->gw;
  free(t);
  if (!gw) return;
  gw->usage_ticket = NULL;
  accounting_settle(gw->accounting, committed);
  if (!committed) zg_log(ZG_WARN, "usage_flush_failed", "usage counts kept for the next flush");
  usage_waiters_done(gw);
}

/* Starts a write of the counts since the last one; false when there was
 * nothing to write (or no cluster to write to). */
static bool usage_flush_now(struct gateway *gw) {
  if (!gw->accounting || gw->usage_ticket || !gw->cluster || !gw->cluster->usage_write)
    return false;
  cJSON *args = accounting_take(gw->accounting, zg_wall_ms() / 1000);
  if (!args) return false;
  struct usage_ticket *t = calloc(1, sizeof(*t));
  if (!t) {
    cJSON_Delete(args);
    accounting_settle(gw->accounting, false);
    return false;
  }
  t->gw = gw;
  gw->usage_ticket = t;
  gw->cluster->usage_write(gw->cluster->ud, args, on_usage_written, t);
  return true;
}

static void on_usage_tick(uv_timer_t *timer) {
  usage_flush_now(timer->data);
}

void gateway_flush_usage(struct gateway *gw, void (*done)(void *arg), void *arg) {
  bool writing = gw->usage_ticket || usage_flush_now(gw);
  if (!writing || gw->n_usage_waiters >= ZG_ARRAY_LEN(gw->usage_waiters)) {
    done(arg);
    return;
  }
  gw->usage_waiters[gw->n_usage_waiters].done = done;
  gw->usage_waiters[gw->n_usage_waiters].arg = arg;
  gw->n_usage_waiters++;
}

/* upstream.ca_file and upstream.http_version to the upstream client (for
 * https:// upstreams; the config check already read the CA file). */
static void apply_https_options(struct gateway *gw) {
  struct upstream_https_options o = {0};
  o.ca_file = gw->cfg->upstream_ca_file;
  o.http_version =
      strcmp(gw->cfg->upstream_http_version, "1.1") == 0 ? UPSTREAM_HTTP_1_1 : UPSTREAM_HTTP_2;
  char err[128];
  if (upstream_client_set_https(gw->upstream, &o, err, sizeof(err)) != 0)
    zg_log(ZG_ERROR, "upstream_https_options", "%s", err);
}

int gateway_start(uv_loop_t *loop, const struct zg_config *cfg, struct gateway **out, char *errmsg,
                  size_t errlen) {
  struct gateway *gw = calloc(1, sizeof(*gw));
  if (!gw) {
    snprintf(errmsg, errlen, "out of memory");
    return -1;
  }
  gw->loop = loop;
  gw->started_ms = zg_wall_ms();
  char err[256];
  cJSON *replicated = zg_config_replicated_json(cfg);
  gw->cfg = zg_config_with_replicated(cfg, replicated, cfg->path, err, sizeof(err));
  cJSON_Delete(replicated);
  if (!gw->cfg) {
    snprintf(errmsg, errlen, "%s", err);
    free(gw);
    return -1;
  }
  gw->metrics = metrics_create();
  gw->cache = response_cache_create(cfg->cache_size_bytes);
  gw->rate = rate_limiter_create(100000);
  if (!gw->metrics || !gw->cache || !gw->rate ||
      limiter_create(loop, cfg->max_concurrent, cfg->max_queue, cfg->queue_timeout_ms,
                     &gw->limiter) != 0 ||
      upstream_client_create(loop, &gw->upstream, errmsg, errlen) != 0) {
    if (!errmsg[0]) snprintf(errmsg, errlen, "out of memory while starting the gateway");
    gateway_close(gw, NULL, NULL); /* released once the caller runs the loop */
    return -1;
  }
  register_metrics(gw);
  apply_https_options(gw);
  gateway_reload_endpoints(gw);
  if (cfg->usage_enabled) gw->accounting = accounting_create();
  uv_timer_init(loop, &gw->usage_timer);
  gw->usage_timer.data = gw;
  gw->usage_timer_started = true;
  uv_timer_start(&gw->usage_timer, on_usage_tick, cfg->usage_flush_ms, cfg->usage_flush_ms);
  struct httpd_limits l = limits_from(cfg);
  int rc = httpd_listen(loop, cfg->listen_gateway, &l, on_request, gw, &gw->http, err, sizeof(err));
  if (rc != 0) {
    if (rc == UV_EADDRINUSE)
      snprintf(errmsg, errlen,
               "port %s is already in use (listen.gateway in %s): stop the other process (netstat "
               "-tulnp) or "
               "change listen.gateway",
               strrchr(cfg->listen_gateway, ':') + 1, cfg->path);
    else
      snprintf(errmsg, errlen, "listen.gateway: %s", err);
    gw->http = NULL;
    gateway_close(gw, NULL, NULL); /* released once the caller runs the loop */
    return -1;
  }
  httpd_set_finish_hook(gw->http, on_request_finished);
  gateway_ident_start(gw);
  char node_header[128];
  snprintf(node_header, sizeof(node_header), "X-Zonegate-Node: %.60s", cfg->node_id);
  httpd_set_response_header(gw->http, node_header);
  gateway_health_start(gw);
  *out = gw;
  return 0;
}

void gateway_set_cluster(struct gateway *gw, const struct gateway_cluster *cluster) {
  gw->cluster = cluster;
}

void gateway_apply_config(struct gateway *gw, const struct zg_config *cfg) {
  char err[256];
  cJSON *replicated = zg_config_replicated_json(cfg);
  struct zg_config *copy = zg_config_with_replicated(cfg, replicated, cfg->path, err, sizeof(err));
  cJSON_Delete(replicated);
  if (!copy) {
    zg_log(ZG_ERROR, "config_apply_failed", "%s", err);
    return;
  }
  zg_config_free(gw->cfg);
  gw->cfg = copy;
  limiter_configure(gw->limiter, cfg->max_concurrent, cfg->max_queue, cfg->queue_timeout_ms);
  response_cache_set_max_bytes(gw->cache, cfg->cache_size_bytes);
  struct httpd_limits l = limits_from(cfg);
  httpd_set_limits(gw->http, &l);
  apply_https_options(gw);
  gateway_reload_endpoints(gw);
  if (cfg->usage_enabled && !gw->accounting) gw->accounting = accounting_create();
  if (gw->usage_timer_started)
    uv_timer_start(&gw->usage_timer, on_usage_tick, cfg->usage_flush_ms, cfg->usage_flush_ms);
}

void gateway_add_token(struct gateway *gw, const char *name, const char sha256_hex[65]) {
  snprintf(gw->extra_token_name, sizeof(gw->extra_token_name), "%s", name);
  snprintf(gw->extra_token_sha256, sizeof(gw->extra_token_sha256), "%s", sha256_hex);
}

void gateway_add_metrics_collector(struct gateway *gw, void (*collect)(void *ud, void *out),
                                   void *ud) {
  if (gw->n_collectors >= ZG_ARRAY_LEN(gw->collectors)) return;
  gw->collectors[gw->n_collectors].collect = collect;
  gw->collectors[gw->n_collectors].ud = ud;
  gw->n_collectors++;
}

static void on_metrics_request(void *ctx, struct httpd_req *req) {
  struct gateway *gw = ctx;
  if (strcmp(httpd_req_path(req), "/metrics") == 0) {
    gateway_metrics_respond(gw, req);
    return;
  }
  httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL,
                      "this listener (listen.metrics) serves only GET /metrics");
}

int gateway_metrics_listen(struct gateway *gw, const char *address, char *errmsg, size_t errlen) {
  struct httpd_limits l = {0};
  l.max_body_bytes = 4096;
  char err[256];
  int rc = httpd_listen(gw->loop, address, &l, on_metrics_request, gw, &gw->metrics_http, err,
                        sizeof(err));
  if (rc != 0) {
    gw->metrics_http = NULL;
    snprintf(errmsg, errlen, "listen.metrics: %s", err);
    return -1;
  }
  zg_log(ZG_INFO, "metrics_listening", "GET /metrics on %s", address);
  return 0;
}

void gateway_announce_drain(struct gateway *gw) {
  gw->draining = true;
}

void gateway_drain(struct gateway *gw) {
  gw->draining = true;
  httpd_stop_accepting(gw->http);
}

size_t gateway_active_requests(const struct gateway *gw) {
  return (gw->http ? httpd_active_requests(gw->http) : 0) + gw->forwarded_active;
}

void gateway_set_tls(struct gateway *gw, struct ssl_ctx_st *ctx) {
  if (gw->http) httpd_set_tls(gw->http, ctx);
}

void gateway_set_forward_tls(struct gateway *gw, const char *ca, const char *cert, const char *key,
                             int (*resolve)(void *ud, const char *gateway_address, char *admin,
                                            size_t admin_len, char *node, size_t node_len),
                             void *ud) {
  gw->forward_tls_on = true;
  snprintf(gw->forward_ca, sizeof(gw->forward_ca), "%s", ca);
  snprintf(gw->forward_cert, sizeof(gw->forward_cert), "%s", cert);
  snprintf(gw->forward_key, sizeof(gw->forward_key), "%s", key);
  gw->forward_resolve = resolve;
  gw->forward_ud = ud;
}

void gateway_forward_url(struct gateway *gw, const char *to, const char *path, char *url,
                         size_t url_len, char *node, size_t node_len) {
  char admin[160];
  node[0] = '\0';
  if (gw->forward_tls_on && gw->forward_resolve &&
      gw->forward_resolve(gw->forward_ud, to, admin, sizeof(admin), node, node_len) == 0) {
    snprintf(url, url_len, "https://%s/_zonegate/forward/v1%s", admin, path);
    return;
  }
  if (gw->forward_tls_on) {
    /* No admin address known for the active: fail rather than go plain
     * (the attempt fails to connect and the request is held and retried). */
    snprintf(url, url_len, "https://0.0.0.0:0/_zonegate/forward/v1%s", path);
    return;
  }
  snprintf(url, url_len, "http://%s/v1%s", to, path);
}

bool gateway_forward_tls(const struct gateway *gw, const char *node, struct upstream_tls *tls) {
  if (!gw->forward_tls_on) return false;
  tls->ca_file = gw->forward_ca;
  tls->cert_file = gw->forward_cert;
  tls->key_file = gw->forward_key;
  tls->peer_node = node && node[0] ? node : NULL;
  return true;
}

void gateway_handle_forwarded(struct gateway *gw, struct httpd_req *req) {
  gw->forwarded_active++;
  on_request(gw, req);
}

void gateway_forwarded_finished(struct gateway *gw, struct httpd_req *req) {
  if (gw->forwarded_active > 0) gw->forwarded_active--;
  on_request_finished(gw, req);
}

void gateway_get_stats(const struct gateway *gw, struct gateway_stats *out) {
  out->requests_total = gw->requests_total;
  out->requests_5xx = gw->requests_5xx;
  out->in_flight = limiter_in_flight(gw->limiter);
  out->queued = limiter_queue_depth(gw->limiter);
}

static void part_closed(void *arg) {
  struct gateway *gw = arg;
  if (--gw->closing_parts > 0) return;
  void (*done)(void *) = gw->close_done;
  void *done_arg = gw->close_arg;
  gateway_free_endpoints(gw);
  response_cache_destroy(gw->cache);
  rate_limiter_destroy(gw->rate);
  accounting_destroy(gw->accounting);
  for (size_t i = 0; i < gw->n_model_labels; i++) free(gw->model_labels[i]);
  free(gw->model_labels);
  zg_buf_free(&gw->sse_scratch);
  zg_buf_free(&gw->sse_edit);
  metrics_destroy(gw->metrics);
  zg_buf_free(&gw->access_line);
  zg_buf_free(&gw->upstream_header_lines);
  gateway_free_chat_pool(gw);
  zg_config_free(gw->cfg);
  free(gw);
  if (done) done(done_arg);
}

static void on_loop_timer_closed(uv_handle_t *h) {
  part_closed(h->data);
}

/* Closes whatever exists (also after a start that failed half-way). */
void gateway_close(struct gateway *gw, void (*done)(void *arg), void *arg) {
  gw->close_done = done;
  gw->close_arg = arg;
  gw->closing_parts = 1; /* released at the end, after every part was asked to close */
  if (gw->http) {
    gw->closing_parts++;
    httpd_close(gw->http, part_closed, gw);
  }
  if (gw->metrics_http) {
    gw->closing_parts++;
    httpd_close(gw->metrics_http, part_closed, gw);
    gw->metrics_http = NULL;
  }
  if (gw->limiter) {
    gw->closing_parts++;
    limiter_close(gw->limiter, part_closed, gw);
  }
  if (gw->upstream) {
    gw->closing_parts++;
    upstream_client_close(gw->upstream, part_closed, gw);
  }
  if (gw->loop_timer.data) {
    gw->closing_parts++;
    uv_close((uv_handle_t *)&gw->loop_timer, on_loop_timer_closed);
  }
  if (gw->usage_timer_started) {
    gw->usage_timer_started = false;
    gw->closing_parts++;
    uv_close((uv_handle_t *)&gw->usage_timer, on_loop_timer_closed);
  }
  if (gw->usage_ticket) gw->usage_ticket->gw = NULL;
  gw->usage_ticket = NULL;
  usage_waiters_done(gw);
  part_closed(gw);
}
