/* repair.c: repairs a torn tail of raft_uv's open segment before libraft
 * reads it (consensus_start calls zg_raft_repair_torn_tail before
 * raft_uv_init).
 *
 * Why: libraft 0.22.1 aborts with a double free when an open segment ends
 * in the middle of a batch (a write torn by power loss, a file cut short):
 * uvSegmentLoadOpen gets RAFT_IOERR ("short read") from the incomplete
 * batch, frees the file buffer that the entries of the batches already
 * loaded point into, and the caller frees those entries again. A tail of
 * zeros (the usual torn write into a preallocated segment) and a complete
 * batch with a bad checksum are RAFT_CORRUPT there, which libraft already
 * truncates itself; only the short read needs help.
 *
 * raft_uv's segment format (format version 1): an 8-byte format version,
 * then batches, each: CRC32 of the header (4), CRC32 of the data (4),
 * entry count n (8), n entry headers of 16 bytes (term 8, type 1, unused
 * 3, data length 4, a multiple of 8), then the entries' data. All
 * integers little-endian. Closed segments are named FIRST-LAST (16 digits
 * each), open ones open-N.
 *
 * What is repaired (as etcd repairs a torn WAL tail): only the last open
 * segment that holds data, and only an incomplete final batch, one that
 * runs past the end of the file. Such a batch was never acknowledged:
 * raft_uv reports an append durable only once the whole batch is written
 * and synced. The file is cut back to the end of its last complete batch
 * (to nothing when there is none: libraft then drops the empty segment).
 * Closed segments, complete batches and anything after a damaged spot that
 * is not the tail are never touched: an earlier open segment ending short
 * while a later one holds data, or an unknown format version, is refused
 * with one line naming the file (the operator restores
 * the node or re-joins it with an empty data dir).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "consensus/internal.h"

#define SEGMENT_FORMAT 1
/* libraft's own bound (UV__MAX_SEGMENT_SIZE / 32 entries per batch). */
#define MAX_BATCH_ENTRIES ((8u * 1024u * 1024u) / 32u)
#define MAX_OPEN_SEGMENTS 64

static uint64_t get64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static bool all_zero(const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return false;
  return true;
}

/* Scans one open segment. *good: end of the last complete batch (0 when the
 * file holds no batch at all); *torn: the final batch runs past the end of
 * the file; *empty: no data (empty file, or never formatted and all zero).
 * -1 with msg for a layout that is not a torn tail. */
static int scan_segment(const uint8_t *buf, size_t len, size_t *good, bool *torn, bool *empty,
                        char *msg, size_t msglen) {
  *good = 0;
  *torn = false;
  *empty = false;
  if (len == 0 || (len >= 8 && get64(buf) == 0 && all_zero(buf, len))) {
    *empty = true;
    return 0;
  }
  if (len < 8) { /* the format version itself was cut */
    *torn = true;
    return 0;
  }
  uint64_t format = get64(buf);
  if (format != SEGMENT_FORMAT) {
    snprintf(msg, msglen, "unknown segment format version %llu", (unsigned long long)format);
    return -1; /* libraft refuses it too; say so before it does */
  }
  size_t off = 8;
  *good = 8;
  while (off < len) {
    size_t left = len - off;
    if (left >= 16 && all_zero(buf + off, 16)) break; /* preallocated zeros: the end */
    if (left < 16) {
      if (!all_zero(buf + off, left)) *torn = true;
      break;
    }
    uint64_t n = get64(buf + off + 8);
    /* A garbled count (torn into preallocated space) is RAFT_CORRUPT in
     * libraft, which truncates an open segment there itself. */
    if (n == 0 || n > MAX_BATCH_ENTRIES) break;
    size_t header = 8 + 8 + (size_t)n * 16;
    if (left < header) {
      *torn = true;
      break;
    }
    uint64_t data = 0;
    for (uint64_t i = 0; i < n; i++) data += get32(buf + off + 16 + i * 16 + 12);
    if (data > len) { /* cannot fit even in the whole file */
      *torn = true;
      break;
    }
    if (left - header < data) {
      *torn = true;
      break;
    }
    off += header + (size_t)data;
    *good = off;
  }
  if (*good == 8 && *torn) *good = 0; /* nothing complete: drop the whole file */
  return 0;
}

static int read_file(const char *path, uint8_t **out, size_t *len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return -1;
  }
  uint8_t *buf = malloc((size_t)st.st_size + 1);
  if (!buf) {
    close(fd);
    return -1;
  }
  size_t got = 0;
  while (got < (size_t)st.st_size) {
    ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += (size_t)r;
  }
  close(fd);
  *out = buf;
  *len = got;
  return 0;
}

static int cmp_counter(const void *a, const void *b) {
  unsigned long long x = *(const unsigned long long *)a, y = *(const unsigned long long *)b;
  return x < y ? -1 : x > y;
}

int zg_raft_repair_torn_tail(const char *raft_dir, char *msg, size_t msglen) {
  msg[0] = '\0';
  DIR *d = opendir(raft_dir);
  if (!d)
    return errno == ENOENT ? 0 : (snprintf(msg, msglen, "%s: %s", raft_dir, strerror(errno)), -1);
  unsigned long long counters[MAX_OPEN_SEGMENTS];
  size_t n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    unsigned long long c;
    char extra;
    if (sscanf(e->d_name, "open-%llu%c", &c, &extra) == 1 && n < MAX_OPEN_SEGMENTS)
      counters[n++] = c;
  }
  closedir(d);
  qsort(counters, n, sizeof counters[0], cmp_counter);
  /* Scan newest first: the first one with data is the tail; any older open
   * segment that is torn is damage in the middle of the log. */
  bool tail_seen = false;
  for (size_t i = n; i-- > 0;) {
    char path[4200];
    snprintf(path, sizeof path, "%s/open-%llu", raft_dir, counters[i]);
    uint8_t *buf;
    size_t len, good;
    bool torn, empty;
    if (read_file(path, &buf, &len) != 0) {
      snprintf(msg, msglen, "%s: cannot read: %s", path, strerror(errno));
      return -1;
    }
    char why[160] = "";
    int rc = scan_segment(buf, len, &good, &torn, &empty, why, sizeof why);
    free(buf);
    if (rc != 0) {
      snprintf(msg, msglen,
               "%s: damaged open Raft segment (%s); not a torn tail, so nothing was changed: "
               "restore this node's data dir or re-join it with an empty one",
               path, why);
      return -1;
    }
    if (empty) continue;
    if (!torn) {
      tail_seen = true;
      continue;
    }
    if (tail_seen) {
      snprintf(
          msg, msglen,
          "%s: open Raft segment ends in the middle of a batch but a later segment holds data; "
          "nothing was changed: restore this node's data dir or re-join it with an empty one",
          path);
      return -1;
    }
    if (truncate(path, (off_t)good) != 0) {
      snprintf(msg, msglen, "%s: cannot cut the torn tail: %s", path, strerror(errno));
      return -1;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      fsync(fd);
      close(fd);
    }
    int dfd = open(raft_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      fsync(dfd);
      close(dfd);
    }
    snprintf(msg, msglen,
             "%s: the last batch was torn (%zu bytes, written but never acknowledged); cut back to "
             "the last complete batch at byte %zu",
             path, len - good, good);
    tail_seen = true;
  }
  return 0;
}
