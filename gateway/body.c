/* body.c: the strict one-pass JSON request-body scanner (see body.h).
 *
 * Recursive descent over the bytes with a depth bound; member names of
 * every open object are unescaped onto one stack (a byte buffer plus
 * (hash, offset, length) entries) and checked for duplicates when the
 * object closes, by pairwise comparison for small objects and a scratch
 * open-addressing table for large ones, so the work stays linear.
 * Failure: the first problem found ends the scan with a message naming
 * the byte offset; out of memory is reported the same way.
 */
#include "gateway/body.h"

#include <math.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

struct name_entry {
  uint64_t hash;
  size_t off, len; /* into scan.names */
};

/* Scratch kept on the stack; a body with more or longer member names
 * moves to the heap (realloc from a stack buffer is a malloc + copy). */
#define SCAN_INLINE_NAMES 512
#define SCAN_INLINE_ENTRIES 32
#define SCAN_WANT_LENGTHS 16

struct scan {
  const unsigned char *p, *start, *end;
  int depth;
  /* unescaped member names of the open objects */
  unsigned char *names;
  size_t names_len, names_cap;
  struct name_entry *entries;
  size_t n_entries, cap_entries;
  uint32_t *table; /* scratch for the duplicate check */
  size_t table_cap;
  /* what the caller asked for */
  const char *const *want;
  struct body_value *slots;
  size_t n_want;
  size_t want_len[SCAN_WANT_LENGTHS]; /* strlen of the first names asked for */
  size_t object_end, members;
  char *err;
  size_t errlen;
  bool failed;
  unsigned char inline_names[SCAN_INLINE_NAMES];
  struct name_entry inline_entries[SCAN_INLINE_ENTRIES];
};

/* Grows a scratch array that may still be the inline one: *ptr == inline_buf
 * is copied to the heap instead of realloc'd. */
static void *grow(void *ptr, const void *inline_buf, size_t used, size_t new_size) {
  if (ptr != inline_buf) return realloc(ptr, new_size);
  void *heap = malloc(new_size);
  if (heap && used) memcpy(heap, ptr, used);
  return heap;
}

static int fail(struct scan *s, const char *what) {
  if (!s->failed) snprintf(s->err, s->errlen, "%s at byte %zu", what, (size_t)(s->p - s->start));
  s->failed = true;
  return -1;
}

static void skip_ws(struct scan *s) {
  while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static int names_put(struct scan *s, const unsigned char *b, size_t n) {
  if (n == 0) return 0;
  if (s->names_len + n > s->names_cap) {
    size_t cap = s->names_cap ? s->names_cap : 256;
    while (cap < s->names_len + n) cap *= 2;
    unsigned char *grown = grow(s->names, s->inline_names, s->names_len, cap);
    if (!grown) return fail(s, "out of memory");
    s->names = grown;
    s->names_cap = cap;
  }
  memcpy(s->names + s->names_len, b, n);
  s->names_len += n;
  return 0;
}

static int hex4(const unsigned char *p, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    unsigned char ch = p[i];
    v <<= 4;
    if (ch >= '0' && ch <= '9')
      v |= ch - '0';
    else if (ch >= 'a' && ch <= 'f')
      v |= ch - 'a' + 10;
    else if (ch >= 'A' && ch <= 'F')
      v |= ch - 'A' + 10;
    else
      return -1;
  }
  *out = v;
  return 0;
}

/* Length of the valid UTF-8 sequence at p (RFC 3629: no overlongs, no
 * surrogates, at most U+10FFFF), or 0. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
  unsigned char c = p[0];
  size_t n;
  unsigned cp;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if ((size_t)(end - p) < n) return 0;
  for (size_t i = 1; i < n; i++) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
      (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
    return 0;
  return n;
}

/* Appends code point cp (a lone surrogate included, as its 3-byte form,
 * so that distinct escapes stay distinct) to the name stack. */
static int put_codepoint(struct scan *s, unsigned cp) {
  unsigned char b[4];
  size_t n;
  if (cp < 0x80) {
    b[0] = (unsigned char)cp;
    n = 1;
  } else if (cp < 0x800) {
    b[0] = (unsigned char)(0xC0 | (cp >> 6));
    b[1] = (unsigned char)(0x80 | (cp & 0x3F));
    n = 2;
  } else if (cp < 0x10000) {
    b[0] = (unsigned char)(0xE0 | (cp >> 12));
    b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    b[2] = (unsigned char)(0x80 | (cp & 0x3F));
    n = 3;
  } else {
    b[0] = (unsigned char)(0xF0 | (cp >> 18));
    b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    b[3] = (unsigned char)(0x80 | (cp & 0x3F));
    n = 4;
  }
  return names_put(s, b, n);
}

/* The first byte at or after p that is not plain string ASCII (0x20..0x7F
 * but '"' and '\\'), or end: a prompt is mostly such runs, so they are
 * skipped 16 bytes per step (SSE2, x86-64's baseline) instead of going
 * byte by byte through the checks below. Byte-for-byte the same verdict:
 * the bytes it stops at are handled by scan_string's per-byte path. */
static const unsigned char *skip_plain(const unsigned char *p, const unsigned char *end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
  const __m128i space = _mm_set1_epi8(0x20);
  while (end - p >= 16) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    /* signed compare: below 0x20 and 0x80..0xFF (negative) both count */
    __m128i stop =
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                     _mm_cmplt_epi8(v, space));
    unsigned mask = (unsigned)_mm_movemask_epi8(stop);
    if (mask) return p + __builtin_ctz(mask);
    p += 16;
  }
#endif
  while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
  return p;
}

/* A string at s->p (the opening quote). With decode, its unescaped bytes
 * are appended to the name stack. */
static int scan_string(struct scan *s, bool decode) {
  s->p++; /* opening quote */
  const unsigned char *run = s->p;
  while (s->p < s->end) {
    s->p = skip_plain(s->p, s->end);
    if (s->p >= s->end) break;
    unsigned char ch = *s->p;
    if (ch == '"') {
      if (decode && names_put(s, run, (size_t)(s->p - run)) != 0) return -1;
      s->p++;
      return 0;
    }
    if (ch < 0x20) return fail(s, "control character in a string (escape it)");
    if (ch == '\\') {
      if (decode && names_put(s, run, (size_t)(s->p - run)) != 0) return -1;
      if (s->end - s->p < 2) break;
      unsigned char esc = s->p[1];
      static const char plain[] = "\"\\/bfnrt";
      static const char value[] = "\"\\/\b\f\n\r\t";
      const char *at = esc ? strchr(plain, esc) : NULL;
      if (at) {
        if (decode && names_put(s, (const unsigned char *)&value[at - plain], 1) != 0) return -1;
        s->p += 2;
      } else if (esc == 'u') {
        unsigned cp;
        if (s->end - s->p < 6 || hex4(s->p + 2, &cp) != 0) return fail(s, "invalid \\u escape");
        s->p += 6;
        if (cp >= 0xD800 && cp <= 0xDBFF && s->end - s->p >= 6 && s->p[0] == '\\' &&
            s->p[1] == 'u') {
          unsigned lo;
          if (hex4(s->p + 2, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            s->p += 6;
          }
        }
        if (decode && put_codepoint(s, cp) != 0) return -1;
      } else {
        return fail(s, "invalid escape in a string");
      }
      run = s->p;
      continue;
    }
    size_t n = utf8_len(s->p, s->end);
    if (!n) return fail(s, "invalid UTF-8 in a string");
    s->p += n;
  }
  return fail(s, "unterminated string");
}

static int scan_number(struct scan *s) {
  const unsigned char *p = s->p, *e = s->end;
  if (p < e && *p == '-') p++;
  if (p < e && *p == '0') {
    p++;
  } else if (p < e && *p >= '1' && *p <= '9') {
    while (p < e && *p >= '0' && *p <= '9') p++;
  } else {
    return fail(s, "invalid number");
  }
  if (p < e && *p == '.') {
    p++;
    if (!(p < e && *p >= '0' && *p <= '9')) return fail(s, "invalid number");
    while (p < e && *p >= '0' && *p <= '9') p++;
  }
  if (p < e && (*p == 'e' || *p == 'E')) {
    p++;
    if (p < e && (*p == '+' || *p == '-')) p++;
    if (!(p < e && *p >= '0' && *p <= '9')) return fail(s, "invalid number");
    while (p < e && *p >= '0' && *p <= '9') p++;
  }
  s->p = p;
  return 0;
}

/* SipHash-2-4 (Aumasson and Bernstein) under a key drawn once per process
 * from OpenSSL's RAND_bytes: member names a client chooses cannot be made
 * to collide in the duplicate check's table (a fixed hash such as FNV can,
 * which turns the linear check quadratic). */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
  do {                                                                                             \
    v0 += v1;                                                                                      \
    v1 = ROTL(v1, 13);                                                                             \
    v1 ^= v0;                                                                                      \
    v0 = ROTL(v0, 32);                                                                             \
    v2 += v3;                                                                                      \
    v3 = ROTL(v3, 16);                                                                             \
    v3 ^= v2;                                                                                      \
    v0 += v3;                                                                                      \
    v3 = ROTL(v3, 21);                                                                             \
    v3 ^= v0;                                                                                      \
    v2 += v1;                                                                                      \
    v1 = ROTL(v1, 17);                                                                             \
    v1 ^= v2;                                                                                      \
    v2 = ROTL(v2, 32);                                                                             \
  } while (0)

static uint64_t sip_key[2];
static bool sip_keyed;

static uint64_t load64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static uint64_t hash_bytes(const unsigned char *b, size_t n) {
  if (!sip_keyed) {
    unsigned char k[16];
    if (RAND_bytes(k, sizeof(k)) != 1) /* cannot happen on Linux; still a keyed hash */
      for (size_t i = 0; i < sizeof(k); i++) k[i] = (unsigned char)(i * 151u + 7u);
    sip_key[0] = load64(k);
    sip_key[1] = load64(k + 8);
    sip_keyed = true;
  }
  uint64_t v0 = 0x736f6d6570736575ull ^ sip_key[0], v1 = 0x646f72616e646f6dull ^ sip_key[1];
  uint64_t v2 = 0x6c7967656e657261ull ^ sip_key[0], v3 = 0x7465646279746573ull ^ sip_key[1];
  size_t full = n & ~(size_t)7;
  for (size_t i = 0; i < full; i += 8) {
    uint64_t m = load64(b + i);
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
  }
  uint64_t last = (uint64_t)n << 56;
  for (size_t i = 0; i < (n & 7); i++) last |= (uint64_t)b[full + i] << (8 * i);
  v3 ^= last;
  SIPROUND;
  SIPROUND;
  v0 ^= last;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

static int duplicate(struct scan *s, const struct name_entry *a) {
  char shown[48];
  size_t n = 0;
  for (size_t i = 0; i < a->len && n + 4 < sizeof(shown); i++) {
    unsigned char ch = s->names[a->off + i];
    shown[n++] = (ch >= 0x20 && ch < 0x7F && ch != '"' && ch != '\\') ? (char)ch : '?';
  }
  if (n + 4 >= sizeof(shown)) shown[n++] = '.', shown[n++] = '.', shown[n++] = '.';
  shown[n] = '\0';
  char what[96];
  snprintf(what, sizeof(what), "duplicate member \"%s\"", shown);
  return fail(s, what);
}

static bool same_name(const struct scan *s, const struct name_entry *a,
                      const struct name_entry *b) {
  return a->len == b->len && memcmp(s->names + a->off, s->names + b->off, a->len) == 0;
}

/* Checks the names of the object whose entries start at base. */
static int check_duplicates(struct scan *s, size_t base) {
  size_t count = s->n_entries - base;
  struct name_entry *e = s->entries + base;
  if (count <= 8) { /* small objects (nearly all): compared pairwise, no hashing */
    for (size_t i = 1; i < count; i++)
      for (size_t j = 0; j < i; j++)
        if (same_name(s, &e[i], &e[j])) return duplicate(s, &e[i]);
    return 0;
  }
  for (size_t i = 0; i < count; i++) e[i].hash = hash_bytes(s->names + e[i].off, e[i].len);
  size_t cap = 16;
  while (cap < count * 2) cap *= 2;
  if (cap > s->table_cap) {
    uint32_t *t = realloc(s->table, cap * sizeof(*t));
    if (!t) return fail(s, "out of memory");
    s->table = t;
    s->table_cap = cap;
  }
  memset(s->table, 0xFF, cap * sizeof(*s->table));
  for (size_t i = 0; i < count; i++) {
    size_t slot = (size_t)e[i].hash & (cap - 1);
    while (s->table[slot] != UINT32_MAX) {
      const struct name_entry *o = &e[s->table[slot]];
      if (o->hash == e[i].hash && same_name(s, &e[i], o)) return duplicate(s, &e[i]);
      slot = (slot + 1) & (cap - 1);
    }
    s->table[slot] = (uint32_t)i;
  }
  return 0;
}

static int scan_value(struct scan *s, struct body_value *out);

static int scan_object(struct scan *s) {
  size_t base = s->n_entries, names_base = s->names_len;
  bool top = s->depth == 1;
  s->p++; /* { */
  skip_ws(s);
  if (s->p < s->end && *s->p == '}') {
    if (top) s->object_end = (size_t)(s->p - s->start);
    s->p++;
    return 0;
  }
  for (;;) {
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"') return fail(s, "expected a member name in quotes");
    size_t name_off = s->names_len;
    const unsigned char *member = s->p;
    if (scan_string(s, true) != 0) return -1;
    if (s->n_entries == s->cap_entries) {
      size_t cap = s->cap_entries ? s->cap_entries * 2 : 64;
      struct name_entry *grown =
          grow(s->entries, s->inline_entries, s->n_entries * sizeof(*grown), cap * sizeof(*grown));
      if (!grown) return fail(s, "out of memory");
      s->entries = grown;
      s->cap_entries = cap;
    }
    if (s->n_entries - base >= UINT32_MAX / 2) return fail(s, "too many members");
    struct name_entry *ent = &s->entries[s->n_entries++];
    ent->off = name_off;
    ent->len = s->names_len - name_off;
    if (ent->len && memchr(s->names + name_off, 0, ent->len))
      return fail(s, "a member name with a NUL character (\\u0000)");
    ent->hash = 0; /* computed in check_duplicates, for objects that need it */
    struct body_value *slot = NULL;
    if (top) {
      s->members++;
      for (size_t i = 0; i < s->n_want; i++) {
        size_t want_len = i < SCAN_WANT_LENGTHS ? s->want_len[i] : strlen(s->want[i]);
        if (want_len == ent->len && memcmp(s->want[i], s->names + name_off, ent->len) == 0)
          slot = &s->slots[i];
      }
    }
    skip_ws(s);
    if (s->p >= s->end || *s->p != ':') return fail(s, "expected ':' after a member name");
    s->p++;
    skip_ws(s);
    if (scan_value(s, slot) != 0) return -1;
    if (slot) slot->member = (const char *)member;
    skip_ws(s);
    if (s->p < s->end && *s->p == ',') {
      s->p++;
      continue;
    }
    if (s->p < s->end && *s->p == '}') break;
    return fail(s, "expected ',' or '}' in an object");
  }
  if (check_duplicates(s, base) != 0) return -1;
  if (top) s->object_end = (size_t)(s->p - s->start);
  s->p++;
  s->n_entries = base;
  s->names_len = names_base;
  return 0;
}

static int scan_array(struct scan *s, bool *empty) {
  s->p++; /* [ */
  skip_ws(s);
  *empty = true;
  if (s->p < s->end && *s->p == ']') {
    s->p++;
    return 0;
  }
  *empty = false;
  for (;;) {
    skip_ws(s);
    if (scan_value(s, NULL) != 0) return -1;
    skip_ws(s);
    if (s->p < s->end && *s->p == ',') {
      s->p++;
      continue;
    }
    if (s->p < s->end && *s->p == ']') {
      s->p++;
      return 0;
    }
    return fail(s, "expected ',' or ']' in an array");
  }
}

static int literal(struct scan *s, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return fail(s, "unexpected token");
  s->p += n;
  return 0;
}

static int scan_value(struct scan *s, struct body_value *out) {
  if (s->p >= s->end) return fail(s, "unexpected end of the body");
  const unsigned char *begin = s->p;
  enum body_type type;
  bool empty = false;
  int rc;
  switch (*s->p) {
  case '{':
    if (++s->depth > BODY_MAX_DEPTH) return fail(s, "nesting deeper than 128 levels");
    type = BODY_OBJECT;
    rc = scan_object(s);
    if (rc == 0) { /* "{", whitespace, "}" is empty */
      const unsigned char *q = begin + 1;
      while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r') q++;
      empty = *q == '}';
    }
    s->depth--;
    break;
  case '[':
    if (++s->depth > BODY_MAX_DEPTH) return fail(s, "nesting deeper than 128 levels");
    type = BODY_ARRAY;
    rc = scan_array(s, &empty);
    s->depth--;
    break;
  case '"':
    type = BODY_STRING;
    rc = scan_string(s, false);
    break;
  case 't':
    type = BODY_TRUE;
    rc = literal(s, "true");
    break;
  case 'f':
    type = BODY_FALSE;
    rc = literal(s, "false");
    break;
  case 'n':
    type = BODY_NULL;
    rc = literal(s, "null");
    break;
  default:
    type = BODY_NUMBER;
    rc = scan_number(s);
    break;
  }
  if (rc != 0) return -1;
  if (out) {
    out->type = type;
    out->value = (const char *)begin;
    out->len = (size_t)(s->p - begin);
    out->empty = empty;
  }
  return 0;
}

int body_scan(const char *body, size_t len, const char *const *names, struct body_value *slots,
              size_t n, size_t *object_end, size_t *members, char *err, size_t errlen) {
  struct scan s;
  memset(&s, 0, offsetof(struct scan, inline_names));
  s.names = s.inline_names;
  s.names_cap = sizeof(s.inline_names);
  s.entries = s.inline_entries;
  s.cap_entries = SCAN_INLINE_ENTRIES;
  s.start = s.p = (const unsigned char *)body;
  s.end = s.start + len;
  s.want = names;
  s.slots = slots;
  s.n_want = n;
  for (size_t i = 0; i < n && i < SCAN_WANT_LENGTHS; i++) s.want_len[i] = strlen(names[i]);
  s.err = err;
  s.errlen = errlen;
  if (errlen) err[0] = '\0';
  for (size_t i = 0; i < n; i++) memset(&slots[i], 0, sizeof(slots[i]));
  int rc = 0;
  skip_ws(&s);
  if (s.p >= s.end) {
    rc = fail(&s, "the body is empty");
  } else if (*s.p != '{') {
    rc = fail(&s, "the body must be a JSON object");
  } else {
    s.depth = 1;
    rc = scan_object(&s);
    if (rc == 0) {
      skip_ws(&s);
      if (s.p < s.end) rc = fail(&s, "unexpected bytes after the JSON object");
    }
  }
  if (s.names != s.inline_names) free(s.names);
  if (s.entries != s.inline_entries) free(s.entries);
  free(s.table);
  if (rc != 0) {
    for (size_t i = 0; i < n; i++) memset(&slots[i], 0, sizeof(slots[i]));
    return -1;
  }
  if (object_end) *object_end = s.object_end;
  if (members) *members = s.members;
  return 0;
}

double body_number(const struct body_value *v) {
  if (!v || v->type != BODY_NUMBER || v->len == 0 || v->len > 400) return 0;
  char text[401];
  memcpy(text, v->value, v->len);
  text[v->len] = '\0';
  return strtod(text, NULL);
}

size_t body_format_number(double d, char *out, size_t size) {
  if (!isfinite(d)) d = 0;
  int n = 0;
  for (int precision = 1; precision <= 17; precision++) {
    n = snprintf(out, size, "%.*g", precision, d);
    if (strtod(out, NULL) == d) break;
  }
  return n > 0 ? (size_t)n : 0;
}

size_t body_string(const struct body_value *v, char *out, size_t size) {
  if (!size) return 0;
  out[0] = '\0';
  if (!v || v->type != BODY_STRING || v->len < 2) return 0;
  size_t n = 0;
  const char *p = v->value + 1, *end = v->value + v->len - 1;
  while (p < end && n + 1 < size) {
    if (*p != '\\') {
      out[n++] = *p++;
      continue;
    }
    if (end - p < 2) break;
    char esc = p[1];
    static const char plain[] = "\"\\/bfnrt";
    static const char value[] = "\"\\/\b\f\n\r\t";
    const char *at = strchr(plain, esc);
    if (esc && at) {
      out[n++] = value[at - plain];
      p += 2;
      continue;
    }
    if (esc != 'u' || end - p < 6) break;
    unsigned cp;
    if (hex4((const unsigned char *)p + 2, &cp) != 0 || cp == 0) break;
    p += 6;
    char utf8[4];
    size_t k = 0;
    if (cp < 0x80) {
      utf8[k++] = (char)cp;
    } else if (cp < 0x800) {
      utf8[k++] = (char)(0xC0 | (cp >> 6));
      utf8[k++] = (char)(0x80 | (cp & 0x3F));
    } else {
      utf8[k++] = (char)(0xE0 | (cp >> 12));
      utf8[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
      utf8[k++] = (char)(0x80 | (cp & 0x3F));
    }
    if (n + k + 1 > size) break;
    memcpy(out + n, utf8, k);
    n += k;
  }
  if (p < end) { /* cut: a NUL escape, or out is too small */
    out[0] = '\0';
    return 0;
  }
  out[n] = '\0';
  return n;
}
