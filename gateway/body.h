/* gateway/body: private to the gateway module. The one strict parse of a
 * JSON request body (RFC 8259), done once per request; every decision the
 * gateway makes about the body (stream or not, validation, model defaults,
 * cache key, forwarding) reads what this parse found, so the gateway and
 * the upstream always see the same request.
 *
 * One validating pass over the bytes, no tree: it checks the whole body
 * (UTF-8, escapes, numbers, nesting at most BODY_MAX_DEPTH, duplicate
 * member names in every object, compared after unescaping) and records,
 * for a few top-level member names the caller asks for, where their values
 * are. Nothing is copied or re-printed: the body goes upstream as the
 * client sent it. Work and memory are linear in the body size.
 */
#ifndef ZG_GATEWAY_BODY_H
#define ZG_GATEWAY_BODY_H

#include <stdbool.h>
#include <stddef.h>

#define BODY_MAX_DEPTH 128

enum body_type {
  BODY_ABSENT = 0, /* the member is not in the object */
  BODY_NULL,
  BODY_FALSE,
  BODY_TRUE,
  BODY_NUMBER,
  BODY_STRING,
  BODY_ARRAY,
  BODY_OBJECT,
};

/* Where one top-level member's value is: value[0..len) are its raw bytes
 * in the body (a string includes its quotes, escapes not decoded). For an
 * array or object, empty says it has no element/member. member points at
 * the opening quote of the member's name (member..value+len is the whole
 * "name": value text). */
struct body_value {
  enum body_type type;
  const char *value;
  size_t len;
  bool empty;
  const char *member;
};

/* The string value v (BODY_STRING) unescaped into out[size]
 * (NUL-terminated). Returns the length written; 0 (and out "") when v is
 * not a string, holds an escaped NUL, or does not fit: never a cut value. */
size_t body_string(const struct body_value *v, char *out, size_t size);

/* Scans body[0..len) (not NUL-terminated; NUL bytes are not special).
 * names: n top-level member names to look for (plain ASCII, no escapes);
 * slots: n results, filled in the same order (BODY_ABSENT when missing).
 * *object_end: offset of the top-level object's closing '}' (where a
 * member can be inserted); *members: how many top-level members it has.
 * Returns 0, or -1 with err (errlen bytes, NUL-terminated) saying what is
 * wrong and at which byte offset: not JSON, not an object, a duplicate
 * member (named), nesting too deep, invalid UTF-8. Allocates scratch
 * memory and frees it before returning; -1 with "out of memory" then. */
int body_scan(const char *body, size_t len, const char *const *names, struct body_value *slots,
              size_t n, size_t *object_end, size_t *members, char *err, size_t errlen);

/* The number in v (BODY_NUMBER) as a double; 0 for anything else. */
double body_number(const struct body_value *v);

/* Formats d as the shortest decimal that reads back as exactly d (what a
 * model default inserted into a body looks like). out: at least 32 bytes.
 * Returns the length written. */
size_t body_format_number(double d, char *out, size_t size);

#endif
