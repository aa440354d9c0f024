/* usage.c: reading OpenAI usage objects from answers and stream events,
 * and removing the usage the gateway asked for on a client's behalf (see
 * usage.h). Uses the strict scanner (body.c) to find members, so a
 * member's bytes are located exactly and nothing is re-printed; a usage
 * object (a few hundred bytes) is read with cJSON. Cannot fail: what it
 * cannot read is "unknown".
 */
#include "gateway/usage.h"

#include <cjson/cJSON.h>
#include <string.h>

#include "gateway/body.h"

static uint64_t count_of(const cJSON *obj, const char *a, const char *b) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, a);
  if (!cJSON_IsNumber(v) && b) v = cJSON_GetObjectItemCaseSensitive(obj, b);
  if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e15) return 0;
  return (uint64_t)v->valuedouble;
}

int usage_read_object(const char *usage, size_t len, struct usage_counts *out) {
  cJSON *u = cJSON_ParseWithLength(usage, len);
  if (!cJSON_IsObject(u)) {
    cJSON_Delete(u);
    return -1;
  }
  /* a usage object whose counts are not numbers tells nothing: unknown,
   * never 0 */
  bool any = false;
  static const char *const counts[] = {"prompt_tokens", "input_tokens", "completion_tokens",
                                       "output_tokens", "total_tokens"};
  for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++)
    any = any || cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(u, counts[i]));
  if (!any) {
    cJSON_Delete(u);
    return -1;
  }
  uint64_t prompt = count_of(u, "prompt_tokens", "input_tokens");
  uint64_t completion = count_of(u, "completion_tokens", "output_tokens");
  uint64_t total = count_of(u, "total_tokens", NULL);
  const cJSON *pd = cJSON_GetObjectItemCaseSensitive(u, "prompt_tokens_details");
  if (!cJSON_IsObject(pd)) pd = cJSON_GetObjectItemCaseSensitive(u, "input_tokens_details");
  const cJSON *cd = cJSON_GetObjectItemCaseSensitive(u, "completion_tokens_details");
  if (!cJSON_IsObject(cd)) cd = cJSON_GetObjectItemCaseSensitive(u, "output_tokens_details");
  out->known = true;
  out->prompt += prompt;
  out->completion += completion;
  out->total += total ? total : prompt + completion;
  if (cJSON_IsObject(pd)) out->cached += count_of(pd, "cached_tokens", NULL);
  if (cJSON_IsObject(cd)) out->reasoning += count_of(cd, "reasoning_tokens", NULL);
  cJSON_Delete(u);
  return 0;
}

int usage_from_answer(const char *body, size_t len, struct usage_counts *out) {
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
  size_t n = strlen(needle);
  for (size_t i = 0; i + n <= len; i++)
    if (hay[i] == needle[0] && memcmp(hay + i, needle, n) == 0) return hay + i;
  return NULL;
}

void usage_stream_event(const char *event, size_t len, bool strip, struct usage_counts *out,
                        char *edited_out, size_t *keep_len, bool *edited) {
  *keep_len = len;
  *edited = false;
  if (!find(event, len, "\"usage\"")) return; /* the common chunk: nothing to do */
  /* The JSON is the value of the event's data line (one line: OpenAI's
   * events are single-line JSON). */
  const char *data = find(event, len, "data:");
  if (!data || (data != event && data[-1] != '\n' && data[-1] != '\r')) return;
  const char *json = data + 5;
  if (json < event + len && *json == ' ') json++;
  size_t json_len = strcspn(json, "\r\n");
  if (json + json_len > event + len) json_len = (size_t)(event + len - json);
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
  /* Remove `"usage":null` with one adjacent comma: the following one, or
   * (last member) the preceding one. */
  const char *start = v[0].member, *end = v[0].value + v[0].len;
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
  memcpy(edited_out, event, head);
  memcpy(edited_out + head, end, tail);
  *keep_len = head + tail;
  *edited = true;
}
