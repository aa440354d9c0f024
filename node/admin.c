/* admin.c: the admin API on listen.admin (private network only).
 *
 * Every route needs "Authorization: Bearer <admin token>" (constant-time
 * compare; 401 otherwise; the token is never logged). Reads answer from
 * this node's applied state. Writes go to the leader: on a follower the
 * request is forwarded to the leader's admin address and the answer is
 * relayed only once this node has applied the entry too (read-your-
 * writes, checked every 2 ms for up to READ_YOUR_WRITES_TIMEOUT_MS). While
 * no leader is known, or the write was not submitted (the target refused
 * as not leader or could not be reached), the follower retries every 50 ms
 * for up to READ_YOUR_WRITES_TIMEOUT_MS, taking the write itself if it
 * becomes the leader; then 503 and Retry-After. Both waits are base's
 * zg_hold. Answers never contain a secret, except the one-time token of
 * POST /v1/tokens.
 *
 * Identity: the audit records the actor this node derives ("admin": the
 * admin token) and the real peer address. X-Zonegate-* headers from a
 * client are ignored; only a request forwarded by another node carries
 * X-Zonegate-Actor / X-Zonegate-Source / X-Zonegate-Forwarded, and only
 * with a valid X-Zonegate-Forward-Auth: "v1 <wall ms> <hex HMAC-SHA256>"
 * under a key derived from the cluster secret, over the method, path,
 * query, actor, source, timestamp and the body's SHA-256, accepted for
 * FORWARD_AUTH_WINDOW_MS either side of this node's clock. A bad one is
 * 401 (never processed as a client request: no forwarding loop).
 *
 * Failed authentications are logged as WARN admin_auth_failed with the
 * peer address (never the offered token), at most once per address every
 * AUTH_LOG_INTERVAL_MS with a count of the suppressed ones.
 *
 * GET /metrics (the gateway's Prometheus text) needs no token: it is
 * served here, on the private port, instead of the public client port.
 *
 * Node-to-node routes (never the admin token's): /_zonegate/forward/v1/...
 * (a standby's forward of a client request, node certificate required)
 * and POST /_zonegate/usage (usage counts a node that is not the leader
 * relays to the leader: node signature, and with TLS a node certificate;
 * node_usage_relay sends them).
 *
 * Routes match the whole path exactly ({id}: one non-empty segment); an
 * unknown path is 404, a known one with another method 405 with Allow.
 * Routes: GET /v1/cluster/status; GET|PUT /v1/config (If-Match);
 * GET|POST /v1/keys, POST /v1/keys/{id}/rotate, DELETE /v1/keys/{id};
 * GET|POST /v1/tokens, DELETE|PATCH /v1/tokens/{id or name} (PATCH:
 * token.update: rpm, tpm, budget_day, budget_month, expires_in_s or
 * expires_at, allow); GET /v1/usage?token=&model=&since=24h (usage
 * totals per token and model, and their sum); GET /v1/audit, POST /v1/audit
 * {"what"} (an operator note; drills use it as their write probe);
 * POST /v1/cluster/members, DELETE /v1/cluster/members/{id};
 * POST /v1/cluster/switchover; POST /v1/drills/{crash,freeze,isolate}
 * (only with drills.enabled).
 */
#include "alerts/alerts.h"
#include "base/base.h"
#include "consensus/consensus.h"
#include "failover/failover.h"
#include "gateway/gateway.h"
#include "httpd/httpd.h"
#include "node/admin_routes.h"
#include "node/internal.h"
#include "upstream/upstream.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define READ_YOUR_WRITES_TIMEOUT_MS 5000
#define FORWARD_AUTH_WINDOW_MS 30000
#define AUTH_LOG_INTERVAL_MS 10000

struct admin_req {
  struct node *node;
  struct httpd_req *req;
  bool gone;
  /* forwarding */
  struct upstream_transfer *transfer;
  int status;
  zg_buf body;
  uint64_t wait_for_index;
  /* From forward_to_leader until answered (no consensus write pending). */
  bool forwarding;
  struct zg_hold forward; /* retries while the leader is changing */
  struct zg_hold applied; /* read-your-writes: until this node applied wait_for_index */
  char *one_time_token;   /* token created here, answered once */
  /* who, for the audit: derived here, or from an authenticated forward */
  bool forwarded;
  char actor[96];
  char source[64];
};

static void json_answer(struct httpd_req *req, int status, cJSON *body, const char *const *extra) {
  char *text = cJSON_PrintUnformatted(body);
  httpd_respond(req, status, "application/json", extra, text ? text : "{}",
                text ? strlen(text) : 2);
  free(text);
  cJSON_Delete(body);
}

static int consensus_http_status(int status) {
  switch (status) {
  case CONSENSUS_ENOTLEADER:
    return 503;
  case CONSENSUS_ECONFLICT:
    return 412;
  case CONSENSUS_ENOTFOUND:
    return 404;
  case CONSENSUS_EINVALID:
    return 400;
  case CONSENSUS_EBUSY:
    return 409;
  case CONSENSUS_ENOTMOVED:
    return 503;
  default:
    return 500;
  }
}

static void admin_req_free(struct admin_req *a) {
  zg_hold_stop(&a->forward);
  zg_hold_stop(&a->applied);
  zg_buf_free(&a->body);
  zg_secret_free(a->one_time_token);
  free(a);
}

static void on_admin_abort(void *ud) {
  struct admin_req *a = ud;
  if (a->transfer) upstream_cancel(a->transfer);
  a->transfer = NULL;
  a->gone = true;
  a->req = NULL;
  /* A pending consensus write still calls back; it sees `gone`. While
   * forwarding nothing else is pending (transfer cancelled, holds stopped). */
  if (a->forwarding) admin_req_free(a);
}

/* ---- writes on the leader ------------------------------------------- */

static void on_write_done(void *ud, int status, const char *errmsg, const cJSON *result) {
  struct admin_req *a = ud;
  if (a->gone) {
    admin_req_free(a);
    return;
  }
  httpd_req_set_abort(a->req, NULL, NULL);
  if (status != 0) {
    const char *retry[] = {"Retry-After: 1", NULL};
    httpd_respond_error(a->req, consensus_http_status(status), "admin_error",
                        consensus_strerror(status), status == CONSENSUS_ENOTLEADER ? retry : NULL,
                        "%s", errmsg ? errmsg : consensus_strerror(status));
    admin_req_free(a);
    return;
  }
  cJSON *body = result ? cJSON_Duplicate(result, 1) : cJSON_CreateObject();
  if (a->one_time_token) {
    cJSON_AddStringToObject(body, "token", a->one_time_token);
    cJSON_AddStringToObject(body, "note", "this token is shown once; store it now");
  }
  char applied[64];
  snprintf(applied, sizeof(applied), "X-Zonegate-Applied-Index: %llu",
           (unsigned long long)consensus_applied_index(a->node->consensus));
  const char *extra[] = {applied, NULL};
  json_answer(a->req, 200, body, extra);
  admin_req_free(a);
}

static void submit(struct admin_req *a, const char *type, cJSON *args) {
  httpd_req_set_abort(a->req, on_admin_abort, a);
  consensus_write(a->node->consensus, type, args, a->actor, a->source, on_write_done, a);
}

/* ---- forwarding to the leader ---------------------------------------- */

static bool retry_forward_later(struct admin_req *a);

static void relay(struct admin_req *a) {
  httpd_req_set_abort(a->req, NULL, NULL);
  const char *extra[] = {"X-Zonegate-Forwarded-To-Leader: 1", NULL};
  httpd_respond(a->req, a->status, "application/json", extra, a->body.data ? a->body.data : "",
                a->body.len);
  admin_req_free(a);
}

/* Read-your-writes: checked every 2 ms; relayed as it is once
 * READ_YOUR_WRITES_TIMEOUT_MS have passed. */
static void on_applied_check(void *ud) {
  struct admin_req *a = ud;
  if (consensus_applied_index(a->node->consensus) >= a->wait_for_index ||
      !zg_hold_later(&a->applied, 2))
    relay(a);
}

static void on_fwd_response(void *ud, int status, const char *content_type,
                            const char *const *headers) {
  struct admin_req *a = ud;
  a->status = status;
  for (size_t i = 0; headers && headers[i]; i++)
    if (strncasecmp(headers[i], "X-Zonegate-Applied-Index:", 25) == 0)
      a->wait_for_index = strtoull(headers[i] + 25, NULL, 10);
}

static int on_fwd_data(void *ud, const char *data, size_t len) {
  struct admin_req *a = ud;
  return zg_buf_append(&a->body, data, len);
}

static bool refused_unsubmitted(const struct admin_req *a) {
  return a->status == 503 && a->body.data &&
         (strstr(a->body.data, "\"not_leader\"") || strstr(a->body.data, "\"no_leader\""));
}

static void on_fwd_done(void *ud, enum upstream_result result, const char *curl_error) {
  struct admin_req *a = ud;
  a->transfer = NULL;
  bool never_sent = result == UPSTREAM_CONNECT_FAILED || result == UPSTREAM_CONNECT_TIMEOUT;
  if ((never_sent || (result == UPSTREAM_OK && refused_unsubmitted(a))) && retry_forward_later(a))
    return;
  if (result != UPSTREAM_OK) {
    httpd_req_set_abort(a->req, NULL, NULL);
    const char *retry[] = {"Retry-After: 1", NULL};
    httpd_respond_error(a->req, 503, "admin_error", "leader_unreachable", retry,
                        "the leader could not be reached to apply this write (%s); retry shortly",
                        upstream_result_name(result));
    admin_req_free(a);
    return;
  }
  /* Read-your-writes: answer once this node applied the entry too. */
  if (a->status < 300 && a->wait_for_index > consensus_applied_index(a->node->consensus) &&
      zg_hold_later(&a->applied, 2))
    return;
  relay(a);
}

static void forward_to_leader(struct admin_req *a);
static void admin_route(struct admin_req *a);

/* HMAC over everything the leader acts on or records; "\n" cannot occur
 * in any part (headers and the request line cannot hold one). */
static void forward_mac(const struct node *n, const char *method, const char *path,
                        const char *query, const char *actor, const char *source, uint64_t ts_ms,
                        const char *body, size_t body_len, uint8_t mac[32]) {
  char body_hash[65];
  zg_sha256_hex(body ? body : "", body ? body_len : 0, body_hash);
  zg_buf msg;
  zg_buf_init(&msg);
  zg_buf_appendf(&msg, "zonegate-admin-forward-v1\n%s\n%s\n%s\n%s\n%s\n%llu\n%s", method, path,
                 query, actor, source, (unsigned long long)ts_ms, body_hash);
  zg_hmac_sha256(n->forward_key, sizeof(n->forward_key), msg.data ? msg.data : "", msg.len, mac);
  zg_buf_free(&msg);
}

static void hex32(const uint8_t in[32], char out[65]) {
  for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", in[i]);
}

/* Checks X-Zonegate-Forward-Auth. 1: valid (a->actor, a->source taken
 * from the forwarding node), 0: absent, -1: present but invalid. */
static int check_forward_auth(struct admin_req *a, const char **why) {
  struct httpd_req *req = a->req;
  const char *auth = httpd_req_header(req, "X-Zonegate-Forward-Auth");
  if (!auth) return 0;
  *why = "bad forwarding signature";
  unsigned long long ts = 0;
  char given[80] = "";
  if (!a->node->have_forward_key || sscanf(auth, "v1 %llu %79s", &ts, given) != 2 ||
      strlen(given) != 64)
    return -1;
  uint64_t now = zg_wall_ms();
  if ((uint64_t)ts + FORWARD_AUTH_WINDOW_MS < now || (uint64_t)ts > now + FORWARD_AUTH_WINDOW_MS) {
    *why = "forwarding signature outside its validity window (clock skew?)";
    return -1;
  }
  const char *actor = httpd_req_header(req, "X-Zonegate-Actor");
  const char *source = httpd_req_header(req, "X-Zonegate-Source");
  if (!actor || !source || strlen(actor) >= sizeof(a->actor) || strlen(source) >= sizeof(a->source))
    return -1;
  size_t len;
  const char *body = httpd_req_body(req, &len);
  uint8_t mac[32];
  char want[65];
  forward_mac(a->node, httpd_req_method(req), httpd_req_path(req), httpd_req_query(req), actor,
              source, ts, body, len, mac);
  hex32(mac, want);
  bool ok = zg_ct_equal(want, 64, given, strlen(given));
  OPENSSL_cleanse(mac, sizeof(mac));
  if (!ok) return -1;
  snprintf(a->actor, sizeof(a->actor), "%s", actor);
  snprintf(a->source, sizeof(a->source), "%s", source);
  return 1;
}

static void on_forward_retry(void *ud) {
  forward_to_leader(ud);
}

/* The write was never submitted (no leader known, the target refused as
 * not leader, or could not be reached): try again in 50 ms while a->forward
 * allows. Returns false when its deadline has passed (or out of memory). */
static bool retry_forward_later(struct admin_req *a) {
  if (!zg_hold_later(&a->forward, 50)) return false;
  zg_buf_reset(&a->body);
  httpd_req_set_abort(a->req, on_admin_abort, a);
  return true;
}

static void forward_to_leader(struct admin_req *a) {
  a->forwarding = true;
  zg_hold_start(&a->forward);
  const struct consensus_member *leader = consensus_leader(a->node->consensus);
  const struct consensus_member *self = consensus_self(a->node->consensus);
  const char *retry[] = {"Retry-After: 1", NULL};
  if (a->forwarded) {
    httpd_respond_error(a->req, 503, "admin_error", "not_leader", retry,
                        "this node is no longer the leader; retry");
    admin_req_free(a);
    return;
  }
  if (consensus_is_leader(a->node->consensus)) {
    /* Became the leader while waiting: take the write here. */
    httpd_req_set_abort(a->req, NULL, NULL);
    a->forwarding = false;
    zg_buf_reset(&a->body);
    zg_hold_stop(&a->forward);
    admin_route(a);
    return;
  }
  bool leader_usable = leader && leader->admin_address && leader->admin_address[0] &&
                       !(self && strcmp(leader->id, self->id) == 0);
  if (!leader_usable && retry_forward_later(a)) return;
  if (!leader_usable) {
    httpd_respond_error(
        a->req, 503, "admin_error", "no_leader", retry,
        "no leader is known right now (election in progress or quorum lost); retry shortly");
    admin_req_free(a);
    return;
  }
  char url[300], auth[600], actor[160], source[160], sig[128];
  snprintf(url, sizeof(url), "%s://%s%s%s%s", a->node->tls_admin ? "https" : "http",
           leader->admin_address, httpd_req_path(a->req), httpd_req_query(a->req)[0] ? "?" : "",
           httpd_req_query(a->req));
  snprintf(auth, sizeof(auth), "Authorization: %s", httpd_req_header(a->req, "Authorization"));
  snprintf(actor, sizeof(actor), "X-Zonegate-Actor: %s", a->actor);
  snprintf(source, sizeof(source), "X-Zonegate-Source: %s", a->source);
  size_t body_len;
  const char *body_text = httpd_req_body(a->req, &body_len);
  uint64_t ts = zg_wall_ms();
  uint8_t mac[32];
  char mac_hex[65];
  forward_mac(a->node, httpd_req_method(a->req), httpd_req_path(a->req), httpd_req_query(a->req),
              a->actor, a->source, ts, body_text, body_len, mac);
  hex32(mac, mac_hex);
  snprintf(sig, sizeof(sig), "X-Zonegate-Forward-Auth: v1 %llu %s", (unsigned long long)ts,
           mac_hex);
  OPENSSL_cleanse(mac, sizeof(mac));
  const char *if_match = httpd_req_header(a->req, "If-Match");
  char if_match_line[96];
  snprintf(if_match_line, sizeof(if_match_line), "If-Match: %.60s", if_match ? if_match : "");
  const char *headers[] = {auth,
                           "X-Zonegate-Forwarded: 1",
                           "Content-Type: application/json",
                           source,
                           actor,
                           sig,
                           if_match ? if_match_line : NULL,
                           NULL};
  /* Over mutual TLS the leader must show the certificate of the node it is. */
  const struct zg_config *cfg = a->node->cfg;
  struct upstream_tls tls = {cfg->tls_ca, cfg->tls_cert, cfg->tls_key, leader->id};
  struct upstream_request ureq = {url,
                                  httpd_req_method(a->req),
                                  headers,
                                  body_text,
                                  body_len,
                                  {2000, 10000, 0, 15000},
                                  a->node->tls_admin ? &tls : NULL,
                                  false,
                                  strcmp(cfg->upstream_client, "curl") == 0};
  static const struct upstream_callbacks cb = {on_fwd_response, on_fwd_data, on_fwd_done};
  char err[256];
  /* a retry: the previous attempt's answer (a 503 from a node that was
   * not the leader any more) is dropped, not leaked */
  zg_buf_free(&a->body);
  zg_buf_init(&a->body);
  if (upstream_start(a->node->admin_client, &ureq, &cb, a, &a->transfer, err, sizeof(err)) != 0) {
    httpd_respond_error(a->req, 503, "admin_error", "leader_unreachable", retry, "%s", err);
    admin_req_free(a);
    return;
  }
  httpd_req_set_abort(a->req, on_admin_abort, a);
}

/* ---- route handlers --------------------------------------------------- */

static cJSON *parse_body(struct httpd_req *req, bool required) {
  size_t len;
  const char *text = httpd_req_body(req, &len);
  if (len == 0 && !required) return cJSON_CreateObject();
  cJSON *json = cJSON_ParseWithLength(text, len);
  if (!cJSON_IsObject(json)) {
    cJSON_Delete(json);
    httpd_respond_error(req, 400, "invalid_request_error", "invalid_json", NULL,
                        "the request body must be a JSON object");
    return NULL;
  }
  return json;
}

/* A request's state; NULL (500 answered) when out of memory. */
static struct admin_req *admin_req_new(struct node *n, struct httpd_req *req) {
  struct admin_req *a = calloc(1, sizeof(*a));
  if (!a) {
    httpd_respond_error(req, 500, "server_error", NULL, NULL, "out of memory");
    return NULL;
  }
  a->node = n;
  a->req = req;
  zg_buf_init(&a->body);
  zg_hold_init(&a->forward, n->loop, READ_YOUR_WRITES_TIMEOUT_MS, on_forward_retry, a);
  zg_hold_init(&a->applied, n->loop, READ_YOUR_WRITES_TIMEOUT_MS, on_applied_check, a);
  return a;
}

/* ---- usage counts relayed to the leader ---------------------------------
 * A node that is not the leader cannot write usage.add itself. It still
 * has counts when requests it took as the active finish after a planned
 * handover (they finish where they started: see role_drain_begin), and
 * at its shutdown flush. It sends them to the leader's admin address,
 * signed like a forwarded admin write (actor "gateway", source this node's
 * id) and, with security.tls, over mutual TLS with its node certificate.
 * The leader writes them (USAGE_RELAY_ROUTE below). One relay at a time
 * (the gateway writes one batch at a time); counts that were not
 * acknowledged go back to the gateway and are sent again at the next
 * flush: at least once, as a local usage.add whose answer was lost. */
#define USAGE_RELAY_ROUTE "/_zonegate/usage"

static void log_auth_failure(struct httpd_req *req, bool forward, const char *why);

struct usage_relay {
  struct node *n;
  struct upstream_transfer *transfer;
  void (*done)(void *arg, bool committed);
  void *arg;
  int status;
  char *body;
};

static void usage_relay_end(struct usage_relay *r, bool committed) {
  if (r->n->usage_relay == r) r->n->usage_relay = NULL;
  void (*done)(void *, bool) = r->done;
  void *arg = r->arg;
  free(r->body);
  free(r);
  done(arg, committed);
}

static void on_relay_response(void *ud, int status, const char *content_type,
                              const char *const *headers) {
  (void)content_type;
  (void)headers;
  ((struct usage_relay *)ud)->status = status;
}

static void on_relay_done(void *ud, enum upstream_result result, const char *curl_error) {
  struct usage_relay *r = ud;
  r->transfer = NULL;
  bool ok = result == UPSTREAM_OK && r->status == 200;
  if (!ok)
    zg_log(ZG_WARN, "usage_relay_failed",
           "usage counts not taken by the leader (%s, HTTP %d); kept for the next flush",
           result == UPSTREAM_OK ? "answered" : upstream_result_name(result), r->status);
  usage_relay_end(r, ok);
}

int node_usage_relay(struct node *n, cJSON *args, void (*done)(void *arg, bool committed),
                     void *arg) {
  char *text = cJSON_PrintUnformatted(args);
  cJSON_Delete(args);
  const struct consensus_member *leader = n->consensus ? consensus_leader(n->consensus) : NULL;
  const struct consensus_member *self = n->consensus ? consensus_self(n->consensus) : NULL;
  if (!text || !n->admin_client || !n->have_forward_key || n->usage_relay || !leader || !self ||
      !leader->admin_address || !leader->admin_address[0] || !strcmp(leader->id, self->id)) {
    free(text);
    return -1;
  }
  struct usage_relay *r = calloc(1, sizeof(*r));
  if (!r) {
    free(text);
    return -1;
  }
  r->n = n;
  r->done = done;
  r->arg = arg;
  r->body = text;
  size_t len = strlen(text);
  char url[300], source[160], sig[128];
  snprintf(url, sizeof(url), "%s://%s%s", n->tls_admin ? "https" : "http", leader->admin_address,
           USAGE_RELAY_ROUTE);
  snprintf(source, sizeof(source), "X-Zonegate-Source: %s", self->id);
  uint64_t ts = zg_wall_ms();
  uint8_t mac[32];
  char mac_hex[65];
  forward_mac(n, "POST", USAGE_RELAY_ROUTE, "", "gateway", self->id, ts, text, len, mac);
  hex32(mac, mac_hex);
  OPENSSL_cleanse(mac, sizeof(mac));
  snprintf(sig, sizeof(sig), "X-Zonegate-Forward-Auth: v1 %llu %s", (unsigned long long)ts,
           mac_hex);
  const char *headers[] = {"Content-Type: application/json", "X-Zonegate-Actor: gateway", source,
                           sig, NULL};
  const struct zg_config *cfg = n->cfg;
  struct upstream_tls tls = {cfg->tls_ca, cfg->tls_cert, cfg->tls_key, leader->id};
  struct upstream_request ureq = {url,
                                  "POST",
                                  headers,
                                  text,
                                  len,
                                  {1000, 3000, 0, 3000},
                                  n->tls_admin ? &tls : NULL,
                                  true,
                                  strcmp(cfg->upstream_client, "curl") == 0};
  static const struct upstream_callbacks cb = {on_relay_response, NULL, on_relay_done};
  char err[256];
  if (upstream_start(n->admin_client, &ureq, &cb, r, &r->transfer, err, sizeof(err)) != 0) {
    zg_log(ZG_WARN, "usage_relay_failed", "usage counts not sent to the leader: %s", err);
    free(r->body);
    free(r);
    return -1;
  }
  n->usage_relay = r;
  return 0;
}

void node_usage_relay_cancel(struct node *n) {
  struct usage_relay *r = n->usage_relay;
  if (!r) return;
  if (r->transfer) upstream_cancel(r->transfer);
  r->transfer = NULL;
  usage_relay_end(r, false);
}

/* The leader's side: counts relayed by another node of this cluster. Only
 * with a valid forwarding signature naming actor "gateway" (and, with
 * TLS, a cluster node's certificate); never with the admin token alone,
 * so an operator's credential cannot add usage. Not the leader: 503
 * not_leader (the sender keeps the counts). */
static void handle_usage_relay(struct node *n, struct httpd_req *req) {
  if (strcmp(httpd_req_method(req), "POST") != 0) {
    const char *allow[] = {"Allow: POST", NULL};
    httpd_respond_error(req, 405, "invalid_request_error", "method_not_allowed", allow,
                        "%s takes POST only", USAGE_RELAY_ROUTE);
    return;
  }
  if (n->tls_admin && !node_is_member(n, httpd_req_peer_node(req))) {
    log_auth_failure(req, true, "usage relay without a cluster node certificate");
    httpd_respond_error(req, 401, "invalid_request_error", "node_certificate_required", NULL,
                        "this route takes requests from cluster nodes only");
    return;
  }
  struct admin_req *a = admin_req_new(n, req);
  if (!a) return;
  const char *why = "no forwarding signature";
  int fwd = check_forward_auth(a, &why);
  if (fwd != 1 || strcmp(a->actor, "gateway") != 0 || !node_is_member(n, a->source)) {
    if (fwd == 1) why = "signed, but not a usage relay from a cluster member";
    log_auth_failure(req, true, why);
    httpd_respond_error(req, 401, "invalid_request_error", "invalid_forward_auth", NULL,
                        "usage relay: %s", why);
    admin_req_free(a);
    return;
  }
  a->forwarded = true;
  if (!consensus_is_leader(n->consensus)) {
    const char *retry[] = {"Retry-After: 1", NULL};
    httpd_respond_error(req, 503, "admin_error", "not_leader", retry,
                        "this node is not the leader; relay the counts to the leader");
    admin_req_free(a);
    return;
  }
  cJSON *args = parse_body(req, true);
  if (!args) {
    admin_req_free(a);
    return;
  }
  submit(a, "usage.add", args);
}

static bool literal_secret(const char *v) {
  return v && v[0] && strncmp(v, "env:", 4) && strncmp(v, "file:", 5);
}

/* Collects the JSON paths of foreign references ("a, b"); values are never
 * collected. */
static void note_foreign_ref(void *ud, const char *path) {
  zg_buf *paths = ud;
  if (paths->len < 600) zg_buf_appendf(paths, "%s%s", paths->len ? ", " : "", path);
}

static void put_config(struct admin_req *a) {
  cJSON *body = parse_body(a->req, true);
  if (!body) {
    admin_req_free(a);
    return;
  }
  /* Accept either {"config": {...}} or the replicated sections directly,
   * or a whole node file (its local sections are ignored). Either way the
   * document is validated like a file first, so an unknown or misspelled
   * key is an error naming the nearest known key, never silently dropped. */
  cJSON *config = cJSON_DetachItemFromObjectCaseSensitive(body, "config");
  if (!config) {
    char *text = cJSON_PrintUnformatted(body);
    char verr[1024];
    struct zg_config *whole =
        text ? zg_config_parse(text, "PUT /v1/config", verr, sizeof(verr)) : NULL;
    free(text);
    if (!whole) {
      cJSON_Delete(body);
      httpd_respond_error(a->req, 400, "invalid_request_error", "invalid_config", NULL, "%s", verr);
      admin_req_free(a);
      return;
    }
    zg_config_free(whole);
    config = cJSON_CreateObject();
    for (cJSON *c = body->child; c; c = c->next)
      if (zg_config_key_is_replicated(c->string))
        cJSON_AddItemToObject(config, c->string, cJSON_Duplicate(c, 1));
  }
  cJSON_Delete(body);
  char err[1024];
  struct zg_config *check =
      zg_config_with_replicated(a->node->cfg, config, "PUT /v1/config", err, sizeof(err));
  if (!check) {
    cJSON_Delete(config);
    httpd_respond_error(a->req, 400, "invalid_request_error", "invalid_config", NULL, "%s", err);
    admin_req_free(a);
    return;
  }
  zg_buf foreign;
  zg_buf_init(&foreign);
  size_t n_foreign = zg_config_foreign_refs(a->node->cfg, config, note_foreign_ref, &foreign);
  if (n_foreign > 0) {
    zg_config_free(check);
    cJSON_Delete(config);
    httpd_respond_error(
        a->req, 400, "invalid_request_error", "secret_reference_not_local", NULL,
        "PUT /v1/config: %s: an \"env:\" / \"file:\" reference in the replicated config is "
        "resolved only where each node's own local config file has the very same reference at "
        "the same path (a node's environment and files are not reachable through the admin API); "
        "put the reference in each node's local config file, or add the provider key with "
        "`zonegate keys add` (secrets enter the replicated state only sealed)",
        foreign.data ? foreign.data : "?");
    zg_buf_free(&foreign);
    admin_req_free(a);
    return;
  }
  zg_buf_free(&foreign);
  bool literal = literal_secret(check->api_key);
  for (size_t i = 0; i < check->n_fallbacks; i++)
    literal |= literal_secret(check->fallbacks[i].api_key);
  zg_config_free(check);
  if (literal) {
    cJSON_Delete(config);
    httpd_respond_error(
        a->req, 400, "invalid_request_error", "literal_secret", NULL,
        "PUT /v1/config: api_key: a literal key would be replicated in plaintext; add it with "
        "`zonegate keys add` (sealed), or put \"env:NAME\" / \"file:PATH\" in each node's "
        "local config file");
    admin_req_free(a);
    return;
  }
  cJSON *args = cJSON_CreateObject();
  cJSON_AddItemToObject(args, "config", config);
  const char *if_match = httpd_req_header(a->req, "If-Match");
  if (if_match) {
    while (*if_match == '"' || *if_match == ' ') if_match++;
    char *end;
    unsigned long long v = strtoull(if_match, &end, 10);
    if (end == if_match) {
      cJSON_Delete(args);
      httpd_respond_error(a->req, 400, "invalid_request_error", "invalid_if_match", NULL,
                          "If-Match must be a config version number");
      admin_req_free(a);
      return;
    }
    cJSON_AddNumberToObject(args, "if_match", (double)v);
  }
  submit(a, "config.put", args);
}

static void create_token(struct admin_req *a) {
  cJSON *args = parse_body(a->req, true);
  if (!args) {
    admin_req_free(a);
    return;
  }
  cJSON *expires_in = cJSON_DetachItemFromObjectCaseSensitive(args, "expires_in_s");
  if (cJSON_IsNumber(expires_in) && expires_in->valuedouble > 0)
    cJSON_AddNumberToObject(args, "expires_at",
                            (double)zg_wall_ms() + expires_in->valuedouble * 1000.0);
  cJSON_Delete(expires_in);
  if (cJSON_GetObjectItemCaseSensitive(args, "sha256") ||
      cJSON_GetObjectItemCaseSensitive(args, "token")) {
    cJSON_Delete(args);
    httpd_respond_error(
        a->req, 400, "invalid_request_error", "invalid_field", NULL,
        "tokens are generated by the cluster; send name, expires_in_s, rpm, tpm, budget_day, "
        "budget_month, allow only");
    admin_req_free(a);
    return;
  }
  a->one_time_token = zg_random_token("zg-");
  char hash[65];
  zg_sha256_hex(a->one_time_token, strlen(a->one_time_token), hash);
  cJSON_AddStringToObject(args, "sha256", hash);
  submit(a, "token.create", args);
}

/* PATCH /v1/tokens/{id or name}: token.update. expires_in_s N > 0 sets
 * the expiry N s from now, 0 clears it. */
static void update_token(struct admin_req *a, const char *id) {
  cJSON *args = parse_body(a->req, true);
  if (!args) {
    admin_req_free(a);
    return;
  }
  cJSON *expires_in = cJSON_DetachItemFromObjectCaseSensitive(args, "expires_in_s");
  if (cJSON_IsNumber(expires_in))
    cJSON_AddNumberToObject(
        args, "expires_at",
        expires_in->valuedouble > 0 ? (double)zg_wall_ms() + expires_in->valuedouble * 1000.0 : 0);
  cJSON_Delete(expires_in);
  cJSON_DeleteItemFromObjectCaseSensitive(args, "id");
  cJSON_AddStringToObject(args, "id", id);
  submit(a, "token.update", args);
}

/* "24h", "7d", "30m", "90s", "3600" (seconds) → seconds; "all" or "0" → 0
 * (everything kept). -1 when malformed. */
static int64_t parse_since(const char *text) {
  if (!strcmp(text, "all")) return 0;
  char *end;
  errno = 0;
  double v = strtod(text, &end);
  if (end == text || errno || !(v >= 0) || v > 1e10) return -1;
  if (!strcmp(end, "d"))
    v *= 86400;
  else if (!strcmp(end, "h"))
    v *= 3600;
  else if (!strcmp(end, "m"))
    v *= 60;
  else if (strcmp(end, "s") && *end)
    return -1;
  return (int64_t)v;
}

/* Query values are percent-encoded by clients (model names with '/'). */
static void percent_decode(char *s) {
  char *out = s;
  for (char *p = s; *p; p++) {
    if (*p == '%' && isxdigit((unsigned char)p[1]) && isxdigit((unsigned char)p[2])) {
      char hex[3] = {p[1], p[2], 0};
      *out++ = (char)strtol(hex, NULL, 16);
      p += 2;
    } else {
      *out++ = *p == '+' ? ' ' : *p;
    }
  }
  *out = '\0';
}

/* GET /v1/usage?token=NAME&model=M&since=24h (default 24h; "all" for
 * everything kept): consensus_usage_query of this node's applied state. */
static void get_usage(struct admin_req *a) {
  char token[160], model[300], since[32];
  const char *t = httpd_req_query_param(a->req, "token", token, sizeof(token));
  const char *m = httpd_req_query_param(a->req, "model", model, sizeof(model));
  const char *s = httpd_req_query_param(a->req, "since", since, sizeof(since));
  if (t) percent_decode(token);
  if (m) percent_decode(model);
  int64_t window = parse_since(s && *s ? s : "24h");
  if (window < 0) {
    httpd_respond_error(a->req, 400, "invalid_request_error", "invalid_since", NULL,
                        "since: expected a duration such as 24h, 7d, 30m, 3600 (seconds) or all");
    return;
  }
  uint64_t now_s = zg_wall_ms() / 1000;
  uint64_t since_s = window == 0 ? 0 : (uint64_t)window < now_s ? now_s - (uint64_t)window : 1;
  cJSON *body = consensus_usage_query(a->node->consensus, t && *t ? token : NULL,
                                      m && *m ? model : NULL, since_s);
  if (!body) {
    httpd_respond_error(a->req, 500, "server_error", NULL, NULL, "out of memory");
    return;
  }
  cJSON_AddStringToObject(body, "window", s && *s ? s : "24h");
  cJSON_AddNumberToObject(body, "applied_index",
                          (double)consensus_applied_index(a->node->consensus));
  json_answer(a->req, 200, body, NULL);
}

static void admin_switchover_done(void *ud, int status, const char *msg) {
  struct admin_req *a = ud;
  if (a->gone) {
    admin_req_free(a);
    return;
  }
  httpd_req_set_abort(a->req, NULL, NULL);
  cJSON *body = cJSON_CreateObject();
  cJSON_AddBoolToObject(body, "ok", status == 0);
  cJSON_AddStringToObject(body, "message", msg ? msg : "");
  const struct consensus_member *leader = consensus_leader(a->node->consensus);
  cJSON_AddStringToObject(body, "leader", leader ? leader->id : "");
  /* 503: the target did not take leadership (not caught up, gone, lost its
   * election): worth trying again; 409 for the rest (busy, not active). */
  json_answer(a->req, status == 0 ? 200 : status == CONSENSUS_ENOTMOVED ? 503 : 409, body, NULL);
  admin_req_free(a);
}

static void handle_switchover(struct admin_req *a) {
  cJSON *body = parse_body(a->req, false);
  if (!body) {
    admin_req_free(a);
    return;
  }
  const cJSON *to = cJSON_GetObjectItemCaseSensitive(body, "to");
  char target[64] = "";
  if (cJSON_IsString(to)) snprintf(target, sizeof(target), "%s", to->valuestring);
  cJSON_Delete(body);
  const char *why = target[0] ? failover_switchover_target_error(a->node->failover, target) : NULL;
  if (why) {
    httpd_respond_error(a->req, 400, "invalid_request_error", "invalid_switchover_target", NULL,
                        "switchover refused: %s %s", target, why);
    admin_req_free(a);
    return;
  }
  httpd_req_set_abort(a->req, on_admin_abort, a);
  int rc = failover_switchover(a->node->failover, target[0] ? target : NULL,
                               "planned switchover (admin API)", admin_switchover_done, a);
  if (rc != 0) {
    httpd_req_set_abort(a->req, NULL, NULL);
    httpd_respond_error(a->req, consensus_http_status(rc), "admin_error", consensus_strerror(rc),
                        NULL, "switchover refused: %s", consensus_strerror(rc));
    admin_req_free(a);
  }
}

static void on_member_done(void *ud, int status, const char *errmsg) {
  on_write_done(ud, status, errmsg, NULL);
}

static void add_member(struct admin_req *a) {
  cJSON *body = parse_body(a->req, true);
  if (!body) {
    admin_req_free(a);
    return;
  }
  const cJSON *id = cJSON_GetObjectItemCaseSensitive(body, "id");
  const cJSON *raft = cJSON_GetObjectItemCaseSensitive(body, "raft");
  const cJSON *zone = cJSON_GetObjectItemCaseSensitive(body, "zone");
  const cJSON *role = cJSON_GetObjectItemCaseSensitive(body, "role");
  const cJSON *admin = cJSON_GetObjectItemCaseSensitive(body, "admin");
  const cJSON *gateway = cJSON_GetObjectItemCaseSensitive(body, "gateway");
  if (!cJSON_IsString(id) || !cJSON_IsString(raft)) {
    cJSON_Delete(body);
    httpd_respond_error(
        a->req, 400, "invalid_request_error", "invalid_member", NULL,
        "expected {\"id\", \"raft\": \"host:port\", \"zone\", \"role\", \"admin\", \"gateway\"}");
    admin_req_free(a);
    return;
  }
  struct consensus_member m = {id->valuestring,
                               cJSON_IsString(zone) ? zone->valuestring : "",
                               cJSON_IsString(role) && !strcmp(role->valuestring, "witness")
                                   ? CONSENSUS_WITNESS
                                   : CONSENSUS_GATEWAY,
                               raft->valuestring,
                               cJSON_IsString(admin) ? admin->valuestring : NULL,
                               cJSON_IsString(gateway) ? gateway->valuestring : NULL};
  httpd_req_set_abort(a->req, on_admin_abort, a);
  int rc = consensus_add_member(a->node->consensus, &m, on_member_done, a);
  cJSON_Delete(body);
  if (rc != 0) on_write_done(a, rc, consensus_strerror(rc), NULL);
}

static void on_drill_timer(uv_timer_t *t) {
  struct node *n = t->data;
  if (n->drill_crash) _exit(137); /* abrupt, as a crash: no drain, no handover */
  zg_log(ZG_WARN, "drill_freeze", "drill: freezing the event loop for %u ms", n->drill_freeze_ms);
  uv_sleep(n->drill_freeze_ms);
}

static void drill(struct admin_req *a, const char *kind) {
  struct node *n = a->node;
  if (!n->cfg->drills_enabled) {
    httpd_respond_error(a->req, 404, "invalid_request_error", "drills_disabled", NULL,
                        "drill endpoints exist only with \"drills\": {\"enabled\": true}");
    admin_req_free(a);
    return;
  }
  cJSON *body = parse_body(a->req, false);
  if (!body) {
    admin_req_free(a);
    return;
  }
  const cJSON *ms = cJSON_GetObjectItemCaseSensitive(body, "duration_ms");
  unsigned duration = cJSON_IsNumber(ms) && ms->valuedouble > 0 && ms->valuedouble <= 600000
                          ? (unsigned)ms->valuedouble
                          : 5000;
  cJSON_Delete(body);
  zg_log(ZG_WARN, "drill", "drill %s injected through the admin API from %s (%u ms)", kind,
         httpd_req_peer_ip(a->req), duration);
  cJSON *answer = cJSON_CreateObject();
  cJSON_AddStringToObject(answer, "drill", kind);
  cJSON_AddStringToObject(answer, "node", n->cfg->node_id);
  cJSON_AddNumberToObject(answer, "duration_ms", duration);
  cJSON_AddNumberToObject(answer, "injected_at_ms", (double)zg_wall_ms());
  if (!strcmp(kind, "crash") || !strcmp(kind, "freeze")) {
    /* Answer first; the fault runs from a timer a moment later, once the
     * answer has been written (never a nested uv_run). */
    json_answer(a->req, 200, answer, NULL);
    admin_req_free(a);
    n->drill_crash = !strcmp(kind, "crash");
    n->drill_freeze_ms = duration;
    if (!n->drill_timer.data) {
      uv_timer_init(n->loop, &n->drill_timer);
      n->drill_timer.data = n;
    }
    uv_timer_start(&n->drill_timer, on_drill_timer, 20, 0);
    return;
  }
  if (!strcmp(kind, "isolate")) {
    int rc = consensus_isolate(n->consensus, duration);
    if (rc == 0) {
      json_answer(a->req, 200, answer, NULL);
    } else {
      cJSON_Delete(answer);
      httpd_respond_error(a->req, 500, "admin_error", "isolate_failed", NULL, "isolate failed: %s",
                          consensus_strerror(rc));
    }
    admin_req_free(a);
    return;
  }
  cJSON_Delete(answer);
  httpd_respond_error(a->req, 404, "invalid_request_error", "unknown_drill", NULL,
                      "unknown drill %s; valid: crash, freeze, isolate", kind);
  admin_req_free(a);
}

static bool is_write(const char *method) {
  return strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0;
}

/* One WARN line per peer address (and kind: admin token, or forwarding
 * signature) every AUTH_LOG_INTERVAL_MS; the offered token is never
 * logged. */
static void log_auth_failure(struct httpd_req *req, bool forward, const char *why) {
  static struct zg_log_throttle throttle = {.interval_ms = AUTH_LOG_INTERVAL_MS};
  const char *peer = httpd_req_peer_ip(req);
  char key[72];
  snprintf(key, sizeof(key), "%c%.63s", forward ? 'f' : 't', peer);
  unsigned suppressed = 0;
  if (!zg_log_throttle(&throttle, key, &suppressed)) return;
  cJSON *fields = cJSON_CreateObject();
  if (fields) {
    char msg[200];
    snprintf(msg, sizeof(msg), "admin API: %s from %.63s", why, peer);
    cJSON_AddStringToObject(fields, "msg", msg);
    cJSON_AddStringToObject(fields, "peer_ip", peer);
    cJSON_AddStringToObject(fields, "method", httpd_req_method(req));
    cJSON_AddStringToObject(fields, "reason", why);
    cJSON_AddNumberToObject(fields, "suppressed_since_last", suppressed);
  }
  zg_log_fields(ZG_WARN, "admin_auth_failed", fields);
}

/* A client request a standby forwarded over mutual TLS (see
 * gateway_set_forward_tls): only from a cluster node's certificate; then
 * served by the gateway exactly as on the client port (the client's own
 * token is checked there). */
#define FORWARD_ROUTE "/_zonegate/forward"
static void handle_forwarded_client(struct node *n, struct httpd_req *req) {
  const char *peer = httpd_req_peer_node(req);
  if (!node_is_member(n, peer)) {
    log_auth_failure(req, true,
                     peer ? "forwarded client request from a certificate of a non-member"
                          : "forwarded client request without a node certificate");
    httpd_respond_error(req, 401, "invalid_request_error", "node_certificate_required", NULL,
                        "this route takes requests from cluster nodes only");
    return;
  }
  if (!n->gateway || !httpd_req_strip_path_prefix(req, FORWARD_ROUTE) ||
      strncmp(httpd_req_path(req), "/v1/", 4) != 0) {
    httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL, "no such route");
    return;
  }
  gateway_handle_forwarded(n->gateway, req);
}

static void on_admin_finished(void *ctx, struct httpd_req *req) {
  struct node *n = ctx;
  if (httpd_req_user(req)) gateway_forwarded_finished(n->gateway, req); /* the gateway's own */
}

static void on_admin_request(void *ctx, struct httpd_req *req) {
  struct node *n = ctx;
  if (strcmp(httpd_req_path(req), "/metrics") == 0) {
    /* Prometheus scrapes here (the private port) without the admin token:
     * metrics hold no secret, and a scraper must not hold that token. */
    gateway_metrics_respond(n->gateway, req);
    return;
  }
  if (n->tls_admin && strncmp(httpd_req_path(req), FORWARD_ROUTE "/", sizeof(FORWARD_ROUTE)) == 0) {
    handle_forwarded_client(n, req);
    return;
  }
  if (strcmp(httpd_req_path(req), USAGE_RELAY_ROUTE) == 0) {
    handle_usage_relay(n, req);
    return;
  }
  const char *auth = httpd_req_header(req, "Authorization");
  const char *presented = auth && !strncasecmp(auth, "Bearer ", 7) ? auth + 7 : "";
  if (!zg_ct_equal(presented, strlen(presented), n->admin_token, strlen(n->admin_token))) {
    log_auth_failure(req, false, presented[0] ? "wrong admin token" : "missing admin token");
    httpd_respond_error(
        req, 401, "invalid_request_error", "invalid_admin_token", NULL,
        "missing or wrong admin token: send \"Authorization: Bearer <admin token>\"");
    return;
  }
  struct admin_req *a = admin_req_new(n, req);
  if (!a) return;
  const char *why = NULL;
  int fwd = check_forward_auth(a, &why);
  if (fwd < 0) {
    log_auth_failure(req, true, why);
    httpd_respond_error(req, 401, "invalid_request_error", "invalid_forward_auth", NULL,
                        "X-Zonegate-Forward-Auth did not verify: %s", why);
    admin_req_free(a);
    return;
  }
  a->forwarded = fwd == 1;
  if (a->forwarded && n->tls_admin && !node_is_member(n, httpd_req_peer_node(req))) {
    /* With TLS, a forwarded write also needs a cluster node's certificate. */
    log_auth_failure(req, true, "forwarded admin request without a cluster node certificate");
    httpd_respond_error(req, 401, "invalid_request_error", "node_certificate_required", NULL,
                        "a forwarded request must come from a cluster node (TLS certificate)");
    admin_req_free(a);
    return;
  }
  if (!a->forwarded) {
    /* A client: whatever X-Zonegate-* it sent is ignored. The actor is
     * what the credential proves; the source is the TCP peer. */
    snprintf(a->actor, sizeof(a->actor), "admin");
    snprintf(a->source, sizeof(a->source), "%s", httpd_req_peer_ip(req));
  }
  admin_route(a);
}

/* ---- routing ----------------------------------------------------------- */

/* Routes an authenticated admin request (again, after a node became the
 * leader while a forward was waiting). */
static void admin_route(struct admin_req *a) {
  struct node *n = a->node;
  struct httpd_req *req = a->req;
  const char *m = httpd_req_method(req);
  const char *p = httpd_req_path(req);
  struct consensus *cs = n->consensus;
  char id[128] = "";
  enum route route = R_STATUS;
  const char *allow = "";
  int found = admin_route_lookup(m, p, &route, id, sizeof(id), &allow);
  if (found != 200) {
    if (found == 405) {
      char allow_line[64];
      snprintf(allow_line, sizeof(allow_line), "Allow: %s", allow);
      const char *extra[] = {allow_line, NULL};
      httpd_respond_error(req, 405, "invalid_request_error", "method_not_allowed", extra,
                          "%s is not allowed on %s (allowed: %s)", m, p, allow);
    } else {
      httpd_respond_error(req, 404, "invalid_request_error", "not_found", NULL,
                          "no admin route %s %s", m, p);
    }
    admin_req_free(a);
    return;
  }
  bool write = is_write(m);
  if (write && consensus_superseded(cs)) {
    httpd_respond_error(req, 503, "admin_error", "superseded", NULL,
                        "this node's data is from an older incarnation of the cluster (it met a "
                        "node recovered with zonegate recover --force): it takes no write. Send "
                        "writes to the recovered cluster; empty this node's data dir and add it "
                        "again with `zonegate members add`");
    admin_req_free(a);
    return;
  }
  if (write && route != R_DRILL && !consensus_is_leader(cs)) {
    forward_to_leader(a);
    return;
  }
  switch (route) {
  case R_STATUS: {
    cJSON *body = consensus_status_json(cs);
    if (n->failover) failover_status_json(n->failover, cJSON_AddObjectToObject(body, "failover"));
    if (n->alerts) alerts_status_json(n->alerts, body);
    cJSON_AddNumberToObject(body, "config_version", (double)consensus_config_version(cs));
    json_answer(req, 200, body, NULL);
    break;
  }
  case R_CONFIG:
    if (write) {
      put_config(a);
      return;
    } else {
      cJSON *body = cJSON_CreateObject();
      cJSON_AddNumberToObject(body, "version", (double)consensus_config_version(cs));
      const cJSON *cfg = consensus_config(cs);
      cJSON_AddItemToObject(body, "config", cfg ? cJSON_Duplicate(cfg, 1) : cJSON_CreateObject());
      char etag[64];
      snprintf(etag, sizeof(etag), "ETag: \"%llu\"",
               (unsigned long long)consensus_config_version(cs));
      const char *extra[] = {etag, NULL};
      json_answer(req, 200, body, extra);
    }
    break;
  case R_KEYS:
    if (write) {
      cJSON *args = parse_body(req, true);
      if (args) {
        submit(a, "key.add", args);
        return;
      }
    } else {
      cJSON *body = cJSON_CreateObject();
      cJSON_AddItemToObject(body, "keys", consensus_keys_json(cs));
      json_answer(req, 200, body, NULL);
    }
    break;
  case R_KEY_ROTATE: {
    cJSON *args = parse_body(req, true);
    if (args) {
      cJSON_DeleteItemFromObjectCaseSensitive(args, "id");
      cJSON_AddStringToObject(args, "id", id);
      submit(a, "key.rotate", args);
      return;
    }
    break;
  }
  case R_TOKEN:
    if (!strcmp(m, "PATCH")) {
      update_token(a, id);
      return;
    }
    __attribute__((fallthrough)); /* DELETE */
  case R_KEY: {
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "id", id);
    submit(a, route == R_KEY ? "key.revoke" : "token.revoke", args);
    return;
  }
  case R_TOKENS:
    if (write) {
      create_token(a);
      return;
    } else {
      cJSON *body = cJSON_CreateObject();
      cJSON_AddItemToObject(body, "tokens", consensus_tokens_json(cs));
      json_answer(req, 200, body, NULL);
    }
    break;
  case R_AUDIT:
    if (write) {
      cJSON *args = parse_body(req, true);
      if (args) {
        submit(a, "audit.note", args);
        return;
      }
    } else {
      char buf[16];
      const char *limit = httpd_req_query_param(req, "limit", buf, sizeof(buf));
      cJSON *body = cJSON_CreateObject();
      cJSON_AddItemToObject(body, "audit",
                            consensus_audit_json(cs, limit ? strtoul(limit, NULL, 10) : 100));
      json_answer(req, 200, body, NULL);
    }
    break;
  case R_MEMBERS:
    add_member(a);
    return;
  case R_MEMBER: {
    httpd_req_set_abort(req, on_admin_abort, a);
    int rc = consensus_remove_member(cs, id, on_member_done, a);
    if (rc != 0) on_write_done(a, rc, consensus_strerror(rc), NULL);
    return;
  }
  case R_SWITCHOVER:
    handle_switchover(a);
    return;
  case R_DRILL:
    drill(a, id);
    return;
  case R_USAGE:
    get_usage(a);
    break;
  }
  admin_req_free(a);
}

int node_admin_start(struct node *n, char *errmsg, size_t errlen) {
  if (!n->consensus) return 0;
  if (!n->cfg->admin_token[0]) {
    zg_log(ZG_WARN, "admin_disabled",
           "security.admin_token is not set: the admin API is off on this node");
    return 0;
  }
  char err[512];
  if (zg_secret_resolve(n->cfg->admin_token, &n->admin_token, NULL, err, sizeof(err)) != 0) {
    snprintf(errmsg, errlen, "security.admin_token: %s", err);
    return -1;
  }
  if (strlen(n->admin_token) < 16) {
    snprintf(errmsg, errlen, "security.admin_token: expected at least 16 characters, found %zu",
             strlen(n->admin_token));
    return -1;
  }
  if (upstream_client_create(n->loop, &n->admin_client, errmsg, errlen) != 0) return -1;
  struct httpd_limits limits = {0};
  limits.max_body_bytes = 1024 * 1024;
  /* Client requests forwarded over TLS arrive here too: their body limit. */
  if (n->tls_admin && n->cfg->max_body_bytes > limits.max_body_bytes)
    limits.max_body_bytes = n->cfg->max_body_bytes;
  int rc = httpd_listen(n->loop, n->cfg->listen_admin, &limits, on_admin_request, n, &n->admin, err,
                        sizeof(err));
  if (rc != 0) {
    if (rc == UV_EADDRINUSE)
      snprintf(errmsg, errlen,
               "port %s is already in use (listen.admin in %s): stop the other process or change "
               "listen.admin",
               strrchr(n->cfg->listen_admin, ':') + 1, n->cfg->path);
    else
      snprintf(errmsg, errlen, "listen.admin: %s", err);
    return -1;
  }
  if (n->tls_admin) {
    httpd_set_tls(n->admin, n->tls_admin);
    httpd_set_finish_hook(n->admin, on_admin_finished);
  }
  zg_log(ZG_INFO, "admin_listening", "admin API on %s%s", n->cfg->listen_admin,
         n->tls_admin ? " (TLS 1.3; node-to-node routes need a cluster certificate)" : "");
  return 0;
}
