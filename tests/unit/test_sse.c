/* Unit tests for gateway/sse: event boundaries with LF, CRLF and CR line
 * ends, and boundaries split across pieces (the SSE spec's line rules). */
#include <setjmp.h>
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

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_line_ends),
                                     cmocka_unit_test(test_split_pieces)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
