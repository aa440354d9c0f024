/* internal.h (private to gateway/): the gateway struct shared by its
 * files: router (gateway.c), chat proxy (chat.c), auth (auth.c), health
 * (health.c). */
#ifndef ZG_GATEWAY_INTERNAL_H
#define ZG_GATEWAY_INTERNAL_H

#include "base/base.h"
#include "config/config.h"
#include "gateway/accounting.h"
#include "gateway/cache.h"
#include "gateway/gateway.h"
#include "gateway/limiter.h"
#include "gateway/metrics.h"
#include "gateway/routes.h"
#include "upstream/upstream.h"
#include "httpd/httpd.h"

#include <cjson/cJSON.h>

#define GATEWAY_MAX_ENDPOINTS (1 + ZG_MAX_FALLBACKS)
/* Consecutive upstream failures after which the self-check fails. */
#define GATEWAY_UPSTREAM_FAILURE_THRESHOLD 5

struct gateway_endpoint {
  char base_url[512];
  char *api_key;        /* resolved secret, may be NULL */
  char upstream_id[64]; /* "default", "fallback-1", "<model>#1", ... */
};

struct gateway {
  uv_loop_t *loop;
  struct zg_config *cfg; /* private copy */
  const struct gateway_cluster *cluster;
  struct httpd_server *http;
  struct httpd_server *metrics_http;  /* listen.metrics, or NULL */
  struct zg_log_throttle forward_log; /* forward_auth_failed lines (ident.c) */
  struct upstream_client *upstream;
  struct limiter *limiter;
  struct rate_limiter *rate;
  struct response_cache *cache;
  struct metrics *metrics;
  struct gateway_endpoint endpoints[GATEWAY_MAX_ENDPOINTS];
  struct routes routes; /* the replicated models table (routes.h); empty = all to endpoints */
  char *routes_api_key; /* api_key resolved when there is no `endpoint` (routed, keyless) */
  size_t n_endpoints;
  zg_buf access_line;            /* reused for every access line */
  zg_buf upstream_header_lines;  /* reused by chat.c for each upstream attempt */
  zg_buf sse_scratch, sse_edit;  /* reused by chat.c when it reads usage from a stream */
  struct accounting *accounting; /* usage counters and limits; NULL = usage.enabled false */
  uv_timer_t usage_timer;        /* flushes accounting every usage.flush_ms */
  bool usage_timer_started;
  struct usage_ticket *usage_ticket; /* the usage.add write in flight (gateway.c) */
  struct usage_flush_waiter {
    void (*done)(void *arg);
    void *arg;
  } usage_waiters[4];
  size_t n_usage_waiters;
  struct metric_counter *m_tokens;
  char **model_labels; /* distinct models counted so far (chat.c usage_model_label) */
  size_t n_model_labels;
  struct {             /* provider keys a probe found good lately (chat.c) */
    char id[128];      /* "<upstream id>/<key id>" */
    uint64_t until_ms; /* monotonic; 0 = empty */
    bool good;         /* the probe said: good (true) or refused (false) */
  } key_good[16];
  size_t key_good_next;
  struct chat *chat_pool; /* finished chat requests kept for reuse (chat.c) */
  size_t chat_pool_count;
  /* metrics */
  struct metric_counter *m_requests;
  struct metric_histogram *m_latency;
  struct metric_histogram *m_upstream_latency;
  struct metric_histogram *m_ttfb;
  struct metric_counter *m_upstream_errors;
  struct metric_counter *m_auth_failures;
  /* health state */
  uv_timer_t loop_timer;
  uint64_t loop_expected_ms;
  uint64_t loop_lag_ms, loop_lag_max_ms;
  uint64_t last_loop_tick_ms;
  unsigned upstream_consecutive_failures;
  uint64_t upstream_last_ok_ms, upstream_last_error_ms;
  char upstream_last_error[128];
  uint64_t requests_total, requests_5xx;
  uint64_t started_ms;
  bool draining;
  struct {
    void (*collect)(void *ud, void *out);
    void *ud;
  } collectors[8];
  /* Standby -> active forwarding over mutual TLS (gateway_set_forward_tls):
   * files, and node/'s lookup of the active's admin address and node id. */
  bool forward_tls_on;
  char forward_ca[512], forward_cert[512], forward_key[512];
  int (*forward_resolve)(void *ud, const char *gateway_address, char *admin, size_t admin_len,
                         char *node, size_t node_len);
  void *forward_ud;
  size_t forwarded_active; /* requests forwarded to us, in flight on the admin listener */
  size_t n_collectors;
  char extra_token_name[64]; /* the bootstrap token created at first start */
  char extra_token_sha256[65];
  void (*close_done)(void *arg);
  void *close_arg;
  int closing_parts;
};

/* chat.c */
/* Any request under /v1/: route is its static route label (gateway.c). */
void gateway_handle_proxy(struct gateway *gw, struct httpd_req *req, const char *route);
void gateway_reload_endpoints(struct gateway *gw);
void gateway_free_endpoints(struct gateway *gw);
void gateway_free_chat_pool(struct gateway *gw);

/* auth.c: 0 = allowed (token filled when auth is on), else it answered. */
int gateway_authenticate(struct gateway *gw, struct httpd_req *req, struct gateway_token *token);
bool gateway_cidr_match(const char *cidr, const char *ip);
/* The token's limits (rpm, tpm, budgets; accounting.h) at admission: 0 =
 * admitted and counted, else it answered 429 naming the limit. */
int gateway_admit(struct gateway *gw, struct httpd_req *req, const struct gateway_token *token);

struct gateway_access;
/* ident.c: the client's address and whether another node forwarded the
 * request, decided once at entry (see ident.c). 0, or -1 after answering
 * 401 (a forwarding signature that does not verify). */
int gateway_identify(struct gateway *gw, struct httpd_req *req, struct gateway_access *a);
void gateway_ident_start(struct gateway *gw);
bool gateway_ip_trusted(const struct gateway *gw, const char *ip);
const char *gateway_client_ip(struct httpd_req *req);
bool gateway_request_forwarded(struct httpd_req *req);
/* The request came through a trusted load balancer (a PROXY header or
 * X-Forwarded-For from listen.trusted_proxies) and not from another node:
 * a refusal may close the connection for the LB to retry elsewhere. */
bool gateway_request_via_lb(struct httpd_req *req);
/* The X-Zonegate-Forward-Auth header line for a request forwarded with
 * these parts; -1 when this node has no forwarding key. */
int gateway_forward_sign(const struct gateway *gw, const char *method, const char *path,
                         const char *query, const char *client_ip, const char *body,
                         size_t body_len, char *line, size_t linelen);

/* health.c */
void gateway_handle_health(struct gateway *gw, struct httpd_req *req);
int gateway_health_start(struct gateway *gw);

/* gateway.c: per-request access-log state, written when httpd finishes
 * the request (see httpd_set_finish_hook). Strings are copied in, so the
 * record outlives whoever filled it; the line is formatted only when the
 * log level lets it through. */
struct gateway_access {
  const char *route; /* static string */
  bool noted;        /* chat.c filled the fields below */
  const char *cache; /* static string: "none", "miss", "hit" */
  bool stream;
  bool has_token;
  char token[64];
  bool has_upstream;
  char upstream[16];
  char key_id[48]; /* "" = none */
  unsigned attempts;
  char upstream_result[40];      /* "" = none */
  uint64_t upstream_us, ttfb_us; /* 0 = not written */
  char client_ip[64];            /* the client's address (ident.c) */
  bool forwarded;                /* a verified forward from another node */
  bool via_lb;                   /* see gateway_request_via_lb */
};
void gateway_access_route(struct httpd_req *req, const char *route);
/* The request's access record (NULL only when it could not be allocated). */
struct gateway_access *gateway_access_of(struct httpd_req *req);
void gateway_note_upstream(struct gateway *gw, bool ok, const char *error);

#endif
