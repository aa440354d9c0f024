/* fuzz_lean_response: the lean upstream client's response reader
 * (upstream/lean_response.c). Input: [1] HEAD request flag (bit 0), [1]
 * EOF at the end (bit 0), [1] piece size (0: whole), [1] stop after every
 * body piece (bit 0), then the response bytes.
 *
 * The bytes are fed whole and in pieces; both must end the same way
 * (complete, error or still open) with the same head and body, when not
 * stopping. When stopping, every held byte must come out through
 * lean_response_resume_body. Sanitizers catch memory errors; the checks
 * catch a reader whose answer depends on how the bytes were split.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "upstream/lean.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

struct run {
  struct lean_response r;
  int heads, status;
  size_t header_bytes;
  uint64_t body_len, body_hash;
  bool stop_each;
};

static void on_head(void *ud, int status, const char *content_type, const char *const *headers) {
  struct run *run = ud;
  run->heads++;
  run->status = status;
  for (size_t i = 0; headers[i]; i++) {
    CHECK(!strpbrk(headers[i], "\r\n"));
    run->header_bytes += strlen(headers[i]);
  }
}

static void on_body(void *ud, const char *data, size_t len) {
  struct run *run = ud;
  for (size_t i = 0; i < len; i++) run->body_hash = run->body_hash * 31 + (unsigned char)data[i];
  run->body_len += len;
  if (run->stop_each) run->r.stop = true;
}

static const struct lean_response_callbacks callbacks = {on_head, on_body};

/* 0 open, 1 complete, 2 error */
static int play(struct run *run, const uint8_t *msg, size_t len, size_t piece, bool head, bool eof,
                bool stop_each) {
  memset(run, 0, sizeof *run);
  run->stop_each = stop_each;
  lean_response_init(&run->r, &callbacks, run, head);
  int outcome = 0;
  size_t at = 0;
  while (at < len && outcome == 0) {
    size_t n = piece && len - at > piece ? piece : len - at;
    size_t used;
    enum lean_feed_result fr = lean_response_feed(&run->r, (const char *)msg + at, n, &used);
    CHECK(used <= n);
    if (fr == LEAN_FEED_ERROR) outcome = 2;
    if (fr == LEAN_FEED_COMPLETE) outcome = 1;
    at += n;
    for (int guard = 0; outcome == 0 && run->r.stop && guard < 100000; guard++) {
      run->r.stop = false;
      fr = lean_response_resume_body(&run->r);
      if (fr == LEAN_FEED_ERROR) outcome = 2;
      if (fr == LEAN_FEED_COMPLETE) outcome = 1;
    }
  }
  if (outcome == 0 && eof) {
    enum lean_feed_result fr = lean_response_eof(&run->r);
    for (int guard = 0; fr == LEAN_FEED_MORE && run->r.stop && guard < 100000; guard++) {
      run->r.stop = false;
      fr = lean_response_resume_body(&run->r);
    }
    outcome = fr == LEAN_FEED_COMPLETE ? 1 : 2;
  }
  CHECK(run->heads <= 1);
  lean_response_free(&run->r);
  return outcome;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 4) return 0;
  bool head = data[0] & 1, eof = data[1] & 1, stop_each = data[3] & 1;
  size_t piece = data[2];
  const uint8_t *msg = data + 4;
  size_t len = size - 4;
  static struct run whole, split;
  int a = play(&whole, msg, len, 0, head, eof, false);
  int b = play(&split, msg, len, piece, head, eof, stop_each);
  CHECK(a == b);
  CHECK(whole.heads == split.heads);
  CHECK(whole.status == split.status);
  CHECK(whole.header_bytes == split.header_bytes);
  if (a != 2) { /* after an error the pieces delivered before it may differ */
    CHECK(whole.body_len == split.body_len);
    CHECK(whole.body_hash == split.body_hash);
  }
  return 0;
}
