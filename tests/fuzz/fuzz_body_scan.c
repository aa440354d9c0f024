/* fuzz_body_scan: the one strict parse of a request body (gateway/body.h).
 *
 * Invariants checked on every input:
 *  - on success every recorded slot lies inside the body, its first and
 *    last bytes agree with its type, and `empty` is right for arrays and
 *    objects; object_end points at the top-level '}'; `members` equals
 *    cJSON's count of top-level members;
 *  - every body body_scan accepts is accepted by cJSON too (independent
 *    parser), except lone UTF-16 surrogate escapes, which RFC 8259 allows
 *    and cJSON refuses; and no object in cJSON's tree has two members of
 *    the same name (body_scan must refuse duplicates, cJSON keeps them);
 *  - a body cJSON accepts but body_scan refuses is refused for a reason
 *    body_scan is stricter about (duplicates, depth, UTF-8, control
 *    characters, number syntax, escapes), and a duplicate it names exists;
 *  - splicing ,"temperature":0.7 at object_end (what chat.c does with model
 *    defaults) still scans, with the new member found, unless the body
 *    already had "temperature", which must then be refused as a duplicate;
 *  - body_format_number() of any finite double reads back exactly and is a
 *    JSON number body_scan accepts.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "gateway/body.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const names[] = {"messages", "stream", "model", "temperature",
                                    "top_p",    "n",      "a"};
#define N_NAMES (sizeof(names) / sizeof(names[0]))
enum { I_TEMPERATURE = 3 };

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

static bool is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void check_slot(const char *body, size_t len, const struct body_value *v) {
  if (v->type == BODY_ABSENT) {
    CHECK(v->value == NULL && v->len == 0);
    return;
  }
  CHECK(v->value >= body && v->len > 0 && v->value + v->len <= body + len);
  char first = v->value[0], last = v->value[v->len - 1];
  switch (v->type) {
  case BODY_NULL:
    CHECK(v->len == 4 && memcmp(v->value, "null", 4) == 0);
    break;
  case BODY_TRUE:
    CHECK(v->len == 4 && memcmp(v->value, "true", 4) == 0);
    break;
  case BODY_FALSE:
    CHECK(v->len == 5 && memcmp(v->value, "false", 5) == 0);
    break;
  case BODY_NUMBER:
    CHECK(first == '-' || (first >= '0' && first <= '9'));
    CHECK(last >= '0' && last <= '9');
    break;
  case BODY_STRING:
    CHECK(first == '"' && last == '"' && v->len >= 2);
    break;
  case BODY_ARRAY:
  case BODY_OBJECT: {
    CHECK(first == (v->type == BODY_ARRAY ? '[' : '{'));
    CHECK(last == (v->type == BODY_ARRAY ? ']' : '}'));
    bool blank = true;
    for (size_t i = 1; i + 1 < v->len; i++) blank = blank && is_ws(v->value[i]);
    CHECK(v->empty == blank);
    break;
  }
  default:
    CHECK(!"unknown type");
  }
}

/* True when some object in the tree has two members with the same name. */
static bool has_duplicate(const cJSON *node) {
  for (const cJSON *a = node ? node->child : NULL; a; a = a->next) {
    if (cJSON_IsObject(node))
      for (const cJSON *b = a->next; b; b = b->next)
        if (a->string && b->string && strcmp(a->string, b->string) == 0) return true;
    if (has_duplicate(a)) return true;
  }
  return false;
}

/* An escape cJSON decodes differently from body_scan: a UTF-16 surrogate
 * (cJSON refuses lone ones) or \u0000 (cJSON cuts the string there). */
static bool has_special_escape(const char *b, size_t len) {
  for (size_t i = 0; i + 5 < len; i++) {
    if (b[i] != '\\') continue;
    if (b[i + 1] == '\\') {
      i++;
      continue;
    }
    if (b[i + 1] != 'u') continue;
    char h = b[i + 2];
    if ((h == 'd' || h == 'D') && strchr("89abcdefABCDEF", b[i + 3]) && b[i + 3]) return true;
    if (memcmp(b + i + 2, "0000", 4) == 0) return true;
  }
  return false;
}

static void check_number_format(const uint8_t *data, size_t size) {
  if (size < 8) return;
  double d;
  memcpy(&d, data, sizeof d);
  if (!isfinite(d)) return;
  char out[48];
  size_t n = body_format_number(d, out, sizeof out);
  CHECK(n > 0 && n < 32 && strlen(out) == n);
  CHECK(strtod(out, NULL) == d);
  char doc[64];
  int dn = snprintf(doc, sizeof doc, "{\"temperature\":%s}", out);
  struct body_value slots[N_NAMES];
  char err[128];
  size_t end, members;
  CHECK(body_scan(doc, (size_t)dn, names, slots, N_NAMES, &end, &members, err, sizeof err) == 0);
  CHECK(slots[I_TEMPERATURE].type == BODY_NUMBER && slots[I_TEMPERATURE].len == n);
  CHECK(body_number(&slots[I_TEMPERATURE]) == d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *body = (const char *)data;
  struct body_value slots[N_NAMES];
  size_t object_end = (size_t)-1, members = (size_t)-1;
  char err[160];
  int rc = body_scan(body, size, names, slots, N_NAMES, &object_end, &members, err, sizeof err);
  const char *parse_end = NULL;
  cJSON *tree = cJSON_ParseWithLengthOpts(body, size, &parse_end, 0);
  /* cJSON stops at the end of the value; the rest must be whitespace. */
  for (const char *p = parse_end; tree && p < body + size; p++)
    if (!is_ws(*p)) {
      cJSON_Delete(tree);
      tree = NULL;
    }
  bool special = has_special_escape(body, size);

  if (rc == 0) {
    CHECK(err[0] == '\0');
    CHECK(object_end < size && body[object_end] == '}');
    for (size_t i = 0; i < N_NAMES; i++) check_slot(body, size, &slots[i]);
    if (!special) {
      CHECK(tree != NULL);
      CHECK(cJSON_IsObject(tree));
      CHECK((size_t)cJSON_GetArraySize(tree) == members);
      CHECK(!has_duplicate(tree));
      for (size_t i = 0; i < N_NAMES; i++) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(tree, names[i]);
        CHECK((item != NULL) == (slots[i].type != BODY_ABSENT));
      }
    }
    /* What insert_defaults() in chat.c does. */
    static const char add[] = ",\"temperature\":0.7";
    size_t add_len = sizeof(add) - 1, skip = members > 0 ? 0 : 1;
    char *spliced = malloc(size + add_len);
    CHECK(spliced != NULL);
    memcpy(spliced, body, object_end);
    memcpy(spliced + object_end, add + skip, add_len - skip);
    memcpy(spliced + object_end + add_len - skip, body + object_end, size - object_end);
    size_t slen = size + add_len - skip, end2, members2;
    struct body_value slots2[N_NAMES];
    char err2[160];
    int rc2 = body_scan(spliced, slen, names, slots2, N_NAMES, &end2, &members2, err2, sizeof err2);
    if (slots[I_TEMPERATURE].type == BODY_ABSENT) {
      CHECK(rc2 == 0);
      CHECK(members2 == members + 1);
      CHECK(end2 == object_end + add_len - skip);
      CHECK(slots2[I_TEMPERATURE].type == BODY_NUMBER && slots2[I_TEMPERATURE].len == 3);
      CHECK(memcmp(slots2[I_TEMPERATURE].value, "0.7", 3) == 0);
      for (size_t i = 0; i < N_NAMES; i++)
        if (i != I_TEMPERATURE) {
          CHECK(slots2[i].type == slots[i].type && slots2[i].len == slots[i].len);
          if (slots[i].type != BODY_ABSENT)
            CHECK(memcmp(slots2[i].value, slots[i].value, slots[i].len) == 0);
        }
    } else {
      CHECK(rc2 != 0 && strstr(err2, "duplicate member \"temperature\"") != NULL);
    }
    free(spliced);
  } else {
    CHECK(err[0] != '\0' && strstr(err, " at byte ") != NULL);
    unsigned long long at = strtoull(strrchr(err, ' ') + 1, NULL, 10);
    CHECK(at <= size);
    for (size_t i = 0; i < N_NAMES; i++) CHECK(slots[i].type == BODY_ABSENT);
    bool controls = false; /* cJSON takes every byte <= 0x20 for whitespace */
    for (size_t i = 0; i < size; i++)
      controls = controls || (data[i] < 0x20 && !is_ws((char)data[i]));
    if (tree && cJSON_IsObject(tree) && !controls) {
      /* cJSON is laxer: the refusal must be one body_scan is stricter on. */
      static const char *const stricter[] = {
          "duplicate member", "nesting deeper", "invalid UTF-8",      "control character",
          "invalid number",   "unexpected",     "invalid \\u escape", "expected ','"};
      bool explained = false;
      for (size_t i = 0; i < sizeof(stricter) / sizeof(stricter[0]); i++)
        explained = explained || strncmp(err, stricter[i], strlen(stricter[i])) == 0;
      if (!explained) fprintf(stderr, "cJSON accepts, body_scan says: %s\n", err);
      CHECK(explained);
      if (strncmp(err, "duplicate member", 16) == 0 && !special) CHECK(has_duplicate(tree));
    }
  }
  cJSON_Delete(tree);
  check_number_format(data, size);
  return 0;
}
