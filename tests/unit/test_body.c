/* Unit tests for gateway/body: the one strict parse of a request body.
 * Duplicate members (also when spelled with escapes, also nested), NUL
 * inside strings kept with its length, strict numbers/literals/UTF-8,
 * the depth bound, top-level member slots and the insertion point, and
 * the shortest round-trip number format for inserted defaults. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/body.h"

static const char *const fields[] = {"messages", "stream", "model", "temperature"};
#define N_FIELDS 4

static int scan(const char *text, size_t len, struct body_value *v, char *err) {
  size_t end, members;
  return body_scan(text, len, fields, v, N_FIELDS, &end, &members, err, 160);
}

static int scan_str(const char *text, char *err) {
  struct body_value v[N_FIELDS];
  return scan(text, strlen(text), v, err);
}

static void test_duplicates_refused(void **state) {
  (void)state;
  char err[160];
  assert_int_equal(scan_str("{\"stream\":false,\"stream\":true}", err), -1);
  assert_non_null(strstr(err, "duplicate member \"stream\""));
  /* the same name written with an escape is the same member upstream */
  assert_int_equal(scan_str("{\"stream\":false,\"\\u0073tream\":true}", err), -1);
  assert_non_null(strstr(err, "duplicate member \"stream\""));
  assert_int_equal(scan_str("{\"temperature\":0,\"temperature\":1.7}", err), -1);
  /* nested objects too */
  assert_int_equal(scan_str("{\"messages\":[{\"role\":\"user\",\"role\":\"system\"}]}", err), -1);
  assert_non_null(strstr(err, "\"role\""));
  /* the same name in sibling objects is fine */
  assert_int_equal(scan_str("{\"a\":{\"x\":1},\"b\":{\"x\":2},\"x\":3}", err), 0);
}

static void test_many_members_linear(void **state) {
  (void)state;
  /* 200k distinct members, then the same with one duplicate at the end */
  size_t n = 200000;
  char *text = malloc(n * 16 + 64);
  assert_non_null(text);
  size_t at = 0;
  text[at++] = '{';
  for (size_t i = 0; i < n; i++) at += (size_t)sprintf(text + at, "%s\"k%zu\":1", i ? "," : "", i);
  size_t before_close = at;
  text[at++] = '}';
  char err[160];
  struct body_value v[N_FIELDS];
  assert_int_equal(scan(text, at, v, err), 0);
  at = before_close;
  at += (size_t)sprintf(text + at, ",\"k123\":2}");
  assert_int_equal(scan(text, at, v, err), -1);
  assert_non_null(strstr(err, "\"k123\""));
  free(text);
}

static void test_nul_inside_string_keeps_length(void **state) {
  (void)state;
  const char text[] = "{\"model\":\"a\\u0000b\",\"messages\":[1]}";
  struct body_value v[N_FIELDS];
  char err[160];
  assert_int_equal(scan(text, sizeof(text) - 1, v, err), 0);
  assert_int_equal(v[2].type, BODY_STRING);
  assert_int_equal(v[2].len, strlen("\"a\\u0000b\""));
  /* a raw NUL byte is a control character: refused */
  const char raw[] = "{\"model\":\"a\0b\"}";
  assert_int_equal(scan(raw, sizeof(raw) - 1, v, err), -1);
  /* a member name with a NUL: upstreams that cut names at NUL would read
   * "stream\u0000" as "stream", so such a name is refused */
  const char named[] = "{\"stream\\u0000\":true}";
  assert_int_equal(scan(named, sizeof(named) - 1, v, err), -1);
  assert_non_null(strstr(err, "NUL"));
  /* an empty member name is fine */
  assert_int_equal(scan_str("{\"\":0}", err), 0);
}

static void test_strict_grammar(void **state) {
  (void)state;
  char err[160];
  const char *bad[] = {"",
                       "[]",
                       "{",
                       "{\"a\":01}",
                       "{\"a\":1.}",
                       "{\"a\":.5}",
                       "{\"a\":1e}",
                       "{\"a\":+1}",
                       "{\"a\":NaN}",
                       "{\"a\":tru}",
                       "{\"a\":1,}",
                       "{\"a\":[1,]}",
                       "{\"a\":\"\\x\"}",
                       "{\"a\":\"\\u12G4\"}",
                       "{\"a\":1} x",
                       "{\"a\":1}{}",
                       "{'a':1}",
                       "{\"a\":\"\xC0\xAF\"}",
                       "{\"a\":\"\xED\xA0\x80\"}",
                       "{\"a\":\"\xF5\x80\x80\x80\"}",
                       "\xEF\xBB\xBF{}"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (scan_str(bad[i], err) != -1) fail_msg("accepted: %s", bad[i]);
    assert_non_null(strstr(err, "at byte"));
  }
  const char *good[] = {"{}",
                        " {\"a\" : [ ] , \"b\":{ }}\n",
                        "{\"a\":-0.5e+10}",
                        "{\"a\":\"\xC3\xA9\xF0\x9F\x98\x80\"}",
                        "{\"a\":\"\\ud83d\\ude00\"}",
                        "{\"a\":[true,false,null,\"\\/\"]}"};
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
    if (scan_str(good[i], err) != 0) fail_msg("refused %s: %s", good[i], err);
}

static void test_depth_bound(void **state) {
  (void)state;
  char text[600];
  size_t at = 0;
  text[at++] = '{';
  text[at++] = '"';
  text[at++] = 'a';
  text[at++] = '"';
  text[at++] = ':';
  for (int i = 0; i < 200; i++) text[at++] = '[';
  for (int i = 0; i < 200; i++) text[at++] = ']';
  text[at++] = '}';
  char err[160];
  struct body_value v[N_FIELDS];
  assert_int_equal(scan(text, at, v, err), -1);
  assert_non_null(strstr(err, "nesting"));
}

static void test_slots_and_insertion_point(void **state) {
  (void)state;
  const char text[] =
      "{\"messages\":[{\"role\":\"user\"}], \"stream\" : true ,\"x\":{\"stream\":false} }";
  struct body_value v[N_FIELDS];
  size_t end = 0, members = 0;
  char err[160];
  assert_int_equal(body_scan(text, sizeof(text) - 1, fields, v, N_FIELDS, &end, &members, err, 160),
                   0);
  assert_int_equal(v[0].type, BODY_ARRAY);
  assert_false(v[0].empty);
  assert_int_equal(v[1].type, BODY_TRUE); /* the top-level one, not the nested one */
  assert_int_equal(v[2].type, BODY_ABSENT);
  assert_int_equal(members, 3);
  assert_int_equal(text[end], '}');
  assert_int_equal(end, sizeof(text) - 2);
  const char empty[] = "{\"messages\":[ ]}";
  assert_int_equal(scan(empty, sizeof(empty) - 1, v, err), 0);
  assert_true(v[0].empty);
}

static void test_number_format_round_trips(void **state) {
  (void)state;
  const double values[] = {0.7, 0.95, 0, 1, 1e-5, 0.1 + 0.2, 2.5, 123456789.125};
  for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
    char out[40];
    body_format_number(values[i], out, sizeof(out));
    assert_true(strtod(out, NULL) == values[i]);
    char json[80];
    snprintf(json, sizeof(json), "{\"temperature\":%s}", out);
    char err[160];
    assert_int_equal(scan_str(json, err), 0);
  }
  char out[40];
  body_format_number(0.7, out, sizeof(out));
  assert_string_equal(out, "0.7");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_duplicates_refused),
      cmocka_unit_test(test_many_members_linear),
      cmocka_unit_test(test_nul_inside_string_keeps_length),
      cmocka_unit_test(test_strict_grammar),
      cmocka_unit_test(test_depth_bound),
      cmocka_unit_test(test_slots_and_insertion_point),
      cmocka_unit_test(test_number_format_round_trips),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
