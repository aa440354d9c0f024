/* gateway: the client-facing side of a node. HTTP server on the client
 * port, router, client auth, limits, response cache, the upstream proxy
 * (libcurl multi on the uv loop), health endpoints and /metrics.
 *
 * Single-node mode works with no cluster at all. In a cluster, node/ gives
 * the gateway a `struct gateway_cluster` of callbacks: the replicated token
 * table and provider keys (read-only), and the failover role that decides
 * whether this node may serve or must forward. The gateway never writes
 * replicated state itself; it reports events (a key the upstream refused)
 * through the same callbacks.
 *
 * Failure modes: gateway_start() fails when the client port cannot be bound
 * (the message names the port and the config key to change). At run time
 * every failure is an HTTP answer in OpenAI's error shape; nothing aborts.
 */
#ifndef ZG_GATEWAY_H
#define ZG_GATEWAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct cJSON;
struct zg_config;
struct gateway;
struct httpd_req;

struct gateway_token {
  char id[80];
  char name[64];
  uint64_t expires_at_ms; /* wall clock; 0 = never */
  unsigned rpm;           /* requests per minute; 0 = unlimited */
  uint64_t tpm;           /* tokens per minute; 0 = unlimited */
  uint64_t budget_day;    /* tokens per UTC day; 0 = unlimited */
  uint64_t budget_month;  /* tokens per UTC month; 0 = unlimited */
  size_t n_allow;
  char allow[16][64]; /* CIDRs; none = any address */
};

/* What the replicated usage counters say about one client token (by
 * name) at wall second now_s: requests and tokens in the 60 s before it
 * (minute_oldest_s: the oldest second with traffic in that window, 0 =
 * none) and its token totals of the current UTC day and month. */
struct gateway_usage_view {
  uint64_t minute_requests, minute_tokens, minute_oldest_s;
  uint64_t day_tokens, month_tokens;
};

struct gateway_key {
  char id[48];
  char *secret; /* malloc'd; freed by the gateway with zg_secret_free() */
};

/* What this node may do with a client request right now. */
enum gateway_serve_mode {
  GATEWAY_SERVE,             /* active: handle it here */
  GATEWAY_FORWARD,           /* standby: forward to the active node's client port */
  GATEWAY_HOLD,              /* an active node is about to exist (election, lease not
                                yet taken, planned handover): wait and ask again */
  GATEWAY_REFUSE,            /* no active known, or a witness: 503 */
  GATEWAY_REFUSE_SUPERSEDED, /* this node's data is of an older cluster
                                incarnation: 503 "superseded", never retry here */
};

struct gateway_cluster {
  void *ud;
  /* Replicated client token by SHA-256 hex. */
  bool (*token_lookup)(void *ud, const char sha256_hex[65], struct gateway_token *out);
  /* Provider keys for an upstream in priority order; returns how many. */
  size_t (*usable_keys)(void *ud, const char *upstream, struct gateway_key *out, size_t max);
  /* The upstream answered 401 with this key. */
  void (*key_rejected)(void *ud, const char *key_id, const char *upstream);
  /* Role for requests; forward_to gets "host:port" when FORWARD.
   * `forwarded`: the request came from another node (never forward it
   * again: loops are impossible). HOLD is answered at most for
   * hold_timeout_ms, then the request gets 503. */
  enum gateway_serve_mode (*serve_mode)(void *ud, bool forwarded, char *forward_to, size_t len);
  unsigned hold_timeout_ms;
  /* Adds role, leader, term, commit_index, applied_index, ... to a health
   * body and returns the health status code for `check` ("active",
   * "standby", "ready"). */
  int (*health)(void *ud, const char *check, struct cJSON *body);
  /* Usage accounting (optional, both or neither). usage_view: the
   * replicated counters of a token. usage_write: commit one usage.add
   * command (args owned by the callee, shape in gateway/accounting.h);
   * done runs exactly once, later, with committed true once it is
   * applied here, false when it failed (the counts are kept and sent
   * again). */
  void (*usage_view)(void *ud, const char *token, uint64_t now_s, struct gateway_usage_view *out);
  void (*usage_write)(void *ud, struct cJSON *args, void (*done)(void *arg, bool committed),
                      void *arg);
  /* One usable provider key (active, or retiring before its retire_at) by
   * id: fills out (secret malloc'd; the gateway frees it with
   * zg_secret_free()) and returns true; false when unknown or not usable
   * (optional: NULL in single-node mode). */
  bool (*key_by_id)(void *ud, const char *id, struct gateway_key *out);
  /* Key of the signature that carries a client's identity on a request a
   * standby forwards to the active (derived from the cluster secret; see
   * gateway/ident.c). Without it a standby forwards no identity and every
   * signed request is refused. */
  bool have_forward_key;
  uint8_t forward_key[32];
};

struct gateway_stats {
  uint64_t requests_total;
  uint64_t requests_5xx;
  unsigned in_flight;
  unsigned queued;
};

/* On failure everything created is already closing: run the loop until it
 * is empty to release it. */
int gateway_start(uv_loop_t *loop, const struct zg_config *cfg, struct gateway **out, char *errmsg,
                  size_t errlen);
/* Cluster callbacks; NULL = single node (always active). Borrowed. */
void gateway_set_cluster(struct gateway *gw, const struct gateway_cluster *cluster);
/* Applies a new config live (limits, timeouts, cache size, endpoint, model
 * defaults, auth). The listen address is not changed. Borrowed: the
 * gateway copies what it needs. */
void gateway_apply_config(struct gateway *gw, const struct zg_config *cfg);
/* Accepts one more client token by hash (the bootstrap token node/
 * creates when the config has no auth section). */
void gateway_add_token(struct gateway *gw, const char *name, const char sha256_hex[65]);
/* Extra /metrics output from other modules (cluster role, lease, keys):
 * `collect` appends Prometheus text exposition lines (with # HELP and
 * # TYPE) to `out` (a zg_buf) at scrape time. Up to 8 collectors. */
void gateway_add_metrics_collector(struct gateway *gw, void (*collect)(void *ud, void *out),
                                   void *ud);
/* Checks a "models" section (the model routing table, see
 * gateway/routes.h) for config validation: 0, or -1 with err naming the
 * JSON path. Register it with zg_config_set_validator("models", ...). */
int gateway_models_validate(const struct cJSON *models, char *err, size_t errlen);
/* Writes the usage counts not yet flushed at once (planned switchover,
 * shutdown) instead of at the next usage.flush_ms tick; done(arg) runs
 * once they are committed, failed, or there was nothing (maybe before
 * this returns). */
void gateway_flush_usage(struct gateway *gw, void (*done)(void *arg), void *arg);
/* GET /metrics (Prometheus text) answered on another server's request
 * (the admin API); any other method gets 405. */
void gateway_metrics_respond(struct gateway *gw, struct httpd_req *req);
/* An extra listener (listen.metrics) that serves only GET /metrics. 0 ok,
 * else the message names the address. Closed by gateway_close(). */
int gateway_metrics_listen(struct gateway *gw, const char *address, char *errmsg, size_t errlen);
/* TLS on the client port (listen.gateway_tls; a server context from
 * base/tls.h, ALPN http/1.1). Call right after gateway_start. */
struct ssl_ctx_st;
void gateway_set_tls(struct gateway *gw, struct ssl_ctx_st *ctx);

/* Standby -> active forwarding over mutual TLS. With it, a standby sends a
 * client request to the active's ADMIN listener (mutual TLS, node
 * certificates) on the internal route /_zonegate/forward/v1/..., instead of
 * plain HTTP to its client port. resolve(ud, gateway_address, ...) gives
 * the active's admin address and node id (0) for the client-port address
 * the cluster hooks name. Files are copied. */
void gateway_set_forward_tls(struct gateway *gw, const char *ca, const char *cert, const char *key,
                             int (*resolve)(void *ud, const char *gateway_address, char *admin,
                                            size_t admin_len, char *node, size_t node_len),
                             void *ud);
/* The URL (and, with TLS, the node id to expect) for forwarding `path`
 * (after /v1) to the node at gateway address `to`. */
void gateway_forward_url(struct gateway *gw, const char *to, const char *path, char *url,
                         size_t url_len, char *node, size_t node_len);
/* Fills *tls for a forwarded request to `node`; false without TLS. */
struct upstream_tls;
bool gateway_forward_tls(const struct gateway *gw, const char *node, struct upstream_tls *tls);
/* A client request another node forwarded to this one over mutual TLS
 * (admin listener, /_zonegate/forward prefix already stripped): served as if
 * it had arrived on the client port. The admin listener's finish hook must
 * call gateway_forwarded_finished for it. */
struct httpd_req;
void gateway_handle_forwarded(struct gateway *gw, struct httpd_req *req);
void gateway_forwarded_finished(struct gateway *gw, struct httpd_req *req);

/* Shutting down, first step: every health endpoint (live included) answers
 * 503 "draining" so the load balancer stops choosing this node, while the
 * listener still accepts and serves (or forwards) what the LB sends until
 * it has noticed. */
void gateway_announce_drain(struct gateway *gw);
/* Stops accepting new connections; in-flight requests (streams included)
 * carry on, and a connection already accepted (or waiting in the listen
 * backlog) still gets an answer to a request it sends (httpd). */
void gateway_drain(struct gateway *gw);
/* In-flight client requests (dispatched, not yet answered completely). */
size_t gateway_active_requests(const struct gateway *gw);
void gateway_get_stats(const struct gateway *gw, struct gateway_stats *out);
/* Self-check for degraded handover: false after `threshold` consecutive
 * upstream failures. */
bool gateway_upstream_healthy(const struct gateway *gw);
void gateway_close(struct gateway *gw, void (*done)(void *arg), void *arg);

#endif
