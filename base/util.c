/* util.c: clocks, secret references, hashing, randomness, base64,
 * constant-time compare, growable buffers, size and address parsing and
 * process statistics. Functions report failure by return value; none
 * aborts. Secrets are wiped before they are freed. */
#include "base/base.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

uint64_t zg_mono_ms(void) {
  return uv_hrtime() / 1000000u;
}

uint64_t zg_mono_us(void) {
  return uv_hrtime() / 1000u;
}

uint64_t zg_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void zg_iso8601(uint64_t wall_ms, char out[32]) {
  time_t secs = (time_t)(wall_ms / 1000);
  struct tm tm;
  gmtime_r(&secs, &tm);
  size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(out + n, 32 - n, ".%03uZ", (unsigned)(wall_ms % 1000));
}

int zg_secret_resolve(const char *spec, char **out, bool *was_literal, char *err, size_t errlen) {
  *out = NULL;
  if (was_literal) *was_literal = false;
  if (!spec) {
    snprintf(err, errlen, "no value");
    return -1;
  }
  if (strncmp(spec, "env:", 4) == 0) {
    const char *value = getenv(spec + 4);
    if (!value || !*value) {
      snprintf(err, errlen, "environment variable %s is not set or empty", spec + 4);
      return -1;
    }
    *out = strdup(value);
    return *out ? 0 : -1;
  }
  if (strncmp(spec, "file:", 5) == 0) {
    zg_buf b;
    zg_buf_init(&b);
    if (zg_read_file(spec + 5, &b) != 0) {
      snprintf(err, errlen, "cannot read secret file %s: %s", spec + 5, strerror(errno));
      zg_buf_free(&b);
      return -1;
    }
    while (b.len > 0 && (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == '\r')) b.len--;
    if (b.len == 0) {
      zg_buf_free(&b);
      snprintf(err, errlen, "secret file %s is empty", spec + 5);
      return -1;
    }
    b.data[b.len] = '\0';
    *out = zg_buf_steal(&b);
    return 0;
  }
  if (was_literal) *was_literal = true;
  *out = strdup(spec);
  return *out ? 0 : -1;
}

void zg_secret_free(char *secret) {
  if (!secret) return;
  OPENSSL_cleanse(secret, strlen(secret));
  free(secret);
}

void zg_sha256(const void *data, size_t len, uint8_t out[32]) {
  SHA256(data, len, out);
}

void zg_hmac_sha256(const void *key, size_t keylen, const void *data, size_t len, uint8_t out[32]) {
  unsigned int out_len = 32;
  HMAC(EVP_sha256(), key, (int)keylen, data, len, out, &out_len);
}

void zg_sha256_hex(const void *data, size_t len, char out[65]) {
  uint8_t digest[32];
  SHA256(data, len, digest);
  for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", digest[i]);
}

int zg_random_bytes(void *buf, size_t len) {
  return RAND_bytes(buf, (int)len) == 1 ? 0 : -1;
}

bool zg_ct_equal(const void *a, size_t alen, const void *b, size_t blen) {
  if (alen != blen) return false;
  return CRYPTO_memcmp(a, b, alen) == 0;
}

int zg_base64_encode(const uint8_t *in, size_t len, char *out, size_t outcap) {
  if (outcap < 4 * ((len + 2) / 3) + 1) return -1;
  return EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

int zg_base64_decode(const char *in, uint8_t *out, size_t outcap) {
  size_t inlen = strlen(in);
  if (inlen % 4 != 0 || outcap < inlen / 4 * 3) return -1;
  int n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)inlen);
  if (n < 0) return -1;
  if (inlen >= 1 && in[inlen - 1] == '=') n--;
  if (inlen >= 2 && in[inlen - 2] == '=') n--;
  return n;
}

char *zg_random_token(const char *prefix) {
  uint8_t raw[32];
  if (zg_random_bytes(raw, sizeof(raw)) != 0) return NULL;
  char b64[64];
  zg_base64_encode(raw, sizeof(raw), b64, sizeof(b64));
  OPENSSL_cleanse(raw, sizeof(raw));
  size_t plen = strlen(prefix);
  char *token = malloc(plen + sizeof(b64));
  if (!token) return NULL;
  memcpy(token, prefix, plen);
  size_t j = plen;
  for (size_t i = 0; b64[i]; i++) {
    char c = b64[i];
    if (c == '=') break;
    token[j++] = c == '+' ? '-' : c == '/' ? '_' : c;
  }
  token[j] = '\0';
  OPENSSL_cleanse(b64, sizeof(b64));
  return token;
}

void zg_buf_init(zg_buf *b) {
  b->data = NULL;
  b->len = b->cap = 0;
}

void zg_buf_free(zg_buf *b) {
  free(b->data);
  zg_buf_init(b);
}

void zg_buf_reset(zg_buf *b) {
  b->len = 0;
  if (b->data) b->data[0] = '\0';
}

int zg_buf_reserve(zg_buf *b, size_t extra) {
  if (b->len + extra + 1 <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra + 1) cap *= 2;
  char *data = realloc(b->data, cap);
  if (!data) return -1;
  b->data = data;
  b->cap = cap;
  return 0;
}

int zg_buf_append(zg_buf *b, const void *data, size_t len) {
  if (zg_buf_reserve(b, len) != 0) return -1;
  if (len) memcpy(b->data + b->len, data, len);
  b->len += len;
  b->data[b->len] = '\0';
  return 0;
}

int zg_buf_vappendf(zg_buf *b, const char *fmt, va_list ap) {
  va_list copy;
  va_copy(copy, ap);
  int n = vsnprintf(NULL, 0, fmt, copy);
  va_end(copy);
  if (n < 0 || zg_buf_reserve(b, (size_t)n) != 0) return -1;
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  b->len += (size_t)n;
  return 0;
}

int zg_buf_appendf(zg_buf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = zg_buf_vappendf(b, fmt, ap);
  va_end(ap);
  return rc;
}

int zg_read_file(const char *path, zg_buf *out) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  char chunk[4096];
  size_t n;
  int rc = 0;
  while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
    if (zg_buf_append(out, chunk, n) != 0) {
      errno = ENOMEM;
      rc = -1;
      break;
    }
  if (rc == 0 && ferror(f)) rc = -1;
  int saved = errno;
  fclose(f);
  OPENSSL_cleanse(chunk, sizeof(chunk));
  errno = saved;
  if (rc == 0 && zg_buf_append(out, "", 0) != 0) rc = -1;
  return rc;
}

char *zg_buf_steal(zg_buf *b) {
  if (!b->data && zg_buf_append(b, "", 0) != 0) return NULL;
  char *data = b->data;
  zg_buf_init(b);
  return data;
}

size_t zg_copy_cut(char *dst, size_t size, const char *src) {
  size_t len = 0;
  while (len + 1 < size && src[len]) len++;
  memcpy(dst, src, len);
  dst[len] = '\0';
  return len;
}

size_t zg_bufs_consume(uv_buf_t *bufs, unsigned *nbufs, size_t done) {
  unsigned first = 0;
  while (first < *nbufs && done >= bufs[first].len) done -= bufs[first++].len;
  size_t left = 0;
  for (unsigned i = first; i < *nbufs; i++) {
    bufs[i - first] = bufs[i];
    if (i == first) {
      bufs[0].base += done;
      bufs[0].len -= (unsigned)done;
    }
    left += bufs[i - first].len;
  }
  *nbufs -= first;
  return left;
}

size_t zg_edit_distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 64 || lb > 64) return (size_t)-1;
  size_t prev[65], cur[65];
  for (size_t j = 0; j <= lb; j++) prev[j] = j;
  for (size_t i = 1; i <= la; i++) {
    cur[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      size_t cost = tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 1]) ? 0 : 1;
      size_t best = prev[j] + 1;
      if (cur[j - 1] + 1 < best) best = cur[j - 1] + 1;
      if (prev[j - 1] + cost < best) best = prev[j - 1] + cost;
      cur[j] = best;
    }
    memcpy(prev, cur, sizeof(size_t) * (lb + 1));
  }
  return prev[lb];
}

int zg_parse_size(const char *text, uint64_t *bytes) {
  char *end;
  errno = 0;
  double value = strtod(text, &end);
  if (end == text || errno || value < 0) return -1;
  while (*end == ' ') end++;
  uint64_t mult = 1;
  if (!*end || !strcasecmp(end, "B"))
    mult = 1;
  else if (!strcasecmp(end, "K") || !strcasecmp(end, "KB") || !strcasecmp(end, "KiB"))
    mult = 1ull << 10;
  else if (!strcasecmp(end, "M") || !strcasecmp(end, "MB") || !strcasecmp(end, "MiB"))
    mult = 1ull << 20;
  else if (!strcasecmp(end, "G") || !strcasecmp(end, "GB") || !strcasecmp(end, "GiB"))
    mult = 1ull << 30;
  else
    return -1;
  *bytes = (uint64_t)(value * (double)mult);
  return 0;
}

int zg_split_host_port(const char *addr, char *host, size_t hostlen, int *port) {
  const char *colon;
  const char *host_start = addr;
  size_t host_len;
  if (addr[0] == '[') {
    const char *close = strchr(addr, ']');
    if (!close || close[1] != ':') return -1;
    host_start = addr + 1;
    host_len = (size_t)(close - host_start);
    colon = close + 1;
  } else {
    colon = strrchr(addr, ':');
    if (!colon) return -1;
    host_len = (size_t)(colon - addr);
  }
  if (host_len == 0 || host_len >= hostlen) return -1;
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || p < 0 || p > 65535) return -1;
  memcpy(host, host_start, host_len);
  host[host_len] = '\0';
  *port = (int)p;
  return 0;
}

uint64_t zg_process_rss_bytes(void) {
  size_t rss = 0;
  if (uv_resident_set_memory(&rss) != 0) return 0;
  return rss;
}

double zg_process_cpu_seconds(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

bool zg_cidr_ok(const char *cidr) {
  char net[64];
  if (!cidr || strlen(cidr) >= sizeof(net)) return false;
  snprintf(net, sizeof(net), "%s", cidr);
  char *slash = strchr(net, '/');
  long bits = -1;
  if (slash) {
    *slash = '\0';
    char *end;
    if (!slash[1] || slash[1] == '-' || slash[1] == '+') return false;
    bits = strtol(slash + 1, &end, 10);
    if (*end) return false;
  }
  unsigned char a[16];
  int family = strchr(net, ':') ? AF_INET6 : AF_INET;
  if (inet_pton(family, net, a) != 1) return false;
  return bits <= (family == AF_INET6 ? 128 : 32);
}
