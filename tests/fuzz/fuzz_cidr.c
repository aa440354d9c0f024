/* fuzz_cidr: the client-token IP allowlist match, gateway_cidr_match()
 * (gateway/auth.c). Input: "<cidr>\n<ip>" (anything after a second
 * newline is ignored).
 *
 * A reference in this file parses both sides itself (dotted quads; RFC
 * 4291 IPv6 text with "::" and a trailing dotted quad; the prefix as 1-3
 * decimal digits up to 32 or 128) and compares the first `prefix` bits.
 * gateway_cidr_match() must agree with it on every input; in particular a
 * malformed CIDR or address never matches, an IPv4 address never matches
 * an IPv6 network or the other way round, and a CIDR the token API would
 * refuse (zg_cidr_valid) never matches anything. The reference parser is
 * also checked against inet_pton() so that a disagreement points at the
 * matcher, not at the reference.
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consensus/internal.h"
#include "gateway/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

static bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

static int hex_value(char c) {
  if (is_digit(c)) return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* s[0..n): four decimal parts 0-255, no leading zeros (as glibc). */
static bool ref_ipv4(const char *s, size_t n, uint8_t out[4]) {
  size_t at = 0;
  for (int part = 0; part < 4; part++) {
    if (part > 0) {
      if (at >= n || s[at] != '.') return false;
      at++;
    }
    size_t start = at;
    unsigned v = 0;
    while (at < n && is_digit(s[at]) && at - start < 4) v = v * 10 + (unsigned)(s[at++] - '0');
    size_t digits = at - start;
    if (digits == 0 || digits > 3 || v > 255 || (digits > 1 && s[start] == '0')) return false;
    out[part] = (uint8_t)v;
  }
  return at == n;
}

/* s[0..n): RFC 4291 §2.2 text: eight groups of 1-4 hex digits, one "::"
 * for one or more zero groups, the last 32 bits optionally dotted. */
static bool ref_ipv6(const char *s, size_t n, uint8_t out[16]) {
  uint16_t head[8], tail[8];
  size_t nh = 0, nt = 0, at = 0;
  bool gap = false;
  uint8_t v4[4];
  bool have_v4 = false;
  if (n >= 2 && s[0] == ':' && s[1] == ':') {
    gap = true;
    at = 2;
  } else if (n >= 1 && s[0] == ':') {
    return false;
  }
  while (at < n) {
    /* a trailing dotted quad? */
    size_t end = at;
    while (end < n && s[end] != ':') end++;
    if (end == n && memchr(s + at, '.', n - at)) {
      if (!ref_ipv4(s + at, n - at, v4)) return false;
      have_v4 = true;
      at = n;
      break;
    }
    size_t start = at;
    unsigned v = 0;
    while (at < n && hex_value(s[at]) >= 0 && at - start < 5)
      v = v * 16 + (unsigned)hex_value(s[at++]);
    if (at == start || at - start > 4) return false;
    if (nh + nt >= 8) return false;
    if (gap)
      tail[nt++] = (uint16_t)v;
    else
      head[nh++] = (uint16_t)v;
    if (at == n) break;
    if (s[at] != ':') return false;
    at++;
    if (at < n && s[at] == ':') {
      if (gap) return false;
      gap = true;
      at++;
      if (at == n) break;
    } else if (at == n) {
      return false; /* a trailing single ':' */
    }
  }
  size_t groups = nh + nt + (have_v4 ? 2 : 0);
  if (gap ? groups > 7 : groups != 8) return false;
  uint16_t all[8] = {0};
  for (size_t i = 0; i < nh; i++) all[i] = head[i];
  size_t tail_start = 8 - nt - (have_v4 ? 2 : 0);
  for (size_t i = 0; i < nt; i++) all[tail_start + i] = tail[i];
  for (size_t i = 0; i < 8; i++) {
    out[2 * i] = (uint8_t)(all[i] >> 8);
    out[2 * i + 1] = (uint8_t)all[i];
  }
  if (have_v4) memcpy(out + 12, v4, 4);
  return true;
}

/* 4 (IPv4), 6 (IPv6) or 0 (neither). */
static int ref_addr(const char *s, size_t n, uint8_t out[16]) {
  if (memchr(s, ':', n)) return ref_ipv6(s, n, out) ? 6 : 0;
  return ref_ipv4(s, n, out) ? 4 : 0;
}

static bool ref_match(const char *cidr, const char *ip) {
  const char *slash = strchr(cidr, '/');
  size_t alen = slash ? (size_t)(slash - cidr) : strlen(cidr);
  uint8_t net[16], addr[16];
  int family = ref_addr(cidr, alen, net);
  if (!family) return false;
  unsigned max = family == 4 ? 32 : 128, bits = max;
  if (slash) {
    const char *p = slash + 1;
    size_t digits = strlen(p);
    if (digits == 0 || digits > 3) return false;
    bits = 0;
    for (; *p; p++) {
      if (!is_digit(*p)) return false;
      bits = bits * 10 + (unsigned)(*p - '0');
    }
    if (bits > max) return false;
  }
  if (ref_addr(ip, strlen(ip), addr) != family) return false;
  for (unsigned i = 0; i < bits; i++) {
    unsigned mask = 0x80u >> (i % 8);
    if ((net[i / 8] & mask) != (addr[i / 8] & mask)) return false;
  }
  return true;
}

/* The reference parser agrees with inet_pton on s. */
static void check_reference_parser(const char *s) {
  uint8_t mine[16], theirs[16];
  int family = ref_addr(s, strlen(s), mine);
  bool v4 = inet_pton(AF_INET, s, theirs) == 1;
  if (v4) CHECK(family == 4 && memcmp(mine, theirs, 4) == 0);
  bool v6 = inet_pton(AF_INET6, s, theirs) == 1;
  if (v6) CHECK(family == 6 && memcmp(mine, theirs, 16) == 0);
  if (!v4 && !v6) CHECK(family == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 512) return 0;
  char text[513];
  memcpy(text, data, size);
  text[size] = '\0';
  if (strlen(text) != size) return 0; /* C strings only */
  char *nl = strchr(text, '\n');
  if (!nl) return 0;
  *nl = '\0';
  const char *cidr = text, *ip = nl + 1;
  char *nl2 = strchr(ip, '\n');
  if (nl2) *nl2 = '\0';

  check_reference_parser(ip);
  char addr_part[513];
  snprintf(addr_part, sizeof addr_part, "%.*s", (int)strcspn(cidr, "/"), cidr);
  check_reference_parser(addr_part);

  bool got = gateway_cidr_match(cidr, ip);
  bool want = ref_match(cidr, ip);
  if (got != want)
    fprintf(stderr, "cidr \"%s\" ip \"%s\": gateway_cidr_match %d, reference %d\n", cidr, ip, got,
            want);
  CHECK(got == want);
  if (!zg_cidr_valid(cidr)) CHECK(!got);
  /* A network always contains its own address. */
  if (ref_match(cidr, addr_part)) CHECK(gateway_cidr_match(cidr, addr_part));
  return 0;
}
