/* internal.h (private to node/): the running node shared by serve.c,
 * cluster.c (consensus + failover wiring) and admin.c (admin API). */
#ifndef ZG_NODE_INTERNAL_H
#define ZG_NODE_INTERNAL_H

#include "config/config.h"
#include "gateway/gateway.h"

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

struct alerts;
struct consensus;
struct failover;
struct gateway;
struct httpd_server;
struct upstream_client;
struct usage_relay;
struct cJSON;

struct node {
  uv_loop_t *loop;
  struct zg_config *cfg; /* local file */
  struct gateway *gateway;
  struct consensus *consensus;          /* NULL in standalone mode */
  struct failover *failover;            /* NULL in standalone mode */
  struct alerts *alerts;                /* alert engine (alerts/alerts.h) */
  struct gateway_cluster hooks;         /* what the gateway asks the cluster (cluster.c) */
  struct httpd_server *admin;           /* NULL when no admin token is configured */
  struct upstream_client *admin_client; /* forwards admin writes to the leader */
  struct usage_relay *usage_relay;      /* usage counts on their way to the leader (admin.c) */
  char *admin_token;                    /* resolved secret */
  /* Signs and checks admin requests forwarded between nodes (derived from
   * the cluster secret; see admin.c). Wiped at exit. */
  uint8_t forward_key[32];
  bool have_forward_key;
  /* security.tls: mutual TLS between nodes. tls_peer requires a peer
   * certificate (Raft); tls_admin asks for one but also accepts the CLI
   * without (it brings the admin token). NULL: plaintext. */
  struct ssl_ctx_st *tls_peer, *tls_admin, *tls_gateway;
  uint64_t applied_config_version;
  uv_signal_t sigterm, sigint, sighup;
  uv_timer_t drain_timer;
  uint64_t drain_deadline_ms;
  uint64_t stop_deadline_ms; /* first stop signal + drain_timeout: the exit bound */
  bool draining;
  bool announcing;        /* health says draining; still accepting until the LB noticed */
  bool switching_over;    /* SIGTERM on the active: planned handover first */
  bool flushing_for_exit; /* drained; writing the last usage counts */
  bool closing_started;   /* handles and parts asked to close */
  bool literal_keys_seeded;
  uv_timer_t drill_timer; /* crash / freeze drills; data set once initialised */
  bool drill_crash;
  unsigned drill_freeze_ms;
  int exit_code;
  int closing_parts;
};

/* cluster.c: starts consensus and failover when the config asks for a
 * cluster (peers, or a master key for a one-voter cluster). 0 ok. */
int node_cluster_start(struct node *n, char *errmsg, size_t errlen);
/* The replicated config changed: rebuild the effective config and apply. */
void node_cluster_apply_replicated(struct node *n);
/* admin.c: admin API on listen.admin. 0 ok (or admin disabled). */
int node_admin_start(struct node *n, char *errmsg, size_t errlen);
/* admin.c: sends usage.add `args` (taken, always) to the leader's admin
 * API when this node is not the leader (see USAGE_RELAY_ROUTE there).
 * 0: sent; done(arg, committed) runs once later, from the loop (true once
 * the leader committed the counts; false: keep them for the next flush).
 * -1: not sent (no leader known, this node is the leader, no admin API or
 * forwarding key, a relay already under way, or out of memory); done is
 * not called. */
int node_usage_relay(struct node *n, struct cJSON *args, void (*done)(void *arg, bool committed),
                     void *arg);
/* Ends a relay under way (shutdown): its done runs now with false. */
void node_usage_relay_cancel(struct node *n);
/* tls.c: TLS contexts from security.tls / listen.gateway_tls (0 ok), the
 * certificate-expiry metrics, and their release at exit. */
int node_tls_setup(struct node *n, char *errmsg, size_t errlen);
void node_tls_start(struct node *n); /* metrics, forwarding over TLS */
void node_tls_free(struct node *n);
/* True when `id` is a member of the cluster (self included). */
bool node_is_member(const struct node *n, const char *id);

#endif
