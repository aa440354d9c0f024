/* upstream/lean_response.c: reads one HTTP/1.1 response for the lean
 * client (lean.c) with http_parser, in pieces of any size.
 *
 * Happy path: header lines are gathered as "Name: value\0" in one growing
 * buffer; at the end of the head on_head gets them (interim 1xx heads are
 * dropped; lean_response_trim() frees the buffer once the head is
 * delivered, for a long body); body pieces go to on_body straight from the input (no copy),
 * through zlib when the body is gzip or deflate encoded; the end of the
 * message stops the parser, so bytes after it are left to the caller.
 *
 * The owner may set r->stop from a callback (pause, cancel): from then on
 * body pieces are held (raw, or still compressed) instead of delivered,
 * until lean_response_resume_body() delivers them. The owner stops reading
 * the socket meanwhile, so at most one read is held.
 *
 * Failure modes (r->error; never a header value in it): what http_parser
 * refuses, obs-fold continuation lines, header bytes outside RFC 9110's
 * token / field-value sets, too many or too large headers, a 101, an
 * unknown Content-Encoding, an undecodable body, an EOF inside a message.
 */
#include "upstream/lean.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define DECODE_CHUNK 16384

static struct lean_response *of(http_parser *p) {
  return p->data;
}

static void fail(struct lean_response *r, const char *what) {
  if (!r->error[0]) snprintf(r->error, sizeof r->error, "%s", what);
}

static int append(struct lean_response *r, const char *data, size_t len) {
  if (r->head_len + len + 1 > LEAN_MAX_RESPONSE_HEAD_BYTES) {
    fail(r, "response headers larger than 64 KiB");
    return -1;
  }
  if (r->head_len + len + 1 > r->head_cap) {
    size_t cap = r->head_cap ? r->head_cap : 1024;
    while (cap < r->head_len + len + 1) cap *= 2;
    char *grown = realloc(r->head_text, cap);
    if (!grown) {
      fail(r, "response headers: out of memory");
      return -1;
    }
    r->head_text = grown;
    r->head_cap = cap;
  }
  memcpy(r->head_text + r->head_len, data, len);
  r->head_len += len;
  return 0;
}

/* Ends the header line being gathered, if any: trailing blanks of the
 * value dropped, NUL-terminated. */
static int finish_line(struct lean_response *r) {
  if (r->head_count == 0 || r->head_len == 0 || r->head_text[r->head_len - 1] == '\0') return 0;
  if (!r->in_value && append(r, ":", 1) != 0) return -1;
  while (r->head_len > 0 &&
         (r->head_text[r->head_len - 1] == ' ' || r->head_text[r->head_len - 1] == '\t'))
    r->head_len--;
  r->head_text[r->head_len++] = '\0'; /* append() kept room for it */
  return 0;
}

/* RFC 9110 tchar: a byte a header name may hold. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,  ['~'] = 1, ['0'] = 1,
    ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,  ['7'] = 1, ['8'] = 1,
    ['9'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1,  ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1,  ['N'] = 1, ['O'] = 1,
    ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,  ['V'] = 1, ['W'] = 1,
    ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1,  ['d'] = 1, ['e'] = 1,
    ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1,  ['l'] = 1, ['m'] = 1,
    ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1,  ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

static bool is_tchar(unsigned char c) {
  return tchar[c] != 0;
}

static int on_message_begin(http_parser *p) {
  struct lean_response *r = of(p);
  r->head_len = 0;
  r->head_count = 0;
  r->in_value = false;
  r->last_was_value = false;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len) {
  struct lean_response *r = of(p);
  if (r->head_delivered) return 0; /* trailers: not passed on */
  for (size_t i = 0; i < len; i++)
    if (!is_tchar((unsigned char)at[i])) {
      fail(r, "invalid byte in a response header name");
      return -1;
    }
  if (r->head_count == 0 || r->last_was_value || r->in_value) {
    if (finish_line(r) != 0) return -1;
    if (r->head_count >= LEAN_MAX_RESPONSE_HEADERS) {
      fail(r, "more than 256 response header lines");
      return -1;
    }
    r->head_count++;
    r->in_value = false;
  }
  r->last_was_value = false;
  return append(r, at, len);
}

static int on_header_value(http_parser *p, const char *at, size_t len) {
  struct lean_response *r = of(p);
  if (r->head_delivered) return 0;
  /* http_parser hands a value over in one piece per input piece; a second
   * piece that does not simply continue across two inputs is an obs-fold
   * continuation line (RFC 9112 §5.2: refuse it). */
  if (r->last_was_value &&
      !(r->value_serial != r->exec_serial && r->value_at_end && at == r->exec_data)) {
    fail(r, "obsolete line folding in a response header");
    return -1;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)at[i];
    if ((c < 0x20 && c != '\t') || c == 0x7f) {
      fail(r, "invalid byte in a response header value");
      return -1;
    }
  }
  if (!r->in_value) {
    if (append(r, ": ", 2) != 0) return -1;
    r->in_value = true;
  }
  r->last_was_value = true;
  r->value_serial = r->exec_serial;
  r->value_at_end = at + len == r->exec_data + r->exec_len;
  return append(r, at, len);
}

/* The value of the first line named `name` (lower case, with ':'), or NULL. */
static const char *find_value(const char *const *lines, const char *name) {
  size_t n = strlen(name);
  for (size_t i = 0; lines[i]; i++)
    if (strncasecmp(lines[i], name, n) == 0) {
      const char *v = lines[i] + n;
      while (*v == ' ' || *v == '\t') v++;
      return v;
    }
  return NULL;
}

static int start_inflate(struct lean_response *r, int window) {
  if (r->z_ready) {
    inflateEnd(&r->z);
    r->z_ready = false;
  }
  memset(&r->z, 0, sizeof r->z);
  if (inflateInit2(&r->z, window) != Z_OK) {
    fail(r, "inflateInit2() failed");
    return -1;
  }
  r->z_ready = true;
  return 0;
}

static int setup_decoding(struct lean_response *r, const char *encoding) {
  r->decode = LEAN_DECODE_NONE;
  if (!encoding || !*encoding || strcasecmp(encoding, "identity") == 0) return 0;
  int window;
  if (strcasecmp(encoding, "gzip") == 0 || strcasecmp(encoding, "x-gzip") == 0)
    window = 15 + 16;
  else if (strcasecmp(encoding, "deflate") == 0)
    window = 15;
  else {
    fail(r, "unsupported Content-Encoding in the response");
    return -1;
  }
  r->decode = LEAN_DECODE_ZLIB;
  if (window == 15) { /* deflate: wrapped or raw, seen on the first two bytes */
    r->z_sniff = true;
    r->sniff_len = 0;
    return 0;
  }
  return start_inflate(r, window);
}

static int on_headers_complete(http_parser *p) {
  struct lean_response *r = of(p);
  if (finish_line(r) != 0) return -1;
  int status = (int)p->status_code;
  if (status == 101) {
    fail(r, "unexpected 101 Switching Protocols");
    return -1;
  }
  if (status >= 100 && status < 200) {
    r->interim = true; /* its on_message_complete follows at once */
    return 0;
  }
  const char *lines[LEAN_MAX_RESPONSE_HEADERS + 1];
  size_t at = 0;
  for (size_t i = 0; i < r->head_count; i++) {
    lines[i] = r->head_text + at;
    at += strlen(r->head_text + at) + 1;
  }
  lines[r->head_count] = NULL;
  bool no_body = r->head_request || status == 204 || status == 304;
  if (!no_body && setup_decoding(r, find_value(lines, "content-encoding:")) != 0) return -1;
  r->head_delivered = true;
  if (r->cb->on_head) r->cb->on_head(r->ud, status, find_value(lines, "content-type:"), lines);
  return no_body ? 1 : 0;
}

/* Keeps data[0..len) for later delivery (r->stop is set). */
static int hold(struct lean_response *r, const char *data, size_t len) {
  if (len == 0) return 0;
  if (r->held_off > 0 && r->held_off == r->held_len) r->held_off = r->held_len = 0;
  if (r->held_len + len > r->held_cap) {
    size_t cap = r->held_cap ? r->held_cap : 4096;
    while (cap < r->held_len + len) cap *= 2;
    char *grown = realloc(r->held, cap);
    if (!grown) {
      fail(r, "out of memory holding a paused response");
      return -1;
    }
    r->held = grown;
    r->held_cap = cap;
  }
  memcpy(r->held + r->held_len, data, len);
  r->held_len += len;
  return 0;
}

/* Hands data[0..len) (as received) to on_body, decoding it first when the
 * body is encoded. Stops early when r->stop is set from on_body: *used
 * says how much input was taken (decoder output still pending inside zlib
 * is flagged in r->z_pending). Returns -1 on a decoding error. */
static int deliver(struct lean_response *r, const char *data, size_t len, size_t *used) {
  *used = 0;
  if (r->decode == LEAN_DECODE_NONE) {
    if (len > 0 && r->cb->on_body) r->cb->on_body(r->ud, data, len);
    *used = len;
    return 0;
  }
  if (r->z_sniff) {
    size_t take = 2 - r->sniff_len < len ? 2 - r->sniff_len : len;
    memcpy(r->sniff + r->sniff_len, data, take);
    r->sniff_len += take;
    *used = take;
    if (r->sniff_len < 2) return 0;
    unsigned b0 = r->sniff[0], b1 = r->sniff[1];
    bool wrapped = (b0 & 0x0f) == 8 && (b0 >> 4) <= 7 && ((b0 << 8) | b1) % 31 == 0;
    r->z_sniff = false;
    if (start_inflate(r, wrapped ? 15 : -15) != 0) return -1;
    size_t sniff_used;
    if (deliver(r, (const char *)r->sniff, 2, &sniff_used) != 0) return -1;
    if (r->stop) return 0; /* two bytes are always taken whole */
    size_t rest_used;
    int rc = deliver(r, data + take, len - take, &rest_used);
    *used = take + rest_used;
    return rc;
  }
  if (!r->z_ready) { /* the stream ended: anything after it is ignored */
    *used = len;
    return 0;
  }
  char out[DECODE_CHUNK];
  r->z.next_in = (unsigned char *)(uintptr_t)data;
  r->z.avail_in = (uInt)len;
  while (r->z.avail_in > 0 || r->z_pending) {
    r->z.next_out = (unsigned char *)out;
    r->z.avail_out = sizeof out;
    int zr = inflate(&r->z, Z_NO_FLUSH);
    if (zr != Z_OK && zr != Z_STREAM_END && zr != Z_BUF_ERROR) {
      fail(r, "the response body does not decode");
      return -1;
    }
    size_t produced = sizeof out - r->z.avail_out;
    r->z_pending = r->z.avail_out == 0 && zr != Z_STREAM_END; /* zlib may hold more */
    *used = len - r->z.avail_in;
    if (zr == Z_STREAM_END) {
      *used = len;
      inflateEnd(&r->z);
      r->z_ready = false;
      r->z_pending = false;
    }
    if (produced > 0 && r->cb->on_body) r->cb->on_body(r->ud, out, produced);
    if (!r->z_ready) break;
    if (produced == 0 && zr == Z_BUF_ERROR) {
      r->z_pending = false;
      break;
    }
    if (r->stop) return 0;
  }
  *used = len;
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t len) {
  struct lean_response *r = of(p);
  if (r->stop || r->held_off < r->held_len || r->z_pending) return hold(r, at, len);
  size_t used;
  if (deliver(r, at, len, &used) != 0) return -1;
  return used < len ? hold(r, at + used, len - used) : 0;
}

static int on_message_complete(http_parser *p) {
  struct lean_response *r = of(p);
  if (r->interim) { /* a 1xx head: the final one follows */
    r->interim = false;
    r->head_len = 0;
    r->head_count = 0;
    return 0;
  }
  if (!r->head_delivered) {
    fail(r, "response ended before its head");
    return -1;
  }
  r->complete = true;
  r->keep_alive = http_should_keep_alive(p) != 0;
  return -1; /* stops http_parser here: what follows is not this response's */
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void lean_response_init(struct lean_response *r, const struct lean_response_callbacks *cb, void *ud,
                        bool head_request) {
  memset(r, 0, sizeof *r);
  r->cb = cb;
  r->ud = ud;
  lean_response_reset(r, head_request);
}

void lean_response_reset(struct lean_response *r, bool head_request) {
  http_parser_init(&r->parser, HTTP_RESPONSE);
  r->parser.data = r;
  r->head_request = head_request;
  r->interim = r->head_delivered = r->complete = r->keep_alive = r->stop = false;
  r->last_was_value = r->value_at_end = r->in_value = false;
  r->head_len = r->head_count = 0;
  r->held_len = r->held_off = 0;
  r->bytes_seen = 0;
  if (r->z_ready) inflateEnd(&r->z);
  r->z_ready = r->z_pending = r->z_sniff = false;
  r->sniff_len = 0;
  r->decode = LEAN_DECODE_NONE;
  r->error[0] = '\0';
}

void lean_response_trim(struct lean_response *r) {
  if (r->head_delivered && r->head_text) {
    free(r->head_text);
    r->head_text = NULL;
    r->head_cap = r->head_len = r->head_count = 0;
  }
  if (r->held && r->held_off == r->held_len) {
    free(r->held);
    r->held = NULL;
    r->held_cap = r->held_len = r->held_off = 0;
  }
}

void lean_response_free(struct lean_response *r) {
  if (r->z_ready) inflateEnd(&r->z);
  r->z_ready = false;
  free(r->head_text);
  r->head_text = NULL;
  r->head_cap = r->head_len = 0;
  free(r->held);
  r->held = NULL;
  r->held_cap = r->held_len = r->held_off = 0;
}

enum lean_feed_result lean_response_feed(struct lean_response *r, const char *data, size_t len,
                                         size_t *used) {
  *used = 0;
  if (r->error[0]) return LEAN_FEED_ERROR;
  if (r->complete) { /* bytes after the end, read while the end was held */
    if (len > 0) r->keep_alive = false;
    return r->held_off < r->held_len || r->z_pending ? LEAN_FEED_MORE : LEAN_FEED_COMPLETE;
  }
  r->exec_serial++;
  r->exec_data = data;
  r->exec_len = len;
  r->bytes_seen += len;
  size_t n = http_parser_execute(&r->parser, &settings, data, len);
  enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
  if (r->complete) {
    *used = n;
    if (n < len) r->keep_alive = false; /* bytes nobody asked for: do not reuse */
    return r->held_off < r->held_len || r->z_pending ? LEAN_FEED_MORE : LEAN_FEED_COMPLETE;
  }
  *used = n;
  if (e != HPE_OK || r->error[0]) {
    if (!r->error[0])
      snprintf(r->error, sizeof r->error, "invalid response: %s", http_errno_name(e));
    return LEAN_FEED_ERROR;
  }
  return LEAN_FEED_MORE;
}

enum lean_feed_result lean_response_resume_body(struct lean_response *r) {
  if (r->error[0]) return LEAN_FEED_ERROR;
  while (!r->stop && (r->held_off < r->held_len || r->z_pending)) {
    size_t used;
    const char *from = r->held + r->held_off;
    size_t avail = r->held_len - r->held_off;
    if (deliver(r, from, avail, &used) != 0) return LEAN_FEED_ERROR;
    r->held_off += used;
    if (r->held_off == r->held_len) r->held_off = r->held_len = 0;
    if (used == 0 && !r->z_pending && !r->stop && avail == 0) break;
  }
  if (r->stop) return LEAN_FEED_STOPPED;
  return r->complete ? LEAN_FEED_COMPLETE : LEAN_FEED_MORE;
}

enum lean_feed_result lean_response_eof(struct lean_response *r) {
  if (r->error[0]) return LEAN_FEED_ERROR;
  if (r->complete) return LEAN_FEED_COMPLETE;
  r->exec_serial++;
  http_parser_execute(&r->parser, &settings, NULL, 0);
  if (r->complete) {
    r->keep_alive = false;
    return r->held_off < r->held_len || r->z_pending ? LEAN_FEED_MORE : LEAN_FEED_COMPLETE;
  }
  if (!r->error[0])
    fail(r, r->bytes_seen == 0 ? "server closed the connection without answering"
                               : "connection closed before the end of the response");
  return LEAN_FEED_ERROR;
}

bool lean_response_started(const struct lean_response *r) {
  return r->bytes_seen > 0;
}
