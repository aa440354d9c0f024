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
 * segment that holds data, and only its final batch when it is damaged or
 * incomplete (runs past the end of the file, a bad count, a checksum
 * mismatch) and nothing valid follows it. Such a batch is a torn write:
 * this node's fsync never confirmed it. The file is cut back to the end of
 * its last good batch (to nothing when there is none: libraft then drops
 * the empty segment). Every batch's checksums are verified as libraft
 * would (zg_raft_crc32).
 *
 * What is refused, changing nothing, with one line naming the file (and the
 * batch and byte offset) and what to do (restore the data dir, or empty it
 * and `zonegate members add` the node again): a damaged batch with further
 * data after it (libraft would silently cut the log there, forgetting
 * entries this node acknowledged), an earlier open segment ending damaged
 * while a later one holds data, an unknown format version. Closed
 * segments are never touched (raft_uv's auto-recovery is off: libraft
 * refuses damage there itself).
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

/* libraft's checksum (byteCrc32: libiberty's CRC-32, polynomial 0x04c11db7,
 * not reflected, no final xor), stored little-endian. */
uint32_t zg_raft_crc32(const void *data, size_t len, uint32_t crc) {
  static uint32_t table[256];
  if (table[1] == 0)
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i << 24;
      for (int k = 0; k < 8; k++) c = (c & 0x80000000u) ? (c << 1) ^ 0x04c11db7u : c << 1;
      table[i] = c;
    }
  const uint8_t *p = data;
  while (len--) crc = (crc << 8) ^ table[((crc >> 24) ^ *p++) & 255];
  return crc;
}

/* Why the batch at off (of the len bytes in buf) is not a good batch, or
 * NULL when it is: then *next is where the next one starts. *short_read:
 * the batch runs past the end of the file. *extent: where the damaged batch
 * ends when its header is intact (0 when the header itself is damaged). */
static const char *check_batch(const uint8_t *buf, size_t len, size_t off, size_t *next,
                               bool *short_read, size_t *extent) {
  size_t left = len - off;
  *short_read = false;
  *extent = 0;
  if (left < 16) {
    *short_read = true;
    return "the batch preamble is cut short";
  }
  uint64_t n = get64(buf + off + 8);
  if (n == 0) return "the entry count is zero";
  if (n > MAX_BATCH_ENTRIES) return "the entry count is out of range";
  size_t header = 16 + (size_t)n * 16;
  if (left < header) {
    *short_read = true;
    return "the batch header is cut short";
  }
  if (zg_raft_crc32(buf + off + 8, header - 8, 0) != get32(buf + off))
    return "header checksum mismatch";
  uint64_t data = 0;
  for (uint64_t i = 0; i < n; i++) data += get32(buf + off + 16 + i * 16 + 12);
  if (data > left - header) {
    *short_read = true;
    return "the batch data is cut short";
  }
  *extent = off + header + (size_t)data;
  if (zg_raft_crc32(buf + off + header, (size_t)data, 0) != get32(buf + off + 4))
    return "data checksum mismatch";
  *next = off + header + (size_t)data;
  return NULL;
}

/* Whether a batch with an intact header starts at some 8-byte aligned
 * offset in [from, len): after a damaged header there is no telling where
 * the next batch would start, so every place is tried. Bounded: past a
 * budget of bytes checksummed it answers true (refusing is the safe side). */
static bool later_batch(const uint8_t *buf, size_t len, size_t from) {
  size_t budget = 64 * len + 4096;
  for (size_t q = (from + 7) & ~(size_t)7; q + 16 <= len; q += 8) {
    uint64_t n = get64(buf + q + 8);
    if (n == 0 || n > (len - q - 16) / 16) continue;
    size_t header = 16 + (size_t)n * 16;
    if (header > budget) return true;
    budget -= header;
    if (zg_raft_crc32(buf + q + 8, header - 8, 0) == get32(buf + q)) return true;
  }
  return false;
}

/* Scans one open segment. *good: end of the last good batch (0 when the
 * file holds no batch at all); *torn: the final batch is damaged or
 * incomplete with nothing valid after it (cut back to *good); *empty: no
 * data (empty file, or never formatted and all zero). -1 with msg for
 * damage that is not a torn tail: a bad batch followed by further batches,
 * or an unknown format. */
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
  for (unsigned nth = 1; off < len; nth++) {
    /* Preallocated zeros: the end of what was written. */
    if (all_zero(buf + off, len - off)) break;
    size_t next, extent;
    bool short_read;
    const char *why = check_batch(buf, len, off, &next, &short_read, &extent);
    if (why == NULL) {
      off = next;
      *good = off;
      continue;
    }
    /* A damaged batch is a torn tail only when nothing valid follows it:
     * after an intact header, only zeros past its extent; after a damaged
     * one, no intact batch header anywhere further on. */
    bool more = short_read ? false
                : extent   ? !all_zero(buf + extent, len - extent)
                           : later_batch(buf, len, off + 8);
    if (more) {
      snprintf(msg, msglen,
               "batch %u at byte %zu is damaged (%s) and further data follows it, so it is not a "
               "torn tail",
               nth, off, why);
      return -1;
    }
    *torn = true;
    break;
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
               "%s: damaged open Raft segment: %s; nothing was changed: restore this node's data "
               "dir from a backup, or empty it and `zonegate members add` the node again",
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
          "%s: open Raft segment ends in a damaged or incomplete batch but a later segment holds "
          "data; nothing was changed: restore this node's data dir from a backup, or empty it "
          "and `zonegate members add` the node again",
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
             "%s: the last batch was torn (%zu bytes damaged or incomplete: a write this node's "
             "fsync never confirmed); cut back to the last complete batch at byte %zu (if the "
             "leader had counted them as stored here, it logs raft_follower_lost_entries and "
             "hands leadership over so they are sent again)",
             path, len - good, good);
    tail_seen = true;
  }
  return 0;
}
