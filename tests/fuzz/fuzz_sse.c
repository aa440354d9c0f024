/* fuzz_sse: event-boundary tracking of a passed-through SSE stream
 * (gateway/sse.h). Input: [4] split seed, then the stream bytes.
 *
 * A reference written from the spec (WHATWG HTML §9.2.6: lines end with
 * CRLF, LF or CR; an empty line ends an event; the start of the stream is
 * on a boundary) lists every offset a piece may end on and be on an event
 * boundary: just past an empty line's terminator, and for a CRLF
 * terminator also between its CR and LF (a piece that ends there has
 * ended the event; its LF comes next). Then, for the stream fed whole, fed
 * one byte at a time, and split at seed-chosen points, each piece's answer
 * must be the last reference boundary inside that piece (0 when none).
 * So the answers do not depend on how the stream is split, and every
 * boundary returned is preceded by an empty line.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gateway/sse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

/* is_boundary[b] for b in 0..n: a piece ending at b ends on a boundary. */
static void reference(const char *s, size_t n, bool *is_boundary) {
  memset(is_boundary, 0, n + 1);
  size_t line_start = 0, pos = 0;
  while (pos < n) {
    char c = s[pos];
    if (c != '\r' && c != '\n') {
      pos++;
      continue;
    }
    bool crlf = c == '\r' && pos + 1 < n && s[pos + 1] == '\n';
    if (pos == line_start) { /* an empty line */
      is_boundary[pos + 1] = true;
      if (crlf) is_boundary[pos + 2] = true;
    }
    pos += crlf ? 2 : 1;
    line_start = pos;
  }
}

/* The answer expected for the piece [from, to). */
static size_t expected(const bool *is_boundary, size_t from, size_t to) {
  for (size_t b = to; b > from; b--)
    if (is_boundary[b]) return b - from;
  return 0;
}

/* Feeds the pieces cut at the sorted points cuts[0..k) and checks each. */
static void feed_split(const char *s, size_t n, const bool *is_boundary, const size_t *cuts,
                       size_t k) {
  struct sse_cursor cur;
  sse_cursor_init(&cur);
  size_t from = 0;
  for (size_t i = 0; i <= k; i++) {
    size_t to = i < k ? cuts[i] : n;
    if (to < from) to = from;
    size_t got = sse_last_boundary(&cur, s + from, to - from);
    size_t want = expected(is_boundary, from, to);
    if (got != want)
      fprintf(stderr, "piece [%zu,%zu) of %zu: got %zu, want %zu\n", from, to, n, got, want);
    CHECK(got == want);
    from = to;
  }
}

static int cmp_size(const void *a, const void *b) {
  size_t x = *(const size_t *)a, y = *(const size_t *)b;
  return x < y ? -1 : x > y;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 4) return 0;
  uint32_t seed = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 |
                  (uint32_t)data[3] << 24;
  const char *s = (const char *)data + 4;
  size_t n = size - 4;
  bool *is_boundary = malloc(n + 2);
  size_t *cuts = malloc((n + 9) * sizeof(*cuts));
  CHECK(is_boundary && cuts);
  reference(s, n, is_boundary);

  /* Every reference boundary is preceded by an empty line (or is the CR|LF
   * middle of an empty line's CRLF). */
  for (size_t b = 1; b <= n; b++) {
    if (!is_boundary[b]) continue;
    char last = s[b - 1];
    CHECK(last == '\n' || last == '\r');
    size_t t = last == '\n' && b >= 2 && s[b - 2] == '\r' ? b - 2 : b - 1; /* terminator start */
    bool empty_line = t == 0 || s[t - 1] == '\n' || s[t - 1] == '\r';
    if (!empty_line) CHECK(last == '\n' && is_boundary[b - 1]); /* CR|LF middle was a boundary */
  }

  feed_split(s, n, is_boundary, NULL, 0); /* whole */
  for (size_t i = 0; i < n; i++) cuts[i] = i + 1;
  feed_split(s, n, is_boundary, cuts, n); /* byte by byte */
  /* Seed-chosen cuts: up to 8 points. */
  size_t k = n ? seed % 9 : 0;
  uint32_t x = seed | 1;
  for (size_t i = 0; i < k; i++) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    cuts[i] = x % (n + 1);
  }
  qsort(cuts, k, sizeof(*cuts), cmp_size);
  feed_split(s, n, is_boundary, cuts, k);
  /* Cut right after each CR: the hard case for CRLF. */
  k = 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] == '\r') cuts[k++] = i + 1;
  feed_split(s, n, is_boundary, cuts, k);
  free(is_boundary);
  free(cuts);
  return 0;
}
