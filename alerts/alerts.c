/* alerts.c: the alert engine (see alerts.h for the rules and guarantees).
 *
 * Happy path: a repeating uv timer samples CPU (/proc/stat), memory
 * (cgroup or /proc/meminfo), the failover role, the gateway's request
 * counters and the replicated provider keys; each alert key (rule +
 * subject) runs alert_state_step(); every FIRE / REPEAT / RESOLVE (and the
 * leader_changed notice) becomes one delivery per channel: a libcurl easy
 * handle on the engine's own curl multi, driven by the loop (curl_uv.c),
 * never a threadpool worker. Its done callback (on the loop) records the
 * result, and a failed delivery waits on its own retry timer (exponential
 * backoff) and starts again, up to retry_max retries.
 *
 * Failure modes: an unreadable /proc file skips that rule (logged once);
 * an unresolvable secret or an unreachable channel is a failed attempt
 * (alert_delivery_failed names the channel by index and type, never its URL
 * or headers); an invalid config section is refused by alerts_validate and
 * the running settings stay. Delivery failures never change alert state.
 */
#include "alerts/alerts.h"

#include "alerts/internal.h"

#include "base/base.h"
#include "consensus/consensus.h"
#include "failover/failover.h"
#include "gateway/gateway.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CHANNELS 16
#define MAX_EMAIL_RCPTS 16
#define RECENT_DELIVERIES 16
#define DELIVERY_TIMEOUT_MS 10000L
#define DELIVERY_CONNECT_TIMEOUT_MS 5000L
#define MAX_RETRY_DELAY_MS (10u * 60u * 1000u)
#define SMS_MAX_CHARS 160

/* ---- settings -------------------------------------------------------- */

struct alerts_settings {
  double cpu_percent; /* 0 disables */
  unsigned cpu_for_s;
  double memory_percent; /* 0 disables */
  unsigned memory_for_s;
  double error_ratio; /* 0 disables */
  unsigned error_window_s;
  unsigned error_min_requests;
  unsigned no_active_for_s; /* 0 disables */
  bool key_rotation, key_invalid, leader_changed;
  unsigned tls_cert_expiry_days; /* 0 disables */
  unsigned eval_interval_ms, retry_max, retry_base_ms, repeat_after_s;
  cJSON *channels; /* array of channel objects, owned; NULL = none */
};

static const struct alerts_settings default_settings = {
    .cpu_percent = 80,
    .cpu_for_s = 300,
    .memory_percent = 90,
    .memory_for_s = 0,
    .error_ratio = 0.05,
    .error_window_s = 300,
    .error_min_requests = 20,
    .no_active_for_s = 10,
    .key_rotation = true,
    .key_invalid = true,
    .leader_changed = true,
    .tls_cert_expiry_days = 14,
    .eval_interval_ms = 5000,
    .retry_max = 5,
    .retry_base_ms = 1000,
    .repeat_after_s = 3600,
};

enum field_kind { F_DOUBLE, F_UINT, F_BOOL };
struct field {
  const char *name;
  enum field_kind kind;
  double min, max;
  size_t offset;
};
#define S_OFF(f) offsetof(struct alerts_settings, f)

/* One table per object drives parsing, bounds and unknown-key hints. */
static const struct field rule_fields[] = {
    {"cpu_percent", F_DOUBLE, 0, 100, S_OFF(cpu_percent)},
    {"cpu_for_s", F_UINT, 0, 86400, S_OFF(cpu_for_s)},
    {"memory_percent", F_DOUBLE, 0, 100, S_OFF(memory_percent)},
    {"memory_for_s", F_UINT, 0, 86400, S_OFF(memory_for_s)},
    {"error_ratio", F_DOUBLE, 0, 1, S_OFF(error_ratio)},
    {"error_window_s", F_UINT, 1, 86400, S_OFF(error_window_s)},
    {"error_min_requests", F_UINT, 0, 1000000000, S_OFF(error_min_requests)},
    {"no_active_for_s", F_UINT, 0, 86400, S_OFF(no_active_for_s)},
    {"key_rotation", F_BOOL, 0, 0, S_OFF(key_rotation)},
    {"key_invalid", F_BOOL, 0, 0, S_OFF(key_invalid)},
    {"leader_changed", F_BOOL, 0, 0, S_OFF(leader_changed)},
    {"tls_cert_expiry_days", F_UINT, 0, 3650, S_OFF(tls_cert_expiry_days)},
};
static const struct field top_fields[] = {
    {"eval_interval_ms", F_UINT, 100, 600000, S_OFF(eval_interval_ms)},
    {"retry_max", F_UINT, 0, 20, S_OFF(retry_max)},
    {"retry_base_ms", F_UINT, 10, 3600000, S_OFF(retry_base_ms)},
    {"repeat_after_s", F_UINT, 0, 604800, S_OFF(repeat_after_s)},
};

static const char *const webhook_keys[] = {"type", "url", "headers", NULL};
static const char *const sms_keys[] = {"type", "url", "to", "headers", NULL};
static const char *const email_keys[] = {"type",     "smtp_url", "from", "to",
                                         "username", "password", NULL};

/* ---- alert records ---------------------------------------------------- */

enum alert_rule {
  RULE_CPU,
  RULE_MEMORY,
  RULE_NO_ACTIVE,
  RULE_ERROR_RATIO,
  RULE_LEADER_CHANGED,
  RULE_KEY_ROTATION,
  RULE_KEY_INVALID,
  RULE_TLS_CERT_EXPIRY,
};

static const struct {
  const char *name, *severity;
  bool cluster_wide;
} rule_info[] = {
    [RULE_CPU] = {"cpu", "warning", false},
    [RULE_MEMORY] = {"memory", "warning", false},
    [RULE_NO_ACTIVE] = {"no_active", "critical", false},
    [RULE_ERROR_RATIO] = {"error_ratio", "critical", true},
    [RULE_LEADER_CHANGED] = {"leader_changed", "info", true},
    [RULE_KEY_ROTATION] = {"key_rotation", "warning", true},
    [RULE_KEY_INVALID] = {"key_invalid", "critical", true},
    [RULE_TLS_CERT_EXPIRY] = {"tls_cert_expiry", "warning", false},
};

struct alert {
  struct alert *next;
  enum alert_rule rule;
  char subject[96]; /* node id, key id, ... */
  struct alert_state state;
  uint64_t started_wall_ms;
  char summary[256];
  cJSON *details; /* latest sample's details, owned */
  bool seen;      /* per-key rules: observed in this evaluation */
};

/* One notification (alert change × channel). Lives from creation until its
 * retry timer's close callback. */
struct upload {
  const char *data;
  size_t len, off;
};

struct delivery {
  struct delivery *prev, *next;
  struct alerts *a;
  uv_timer_t retry_timer;
  size_t channel_index;
  char channel_type[16];
  cJSON *channel; /* copy of the channel settings */
  char alert_name[32], status[16], subject[96];
  char *payload; /* JSON body (webhook/sms) or RFC 5322 message (email) */
  unsigned attempt;
  /* The attempt in flight: the easy handle and what its options point at. */
  CURL *easy;
  struct curl_slist *headers, *rcpts;
  struct upload upload;
  long http_status;
  char error[256];
};

struct delivery_record {
  char alert[32], status[16], subject[96], channel_type[16];
  size_t channel_index;
  bool ok;
  unsigned attempts;
  char error[256];
  uint64_t at_wall_ms;
};

struct alerts {
  uv_loop_t *loop;
  char node_id[64];
  struct {
    char name[16], path[512];
  } certs[4]; /* alerts_watch_cert */
  size_t n_certs;
  struct consensus *cs;
  struct failover *fo;
  struct gateway *gw;
  struct alerts_settings settings;
  uv_timer_t eval_timer;
  struct alert *alerts;
  struct delivery *deliveries; /* queued, running or waiting to retry */
  size_t n_deliveries;
  size_t open_deliveries; /* also counts finished ones whose timer is closing */
  struct delivery_record recent[RECENT_DELIVERIES];
  size_t recent_next, recent_count;
  struct alerts_curl *curl; /* deliveries in flight */
  bool curl_closed;
  struct error_window errors;
  uint64_t cpu_prev_busy, cpu_prev_total;
  bool cpu_have_prev;
  bool was_active;
  bool warned_cpu, warned_memory;
  bool closing, eval_timer_closed;
  void (*done)(void *);
  void *done_arg;
};

/* ---- the per-key state machine ---------------------------------------- */

enum alert_transition alert_state_step(struct alert_state *s, bool condition, uint64_t now_ms,
                                       uint64_t for_ms, uint64_t repeat_after_ms) {
  if (!condition) {
    s->condition = false;
    s->condition_since_ms = 0;
    if (!s->firing) return ALERT_NONE;
    s->firing = false;
    return ALERT_RESOLVE;
  }
  if (!s->condition) {
    s->condition = true;
    s->condition_since_ms = now_ms;
  }
  if (!s->firing) {
    if (now_ms - s->condition_since_ms < for_ms) return ALERT_NONE;
    s->firing = true;
    s->fired_at_ms = s->last_sent_ms = now_ms;
    return ALERT_FIRE;
  }
  if (repeat_after_ms > 0 && now_ms - s->last_sent_ms >= repeat_after_ms) {
    s->last_sent_ms = now_ms;
    return ALERT_REPEAT;
  }
  return ALERT_NONE;
}

/* ---- 5xx window ------------------------------------------------------- */

#define EW_CAP (ERROR_WINDOW_SLOTS + 4)
#define EW_AT(w, i) ((w)->samples[((w)->head + (i)) % EW_CAP])

void error_window_reset(struct error_window *w) {
  memset(w, 0, sizeof(*w));
}

void error_window_push(struct error_window *w, uint64_t now_ms, uint64_t window_ms, uint64_t total,
                       uint64_t errors) {
  uint64_t min_gap = window_ms / ERROR_WINDOW_SLOTS;
  /* The newest sample floats (takes this push's time and counters) until
   * it is min_gap past the one before it; then it stays and a new one is
   * appended. Memory stays bounded whatever the push rate. */
  if (w->count >= 2 && EW_AT(w, w->count - 1).at_ms - EW_AT(w, w->count - 2).at_ms < min_gap) {
    EW_AT(w, w->count - 1).at_ms = now_ms;
    EW_AT(w, w->count - 1).total = total;
    EW_AT(w, w->count - 1).errors = errors;
  } else {
    if (w->count == EW_CAP) {
      w->head = (w->head + 1) % EW_CAP;
      w->count--;
    }
    EW_AT(w, w->count).at_ms = now_ms;
    EW_AT(w, w->count).total = total;
    EW_AT(w, w->count).errors = errors;
    w->count++;
  }
  /* Keep one sample at or before the window start (the baseline). */
  while (w->count >= 2 && now_ms >= window_ms && EW_AT(w, 1).at_ms <= now_ms - window_ms) {
    w->head = (w->head + 1) % EW_CAP;
    w->count--;
  }
}

void error_window_delta(const struct error_window *w, uint64_t now_ms, uint64_t window_ms,
                        uint64_t *requests, uint64_t *errors) {
  *requests = *errors = 0;
  if (w->count < 2) return;
  size_t base = 0;
  for (size_t i = 0; i < w->count; i++)
    if (now_ms >= window_ms && EW_AT(w, i).at_ms <= now_ms - window_ms) base = i;
  const uint64_t t0 = EW_AT(w, base).total, e0 = EW_AT(w, base).errors;
  const uint64_t t1 = EW_AT(w, w->count - 1).total, e1 = EW_AT(w, w->count - 1).errors;
  *requests = t1 >= t0 ? t1 - t0 : 0;
  *errors = e1 >= e0 ? e1 - e0 : 0;
}

/* ---- validation ------------------------------------------------------- */

static const char *json_type_name(const cJSON *v) {
  if (cJSON_IsString(v)) return "a string";
  if (cJSON_IsNumber(v)) return "a number";
  if (cJSON_IsBool(v)) return "a boolean";
  if (cJSON_IsArray(v)) return "an array";
  if (cJSON_IsObject(v)) return "an object";
  return "null";
}

static void unknown_key(const char *path, const char *key, const char *const *known, size_t n_known,
                        char *err, size_t errlen) {
  const char *best = NULL;
  size_t best_d = (size_t)-1;
  for (size_t i = 0; i < n_known; i++) {
    size_t d = zg_edit_distance(key, known[i]);
    if (d < best_d) best_d = d, best = known[i];
  }
  if (best && best_d <= 3)
    snprintf(err, errlen, "%s.%s: unknown key (did you mean \"%s\"?)", path, key, best);
  else
    snprintf(err, errlen, "%s.%s: unknown key", path, key);
}

static int parse_fields(const cJSON *obj, const char *path, const struct field *fields,
                        size_t n_fields, const char *const *extra_known,
                        struct alerts_settings *out, char *err, size_t errlen) {
  const cJSON *item;
  cJSON_ArrayForEach(item, obj) {
    const struct field *f = NULL;
    for (size_t i = 0; i < n_fields; i++)
      if (strcmp(item->string, fields[i].name) == 0) f = &fields[i];
    bool extra = false;
    for (size_t i = 0; extra_known && extra_known[i]; i++)
      if (strcmp(item->string, extra_known[i]) == 0) extra = true;
    if (extra) continue;
    if (!f) {
      const char *known[24];
      size_t n = 0;
      for (size_t i = 0; i < n_fields && n < ZG_ARRAY_LEN(known); i++) known[n++] = fields[i].name;
      for (size_t i = 0; extra_known && extra_known[i] && n < ZG_ARRAY_LEN(known); i++)
        known[n++] = extra_known[i];
      unknown_key(path, item->string, known, n, err, errlen);
      return -1;
    }
    char *dst = (char *)out + f->offset;
    if (f->kind == F_BOOL) {
      if (!cJSON_IsBool(item)) {
        snprintf(err, errlen, "%s.%s: expected true or false, found %s", path, f->name,
                 json_type_name(item));
        return -1;
      }
      *(bool *)dst = cJSON_IsTrue(item);
      continue;
    }
    if (!cJSON_IsNumber(item)) {
      snprintf(err, errlen, "%s.%s: expected a number from %g to %g, found %s", path, f->name,
               f->min, f->max, json_type_name(item));
      return -1;
    }
    double v = item->valuedouble;
    if (v < f->min || v > f->max || (f->kind == F_UINT && v != (double)(uint64_t)v)) {
      snprintf(err, errlen, "%s.%s: expected %s from %g to %g, found %g", path, f->name,
               f->kind == F_UINT ? "a whole number" : "a number", f->min, f->max, v);
      return -1;
    }
    if (f->kind == F_UINT)
      *(unsigned *)dst = (unsigned)v;
    else
      *(double *)dst = v;
  }
  return 0;
}

static bool is_secret_ref(const char *s) {
  return !strncmp(s, "env:", 4) || !strncmp(s, "file:", 5);
}

static bool has_ctl(const char *s) {
  for (; *s; s++)
    if ((unsigned char)*s < 0x20 || *s == 0x7f) return true;
  return false;
}

/* A URL or a secret reference to one. The found value is never echoed: it
 * may carry a token. */
static int check_url(const cJSON *v, const char *path, const char *const *schemes,
                     const char *expected, char *err, size_t errlen) {
  if (!cJSON_IsString(v) || !v->valuestring[0]) {
    snprintf(err, errlen, "%s: expected %s or \"env:NAME\" / \"file:PATH\", found %s", path,
             expected, cJSON_IsString(v) ? "an empty string" : json_type_name(v));
    return -1;
  }
  if (is_secret_ref(v->valuestring)) return 0;
  for (size_t i = 0; schemes[i]; i++)
    if (!strncmp(v->valuestring, schemes[i], strlen(schemes[i])) &&
        v->valuestring[strlen(schemes[i])] && !has_ctl(v->valuestring))
      return 0;
  snprintf(err, errlen,
           "%s: expected %s or \"env:NAME\" / \"file:PATH\", found a string of another form", path,
           expected);
  return -1;
}

static int check_text(const cJSON *v, const char *path, bool need_at, size_t max_len, char *err,
                      size_t errlen) {
  if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) > max_len ||
      has_ctl(v->valuestring) || strpbrk(v->valuestring, "<>") ||
      (need_at && !strchr(v->valuestring, '@'))) {
    snprintf(err, errlen,
             "%s: expected %s of 1 to %zu characters without control characters or <>, found %s",
             path, need_at ? "an email address" : "a string", max_len,
             cJSON_IsString(v) ? "an unusable string" : json_type_name(v));
    return -1;
  }
  return 0;
}

static int check_headers(const cJSON *headers, const char *path, char *err, size_t errlen) {
  if (!cJSON_IsObject(headers)) {
    snprintf(err, errlen, "%s: expected an object of header name to value, found %s", path,
             json_type_name(headers));
    return -1;
  }
  const cJSON *h;
  cJSON_ArrayForEach(h, headers) {
    const char *name = h->string;
    bool name_ok = name[0] != '\0' && strlen(name) <= 64;
    for (const char *c = name; *c; c++)
      if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
            *c == '-' || *c == '_'))
        name_ok = false;
    if (!name_ok) {
      snprintf(err, errlen,
               "%s: expected header names of letters, digits, - and _, found \"%.64s\"", path,
               name);
      return -1;
    }
    if (!cJSON_IsString(h) || !h->valuestring[0] || has_ctl(h->valuestring)) {
      snprintf(err, errlen,
               "%s.%s: expected a non-empty string (or \"env:NAME\" / \"file:PATH\"), found %s",
               path, name, cJSON_IsString(h) ? "an unusable string" : json_type_name(h));
      return -1;
    }
  }
  return 0;
}

static int validate_channel(const cJSON *ch, const char *path, char *err, size_t errlen) {
  char sub[160];
  if (!cJSON_IsObject(ch)) {
    snprintf(err, errlen, "%s: expected an object with \"type\", found %s", path,
             json_type_name(ch));
    return -1;
  }
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(ch, "type");
  const char *const *known;
  if (!cJSON_IsString(type)) {
    snprintf(err, errlen, "%s.type: expected \"webhook\", \"email\" or \"sms\", found %s", path,
             type ? json_type_name(type) : "nothing");
    return -1;
  }
  if (!strcmp(type->valuestring, "webhook"))
    known = webhook_keys;
  else if (!strcmp(type->valuestring, "sms"))
    known = sms_keys;
  else if (!strcmp(type->valuestring, "email"))
    known = email_keys;
  else {
    snprintf(err, errlen, "%s.type: expected \"webhook\", \"email\" or \"sms\", found \"%.32s\"",
             path, type->valuestring);
    return -1;
  }
  const cJSON *item;
  cJSON_ArrayForEach(item, ch) {
    bool ok = false;
    size_t n = 0;
    for (; known[n]; n++)
      if (!strcmp(item->string, known[n])) ok = true;
    if (!ok) {
      unknown_key(path, item->string, known, n, err, errlen);
      return -1;
    }
  }
  static const char *const http_schemes[] = {"http://", "https://", NULL};
  static const char *const smtp_schemes[] = {"smtp://", "smtps://", NULL};
  if (strcmp(type->valuestring, "email") != 0) {
    snprintf(sub, sizeof(sub), "%s.url", path);
    if (check_url(cJSON_GetObjectItemCaseSensitive(ch, "url"), sub, http_schemes,
                  "an http:// or https:// URL", err, errlen))
      return -1;
    const cJSON *headers = cJSON_GetObjectItemCaseSensitive(ch, "headers");
    snprintf(sub, sizeof(sub), "%s.headers", path);
    if (headers && check_headers(headers, sub, err, errlen)) return -1;
    if (!strcmp(type->valuestring, "sms")) {
      snprintf(sub, sizeof(sub), "%s.to", path);
      if (check_text(cJSON_GetObjectItemCaseSensitive(ch, "to"), sub, false, 32, err, errlen))
        return -1;
    }
    return 0;
  }
  snprintf(sub, sizeof(sub), "%s.smtp_url", path);
  if (check_url(cJSON_GetObjectItemCaseSensitive(ch, "smtp_url"), sub, smtp_schemes,
                "an smtp:// or smtps:// URL", err, errlen))
    return -1;
  snprintf(sub, sizeof(sub), "%s.from", path);
  if (check_text(cJSON_GetObjectItemCaseSensitive(ch, "from"), sub, true, 254, err, errlen))
    return -1;
  const cJSON *to = cJSON_GetObjectItemCaseSensitive(ch, "to");
  if (cJSON_IsString(to)) {
    snprintf(sub, sizeof(sub), "%s.to", path);
    if (check_text(to, sub, true, 254, err, errlen)) return -1;
  } else if (cJSON_IsArray(to) && cJSON_GetArraySize(to) >= 1 &&
             cJSON_GetArraySize(to) <= MAX_EMAIL_RCPTS) {
    int i = 0;
    const cJSON *rcpt;
    cJSON_ArrayForEach(rcpt, to) {
      snprintf(sub, sizeof(sub), "%s.to[%d]", path, i++);
      if (check_text(rcpt, sub, true, 254, err, errlen)) return -1;
    }
  } else {
    snprintf(err, errlen,
             "%s.to: expected an email address or an array of 1 to %d addresses, found %s", path,
             MAX_EMAIL_RCPTS, to ? json_type_name(to) : "nothing");
    return -1;
  }
  const char *optional[] = {"username", "password"};
  for (size_t i = 0; i < 2; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(ch, optional[i]);
    if (v && (!cJSON_IsString(v) || !v->valuestring[0] || has_ctl(v->valuestring))) {
      snprintf(err, errlen,
               "%s.%s: expected a non-empty string (or \"env:NAME\" / \"file:PATH\"), found %s",
               path, optional[i], cJSON_IsString(v) ? "an unusable string" : json_type_name(v));
      return -1;
    }
  }
  return 0;
}

/* Parses a section into *out (defaults first). out->channels is a new copy
 * on success (the caller owns it). */
static int parse_section(const cJSON *section, struct alerts_settings *out, char *err,
                         size_t errlen) {
  *out = default_settings;
  out->channels = NULL;
  if (!section || cJSON_IsNull(section)) return 0;
  if (!cJSON_IsObject(section)) {
    snprintf(err, errlen, "alerts: expected an object, found %s", json_type_name(section));
    return -1;
  }
  static const char *const sections[] = {"channels", "rules", NULL};
  if (parse_fields(section, "alerts", top_fields, ZG_ARRAY_LEN(top_fields), sections, out, err,
                   errlen))
    return -1;
  const cJSON *rules = cJSON_GetObjectItemCaseSensitive(section, "rules");
  if (rules) {
    if (!cJSON_IsObject(rules)) {
      snprintf(err, errlen, "alerts.rules: expected an object, found %s", json_type_name(rules));
      return -1;
    }
    if (parse_fields(rules, "alerts.rules", rule_fields, ZG_ARRAY_LEN(rule_fields), NULL, out, err,
                     errlen))
      return -1;
  }
  const cJSON *channels = cJSON_GetObjectItemCaseSensitive(section, "channels");
  if (channels) {
    if (!cJSON_IsArray(channels) || cJSON_GetArraySize(channels) > MAX_CHANNELS) {
      snprintf(err, errlen, "alerts.channels: expected an array of at most %d channels, found %s",
               MAX_CHANNELS, cJSON_IsArray(channels) ? "more" : json_type_name(channels));
      return -1;
    }
    int i = 0;
    const cJSON *ch;
    cJSON_ArrayForEach(ch, channels) {
      char path[64];
      snprintf(path, sizeof(path), "alerts.channels[%d]", i++);
      if (validate_channel(ch, path, err, errlen)) return -1;
    }
    out->channels = cJSON_Duplicate(channels, 1);
    if (!out->channels) {
      snprintf(err, errlen, "alerts.channels: out of memory");
      return -1;
    }
  }
  return 0;
}

int alerts_validate(const cJSON *alerts_section, char *err, size_t errlen) {
  struct alerts_settings s;
  if (parse_section(alerts_section, &s, err, errlen) != 0) return -1;
  cJSON_Delete(s.channels);
  return 0;
}

/* ---- delivery: one attempt = one easy handle on the engine's multi ---- */

static size_t read_upload(char *buf, size_t size, size_t nmemb, void *ud) {
  struct upload *u = ud;
  size_t n = size * nmemb;
  if (n > u->len - u->off) n = u->len - u->off;
  memcpy(buf, u->data + u->off, n);
  u->off += n;
  return n;
}

static size_t discard_body(char *buf, size_t size, size_t nmemb, void *ud) {
  return size * nmemb;
}

static const char *json_string(const cJSON *ch, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(ch, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Resolves a setting that may be a secret reference. The message names
 * the setting, never its value. */
static int resolve_setting(struct delivery *d, const char *key, const char *spec, char **out) {
  char why[256];
  if (zg_secret_resolve(spec, out, NULL, why, sizeof(why)) != 0) {
    snprintf(d->error, sizeof(d->error), "channels[%zu].%.80s: %.160s", d->channel_index, key, why);
    return -1;
  }
  return 0;
}

static void free_header_list(struct curl_slist *list) {
  for (struct curl_slist *l = list; l; l = l->next) OPENSSL_cleanse(l->data, strlen(l->data));
  curl_slist_free_all(list);
}

/* Releases the attempt's easy handle and lists (after done or remove). */
static void attempt_release(struct delivery *d) {
  if (d->easy) curl_easy_cleanup(d->easy);
  d->easy = NULL;
  free_header_list(d->headers);
  d->headers = NULL;
  curl_slist_free_all(d->rcpts);
  d->rcpts = NULL;
}

static void common_options(CURL *curl) {
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, DELIVERY_TIMEOUT_MS);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, DELIVERY_CONNECT_TIMEOUT_MS);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard_body);
  /* Never a proxy from the environment (http_proxy, ALL_PROXY...): it would
   * see every alert with its secret headers. Direct, as the upstream. */
  curl_easy_setopt(curl, CURLOPT_PROXY, "");
}

/* libcurl copies string options, so resolved secrets are wiped here; the
 * lists and the upload stay in `d` until the attempt ends. */
static int setup_http(struct delivery *d, CURL *curl) {
  char *url = NULL;
  int rc = -1;
  d->headers = curl_slist_append(NULL, "Content-Type: application/json");
  if (resolve_setting(d, "url", json_string(d->channel, "url"), &url) != 0) goto out;
  if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0) {
    snprintf(d->error, sizeof(d->error),
             "channels[%zu].url: the resolved value is not an http(s) URL", d->channel_index);
    goto out;
  }
  const cJSON *h;
  cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(d->channel, "headers")) {
    char *value = NULL, key[96];
    snprintf(key, sizeof(key), "headers.%s", h->string);
    if (resolve_setting(d, key, h->valuestring, &value) != 0) goto out;
    zg_buf line;
    zg_buf_init(&line);
    zg_buf_appendf(&line, "%s: %s", h->string, value);
    zg_secret_free(value);
    d->headers = curl_slist_append(d->headers, line.data ? line.data : "");
    if (line.data) OPENSSL_cleanse(line.data, line.len);
    zg_buf_free(&line);
  }
  common_options(curl);
  curl_easy_setopt(curl, CURLOPT_URL, url);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, d->headers);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, d->payload);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, (long)strlen(d->payload));
  rc = 0;
out:
  zg_secret_free(url);
  return rc;
}

static int setup_email(struct delivery *d, CURL *curl) {
  char *url = NULL, *user = NULL, *password = NULL;
  int rc = -1;
  if (resolve_setting(d, "smtp_url", json_string(d->channel, "smtp_url"), &url) != 0) goto out;
  if (strncmp(url, "smtp://", 7) != 0 && strncmp(url, "smtps://", 8) != 0) {
    snprintf(d->error, sizeof(d->error),
             "channels[%zu].smtp_url: the resolved value is not an smtp(s) URL", d->channel_index);
    goto out;
  }
  const char *user_spec = json_string(d->channel, "username");
  const char *password_spec = json_string(d->channel, "password");
  if (user_spec && resolve_setting(d, "username", user_spec, &user) != 0) goto out;
  if (password_spec && resolve_setting(d, "password", password_spec, &password) != 0) goto out;
  char from[300];
  snprintf(from, sizeof(from), "<%s>", json_string(d->channel, "from"));
  const cJSON *to = cJSON_GetObjectItemCaseSensitive(d->channel, "to");
  const cJSON *one;
  if (cJSON_IsString(to)) {
    char rcpt[300];
    snprintf(rcpt, sizeof(rcpt), "<%s>", to->valuestring);
    d->rcpts = curl_slist_append(d->rcpts, rcpt);
  }
  const cJSON *to_list = cJSON_IsArray(to) ? to : NULL;
  cJSON_ArrayForEach(one, to_list) {
    char rcpt[300];
    snprintf(rcpt, sizeof(rcpt), "<%s>", one->valuestring);
    d->rcpts = curl_slist_append(d->rcpts, rcpt);
  }
  d->upload = (struct upload){d->payload, strlen(d->payload), 0};
  common_options(curl);
  curl_easy_setopt(curl, CURLOPT_URL, url);
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
  curl_easy_setopt(curl, CURLOPT_USE_SSL, (long)CURLUSESSL_TRY);
  if (user) curl_easy_setopt(curl, CURLOPT_USERNAME, user);
  if (password) curl_easy_setopt(curl, CURLOPT_PASSWORD, password);
  curl_easy_setopt(curl, CURLOPT_MAIL_FROM, from);
  curl_easy_setopt(curl, CURLOPT_MAIL_RCPT, d->rcpts);
  curl_easy_setopt(curl, CURLOPT_READFUNCTION, read_upload);
  curl_easy_setopt(curl, CURLOPT_READDATA, &d->upload);
  curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
  curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)d->upload.len);
  rc = 0;
out:
  zg_secret_free(url);
  zg_secret_free(user);
  zg_secret_free(password);
  return rc;
}

/* The attempt's outcome from curl's result: 0 ok, -1 with d->error. */
static int attempt_result(struct delivery *d, CURLcode code) {
  bool email = strcmp(d->channel_type, "email") == 0;
  if (code != CURLE_OK) {
    long reply = 0;
    curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &reply);
    if (email && reply)
      snprintf(d->error, sizeof(d->error), "%s (last SMTP reply %ld)", curl_easy_strerror(code),
               reply);
    else
      snprintf(d->error, sizeof(d->error), "%s", curl_easy_strerror(code));
    return -1;
  }
  if (email) return 0;
  curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &d->http_status);
  if (d->http_status < 200 || d->http_status > 299) {
    snprintf(d->error, sizeof(d->error), "the receiver answered HTTP %ld", d->http_status);
    return -1;
  }
  return 0;
}

/* ---- delivery: bookkeeping -------------------------------------------- */

static void maybe_finish_close(struct alerts *a) {
  if (!a->closing || !a->eval_timer_closed || a->open_deliveries || !a->curl_closed) return;
  for (struct alert *al = a->alerts, *next; al; al = next) {
    next = al->next;
    cJSON_Delete(al->details);
    free(al);
  }
  cJSON_Delete(a->settings.channels);
  void (*done)(void *) = a->done;
  void *arg = a->done_arg;
  free(a);
  if (done) done(arg);
}

static void on_delivery_closed(uv_handle_t *h) {
  struct delivery *d = h->data;
  struct alerts *a = d->a;
  cJSON_Delete(d->channel);
  free(d->payload);
  free(d);
  a->open_deliveries--;
  maybe_finish_close(a);
}

static void delivery_finish(struct delivery *d) {
  struct alerts *a = d->a;
  if (d->easy) alerts_curl_remove(a->curl, d->easy);
  attempt_release(d);
  if (d->prev)
    d->prev->next = d->next;
  else
    a->deliveries = d->next;
  if (d->next) d->next->prev = d->prev;
  a->n_deliveries--;
  /* Stays counted as pending for close until its timer is closed. */
  d->prev = d->next = NULL;
  uv_close((uv_handle_t *)&d->retry_timer, on_delivery_closed);
}

static void record_delivery(struct alerts *a, const struct delivery *d, bool ok) {
  struct delivery_record *r = &a->recent[a->recent_next];
  a->recent_next = (a->recent_next + 1) % RECENT_DELIVERIES;
  if (a->recent_count < RECENT_DELIVERIES) a->recent_count++;
  snprintf(r->alert, sizeof(r->alert), "%s", d->alert_name);
  snprintf(r->status, sizeof(r->status), "%s", d->status);
  snprintf(r->subject, sizeof(r->subject), "%s", d->subject);
  snprintf(r->channel_type, sizeof(r->channel_type), "%s", d->channel_type);
  snprintf(r->error, sizeof(r->error), "%s", ok ? "" : d->error);
  r->channel_index = d->channel_index;
  r->ok = ok;
  r->attempts = d->attempt;
  r->at_wall_ms = zg_wall_ms();
}

static cJSON *delivery_log_fields(const struct delivery *d) {
  cJSON *f = cJSON_CreateObject();
  cJSON_AddStringToObject(f, "alert", d->alert_name);
  cJSON_AddStringToObject(f, "subject", d->subject);
  cJSON_AddStringToObject(f, "status", d->status);
  cJSON_AddNumberToObject(f, "channel", (double)d->channel_index);
  cJSON_AddStringToObject(f, "channel_type", d->channel_type);
  cJSON_AddNumberToObject(f, "attempt", d->attempt);
  return f;
}

static void delivery_start(struct delivery *d);

static void on_retry_timer(uv_timer_t *t) {
  struct delivery *d = t->data;
  if (d->a->closing) return;
  delivery_start(d);
}

/* One attempt ended (ok = 0): record, log, retry with backoff or give up. */
static void attempt_done(struct delivery *d, int ok) {
  struct alerts *a = d->a;
  attempt_release(d);
  if (ok == 0) {
    record_delivery(a, d, true);
    zg_log_fields(ZG_INFO, "alert_delivered", delivery_log_fields(d));
    delivery_finish(d);
    return;
  }
  cJSON *f = delivery_log_fields(d);
  cJSON_AddStringToObject(f, "error", d->error);
  bool retry = d->attempt <= a->settings.retry_max;
  cJSON_AddBoolToObject(f, "will_retry", retry);
  zg_log_fields(ZG_WARN, "alert_delivery_failed", f);
  if (!retry) {
    record_delivery(a, d, false);
    delivery_finish(d);
    return;
  }
  uint64_t delay = a->settings.retry_base_ms;
  for (unsigned i = 1; i < d->attempt && delay < MAX_RETRY_DELAY_MS; i++) delay *= 2;
  if (delay > MAX_RETRY_DELAY_MS) delay = MAX_RETRY_DELAY_MS;
  uv_timer_start(&d->retry_timer, on_retry_timer, delay, 0);
}

static void on_transfer_done(void *ud, CURL *easy, CURLcode code) {
  struct delivery *d = ud;
  attempt_done(d, attempt_result(d, code));
}

/* A setup failure is a failed attempt too, reported from the loop (a
 * zero-delay timer) so that callers never see the delivery finish inside
 * delivery_start. */
static void on_setup_failed(uv_timer_t *t) {
  struct delivery *d = t->data;
  if (d->a->closing) return;
  attempt_done(d, -1);
}

static void delivery_start(struct delivery *d) {
  struct alerts *a = d->a;
  d->attempt++;
  d->error[0] = '\0';
  d->http_status = 0;
  d->easy = curl_easy_init();
  if (!d->easy) {
    snprintf(d->error, sizeof(d->error), "curl_easy_init() failed");
  } else {
    int rc =
        strcmp(d->channel_type, "email") == 0 ? setup_email(d, d->easy) : setup_http(d, d->easy);
    if (rc == 0 && alerts_curl_add(a->curl, d->easy, on_transfer_done, d) == 0) return;
    if (rc == 0) snprintf(d->error, sizeof(d->error), "curl_multi_add_handle() failed");
  }
  attempt_release(d);
  uv_timer_start(&d->retry_timer, on_setup_failed, 0, 0);
}

/* ---- notification text ------------------------------------------------ */

static void rfc5322_date(uint64_t wall_ms, char out[64]) {
  time_t secs = (time_t)(wall_ms / 1000);
  struct tm tm;
  gmtime_r(&secs, &tm);
  static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  snprintf(out, 64, "%s, %02d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday], tm.tm_mday,
           months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

struct notice {
  enum alert_rule rule;
  const char *subject, *status; /* "firing" | "resolved" */
  const char *summary;
  const cJSON *details;                       /* may be NULL */
  uint64_t started_wall_ms, resolved_wall_ms; /* resolved 0 = firing */
  bool repeat;
};

static char *webhook_payload(const struct alerts *a, const struct notice *n) {
  char when[32];
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "alert", rule_info[n->rule].name);
  cJSON_AddStringToObject(o, "status", n->status);
  cJSON_AddStringToObject(o, "severity", rule_info[n->rule].severity);
  cJSON_AddStringToObject(o, "node", a->node_id);
  cJSON_AddStringToObject(o, "subject", n->subject);
  cJSON_AddStringToObject(o, "summary", n->summary);
  cJSON_AddItemToObject(o, "details",
                        n->details ? cJSON_Duplicate(n->details, 1) : cJSON_CreateObject());
  zg_iso8601(n->started_wall_ms, when);
  cJSON_AddStringToObject(o, "started_at", when);
  if (n->resolved_wall_ms) {
    zg_iso8601(n->resolved_wall_ms, when);
    cJSON_AddStringToObject(o, "resolved_at", when);
  }
  cJSON_AddBoolToObject(o, "cluster_wide", rule_info[n->rule].cluster_wide);
  cJSON_AddBoolToObject(o, "repeat", n->repeat);
  char *text = cJSON_PrintUnformatted(o);
  cJSON_Delete(o);
  return text;
}

static char *sms_payload(const struct alerts *a, const cJSON *channel, const struct notice *n) {
  char message[SMS_MAX_CHARS + 1];
  snprintf(message, sizeof(message), "zonegate %s %s on %s: %s",
           !strcmp(n->status, "firing") ? "FIRING" : "RESOLVED", rule_info[n->rule].name,
           a->node_id, n->summary);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "to", json_string(channel, "to"));
  cJSON_AddStringToObject(o, "message", message);
  char *text = cJSON_PrintUnformatted(o);
  cJSON_Delete(o);
  return text;
}

static char *email_payload(const struct alerts *a, const cJSON *channel, const struct notice *n) {
  char date[64], started[32], message_id_rand[2 * 8 + 1] = {0};
  uint8_t rnd[8] = {0};
  zg_random_bytes(rnd, sizeof(rnd));
  for (size_t i = 0; i < sizeof(rnd); i++) snprintf(message_id_rand + 2 * i, 3, "%02x", rnd[i]);
  rfc5322_date(zg_wall_ms(), date);
  zg_iso8601(n->started_wall_ms, started);
  const cJSON *to = cJSON_GetObjectItemCaseSensitive(channel, "to");
  zg_buf b;
  zg_buf_init(&b);
  zg_buf_appendf(&b, "Date: %s\r\n", date);
  zg_buf_appendf(&b, "From: zonegate <%s>\r\n", json_string(channel, "from"));
  zg_buf_appendf(&b, "To: ");
  if (cJSON_IsString(to)) zg_buf_appendf(&b, "<%s>", to->valuestring);
  const cJSON *one;
  bool first = true;
  const cJSON *to_list = cJSON_IsArray(to) ? to : NULL;
  cJSON_ArrayForEach(one, to_list) {
    zg_buf_appendf(&b, "%s<%s>", first ? "" : ", ", one->valuestring);
    first = false;
  }
  zg_buf_appendf(&b, "\r\n");
  zg_buf_appendf(&b, "Message-ID: <%s.%" PRIu64 "@zonegate>\r\n", message_id_rand, zg_wall_ms());
  zg_buf_appendf(&b, "Subject: [zonegate] %s: %s on %s\r\n",
                 !strcmp(n->status, "firing") ? "FIRING" : "RESOLVED", rule_info[n->rule].name,
                 a->node_id);
  zg_buf_appendf(&b, "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n");
  zg_buf_appendf(&b, "%s\r\n\r\n", n->summary);
  zg_buf_appendf(&b,
                 "alert:        %s\r\nstatus:       %s\r\nseverity:     %s\r\nnode:         %s\r\n",
                 rule_info[n->rule].name, n->status, rule_info[n->rule].severity, a->node_id);
  zg_buf_appendf(&b, "subject:      %s\r\ncluster_wide: %s\r\nstarted_at:   %s\r\n", n->subject,
                 rule_info[n->rule].cluster_wide ? "true" : "false", started);
  if (n->resolved_wall_ms) {
    char resolved[32];
    zg_iso8601(n->resolved_wall_ms, resolved);
    zg_buf_appendf(&b, "resolved_at:  %s\r\n", resolved);
  }
  if (n->details) {
    char *details = cJSON_Print(n->details);
    if (details) {
      zg_buf_appendf(&b, "details:\r\n");
      /* CRLF line ends; a leading dot is doubled by libcurl itself. */
      char *save = NULL;
      for (char *line = strtok_r(details, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        zg_buf_appendf(&b, "  %s\r\n", line);
      free(details);
    }
  }
  return zg_buf_steal(&b);
}

/* Queues one delivery per channel for a notice. */
static void dispatch(struct alerts *a, const struct notice *n) {
  const cJSON *channel;
  size_t index = 0;
  cJSON_ArrayForEach(channel, a->settings.channels) {
    size_t channel_index = index++;
    const char *type = json_string(channel, "type");
    if (!type) continue;
    struct delivery *d = calloc(1, sizeof(*d));
    if (!d) continue;
    d->a = a;
    d->channel_index = channel_index;
    snprintf(d->channel_type, sizeof(d->channel_type), "%s", type);
    snprintf(d->alert_name, sizeof(d->alert_name), "%s", rule_info[n->rule].name);
    snprintf(d->status, sizeof(d->status), "%s", n->status);
    snprintf(d->subject, sizeof(d->subject), "%s", n->subject);
    d->channel = cJSON_Duplicate(channel, 1);
    d->payload = !strcmp(type, "email") ? email_payload(a, channel, n)
                 : !strcmp(type, "sms") ? sms_payload(a, channel, n)
                                        : webhook_payload(a, n);
    if (!d->channel || !d->payload) {
      cJSON_Delete(d->channel);
      free(d->payload);
      free(d);
      zg_log(ZG_ERROR, "alert_delivery_failed",
             "out of memory building a %s notification for channel %zu", rule_info[n->rule].name,
             channel_index);
      continue;
    }
    uv_timer_init(a->loop, &d->retry_timer);
    d->retry_timer.data = d;
    d->next = a->deliveries;
    if (a->deliveries) a->deliveries->prev = d;
    a->deliveries = d;
    a->n_deliveries++;
    a->open_deliveries++;
    delivery_start(d);
  }
}

/* ---- evaluation ------------------------------------------------------- */

static struct alert *find_alert(struct alerts *a, enum alert_rule rule, const char *subject) {
  for (struct alert *al = a->alerts; al; al = al->next)
    if (al->rule == rule && strcmp(al->subject, subject) == 0) return al;
  return NULL;
}

static void free_alert(struct alerts *a, struct alert *victim) {
  for (struct alert **p = &a->alerts; *p; p = &(*p)->next)
    if (*p == victim) {
      *p = victim->next;
      break;
    }
  cJSON_Delete(victim->details);
  free(victim);
}

static void log_transition(struct alerts *a, const struct alert *al, const char *event,
                           bool repeat) {
  cJSON *f = cJSON_CreateObject();
  cJSON_AddStringToObject(f, "alert", rule_info[al->rule].name);
  cJSON_AddStringToObject(f, "subject", al->subject);
  cJSON_AddStringToObject(f, "severity", rule_info[al->rule].severity);
  cJSON_AddBoolToObject(f, "cluster_wide", rule_info[al->rule].cluster_wide);
  cJSON_AddStringToObject(f, "summary", al->summary);
  if (repeat) cJSON_AddBoolToObject(f, "repeat", true);
  zg_log_fields(!strcmp(event, "alert_firing") ? ZG_WARN : ZG_INFO, event, f);
}

/* Feeds one sample to the alert (rule, subject). `details` is taken. */
static void observe(struct alerts *a, enum alert_rule rule, const char *subject, bool condition,
                    uint64_t for_ms, const char *summary, cJSON *details) {
  uint64_t now = uv_now(a->loop);
  struct alert *al = find_alert(a, rule, subject);
  if (!al) {
    if (!condition) {
      cJSON_Delete(details);
      return;
    }
    al = calloc(1, sizeof(*al));
    if (!al) {
      cJSON_Delete(details);
      return;
    }
    al->rule = rule;
    snprintf(al->subject, sizeof(al->subject), "%s", subject);
    al->next = a->alerts;
    a->alerts = al;
  }
  al->seen = true;
  snprintf(al->summary, sizeof(al->summary), "%s", summary);
  if (details) {
    cJSON_Delete(al->details);
    al->details = details;
  }
  uint64_t repeat_ms = (uint64_t)a->settings.repeat_after_s * 1000u;
  enum alert_transition t = alert_state_step(&al->state, condition, now, for_ms, repeat_ms);
  struct notice n = {rule,        al->subject,         "firing", al->summary,
                     al->details, al->started_wall_ms, 0,        false};
  switch (t) {
  case ALERT_FIRE:
    al->started_wall_ms = n.started_wall_ms = zg_wall_ms();
    log_transition(a, al, "alert_firing", false);
    dispatch(a, &n);
    break;
  case ALERT_REPEAT:
    n.repeat = true;
    log_transition(a, al, "alert_firing", true);
    dispatch(a, &n);
    break;
  case ALERT_RESOLVE:
    n.status = "resolved";
    n.resolved_wall_ms = zg_wall_ms();
    log_transition(a, al, "alert_resolved", false);
    dispatch(a, &n);
    break;
  case ALERT_NONE:
    break;
  }
  if (!al->state.firing && !al->state.condition) free_alert(a, al);
}

static void eval_cpu(struct alerts *a) {
  const struct alerts_settings *s = &a->settings;
  uint64_t busy, total;
  if (zg_cpu_sample(&busy, &total) != 0) {
    if (!a->warned_cpu)
      zg_log(ZG_WARN, "alert_sample_failed", "cannot read /proc/stat: the cpu rule is skipped");
    a->warned_cpu = true;
    return;
  }
  bool usable = a->cpu_have_prev && total > a->cpu_prev_total && busy >= a->cpu_prev_busy;
  uint64_t d_busy = busy - a->cpu_prev_busy, d_total = total - a->cpu_prev_total;
  a->cpu_prev_busy = busy;
  a->cpu_prev_total = total;
  a->cpu_have_prev = true;
  if (!usable || s->cpu_percent <= 0) return;
  double pct = 100.0 * (double)d_busy / (double)d_total;
  char summary[200];
  snprintf(summary, sizeof(summary), "CPU %.0f%% (all cores; threshold %.0f%% for %u s)", pct,
           s->cpu_percent, s->cpu_for_s);
  cJSON *details = cJSON_CreateObject();
  cJSON_AddNumberToObject(details, "cpu_percent", pct);
  cJSON_AddNumberToObject(details, "threshold_percent", s->cpu_percent);
  cJSON_AddNumberToObject(details, "for_s", s->cpu_for_s);
  observe(a, RULE_CPU, a->node_id, pct > s->cpu_percent, (uint64_t)s->cpu_for_s * 1000u, summary,
          details);
}

static void eval_memory(struct alerts *a) {
  const struct alerts_settings *s = &a->settings;
  if (s->memory_percent <= 0) return;
  struct zg_memory_sample m;
  if (zg_memory_sample(&m) != 0) {
    if (!a->warned_memory)
      zg_log(ZG_WARN, "alert_sample_failed",
             "cannot read /proc/meminfo: the memory rule is skipped");
    a->warned_memory = true;
    return;
  }
  double pct = m.used_percent;
  const char *source = m.source;
  char summary[200];
  snprintf(summary, sizeof(summary), "memory %.0f%% used (%s; threshold %.0f%%)", pct, source,
           s->memory_percent);
  cJSON *details = cJSON_CreateObject();
  cJSON_AddNumberToObject(details, "memory_percent", pct);
  cJSON_AddStringToObject(details, "source", source);
  cJSON_AddNumberToObject(details, "threshold_percent", s->memory_percent);
  cJSON_AddNumberToObject(details, "process_rss_bytes", (double)zg_process_rss_bytes());
  observe(a, RULE_MEMORY, a->node_id, pct > s->memory_percent, (uint64_t)s->memory_for_s * 1000u,
          summary, details);
}

static void eval_no_active(struct alerts *a) {
  const struct alerts_settings *s = &a->settings;
  if (!a->fo || s->no_active_for_s == 0) return;
  enum failover_role role = failover_role(a->fo);
  if (role == FAILOVER_WITNESS) return;
  bool active_known =
      role == FAILOVER_ACTIVE || role == FAILOVER_DRAINING || role == FAILOVER_STANDBY;
  char summary[200];
  snprintf(summary, sizeof(summary), "%s as seen by %s (role %s; threshold %u s)",
           active_known ? "an active node exists" : "no active node", a->node_id,
           failover_role_name(role), s->no_active_for_s);
  cJSON *details = cJSON_CreateObject();
  cJSON_AddStringToObject(details, "role", failover_role_name(role));
  cJSON_AddNumberToObject(details, "for_s", s->no_active_for_s);
  observe(a, RULE_NO_ACTIVE, a->node_id, !active_known, (uint64_t)s->no_active_for_s * 1000u,
          summary, details);
}

static void eval_error_ratio(struct alerts *a, uint64_t now) {
  const struct alerts_settings *s = &a->settings;
  if (!a->gw) return;
  struct gateway_stats st;
  gateway_get_stats(a->gw, &st);
  uint64_t window_ms = (uint64_t)s->error_window_s * 1000u;
  error_window_push(&a->errors, now, window_ms, st.requests_total, st.requests_5xx);
  if (s->error_ratio <= 0) return;
  uint64_t requests, errors;
  error_window_delta(&a->errors, now, window_ms, &requests, &errors);
  double ratio = requests ? (double)errors / (double)requests : 0;
  bool enough = requests >= (s->error_min_requests ? s->error_min_requests : 1);
  char summary[200];
  snprintf(summary, sizeof(summary),
           "5xx ratio %.1f%% (%" PRIu64 " of %" PRIu64 " requests in %u s; threshold %.1f%%)",
           100.0 * ratio, errors, requests, s->error_window_s, 100.0 * s->error_ratio);
  cJSON *details = cJSON_CreateObject();
  cJSON_AddNumberToObject(details, "ratio", ratio);
  cJSON_AddNumberToObject(details, "requests", (double)requests);
  cJSON_AddNumberToObject(details, "errors_5xx", (double)errors);
  cJSON_AddNumberToObject(details, "window_s", s->error_window_s);
  cJSON_AddNumberToObject(details, "threshold_ratio", s->error_ratio);
  observe(a, RULE_ERROR_RATIO, "gateway", enough && ratio > s->error_ratio, 0, summary, details);
}

static void eval_keys(struct alerts *a) {
  const struct alerts_settings *s = &a->settings;
  if (!a->cs) return;
  for (struct alert *al = a->alerts; al; al = al->next) al->seen = false;
  cJSON *keys = (s->key_rotation || s->key_invalid) ? consensus_keys_json(a->cs) : NULL;
  const cJSON *k;
  cJSON_ArrayForEach(k, keys) {
    const char *id = json_string(k, "id"), *state = json_string(k, "state");
    const char *upstream = json_string(k, "upstream");
    if (!id || !state) continue;
    const cJSON *age = cJSON_GetObjectItemCaseSensitive(k, "age_days");
    const cJSON *period = cJSON_GetObjectItemCaseSensitive(k, "rotate_after_days");
    char summary[256];
    if (s->key_rotation) {
      bool due = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(k, "rotation_due"));
      snprintf(summary, sizeof(summary),
               "provider key %s (upstream %s, %s) is %.0f days old; rotation period %.0f days", id,
               upstream ? upstream : "?", state, cJSON_IsNumber(age) ? age->valuedouble : 0,
               cJSON_IsNumber(period) ? period->valuedouble : 0);
      cJSON *details = cJSON_CreateObject();
      cJSON_AddStringToObject(details, "key_id", id);
      cJSON_AddStringToObject(details, "upstream", upstream ? upstream : "");
      cJSON_AddStringToObject(details, "state", state);
      if (cJSON_IsNumber(age)) cJSON_AddNumberToObject(details, "age_days", age->valuedouble);
      if (cJSON_IsNumber(period))
        cJSON_AddNumberToObject(details, "rotate_after_days", period->valuedouble);
      observe(a, RULE_KEY_ROTATION, id, due, 0, summary, details);
    }
    if (s->key_invalid) {
      bool invalid = strcmp(state, "invalid") == 0;
      snprintf(summary, sizeof(summary), "provider key %s (upstream %s) is %s%s", id,
               upstream ? upstream : "?", state,
               invalid ? ": the upstream refused it; rotate it with `zonegate keys rotate`" : "");
      cJSON *details = cJSON_CreateObject();
      cJSON_AddStringToObject(details, "key_id", id);
      cJSON_AddStringToObject(details, "upstream", upstream ? upstream : "");
      cJSON_AddStringToObject(details, "state", state);
      observe(a, RULE_KEY_INVALID, id, invalid, 0, summary, details);
    }
  }
  cJSON_Delete(keys);
  /* Keys that disappeared (or a rule switched off) resolve. */
  for (struct alert *al = a->alerts, *next; al; al = next) {
    next = al->next;
    if ((al->rule == RULE_KEY_ROTATION || al->rule == RULE_KEY_INVALID) && !al->seen) {
      char summary[160];
      snprintf(summary, sizeof(summary),
               "provider key %s is no longer present or no longer checked", al->subject);
      observe(a, al->rule, al->subject, false, 0, summary, NULL);
    }
  }
}

/* Node-level: a TLS certificate of this node within tls_cert_expiry_days of
 * its notAfter (or unreadable). */
static void eval_certs(struct alerts *a) {
  unsigned days = a->settings.tls_cert_expiry_days;
  for (size_t i = 0; i < a->n_certs; i++) {
    bool ok;
    int64_t not_after = zg_tls_cert_file_not_after(a->certs[i].path, &ok);
    double left_days = ok ? (double)(not_after - (int64_t)time(NULL)) / 86400.0 : 0;
    char subject[96], summary[256];
    snprintf(subject, sizeof(subject), "%s/%s", a->node_id, a->certs[i].name);
    snprintf(summary, sizeof(summary),
             ok ? "TLS certificate %s of %s expires in %.1f days (threshold %u days)"
                : "TLS certificate %s of %s is unreadable (%.0f days; threshold %u days)",
             a->certs[i].name, a->node_id, left_days, days);
    cJSON *details = cJSON_CreateObject();
    cJSON_AddStringToObject(details, "cert", a->certs[i].name);
    cJSON_AddNumberToObject(details, "days_left", left_days);
    observe(a, RULE_TLS_CERT_EXPIRY, subject, days > 0 && left_days < (double)days, 0, summary,
            details);
  }
}

void alerts_watch_cert(struct alerts *a, const char *name, const char *path) {
  if (!a || !path || !path[0] || a->n_certs >= ZG_ARRAY_LEN(a->certs)) return;
  snprintf(a->certs[a->n_certs].name, sizeof(a->certs[0].name), "%s", name);
  snprintf(a->certs[a->n_certs].path, sizeof(a->certs[0].path), "%s", path);
  a->n_certs++;
}

/* Cluster-wide alerts belong to the active node; a node that stops being
 * active drops them silently (the new active re-evaluates). */
static void drop_cluster_wide(struct alerts *a) {
  for (struct alert *al = a->alerts, *next; al; al = next) {
    next = al->next;
    if (!rule_info[al->rule].cluster_wide) continue;
    if (al->state.firing)
      zg_log(ZG_INFO, "alert_handover",
             "%s (%s): this node is no longer active; the new active owns it",
             rule_info[al->rule].name, al->subject);
    free_alert(a, al);
  }
}

static void evaluate(struct alerts *a) {
  uint64_t now = uv_now(a->loop);
  bool active = a->fo ? failover_is_active(a->fo) : true;
  eval_cpu(a);
  eval_memory(a);
  eval_no_active(a);
  eval_certs(a);
  if (!active) {
    if (a->was_active) drop_cluster_wide(a);
    a->was_active = false;
    if (a->gw) { /* keep the window warm for when this node becomes active */
      struct gateway_stats st;
      gateway_get_stats(a->gw, &st);
      error_window_push(&a->errors, now, (uint64_t)a->settings.error_window_s * 1000u,
                        st.requests_total, st.requests_5xx);
    }
    return;
  }
  if (!a->was_active && a->fo && a->settings.leader_changed) {
    char summary[160];
    snprintf(summary, sizeof(summary), "leader changed to %s", a->node_id);
    cJSON *details = cJSON_CreateObject();
    cJSON_AddStringToObject(details, "leader", a->node_id);
    cJSON_AddNumberToObject(details, "term", (double)(a->cs ? consensus_term(a->cs) : 0));
    struct notice n = {RULE_LEADER_CHANGED, a->node_id, "firing", summary, details,
                       zg_wall_ms(),        0,          false};
    cJSON *f = cJSON_CreateObject();
    cJSON_AddStringToObject(f, "alert", "leader_changed");
    cJSON_AddStringToObject(f, "subject", a->node_id);
    cJSON_AddStringToObject(f, "severity", rule_info[RULE_LEADER_CHANGED].severity);
    cJSON_AddBoolToObject(f, "cluster_wide", true);
    cJSON_AddStringToObject(f, "summary", summary);
    zg_log_fields(ZG_INFO, "alert_firing", f); /* a notice, not a problem */
    dispatch(a, &n);
    cJSON_Delete(details);
  }
  a->was_active = true;
  eval_error_ratio(a, now);
  eval_keys(a);
}

static void on_eval_timer(uv_timer_t *t) {
  struct alerts *a = t->data;
  if (!a->closing) evaluate(a);
}

/* ---- lifecycle ---------------------------------------------------------- */

int alerts_start(uv_loop_t *loop, const char *node_id, struct consensus *cs, struct failover *fo,
                 struct gateway *gw, struct alerts **out, char *errmsg, size_t errlen) {
  static bool curl_ready; /* loop thread only */
  if (!curl_ready) {
    CURLcode gc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (gc != CURLE_OK) {
      snprintf(errmsg, errlen, "alerts: curl_global_init(): %s", curl_easy_strerror(gc));
      return -1;
    }
    curl_ready = true;
  }
  struct alerts *a = calloc(1, sizeof(*a));
  if (!a) {
    snprintf(errmsg, errlen, "alerts: out of memory");
    return -1;
  }
  a->loop = loop;
  snprintf(a->node_id, sizeof(a->node_id), "%s", node_id ? node_id : "");
  a->cs = cs;
  a->fo = fo;
  a->gw = gw;
  a->settings = default_settings;
  error_window_reset(&a->errors);
  if (alerts_curl_create(loop, &a->curl, errmsg, errlen) != 0) {
    free(a);
    return -1;
  }
  uv_timer_init(loop, &a->eval_timer);
  a->eval_timer.data = a;
  uv_timer_start(&a->eval_timer, on_eval_timer, a->settings.eval_interval_ms,
                 a->settings.eval_interval_ms);
  *out = a;
  return 0;
}

void alerts_apply_config(struct alerts *a, const cJSON *alerts_section) {
  struct alerts_settings fresh;
  char err[512];
  if (parse_section(alerts_section, &fresh, err, sizeof(err)) != 0) {
    zg_log(ZG_ERROR, "alerts_config_rejected", "keeping the running alert settings: %s", err);
    return;
  }
  unsigned old_interval = a->settings.eval_interval_ms;
  unsigned old_window = a->settings.error_window_s;
  cJSON_Delete(a->settings.channels);
  a->settings = fresh;
  if (fresh.error_window_s != old_window) error_window_reset(&a->errors);
  if (fresh.eval_interval_ms != old_interval && !a->closing)
    uv_timer_start(&a->eval_timer, on_eval_timer, fresh.eval_interval_ms, fresh.eval_interval_ms);
  zg_log(ZG_INFO, "alerts_configured", "%d channel(s); evaluating every %u ms",
         fresh.channels ? cJSON_GetArraySize(fresh.channels) : 0, fresh.eval_interval_ms);
}

void alerts_status_json(const struct alerts *a, cJSON *out) {
  cJSON *o = cJSON_AddObjectToObject(out, "alerts");
  cJSON *firing = cJSON_AddArrayToObject(o, "firing");
  for (const struct alert *al = a->alerts; al; al = al->next) {
    if (!al->state.firing) continue;
    char when[32];
    zg_iso8601(al->started_wall_ms, when);
    cJSON *f = cJSON_CreateObject();
    cJSON_AddStringToObject(f, "alert", rule_info[al->rule].name);
    cJSON_AddStringToObject(f, "subject", al->subject);
    cJSON_AddStringToObject(f, "severity", rule_info[al->rule].severity);
    cJSON_AddBoolToObject(f, "cluster_wide", rule_info[al->rule].cluster_wide);
    cJSON_AddStringToObject(f, "summary", al->summary);
    cJSON_AddStringToObject(f, "started_at", when);
    cJSON_AddItemToArray(firing, f);
  }
  cJSON *recent = cJSON_AddArrayToObject(o, "recent_deliveries"); /* newest first */
  for (size_t i = 0; i < a->recent_count; i++) {
    const struct delivery_record *r =
        &a->recent[(a->recent_next + RECENT_DELIVERIES - 1 - i) % RECENT_DELIVERIES];
    char when[32];
    zg_iso8601(r->at_wall_ms, when);
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "alert", r->alert);
    cJSON_AddStringToObject(d, "status", r->status);
    cJSON_AddStringToObject(d, "subject", r->subject);
    cJSON_AddNumberToObject(d, "channel", (double)r->channel_index);
    cJSON_AddStringToObject(d, "channel_type", r->channel_type);
    cJSON_AddBoolToObject(d, "ok", r->ok);
    cJSON_AddNumberToObject(d, "attempts", r->attempts);
    if (!r->ok) cJSON_AddStringToObject(d, "error", r->error);
    cJSON_AddStringToObject(d, "at", when);
    cJSON_AddItemToArray(recent, d);
  }
  cJSON_AddNumberToObject(o, "channels",
                          a->settings.channels ? cJSON_GetArraySize(a->settings.channels) : 0);
  cJSON_AddNumberToObject(o, "pending_deliveries", (double)a->n_deliveries);
}

static void on_curl_closed(void *arg) {
  struct alerts *a = arg;
  a->curl_closed = true;
  maybe_finish_close(a);
}

static void on_eval_timer_closed(uv_handle_t *h) {
  struct alerts *a = h->data;
  a->eval_timer_closed = true;
  maybe_finish_close(a);
}

void alerts_close(struct alerts *a, void (*done)(void *), void *arg) {
  if (a->closing) return;
  a->closing = true;
  a->done = done;
  a->done_arg = arg;
  if (a->n_deliveries)
    zg_log(ZG_INFO, "alerts_closing", "dropping %zu undelivered notification(s)", a->n_deliveries);
  /* Running transfers are removed from the multi, waiting ones dropped. */
  for (struct delivery *d = a->deliveries, *next; d; d = next) {
    next = d->next;
    delivery_finish(d);
  }
  alerts_curl_close(a->curl, on_curl_closed, a);
  uv_close((uv_handle_t *)&a->eval_timer, on_eval_timer_closed);
}
