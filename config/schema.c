/* schema.c: the one table that describes every config key: its JSON path,
 * type, bounds, default, where it lands in struct zg_config, and a line of
 * help. Parsing, defaults, suggestions and the masked dump all read it.
 * Adding a key = adding a row here (and a field in config.h). */
#include "config/schema.h"

#include <stddef.h>
#include <stdio.h>

#define OFF(field) offsetof(struct zg_config, field), sizeof(((struct zg_config *)0)->field)
#define NOFF ((size_t)-1), 0

const struct schema_entry zg_schema[] = {
    /* node (local) */
    {"node", K_OBJECT, 0, 0, NULL, NULL, NOFF, "this node's identity"},
    {"node.id", K_STRING, 1, 63, "\"gw-a\"", NULL, OFF(node_id), "unique node id"},
    {"node.zone", K_STRING, 1, 31, "\"A\"", NULL, OFF(zone), "availability zone label"},
    {"node.role", K_ENUM, 0, 0, "\"gateway\"", "gateway|witness", OFF(role),
     "gateway serves clients; witness only votes"},
    {"node.advertise", K_OBJECT, 0, 0, NULL, NULL, NOFF, "addresses peers use to reach this node"},
    {"node.advertise.raft", K_ADDR, 0, 0, NULL, NULL, OFF(advertise_raft), "default: listen.raft"},
    {"node.advertise.admin", K_ADDR, 0, 0, NULL, NULL, OFF(advertise_admin),
     "default: listen.admin"},
    {"node.advertise.gateway", K_ADDR, 0, 0, NULL, NULL, OFF(advertise_gateway),
     "default: listen.gateway"},
    /* listen (local) */
    {"listen", K_OBJECT, 0, 0, NULL, NULL, NOFF, "listening addresses"},
    {"listen.gateway", K_ADDR, 0, 0, "\"0.0.0.0:18789\"", NULL, OFF(listen_gateway),
     "client API and health endpoints (no /metrics)"},
    {"listen.admin", K_ADDR, 0, 0, "\"127.0.0.1:18790\"", NULL, OFF(listen_admin),
     "admin API and /metrics (private network only)"},
    {"listen.raft", K_ADDR, 0, 0, "\"0.0.0.0:18791\"", NULL, OFF(listen_raft),
     "Raft peer traffic (private network only)"},
    {"listen.metrics", K_ADDR, 0, 0, NULL, NULL, OFF(listen_metrics),
     "optional extra listener serving only GET /metrics (private network only)"},
    {"listen.trusted_proxies", K_CIDRS, 0, ZG_MAX_TRUSTED_PROXIES, "[]", NULL, NOFF,
     "load balancers (CIDRs) whose PROXY protocol header or X-Forwarded-For names the client; "
     "none by default"},
    {"listen.gateway_tls", K_OBJECT, 0, 0, NULL, NULL, NOFF,
     "TLS on the client port (for a load balancer passing TCP through); ALPN http/1.1"},
    {"listen.gateway_tls.cert", K_STRING, 1, 511, NULL, NULL, OFF(gateway_tls_cert),
     "PEM certificate (chain) for the client port"},
    {"listen.gateway_tls.key", K_STRING, 1, 511, NULL, NULL, OFF(gateway_tls_key),
     "PEM private key for the client port"},
    /* cluster (local) */
    {"cluster", K_OBJECT, 0, 0, NULL, NULL, NOFF, "Raft group membership"},
    {"cluster.data_dir", K_STRING, 1, 511, "\"/var/lib/zonegate\"", NULL, OFF(data_dir),
     "persistent state (Raft log, snapshots)"},
    {"cluster.peers", K_ARRAY, 0, ZG_MAX_PEERS, NULL, NULL, NOFF, "every other member"},
    {"cluster.peers[].id", K_STRING, 1, 63, NULL, NULL, NOFF, "peer node id"},
    {"cluster.peers[].zone", K_STRING, 0, 31, NULL, NULL, NOFF, "peer zone"},
    {"cluster.peers[].role", K_ENUM, 0, 0, NULL, "gateway|witness", NOFF, "peer role"},
    {"cluster.peers[].raft", K_ADDR, 0, 0, NULL, NULL, NOFF, "peer Raft address"},
    {"cluster.peers[].admin", K_ADDR, 0, 0, NULL, NULL, NOFF, "peer admin address"},
    {"cluster.peers[].gateway", K_ADDR, 0, 0, NULL, NULL, NOFF, "peer client API address"},
    {"cluster.join", K_BOOL, 0, 0, "false", NULL, OFF(cluster_join),
     "true on a node added to a running cluster (zonegate members add): it never bootstraps its "
     "own"},
    {"cluster.secret", K_SECRET, 0, 0, NULL, NULL, OFF(cluster_secret),
     "shared secret authenticating Raft peers (>= 16 chars)"},
    {"cluster.election_timeout_ms", K_UINT, 100, 60000, "600", NULL, OFF(election_timeout_ms),
     "Raft election timeout (failure detection: a follower waits 1-2x this)"},
    {"cluster.heartbeat_ms", K_UINT, 10, 10000, "100", NULL, OFF(heartbeat_ms), "Raft heartbeat"},
    {"cluster.snapshot_threshold", K_UINT, 16, 10000000, "8192", NULL, OFF(snapshot_threshold),
     "entries between snapshots (each writes the whole state)"},
    {"cluster.snapshot_trailing", K_UINT, 0, 10000000, "1024", NULL, OFF(snapshot_trailing),
     "entries kept after a snapshot"},
    {"cluster.max_lag", K_UINT, 0, 10000000, "100", NULL, OFF(max_lag),
     "entries a standby may lag and still be healthy"},
    /* security (local) */
    {"security", K_OBJECT, 0, 0, NULL, NULL, NOFF, "local secrets"},
    {"security.master_key", K_SECRET, 0, 0, NULL, NULL, OFF(master_key),
     "base64 of 32 bytes; seals provider keys"},
    {"security.admin_token", K_SECRET, 0, 0, NULL, NULL, OFF(admin_token),
     "bearer token of the admin API (>= 16 chars)"},
    {"security.tls", K_OBJECT, 0, 0, NULL, NULL, NOFF,
     "mutual TLS between nodes (Raft, admin API, forwarding); files from `zonegate certs init`"},
    {"security.tls.cert", K_STRING, 1, 511, NULL, NULL, OFF(tls_cert),
     "this node's PEM certificate (node id in its subjectAltName)"},
    {"security.tls.key", K_STRING, 1, 511, NULL, NULL, OFF(tls_key),
     "this node's PEM private key (mode 0600)"},
    {"security.tls.ca", K_STRING, 1, 511, NULL, NULL, OFF(tls_ca),
     "the cluster CA certificate every node certificate must chain to"},
    /* logging (local) */
    {"logging", K_OBJECT, 0, 0, NULL, NULL, NOFF, "log output"},
    {"logging.level", K_ENUM, 0, 0, "\"info\"", "debug|info|warn|error", OFF(log_level),
     "lowest level written"},

    /* ---- replicated ---- */
    {"api_key", K_SECRET, 0, 0, "\"\"", NULL, OFF(api_key), "upstream provider key"},
    {"endpoint", K_URL, 0, 0, "\"\"", NULL, OFF(endpoint),
     "upstream base URL, e.g. https://api.example.com"},
    {"fallback_endpoints", K_ARRAY, 0, ZG_MAX_FALLBACKS, NULL, NULL, NOFF,
     "tried in order on connect failure or 5xx before the first byte"},
    {"fallback_endpoints[].endpoint", K_URL, 0, 0, NULL, NULL, NOFF, "fallback base URL"},
    {"fallback_endpoints[].api_key", K_SECRET, 0, 0, NULL, NULL, NOFF, "fallback provider key"},
    {"performance", K_OBJECT, 0, 0, NULL, NULL, NOFF, "limits and timeouts"},
    {"performance.max_concurrent", K_UINT, 1, 100000, "50", NULL, OFF(max_concurrent),
     "in-flight upstream requests"},
    {"performance.max_queue", K_UINT, 0, 1000000, "200", NULL, OFF(max_queue),
     "requests waiting for a slot; beyond it 429"},
    {"performance.queue_timeout", K_UINT, 1, 600000, "5000", NULL, OFF(queue_timeout_ms),
     "ms a request may wait for a slot; then 429"},
    {"performance.request_timeout", K_UINT, 100, 3600000, "30000", NULL, OFF(request_timeout_ms),
     "ms, total time of a non-streaming upstream request"},
    {"performance.connect_timeout", K_UINT, 10, 600000, "5000", NULL, OFF(connect_timeout_ms),
     "ms to connect to the upstream"},
    {"performance.first_byte_timeout", K_UINT, 10, 3600000, "30000", NULL,
     OFF(first_byte_timeout_ms), "ms from request sent to first response byte"},
    {"performance.idle_timeout", K_UINT, 10, 3600000, "30000", NULL, OFF(idle_timeout_ms),
     "ms allowed between two stream chunks"},
    {"performance.stream_timeout", K_UINT, 100, 86400000, "600000", NULL, OFF(stream_timeout_ms),
     "ms, total time of a streaming request"},
    {"performance.cache_size", K_SIZE, 0, 0, "\"1GB\"", NULL, OFF(cache_size_bytes),
     "response cache bound (bytes or 512MB/1GB); 0 disables"},
    {"performance.cache_ttl", K_UINT, 0, 31536000, "3600", NULL, OFF(cache_ttl_s),
     "seconds a cached answer is served; 0 = no expiry"},
    {"performance.cache_all_temperatures", K_BOOL, 0, 0, "false", NULL, OFF(cache_all_temperatures),
     "also cache requests with temperature != 0"},
    {"performance.max_body_bytes", K_SIZE, 0, 0, "\"4MiB\"", NULL, OFF(max_body_bytes),
     "largest request body; beyond it 413"},
    {"performance.max_header_bytes", K_SIZE, 0, 0, "\"16KiB\"", NULL, OFF(max_header_bytes),
     "largest request head; beyond it 431"},
    {"performance.client_timeout", K_UINT, 100, 600000, "10000", NULL, OFF(client_timeout_ms),
     "ms for a client to send a whole request; then 408"},
    {"performance.slow_client_timeout", K_UINT, 100, 3600000, "30000", NULL,
     OFF(slow_client_timeout_ms),
     "ms a client may take no response byte while its answer waits; then cut"},
    {"performance.drain_timeout", K_UINT, 0, 3600000, "30000", NULL, OFF(drain_timeout_ms),
     "ms in-flight requests may take to finish at shutdown"},
    {"performance.upstream_client", K_ENUM, 0, 0, "\"auto\"", "auto|curl", OFF(upstream_client),
     "auto: plain http:// upstreams through the built-in keep-alive HTTP/1.1 client, https:// "
     "through libcurl; curl: libcurl for every upstream"},
    {"model", K_OBJECT, 0, 0, NULL, NULL, NOFF, "defaults for fields the client left out"},
    {"model.temperature", K_DOUBLE, 0, 2, NULL, NULL, OFF(temperature), "sampling temperature"},
    {"model.top_p", K_DOUBLE, 0, 1, NULL, NULL, OFF(top_p), "nucleus sampling"},
    {"auth", K_OBJECT, 0, 0, NULL, NULL, NOFF, "client authentication"},
    {"auth.mode", K_ENUM, 0, 0, "\"token\"", "token|none", OFF(auth_mode),
     "token (default) or none (explicit only)"},
    {"auth.tokens", K_ARRAY, 0, ZG_MAX_FILE_TOKENS, NULL, NULL, NOFF, "bootstrap client tokens"},
    {"auth.tokens[].name", K_STRING, 1, 63, NULL, NULL, NOFF, "token name"},
    {"auth.tokens[].sha256", K_HEX64, 0, 0, NULL, NULL, NOFF, "hex SHA-256 of the token"},
    {"failover", K_OBJECT, 0, 0, NULL, NULL, NOFF, "active/standby behaviour"},
    {"failover.preferred_zone", K_STRING, 0, 31, "\"\"", NULL, OFF(preferred_zone),
     "zone that should hold the active node"},
    {"failover.failback", K_ENUM, 0, 0, "\"auto\"", "auto|manual", OFF(failback),
     "move back to the preferred zone automatically"},
    {"failover.failback_after", K_UINT, 1, 86400, "60", NULL, OFF(failback_after_s),
     "seconds the preferred node must be healthy first"},
    {"failover.lease_ratio", K_DOUBLE, 0.1, 0.95, "0.8", NULL, OFF(lease_ratio),
     "lease length as a fraction of the election timeout"},
    {"drills", K_OBJECT, 0, 0, NULL, NULL, NOFF, "failover drills"},
    {"drills.enabled", K_BOOL, 0, 0, "false", NULL, OFF(drills_enabled),
     "expose fault-injection endpoints on the admin API"},
    {"alerts", K_ANY, 0, 0, NULL, NULL, NOFF, "alert rules and channels"},
    {"models", K_ANY, 0, 0, NULL, NULL, NOFF,
     "model routing: [{name, aliases, endpoints: [{endpoint, keys, model}]}] (README)"},
    {"usage", K_OBJECT, 0, 0, NULL, NULL, NOFF, "usage accounting and token limits"},
    {"usage.enabled", K_BOOL, 0, 0, "true", NULL, OFF(usage_enabled),
     "read usage from answers, count it per token/model/key, enforce tpm and budgets"},
    {"usage.flush_ms", K_UINT, 100, 60000, "1000", NULL, OFF(usage_flush_ms),
     "ms between replicated usage writes: a failover loses at most this much counting"},
    {"upstream", K_OBJECT, 0, 0, NULL, NULL, NOFF, "how requests are sent to the upstream"},
    {"upstream.forwarded_for", K_BOOL, 0, 0, "false", NULL, OFF(upstream_forwarded_for),
     "send the client's address as X-Forwarded-For (off: a third-party API never sees it)"},
    {"upstream.http_version", K_ENUM, 0, 0, "\"2\"", "1.1|2", OFF(upstream_http_version),
     "https:// upstreams: 2 = HTTP/2 when the server offers it (ALPN; many streams share one "
     "connection), else HTTP/1.1; 1.1 = always HTTP/1.1 (one connection per concurrent "
     "request). Plain http:// is always HTTP/1.1"},
    {"upstream.ca_file", K_STRING, 1, 511, NULL, NULL, OFF(upstream_ca_file),
     "PEM file of CA certificates an https:// upstream's certificate must chain to, instead of "
     "the system's (a provider endpoint behind a private CA); the same path on every node"},
};

const size_t zg_schema_len = sizeof(zg_schema) / sizeof(zg_schema[0]);

static const char *const replicated_keys[] = {
    "api_key", "endpoint", "fallback_endpoints", "performance", "model", "auth", "failover",
    "drills",  "alerts",   "upstream",           "usage",       "models"};

void zg_config_replicated_list(char *out, size_t size) {
  size_t n = 0;
  out[0] = '\0';
  for (size_t i = 0; i < sizeof(replicated_keys) / sizeof(replicated_keys[0]) && n < size; i++)
    n += (size_t)snprintf(out + n, size - n, "%s%s", i ? ", " : "", replicated_keys[i]);
}

bool zg_config_key_is_replicated(const char *key) {
  for (size_t i = 0; i < sizeof(replicated_keys) / sizeof(replicated_keys[0]); i++)
    if (strcmp(key, replicated_keys[i]) == 0) return true;
  return false;
}
