/* alerts: the alert engine (DESIGN.md, Alerts; GUIDE.md
 * §4.2). A timer on the node's uv loop samples this node and the cluster
 * every eval_interval_ms, runs each rule's state machine, and sends every
 * change (firing, resolved, a repeat of a long-firing alert) to every
 * configured channel: webhook (JSON POST), SMS (JSON POST {"to","message"}
 * to an SMS gateway) and email (SMTP through libcurl).
 *
 * Rules. Node-level, sent by each node for itself:
 *   cpu            system-wide CPU busy % (all cores, /proc/stat deltas)
 *                  above cpu_percent for cpu_for_s;
 *   memory         memory used % above memory_percent for memory_for_s: the
 *                  cgroup limit when one is set (memory.current/memory.max),
 *                  else 1 - MemAvailable/MemTotal from /proc/meminfo;
 *   no_active      a non-witness node sees no active node (its role is not
 *                  active/draining/standby-with-a-leader) for no_active_for_s.
 * Cluster-wide, sent only by the active node (failover_is_active):
 *   error_ratio    gateway 5xx / requests over error_window_s above
 *                  error_ratio, with at least error_min_requests requests;
 *   leader_changed a notice (firing only, never resolved) when this node
 *                  becomes active;
 *   key_rotation   a provider key is older than its rotation period;
 *   key_invalid    a provider key is in state invalid (the upstream said 401).
 * A node that stops being active forgets its cluster-wide alerts without
 * sending "resolved": the new active re-evaluates and owns them.
 *
 * Delivery never blocks the loop nor uses libuv's shared threadpool (where
 * getaddrinfo for peer connections runs): each (alert change, channel) is
 * one libcurl easy handle on this engine's own curl multi, driven by the
 * loop (alerts/curl_uv.c: uv_poll per socket, one uv timer; curl resolves
 * names on its own threads). A dead SMTP server or webhook costs one
 * socket and a timer, never a worker. A failed attempt is retried after retry_base_ms ×
 * 2^(attempt-1) up to retry_max retries. Secrets in channel settings (URLs with tokens, header
 * values, SMTP password) may be env:NAME / file:PATH; they are resolved when the attempt starts and
 * never logged: log lines name the channel by index and type only.
 *
 * Failure modes: a channel that cannot be reached logs alert_delivery_failed
 * per attempt and gives up after retry_max; the alert state is unaffected.
 * An unreadable /proc file disables that rule's sample (logged once).
 */
#ifndef ZG_ALERTS_H
#define ZG_ALERTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct cJSON;
struct consensus;
struct failover;
struct gateway;

/* The engine's API. Rules, channels, delivery (see above). Node-level
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
 * alerts_close: stops evaluating, cancels every delivery (running or
 * waiting to retry) at once, closes its curl sockets and timers, frees
 * everything, then calls done(arg) from the loop. */
struct alerts;
int alerts_start(uv_loop_t *loop, const char *node_id, struct consensus *cs, struct failover *fo,
                 struct gateway *gw, struct alerts **out, char *errmsg, size_t errlen);
int alerts_validate(const struct cJSON *alerts_section, char *err, size_t errlen);
void alerts_apply_config(struct alerts *a, const struct cJSON *alerts_section);
void alerts_status_json(const struct alerts *a, struct cJSON *out);
/* Node-level rule tls_cert_expiry (rules.tls_cert_expiry_days, default 14,
 * 0 off): fires while the PEM certificate at `path` ("node", "ca",
 * "gateway") is that close to its notAfter. Up to 4; path is copied. */
void alerts_watch_cert(struct alerts *a, const char *name, const char *path);
void alerts_close(struct alerts *a, void (*done)(void *), void *arg);

/* ---- evaluation internals, exposed for unit tests ------------------- */

/* One alert key's state machine (rule + subject). Fed one sample per
 * evaluation: `condition` says whether the rule's threshold is crossed now. */
struct alert_state {
  bool condition;              /* last sample */
  uint64_t condition_since_ms; /* monotonic time the condition became true */
  bool firing;
  uint64_t fired_at_ms;  /* monotonic */
  uint64_t last_sent_ms; /* last firing notification (first or repeat) */
};

enum alert_transition {
  ALERT_NONE,
  ALERT_FIRE,    /* condition held for for_ms: send "firing" */
  ALERT_REPEAT,  /* still firing after repeat_after_ms: send "firing" again */
  ALERT_RESOLVE, /* condition cleared while firing: send "resolved" */
};

/* Advances `s` with one sample at now_ms. for_ms = how long the condition
 * must hold before firing (0: at once). repeat_after_ms = 0: never repeat. */
enum alert_transition alert_state_step(struct alert_state *s, bool condition, uint64_t now_ms,
                                       uint64_t for_ms, uint64_t repeat_after_ms);

/* Cumulative request counters sampled over time, to get the 5xx ratio of
 * the last window. The newest sample floats until it is window/SLOTS past
 * the one before, so the memory is fixed whatever the evaluation interval. */
#define ERROR_WINDOW_SLOTS 128
struct error_window {
  struct {
    uint64_t at_ms, total, errors;
  } samples[ERROR_WINDOW_SLOTS + 4];
  size_t head, count;
};
void error_window_reset(struct error_window *w);
void error_window_push(struct error_window *w, uint64_t now_ms, uint64_t window_ms, uint64_t total,
                       uint64_t errors);
/* Requests and 5xx answers counted in the last window_ms (since the newest
 * sample at or before now - window_ms, else the oldest kept). */
void error_window_delta(const struct error_window *w, uint64_t now_ms, uint64_t window_ms,
                        uint64_t *requests, uint64_t *errors);

/* The /proc parsers and the memory/CPU samples live in base/ (sysstat.c). */

#endif
