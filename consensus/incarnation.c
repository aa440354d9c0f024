/* incarnation.c: the cluster incarnation id in data_dir/incarnation.
 *
 * `zonegate recover --force` rebuilds a one-voter cluster out of one
 * survivor's log. A node that still holds the log of the cluster before
 * that recovery must never exchange raft messages with it: the two logs
 * disagree about entries both consider committed, and libraft aborts on
 * it. So every data dir carries the incarnation of the cluster it belongs
 * to, the peer handshake carries it (transport.c), and nodes of different
 * incarnations refuse each other.
 *
 * An incarnation is 16 bytes, stored as 32 lowercase hex digits and a
 * newline: 8 bytes big-endian wall-clock milliseconds of its creation,
 * then 8 bytes that tell incarnations apart.
 *  - bootstrap: time 0 and the first 8 bytes of SHA-256 of the bootstrap
 *    configuration. Every node of a new cluster bootstraps on its own (no
 *    coordination), so the value must be the same on all of them: it is
 *    derived from what they all agree on.
 *  - a data dir written by a zonegate without incarnations (raft data, no
 *    file): all zeros, the "first incarnation" of such a cluster;
 *  - `recover --force`: the time of the recovery and 8 random bytes. The
 *    time is what tells, in the refusal message, which side is the stale
 *    one (the older incarnation);
 *  - a node joining with an empty log adopts the incarnation of the first
 *    authenticated peer that tells it one (the leader adding it).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "base/base.h"
#include "consensus/internal.h"

#define INCARNATION_FILE "incarnation"
/* Written when a peer of a newer incarnation was met (transport.c):
 * "<newer incarnation> <peer raft address>". */
#define SUPERSEDED_FILE "superseded"

void zg_incarnation_hex(const struct zg_incarnation *inc, char out[ZG_INCARNATION_HEX + 1]) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < ZG_INCARNATION_LEN; i++) {
    out[2 * i] = digits[inc->b[i] >> 4];
    out[2 * i + 1] = digits[inc->b[i] & 15];
  }
  out[ZG_INCARNATION_HEX] = '\0';
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

int zg_incarnation_parse(const char *text, size_t len, struct zg_incarnation *out) {
  if (len != ZG_INCARNATION_HEX) return -1;
  for (int i = 0; i < ZG_INCARNATION_LEN; i++) {
    int hi = hex_digit(text[2 * i]), lo = hex_digit(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return -1;
    out->b[i] = (uint8_t)(hi << 4 | lo);
  }
  return 0;
}

uint64_t zg_incarnation_time(const struct zg_incarnation *inc) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = v << 8 | inc->b[i];
  return v;
}

void zg_incarnation_legacy(struct zg_incarnation *out) {
  memset(out, 0, sizeof *out);
}

void zg_incarnation_bootstrap(const struct raft_configuration *conf, struct zg_incarnation *out) {
  zg_buf b;
  zg_buf_init(&b);
  zg_buf_appendf(&b, "zonegate-incarnation-v1\n");
  for (unsigned i = 0; i < conf->n; i++)
    zg_buf_appendf(&b, "%llu %s %d\n", (unsigned long long)conf->servers[i].id,
                   conf->servers[i].address, conf->servers[i].role);
  uint8_t digest[32];
  zg_sha256(b.data ? b.data : "", b.len, digest);
  zg_buf_free(&b);
  memset(out->b, 0, 8);
  memcpy(out->b + 8, digest, 8);
}

int zg_incarnation_new(struct zg_incarnation *out) {
  uint64_t now = zg_wall_ms();
  if (now == 0) now = 1; /* never looks like a bootstrap incarnation */
  for (int i = 0; i < 8; i++) out->b[i] = (uint8_t)(now >> (56 - 8 * i));
  return zg_random_bytes(out->b + 8, 8);
}

int zg_incarnation_load(const char *data_dir, struct zg_incarnation *out, char *err,
                        size_t errlen) {
  char path[4200], buf[128];
  snprintf(path, sizeof path, "%s/%s", data_dir, INCARNATION_FILE);
  FILE *f = fopen(path, "r");
  if (f == NULL) {
    if (errno == ENOENT) return 1;
    snprintf(err, errlen, "open(%s): %s", path, strerror(errno));
    return -1;
  }
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ')) buf[--n] = '\0';
  if (zg_incarnation_parse(buf, n, out) != 0) {
    snprintf(err, errlen,
             "%s does not hold a cluster incarnation (32 hex digits); if this data dir is from "
             "another cluster incarnation, empty it and add the node again with `zonegate members "
             "add`",
             path);
    return -1;
  }
  return 0;
}

int zg_incarnation_store(const char *data_dir, const struct zg_incarnation *inc, char *err,
                         size_t errlen) {
  char path[4200], tmp[4300], text[ZG_INCARNATION_HEX + 2];
  snprintf(path, sizeof path, "%s/%s", data_dir, INCARNATION_FILE);
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  zg_incarnation_hex(inc, text);
  text[ZG_INCARNATION_HEX] = '\n';
  text[ZG_INCARNATION_HEX + 1] = '\0';
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  bool ok = fd >= 0;
  if (ok) {
    ok = write(fd, text, ZG_INCARNATION_HEX + 1) == ZG_INCARNATION_HEX + 1 && fsync(fd) == 0;
    close(fd);
    ok = ok && rename(tmp, path) == 0;
  }
  if (ok) { /* the rename itself must survive a crash */
    int dfd = open(data_dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
      fsync(dfd);
      close(dfd);
    }
  }
  if (!ok) {
    snprintf(err, errlen, "writing %s: %s", path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  return 0;
}

int zg_incarnation_clear_superseded(const char *data_dir) {
  char marker[4200];
  snprintf(marker, sizeof marker, "%s/%s", data_dir, SUPERSEDED_FILE);
  return unlink(marker) == 0 || errno == ENOENT ? 0 : -1;
}

int zg_incarnation_remove(const char *data_dir) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", data_dir, INCARNATION_FILE);
  if (zg_incarnation_clear_superseded(data_dir) != 0) return -1;
  return unlink(path) == 0 || errno == ENOENT ? 0 : -1;
}

int zg_incarnation_mark_superseded(const char *data_dir, const struct zg_incarnation *newer,
                                   const char *peer) {
  char path[4200], hex[ZG_INCARNATION_HEX + 1];
  snprintf(path, sizeof path, "%s/%s", data_dir, SUPERSEDED_FILE);
  zg_incarnation_hex(newer, hex);
  FILE *f = fopen(path, "w");
  if (f == NULL) return -1;
  int ok = fprintf(f, "%s %.200s\n", hex, peer && peer[0] ? peer : "?") > 0;
  ok = fflush(f) == 0 && fsync(fileno(f)) == 0 && ok;
  return fclose(f) == 0 && ok ? 0 : -1;
}

int zg_incarnation_superseded(const char *data_dir, char *out, size_t outlen) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", data_dir, SUPERSEDED_FILE);
  FILE *f = fopen(path, "r");
  if (f == NULL) return 0;
  if (fgets(out, (int)outlen, f) == NULL) out[0] = '\0';
  fclose(f);
  size_t n = strlen(out);
  while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r')) out[--n] = '\0';
  return 1;
}
