/* test_raft_repair: the torn-tail repair of raft_uv's open segment
 * (consensus/repair.c) on hand-made segments in raft_uv's format: an
 * incomplete final batch is cut back to the last complete batch (to nothing
 * when there is none); intact segments, preallocated zeros and closed
 * segments are left alone; a torn open segment followed by a later one
 * with data is refused and nothing changes; so is an unknown format, and
 * so is a damaged batch in the middle of an open segment (a flipped data
 * byte, a zeroed entry count, a garbled count) with valid batches after
 * it, while the same damage in the final batch is a torn tail and cut.
 * (tests/integration/test_damaged_state.py truncates a real node's open
 * segment in the middle of an entry and restarts it.) */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "consensus/internal.h"

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Appends a batch of n entries of `len` bytes each, with libraft's
 * checksums. Returns the new size. */
static size_t batch(uint8_t *buf, size_t off, unsigned n, uint32_t len) {
  put32(buf + off, 0);
  put32(buf + off + 4, 0);
  put64(buf + off + 8, n);
  size_t p = off + 16;
  for (unsigned i = 0; i < n; i++, p += 16) {
    put64(buf + p, 1); /* term */
    buf[p + 8] = 1;    /* RAFT_COMMAND */
    put32(buf + p + 12, len);
  }
  memset(buf + p, 0xab, (size_t)n * len);
  put32(buf + off, zg_raft_crc32(buf + off + 8, p - off - 8, 0));
  put32(buf + off + 4, zg_raft_crc32(buf + p, (size_t)n * len, 0));
  return p + (size_t)n * len;
}

static char dir[] = "/tmp/zg-repair-XXXXXX";

static void write_file(const char *name, const uint8_t *buf, size_t len) {
  char path[256];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(buf, 1, len, f), len);
  fclose(f);
}

static long file_size(const char *name) {
  char path[256];
  struct stat st;
  snprintf(path, sizeof path, "%s/%s", dir, name);
  return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static int setup(void **state) {
  (void)state;
  strcpy(dir, "/tmp/zg-repair-XXXXXX");
  assert_non_null(mkdtemp(dir));
  return 0;
}

static int teardown(void **state) {
  (void)state;
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  return system(cmd) == 0 ? 0 : -1;
}

/* format + batch(2 x 8) + batch(1 x 16): sizes 8, 56, 96 */
static size_t two_batches(uint8_t *buf, size_t *end1) {
  put64(buf, 1);
  *end1 = batch(buf, 8, 2, 8);
  return batch(buf, *end1, 1, 16);
}

static void test_torn_final_batch_is_cut(void **state) {
  (void)state;
  uint8_t buf[256] = {0};
  size_t end1, end2 = two_batches(buf, &end1);
  write_file("open-1", buf, end2 - 5); /* cut in the last entry's data */
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_non_null(strstr(msg, "open-1"));
  assert_int_equal(file_size("open-1"), (long)end1);
  /* Cut in the middle of the second batch's header. */
  write_file("open-1", buf, end1 + 20);
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_int_equal(file_size("open-1"), (long)end1);
}

static void test_torn_only_batch_empties_the_file(void **state) {
  (void)state;
  uint8_t buf[256] = {0};
  size_t end1;
  two_batches(buf, &end1);
  write_file("open-2", buf, 30);
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_int_equal(file_size("open-2"), 0);
}

static void test_intact_and_zero_tails_untouched(void **state) {
  (void)state;
  uint8_t buf[4096] = {0};
  size_t end1, end2 = two_batches(buf, &end1);
  write_file("open-1", buf, end2);
  write_file("open-2", buf, sizeof buf); /* preallocated zeros after the data */
  uint8_t zeros[4096] = {0};
  write_file("open-3", zeros, sizeof zeros); /* never written */
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_string_equal(msg, "");
  assert_int_equal(file_size("open-1"), (long)end2);
  assert_int_equal(file_size("open-2"), (long)sizeof buf);
  assert_int_equal(file_size("open-3"), (long)sizeof zeros);
}

static void test_closed_segment_never_touched(void **state) {
  (void)state;
  uint8_t buf[256] = {0};
  size_t end1, end2 = two_batches(buf, &end1);
  write_file("0000000000000001-0000000000000003", buf, end2 - 5);
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_int_equal(file_size("0000000000000001-0000000000000003"), (long)(end2 - 5));
}

static void test_torn_middle_segment_refused(void **state) {
  (void)state;
  uint8_t buf[256] = {0};
  size_t end1, end2 = two_batches(buf, &end1);
  write_file("open-1", buf, end2 - 5); /* torn ... */
  write_file("open-2", buf, end2);     /* ... but a later segment has data */
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), -1);
  assert_non_null(strstr(msg, "open-1"));
  assert_non_null(strstr(msg, "members add"));
  assert_int_equal(file_size("open-1"), (long)(end2 - 5));
  assert_int_equal(file_size("open-2"), (long)end2);
}

static void test_unknown_format_refused(void **state) {
  (void)state;
  uint8_t buf[64] = {0};
  put64(buf, 7);
  write_file("open-1", buf, sizeof buf);
  char msg[512];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), -1);
  assert_non_null(strstr(msg, "format"));
  assert_int_equal(file_size("open-1"), (long)sizeof buf);
}

/* format + five batches of 2 x 8 bytes; ends[i]: the end of batch i. */
static size_t five_batches(uint8_t *buf, size_t ends[6]) {
  put64(buf, 1);
  ends[0] = 8;
  for (int i = 1; i <= 5; i++) ends[i] = batch(buf, ends[i - 1], 2, 8);
  return ends[5];
}

static void refused_unchanged(const char *name, const uint8_t *buf, size_t len, size_t at) {
  write_file(name, buf, len);
  char msg[512], offset[64];
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), -1);
  assert_non_null(strstr(msg, name));
  snprintf(offset, sizeof offset, "at byte %zu", at);
  assert_non_null(strstr(msg, offset));
  assert_non_null(strstr(msg, "members add"));
  assert_int_equal(file_size(name), (long)len);
}

static void test_flip_in_the_middle_refused(void **state) {
  (void)state;
  uint8_t buf[4096] = {0};
  size_t ends[6], end = five_batches(buf, ends);
  buf[ends[2] + 16 + 32 + 1] ^= 0x55; /* a data byte of batch 3 */
  refused_unchanged("open-1", buf, end, ends[2]);
  refused_unchanged("open-1", buf, sizeof buf, ends[2]); /* preallocated zeros after */
}

static void test_zero_count_in_the_middle_refused(void **state) {
  (void)state;
  uint8_t buf[4096] = {0};
  size_t ends[6], end = five_batches(buf, ends);
  put64(buf + ends[1] + 8, 0); /* batch 2's entry count */
  refused_unchanged("open-1", buf, end, ends[1]);
  put64(buf + ends[1] + 8, 0xffffffffffffull); /* garbled */
  refused_unchanged("open-1", buf, end, ends[1]);
  put64(buf + ends[1] + 8, 3); /* plausible, but the header checksum fails */
  refused_unchanged("open-1", buf, end, ends[1]);
}

static void test_damaged_last_batch_is_a_torn_tail(void **state) {
  (void)state;
  uint8_t buf[4096] = {0};
  size_t ends[6], end = five_batches(buf, ends);
  char msg[512];
  /* a data byte of the last batch, preallocated zeros after */
  buf[ends[4] + 40] ^= 0x55;
  write_file("open-1", buf, sizeof buf);
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_non_null(strstr(msg, "torn"));
  assert_null(strstr(msg, "never acknowledged"));
  assert_int_equal(file_size("open-1"), (long)ends[4]);
  /* a garbled count in the last batch, cut a few bytes later */
  five_batches(buf, ends);
  put64(buf + ends[4] + 8, ~0ull);
  write_file("open-1", buf, ends[4] + 20);
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_int_equal(file_size("open-1"), (long)ends[4]);
  /* intact: untouched */
  five_batches(buf, ends);
  write_file("open-1", buf, end);
  assert_int_equal(zg_raft_repair_torn_tail(dir, msg, sizeof msg), 0);
  assert_string_equal(msg, "");
  assert_int_equal(file_size("open-1"), (long)end);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_torn_final_batch_is_cut, setup, teardown),
      cmocka_unit_test_setup_teardown(test_torn_only_batch_empties_the_file, setup, teardown),
      cmocka_unit_test_setup_teardown(test_intact_and_zero_tails_untouched, setup, teardown),
      cmocka_unit_test_setup_teardown(test_closed_segment_never_touched, setup, teardown),
      cmocka_unit_test_setup_teardown(test_torn_middle_segment_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_unknown_format_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_flip_in_the_middle_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_zero_count_in_the_middle_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_damaged_last_batch_is_a_torn_tail, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
