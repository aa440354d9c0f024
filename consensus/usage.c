/* usage.c: the replicated usage store (struct zg_usage, see internal.h),
 * fed by usage.add entries: per token a ring of per-second (requests,
 * tokens) for the rpm/tpm window and token totals per UTC day and month
 * for budgets; per (token, model, key) counters since the row appeared
 * and hourly buckets for 62 days.
 *
 * Determinism: apply reads only the entry (its `at`, unix seconds, chosen
 * by the active node) and the state; pruning runs from that `at`, never
 * from a local clock, so every node (and every restore) holds the same.
 *
 * Memory is bounded by ZG_USAGE_MAX_TOKENS token entries,
 * ZG_USAGE_MAX_ROWS rows and ZG_USAGE_MAX_HOURS hourly buckets; counts
 * that would need more are refused deterministically (counted in
 * `dropped`; a row's totals still grow when only its hourly bucket cannot
 * be added). Rows idle for 62 days and tokens idle for three months leave.
 *
 * Failure modes: malformed args are refused whole (state unchanged);
 * allocation failure drops that count (logged) and never corrupts the
 * state (arrays grow before anything is written into them).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

const char *const zg_usage_counter_names[ZG_USAGE_COUNTERS] = {
    "requests", "prompt", "completion", "total", "cached", "reasoning", "unknown"};

#define MAX_AT 253402300799ull        /* 9999-12-31T23:59:59Z */
#define MAX_COUNT 9000000000000000ull /* exact in a JSON number */
#define MAX_ITEMS 100000
#define MAX_MODEL_LEN 256
#define TOKEN_IDLE_S ((uint64_t)(ZG_USAGE_MONTHS * 31u + 1u) * 86400u)
#define ROW_IDLE_S ((uint64_t)ZG_USAGE_RETAIN_HOURS * 3600u)
enum { C_REQUESTS, C_PROMPT, C_COMPLETION, C_TOTAL };

static uint64_t sat_add(uint64_t a, uint64_t b) {
  return a + b > MAX_COUNT || a + b < a ? MAX_COUNT : a + b;
}

static uint64_t day_key(uint64_t at) {
  return at / 86400u + 1u;
}

static uint64_t month_key(uint64_t at) {
  time_t t = (time_t)at;
  struct tm tm;
  gmtime_r(&t, &tm);
  return (uint64_t)(tm.tm_year + 1900) * 12u + (uint64_t)tm.tm_mon + 1u;
}

/* ---- containers --------------------------------------------------------- */

static void row_free(struct zg_usage_row *r) {
  free(r->token);
  free(r->model);
  free(r->key);
  free(r->hours);
}

void zg_usage_free(struct zg_usage *u) {
  for (size_t i = 0; i < u->n_tokens; i++) free(u->tokens[i].name);
  free(u->tokens);
  for (size_t i = 0; i < u->n_rows; i++) row_free(&u->rows[i]);
  free(u->rows);
  memset(u, 0, sizeof *u);
}

/* Index of `name`, or -(insertion point) - 1. */
static long token_search(const struct zg_usage *u, const char *name) {
  size_t lo = 0, hi = u->n_tokens;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(u->tokens[mid].name, name);
    if (c == 0) return (long)mid;
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return -(long)lo - 1;
}

const struct zg_usage_token *zg_usage_token_find(const struct zg_usage *u, const char *name) {
  long i = name ? token_search(u, name) : -1;
  return i >= 0 ? &u->tokens[i] : NULL;
}

static struct zg_usage_token *token_get(struct zg_usage *u, const char *name) {
  long i = token_search(u, name);
  if (i >= 0) return &u->tokens[i];
  if (u->n_tokens >= ZG_USAGE_MAX_TOKENS) return NULL;
  if (u->n_tokens == u->tokens_cap) {
    size_t cap = u->tokens_cap ? 2 * u->tokens_cap : 8;
    struct zg_usage_token *grown = realloc(u->tokens, cap * sizeof *grown);
    if (grown == NULL) return NULL;
    u->tokens = grown;
    u->tokens_cap = cap;
  }
  char *copy = strdup(name);
  if (copy == NULL) return NULL;
  size_t at = (size_t)(-i - 1);
  memmove(&u->tokens[at + 1], &u->tokens[at], (u->n_tokens - at) * sizeof *u->tokens);
  memset(&u->tokens[at], 0, sizeof *u->tokens);
  u->tokens[at].name = copy;
  u->n_tokens++;
  return &u->tokens[at];
}

static int row_cmp(const struct zg_usage_row *r, const char *token, const char *model,
                   const char *key) {
  int c = strcmp(r->token, token);
  if (c == 0) c = strcmp(r->model, model);
  if (c == 0) c = strcmp(r->key, key);
  return c;
}

static long row_search(const struct zg_usage *u, const char *token, const char *model,
                       const char *key) {
  size_t lo = 0, hi = u->n_rows;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = row_cmp(&u->rows[mid], token, model, key);
    if (c == 0) return (long)mid;
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return -(long)lo - 1;
}

static struct zg_usage_row *row_get(struct zg_usage *u, const char *token, const char *model,
                                    const char *key) {
  long i = row_search(u, token, model, key);
  if (i >= 0) return &u->rows[i];
  if (u->n_rows >= ZG_USAGE_MAX_ROWS) return NULL;
  if (u->n_rows == u->rows_cap) {
    size_t cap = u->rows_cap ? 2 * u->rows_cap : 8;
    struct zg_usage_row *grown = realloc(u->rows, cap * sizeof *grown);
    if (grown == NULL) return NULL;
    u->rows = grown;
    u->rows_cap = cap;
  }
  struct zg_usage_row r = {.token = strdup(token), .model = strdup(model), .key = strdup(key)};
  if (!r.token || !r.model || !r.key) {
    row_free(&r);
    return NULL;
  }
  size_t at = (size_t)(-i - 1);
  memmove(&u->rows[at + 1], &u->rows[at], (u->n_rows - at) * sizeof *u->rows);
  u->rows[at] = r;
  u->n_rows++;
  return &u->rows[at];
}

static void row_remove(struct zg_usage *u, size_t i) {
  u->n_hours -= u->rows[i].n_hours;
  row_free(&u->rows[i]);
  memmove(&u->rows[i], &u->rows[i + 1], (u->n_rows - i - 1) * sizeof *u->rows);
  u->n_rows--;
}

/* The bucket of `hour` (created in order); NULL when the cap or memory
 * refuses it. */
static struct zg_usage_hour *hour_get(struct zg_usage *u, struct zg_usage_row *r, uint64_t hour) {
  size_t lo = 0, hi = r->n_hours;
  if (r->n_hours && r->hours[r->n_hours - 1].hour == hour) return &r->hours[r->n_hours - 1];
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (r->hours[mid].hour == hour) return &r->hours[mid];
    if (r->hours[mid].hour < hour)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (u->n_hours >= ZG_USAGE_MAX_HOURS) return NULL;
  if (r->n_hours == r->hours_cap) {
    size_t cap = r->hours_cap ? 2 * r->hours_cap : 4;
    struct zg_usage_hour *grown = realloc(r->hours, cap * sizeof *grown);
    if (grown == NULL) return NULL;
    r->hours = grown;
    r->hours_cap = cap;
  }
  memmove(&r->hours[lo + 1], &r->hours[lo], (r->n_hours - lo) * sizeof *r->hours);
  memset(&r->hours[lo], 0, sizeof *r->hours);
  r->hours[lo].hour = hour;
  r->n_hours++;
  u->n_hours++;
  return &r->hours[lo];
}

/* Drops the buckets older than the retention before `hour`. */
static void row_prune(struct zg_usage *u, struct zg_usage_row *r, uint64_t hour) {
  uint64_t oldest = hour >= ZG_USAGE_RETAIN_HOURS ? hour - ZG_USAGE_RETAIN_HOURS + 1 : 0;
  size_t n = 0;
  while (n < r->n_hours && r->hours[n].hour < oldest) n++;
  if (n == 0) return;
  memmove(r->hours, r->hours + n, (r->n_hours - n) * sizeof *r->hours);
  r->n_hours -= n;
  u->n_hours -= n;
  if (r->n_hours == 0) {
    free(r->hours);
    r->hours = NULL;
    r->hours_cap = 0;
  }
}

/* Adds `tokens` to the period `key` in slots (newest n kept). */
static void period_add(struct zg_usage_period *p, size_t n, uint64_t key, uint64_t tokens) {
  size_t oldest = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i].key == key) {
      p[i].tokens = sat_add(p[i].tokens, tokens);
      return;
    }
    if (p[i].key < p[oldest].key) oldest = i;
  }
  if (p[oldest].key > key) return; /* older than every period kept */
  p[oldest].key = key;
  p[oldest].tokens = tokens;
}

static void second_add(struct zg_usage_token *t, uint64_t at, uint64_t requests, uint64_t tokens) {
  struct zg_usage_second *s = &t->ring[at % ZG_USAGE_SECONDS];
  if (s->at > at) return; /* the slot already holds a newer second */
  if (s->at < at) *s = (struct zg_usage_second){at, 0, 0};
  s->requests = sat_add(s->requests, requests);
  s->tokens = sat_add(s->tokens, tokens);
}

/* Full prune at most once per hour of entry time. */
static void sweep(struct zg_usage *u, uint64_t at) {
  uint64_t hour = at / 3600u;
  if (hour <= u->swept_hour) return;
  u->swept_hour = hour;
  for (size_t i = u->n_rows; i-- > 0;) {
    struct zg_usage_row *r = &u->rows[i];
    row_prune(u, r, hour);
    if (r->n_hours == 0 && r->last_at + ROW_IDLE_S <= at) row_remove(u, i);
  }
  for (size_t i = u->n_sources; i-- > 0;) {
    if (u->sources[i].last_at + ZG_USAGE_SOURCE_IDLE_S > at) continue;
    memmove(&u->sources[i], &u->sources[i + 1], (u->n_sources - i - 1) * sizeof *u->sources);
    u->n_sources--;
  }
  for (size_t i = u->n_tokens; i-- > 0;) {
    if (u->tokens[i].last_at + TOKEN_IDLE_S > at) continue;
    free(u->tokens[i].name);
    memmove(&u->tokens[i], &u->tokens[i + 1], (u->n_tokens - i - 1) * sizeof *u->tokens);
    u->n_tokens--;
  }
}

/* ---- usage.add ---------------------------------------------------------- */

static int item_string(const cJSON *o, const char *name, size_t min, size_t max, const char **out,
                       char *err, size_t errlen, const char *where, int i) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
  size_t n = cJSON_IsString(v) ? strlen(v->valuestring) : 0;
  if (!cJSON_IsString(v) || n < min || n > max) {
    snprintf(err, errlen, "field '%s[%d].%s' must be a string of %zu..%zu characters", where, i,
             name, min, max);
    return -1;
  }
  *out = v->valuestring;
  return 0;
}

static int item_uint(const cJSON *o, const char *name, uint64_t min, uint64_t max, uint64_t *out,
                     char *err, size_t errlen, const char *where, int i) {
  char inner[160];
  if (zg_arg_uint(o, name, true, min, max, 0, out, inner, sizeof inner)) {
    snprintf(err, errlen, "%s[%d]: %s", where, i, inner);
    return -1;
  }
  return 0;
}

/* The optional "batch": {"source": 1..ZG_USAGE_SOURCE_LEN printable
 * ASCII, "seq": 1..MAX_COUNT}. 0 ok (absent: *source NULL), -1 err. */
static int check_batch(const cJSON *args, const char **source, uint64_t *seq, char *err,
                       size_t errlen) {
  *source = NULL;
  const cJSON *b = cJSON_GetObjectItemCaseSensitive(args, "batch");
  if (b == NULL) return 0;
  const cJSON *src = cJSON_GetObjectItemCaseSensitive(b, "source");
  bool ok = cJSON_IsObject(b) && cJSON_IsString(src) && src->valuestring[0] &&
            strlen(src->valuestring) <= ZG_USAGE_SOURCE_LEN &&
            zg_arg_uint(b, "seq", true, 1, MAX_COUNT, 0, seq, err, errlen) == 0;
  for (const char *p = ok ? src->valuestring : ""; *p; p++)
    if (*p < 0x21 || *p > 0x7e) ok = false;
  if (!ok) {
    snprintf(err, errlen,
             "field 'batch' must be {\"source\": 1..%u printable characters, "
             "\"seq\": a whole number >= 1}",
             ZG_USAGE_SOURCE_LEN);
    return -1;
  }
  *source = src->valuestring;
  return 0;
}

int zg_usage_check_args(const cJSON *args, char *err, size_t errlen) {
  uint64_t at, u;
  const char *s;
  if (!cJSON_IsObject(args) || zg_arg_uint(args, "at", true, 86400, MAX_AT, 0, &at, err, errlen))
    return -1;
  if (check_batch(args, &s, &u, err, errlen)) return -1;
  const cJSON *rows = cJSON_GetObjectItemCaseSensitive(args, "rows");
  const cJSON *seconds = cJSON_GetObjectItemCaseSensitive(args, "seconds");
  if ((rows && !cJSON_IsArray(rows)) || (seconds && !cJSON_IsArray(seconds))) {
    snprintf(err, errlen, "fields 'rows' and 'seconds' must be arrays");
    return -1;
  }
  if (cJSON_GetArraySize(rows) > MAX_ITEMS || cJSON_GetArraySize(seconds) > MAX_ITEMS) {
    snprintf(err, errlen, "at most %d rows and %d seconds per entry", MAX_ITEMS, MAX_ITEMS);
    return -1;
  }
  const cJSON *o;
  int i = 0;
  cJSON_ArrayForEach(o, rows) {
    if (!cJSON_IsObject(o) ||
        item_string(o, "token", 1, MAX_NAME_LEN, &s, err, errlen, "rows", i) ||
        item_string(o, "model", 0, MAX_MODEL_LEN, &s, err, errlen, "rows", i) ||
        item_string(o, "key", 0, MAX_ID_LEN, &s, err, errlen, "rows", i)) {
      if (!cJSON_IsObject(o)) snprintf(err, errlen, "rows[%d] must be an object", i);
      return -1;
    }
    for (int c = 0; c < ZG_USAGE_COUNTERS; c++)
      if (item_uint(o, zg_usage_counter_names[c], 0, MAX_COUNT, &u, err, errlen, "rows", i))
        return -1;
    i++;
  }
  i = 0;
  cJSON_ArrayForEach(o, seconds) {
    if (!cJSON_IsObject(o) ||
        item_string(o, "token", 1, MAX_NAME_LEN, &s, err, errlen, "seconds", i)) {
      if (!cJSON_IsObject(o)) snprintf(err, errlen, "seconds[%d] must be an object", i);
      return -1;
    }
    if (item_uint(o, "at", 86400, MAX_AT, &u, err, errlen, "seconds", i) ||
        item_uint(o, "requests", 0, MAX_COUNT, &u, err, errlen, "seconds", i) ||
        item_uint(o, "tokens", 0, MAX_COUNT, &u, err, errlen, "seconds", i))
      return -1;
    i++;
  }
  return 0;
}

static uint64_t get_u(const cJSON *o, const char *name) {
  return (uint64_t)cJSON_GetObjectItemCaseSensitive(o, name)->valuedouble;
}

static const char *get_s(const cJSON *o, const char *name) {
  return cJSON_GetObjectItemCaseSensitive(o, name)->valuestring;
}

/* The batch's source entry (created, or the oldest one reused); NULL
 * when the batch was applied already. */
static struct zg_usage_source *batch_source(struct zg_usage *u, const char *name, uint64_t seq) {
  size_t oldest = 0;
  for (size_t i = 0; i < u->n_sources; i++) {
    if (strcmp(u->sources[i].name, name) == 0)
      return seq > u->sources[i].seq ? &u->sources[i] : NULL;
    if (u->sources[i].last_at < u->sources[oldest].last_at) oldest = i;
  }
  struct zg_usage_source *s =
      u->n_sources < ZG_USAGE_MAX_SOURCES ? &u->sources[u->n_sources++] : &u->sources[oldest];
  memset(s, 0, sizeof *s);
  snprintf(s->name, sizeof s->name, "%s", name);
  return s;
}

int zg_usage_apply(struct zg_usage *u, const cJSON *args, char *err, size_t errlen) {
  if (zg_usage_check_args(args, err, errlen)) return -1;
  uint64_t at = get_u(args, "at"), hour = at / 3600u, seq = 0;
  const char *source = NULL;
  check_batch(args, &source, &seq, err, errlen);
  if (source != NULL) {
    struct zg_usage_source *s = batch_source(u, source, seq);
    if (s == NULL) {
      u->duplicates = sat_add(u->duplicates, 1);
      return 0;
    }
    s->seq = seq;
    if (s->last_at < at) s->last_at = at;
  }
  const cJSON *o;
  cJSON_ArrayForEach(o, cJSON_GetObjectItemCaseSensitive(args, "rows")) {
    uint64_t c[ZG_USAGE_COUNTERS];
    for (int k = 0; k < ZG_USAGE_COUNTERS; k++) c[k] = get_u(o, zg_usage_counter_names[k]);
    struct zg_usage_row *r = row_get(u, get_s(o, "token"), get_s(o, "model"), get_s(o, "key"));
    struct zg_usage_token *t = token_get(u, get_s(o, "token"));
    if (r == NULL) { /* the caps (or memory) refuse a new row */
      u->dropped = sat_add(u->dropped, c[C_REQUESTS]);
      continue;
    }
    if (r->last_at < at) r->last_at = at;
    for (int k = 0; k < ZG_USAGE_COUNTERS; k++) r->total[k] = sat_add(r->total[k], c[k]);
    struct zg_usage_hour *h = hour_get(u, r, hour);
    if (h != NULL)
      for (int k = 0; k < ZG_USAGE_COUNTERS; k++) h->c[k] = sat_add(h->c[k], c[k]);
    else
      u->dropped = sat_add(u->dropped, c[C_REQUESTS]);
    row_prune(u, r, hour);
    if (t != NULL) {
      if (t->last_at < at) t->last_at = at;
      period_add(t->days, ZG_USAGE_DAYS, day_key(at), c[C_TOTAL]);
      period_add(t->months, ZG_USAGE_MONTHS, month_key(at), c[C_TOTAL]);
    }
  }
  cJSON_ArrayForEach(o, cJSON_GetObjectItemCaseSensitive(args, "seconds")) {
    struct zg_usage_token *t = token_get(u, get_s(o, "token"));
    if (t == NULL) {
      u->dropped = sat_add(u->dropped, get_u(o, "requests"));
      continue;
    }
    if (t->last_at < at) t->last_at = at;
    second_add(t, get_u(o, "at"), get_u(o, "requests"), get_u(o, "tokens"));
  }
  if (u->last_at < at) u->last_at = at;
  sweep(u, at);
  return 0;
}

/* ---- reads -------------------------------------------------------------- */

void zg_usage_view(const struct zg_usage *u, const char *token, uint64_t now_s,
                   struct consensus_usage_view *out) {
  memset(out, 0, sizeof *out);
  const struct zg_usage_token *t = zg_usage_token_find(u, token);
  if (t == NULL) return;
  for (unsigned i = 0; i < ZG_USAGE_SECONDS; i++) {
    const struct zg_usage_second *s = &t->ring[i];
    if (s->at == 0 || s->at > now_s || s->at + 60u <= now_s) continue;
    out->minute_requests += s->requests;
    out->minute_tokens += s->tokens;
    if ((s->requests || s->tokens) && (out->minute_oldest_s == 0 || s->at < out->minute_oldest_s))
      out->minute_oldest_s = s->at;
  }
  uint64_t dk = day_key(now_s), mk = month_key(now_s);
  for (unsigned i = 0; i < ZG_USAGE_DAYS; i++)
    if (t->days[i].key == dk) out->day_tokens = t->days[i].tokens;
  for (unsigned i = 0; i < ZG_USAGE_MONTHS; i++)
    if (t->months[i].key == mk) out->month_tokens = t->months[i].tokens;
}

static void add_counters(cJSON *o, const uint64_t c[ZG_USAGE_COUNTERS]) {
  for (int k = 0; k < ZG_USAGE_COUNTERS; k++)
    cJSON_AddNumberToObject(o, zg_usage_counter_names[k], (double)c[k]);
}

cJSON *zg_usage_query(const struct zg_usage *u, const char *token, const char *model,
                      uint64_t since_s) {
  cJSON *out = cJSON_CreateObject();
  if (out == NULL) return NULL;
  cJSON_AddNumberToObject(out, "since", (double)since_s);
  cJSON_AddNumberToObject(out, "since_hour", (double)(since_s / 3600u * 3600u));
  cJSON *rows = cJSON_AddArrayToObject(out, "rows");
  uint64_t sum[ZG_USAGE_COUNTERS] = {0}, acc[ZG_USAGE_COUNTERS] = {0};
  size_t keys = 0;
  uint64_t since_hour = since_s / 3600u;
  for (size_t i = 0; rows && i < u->n_rows; i++) {
    const struct zg_usage_row *r = &u->rows[i];
    if ((token && strcmp(r->token, token)) || (model && strcmp(r->model, model))) continue;
    uint64_t c[ZG_USAGE_COUNTERS] = {0};
    if (since_s == 0) {
      memcpy(c, r->total, sizeof c);
    } else {
      for (size_t h = r->n_hours; h-- > 0 && r->hours[h].hour >= since_hour;)
        for (int k = 0; k < ZG_USAGE_COUNTERS; k++) c[k] += r->hours[h].c[k];
    }
    bool any = false;
    for (int k = 0; k < ZG_USAGE_COUNTERS; k++) any |= c[k] != 0;
    if (any) {
      for (int k = 0; k < ZG_USAGE_COUNTERS; k++) acc[k] += c[k], sum[k] += c[k];
      keys++;
    }
    /* rows are sorted by (token, model, key): emit at the end of a group */
    const struct zg_usage_row *next = i + 1 < u->n_rows ? &u->rows[i + 1] : NULL;
    if (next && !strcmp(next->token, r->token) && !strcmp(next->model, r->model)) continue;
    if (keys == 0) continue;
    cJSON *o = cJSON_CreateObject();
    if (o == NULL) break;
    cJSON_AddItemToArray(rows, o);
    cJSON_AddStringToObject(o, "token", r->token);
    cJSON_AddStringToObject(o, "model", r->model);
    cJSON_AddNumberToObject(o, "keys", (double)keys);
    add_counters(o, acc);
    memset(acc, 0, sizeof acc);
    keys = 0;
  }
  cJSON *s = cJSON_AddObjectToObject(out, "sum");
  if (s) add_counters(s, sum);
  cJSON_AddNumberToObject(out, "dropped", (double)u->dropped);
  return out;
}

/* ---- snapshot ----------------------------------------------------------- */

static cJSON *uint_array(const uint64_t *v, size_t n) {
  cJSON *a = cJSON_CreateArray();
  for (size_t i = 0; a && i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)v[i]));
  return a;
}

/* {"last_at","swept_hour","dropped",
 *  "tokens": [[name, last_at, [[at,requests,tokens]...], [[day,tokens]...], [[month,tokens]...]]],
 *  "rows": [[token, model, key, last_at, [7 totals], [[hour, 7 counters]...]]]} */
cJSON *zg_usage_to_json(const struct zg_usage *u) {
  cJSON *o = cJSON_CreateObject();
  if (o == NULL) return NULL;
  cJSON_AddNumberToObject(o, "last_at", (double)u->last_at);
  cJSON_AddNumberToObject(o, "swept_hour", (double)u->swept_hour);
  cJSON_AddNumberToObject(o, "dropped", (double)u->dropped);
  cJSON_AddNumberToObject(o, "duplicates", (double)u->duplicates);
  cJSON *sources = cJSON_AddArrayToObject(o, "sources");
  for (size_t i = 0; sources && i < u->n_sources; i++) {
    cJSON *e = cJSON_CreateArray();
    cJSON_AddItemToArray(sources, e);
    cJSON_AddItemToArray(e, cJSON_CreateString(u->sources[i].name));
    cJSON_AddItemToArray(e, cJSON_CreateNumber((double)u->sources[i].seq));
    cJSON_AddItemToArray(e, cJSON_CreateNumber((double)u->sources[i].last_at));
  }
  cJSON *tokens = cJSON_AddArrayToObject(o, "tokens");
  for (size_t i = 0; tokens && i < u->n_tokens; i++) {
    const struct zg_usage_token *t = &u->tokens[i];
    cJSON *e = cJSON_CreateArray(), *ring = cJSON_CreateArray(), *days = cJSON_CreateArray(),
          *months = cJSON_CreateArray();
    cJSON_AddItemToArray(tokens, e);
    cJSON_AddItemToArray(e, cJSON_CreateString(t->name));
    cJSON_AddItemToArray(e, cJSON_CreateNumber((double)t->last_at));
    cJSON_AddItemToArray(e, ring);
    cJSON_AddItemToArray(e, days);
    cJSON_AddItemToArray(e, months);
    for (unsigned k = 0; k < ZG_USAGE_SECONDS; k++)
      if (t->ring[k].at) cJSON_AddItemToArray(ring, uint_array(&t->ring[k].at, 3));
    for (unsigned k = 0; k < ZG_USAGE_DAYS; k++)
      if (t->days[k].key) cJSON_AddItemToArray(days, uint_array(&t->days[k].key, 2));
    for (unsigned k = 0; k < ZG_USAGE_MONTHS; k++)
      if (t->months[k].key) cJSON_AddItemToArray(months, uint_array(&t->months[k].key, 2));
  }
  cJSON *rows = cJSON_AddArrayToObject(o, "rows");
  for (size_t i = 0; rows && i < u->n_rows; i++) {
    const struct zg_usage_row *r = &u->rows[i];
    cJSON *e = cJSON_CreateArray(), *hours = cJSON_CreateArray();
    cJSON_AddItemToArray(rows, e);
    cJSON_AddItemToArray(e, cJSON_CreateString(r->token));
    cJSON_AddItemToArray(e, cJSON_CreateString(r->model));
    cJSON_AddItemToArray(e, cJSON_CreateString(r->key));
    cJSON_AddItemToArray(e, cJSON_CreateNumber((double)r->last_at));
    cJSON_AddItemToArray(e, uint_array(r->total, ZG_USAGE_COUNTERS));
    cJSON_AddItemToArray(e, hours);
    for (size_t h = 0; h < r->n_hours; h++)
      cJSON_AddItemToArray(hours, uint_array(&r->hours[h].hour, 1 + ZG_USAGE_COUNTERS));
  }
  return o;
}

static bool uint_of(const cJSON *x, uint64_t max, uint64_t *out) {
  if (!cJSON_IsNumber(x) || !(x->valuedouble >= 0) || x->valuedouble > (double)max ||
      x->valuedouble != (double)(uint64_t)x->valuedouble)
    return false;
  *out = (uint64_t)x->valuedouble;
  return true;
}

/* Reads an array of exactly n whole numbers <= max into v. */
static bool read_uints(const cJSON *a, uint64_t *v, int n, uint64_t max) {
  if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n) return false;
  int i = 0;
  const cJSON *x;
  cJSON_ArrayForEach(x, a) {
    if (!uint_of(x, max, &v[i++])) return false;
  }
  return true;
}

static const char *string_at(const cJSON *a, int i, size_t max) {
  const cJSON *x = cJSON_GetArrayItem(a, i);
  return cJSON_IsString(x) && strlen(x->valuestring) <= max ? x->valuestring : NULL;
}

static uint64_t number_at(const cJSON *a, int i, bool *ok) {
  uint64_t v = 0;
  if (!uint_of(cJSON_GetArrayItem(a, i), MAX_AT, &v)) *ok = false;
  return v;
}

int zg_usage_from_json(struct zg_usage *u, const cJSON *j, char *err, size_t errlen) {
  char inner[160];
  if (j == NULL || cJSON_IsNull(j)) return 0; /* a snapshot of an older build */
  if (!cJSON_IsObject(j) ||
      zg_arg_uint(j, "last_at", true, 0, MAX_AT, 0, &u->last_at, inner, sizeof inner) ||
      zg_arg_uint(j, "swept_hour", true, 0, MAX_AT, 0, &u->swept_hour, inner, sizeof inner) ||
      zg_arg_uint(j, "dropped", true, 0, MAX_COUNT, 0, &u->dropped, inner, sizeof inner)) {
    snprintf(err, errlen, "usage: last_at/swept_hour/dropped missing or out of range");
    return -1;
  }
  /* "sources" and "duplicates": absent in snapshots of older builds */
  const cJSON *dup = cJSON_GetObjectItemCaseSensitive(j, "duplicates");
  if (dup != NULL && !uint_of(dup, MAX_COUNT, &u->duplicates)) {
    snprintf(err, errlen, "usage: duplicates out of range");
    return -1;
  }
  const cJSON *sources = cJSON_GetObjectItemCaseSensitive(j, "sources");
  if (sources != NULL &&
      (!cJSON_IsArray(sources) || cJSON_GetArraySize(sources) > (int)ZG_USAGE_MAX_SOURCES)) {
    snprintf(err, errlen, "usage: sources not an array or too long");
    return -1;
  }
  const cJSON *src;
  cJSON_ArrayForEach(src, sources) {
    bool ok = cJSON_IsArray(src) && cJSON_GetArraySize(src) == 3;
    const char *name = ok ? string_at(src, 0, ZG_USAGE_SOURCE_LEN) : NULL;
    uint64_t seq = 0, last_at = 0;
    ok = ok && name && *name && uint_of(cJSON_GetArrayItem(src, 1), MAX_COUNT, &seq) &&
         uint_of(cJSON_GetArrayItem(src, 2), MAX_AT, &last_at);
    for (size_t k = 0; ok && k < u->n_sources; k++)
      if (strcmp(u->sources[k].name, name) == 0) ok = false;
    if (!ok) {
      snprintf(err, errlen, "usage: sources[%zu] malformed or duplicate", u->n_sources);
      return -1;
    }
    struct zg_usage_source *s = &u->sources[u->n_sources++];
    snprintf(s->name, sizeof s->name, "%s", name);
    s->seq = seq;
    s->last_at = last_at;
  }
  const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(j, "tokens");
  const cJSON *rows = cJSON_GetObjectItemCaseSensitive(j, "rows");
  if (!cJSON_IsArray(tokens) || !cJSON_IsArray(rows) ||
      cJSON_GetArraySize(tokens) > (int)ZG_USAGE_MAX_TOKENS ||
      cJSON_GetArraySize(rows) > (int)ZG_USAGE_MAX_ROWS) {
    snprintf(err, errlen, "usage: tokens/rows missing, not arrays or too long");
    return -1;
  }
  const cJSON *e, *x;
  int i = 0;
  cJSON_ArrayForEach(e, tokens) {
    bool ok = cJSON_IsArray(e) && cJSON_GetArraySize(e) == 5;
    const char *name = ok ? string_at(e, 0, MAX_NAME_LEN) : NULL;
    uint64_t last_at = ok ? number_at(e, 1, &ok) : 0;
    const cJSON *ring = cJSON_GetArrayItem(e, 2), *days = cJSON_GetArrayItem(e, 3),
                *months = cJSON_GetArrayItem(e, 4);
    ok = ok && name && *name && zg_usage_token_find(u, name) == NULL && cJSON_IsArray(ring) &&
         cJSON_GetArraySize(ring) <= (int)ZG_USAGE_SECONDS && cJSON_IsArray(days) &&
         cJSON_GetArraySize(days) <= (int)ZG_USAGE_DAYS && cJSON_IsArray(months) &&
         cJSON_GetArraySize(months) <= (int)ZG_USAGE_MONTHS;
    struct zg_usage_token *t = ok ? token_get(u, name) : NULL;
    if (t == NULL) {
      snprintf(err, errlen, "usage: tokens[%d] malformed or duplicate", i);
      return -1;
    }
    t->last_at = last_at;
    int k = 0;
    cJSON_ArrayForEach(x, ring) {
      uint64_t v[3];
      if (!read_uints(x, v, 3, MAX_COUNT) || v[0] == 0 || t->ring[v[0] % ZG_USAGE_SECONDS].at) {
        snprintf(err, errlen, "usage: tokens[%d] ring malformed", i);
        return -1;
      }
      t->ring[v[0] % ZG_USAGE_SECONDS] = (struct zg_usage_second){v[0], v[1], v[2]};
    }
    k = 0;
    cJSON_ArrayForEach(x, days) {
      if (!read_uints(x, &t->days[k].key, 2, MAX_COUNT)) {
        snprintf(err, errlen, "usage: tokens[%d] days malformed", i);
        return -1;
      }
      k++;
    }
    k = 0;
    cJSON_ArrayForEach(x, months) {
      if (!read_uints(x, &t->months[k].key, 2, MAX_COUNT)) {
        snprintf(err, errlen, "usage: tokens[%d] months malformed", i);
        return -1;
      }
      k++;
    }
    i++;
  }
  i = 0;
  cJSON_ArrayForEach(e, rows) {
    bool ok = cJSON_IsArray(e) && cJSON_GetArraySize(e) == 6;
    const char *token = ok ? string_at(e, 0, MAX_NAME_LEN) : NULL;
    const char *model = ok ? string_at(e, 1, MAX_MODEL_LEN) : NULL;
    const char *key = ok ? string_at(e, 2, MAX_ID_LEN) : NULL;
    uint64_t last_at = ok ? number_at(e, 3, &ok) : 0;
    uint64_t total[ZG_USAGE_COUNTERS];
    const cJSON *hours = cJSON_GetArrayItem(e, 5);
    ok = ok && token && *token && model && key &&
         read_uints(cJSON_GetArrayItem(e, 4), total, ZG_USAGE_COUNTERS, MAX_COUNT) &&
         cJSON_IsArray(hours) && cJSON_GetArraySize(hours) <= (int)ZG_USAGE_RETAIN_HOURS &&
         row_search(u, token, model, key) < 0;
    struct zg_usage_row *r = ok ? row_get(u, token, model, key) : NULL;
    if (r == NULL) {
      snprintf(err, errlen, "usage: rows[%d] malformed or duplicate", i);
      return -1;
    }
    r->last_at = last_at;
    memcpy(r->total, total, sizeof total);
    cJSON_ArrayForEach(x, hours) {
      uint64_t v[1 + ZG_USAGE_COUNTERS];
      struct zg_usage_hour *h = NULL;
      if (read_uints(x, v, 1 + ZG_USAGE_COUNTERS, MAX_COUNT) &&
          (r->n_hours == 0 || r->hours[r->n_hours - 1].hour < v[0]))
        h = hour_get(u, r, v[0]);
      if (h == NULL) {
        snprintf(err, errlen, "usage: rows[%d] hours malformed, unordered or over the cap", i);
        return -1;
      }
      memcpy(h->c, v + 1, sizeof h->c);
    }
    i++;
  }
  return 0;
}
