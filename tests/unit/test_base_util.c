/* Unit tests for base/util.c's hot-path helpers: zg_bufs_consume (what is
 * left of a gathered write after uv_try_write took part of it) and
 * zg_copy_cut (snprintf "%s" without the format machinery). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "base/base.h"

static void test_bufs_consume(void **state) {
  (void)state;
  char a[] = "head", b[] = "body!";
  uv_buf_t bufs[3];
  unsigned n;
  /* nothing taken: all of it left */
  bufs[0] = uv_buf_init(a, 4), bufs[1] = uv_buf_init(b, 5), n = 2;
  assert_int_equal(zg_bufs_consume(bufs, &n, 0), 9);
  assert_int_equal(n, 2);
  /* part of the first */
  assert_int_equal(zg_bufs_consume(bufs, &n, 3), 6);
  assert_int_equal(n, 2);
  assert_ptr_equal(bufs[0].base, a + 3);
  assert_int_equal(bufs[0].len, 1);
  /* the rest of the first and part of the second: the second moves up */
  assert_int_equal(zg_bufs_consume(bufs, &n, 3), 3);
  assert_int_equal(n, 1);
  assert_ptr_equal(bufs[0].base, b + 2);
  assert_int_equal(bufs[0].len, 3);
  /* everything */
  assert_int_equal(zg_bufs_consume(bufs, &n, 3), 0);
  assert_int_equal(n, 0);
  /* an empty buffer in front, exactly the first taken */
  bufs[0] = uv_buf_init(b, 0), bufs[1] = uv_buf_init(a, 4), bufs[2] = uv_buf_init(b, 5), n = 3;
  assert_int_equal(zg_bufs_consume(bufs, &n, 4), 5);
  assert_int_equal(n, 1);
  assert_ptr_equal(bufs[0].base, b);
}

static void test_copy_cut(void **state) {
  (void)state;
  char out[6];
  assert_int_equal(zg_copy_cut(out, sizeof(out), "abc"), 3);
  assert_string_equal(out, "abc");
  assert_int_equal(zg_copy_cut(out, sizeof(out), "abcdefgh"), 5);
  assert_string_equal(out, "abcde");
  assert_int_equal(zg_copy_cut(out, 1, "abc"), 0);
  assert_string_equal(out, "");
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_bufs_consume),
                                     cmocka_unit_test(test_copy_cut)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
