/* cluster.c: wires consensus (the Raft group) and failover (the role) into
 * a running node, and answers the gateway's cluster questions
 * (gateway_cluster): client tokens and provider keys from the replicated
 * state, key.invalidate writes when the upstream refuses a key, serve mode
 * and health from failover; plus the raft and provider-key metrics.
 *
 * A node runs consensus when its config lists peers, or when it has a
 * master key (a one-voter cluster with the admin API). Otherwise it runs
 * standalone: the gateway with the file's settings, always active.
 *
 * Secrets: the cluster secret and master key are resolved here and only
 * handed to consensus. A literal provider key in the seed config is NOT
 * replicated as text: it is removed from the seeded config and added as a
 * sealed provider key instead, once, by the first leader.
 *
 * Failure modes: a missing or short secret, a master key that is not
 * base64 of 32 bytes, or a consensus start failure (corrupt data dir,
 * wrong master key) is one clear error; serve exits 1.
 */
#include "alerts/alerts.h"
#include "base/base.h"
#include "consensus/consensus.h"
#include "failover/failover.h"
#include "gateway/gateway.h"
#include "node/internal.h"

#include <cjson/cJSON.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool literal(const char *spec) {
  return spec[0] && strncmp(spec, "env:", 4) != 0 && strncmp(spec, "file:", 5) != 0;
}

static enum consensus_role role_of(const char *role) {
  return strcmp(role, "witness") == 0 ? CONSENSUS_WITNESS : CONSENSUS_GATEWAY;
}

struct foreign_ctx {
  uint64_t version;
};

static void warn_foreign_ref(void *ud, const char *path) {
  const struct foreign_ctx *f = ud;
  /* The path only: the value names a variable or a file. */
  zg_log(ZG_WARN, "replicated_secret_ref_ignored",
         "replicated config version %llu: %s: an \"env:\"/\"file:\" reference that this node's "
         "local config file does not hold at the same path is ignored; put the reference in each "
         "node's local file, or add the provider key with `zonegate keys add`",
         (unsigned long long)f->version, path);
}

void node_cluster_apply_replicated(struct node *n) {
  const cJSON *stored = consensus_config(n->consensus);
  uint64_t version = consensus_config_version(n->consensus);
  if (!stored || version == n->applied_config_version) return;
  /* Defence in depth: config apply refuses foreign references, but one
   * that reaches this node anyway (an older leader, another node's file)
   * is never resolved here. */
  struct foreign_ctx fctx = {version};
  cJSON *replicated = zg_config_without_foreign_refs(n->cfg, stored, warn_foreign_ref, &fctx);
  if (!replicated) return;
  char err[1024];
  struct zg_config *effective =
      zg_config_with_replicated(n->cfg, replicated, "replicated config", err, sizeof(err));
  if (!effective) {
    zg_log(ZG_ERROR, "replicated_config_rejected", "version %llu cannot be applied here: %s",
           (unsigned long long)version, err);
    cJSON_Delete(replicated);
    return;
  }
  gateway_apply_config(n->gateway, effective);
  if (n->failover) failover_apply_config(n->failover, effective);
  if (n->alerts)
    alerts_apply_config(n->alerts, cJSON_GetObjectItemCaseSensitive(replicated, "alerts"));
  n->applied_config_version = version;
  zg_log(ZG_INFO, "config_applied", "replicated config version %llu applied live",
         (unsigned long long)version);
  zg_config_free(effective);
  cJSON_Delete(replicated);
}

/* Literal provider keys from the file become sealed provider keys. */
static void on_seed_key_added(void *ud, int status, const char *errmsg, const cJSON *result) {
  if (status == 0)
    zg_log(ZG_INFO, "seed_key_added",
           "literal api_key from the config stored as a sealed provider key");
  else if (status != CONSENSUS_ECONFLICT)
    zg_log(ZG_WARN, "seed_key_failed", "could not store the config api_key as a provider key: %s",
           errmsg ? errmsg : consensus_strerror(status));
}

static void maybe_seed_literal_keys(struct node *n) {
  if (n->literal_keys_seeded || !consensus_is_leader(n->consensus)) return;
  const cJSON *cfg = consensus_config(n->consensus);
  if (!cfg) return;
  n->literal_keys_seeded = true;
  cJSON *keys = consensus_keys_json(n->consensus);
  bool have_keys = cJSON_GetArraySize(keys) > 0;
  cJSON_Delete(keys);
  if (have_keys) return;
  struct {
    const char *spec, *upstream;
  } literals[1 + ZG_MAX_FALLBACKS];
  size_t count = 0;
  if (literal(n->cfg->api_key))
    literals[count++] = (typeof(literals[0])){n->cfg->api_key, "default"};
  static char ids[ZG_MAX_FALLBACKS][16];
  for (size_t i = 0; i < n->cfg->n_fallbacks; i++)
    if (literal(n->cfg->fallbacks[i].api_key)) {
      snprintf(ids[i], sizeof(ids[i]), "fallback-%u", (unsigned)(i + 1) % 100u);
      literals[count++] = (typeof(literals[0])){n->cfg->fallbacks[i].api_key, ids[i]};
    }
  for (size_t i = 0; i < count; i++) {
    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "upstream", literals[i].upstream);
    cJSON_AddStringToObject(args, "secret", literals[i].spec);
    consensus_write(n->consensus, "key.add", args, "bootstrap", "config file", on_seed_key_added,
                    n);
  }
}

static void on_consensus_event(void *ud, enum consensus_event ev) {
  struct node *n = ud;
  /* Events can fire from inside consensus_start() (a snapshot restored at
   * start-up); the state is applied once start returns. */
  if (!n->consensus) return;
  switch (ev) {
  case CONSENSUS_EV_CONFIG_CHANGED:
  case CONSENSUS_EV_STATE_APPLIED:
    node_cluster_apply_replicated(n);
    maybe_seed_literal_keys(n);
    /* The seed's commit is what a witness leader waits for to hand off. */
    if (n->failover) failover_on_leader_changed(n->failover);
    break;
  case CONSENSUS_EV_LEADER_CHANGED:
    if (n->failover) failover_on_leader_changed(n->failover);
    maybe_seed_literal_keys(n);
    break;
  case CONSENSUS_EV_DISK_ERROR:
    zg_log(ZG_ERROR, "disk_error",
           "the Raft log cannot be written; this node stops serving as active");
    break;
  default:
    break;
  }
}

/* ---- the gateway's cluster hooks ------------------------------------- */

static bool hook_token_lookup(void *ud, const char sha256_hex[65], struct gateway_token *out) {
  struct node *n = ud;
  struct consensus_token_view v;
  if (!consensus_token_lookup(n->consensus, sha256_hex, &v)) return false;
  snprintf(out->id, sizeof(out->id), "%s", v.id);
  snprintf(out->name, sizeof(out->name), "%s", v.name);
  out->expires_at_ms = v.expires_at;
  out->rpm = v.rpm;
  out->tpm = v.tpm;
  out->budget_day = v.budget_day;
  out->budget_month = v.budget_month;
  out->n_allow = 0;
  for (size_t i = 0; i < v.n_allow && i < ZG_ARRAY_LEN(out->allow); i++)
    snprintf(out->allow[out->n_allow++], sizeof(out->allow[0]), "%s", v.allow[i]);
  return true;
}

static size_t hook_usable_keys(void *ud, const char *upstream, struct gateway_key *out,
                               size_t max) {
  struct node *n = ud;
  struct consensus_key_use keys[16];
  if (max > ZG_ARRAY_LEN(keys)) max = ZG_ARRAY_LEN(keys);
  size_t count = consensus_usable_keys(n->consensus, upstream, keys, max);
  for (size_t i = 0; i < count; i++) {
    snprintf(out[i].id, sizeof(out[i].id), "%.47s", keys[i].id);
    out[i].secret = keys[i].secret;
  }
  return count;
}

static bool hook_key_by_id(void *ud, const char *id, struct gateway_key *out) {
  struct node *n = ud;
  struct consensus_key_use k;
  if (!consensus_key_by_id(n->consensus, id, &k)) return false;
  snprintf(out->id, sizeof(out->id), "%.47s", k.id);
  out->secret = k.secret;
  return true;
}

static void hook_usage_view(void *ud, const char *token, uint64_t now_s,
                            struct gateway_usage_view *out) {
  struct node *n = ud;
  struct consensus_usage_view v;
  consensus_usage_view(n->consensus, token, now_s, &v);
  *out = (struct gateway_usage_view){v.minute_requests, v.minute_tokens, v.minute_oldest_s,
                                     v.day_tokens, v.month_tokens};
}

/* One usage.add write. The gateway's done runs exactly once and never
 * before usage_write returns: a write refused at once (not the leader,
 * shutting down) answers from a zero timer. */
struct usage_write {
  void (*done)(void *arg, bool committed);
  void *arg;
  bool returned, committed;
  uv_timer_t timer;
};

static void usage_write_free(uv_handle_t *h) {
  free(h->data);
}

static void usage_write_later(uv_timer_t *t) {
  struct usage_write *w = t->data;
  w->done(w->arg, w->committed);
  uv_close((uv_handle_t *)&w->timer, usage_write_free);
}

static void on_usage_written(void *ud, int status, const char *errmsg, const cJSON *result) {
  struct usage_write *w = ud;
  w->committed = status == 0;
  if (status != 0 && status != CONSENSUS_ENOTLEADER && status != CONSENSUS_ESHUTDOWN)
    zg_log(ZG_WARN, "usage_write_failed", "usage.add: %s",
           errmsg ? errmsg : consensus_strerror(status));
  if (w->returned) {
    w->done(w->arg, w->committed);
    uv_close((uv_handle_t *)&w->timer, usage_write_free);
  } else {
    uv_timer_start(&w->timer, usage_write_later, 0, 0);
  }
}

static void on_usage_relayed(void *ud, bool committed) {
  struct usage_write *w = ud;
  w->committed = committed;
  w->done(w->arg, w->committed);
  uv_close((uv_handle_t *)&w->timer, usage_write_free);
}

static void hook_usage_write(void *ud, cJSON *args, void (*done)(void *arg, bool committed),
                             void *arg) {
  struct node *n = ud;
  struct usage_write *w = calloc(1, sizeof(*w));
  if (!w) {
    /* no memory for a timer: answer now (the counts go back, sent again) */
    cJSON_Delete(args);
    zg_log(ZG_ERROR, "usage_write_failed", "out of memory");
    done(arg, false);
    return;
  }
  w->done = done;
  w->arg = arg;
  uv_timer_init(n->loop, &w->timer);
  w->timer.data = w;
  /* Not the leader (requests that began here before a handover, or the
   * shutdown flush of a former active): the leader writes them. */
  if (!consensus_is_leader(n->consensus)) {
    if (node_usage_relay(n, args, on_usage_relayed, w) != 0)
      uv_timer_start(&w->timer, usage_write_later, 0, 0); /* not sent: kept (committed false) */
    w->returned = true;
    return;
  }
  consensus_write(n->consensus, "usage.add", args, "gateway", n->cfg->node_id, on_usage_written, w);
  w->returned = true;
}

static void on_key_invalidated(void *ud, int status, const char *errmsg, const cJSON *result) {
  if (status != 0)
    zg_log(ZG_WARN, "key_invalidate_failed", "%s", errmsg ? errmsg : consensus_strerror(status));
}

/* The upstream answered 401 with this key: mark it invalid cluster-wide. */
static void hook_key_rejected(void *ud, const char *key_id, const char *upstream) {
  struct node *n = ud;
  cJSON *args = cJSON_CreateObject();
  cJSON_AddStringToObject(args, "id", key_id);
  cJSON_AddStringToObject(args, "reason", "upstream answered 401");
  consensus_write(n->consensus, "key.invalidate", args, "gateway", n->cfg->node_id,
                  on_key_invalidated, n);
}

static enum gateway_serve_mode hook_serve_mode(void *ud, bool forwarded, char *forward_to,
                                               size_t len) {
  struct node *n = ud;
  return failover_serve_mode(n->failover, forwarded, forward_to, len);
}

static int hook_health(void *ud, const char *check, cJSON *body) {
  struct node *n = ud;
  return failover_health(n->failover, check, body);
}

/* /metrics: raft progress and provider keys, for the Prometheus rules in
 * deploy/prometheus/alerts.yml (the role and lease are failover's). */
static void collect_cluster_metrics(void *ud, void *out_buf) {
  struct node *n = ud;
  zg_buf *out = out_buf;
  zg_buf_appendf(
      out,
      "# HELP zonegate_raft_term Current Raft term\n# TYPE zonegate_raft_term "
      "gauge\nzonegate_raft_term %llu\n"
      "# HELP zonegate_raft_commit_index Raft commit index\n# TYPE zonegate_raft_commit_index "
      "gauge\n"
      "zonegate_raft_commit_index %llu\n"
      "# HELP zonegate_raft_applied_index Raft applied index\n# TYPE zonegate_raft_applied_index "
      "gauge\n"
      "zonegate_raft_applied_index %llu\n",
      (unsigned long long)consensus_term(n->consensus),
      (unsigned long long)consensus_commit_index(n->consensus),
      (unsigned long long)consensus_applied_index(n->consensus));
  cJSON *keys = consensus_keys_json(n->consensus);
  static const char *const states[] = {"active", "retiring", "revoked", "invalid"};
  int counts[4] = {0, 0, 0, 0};
  zg_buf_appendf(out, "# HELP zonegate_provider_key_age_days Age of each provider key\n"
                      "# TYPE zonegate_provider_key_age_days gauge\n");
  const cJSON *k;
  cJSON_ArrayForEach(k, keys) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(k, "id");
    const cJSON *up = cJSON_GetObjectItemCaseSensitive(k, "upstream");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(k, "state");
    const cJSON *age = cJSON_GetObjectItemCaseSensitive(k, "age_days");
    if (!cJSON_IsString(id) || !cJSON_IsString(up) || !cJSON_IsString(state)) continue;
    for (int i = 0; i < 4; i++)
      if (!strcmp(state->valuestring, states[i])) counts[i]++;
    if (!strcmp(state->valuestring, "revoked")) continue;
    zg_buf_appendf(out, "zonegate_provider_key_age_days{upstream=\"%s\",key_id=\"%s\"} %g\n",
                   up->valuestring, id->valuestring, cJSON_IsNumber(age) ? age->valuedouble : 0);
  }
  zg_buf_appendf(
      out, "# HELP zonegate_provider_key_rotate_after_days Rotation period of each provider key\n"
           "# TYPE zonegate_provider_key_rotate_after_days gauge\n");
  cJSON_ArrayForEach(k, keys) {
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(k, "id");
    const cJSON *up = cJSON_GetObjectItemCaseSensitive(k, "upstream");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(k, "state");
    const cJSON *rot = cJSON_GetObjectItemCaseSensitive(k, "rotate_after_days");
    if (!cJSON_IsString(id) || !cJSON_IsString(up) || !cJSON_IsString(state) ||
        !strcmp(state->valuestring, "revoked"))
      continue;
    zg_buf_appendf(out,
                   "zonegate_provider_key_rotate_after_days{upstream=\"%s\",key_id=\"%s\"} %g\n",
                   up->valuestring, id->valuestring, cJSON_IsNumber(rot) ? rot->valuedouble : 0);
  }
  zg_buf_appendf(out, "# HELP zonegate_provider_keys Provider keys by state\n# TYPE "
                      "zonegate_provider_keys gauge\n");
  for (int i = 0; i < 4; i++)
    zg_buf_appendf(out, "zonegate_provider_keys{state=\"%s\"} %d\n", states[i], counts[i]);
  cJSON_Delete(keys);
}

/* The seed: the replicated sections, with literal secrets blanked (they
 * become sealed provider keys instead). */
static cJSON *seed_config(const struct zg_config *cfg) {
  cJSON *seed = zg_config_replicated_json(cfg);
  cJSON *api_key = cJSON_GetObjectItemCaseSensitive(seed, "api_key");
  if (cJSON_IsString(api_key) && literal(api_key->valuestring)) cJSON_SetValuestring(api_key, "");
  cJSON *fallbacks = cJSON_GetObjectItemCaseSensitive(seed, "fallback_endpoints");
  cJSON *fb;
  cJSON_ArrayForEach(fb, fallbacks) {
    cJSON *k = cJSON_GetObjectItemCaseSensitive(fb, "api_key");
    if (cJSON_IsString(k) && literal(k->valuestring)) cJSON_SetValuestring(k, "");
  }
  return seed;
}

static int resolve(const char *spec, const char *path, char **out, char *errmsg, size_t errlen) {
  char err[512];
  if (!spec[0]) {
    snprintf(errmsg, errlen, "%s is required in a cluster (e.g. \"env:NAME\")", path);
    return -1;
  }
  if (zg_secret_resolve(spec, out, NULL, err, sizeof(err)) != 0) {
    snprintf(errmsg, errlen, "%s: %s", path, err);
    return -1;
  }
  return 0;
}

int node_cluster_start(struct node *n, char *errmsg, size_t errlen) {
  struct zg_config *cfg = n->cfg;
  bool clustered = cfg->n_peers > 0 || cfg->master_key[0];
  if (!clustered) {
    zg_log(ZG_INFO, "standalone",
           "no cluster.peers and no security.master_key: running standalone (always active, no "
           "admin API). "
           "Set security.master_key and security.admin_token to enable the replicated state and "
           "admin API.");
    return 0;
  }
  char *master_b64 = NULL, *secret = NULL;
  uint8_t master[64];
  int rc = -1;
  if (resolve(cfg->master_key, "security.master_key", &master_b64, errmsg, errlen) != 0) goto out;
  if (zg_base64_decode(master_b64, master, sizeof(master)) != 32) {
    snprintf(errmsg, errlen,
             "security.master_key: expected base64 of 32 random bytes (make one with: openssl rand "
             "-base64 32)");
    goto out;
  }
  if (cfg->n_peers > 0) {
    if (resolve(cfg->cluster_secret, "cluster.secret", &secret, errmsg, errlen) != 0) goto out;
    if (strlen(secret) < 16) {
      snprintf(errmsg, errlen, "cluster.secret: expected at least 16 characters, found %zu",
               strlen(secret));
      goto out;
    }
  } else {
    /* One voter: no peer ever connects, but the transport needs a key. */
    secret = zg_random_token("local-");
  }
  if (!secret) {
    snprintf(errmsg, errlen, "cluster.secret: out of memory");
    goto out;
  }
  /* Admin forwarding has its own key, derived from the cluster secret, so
   * the raft handshake MACs and the admin MACs never share a key. */
  static const char label[] = "zonegate admin forwarding v1";
  zg_hmac_sha256(secret, strlen(secret), label, sizeof(label) - 1, n->forward_key);
  n->have_forward_key = true;
  struct consensus_member self = {cfg->node_id,         cfg->zone,
                                  role_of(cfg->role),   cfg->advertise_raft,
                                  cfg->advertise_admin, cfg->advertise_gateway};
  struct consensus_member peers[ZG_MAX_PEERS];
  for (size_t i = 0; i < cfg->n_peers; i++) {
    const struct zg_peer *p = &cfg->peers[i];
    peers[i] = (struct consensus_member){p->id,
                                         p->zone,
                                         role_of(p->role),
                                         p->raft,
                                         p->admin[0] ? p->admin : NULL,
                                         p->gateway[0] ? p->gateway : NULL};
  }
  cJSON *seed = seed_config(cfg);
  cJSON *tokens = cJSON_CreateArray();
  for (size_t i = 0; i < cfg->n_tokens; i++) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddStringToObject(t, "name", cfg->tokens[i].name);
    cJSON_AddStringToObject(t, "sha256", cfg->tokens[i].sha256);
    cJSON_AddItemToArray(tokens, t);
  }
  struct consensus_options opts = {0};
  opts.self = &self;
  opts.raft_listen = cfg->listen_raft;
  opts.peers = peers;
  opts.n_peers = cfg->n_peers;
  opts.data_dir = cfg->data_dir;
  opts.cluster_secret = secret;
  opts.master_key = master;
  opts.election_timeout_ms = cfg->election_timeout_ms;
  opts.heartbeat_ms = cfg->heartbeat_ms;
  opts.snapshot_threshold = cfg->snapshot_threshold;
  opts.snapshot_trailing = cfg->snapshot_trailing;
  opts.seed_config = seed;
  opts.seed_tokens = tokens;
  opts.join_existing = cfg->cluster_join;
  opts.tls = n->tls_peer; /* NULL: plaintext (node_tls_setup warned) */
  opts.on_event = on_consensus_event;
  opts.ud = n;
  rc = consensus_start(n->loop, &opts, &n->consensus, errmsg, errlen);
  cJSON_Delete(seed);
  cJSON_Delete(tokens);
  if (rc != 0) {
    if (strstr(errmsg, "raft_init(") || strstr(errmsg, "raft_uv_init(") ||
        strstr(errmsg, "raft_start(")) {
      size_t len = strlen(errmsg);
      snprintf(errmsg + len, errlen - len,
               "\n       the Raft data in %s/raft is corrupt or unreadable: restore it from a "
               "backup, or move it "
               "away to let this node rejoin as a fresh member (the leader copies the state to it)",
               cfg->data_dir);
    }
    goto out;
  }
  rc = failover_start(n->loop, n->consensus, n->gateway, cfg, &n->failover, errmsg, errlen);
  if (rc != 0) goto out;
  node_cluster_apply_replicated(n); /* state restored from disk, if any */
  n->hooks = (struct gateway_cluster){.ud = n,
                                      .token_lookup = hook_token_lookup,
                                      .usable_keys = hook_usable_keys,
                                      .key_rejected = hook_key_rejected,
                                      .serve_mode = hook_serve_mode,
                                      .hold_timeout_ms = cfg->election_timeout_ms * 3,
                                      .health = hook_health,
                                      .usage_view = hook_usage_view,
                                      .usage_write = hook_usage_write,
                                      .key_by_id = hook_key_by_id};
  gateway_add_metrics_collector(n->gateway, collect_cluster_metrics, n);
  /* Client requests a standby forwards carry the client's address signed
   * with a key of their own (gateway/ident.c). */
  static const char client_label[] = "zonegate client forwarding v1";
  zg_hmac_sha256(secret, strlen(secret), client_label, sizeof(client_label) - 1,
                 n->hooks.forward_key);
  n->hooks.have_forward_key = true;
  gateway_set_cluster(n->gateway, &n->hooks);
  zg_log(ZG_INFO, "cluster_started", "node %s (zone %s, %s) in a group of %zu voters; raft on %s",
         cfg->node_id, cfg->zone, cfg->role, cfg->n_peers + 1, cfg->listen_raft);
out:
  OPENSSL_cleanse(master, sizeof(master));
  zg_secret_free(master_b64);
  zg_secret_free(secret);
  return rc;
}
