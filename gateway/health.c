/* health.c: the load-balancer contract on the client port.
 *
 *   /health/live     200 while the event loop turns (503 on a node whose data
 *                    is of an older cluster incarnation: empty it, add it again)
 *   /health/ready    200 when this node can serve a client now
 *   /health/active   200 active, 429 healthy standby, 503 otherwise
 *                    (?standbyok=true: 200 for a healthy standby too)
 *   /health/standby  200 healthy follower within max_lag entries
 *   /health          GET, or POST {"check": "system"|"loop"|"upstream"|
 *                    "memory"|"disk"}: deep check with every sub-check;
 *                    503 when degraded
 *
 * Every answer is JSON with role, node, zone, leader, term, commit_index
 * and applied_index, and the X-Zonegate-Role / X-Zonegate-Leader headers.
 * Health never calls the upstream: upstream reachability comes from the
 * results of recent client requests. HEAD gets the same status, no body.
 */
#include "gateway/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define LOOP_TICK_MS 250
#define LOOP_LAG_DEGRADED_MS 1000

static const char *const valid_checks = "system, loop, upstream, memory, disk";

static void on_loop_tick(uv_timer_t *t) {
  struct gateway *gw = t->data;
  uint64_t now = zg_mono_ms();
  uint64_t lag = now > gw->loop_expected_ms ? now - gw->loop_expected_ms : 0;
  gw->loop_lag_ms = lag;
  if (lag > gw->loop_lag_max_ms) gw->loop_lag_max_ms = lag;
  gw->last_loop_tick_ms = now;
  gw->loop_expected_ms = now + LOOP_TICK_MS;
}

int gateway_health_start(struct gateway *gw) {
  uv_timer_init(gw->loop, &gw->loop_timer);
  gw->loop_timer.data = gw;
  gw->loop_expected_ms = zg_mono_ms() + LOOP_TICK_MS;
  gw->last_loop_tick_ms = zg_mono_ms();
  uv_unref((uv_handle_t *)&gw->loop_timer);
  return uv_timer_start(&gw->loop_timer, on_loop_tick, LOOP_TICK_MS, LOOP_TICK_MS);
}

static bool check_loop(struct gateway *gw, cJSON *out) {
  cJSON *c = cJSON_AddObjectToObject(out, "loop");
  bool ok = gw->loop_lag_ms < LOOP_LAG_DEGRADED_MS;
  cJSON_AddStringToObject(c, "status", ok ? "ok" : "degraded");
  cJSON_AddNumberToObject(c, "lag_ms", (double)gw->loop_lag_ms);
  cJSON_AddNumberToObject(c, "max_lag_ms", (double)gw->loop_lag_max_ms);
  return ok;
}

static bool check_upstream(struct gateway *gw, cJSON *out) {
  cJSON *c = cJSON_AddObjectToObject(out, "upstream");
  bool configured = gw->n_endpoints > 0;
  bool ok = configured && gateway_upstream_healthy(gw);
  const char *status = !configured                                               ? "not_configured"
                       : !ok                                                     ? "failing"
                       : (gw->upstream_last_ok_ms || gw->upstream_last_error_ms) ? "ok"
                                                                                 : "unknown";
  cJSON_AddStringToObject(c, "status", status);
  cJSON_AddStringToObject(c, "source",
                          "results of recent client requests (health never calls the upstream)");
  if (configured) cJSON_AddStringToObject(c, "endpoint", gw->endpoints[0].base_url);
  cJSON_AddNumberToObject(c, "consecutive_failures", gw->upstream_consecutive_failures);
  if (gw->upstream_last_ok_ms) {
    char ts[32];
    zg_iso8601(gw->upstream_last_ok_ms, ts);
    cJSON_AddStringToObject(c, "last_success", ts);
  }
  if (gw->upstream_last_error_ms) {
    char ts[32];
    zg_iso8601(gw->upstream_last_error_ms, ts);
    cJSON_AddStringToObject(c, "last_error_at", ts);
    cJSON_AddStringToObject(c, "last_error", gw->upstream_last_error);
  }
  return configured ? ok : false;
}

static bool check_memory(struct gateway *gw, cJSON *out) {
  cJSON *c = cJSON_AddObjectToObject(out, "memory");
  uint64_t rss = zg_process_rss_bytes();
  uint64_t limit = zg_memory_limit_bytes();
  uint64_t total = uv_get_total_memory();
  uint64_t free_mem = uv_get_free_memory();
  double system_used = total ? 1.0 - (double)free_mem / (double)total : 0;
  double process_ratio = limit ? (double)rss / (double)limit : 0;
  bool ok = process_ratio < 0.9;
  cJSON_AddStringToObject(c, "status", ok ? "ok" : "degraded");
  cJSON_AddNumberToObject(c, "rss_bytes", (double)rss);
  cJSON_AddNumberToObject(c, "limit_bytes", (double)limit);
  cJSON_AddNumberToObject(c, "process_ratio", process_ratio);
  cJSON_AddNumberToObject(c, "system_used_ratio", system_used);
  struct response_cache_stats cs;
  response_cache_stats(gw->cache, &cs);
  cJSON_AddNumberToObject(c, "cache_bytes", (double)cs.bytes);
  cJSON_AddNumberToObject(c, "cache_limit_bytes", (double)gw->cfg->cache_size_bytes);
  return ok;
}

static bool check_disk(struct gateway *gw, cJSON *out) {
  cJSON *c = cJSON_AddObjectToObject(out, "disk");
  const char *dir = gw->cfg->data_dir;
  cJSON_AddStringToObject(c, "path", dir);
  struct statvfs st;
  if (statvfs(dir, &st) != 0) {
    cJSON_AddStringToObject(c, "status", "failing");
    cJSON_AddStringToObject(c, "error", "data dir is missing or unreadable");
    return false;
  }
  double free_ratio = st.f_blocks ? (double)st.f_bavail / (double)st.f_blocks : 0;
  bool writable = access(dir, W_OK) == 0;
  bool ok = writable && free_ratio > 0.02;
  cJSON_AddStringToObject(c, "status", ok ? "ok" : "degraded");
  cJSON_AddBoolToObject(c, "writable", writable);
  cJSON_AddNumberToObject(c, "free_bytes", (double)st.f_bavail * (double)st.f_frsize);
  cJSON_AddNumberToObject(c, "free_ratio", free_ratio);
  return ok;
}

/* Role fields for every answer; returns the status for `check`. */
static int fill_role(struct gateway *gw, const char *check, cJSON *body) {
  if (gw->cluster && gw->cluster->health) return gw->cluster->health(gw->cluster->ud, check, body);
  /* Single node: a one-voter cluster, active while it runs. */
  bool serving = !gw->draining;
  cJSON_AddStringToObject(body, "role", serving ? "active" : "unavailable");
  cJSON_AddStringToObject(body, "node", gw->cfg->node_id);
  cJSON_AddStringToObject(body, "zone", gw->cfg->zone);
  cJSON_AddStringToObject(body, "leader", gw->cfg->node_id);
  cJSON_AddNumberToObject(body, "term", 1);
  cJSON_AddNumberToObject(body, "commit_index", 0);
  cJSON_AddNumberToObject(body, "applied_index", 0);
  if (strcmp(check, "standby") == 0) return 503;
  return serving ? 200 : 503;
}

static void answer(struct gateway *gw, struct httpd_req *req, int status, cJSON *body) {
  cJSON *role = cJSON_GetObjectItemCaseSensitive(body, "role");
  cJSON *leader = cJSON_GetObjectItemCaseSensitive(body, "leader");
  char role_header[64], leader_header[128];
  snprintf(role_header, sizeof(role_header), "X-Zonegate-Role: %s",
           cJSON_IsString(role) ? role->valuestring : "unavailable");
  snprintf(leader_header, sizeof(leader_header), "X-Zonegate-Leader: %s",
           cJSON_IsString(leader) ? leader->valuestring : "");
  const char *headers[] = {role_header, leader_header, "Cache-Control: no-store", NULL};
  char *text = cJSON_PrintUnformatted(body);
  httpd_respond(req, status, "application/json", headers, text ? text : "{}",
                text ? strlen(text) : 2);
  free(text);
  cJSON_Delete(body);
}

static void deep_check(struct gateway *gw, struct httpd_req *req, const char *check) {
  cJSON *body = cJSON_CreateObject();
  int role_status = fill_role(gw, "system", body);
  cJSON *checks = cJSON_AddObjectToObject(body, "checks");
  bool all = strcmp(check, "system") == 0;
  bool ok = true;
  if (all || strcmp(check, "loop") == 0) ok &= check_loop(gw, checks);
  if (all || strcmp(check, "upstream") == 0) {
    bool up = check_upstream(gw, checks);
    /* An upstream never used yet is not a failure of this node. */
    cJSON *u = cJSON_GetObjectItemCaseSensitive(checks, "upstream");
    const char *st = cJSON_GetObjectItemCaseSensitive(u, "status")->valuestring;
    if (strcmp(st, "failing") == 0 || strcmp(st, "not_configured") == 0) ok &= up;
  }
  if (all || strcmp(check, "memory") == 0) ok &= check_memory(gw, checks);
  if (all || strcmp(check, "disk") == 0) ok &= check_disk(gw, checks);
  if (role_status >= 500 && all) ok = false;
  cJSON_AddStringToObject(body, "status", ok ? "ok" : "degraded");
  cJSON_AddStringToObject(body, "check", check);
  cJSON_AddStringToObject(body, "version", ZG_VERSION);
  cJSON_AddNumberToObject(body, "uptime_s", (double)(zg_wall_ms() - gw->started_ms) / 1000.0);
  answer(gw, req, ok ? 200 : 503, body);
}

void gateway_handle_health(struct gateway *gw, struct httpd_req *req) {
  const char *path = httpd_req_path(req);
  bool post = strcmp(httpd_req_method(req), "POST") == 0;
  if (strcmp(path, "/health") == 0) {
    const char *check = "system";
    cJSON *json = NULL;
    if (post) {
      size_t len;
      const char *text = httpd_req_body(req, &len);
      if (len > 0) {
        json = cJSON_ParseWithLength(text, len);
        if (!cJSON_IsObject(json)) {
          cJSON_Delete(json);
          httpd_respond_error(req, 400, "invalid_request_error", "invalid_json", NULL,
                              "expected a JSON object like {\"check\": \"system\"}");
          return;
        }
        cJSON *c = cJSON_GetObjectItemCaseSensitive(json, "check");
        if (c && !cJSON_IsString(c)) {
          cJSON_Delete(json);
          httpd_respond_error(req, 400, "invalid_request_error", "invalid_check", NULL,
                              "\"check\" must be a string, one of: %s", valid_checks);
          return;
        }
        if (c) check = c->valuestring;
      }
    }
    if (strcmp(check, "system") && strcmp(check, "loop") && strcmp(check, "upstream") &&
        strcmp(check, "memory") && strcmp(check, "disk")) {
      httpd_respond_error(req, 400, "invalid_request_error", "invalid_check", NULL,
                          "unknown check \"%.64s\"; valid checks: %s", check, valid_checks);
      cJSON_Delete(json);
      return;
    }
    char check_copy[16];
    snprintf(check_copy, sizeof(check_copy), "%s", check);
    cJSON_Delete(json);
    deep_check(gw, req, check_copy);
    return;
  }
  const char *which = path + strlen("/health/");
  if (strcmp(which, "live") && strcmp(which, "ready") && strcmp(which, "active") &&
      strcmp(which, "standby")) {
    httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL,
                        "no health endpoint %s; see /health/live, /health/ready, /health/active, "
                        "/health/standby, /health",
                        path);
    return;
  }
  cJSON *body = cJSON_CreateObject();
  int status = fill_role(gw, which, body);
  if (gw->draining) {
    /* Shutting down: no tier of the LB may pick this node any more (the
     * answer to what it was already sent still comes). */
    cJSON_ReplaceItemInObjectCaseSensitive(body, "role", cJSON_CreateString("draining"));
    status = 503;
  } else if (strcmp(which, "live") == 0) {
    /* 503 only when the cluster says this node must not run on as it is
     * (its data is of an older incarnation: failover_health) */
    if (status != 503) status = 200;
    cJSON_AddNumberToObject(body, "loop_lag_ms", (double)gw->loop_lag_ms);
  } else if (strcmp(which, "active") == 0) {
    char buf[16];
    const char *standbyok = httpd_req_query_param(req, "standbyok", buf, sizeof(buf));
    if (status == 429 && standbyok && strcmp(standbyok, "true") == 0) status = 200;
  }
  cJSON_AddStringToObject(body, "status",
                          status == 200   ? "ok"
                          : status == 429 ? "standby"
                                          : "unavailable");
  answer(gw, req, status, body);
}
