/* Unit tests for gateway/sse: event boundaries with LF, CRLF and CR line
 * ends, and boundaries split across pieces (the SSE spec's line rules). */
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/sse.h"

static size_t feed(struct sse_cursor *cur, const char *text) {
  return sse_last_boundary(cur, text, strlen(text));
}

static void test_line_ends(void **state) {
  (void)state;
  struct sse_cursor cur;
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: a\n\ndata: b"), 9);
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: a\r\n\r\ndata: b\r\n"), 11);
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: a\r\rdata: b"), 9);
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: a\ndata: b\n"), 0); /* one event, not ended */
}

static void test_split_pieces(void **state) {
  (void)state;
  struct sse_cursor cur;
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: {\"a\":"), 0);
  assert_int_equal(feed(&cur, "1}\n"), 0);
  assert_int_equal(feed(&cur, "\n"), 1);
  /* CRLF CR | LF: the LF completes the CRLF that ended the event */
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: x\r\n\r"), 10);
  assert_int_equal(feed(&cur, "\ndata: y"), 1);
  /* CRLF that ends a non-empty line, split CR | LF: no boundary (fuzz_sse) */
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "data: x\r"), 0);
  assert_int_equal(feed(&cur, "\ndata: y\r\n"), 0);
  assert_int_equal(feed(&cur, "\r"), 1);
  assert_int_equal(feed(&cur, "\n"), 1);
  /* a stream that starts with a blank line is on a boundary after it */
  sse_cursor_init(&cur);
  assert_int_equal(feed(&cur, "\n"), 1);
}

/* The byte-at-a-time cursor (the rules of sse.h, one byte per step): the
 * reference the line-skipping scan must agree with. */
static size_t ref_last(struct sse_cursor *cur, const char *data, size_t len) {
  size_t last = 0;
  for (size_t i = 0; i < len; i++) {
    char ch = data[i];
    if (ch == '\n' && cur->prev_cr) {
      cur->prev_cr = false;
      if (cur->cr_ended) last = i + 1;
      cur->cr_ended = false;
      continue;
    }
    cur->prev_cr = ch == '\r';
    cur->cr_ended = false;
    if (ch == '\n' || ch == '\r') {
      if (cur->line_empty) {
        last = i + 1;
        cur->cr_ended = ch == '\r';
      }
      cur->line_empty = true;
    } else {
      cur->line_empty = false;
    }
  }
  return last;
}

static size_t ref_next(struct sse_cursor *cur, const char *data, size_t len) {
  for (size_t i = 0; i < len; i++) {
    char ch = data[i];
    if (ch == '\n' && cur->prev_cr) {
      cur->prev_cr = false;
      continue;
    }
    cur->prev_cr = ch == '\r';
    if (ch == '\n' || ch == '\r') {
      bool ends = cur->line_empty;
      cur->line_empty = true;
      if (ends) {
        if (ch == '\r' && i + 1 < len && data[i + 1] == '\n') {
          cur->prev_cr = false;
          return i + 2;
        }
        return i + 1;
      }
    } else {
      cur->line_empty = false;
    }
  }
  return 0;
}

static bool same(const struct sse_cursor *a, const struct sse_cursor *b) {
  return a->line_empty == b->line_empty && a->prev_cr == b->prev_cr && a->cr_ended == b->cr_ended;
}

/* Random streams (long data lines, so whole 16-byte steps are skipped, and
 * every kind of line end, NUL bytes included) cut into random pieces: the
 * same boundaries and the same cursor as one byte at a time. */
static void test_line_skipping_matches_byte_at_a_time(void **state) {
  (void)state;
  uint32_t seed = 12345;
  char text[600];
  for (int round = 0; round < 3000; round++) {
    size_t len = 0, want = (size_t)(seed % sizeof(text));
    while (len < want) {
      seed = seed * 1103515245u + 12345u;
      unsigned r = (seed >> 16) % 100;
      if (r < 4)
        text[len++] = '\n';
      else if (r < 6)
        text[len++] = '\r';
      else if (r < 7)
        text[len++] = '\0';
      else
        text[len++] = (char)('a' + r % 26);
    }
    struct sse_cursor fast, ref, fast_n, ref_n;
    sse_cursor_init(&fast);
    sse_cursor_init(&ref);
    sse_cursor_init(&fast_n);
    sse_cursor_init(&ref_n);
    size_t at = 0;
    while (at < len) {
      seed = seed * 1103515245u + 12345u;
      size_t piece = 1 + (seed >> 16) % 80;
      if (piece > len - at) piece = len - at;
      assert_int_equal(sse_last_boundary(&fast, text + at, piece),
                       ref_last(&ref, text + at, piece));
      assert_true(same(&fast, &ref));
      size_t off = 0; /* every boundary of the piece, one call each */
      while (off < piece) {
        size_t a = sse_next_boundary(&fast_n, text + at + off, piece - off);
        size_t b = ref_next(&ref_n, text + at + off, piece - off);
        assert_int_equal(a, b);
        assert_true(same(&fast_n, &ref_n));
        if (a == 0) break;
        off += a;
      }
      at += piece;
    }
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_line_ends),
                                     cmocka_unit_test(test_split_pieces),
                                     cmocka_unit_test(test_line_skipping_matches_byte_at_a_time)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
