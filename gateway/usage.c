/* usage.c: reading OpenAI usage objects from answers and stream events,
 * and removing the usage the gateway asked for on a client's behalf (see
 * usage.h). Uses the strict scanner (body.c) to find members, so a
 * member's bytes are located exactly and nothing is re-printed; a usage
 * object is read with the same strict scanner. One exception, for speed:
 * the `"usage":null` of every stream chunk but the last is found by a
 * light pass (the event's structure, strings skipped)
 * where that gives what the strict scan would, and the rest of such an
 * event is not validated. Cannot fail: what it cannot read is "unknown".
 */
#define _GNU_SOURCE /* memmem */
#include "gateway/usage.h"

#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "gateway/body.h"

/* A non-negative whole number in v (BODY_NUMBER, at most 1e15), into *out.
 * false for anything else (a string "20" is not a count). */
static bool count_of(const struct body_value *v, uint64_t *out) {
  if (v->type != BODY_NUMBER) return false;
  double d = body_number(v);
  if (!(d >= 0 && d <= 1e15)) return false;
  *out = (uint64_t)d;
  return true;
}

static uint64_t max_count(uint64_t a, uint64_t b) {
  return a > b ? a : b;
}

/* One count inside a *_details object (e.g. cached_tokens); 0 when absent. */
static uint64_t detail_of(const struct body_value *details, const char *name) {
  if (details->type != BODY_OBJECT) return 0;
  const char *const names[] = {name};
  struct body_value v[1];
  char err[96];
  uint64_t n = 0;
  if (body_scan(details->value, details->len, names, v, 1, NULL, NULL, err, sizeof(err)) == 0)
    count_of(&v[0], &n);
  return n;
}

int usage_read_object(const char *usage, size_t len, struct usage_counts *out) {
  /* the one strict scan (body.c) reads the members: no tree, no allocation */
  enum { PROMPT, INPUT, COMPLETION, OUTPUT, TOTAL, PD, ID, CD, OD, N_FIELDS };
  static const char *const names[N_FIELDS] = {"prompt_tokens",        "input_tokens",
                                              "completion_tokens",    "output_tokens",
                                              "total_tokens",         "prompt_tokens_details",
                                              "input_tokens_details", "completion_tokens_details",
                                              "output_tokens_details"};
  struct body_value v[N_FIELDS];
  char err[96];
  if (body_scan(usage, len, names, v, N_FIELDS, NULL, NULL, err, sizeof(err)) != 0) return -1;
  uint64_t prompt = 0, completion = 0, total = 0;
  /* a usage object whose counts are not numbers tells nothing: unknown,
   * never 0 */
  int any = 0; /* every count is read (no short-circuit): either name may hold it */
  any += count_of(&v[PROMPT], &prompt);
  any += count_of(&v[INPUT], &prompt);
  any += count_of(&v[COMPLETION], &completion);
  any += count_of(&v[OUTPUT], &completion);
  any += count_of(&v[TOTAL], &total);
  if (!any) return -1;
  /* never added up: every usage object is the answer's count so far
   * (vLLM's continuous_usage_stats sends one on every chunk), so each
   * count is the largest seen (a later smaller one cannot undo tokens) */
  out->known = true;
  out->prompt = max_count(out->prompt, prompt);
  out->completion = max_count(out->completion, completion);
  out->total = max_count(out->total, total ? total : prompt + completion);
  out->cached = max_count(out->cached,
                          detail_of(v[PD].type == BODY_OBJECT ? &v[PD] : &v[ID], "cached_tokens"));
  out->reasoning = max_count(
      out->reasoning, detail_of(v[CD].type == BODY_OBJECT ? &v[CD] : &v[OD], "reasoning_tokens"));
  return 0;
}

int usage_from_answer(const char *body, size_t len, struct usage_counts *out) {
  /* OpenAI's answers end with their usage object: found from the end, it
   * costs a few hundred bytes of work instead of a scan of the answer */
  if (usage_from_tail(body, len, out) == 0) return 0;
  static const char *const names[] = {"usage"};
  struct body_value v[1];
  char err[96];
  if (body_scan(body, len, names, v, 1, NULL, NULL, err, sizeof(err)) != 0) return -1;
  if (v[0].type != BODY_OBJECT) return -1;
  return usage_read_object(v[0].value, v[0].len, out);
}

int usage_from_tail(const char *tail, size_t len, struct usage_counts *out) {
  /* from the end: `"usage"` whose quote is not escaped, then ':' and '{' */
  for (size_t i = len; i-- > 7;) {
    if (tail[i] != '"' || i < 6 || memcmp(tail + i - 6, "\"usage", 6) != 0) continue;
    size_t q = i - 6;
    if (q > 0 && tail[q - 1] == '\\') continue; /* inside a string */
    size_t p = i + 1;
    while (p < len && (tail[p] == ' ' || tail[p] == '\n' || tail[p] == '\r' || tail[p] == '\t'))
      p++;
    if (p >= len || tail[p] != ':') continue;
    p++;
    while (p < len && (tail[p] == ' ' || tail[p] == '\n' || tail[p] == '\r' || tail[p] == '\t'))
      p++;
    if (p >= len || tail[p] != '{') continue;
    /* the object's end, strings and escapes respected */
    int depth = 0;
    bool in_string = false;
    for (size_t e = p; e < len; e++) {
      char ch = tail[e];
      if (in_string) {
        if (ch == '\\')
          e++;
        else if (ch == '"')
          in_string = false;
      } else if (ch == '"') {
        in_string = true;
      } else if (ch == '{') {
        depth++;
      } else if (ch == '}' && --depth == 0) {
        return usage_read_object(tail + p, e - p + 1, out);
      }
    }
    return -1;
  }
  return -1;
}

static const char *find(const char *hay, size_t len, const char *needle) {
  return memmem(hay, len, needle, strlen(needle));
}

const char *usage_find_name(const char *p, size_t len) {
  const char *end = p + len;
  if (len < 7) return NULL;
#if defined(__SSE2__)
  /* candidates: a '"' followed by 'u' (two loads one byte apart), rare in
   * an event; each is then compared whole */
  const __m128i quote = _mm_set1_epi8('"'), u = _mm_set1_epi8('u');
  while (end - p >= 17) {
    __m128i a = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(p + 1));
    unsigned mask =
        (unsigned)_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(a, quote), _mm_cmpeq_epi8(b, u)));
    while (mask) {
      const char *at = p + __builtin_ctz(mask);
      if (end - at >= 7 && memcmp(at, "\"usage\"", 7) == 0) return at;
      mask &= mask - 1;
    }
    p += 16;
  }
#endif
  return end - p >= 7 ? memmem(p, (size_t)(end - p), "\"usage\"", 7) : NULL;
}

/* The first '"' or '\\' in [p, end), or end: 16 bytes per step with SSE2
 * (x86-64's baseline), a string's text at a time. */
static const char *quote_or_escape(const char *p, const char *end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
  while (end - p >= 16) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    unsigned mask = (unsigned)_mm_movemask_epi8(
        _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)));
    if (mask) return p + __builtin_ctz(mask);
    p += 16;
  }
#endif
  while (p < end && *p != '"' && *p != '\\') p++;
  return p;
}

/* Just past the JSON string that opens at p (a '"'), or NULL when it does
 * not end before end. Escapes are skipped, not checked. */
static const char *string_end(const char *p, const char *end) {
  for (p++; p < end; p++) {
    const char *q = quote_or_escape(p, end);
    if (q >= end) return NULL;
    if (*q == '"') return q + 1;
    p = q + 1; /* the escaped byte; the loop's p++ moves past it */
  }
  return NULL;
}

/* The common stream chunk once the gateway asked for usage: a top-level
 * `"usage":null` member. Finds it without the strict scan (one pass over
 * the structure, strings skipped, nothing validated or copied): true with
 * [*start, *end) = the member's name through its null, when json is one
 * object that closes at its end (an event whose JSON goes on in a second
 * data line is not) with exactly one such member. false otherwise (then
 * the strict path decides, as before). */
static bool top_level_usage_null(const char *json, size_t len, const char **start,
                                 const char **end) {
  const char *p = json, *stop = json + len;
  int depth = 0;
  bool want_name = false, found = false, closed = false;
  while (p < stop && (*p == ' ' || *p == '\t')) p++;
  if (p == stop || *p != '{') return false;
  while (p < stop) {
    char ch = *p;
    if (closed && ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n') return false;
    if (ch == '"') {
      const char *name = p;
      if (!(p = string_end(p, stop))) return false;
      if (depth != 1 || !want_name) continue;
      want_name = false;
      /* a Responses API object: the strict path reads it (and leaves the
       * event's "usage":null alone) */
      if (p - name == 10 && memcmp(name, "\"response\"", 10) == 0) return false;
      if (p - name != 7 || memcmp(name, "\"usage\"", 7) != 0) continue;
      if (found) return false; /* a second one: the strict scan refuses it */
      const char *q = p;
      while (q < stop && (*q == ' ' || *q == '\t')) q++;
      if (q >= stop || *q != ':') return false;
      q++;
      while (q < stop && (*q == ' ' || *q == '\t')) q++;
      if (stop - q < 4 || memcmp(q, "null", 4) != 0) return false;
      q += 4;
      if (q < stop && *q != ',' && *q != '}' && *q != ' ' && *q != '\t') return false;
      *start = name;
      *end = q;
      found = true;
      p = q;
      continue;
    }
    if (ch == '{' || ch == '[') {
      depth++;
      want_name = depth == 1;
    } else if (ch == '}' || ch == ']') {
      if (--depth == 0) closed = true;
      if (depth < 0) return false;
    } else if (ch == ',' && depth == 1) {
      want_name = true;
    }
    p++;
  }
  return found && closed;
}

/* Takes [start, end) (a member) out of event[0..len) into out, with one
 * adjacent comma: the following one, or (last member) the preceding one. */
static size_t remove_member(const char *event, size_t len, const char *json, size_t json_len,
                            const char *start, const char *end, char *out) {
  const char *p = end;
  while (p < json + json_len && (*p == ' ' || *p == '\t')) p++;
  if (p < json + json_len && *p == ',') {
    end = p + 1;
  } else {
    const char *q = start;
    while (q > json && (q[-1] == ' ' || q[-1] == '\t')) q--;
    if (q > json && q[-1] == ',') start = q - 1;
  }
  size_t head = (size_t)(start - event), tail = (size_t)(event + len - end);
  memcpy(out, event, head);
  memcpy(out + head, end, tail);
  return head + tail;
}

void usage_stream_event(const char *event, size_t len, bool strip, struct usage_counts *out,
                        char *edited_out, size_t *keep_len, bool *edited) {
  *keep_len = len;
  *edited = false;
  const char *first_usage = usage_find_name(event, len);
  if (!first_usage) return; /* the common chunk: nothing to do */
  /* The JSON is the value of the event's data line (one line: OpenAI's
   * events are single-line JSON). */
  const char *data = find(event, len, "data:");
  if (!data || (data != event && data[-1] != '\n' && data[-1] != '\r')) return;
  const char *json = data + 5;
  if (json < event + len && *json == ' ') json++;
  /* the data line ends at the first CR or LF, within the event (never
   * read past it: the event need not be NUL-terminated) */
  size_t json_len = (size_t)(event + len - json);
  const char *lf = memchr(json, '\n', json_len), *cr = memchr(json, '\r', json_len);
  if (lf) json_len = (size_t)(lf - json);
  if (cr && (size_t)(cr - json) < json_len) json_len = (size_t)(cr - json);
  const char *null_start = NULL, *null_end = NULL;
  /* The fast path only where the strict one would do the same: the JSON
   * is the event's one line (a second data line could close an object
   * the first left open, making a tail `"usage":null}` a nested one), and
   * that member is the event's only "usage" (none before it, as in a
   * duplicate or a nested usage object; none after it, as in a Responses
   * API object's). */
  const char *after = json + json_len;
  while (after < event + len && (*after == '\r' || *after == '\n')) after++;
  if (after == event + len && top_level_usage_null(json, json_len, &null_start, &null_end) &&
      null_start == first_usage &&
      !usage_find_name(null_end, (size_t)(json + json_len - null_end))) {
    /* every chunk but the last, once usage was asked for: nothing to read */
    if (strip) {
      *keep_len = remove_member(event, len, json, json_len, null_start, null_end, edited_out);
      *edited = true;
    }
    return;
  }
  static const char *const names[] = {"usage", "choices", "response"};
  struct body_value v[3];
  size_t object_end, members;
  char err[96];
  if (body_scan(json, json_len, names, v, 3, &object_end, &members, err, sizeof(err)) != 0) return;
  if (v[0].type == BODY_OBJECT) {
    usage_read_object(v[0].value, v[0].len, out);
    if (strip && v[1].type == BODY_ARRAY && v[1].empty) *keep_len = 0; /* the usage-only chunk */
    return;
  }
  if (v[2].type == BODY_OBJECT) { /* Responses API: response.completed and friends */
    static const char *const inner[] = {"usage"};
    struct body_value u[1];
    if (body_scan(v[2].value, v[2].len, inner, u, 1, NULL, NULL, err, sizeof(err)) == 0 &&
        u[0].type == BODY_OBJECT)
      usage_read_object(u[0].value, u[0].len, out);
    return;
  }
  if (!strip || v[0].type != BODY_NULL) return;
  *keep_len =
      remove_member(event, len, json, json_len, v[0].member, v[0].value + v[0].len, edited_out);
  *edited = true;
}
