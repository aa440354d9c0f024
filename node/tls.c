/* tls.c (node/): the node's TLS contexts and certificate-expiry metrics.
 *
 * security.tls {cert, key, ca}: one mutual-TLS context for the Raft
 * transport (a peer certificate is required both ways) and one for the
 * admin listener (a client certificate is asked for and verified when
 * presented; node-to-node routes require one, the CLI comes with the admin
 * token instead). Both are TLS 1.3 only. Without security.tls a clustered
 * node logs WARN inter_node_plaintext. listen.gateway_tls {cert, key}: a
 * server context for the client port, ALPN http/1.1, no client
 * certificates.
 *
 * /metrics: zonegate_tls_cert_expiry_seconds{node,cert} = seconds until
 * the certificate's notAfter (negative once expired), for cert="node",
 * "ca" and "gateway"; read from the files at scrape time, so a replaced
 * file shows at once (the contexts themselves need a restart).
 */
#include "alerts/alerts.h"
#include "base/base.h"
#include "consensus/consensus.h"
#include "failover/failover.h"
#include "gateway/gateway.h"
#include "node/internal.h"

#include <cjson/cJSON.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int node_tls_setup(struct node *n, char *errmsg, size_t errlen) {
  const struct zg_config *cfg = n->cfg;
  char err[512];
  if (cfg->tls_cert[0]) {
    n->tls_peer = zg_tls_ctx_new(cfg->tls_cert, cfg->tls_key, cfg->tls_ca, ZG_TLS_PEER_REQUIRED,
                                 NULL, err, sizeof(err));
    if (n->tls_peer)
      n->tls_admin = zg_tls_ctx_new(cfg->tls_cert, cfg->tls_key, cfg->tls_ca, ZG_TLS_PEER_OPTIONAL,
                                    NULL, err, sizeof(err));
    if (!n->tls_peer || !n->tls_admin) {
      snprintf(errmsg, errlen, "security.tls: %s", err);
      return -1;
    }
    char id[64];
    bool ok = false;
    FILE *f = fopen(cfg->tls_cert, "r");
    if (f) {
      X509 *cert = PEM_read_X509(f, NULL, NULL, NULL);
      fclose(f);
      ok = cert && zg_tls_cert_node_id(cert, id, sizeof(id)) == 0 && strcmp(id, cfg->node_id) == 0;
      X509_free(cert);
    }
    if (!ok) {
      snprintf(errmsg, errlen,
               "security.tls.cert: %s is not a certificate for node '%s' (its subjectAltName "
               "URI urn:zonegate:node:<id> or CN must be the node id; make one with: zonegate "
               "certs init DIR --nodes %s)",
               cfg->tls_cert, cfg->node_id, cfg->node_id);
      return -1;
    }
    zg_log(ZG_INFO, "tls_enabled",
           "mutual TLS 1.3 between nodes (Raft, admin API, forwarding) with %s, CA %s",
           cfg->tls_cert, cfg->tls_ca);
  } else if (cfg->n_peers > 0) {
    zg_log(ZG_WARN, "inter_node_plaintext",
           "security.tls is not set: Raft, admin and forwarding traffic between nodes is "
           "PLAINTEXT (the cluster secret only authenticates it). Make certificates with "
           "`zonegate certs init DIR --nodes ID,...` and set security.tls {cert, key, ca}");
  }
  if (cfg->gateway_tls_cert[0]) {
    n->tls_gateway = zg_tls_ctx_new(cfg->gateway_tls_cert, cfg->gateway_tls_key, NULL,
                                    ZG_TLS_PEER_NONE, "http/1.1", err, sizeof(err));
    if (!n->tls_gateway) {
      snprintf(errmsg, errlen, "listen.gateway_tls: %s", err);
      return -1;
    }
    zg_log(ZG_INFO, "gateway_tls_enabled", "client port %s speaks TLS 1.3 (ALPN http/1.1)",
           cfg->listen_gateway);
  }
  return 0;
}

static void expiry_line(zg_buf *out, const char *node, const char *which, const char *path) {
  bool ok;
  int64_t not_after = zg_tls_cert_file_not_after(path, &ok);
  if (!ok) return;
  zg_buf_appendf(out, "zonegate_tls_cert_expiry_seconds{node=\"%s\",cert=\"%s\"} %lld\n", node,
                 which, (long long)(not_after - (int64_t)time(NULL)));
}

static void collect_tls_metrics(void *ud, void *out_buf) {
  struct node *n = ud;
  zg_buf *out = out_buf;
  const struct zg_config *cfg = n->cfg;
  if (!cfg->tls_cert[0] && !cfg->gateway_tls_cert[0]) return;
  zg_buf_appendf(out, "# HELP zonegate_tls_cert_expiry_seconds Seconds until the certificate "
                      "expires (negative: expired).\n"
                      "# TYPE zonegate_tls_cert_expiry_seconds gauge\n");
  if (cfg->tls_cert[0]) {
    expiry_line(out, cfg->node_id, "node", cfg->tls_cert);
    expiry_line(out, cfg->node_id, "ca", cfg->tls_ca);
  }
  if (cfg->gateway_tls_cert[0]) expiry_line(out, cfg->node_id, "gateway", cfg->gateway_tls_cert);
}

/* The active's admin address and node id for the client-port address the
 * cluster hooks chose (the leader's). */
static int resolve_forward(void *ud, const char *gateway_address, char *admin, size_t admin_len,
                           char *node, size_t node_len) {
  struct node *n = ud;
  const struct consensus_member *leader = n->consensus ? consensus_leader(n->consensus) : NULL;
  if (!leader || !leader->admin_address || !leader->admin_address[0] || !leader->gateway_address ||
      strcmp(leader->gateway_address, gateway_address) != 0)
    return -1;
  snprintf(admin, admin_len, "%s", leader->admin_address);
  snprintf(node, node_len, "%s", leader->id);
  return 0;
}

void node_tls_start(struct node *n) {
  if (n->alerts) {
    alerts_watch_cert(n->alerts, "node", n->cfg->tls_cert);
    alerts_watch_cert(n->alerts, "ca", n->cfg->tls_ca);
    alerts_watch_cert(n->alerts, "gateway", n->cfg->gateway_tls_cert);
  }
  if (!n->gateway) return;
  gateway_add_metrics_collector(n->gateway, collect_tls_metrics, n);
  if (n->tls_peer && n->consensus && n->admin)
    gateway_set_forward_tls(n->gateway, n->cfg->tls_ca, n->cfg->tls_cert, n->cfg->tls_key,
                            resolve_forward, n);
}

void node_tls_free(struct node *n) {
  SSL_CTX_free(n->tls_peer);
  SSL_CTX_free(n->tls_admin);
  SSL_CTX_free(n->tls_gateway);
  n->tls_peer = n->tls_admin = n->tls_gateway = NULL;
}

bool node_is_member(const struct node *n, const char *id) {
  if (!id || !id[0] || !n->consensus) return false;
  const struct consensus_member *self = consensus_self(n->consensus);
  if (self && strcmp(self->id, id) == 0) return true;
  cJSON *status = consensus_status_json(n->consensus);
  bool found = false;
  const cJSON *m;
  cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(status, "members")) {
    const cJSON *mid = cJSON_GetObjectItemCaseSensitive(m, "id");
    if (cJSON_IsString(mid) && strcmp(mid->valuestring, id) == 0) found = true;
  }
  cJSON_Delete(status);
  return found;
}
