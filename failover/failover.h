/* failover: decides, on every node, whether it is the active node, and
 * answers the load balancer's health questions accordingly.
 *
 * A node is active only while all hold (DESIGN.md, Fencing): it is the
 * Raft leader; its post-election barrier has committed; no leadership
 * transfer is under way; its lease is valid; its role is gateway; its
 * self-check passes; it is not draining. The lease is renewed by a barrier
 * committed every few heartbeats and runs to (submit time of the last
 * committed barrier) + election_timeout × lease_ratio on the monotonic
 * clock. When it lapses the node stops serving at once: serve_mode() turns
 * to FORWARD/REFUSE on the next request, not only the health answer.
 *
 * It also runs planned switchovers (drain, then leadership transfer), the
 * witness's immediate handover, failback to the preferred zone and the
 * degraded handover, skipping decisions while the loop has stalled.
 *
 * Failure modes: a barrier that fails just lets the lease lapse; a
 * transfer that fails is logged and retried by the next decision.
 */
#ifndef ZG_FAILOVER_H
#define ZG_FAILOVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct consensus;
struct gateway;
struct gateway_cluster;
struct zg_config;
struct failover;
struct cJSON;

enum failover_role {
  FAILOVER_UNAVAILABLE,
  FAILOVER_CANDIDATE,       /* electing, or no leader known */
  FAILOVER_STANDBY,         /* follower that knows the leader */
  FAILOVER_LEADER_UNFENCED, /* raft leader without a valid lease yet */
  FAILOVER_ACTIVE,
  FAILOVER_DRAINING, /* planned handover under way */
  FAILOVER_WITNESS,
};
const char *failover_role_name(enum failover_role role);

int failover_start(uv_loop_t *loop, struct consensus *consensus, struct gateway *gateway,
                   const struct zg_config *cfg, struct failover **out, char *errmsg, size_t errlen);
/* Live config (failback, preferred zone, lease ratio, max_lag). Borrowed. */
void failover_apply_config(struct failover *f, const struct zg_config *cfg);
/* The callbacks the gateway uses for serve/forward and health answers. */
const struct gateway_cluster *failover_gateway_hooks(struct failover *f);
enum failover_role failover_role(const struct failover *f);
bool failover_is_active(const struct failover *f);
uint64_t failover_lease_remaining_ms(const struct failover *f);
/* Adds role, lease and decision state to a status document. */
void failover_status_json(const struct failover *f, struct cJSON *out);

/* Planned switchover: stop taking new work, wait for in-flight requests
 * (streams included) up to drain_timeout, transfer leadership to `to`
 * (NULL = best caught-up gateway, preferring the preferred zone). cb runs
 * once: status 0 when leadership moved. Only on the active node. */
int failover_switchover(struct failover *f, const char *to, const char *reason,
                        void (*cb)(void *ud, int status, const char *msg), void *ud);
/* Raft leadership or fencing changed (consensus event): re-evaluate now. */
void failover_on_leader_changed(struct failover *f);
/* Drill fault injection (only with drills.enabled; checked by caller):
 * freeze the loop for ms; drop all Raft peer traffic for ms. */
void failover_drill_freeze(struct failover *f, unsigned ms);

void failover_close(struct failover *f, void (*done)(void *arg), void *arg);

/* Alert engine (failover/alerts.c): rules, channels, delivery. Node-level
 * rules run on every node, cluster-wide ones on the active node only.
 *
 * alerts_start: starts the engine on `loop` with default rules and no
 * channels (call alerts_apply_config with the replicated "alerts" section
 * next). node_id is copied; cs, fo and gw are borrowed and must outlive the
 * engine; cs and fo may be NULL (standalone: only node-level rules and the
 * 5xx rule run, and this node counts as active); gw may be NULL (no 5xx
 * rule). Returns 0 and *out, or -1 with a message in errmsg.
 * alerts_validate: checks an "alerts" section strictly (unknown keys
 * rejected); -1 with a message naming the JSON path. NULL is valid.
 * alerts_apply_config: applies a section live (copied). NULL = defaults,
 * no channels; an invalid section is logged and the running one kept.
 * alerts_status_json: adds "alerts": {firing, recent_deliveries, channels,
 * pending_deliveries} to `out`; no secrets.
 * alerts_close: stops evaluating, cancels queued and retrying deliveries,
 * waits for running ones (bounded by their curl timeout), frees
 * everything, then calls done(arg) from the loop. */
struct alerts;
int alerts_start(uv_loop_t *loop, const char *node_id, struct consensus *cs, struct failover *fo,
                 struct gateway *gw, struct alerts **out, char *errmsg, size_t errlen);
/* Node-level rule tls_cert_expiry (rules.tls_cert_expiry_days, default 14,
 * 0 off): fires while the PEM certificate at `path` ("node", "ca",
 * "gateway") is that close to its notAfter. Up to 4. */
void alerts_watch_cert(struct alerts *a, const char *name, const char *path);
int alerts_validate(const struct cJSON *alerts_section, char *err, size_t errlen);
void alerts_apply_config(struct alerts *a, const struct cJSON *alerts_section);
void alerts_status_json(const struct alerts *a, struct cJSON *out);
void alerts_close(struct alerts *a, void (*done)(void *), void *arg);

#endif
