/* accounting.c: in-memory usage counters and limit checks of the active
 * node (see accounting.h). Two small string-keyed hash tables: rows by
 * (token, model, key) since the last take, and per-token windows (a ring
 * of the last 64 seconds, plus tokens not yet committed). Out of memory
 * loses a count (never crashes); limits then err on letting through.
 */
#include "gateway/accounting.h"

#include "base/base.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RING 64u /* seconds kept per token (a window is 60) */
#define WINDOW_S 60u

struct second {
  uint64_t at;
  uint64_t requests, tokens;         /* not yet taken */
  uint64_t fly_requests, fly_tokens; /* taken, not yet committed */
};

struct token_state {
  struct token_state *next;
  char *token;
  struct second ring[RING];
  uint64_t tokens, fly_tokens; /* all tokens not yet taken / in flight */
};

struct row {
  struct row *next;
  char *token, *model, *key;
  struct acct_counts c;
};

#define BUCKETS 256u

struct accounting {
  struct token_state *tokens[BUCKETS];
  struct row *rows[BUCKETS];
  size_t n_rows;
  /* The batch taken and not yet committed: sent again as it is (same
   * batch id) until it is, so the store counts it once (usage.c drops a
   * batch it already applied) even when an answer was lost. */
  cJSON *pending;
  bool sending;    /* a write of `pending` is in flight */
  char source[40]; /* this process's batch source: "g-" and 16 random hex digits */
  uint64_t seq;    /* of the last batch taken */
};

static unsigned hash(const char *a, const char *b, const char *c) {
  unsigned h = 2166136261u;
  const char *parts[3] = {a, b, c};
  for (int i = 0; i < 3; i++) {
    for (const char *p = parts[i] ? parts[i] : ""; *p; p++) h = (h ^ (unsigned char)*p) * 16777619u;
    h = (h ^ 0x1f) * 16777619u;
  }
  return h % BUCKETS;
}

struct accounting *accounting_create(void) {
  struct accounting *a = calloc(1, sizeof(struct accounting));
  uint8_t id[8];
  if (!a || zg_random_bytes(id, sizeof id) != 0) {
    free(a);
    return NULL;
  }
  snprintf(a->source, sizeof a->source, "g-");
  for (size_t i = 0; i < sizeof id; i++)
    snprintf(a->source + 2 + 2 * i, sizeof a->source - 2 - 2 * i, "%02x", id[i]);
  return a;
}

void accounting_destroy(struct accounting *a) {
  if (!a) return;
  for (size_t i = 0; i < BUCKETS; i++) {
    for (struct token_state *t = a->tokens[i], *next; t; t = next) {
      next = t->next;
      free(t->token);
      free(t);
    }
    for (struct row *r = a->rows[i], *next; r; r = next) {
      next = r->next;
      free(r->token);
      free(r->model);
      free(r->key);
      free(r);
    }
  }
  cJSON_Delete(a->pending);
  free(a);
}

static struct token_state *token_state(struct accounting *a, const char *token, bool create) {
  unsigned b = hash(token, NULL, NULL);
  for (struct token_state *t = a->tokens[b]; t; t = t->next)
    if (!strcmp(t->token, token)) return t;
  if (!create) return NULL;
  struct token_state *t = calloc(1, sizeof(*t));
  if (!t || !(t->token = strdup(token))) {
    free(t);
    return NULL;
  }
  t->next = a->tokens[b];
  a->tokens[b] = t;
  return t;
}

static struct second *second_of(struct token_state *t, uint64_t now_s) {
  struct second *s = &t->ring[now_s % RING];
  if (s->at != now_s) {
    /* an old second leaves the ring: its counts were taken long ago (a
     * take happens every flush interval), in flight ones settle soon */
    memset(s, 0, sizeof(*s));
    s->at = now_s;
  }
  return s;
}

void accounting_request(struct accounting *a, const char *token, uint64_t now_s) {
  struct token_state *t = token_state(a, token, true);
  if (t) second_of(t, now_s)->requests++;
}

static struct row *row_of(struct accounting *a, const char *token, const char *model,
                          const char *key) {
  unsigned b = hash(token, model, key);
  for (struct row *r = a->rows[b]; r; r = r->next)
    if (!strcmp(r->token, token) && !strcmp(r->model, model) && !strcmp(r->key, key)) return r;
  struct row *r = calloc(1, sizeof(*r));
  if (!r) return NULL;
  r->token = strdup(token);
  r->model = strdup(model);
  r->key = strdup(key);
  if (!r->token || !r->model || !r->key) {
    free(r->token);
    free(r->model);
    free(r->key);
    free(r);
    return NULL;
  }
  r->next = a->rows[b];
  a->rows[b] = r;
  a->n_rows++;
  return r;
}

static void add_counts(struct acct_counts *to, const struct acct_counts *from) {
  to->requests += from->requests;
  to->prompt += from->prompt;
  to->completion += from->completion;
  to->total += from->total;
  to->cached += from->cached;
  to->reasoning += from->reasoning;
  to->unknown += from->unknown;
}

void accounting_usage(struct accounting *a, const char *token, const char *model,
                      const char *key_id, bool known, const struct acct_counts *tokens,
                      uint64_t now_s) {
  struct row *r = row_of(a, token, model ? model : "", key_id ? key_id : "");
  struct acct_counts c = {0};
  if (known && tokens) c = *tokens;
  c.requests = 1;
  c.unknown = known ? 0 : 1;
  if (r) add_counts(&r->c, &c);
  struct token_state *t = token_state(a, token, true);
  if (t && known && tokens) {
    second_of(t, now_s)->tokens += tokens->total;
    t->tokens += tokens->total;
  }
}

/* Seconds until the next UTC midnight / first of next month after now_s. */
static uint64_t to_next_day(uint64_t now_s) {
  return 86400 - now_s % 86400;
}

static uint64_t to_next_month(uint64_t now_s) {
  time_t now = (time_t)now_s;
  struct tm tm;
  gmtime_r(&now, &tm);
  tm.tm_mday = 1;
  tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
  tm.tm_mon += 1;
  time_t next = timegm(&tm);
  return next > now ? (uint64_t)(next - now) : 1;
}

enum acct_limit accounting_check(struct accounting *a, const char *token,
                                 const struct acct_limits *limits,
                                 const struct gateway_usage_view *rep, uint64_t now_s,
                                 struct acct_verdict *v) {
  memset(v, 0, sizeof(*v));
  struct gateway_usage_view none = {0};
  if (!rep) rep = &none;
  uint64_t requests = rep->minute_requests, tokens = rep->minute_tokens;
  uint64_t oldest = rep->minute_oldest_s, pending_tokens = 0;
  struct token_state *t = token_state(a, token, false);
  if (t) {
    for (unsigned i = 0; i < RING; i++) {
      const struct second *s = &t->ring[i];
      if (!s->at || s->at + WINDOW_S <= now_s || s->at > now_s) continue;
      uint64_t r = s->requests + s->fly_requests, k = s->tokens + s->fly_tokens;
      if ((r || k) && (!oldest || s->at < oldest)) oldest = s->at;
      requests += r;
      tokens += k;
    }
    pending_tokens = t->tokens + t->fly_tokens;
  }
  /* the window frees its oldest second WINDOW_S after it */
  uint64_t window_reset = oldest && oldest + WINDOW_S > now_s ? oldest + WINDOW_S - now_s : 1;
  v->limit_requests = limits->rpm;
  v->remaining_requests = limits->rpm > requests ? limits->rpm - requests : 0;
  v->reset_requests_s = window_reset;
  v->limit_tokens = limits->tpm;
  v->remaining_tokens = limits->tpm > tokens ? limits->tpm - tokens : 0;
  v->reset_tokens_s = window_reset;
  if (limits->budget_month && rep->month_tokens + pending_tokens >= limits->budget_month) {
    v->limit = ACCT_BUDGET_MONTH;
    v->retry_after_s = to_next_month(now_s);
  } else if (limits->budget_day && rep->day_tokens + pending_tokens >= limits->budget_day) {
    v->limit = ACCT_BUDGET_DAY;
    v->retry_after_s = to_next_day(now_s);
  }
  if (v->limit == ACCT_OK && limits->rpm && requests >= limits->rpm) {
    v->limit = ACCT_RPM;
    v->retry_after_s = window_reset;
  } else if (v->limit == ACCT_OK && limits->tpm && tokens >= limits->tpm) {
    v->limit = ACCT_TPM;
    v->retry_after_s = window_reset;
  }
  if ((v->limit == ACCT_BUDGET_MONTH || v->limit == ACCT_BUDGET_DAY) && !limits->tpm) {
    /* no per-minute token limit: the headers speak of the budget */
    v->limit_tokens = v->limit == ACCT_BUDGET_MONTH ? limits->budget_month : limits->budget_day;
    v->remaining_tokens = 0;
    v->reset_tokens_s = v->retry_after_s;
  }
  return v->limit;
}

static void add_number(cJSON *o, const char *name, uint64_t v) {
  cJSON_AddNumberToObject(o, name, (double)v);
}

cJSON *accounting_take(struct accounting *a, uint64_t now_s) {
  if (a->sending) return NULL;
  if (a->pending) { /* not committed yet: the same batch again */
    cJSON *again = cJSON_Duplicate(a->pending, true);
    a->sending = again != NULL;
    return again;
  }
  cJSON *args = cJSON_CreateObject();
  cJSON *rows = cJSON_AddArrayToObject(args, "rows");
  cJSON *seconds = cJSON_AddArrayToObject(args, "seconds");
  if (!args || !rows || !seconds) {
    cJSON_Delete(args);
    return NULL;
  }
  add_number(args, "at", now_s);
  size_t n = 0;
  for (size_t b = 0; b < BUCKETS; b++) {
    for (struct row *r = a->rows[b], *next; r; r = next) {
      next = r->next;
      cJSON *o = cJSON_CreateObject();
      cJSON_AddItemToArray(rows, o);
      cJSON_AddStringToObject(o, "token", r->token);
      cJSON_AddStringToObject(o, "model", r->model);
      cJSON_AddStringToObject(o, "key", r->key);
      add_number(o, "requests", r->c.requests);
      add_number(o, "prompt", r->c.prompt);
      add_number(o, "completion", r->c.completion);
      add_number(o, "total", r->c.total);
      add_number(o, "cached", r->c.cached);
      add_number(o, "reasoning", r->c.reasoning);
      add_number(o, "unknown", r->c.unknown);
      free(r->token);
      free(r->model);
      free(r->key);
      free(r);
      n++;
    }
    a->rows[b] = NULL;
    for (struct token_state *t = a->tokens[b]; t; t = t->next) {
      for (unsigned i = 0; i < RING; i++) {
        struct second *s = &t->ring[i];
        if (!s->at || (!s->requests && !s->tokens)) continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToArray(seconds, o);
        cJSON_AddStringToObject(o, "token", t->token);
        add_number(o, "at", s->at);
        add_number(o, "requests", s->requests);
        add_number(o, "tokens", s->tokens);
        s->fly_requests += s->requests;
        s->fly_tokens += s->tokens;
        s->requests = s->tokens = 0;
        n++;
      }
      t->fly_tokens += t->tokens;
      t->tokens = 0;
    }
  }
  a->n_rows = 0;
  if (n == 0) {
    cJSON_Delete(args);
    return NULL;
  }
  cJSON *batch = cJSON_AddObjectToObject(args, "batch");
  cJSON_AddStringToObject(batch, "source", a->source);
  add_number(batch, "seq", ++a->seq);
  a->pending = args;
  cJSON *copy = cJSON_Duplicate(args, true);
  a->sending = copy != NULL;
  return copy;
}

void accounting_settle(struct accounting *a, bool committed) {
  a->sending = false;
  if (!committed || !a->pending) return; /* kept: sent again by the next take */
  cJSON_Delete(a->pending);
  a->pending = NULL;
  for (size_t b = 0; b < BUCKETS; b++)
    for (struct token_state *t = a->tokens[b]; t; t = t->next) {
      for (unsigned i = 0; i < RING; i++) t->ring[i].fly_requests = t->ring[i].fly_tokens = 0;
      t->fly_tokens = 0;
    }
}

const char *accounting_limit_name(enum acct_limit limit) {
  switch (limit) {
  case ACCT_RPM:
    return "rpm";
  case ACCT_TPM:
    return "tpm";
  case ACCT_BUDGET_DAY:
    return "budget_day";
  case ACCT_BUDGET_MONTH:
    return "budget_month";
  default:
    return "none";
  }
}
