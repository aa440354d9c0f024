/* sysstat.c: memory and CPU samples of this node, read one way for every
 * module (the alert engine's rules, the gateway's deep health check).
 *
 * Memory: the cgroup's limit and usage when a limit below the machine's
 * memory is set (cgroup v2 at this process's own cgroup path, else v1),
 * otherwise the machine (/proc/meminfo: MemTotal, MemAvailable). CPU:
 * system-wide busy and total jiffies from the "cpu" line of /proc/stat.
 *
 * Failure modes: an unreadable or unparsable file makes the sample fail
 * (-1); callers skip the rule or fall back to libuv's totals.
 */
#include "base/base.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

/* ---- system samples --------------------------------------------------- */

int zg_parse_proc_stat(const char *text, uint64_t *busy, uint64_t *total) {
  const char *line = strstr(text, "cpu ");
  if (!line) return -1;
  unsigned long long v[8] = {0};
  int n = sscanf(line, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                 &v[4], &v[5], &v[6], &v[7]);
  if (n < 4) return -1;
  uint64_t sum = 0;
  for (int i = 0; i < n; i++) sum += v[i];
  uint64_t idle = v[3] + (n > 4 ? v[4] : 0); /* idle + iowait */
  *total = sum;
  *busy = sum - idle;
  return 0;
}

static bool meminfo_field(const char *text, const char *name, uint64_t *kib) {
  size_t len = strlen(name);
  for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
    unsigned long long v;
    if (strncmp(p, name, len) == 0 && p[len] == ':' && sscanf(p + len + 1, "%llu", &v) == 1) {
      *kib = v;
      return true;
    }
  }
  return false;
}

int zg_parse_meminfo(const char *text, double *used_percent) {
  uint64_t total, available;
  if (!meminfo_field(text, "MemTotal", &total) ||
      !meminfo_field(text, "MemAvailable", &available) || total == 0 || available > total)
    return -1;
  *used_percent = 100.0 * (1.0 - (double)available / (double)total);
  return 0;
}

/* Reads a small file into buf (NUL-terminated). 0 ok, -1. */
static int read_small_file(const char *path, char *buf, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, cap - 1, f);
  fclose(f);
  buf[n] = '\0';
  return n > 0 ? 0 : -1;
}

/* cgroup v2 (memory.current / memory.max) or v1 (usage / limit) when a
 * limit below the machine's memory is set. 0 ok, -1 = no limit. */
static int cgroup_memory(uint64_t mem_total_bytes, uint64_t *usage_out, uint64_t *limit_out) {
  char cg[512], path[700], cur[64], max[64];
  const char *rel = "";
  if (read_small_file("/proc/self/cgroup", cg, sizeof(cg)) == 0) {
    char *v2 = strstr(cg, "0::");
    if (v2) {
      rel = v2 + 3;
      v2[3 + strcspn(v2 + 3, "\n")] = '\0';
      if (strcmp(rel, "/") == 0) rel = "";
    }
  }
  unsigned long long usage, limit;
  snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.max", rel);
  if (read_small_file(path, max, sizeof(max)) != 0) {
    /* cgroup v1 */
    if (read_small_file("/sys/fs/cgroup/memory/memory.limit_in_bytes", max, sizeof(max)) != 0 ||
        read_small_file("/sys/fs/cgroup/memory/memory.usage_in_bytes", cur, sizeof(cur)) != 0)
      return -1;
  } else {
    snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.current", rel);
    if (read_small_file(path, cur, sizeof(cur)) != 0) return -1;
  }
  if (sscanf(max, "%llu", &limit) != 1 || sscanf(cur, "%llu", &usage) != 1) return -1; /* "max" */
  if (limit == 0 || (mem_total_bytes && limit >= mem_total_bytes)) return -1;
  *usage_out = usage;
  *limit_out = limit;
  return 0;
}

int zg_cpu_sample(uint64_t *busy, uint64_t *total) {
  char text[4096];
  if (read_small_file("/proc/stat", text, sizeof(text)) != 0) return -1;
  return zg_parse_proc_stat(text, busy, total);
}

int zg_memory_sample(struct zg_memory_sample *out) {
  char text[8192];
  uint64_t total_kib = 0, usage = 0, limit = 0;
  memset(out, 0, sizeof(*out));
  bool have_meminfo = read_small_file("/proc/meminfo", text, sizeof(text)) == 0;
  if (have_meminfo) meminfo_field(text, "MemTotal", &total_kib);
  if (cgroup_memory(total_kib * 1024u, &usage, &limit) == 0) {
    out->source = "cgroup";
    out->limit_bytes = limit;
    out->used_bytes = usage;
    out->used_percent = 100.0 * (double)usage / (double)limit;
    return 0;
  }
  out->source = "system";
  if (!have_meminfo || zg_parse_meminfo(text, &out->used_percent) != 0) return -1;
  out->limit_bytes = total_kib * 1024u;
  out->used_bytes = (uint64_t)((double)out->limit_bytes * out->used_percent / 100.0);
  return 0;
}

uint64_t zg_memory_limit_bytes(void) {
  struct zg_memory_sample m;
  if (zg_memory_sample(&m) == 0 && m.limit_bytes) return m.limit_bytes;
  return uv_get_total_memory();
}
