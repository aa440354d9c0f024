/* serve.c: `zonegate serve --config FILE`, the node's lifecycle.
 *
 * Start ladder (each step undone on failure of a later one, dqlite-style):
 * load config → logging → data dir → bootstrap token (when the config has
 * no auth section) → gateway on the client port → signals. Then the uv loop
 * runs until a signal stops it.
 *
 * Signals: SIGTERM/SIGINT drain (stop accepting, let in-flight requests
 * and streams finish up to drain_timeout) and exit 0. The active node of a
 * cluster hands over first, at once (bounded by 5 election timeouts): its
 * requests in flight finish here while the new active takes new ones, and
 * their usage counts reach the leader through node_usage_relay. A gateway node of a cluster then
 * announces the drain (every health endpoint answers 503) and keeps accepting for
 * DRAIN_ANNOUNCE_MS, so the load balancer stops choosing it before its
 * listener closes: every request that reached it gets an answer. The whole
 * shutdown is bounded by drain_timeout from the first signal, whatever the
 * handover does (a node that cannot hand over, e.g. every node stopped at
 * once, still exits), plus SHUTDOWN_FLUSH_BOUND_MS for the last usage
 * counts. SIGHUP re-reads the
 * config file: a valid file is applied live, an invalid one is logged and
 * the node keeps running on the old config.
 *
 * Failure modes: a bad config, an unusable data dir or a port in use print
 * one clear line to stderr (and the log) and exit 1.
 */
#include "alerts/alerts.h"
#include "base/base.h"
#include "config/config.h"
#include "consensus/consensus.h"
#include "failover/failover.h"
#include "gateway/gateway.h"
#include "httpd/httpd.h"
#include "node/internal.h"
#include "node/node.h"
#include "upstream/upstream.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#define DRAIN_POLL_MS 50
#define SHUTDOWN_FLUSH_BOUND_MS 1000
/* How long a draining gateway node keeps accepting after its health
 * answers turned 503: deploy/haproxy.cfg marks a server down after
 * fall 2 checks at inter/fastinter 100 ms, so 3 x 200 ms covers it with a
 * check in flight and scheduling delay. */
#define DRAIN_ANNOUNCE_MS 600

static enum { CORES_DISABLED, CORES_ALLOWED, CORES_DISABLE_FAILED } core_state;
static int core_errno;

void node_disable_core_dumps(void) {
  const char *allow = getenv("ZONEGATE_ALLOW_CORE_DUMPS");
  if (allow && !strcmp(allow, "1")) {
    core_state = CORES_ALLOWED;
    return;
  }
  struct rlimit none = {0, 0};
  if (setrlimit(RLIMIT_CORE, &none) != 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    core_state = CORES_DISABLE_FAILED;
    core_errno = errno;
    return;
  }
  core_state = CORES_DISABLED;
}

void node_log_core_dump_state(void) {
  if (core_state == CORES_DISABLED)
    zg_log(ZG_INFO, "core_dumps_disabled",
           "core dumps are disabled (not dumpable, RLIMIT_CORE 0): a crash leaves no memory image "
           "with the master key, cluster secret, admin token or provider keys");
  else if (core_state == CORES_ALLOWED)
    zg_log(ZG_WARN, "core_dumps_allowed",
           "ZONEGATE_ALLOW_CORE_DUMPS=1: core dumps are left on; a core file holds every secret "
           "this node knows: delete it after debugging and unset the variable");
  else
    zg_log(ZG_WARN, "core_dumps_not_disabled", "could not disable core dumps: %s",
           strerror(core_errno));
}

static void log_warning(void *ud, const char *path, const char *msg) {
  zg_log(ZG_WARN, "config_warning", "%s: %s: %s", (const char *)ud, path, msg);
}

static int mkdir_p(const char *path, mode_t mode) {
  char tmp[512];
  snprintf(tmp, sizeof(tmp), "%s", path);
  for (char *p = tmp + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -1;
    *p = '/';
  }
  if (mkdir(tmp, mode) != 0 && errno != EEXIST) return -1;
  return 0;
}

/* With no auth section, the first start creates one client token, writes
 * it to <data_dir>/bootstrap-token (0600) and logs the path, never the
 * token. Later starts reuse the file. */
static int bootstrap_token(struct node *n, char sha256_hex[65]) {
  char path[600];
  snprintf(path, sizeof(path), "%s/bootstrap-token", n->cfg->data_dir);
  char *token = NULL;
  char spec[620], err[256];
  snprintf(spec, sizeof(spec), "file:%s", path);
  if (access(path, F_OK) == 0 && zg_secret_resolve(spec, &token, NULL, err, sizeof(err)) != 0)
    token = NULL; /* empty or unreadable: a new token replaces it */
  bool created = false;
  if (!token) {
    token = zg_random_token("zg-");
    if (!token) return -1;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
      zg_secret_free(token);
      fprintf(stderr, "error: cannot write %s: %s\n", path, strerror(errno));
      return -1;
    }
    size_t len = strlen(token);
    bool ok = write(fd, token, len) == (ssize_t)len && write(fd, "\n", 1) == 1 && fsync(fd) == 0;
    close(fd);
    if (!ok) {
      zg_secret_free(token);
      fprintf(stderr, "error: cannot write %s\n", path);
      return -1;
    }
    created = true;
  }
  zg_sha256_hex(token, strlen(token), sha256_hex);
  zg_secret_free(token);
  zg_log(ZG_WARN, "bootstrap_token",
         "config has no \"auth\" section: client requests need the bootstrap token %s in %s "
         "(send it as \"Authorization: Bearer <token>\"; read it with: cat %s)",
         created ? "just created" : "stored", path, path);
  return 0;
}

static void on_part_closed(void *arg) {
  struct node *n = arg;
  if (--n->closing_parts == 0) uv_stop(n->loop);
}

static void close_parts(struct node *n);

static void close_handles_and_parts(struct node *n) {
  if (n->closing_started) return;
  n->closing_started = true;
  uv_timer_stop(&n->drain_timer);
  uv_close((uv_handle_t *)&n->sigterm, NULL);
  uv_close((uv_handle_t *)&n->sigint, NULL);
  uv_close((uv_handle_t *)&n->sighup, NULL);
  uv_close((uv_handle_t *)&n->drain_timer, NULL);
  if (n->drill_timer.data) uv_close((uv_handle_t *)&n->drill_timer, NULL);
  close_parts(n);
}

static void on_shutdown_flushed(void *arg) {
  close_handles_and_parts(arg);
}

static void on_shutdown_flush_timeout(uv_timer_t *t) {
  zg_log(ZG_WARN, "usage_flush_slow",
         "usage counts not written within %u ms of shutdown; exiting without them",
         SHUTDOWN_FLUSH_BOUND_MS);
  close_handles_and_parts(t->data);
}

/* Drained: the usage counts not yet written go through Raft (a one-voter
 * cluster, or an active node whose handover failed), bounded by
 * SHUTDOWN_FLUSH_BOUND_MS so a stuck write never holds the exit. */
static void finish_shutdown(struct node *n) {
  if (n->closing_started || n->flushing_for_exit) return;
  uv_timer_stop(&n->drain_timer);
  size_t left = n->gateway ? gateway_active_requests(n->gateway) : 0;
  if (left > 0)
    zg_log(ZG_WARN, "drain_timeout",
           "drain_timeout reached with %zu requests still in flight; closing them", left);
  else
    zg_log(ZG_INFO, "drained", "all in-flight requests finished");
  if (!n->consensus || !n->gateway) {
    close_handles_and_parts(n);
    return;
  }
  n->flushing_for_exit = true;
  uv_timer_start(&n->drain_timer, on_shutdown_flush_timeout, SHUTDOWN_FLUSH_BOUND_MS, 0);
  gateway_flush_usage(n->gateway, on_shutdown_flushed, n);
}

/* Asks every running part to close; uv_stop() once all have. Also used
 * when start fails half-way (then the caller runs the loop). */
static void close_parts(struct node *n) {
  n->closing_parts = 1;       /* released below, after every part was asked to close */
  node_usage_relay_cancel(n); /* before the admin client that carries it closes */
  if (n->alerts) {            /* first: it borrows consensus, failover and gateway */
    n->closing_parts++;
    alerts_close(n->alerts, on_part_closed, n);
    n->alerts = NULL;
  }
  if (n->failover) {
    n->closing_parts++;
    failover_close(n->failover, on_part_closed, n);
  }
  if (n->consensus) {
    n->closing_parts++;
    consensus_close(n->consensus, on_part_closed, n);
  }
  if (n->admin) {
    n->closing_parts++;
    httpd_close(n->admin, on_part_closed, n);
  }
  if (n->admin_client) {
    n->closing_parts++;
    upstream_client_close(n->admin_client, on_part_closed, n);
  }
  if (n->gateway) {
    n->closing_parts++;
    gateway_close(n->gateway, on_part_closed, n);
  }
  on_part_closed(n);
}

static void on_drain_tick(uv_timer_t *t) {
  struct node *n = t->data;
  if (gateway_active_requests(n->gateway) == 0 || zg_mono_ms() >= n->drain_deadline_ms)
    finish_shutdown(n);
}

static void stop_accepting(struct node *n) {
  n->announcing = false;
  zg_log(ZG_INFO, "draining", "stopped accepting; waiting up to %llu ms for %zu in-flight requests",
         (unsigned long long)(n->drain_deadline_ms > zg_mono_ms()
                                  ? n->drain_deadline_ms - zg_mono_ms()
                                  : 0),
         gateway_active_requests(n->gateway));
  gateway_drain(n->gateway);
  if (n->admin) httpd_stop_accepting(n->admin);
  uv_timer_start(&n->drain_timer, on_drain_tick, 0, DRAIN_POLL_MS);
}

static void on_announce_done(uv_timer_t *t) {
  stop_accepting(t->data);
}

static void begin_drain(struct node *n, const char *why) {
  n->draining = true;
  uint64_t now = zg_mono_ms();
  n->drain_deadline_ms = n->stop_deadline_ms > now ? n->stop_deadline_ms : now;
  uv_timer_stop(&n->drain_timer);
  bool behind_lb = n->consensus && n->failover && strcmp(n->cfg->role, "witness") != 0;
  uint64_t announce = n->drain_deadline_ms - now;
  if (announce > DRAIN_ANNOUNCE_MS) announce = DRAIN_ANNOUNCE_MS;
  if (behind_lb && announce > 0) {
    /* Health turns 503 now; the listener stays open until the LB noticed. */
    n->announcing = true;
    zg_log(ZG_INFO, "drain_announced",
           "%s: health answers 503 (draining); still accepting for %llu ms so the load balancer "
           "stops sending here first",
           why, (unsigned long long)announce);
    gateway_announce_drain(n->gateway);
    uv_timer_start(&n->drain_timer, on_announce_done, announce, 0);
    return;
  }
  zg_log(ZG_INFO, "drain_begins", "%s", why);
  stop_accepting(n);
}

/* How long SIGTERM waits for the handover before draining without it:
 * the transfer starts at once and libraft gives each attempt one election
 * timeout (up to 3 attempts, failover/role.c), so 5 election timeouts
 * cover it; never more than drain_timeout, the bound of the whole exit. */
static uint64_t handover_bound_ms(const struct zg_config *cfg) {
  uint64_t bound = 5ull * cfg->election_timeout_ms;
  return bound < cfg->drain_timeout_ms ? bound : cfg->drain_timeout_ms;
}

/* The handover did not finish by its bound (its transfer callback may
 * never come, e.g. when every node is stopping at once): drain and exit
 * anyway. */
static void on_switch_watchdog(uv_timer_t *t) {
  struct node *n = t->data;
  if (!n->switching_over) return;
  n->switching_over = false;
  zg_log(ZG_WARN, "shutdown_switchover_timeout",
         "no handover within %llu ms; draining and exiting without it",
         (unsigned long long)handover_bound_ms(n->cfg));
  begin_drain(n, "SIGTERM (handover timed out)");
}

static void on_shutdown_switchover(void *ud, int status, const char *msg) {
  struct node *n = ud;
  if (!n->switching_over) return; /* timed out (or a second signal): already draining */
  n->switching_over = false;
  if (status != 0)
    zg_log(ZG_WARN, "shutdown_switchover_failed", "handover before shutdown failed: %s", msg);
  begin_drain(n, status != 0 ? "SIGTERM (handover failed)" : "SIGTERM (after handover)");
}

static void on_stop_signal(uv_signal_t *s, int signum) {
  struct node *n = s->data;
  if (n->switching_over) {
    zg_log(ZG_WARN, "shutdown_forced", "second signal during the handover: draining now");
    n->switching_over = false;
    begin_drain(n, "second signal");
    return;
  }
  if (n->draining) {
    zg_log(ZG_WARN, "shutdown_forced", "second %s: exiting now",
           signum == SIGINT ? "SIGINT" : "SIGTERM");
    close_handles_and_parts(n);
    return;
  }
  n->stop_deadline_ms = zg_mono_ms() + n->cfg->drain_timeout_ms;
  /* The active node of a cluster hands over first (planned switchover:
   * in-flight requests finish, leadership moves), then drains what is
   * left (requests it forwarded) and exits. */
  if (n->failover && failover_is_active(n->failover) &&
      failover_switchover(n->failover, NULL, "shutdown (SIGTERM)", on_shutdown_switchover, n) ==
          0) {
    n->switching_over = true;
    uv_timer_start(&n->drain_timer, on_switch_watchdog, handover_bound_ms(n->cfg), 0);
    return;
  }
  begin_drain(n, signum == SIGINT ? "SIGINT" : "SIGTERM");
}

static void on_sighup(uv_signal_t *s, int signum) {
  struct node *n = s->data;
  char err[1024];
  struct zg_config *fresh = zg_config_load(n->cfg->path, err, sizeof(err));
  if (!fresh) {
    zg_log(ZG_ERROR, "config_reload_rejected", "SIGHUP: keeping the running config: %s", err);
    return;
  }
  if (strcmp(fresh->listen_gateway, n->cfg->listen_gateway) != 0 ||
      strcmp(fresh->node_id, n->cfg->node_id) != 0 ||
      strcmp(fresh->data_dir, n->cfg->data_dir) != 0)
    zg_log(ZG_WARN, "config_reload_partial",
           "SIGHUP: node, listen and cluster changes need a restart; applying the rest");
  zg_config_warnings(fresh, log_warning, fresh->path);
  if (n->consensus) {
    /* Gateway behaviour is replicated: the file only seeds a new cluster.
     * Changes go through `zonegate config apply`. */
    zg_log(ZG_INFO, "config_reload_local",
           "SIGHUP: this node is in a cluster; replicated sections change with `zonegate config "
           "apply FILE`");
    zg_config_free(n->cfg);
    n->cfg = fresh;
    n->applied_config_version = 0;
    node_cluster_apply_replicated(n);
    return;
  }
  gateway_apply_config(n->gateway, fresh);
  if (n->alerts)
    alerts_apply_config(n->alerts, cJSON_GetObjectItemCaseSensitive(fresh->effective, "alerts"));
  zg_log_set_level(!strcmp(fresh->log_level, "debug")   ? ZG_DEBUG
                   : !strcmp(fresh->log_level, "warn")  ? ZG_WARN
                   : !strcmp(fresh->log_level, "error") ? ZG_ERROR
                                                        : ZG_INFO);
  zg_config_free(n->cfg);
  n->cfg = fresh;
  zg_log(ZG_INFO, "config_reloaded", "SIGHUP: applied %s live", fresh->path);
}

/* A start that failed after the loop had parts: one line on stderr and in
 * the log, every part closed (the loop runs until they are), secrets
 * wiped. Returns the exit code (1). */
static int start_failed(struct node *n, const char *err) {
  fprintf(stderr, "error: %s\n", err);
  zg_log(ZG_ERROR, "start_failed", "%s", err);
  close_parts(n);
  uv_run(n->loop, UV_RUN_DEFAULT);
  zg_secret_free(n->admin_token);
  OPENSSL_cleanse(n->forward_key, sizeof(n->forward_key));
  OPENSSL_cleanse(n->hooks.forward_key, sizeof(n->hooks.forward_key));
  node_tls_free(n);
  zg_config_free(n->cfg);
  return 1;
}

int node_serve(int argc, char **argv) {
  const char *config_path = "/app/config.json";
  for (int i = 1; i < argc; i++) {
    if ((!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c")) && i + 1 < argc)
      config_path = argv[++i];
    else if (!strncmp(argv[i], "--config=", 9))
      config_path = argv[i] + 9;
    else {
      fprintf(stderr, "usage: zonegate serve --config FILE\n");
      return 2;
    }
  }
  struct node n = {0};
  char err[1024];
  n.cfg = zg_config_load(config_path, err, sizeof(err));
  if (!n.cfg) {
    fprintf(stderr, "error: %s\n", err);
    return 1;
  }
  zg_log_set_node(n.cfg->node_id);
  zg_log_set_level(!strcmp(n.cfg->log_level, "debug")   ? ZG_DEBUG
                   : !strcmp(n.cfg->log_level, "warn")  ? ZG_WARN
                   : !strcmp(n.cfg->log_level, "error") ? ZG_ERROR
                                                        : ZG_INFO);
  node_log_core_dump_state();
  zg_config_warnings(n.cfg, log_warning, (void *)config_path);
  struct stat st;
  if (mkdir_p(n.cfg->data_dir, 0700) == 0 && stat(n.cfg->data_dir, &st) == 0 &&
      !S_ISDIR(st.st_mode)) {
    fprintf(stderr, "error: %s: cluster.data_dir: expected a directory, found a file at %s\n",
            config_path, n.cfg->data_dir);
    zg_config_free(n.cfg);
    return 1;
  }
  if (mkdir_p(n.cfg->data_dir, 0700) != 0 || access(n.cfg->data_dir, W_OK) != 0) {
    fprintf(stderr, "error: %s: cluster.data_dir: cannot create or write %s: %s\n", config_path,
            n.cfg->data_dir, strerror(errno));
    zg_config_free(n.cfg);
    return 1;
  }
  char bootstrap_hash[65] = "";
  if (!strcmp(n.cfg->auth_mode, "bootstrap") && bootstrap_token(&n, bootstrap_hash) != 0) {
    zg_config_free(n.cfg);
    return 1;
  }

  n.loop = uv_default_loop();
  if (gateway_start(n.loop, n.cfg, &n.gateway, err, sizeof(err)) != 0) {
    fprintf(stderr, "error: %s\n", err);
    zg_log(ZG_ERROR, "start_failed", "%s", err);
    uv_run(n.loop, UV_RUN_DEFAULT); /* lets the half-started gateway close */
    zg_config_free(n.cfg);
    return 1;
  }
  if (bootstrap_hash[0]) gateway_add_token(n.gateway, "bootstrap", bootstrap_hash);
  int tls_rc = node_tls_setup(&n, err, sizeof(err));
  if (tls_rc == 0 && n.tls_gateway) gateway_set_tls(n.gateway, n.tls_gateway);
  if (tls_rc != 0 || node_cluster_start(&n, err, sizeof(err)) != 0 ||
      node_admin_start(&n, err, sizeof(err)) != 0 ||
      alerts_start(n.loop, n.cfg->node_id, n.consensus, n.failover, n.gateway, &n.alerts, err,
                   sizeof(err)) != 0) {
    return start_failed(&n, err);
  }
  node_tls_start(&n);
  /* /metrics: on listen.metrics when set (a bind failure is fatal), else on
   * the admin port (admin.c); with no admin API running (standalone, or no
   * admin token) a metrics-only listener takes listen.admin's address. */
  if (n.cfg->listen_metrics[0] || !n.admin) {
    const char *addr = n.cfg->listen_metrics[0] ? n.cfg->listen_metrics : n.cfg->listen_admin;
    if (gateway_metrics_listen(n.gateway, addr, err, sizeof(err)) != 0) {
      if (n.cfg->listen_metrics[0]) {
        return start_failed(&n, err);
      }
      zg_log(ZG_WARN, "metrics_unavailable", "no /metrics on this node: %s (listen.admin)", err);
    }
  }
  /* Replicated config in a cluster (it may have been applied before the
   * engine existed: apply it again, through the same filter for secret
   * references), the file's section when standalone. */
  if (n.consensus && consensus_config(n.consensus)) {
    n.applied_config_version = 0;
    node_cluster_apply_replicated(&n);
  } else {
    alerts_apply_config(n.alerts,
                        n.consensus ? NULL
                                    : cJSON_GetObjectItemCaseSensitive(n.cfg->effective, "alerts"));
  }

  uv_signal_init(n.loop, &n.sigterm);
  uv_signal_init(n.loop, &n.sigint);
  uv_signal_init(n.loop, &n.sighup);
  uv_timer_init(n.loop, &n.drain_timer);
  n.sigterm.data = n.sigint.data = n.sighup.data = &n;
  n.drain_timer.data = &n;
  uv_signal_start(&n.sigterm, on_stop_signal, SIGTERM);
  uv_signal_start(&n.sigint, on_stop_signal, SIGINT);
  uv_signal_start(&n.sighup, on_sighup, SIGHUP);
  signal(SIGPIPE, SIG_IGN);

  zg_log(ZG_INFO, "started",
         "zonegate %s serving on %s (endpoint: %s, auth: %s, upstream client: %s)", ZG_VERSION,
         n.cfg->listen_gateway, n.cfg->endpoint[0] ? n.cfg->endpoint : "(none)", n.cfg->auth_mode,
         n.cfg->upstream_client);
  uv_run(n.loop, UV_RUN_DEFAULT);
  /* Let close callbacks finish. */
  uv_run(n.loop, UV_RUN_NOWAIT);
  zg_secret_free(n.admin_token);
  OPENSSL_cleanse(n.forward_key, sizeof(n.forward_key));
  OPENSSL_cleanse(n.hooks.forward_key, sizeof(n.hooks.forward_key));
  node_tls_free(&n);
  zg_log(ZG_INFO, "stopped", "zonegate stopped");
  zg_config_free(n.cfg);
  return n.exit_code;
}
