/* Unit tests for gateway/usage's stream events: the usage the gateway
 * asked for on a client's behalf is taken out again (a top-level
 * "usage":null member, found without the strict scan, and the usage-only
 * chunk), read when it is an object, and nothing else in an event moves:
 * a nested or quoted "usage":null stays as the provider sent it. */
#define _GNU_SOURCE /* memmem */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "gateway/usage.h"

/* The event as the client gets it with strip (the gateway asked for
 * usage): "" when dropped. */
static const char *client_sees(const char *event, struct usage_counts *u) {
  static char out[2048];
  char edit[2048];
  size_t keep;
  bool edited;
  memset(u, 0, sizeof *u);
  usage_stream_event(event, strlen(event), true, u, edit, &keep, &edited);
  const char *from = edited ? edit : event;
  memcpy(out, from, keep);
  out[keep] = '\0';
  return out;
}

static void test_top_level_null_is_removed(void **state) {
  (void)state;
  struct usage_counts u;
  assert_string_equal(client_sees("data: {\"id\":\"c1\",\"choices\":[],\"usage\":null}\n\n", &u),
                      "data: {\"id\":\"c1\",\"choices\":[]}\n\n");
  assert_string_equal(client_sees("data: {\"usage\":null,\"id\":\"c1\"}\n\n", &u),
                      "data: {\"id\":\"c1\"}\n\n");
  assert_string_equal(client_sees("data: {\"id\":\"c1\", \"usage\" : null , \"x\":1}\r\n\r\n", &u),
                      "data: {\"id\":\"c1\",  \"x\":1}\r\n\r\n");
  assert_string_equal(client_sees("data: {\"usage\":null}\n\n", &u), "data: {}\n\n");
  assert_false(u.known);
}

static void test_nested_or_quoted_null_stays(void **state) {
  (void)state;
  struct usage_counts u;
  const char *nested =
      "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"usage\":null},\"index\":0}]}\n\n";
  assert_string_equal(client_sees(nested, &u), nested);
  const char *quoted = "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":"
                       "\"say \\\"usage\\\":null, \\\"usage\\\"\"}}]}\n\n";
  assert_string_equal(client_sees(quoted, &u), quoted);
  /* a member whose value is a string holding the text, then the real one */
  assert_string_equal(
      client_sees("data: {\"note\":\"{\\\"usage\\\":null}\",\"usage\":null}\n\n", &u),
      "data: {\"note\":\"{\\\"usage\\\":null}\"}\n\n");
  /* "usage" as a value, not a member name */
  const char *value = "data: {\"kind\":\"usage\",\"n\":null}\n\n";
  assert_string_equal(client_sees(value, &u), value);
}

static void test_usage_object_is_read_and_its_chunk_dropped(void **state) {
  (void)state;
  struct usage_counts u;
  assert_string_equal(
      client_sees("data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,"
                  "\"completion_tokens\":6,\"total_tokens\":9}}\n\n",
                  &u),
      "");
  assert_true(u.known);
  assert_int_equal(u.prompt, 3);
  assert_int_equal(u.completion, 6);
  assert_int_equal(u.total, 9);
  /* the Responses API: response.usage, with a top-level null beside it */
  client_sees("data: {\"type\":\"response.completed\",\"usage\":null,\"response\":{\"usage\":"
              "{\"input_tokens\":2,\"output_tokens\":5,\"total_tokens\":7}}}\n\n",
              &u);
  assert_true(u.known);
  assert_int_equal(u.total, 7);
}

static void test_without_strip_nothing_changes(void **state) {
  (void)state;
  const char *event = "data: {\"id\":\"c1\",\"usage\":null}\n\n";
  struct usage_counts u = {0};
  char edit[256];
  size_t keep;
  bool edited;
  usage_stream_event(event, strlen(event), false, &u, edit, &keep, &edited);
  assert_false(edited);
  assert_int_equal(keep, strlen(event));
  assert_false(u.known);
}

/* Where the strict scan leaves an event as it is, so does the fast path
 * (review of the fast path): JSON that goes on in a second data line, a
 * duplicate "usage" member, a usage object under an escaped "response". */
static void test_what_the_strict_scan_refuses_stays(void **state) {
  (void)state;
  struct usage_counts u;
  const char *two_lines = "data: {\"usage\":null\ndata: ,\"id\":\"c1\"}\n\n";
  assert_string_equal(client_sees(two_lines, &u), two_lines);
  /* the second line closes the object: the usage of the first is nested */
  const char *nested_two_lines = "data: {\"a\":{\"usage\":null}\ndata: }\n\n";
  assert_string_equal(client_sees(nested_two_lines, &u), nested_two_lines);
  const char *duplicate = "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,"
                          "\"total_tokens\":2},\"usage\":null}\n\n";
  assert_string_equal(client_sees(duplicate, &u), duplicate);
  assert_false(u.known);
  const char *duplicate_nulls = "data: {\"usage\":null,\"id\":\"c1\",\"usage\":null}\n\n";
  assert_string_equal(client_sees(duplicate_nulls, &u), duplicate_nulls);
  /* truncated: the outer object never closes, so the null is a nested one */
  const char *truncated = "data: {\"id\":\"c1\",\"x\":{\"usage\":null}\n\n";
  assert_string_equal(client_sees(truncated, &u), truncated);
  const char *trailing = "data: {\"id\":\"c1\",\"usage\":null} x\n\n";
  assert_string_equal(client_sees(trailing, &u), trailing);
  /* a top-level "response" object: the strict path reads it and leaves
   * the event as it is (third review) */
  const char *response_after = "data: {\"usage\":null,\"response\":{}}\n\n";
  assert_string_equal(client_sees(response_after, &u), response_after);
  const char *response_before = "data: {\"response\":{},\"usage\":null}\n\n";
  assert_string_equal(client_sees(response_before, &u), response_before);
  client_sees("data: {\"usage\":null,\"response\":{\"\\u0075sage\":{\"input_tokens\":5}}}\n\n", &u);
  assert_true(u.known);
  assert_int_equal(u.prompt, 5);
  client_sees("data: {\"respons\\u0065\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":2,"
              "\"total_tokens\":6}},\"usage\":null}\n\n",
              &u);
  assert_true(u.known);
  assert_int_equal(u.total, 6);
}

/* vLLM's continuous_usage_stats: every chunk carries the answer's usage so
 * far; the count is the last one, never their sum (review: 5/7 counted as
 * 10/14). */
static void test_usage_on_every_chunk_counts_the_last(void **state) {
  (void)state;
  static const char *const events[] = {
      "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":5,"
      "\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
      "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":5,"
      "\"completion_tokens\":2,\"total_tokens\":7,\"prompt_tokens_details\":"
      "{\"cached_tokens\":4}}}\n\n",
      "data: {\"choices\":[],\"usage\":null}\n\n",
      "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,"
      "\"total_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
  };
  struct usage_counts u = {0};
  char edit[512];
  size_t keep;
  bool edited;
  for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++)
    usage_stream_event(events[i], strlen(events[i]), false, &u, edit, &keep, &edited);
  assert_true(u.known);
  assert_int_equal(u.prompt, 5);
  assert_int_equal(u.completion, 2);
  assert_int_equal(u.total, 7);
  assert_int_equal(u.cached, 4);
  /* a later, smaller object undoes no tokens (review) */
  const char *zero = "data: {\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,"
                     "\"total_tokens\":0}}\n\n";
  usage_stream_event(zero, strlen(zero), false, &u, edit, &keep, &edited);
  assert_int_equal(u.prompt, 5);
  assert_int_equal(u.completion, 2);
  assert_int_equal(u.total, 7);
  /* an object whose counts are not numbers changes nothing */
  const char *bad = "data: {\"usage\":{\"prompt_tokens\":\"9\"}}\n\n";
  usage_stream_event(bad, strlen(bad), false, &u, edit, &keep, &edited);
  assert_int_equal(u.prompt, 5);
  assert_int_equal(u.total, 7);
}

/* usage_find_name is memmem for `"usage"`: the same answer on random
 * bytes rich in its pieces, at every length and offset. */
static void test_find_name_is_memmem(void **state) {
  (void)state;
  static const char alphabet[] = "\"usage\"uU: ";
  char buf[200];
  unsigned seed = 12345;
  for (int round = 0; round < 20000; round++) {
    size_t len = (size_t)(round % 160);
    for (size_t i = 0; i < len; i++) {
      seed = seed * 1103515245u + 12345u;
      buf[i] = alphabet[(seed >> 16) % (sizeof(alphabet) - 1)];
    }
    if (len >= 7 && round % 3 == 0) {
      seed = seed * 1103515245u + 12345u;
      memcpy(buf + (seed >> 16) % (len - 6), "\"usage\"", 7);
    }
    for (size_t from = 0; from <= len && from < 20; from++)
      assert_ptr_equal(usage_find_name(buf + from, len - from),
                       memmem(buf + from, len - from, "\"usage\"", 7));
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_top_level_null_is_removed),
      cmocka_unit_test(test_nested_or_quoted_null_stays),
      cmocka_unit_test(test_usage_object_is_read_and_its_chunk_dropped),
      cmocka_unit_test(test_without_strip_nothing_changes),
      cmocka_unit_test(test_what_the_strict_scan_refuses_stays),
      cmocka_unit_test(test_usage_on_every_chunk_counts_the_last),
      cmocka_unit_test(test_find_name_is_memmem),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
