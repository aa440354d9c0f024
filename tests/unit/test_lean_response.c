/* Unit tests for upstream/lean_response.c, the lean client's response
 * reader: every response is fed whole and then split at every byte (and
 * byte by byte), and must give the same status, headers, body and end.
 * Covers chunk extensions, trailers, 1xx, HEAD/204/304, close-delimited
 * bodies, keep-alive, bytes after the response, gzip/deflate bodies, holding
 * while stopped, and what is refused (obs-fold, bad bytes, oversize heads,
 * bad chunk sizes, 101, unknown encodings) without header values in the
 * error text.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "upstream/lean.h"

struct seen {
  int head_calls;
  int status;
  char content_type[64];
  char headers[4096]; /* lines joined with '|' */
  char body[65536];
  size_t body_len;
  int body_calls;
  bool stop_after_body; /* sets r->stop in on_body */
  struct lean_response *r;
};

static void on_head(void *ud, int status, const char *content_type, const char *const *headers) {
  struct seen *s = ud;
  s->head_calls++;
  s->status = status;
  snprintf(s->content_type, sizeof s->content_type, "%s", content_type ? content_type : "(null)");
  s->headers[0] = '\0';
  for (size_t i = 0; headers[i]; i++) {
    strncat(s->headers, headers[i], sizeof s->headers - strlen(s->headers) - 2);
    strcat(s->headers, "|");
  }
}

static void on_body(void *ud, const char *data, size_t len) {
  struct seen *s = ud;
  s->body_calls++;
  assert_true(s->body_len + len <= sizeof s->body);
  memcpy(s->body + s->body_len, data, len);
  s->body_len += len;
  if (s->stop_after_body) s->r->stop = true;
}

static const struct lean_response_callbacks callbacks = {on_head, on_body};

enum outcome { COMPLETE, ERROR_, NEEDS_EOF };

struct result {
  enum outcome outcome;
  bool keep_alive;
  size_t used_total; /* bytes taken until COMPLETE */
  char error[96];
};

/* Feeds msg in pieces of `step` bytes (0: whole), then EOF when eof. */
static struct result feed(struct seen *s, const char *msg, size_t len, size_t step, bool head,
                          bool eof) {
  struct lean_response r;
  struct result out = {NEEDS_EOF, false, 0, ""};
  memset(s, 0, sizeof *s);
  s->r = &r;
  lean_response_init(&r, &callbacks, s, head);
  size_t at = 0;
  while (at < len) {
    size_t n = step ? (len - at < step ? len - at : step) : len - at;
    size_t used = 0;
    enum lean_feed_result fr = lean_response_feed(&r, msg + at, n, &used);
    if (fr == LEAN_FEED_ERROR) {
      out.outcome = ERROR_;
      snprintf(out.error, sizeof out.error, "%s", r.error);
      lean_response_free(&r);
      return out;
    }
    if (fr == LEAN_FEED_COMPLETE) {
      out.outcome = COMPLETE;
      out.keep_alive = r.keep_alive;
      out.used_total = at + used;
      lean_response_free(&r);
      return out;
    }
    assert_int_equal(used, n);
    at += n;
  }
  if (eof) {
    enum lean_feed_result fr = lean_response_eof(&r);
    out.outcome = fr == LEAN_FEED_COMPLETE ? COMPLETE : ERROR_;
    out.keep_alive = r.keep_alive;
    out.used_total = len;
    snprintf(out.error, sizeof out.error, "%s", r.error);
  }
  lean_response_free(&r);
  return out;
}

/* Feeds msg whole, byte by byte and split in two at every byte: each must
 * give the same result and the same callbacks. Returns the whole-feed one. */
static struct result feed_all_ways(struct seen *s, const char *msg, size_t len, bool head,
                                   bool eof) {
  struct seen whole;
  struct result want = feed(&whole, msg, len, 0, head, eof);
  struct seen other;
  struct result got = feed(&other, msg, len, 1, head, eof);
  assert_int_equal(got.outcome, want.outcome);
  assert_int_equal(got.keep_alive, want.keep_alive);
  assert_int_equal(other.head_calls, whole.head_calls);
  assert_int_equal(other.status, whole.status);
  assert_string_equal(other.headers, whole.headers);
  assert_int_equal(other.body_len, whole.body_len);
  assert_memory_equal(other.body, whole.body, whole.body_len);
  if (want.outcome == COMPLETE) assert_int_equal(got.used_total, want.used_total);
  for (size_t split = 1; split < len; split++) {
    struct lean_response r;
    struct seen two;
    memset(&two, 0, sizeof two);
    two.r = &r;
    lean_response_init(&r, &callbacks, &two, head);
    size_t used = 0;
    enum lean_feed_result fr = lean_response_feed(&r, msg, split, &used);
    if (fr == LEAN_FEED_MORE) {
      size_t used2 = 0;
      fr = lean_response_feed(&r, msg + split, len - split, &used2);
      used = split + used2;
    }
    if (fr == LEAN_FEED_MORE && eof) fr = lean_response_eof(&r);
    if (want.outcome == COMPLETE) {
      assert_int_equal(fr, LEAN_FEED_COMPLETE);
      assert_int_equal(r.keep_alive, want.keep_alive);
    } else if (want.outcome == ERROR_) {
      assert_int_equal(fr, LEAN_FEED_ERROR);
    }
    assert_string_equal(two.headers, whole.headers);
    assert_int_equal(two.body_len, whole.body_len);
    assert_memory_equal(two.body, whole.body, whole.body_len);
    lean_response_free(&r);
  }
  *s = whole;
  return want;
}

#define FEED(s, text, head, eof) feed_all_ways(s, text, sizeof(text) - 1, head, eof)

static void test_content_length_body(void **state) {
  struct seen s;
  struct result r = FEED(&s,
                         "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "X-A:   spaced value  \r\nContent-Length: 7\r\n\r\n{\"a\":1}",
                         false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_true(r.keep_alive);
  assert_int_equal(s.head_calls, 1);
  assert_int_equal(s.status, 200);
  assert_string_equal(s.content_type, "application/json");
  assert_string_equal(s.headers,
                      "Content-Type: application/json|X-A: spaced value|Content-Length: 7|");
  assert_int_equal(s.body_len, 7);
  assert_memory_equal(s.body, "{\"a\":1}", 7);
}

static void test_chunked_with_extensions_and_trailers(void **state) {
  struct seen s;
  struct result r = FEED(&s,
                         "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "5;name=value\r\nhello\r\n1;x\r\n \r\n5\r\nworld\r\n"
                         "0\r\nX-Trailer: secret-ish\r\nX-Other: 2\r\n\r\n",
                         false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_true(r.keep_alive);
  assert_string_equal(s.headers, "Transfer-Encoding: chunked|");
  assert_int_equal(s.body_len, 11);
  assert_memory_equal(s.body, "hello world", 11);
}

static void test_interim_responses_are_skipped(void **state) {
  struct seen s;
  struct result r = FEED(&s,
                         "HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
                         "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                         "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                         false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_int_equal(s.head_calls, 1);
  assert_int_equal(s.status, 201);
  assert_string_equal(s.headers, "Content-Length: 2|");
  assert_memory_equal(s.body, "ok", 2);
}

static void test_no_body_for_head_204_304(void **state) {
  struct seen s;
  struct result r = FEED(&s, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", true, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_true(r.keep_alive);
  assert_int_equal(s.body_len, 0);
  r = FEED(&s, "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_int_equal(s.status, 204);
  assert_int_equal(s.body_len, 0);
  r = FEED(&s, "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_int_equal(s.status, 304);
  assert_int_equal(s.body_len, 0);
}

static void test_close_delimited_body(void **state) {
  struct seen s;
  struct result r = FEED(&s, "HTTP/1.1 200 OK\r\nX: y\r\n\r\nall of it", false, true);
  assert_int_equal(r.outcome, COMPLETE);
  assert_false(r.keep_alive);
  assert_int_equal(s.body_len, 9);
  assert_memory_equal(s.body, "all of it", 9);
}

static void test_keep_alive_rules(void **state) {
  struct seen s;
  struct result r =
      FEED(&s, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_false(r.keep_alive);
  r = FEED(&s, "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_false(r.keep_alive);
  r = FEED(&s, "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", false,
           false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_true(r.keep_alive);
}

/* Bytes after the response: it completes, taking only its own bytes, and
 * the connection is not reused. */
static void test_bytes_after_the_response(void **state) {
  static const char msg[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
  struct seen s;
  struct result r = feed(&s, msg, sizeof msg - 1, 0, false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_int_equal(r.used_total, strlen("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"));
  assert_false(r.keep_alive);
  assert_memory_equal(s.body, "ok", 2);
}

static void expect_refused(const char *msg, const char *needle) {
  struct seen s;
  struct result r = feed_all_ways(&s, msg, strlen(msg), false, true);
  assert_int_equal(r.outcome, ERROR_);
  if (needle && !strstr(r.error, needle)) fail_msg("error \"%s\" lacks \"%s\"", r.error, needle);
  assert_null(strstr(r.error, "s3cr3t")); /* never a header value */
}

static void test_refused_responses(void **state) {
  expect_refused("HTTP/1.1 200 OK\r\nX-A: s3cr3t\r\n  folded\r\nContent-Length: 0\r\n\r\n",
                 "folding");
  expect_refused("HTTP/1.1 200 OK\r\nX-A: s3cr3t\r\n\tfolded\r\nContent-Length: 0\r\n\r\n",
                 "folding");
  expect_refused("HTTP/1.1 200 OK\r\nX-A: s3cr3t\x01\r\nContent-Length: 0\r\n\r\n", NULL);
  expect_refused("HTTP/1.1 200 OK\r\nX A: s3cr3t\r\nContent-Length: 0\r\n\r\n", NULL);
  expect_refused("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\ns3cr3t\r\n0\r\n\r\n",
                 NULL);
  expect_refused("HTTP/1.1 101 Switching Protocols\r\nUpgrade: s3cr3t\r\n\r\n", "101");
  expect_refused("HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
                 "Content-Encoding");
  expect_refused("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ns3cr3t", "before the end");
  expect_refused("NOT HTTP\r\n\r\n", NULL);
  expect_refused("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", NULL);
  /* Nothing at all before the EOF. */
  struct seen s;
  struct result r = feed(&s, "", 0, 0, false, true);
  assert_int_equal(r.outcome, ERROR_);
  assert_non_null(strstr(r.error, "without answering"));
}

static void test_oversize_heads_are_refused(void **state) {
  size_t big = LEAN_MAX_RESPONSE_HEAD_BYTES + 100;
  char *msg = malloc(big + 128);
  assert_non_null(msg);
  int n = sprintf(msg, "HTTP/1.1 200 OK\r\nX-Big: ");
  memset(msg + n, 'a', big);
  strcpy(msg + n + big, "\r\nContent-Length: 0\r\n\r\n");
  struct seen s;
  struct result r = feed(&s, msg, strlen(msg), 0, false, true);
  assert_int_equal(r.outcome, ERROR_);
  assert_int_equal(s.head_calls, 0);
  /* Too many lines, each small. */
  char *p = msg + sprintf(msg, "HTTP/1.1 200 OK\r\n");
  for (int i = 0; i < LEAN_MAX_RESPONSE_HEADERS + 1; i++) p += sprintf(p, "X-%d: v\r\n", i);
  strcpy(p, "Content-Length: 0\r\n\r\n");
  r = feed(&s, msg, strlen(msg), 7, false, true);
  assert_int_equal(r.outcome, ERROR_);
  assert_non_null(strstr(r.error, "256"));
  free(msg);
}

/* A gzip (and a zlib "deflate", and a raw deflate) body arrives decoded,
 * whatever the split. */
static size_t compress_to(const char *in, size_t len, char *out, size_t cap, int window) {
  z_stream z = {0};
  assert_int_equal(deflateInit2(&z, 6, Z_DEFLATED, window, 8, Z_DEFAULT_STRATEGY), Z_OK);
  z.next_in = (unsigned char *)(uintptr_t)in;
  z.avail_in = (uInt)len;
  z.next_out = (unsigned char *)out;
  z.avail_out = (uInt)cap;
  assert_int_equal(deflate(&z, Z_FINISH), Z_STREAM_END);
  size_t n = cap - z.avail_out;
  deflateEnd(&z);
  return n;
}

/* window < 0: a "deflate" body without the zlib wrapper (some servers send
 * it so), told apart on its first two bytes. */
static void check_encoded(const char *encoding, int window) {
  char plain[3000];
  for (size_t i = 0; i < sizeof plain; i++) plain[i] = (char)('a' + (i * 7) % 26);
  char packed[4096];
  size_t packed_len = compress_to(plain, sizeof plain, packed, sizeof packed, window);
  char msg[8192];
  int n = snprintf(msg, sizeof msg,
                   "HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %zu\r\n\r\n",
                   encoding, packed_len);
  memcpy(msg + n, packed, packed_len);
  struct seen s;
  struct result r = feed_all_ways(&s, msg, (size_t)n + packed_len, false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_true(r.keep_alive);
  assert_int_equal(s.body_len, sizeof plain);
  assert_memory_equal(s.body, plain, sizeof plain);
  /* Chunked as well. */
  n = snprintf(
      msg, sizeof msg,
      "HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n%zx\r\n",
      encoding, packed_len);
  memcpy(msg + n, packed, packed_len);
  memcpy(msg + n + packed_len, "\r\n0\r\n\r\n", 7);
  r = feed(&s, msg, (size_t)n + packed_len + 7, 3, false, false);
  assert_int_equal(r.outcome, COMPLETE);
  assert_int_equal(s.body_len, sizeof plain);
  assert_memory_equal(s.body, plain, sizeof plain);
}

static void test_encoded_bodies_are_decoded(void **state) {
  check_encoded("gzip", 15 + 16);
  check_encoded("x-gzip", 15 + 16);
  check_encoded("deflate", 15);
  check_encoded("deflate", -15);
  expect_refused("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
                 "decode");
}

/* With r->stop set from on_body, later body bytes are held; resume
 * delivers them and reports the end. */
static void test_stop_holds_the_rest_until_resume(void **state) {
  static const char msg[] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "3\r\nabc\r\n3\r\ndef\r\n3\r\nghi\r\n0\r\n\r\n";
  struct lean_response r;
  struct seen s;
  memset(&s, 0, sizeof s);
  s.r = &r;
  s.stop_after_body = true;
  lean_response_init(&r, &callbacks, &s, false);
  size_t used;
  enum lean_feed_result fr = lean_response_feed(&r, msg, sizeof msg - 1, &used);
  assert_int_equal(fr, LEAN_FEED_MORE); /* ended, but held */
  assert_true(r.complete);
  assert_int_equal(s.body_calls, 1);
  assert_memory_equal(s.body, "abc", 3);
  r.stop = false;
  fr = lean_response_resume_body(&r);
  assert_int_equal(fr, LEAN_FEED_STOPPED); /* on_body stopped it again */
  assert_int_equal(s.body_len, 9);         /* the held bytes came as one piece */
  s.stop_after_body = false;
  r.stop = false;
  fr = lean_response_resume_body(&r);
  assert_int_equal(fr, LEAN_FEED_COMPLETE);
  assert_memory_equal(s.body, "abcdefghi", 9);
  /* The same response object reads the next response after a reset. */
  lean_response_reset(&r, false);
  memset(&s, 0, sizeof s);
  s.r = &r;
  fr = lean_response_feed(&r, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz", 39, &used);
  assert_int_equal(fr, LEAN_FEED_COMPLETE);
  assert_memory_equal(s.body, "z", 1);
  lean_response_free(&r);
}

/* Stopped in the middle of a gzip body: the rest stays compressed until
 * resume, then decodes completely. */
static void test_stop_inside_a_gzip_body(void **state) {
  char plain[60000];
  for (size_t i = 0; i < sizeof plain; i++) plain[i] = (char)('a' + (i * 13) % 26);
  char packed[65536];
  size_t packed_len = compress_to(plain, sizeof plain, packed, sizeof packed, 15 + 16);
  char msg[70000];
  int n = snprintf(msg, sizeof msg,
                   "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %zu\r\n\r\n",
                   packed_len);
  memcpy(msg + n, packed, packed_len);
  struct lean_response r;
  struct seen s;
  memset(&s, 0, sizeof s);
  s.r = &r;
  s.stop_after_body = true;
  lean_response_init(&r, &callbacks, &s, false);
  size_t used;
  enum lean_feed_result fr = lean_response_feed(&r, msg, (size_t)n + packed_len, &used);
  assert_int_equal(fr, LEAN_FEED_MORE);
  assert_true(s.body_len < sizeof plain);
  int rounds = 0;
  for (;;) {
    r.stop = false;
    fr = lean_response_resume_body(&r);
    rounds++;
    if (fr != LEAN_FEED_STOPPED) break;
    assert_true(rounds < 100);
  }
  assert_int_equal(fr, LEAN_FEED_COMPLETE);
  assert_int_equal(s.body_len, sizeof plain);
  assert_memory_equal(s.body, plain, sizeof plain);
  lean_response_free(&r);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_content_length_body),
      cmocka_unit_test(test_chunked_with_extensions_and_trailers),
      cmocka_unit_test(test_interim_responses_are_skipped),
      cmocka_unit_test(test_no_body_for_head_204_304),
      cmocka_unit_test(test_close_delimited_body),
      cmocka_unit_test(test_keep_alive_rules),
      cmocka_unit_test(test_bytes_after_the_response),
      cmocka_unit_test(test_refused_responses),
      cmocka_unit_test(test_oversize_heads_are_refused),
      cmocka_unit_test(test_encoded_bodies_are_decoded),
      cmocka_unit_test(test_stop_holds_the_rest_until_resume),
      cmocka_unit_test(test_stop_inside_a_gzip_body),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
