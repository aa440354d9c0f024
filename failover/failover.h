/* failover: decides, on every node, whether it is the active node, and
 * answers the data plane's and the load balancer's questions accordingly.
 *
 * A node is active only while all hold (DESIGN.md, Fencing): it is the
 * Raft leader; its post-election barrier has committed; no leadership
 * transfer is under way; its lease is valid; its role is gateway; it is
 * not stalled (TILT); it is not draining. The lease is renewed by a barrier
 * committed every few heartbeats and runs to (submit time of the last
 * committed barrier) + election_timeout × lease_ratio on the monotonic
 * clock.
 *
 * One owner: the role table (failover/role.c) is the only source of the
 * role. failover_serve_mode, failover_health, failover_is_active,
 * failover_role, the metrics and the status all re-evaluate through it, so
 * a lapsed lease stops serving at the next request and every answer
 * matches the role_changed log lines.
 *
 * It also runs planned switchovers (drain, then leadership transfer), the
 * witness's immediate hand-off, failback to the preferred zone and the
 * degraded handover, skipping decisions while the loop has stalled.
 *
 * Failure modes: a barrier that fails just lets the lease lapse; a
 * transfer that fails or is refused ends the switchover with the node
 * active again (an aborted switchover is a legal move back).
 */
#ifndef ZG_FAILOVER_H
#define ZG_FAILOVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "gateway/gateway.h" /* enum gateway_serve_mode */

struct consensus;
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
/* The role now (re-evaluated, logged if it moved). */
enum failover_role failover_role(struct failover *f);
bool failover_is_active(struct failover *f);
uint64_t failover_lease_remaining_ms(const struct failover *f);
/* Adds role, lease and decision state to a status document. */
void failover_status_json(struct failover *f, struct cJSON *out);
/* The answers behind gateway_cluster.serve_mode and .health (node/ plugs
 * them into the gateway; gateway/gateway.h documents the contract). */
enum gateway_serve_mode failover_serve_mode(struct failover *f, bool forwarded, char *forward_to,
                                            size_t len);
int failover_health(struct failover *f, const char *check, struct cJSON *body);

/* Planned switchover: stop taking new work, wait for in-flight requests
 * (streams included) up to drain_timeout, transfer leadership to `to`
 * (NULL = best caught-up gateway, preferring the preferred zone). cb runs
 * once: status 0 when leadership moved. Only on the active node. Returns
 * CONSENSUS_EINVALID at once, nothing started, when `to` is not a voting
 * gateway member other than this node (failover_switchover_target_error
 * says why), CONSENSUS_EBUSY during another one, CONSENSUS_ENOTLEADER
 * when this node is not active. */
/* NULL if `to` can take leadership in a switchover, else why not: a
 * static string to put after the id ("is the witness: ..."). */
const char *failover_switchover_target_error(struct failover *f, const char *to);
int failover_switchover(struct failover *f, const char *to, const char *reason,
                        void (*cb)(void *ud, int status, const char *msg), void *ud);
/* Raft leadership, fencing or the applied state changed (consensus
 * event): re-evaluate now (lease, role, witness hand-off). */
void failover_on_leader_changed(struct failover *f);

void failover_close(struct failover *f, void (*done)(void *arg), void *arg);

#endif
