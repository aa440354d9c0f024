/* ident.c: who the client is, decided once per request at entry.
 *
 * The address every decision uses (token IP allowlists, access lines,
 * anything per address) is, in order:
 *   1. a request forwarded by another node (a standby) with a valid
 *      X-Zonegate-Forward-Auth: the client address it signed;
 *   2. otherwise the connection's client: the TCP peer, or the address a
 *      trusted proxy's PROXY protocol header named (httpd does that);
 *   3. when that address is itself a trusted proxy (listen.trusted_proxies),
 *      X-Forwarded-For is walked from the right: each entry replaces it
 *      while the address so far is trusted (the rightmost untrusted one
 *      wins; "ip:port" and "[ipv6]:port" are read as their address; an
 *      entry that is no address makes the client "unknown", which no
 *      allowlist matches). From anyone else X-Forwarded-For is ignored.
 * Then every X-Zonegate-* header of the request is removed: nothing a
 * client sends can speak for a node. A request that came through a
 * trusted proxy (2 or 3) and not from a node is marked via_lb: a node that
 * cannot take it closes the connection so the LB retries it (chat.c).
 *
 * Forwarding signature (one helper each way, so that a transport with
 * mutual TLS can replace it): "X-Zonegate-Forward-Auth: v1 <wall ms>
 * <client address> <hex HMAC-SHA256>" under the cluster's forwarding key
 * (derived from the cluster secret by node/, given through the
 * gateway_cluster hooks), over the method, path, query, client address,
 * timestamp and the body's SHA-256, valid FORWARD_WINDOW_MS either side of
 * this node's clock. A request that carries one that does not verify is
 * refused with 401 (logged WARN forward_auth_failed with the peer address,
 * at most once per address every 10 s); it is never treated as a client's.
 */
#include "gateway/internal.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FORWARD_WINDOW_MS 30000
#define FORWARD_AUTH_HEADER "X-Zonegate-Forward-Auth"

bool gateway_ip_trusted(const struct gateway *gw, const char *ip) {
  for (size_t i = 0; i < gw->cfg->n_trusted_proxies; i++)
    if (gateway_cidr_match(gw->cfg->trusted_proxies[i], ip)) return true;
  return false;
}

static bool valid_ip(const char *ip) {
  unsigned char bin[16];
  return inet_pton(strchr(ip, ':') ? AF_INET6 : AF_INET, ip, bin) == 1;
}

/* One X-Forwarded-For entry as an address: "ip", "ip:port" (IPv4),
 * "[ipv6]" or "[ipv6]:port" (the forms load balancers write). False when
 * it is none of these. */
static bool entry_address(const char *e, size_t len, char *out, size_t outlen) {
  char buf[80];
  if (len == 0 || len >= sizeof(buf)) return false;
  memcpy(buf, e, len);
  buf[len] = '\0';
  char *ip = buf;
  if (buf[0] == '[') {
    char *close = strchr(buf, ']');
    if (!close || (close[1] && (close[1] != ':' || !close[2] ||
                                strspn(close + 2, "0123456789") != strlen(close + 2))))
      return false;
    *close = '\0';
    ip = buf + 1;
  } else {
    char *colon = strchr(buf, ':');
    if (colon && !strchr(colon + 1, ':')) { /* IPv4 with a port */
      if (!colon[1] || strspn(colon + 1, "0123456789") != strlen(colon + 1)) return false;
      *colon = '\0';
    }
  }
  size_t ip_len = strlen(ip);
  if (!valid_ip(ip) || ip_len >= outlen) return false;
  memcpy(out, ip, ip_len + 1);
  return true;
}

/* X-Forwarded-For entries (all such headers, in order) walked from the
 * right while `out` is a trusted proxy: the rightmost untrusted entry is
 * the client. An entry that is no address (or a list too long to walk)
 * makes the client "unknown": no allowlist matches it; the trusted
 * proxy's own address is never taken for the client. Empty entries are
 * skipped. */
static void walk_forwarded_for(const struct gateway *gw, struct httpd_req *req, char *out,
                               size_t outlen) {
  const char *lines[64];
  size_t n_lines = 0, n = httpd_req_header_count(req);
  for (size_t i = 0; i < n; i++) {
    const char *name, *value;
    httpd_req_header_at(req, i, &name, &value);
    if (strcasecmp(name, "X-Forwarded-For") != 0) continue;
    if (n_lines == ZG_ARRAY_LEN(lines)) {
      snprintf(out, outlen, "unknown");
      return;
    }
    lines[n_lines++] = value;
  }
  unsigned walked = 0;
  for (size_t l = n_lines; l-- > 0 && gateway_ip_trusted(gw, out);) {
    const char *list = lines[l];
    size_t end = strlen(list);
    while (gateway_ip_trusted(gw, out)) {
      size_t start = end;
      while (start > 0 && list[start - 1] != ',') start--;
      size_t a = start, b = end;
      while (a < b && (list[a] == ' ' || list[a] == '\t')) a++;
      while (b > a && (list[b - 1] == ' ' || list[b - 1] == '\t')) b--;
      if (b > a) {
        if (++walked > 64 || !entry_address(list + a, b - a, out, outlen)) {
          snprintf(out, outlen, "unknown");
          return;
        }
      }
      if (start == 0) break;
      end = start - 1;
    }
  }
}

static void forward_mac(const uint8_t key[32], const char *method, const char *path,
                        const char *query, const char *client_ip, uint64_t ts_ms, const char *body,
                        size_t body_len, char out_hex[65]) {
  char body_hash[65];
  zg_sha256_hex(body ? body : "", body ? body_len : 0, body_hash);
  zg_buf msg;
  zg_buf_init(&msg);
  zg_buf_appendf(&msg, "zonegate-client-forward-v1\n%s\n%s\n%s\n%s\n%llu\n%s", method, path, query,
                 client_ip, (unsigned long long)ts_ms, body_hash);
  uint8_t mac[32];
  zg_hmac_sha256(key, 32, msg.data ? msg.data : "", msg.len, mac);
  zg_buf_free(&msg);
  for (int i = 0; i < 32; i++) snprintf(out_hex + 2 * i, 3, "%02x", mac[i]);
  OPENSSL_cleanse(mac, sizeof(mac));
}

int gateway_forward_sign(const struct gateway *gw, const char *method, const char *path,
                         const char *query, const char *client_ip, const char *body,
                         size_t body_len, char *line, size_t linelen) {
  if (!gw->cluster || !gw->cluster->have_forward_key) return -1;
  uint64_t ts = zg_wall_ms();
  char mac[65];
  forward_mac(gw->cluster->forward_key, method, path, query, client_ip, ts, body, body_len, mac);
  int n = snprintf(line, linelen, FORWARD_AUTH_HEADER ": v1 %llu %s %s", (unsigned long long)ts,
                   client_ip, mac);
  return n > 0 && (size_t)n < linelen ? 0 : -1;
}

/* 1: valid (client_ip filled), -1: present and invalid (*why set). */
static int forward_verify(const struct gateway *gw, struct httpd_req *req, const char *value,
                          char *client_ip, size_t iplen, const char **why) {
  unsigned long long ts = 0;
  char ip[64] = "", given[80] = "";
  char extra;
  *why = "malformed forwarding signature";
  if (sscanf(value, "v1 %llu %63s %79s %c", &ts, ip, given, &extra) != 3 || strlen(given) != 64 ||
      !valid_ip(ip))
    return -1;
  if (!gw->cluster || !gw->cluster->have_forward_key) {
    *why = "this node has no forwarding key (not in a cluster)";
    return -1;
  }
  uint64_t now = zg_wall_ms();
  if ((uint64_t)ts + FORWARD_WINDOW_MS < now || (uint64_t)ts > now + FORWARD_WINDOW_MS) {
    *why = "forwarding signature outside its validity window (clock skew?)";
    return -1;
  }
  size_t len;
  const char *body = httpd_req_body(req, &len);
  char want[65];
  forward_mac(gw->cluster->forward_key, httpd_req_method(req), httpd_req_path(req),
              httpd_req_query(req), ip, ts, body, len, want);
  bool ok = zg_ct_equal(want, 64, given, strlen(given));
  OPENSSL_cleanse(want, sizeof(want));
  if (!ok) {
    *why = "forwarding signature does not verify";
    return -1;
  }
  snprintf(client_ip, iplen, "%s", ip);
  return 1;
}

int gateway_identify(struct gateway *gw, struct httpd_req *req, struct gateway_access *a) {
  zg_copy_cut(a->client_ip, sizeof(a->client_ip), httpd_req_peer_ip(req));
  a->forwarded = false;
  const char *fwd = httpd_req_header(req, FORWARD_AUTH_HEADER);
  if (fwd) {
    const char *why = NULL;
    if (forward_verify(gw, req, fwd, a->client_ip, sizeof(a->client_ip), &why) != 1) {
      unsigned suppressed = 0;
      if (zg_log_throttle(&gw->forward_log, httpd_req_socket_ip(req), &suppressed))
        zg_log(ZG_WARN, "forward_auth_failed",
               "%s sent %s that was refused: %s (suppressed_since_last=%u)",
               httpd_req_socket_ip(req), FORWARD_AUTH_HEADER, why, suppressed);
      metrics_counter_add(gw->m_auth_failures, 1, "forward_signature");
      httpd_req_drop_headers(req, "x-zonegate-");
      httpd_respond_error(req, 401, "invalid_request_error", "invalid_forward_signature", NULL,
                          "the forwarding signature of this request did not verify");
      return -1;
    }
    a->forwarded = true;
  } else {
    a->via_lb = httpd_req_via_proxy(req) || (gateway_ip_trusted(gw, a->client_ip) &&
                                             httpd_req_header(req, "X-Forwarded-For") != NULL);
    walk_forwarded_for(gw, req, a->client_ip, sizeof(a->client_ip));
  }
  httpd_req_drop_headers(req, "x-zonegate-");
  return 0;
}

const char *gateway_client_ip(struct httpd_req *req) {
  struct gateway_access *a = gateway_access_of(req);
  return a && a->client_ip[0] ? a->client_ip : httpd_req_peer_ip(req);
}

bool gateway_request_forwarded(struct httpd_req *req) {
  struct gateway_access *a = gateway_access_of(req);
  return a && a->forwarded;
}

bool gateway_request_via_lb(struct httpd_req *req) {
  struct gateway_access *a = gateway_access_of(req);
  return a && a->via_lb;
}

static bool proxy_trusted(void *ud, const char *ip) {
  return gateway_ip_trusted(ud, ip);
}

void gateway_ident_start(struct gateway *gw) {
  gw->forward_log.interval_ms = 10000;
  httpd_set_proxy_protocol(gw->http, proxy_trusted, gw);
}
