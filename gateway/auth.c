/* auth.c: client authentication on the client port. A bearer token is
 * hashed (SHA-256) and looked up among the file's bootstrap tokens
 * (constant-time compare) and then in the replicated token table; expiry,
 * the IP allowlist and the per-token requests-per-minute limit are checked.
 * Failures answer 401 (missing/unknown/expired), 403 (address not
 * allowed) or 429 (rate) in OpenAI's error shape. The allowlist is checked
 * against the client's address as ident.c decided it (PROXY header or
 * X-Forwarded-For of a trusted proxy, or a standby's signed forward). The token itself is
 * never logged or stored; only its hash is compared. */
#include "gateway/internal.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

bool gateway_cidr_match(const char *cidr, const char *ip) {
  char net[64];
  if (strlen(cidr) >= sizeof(net)) return false; /* never match a cut-off network */
  snprintf(net, sizeof(net), "%s", cidr);
  char *slash = strchr(net, '/');
  long bits = -1;
  if (slash) {
    *slash = '\0';
    /* 1-3 decimal digits only: strtol would also take " 8", "+8", "-1". */
    size_t digits = strspn(slash + 1, "0123456789");
    if (digits == 0 || digits > 3 || slash[1 + digits]) return false;
    bits = strtol(slash + 1, NULL, 10);
  }
  unsigned char a[16], b[16];
  int family = strchr(net, ':') ? AF_INET6 : AF_INET;
  size_t len = family == AF_INET6 ? 16 : 4;
  if (inet_pton(family, net, a) != 1) return false;
  if (inet_pton(family, ip, b) != 1) {
    /* IPv4 client against an IPv4-mapped notation or vice versa: no match. */
    return false;
  }
  if (bits < 0) bits = (long)len * 8;
  if (bits > (long)len * 8) return false;
  size_t full = (size_t)bits / 8;
  if (memcmp(a, b, full) != 0) return false;
  unsigned rem = (unsigned)bits % 8;
  if (rem == 0) return true;
  unsigned char mask = (unsigned char)(0xffu << (8 - rem));
  return (a[full] & mask) == (b[full] & mask);
}

static int reject(struct gateway *gw, struct httpd_req *req, int status, const char *code,
                  const char *reason, const char *const *headers, const char *message) {
  metrics_counter_add(gw->m_auth_failures, 1, reason);
  httpd_respond_error(req, status, status == 429 ? "rate_limit_error" : "invalid_request_error",
                      code, headers, "%s", message);
  return -1;
}

int gateway_authenticate(struct gateway *gw, struct httpd_req *req, struct gateway_token *token) {
  memset(token, 0, sizeof(*token));
  if (strcmp(gw->cfg->auth_mode, "none") == 0) return 0;
  const char *header = httpd_req_header(req, "Authorization");
  if (!header || strncasecmp(header, "Bearer ", 7) != 0 || !header[7])
    return reject(gw, req, 401, "invalid_api_key", "missing", NULL,
                  "missing client token: send \"Authorization: Bearer <token>\"");
  const char *presented = header + 7;
  while (*presented == ' ') presented++;
  char hash[65];
  zg_sha256_hex(presented, strlen(presented), hash);

  bool found = false;
  /* Scan every file token so timing does not reveal which one matched. */
  for (size_t i = 0; i < gw->cfg->n_tokens; i++) {
    if (zg_ct_equal(hash, 64, gw->cfg->tokens[i].sha256, strlen(gw->cfg->tokens[i].sha256)) &&
        !found) {
      found = true;
      snprintf(token->name, sizeof(token->name), "%s", gw->cfg->tokens[i].name);
      snprintf(token->id, sizeof(token->id), "file:%s", gw->cfg->tokens[i].name);
    }
  }
  if (!found && gw->extra_token_sha256[0] && zg_ct_equal(hash, 64, gw->extra_token_sha256, 64)) {
    found = true;
    snprintf(token->name, sizeof(token->name), "%s", gw->extra_token_name);
    snprintf(token->id, sizeof(token->id), "file:%s", gw->extra_token_name);
  }
  if (!found && gw->cluster && gw->cluster->token_lookup)
    found = gw->cluster->token_lookup(gw->cluster->ud, hash, token);
  OPENSSL_cleanse(hash, sizeof(hash));
  if (!found)
    return reject(gw, req, 401, "invalid_api_key", "unknown", NULL,
                  "invalid client token (unknown, revoked or mistyped)");
  if (token->expires_at_ms && zg_wall_ms() >= token->expires_at_ms)
    return reject(gw, req, 401, "token_expired", "expired", NULL, "client token has expired");
  if (token->n_allow > 0) {
    bool allowed = false;
    for (size_t i = 0; i < token->n_allow && !allowed; i++)
      allowed = gateway_cidr_match(token->allow[i], gateway_client_ip(req));
    if (!allowed)
      return reject(gw, req, 403, "ip_not_allowed", "ip_not_allowed", NULL,
                    "this client token may not be used from this address");
  }
  return gateway_admit(gw, req, token);
  return 0;
}

/* OpenAI's reset format: "1s", "6m0s", "2h3m4s". */
static void reset_text(uint64_t s, char *out, size_t size) {
  if (s >= 3600)
    snprintf(out, size, "%lluh%llum%llus", (unsigned long long)(s / 3600),
             (unsigned long long)(s % 3600 / 60), (unsigned long long)(s % 60));
  else if (s >= 60)
    snprintf(out, size, "%llum%llus", (unsigned long long)(s / 60), (unsigned long long)(s % 60));
  else
    snprintf(out, size, "%llus", (unsigned long long)s);
}

int gateway_admit(struct gateway *gw, struct httpd_req *req, const struct gateway_token *token) {
  uint64_t now_s = zg_wall_ms() / 1000;
  const char *name = token->name[0] ? token->name : "-";
  struct acct_limits limits = {token->rpm, token->tpm, token->budget_day, token->budget_month};
  if (!gw->accounting) {
    /* accounting off (usage.enabled false): requests per minute only, in
     * this node's memory */
    unsigned retry_after = 1;
    if (token->rpm > 0 &&
        !rate_limiter_allow(gw->rate, token->id, token->rpm, zg_mono_ms(), &retry_after)) {
      char retry[48];
      snprintf(retry, sizeof(retry), "Retry-After: %u", retry_after);
      const char *headers[] = {retry, NULL};
      return reject(gw, req, 429, "rate_limit_exceeded", "rate_limited", headers,
                    "requests-per-minute limit (rpm) of this client token reached");
    }
    return 0;
  }
  struct gateway_usage_view view = {0};
  if (gw->cluster && gw->cluster->usage_view)
    gw->cluster->usage_view(gw->cluster->ud, name, now_s, &view);
  struct acct_verdict v;
  if (accounting_check(gw->accounting, name, &limits, &view, now_s, &v) == ACCT_OK) {
    accounting_request(gw->accounting, name, now_s);
    return 0;
  }
  /* 429 in OpenAI's shape, with the headers its SDKs read */
  char h[8][96];
  const char *headers[9];
  size_t n = 0;
  char reset[32];
  snprintf(h[n], sizeof(h[n]), "Retry-After: %llu", (unsigned long long)v.retry_after_s);
  headers[n] = h[n], n++;
  const struct {
    const char *what;
    uint64_t limit, remaining, reset_s;
  } dims[] = {{"requests", v.limit_requests, v.remaining_requests, v.reset_requests_s},
              {"tokens", v.limit_tokens, v.remaining_tokens, v.reset_tokens_s}};
  for (size_t d = 0; d < ZG_ARRAY_LEN(dims); d++) {
    if (!dims[d].limit) continue;
    reset_text(dims[d].reset_s, reset, sizeof(reset));
    snprintf(h[n], sizeof(h[n]), "x-ratelimit-limit-%s: %llu", dims[d].what,
             (unsigned long long)dims[d].limit);
    headers[n] = h[n], n++;
    snprintf(h[n], sizeof(h[n]), "x-ratelimit-remaining-%s: %llu", dims[d].what,
             (unsigned long long)dims[d].remaining);
    headers[n] = h[n], n++;
    snprintf(h[n], sizeof(h[n]), "x-ratelimit-reset-%s: %s", dims[d].what, reset);
    headers[n] = h[n], n++;
  }
  headers[n] = NULL;
  static const char *const messages[] = {
      [ACCT_RPM] = "requests-per-minute limit (rpm) of this client token reached",
      [ACCT_TPM] = "tokens-per-minute limit (tpm) of this client token reached",
      [ACCT_BUDGET_DAY] = "daily token budget (budget_day) of this client token is used up",
      [ACCT_BUDGET_MONTH] = "monthly token budget (budget_month) of this client token is used up"};
  static const char *const codes[] = {[ACCT_RPM] = "rate_limit_exceeded",
                                      [ACCT_TPM] = "tokens_rate_limit_exceeded",
                                      [ACCT_BUDGET_DAY] = "budget_exceeded",
                                      [ACCT_BUDGET_MONTH] = "budget_exceeded"};
  return reject(gw, req, 429, codes[v.limit], accounting_limit_name(v.limit), headers,
                messages[v.limit]);
}
