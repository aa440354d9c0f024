/* state.c: the state machine's containers and records: provider keys (in
 * priority order), client tokens (slots plus two hash indexes), the
 * bounded audit ring, their JSON views, and the parsing and validation of
 * records and command arguments shared by the commands (commands.c) and
 * snapshot restore (snapshot.c).
 *
 * Memory: every record owns its strings; the texts cached for snapshots
 * are parked (zg_text_drop) while a snapshot borrows them. Failure modes:
 * allocation failures return -1 and leave the state as it was; parsers
 * return -1 with a message naming the field.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

const char *const zg_key_state_names[] = {"active", "retiring", "revoked", "invalid"};

/* ---- state helpers ----------------------------------------------------- */

#define INDEX_EMPTY 0u
#define INDEX_DELETED UINT32_MAX
#define INDEX_MIN_BUCKETS 64u
#define COMPACT_MIN_DEAD 64u

void zg_key_free(struct zg_key *k) {
  free(k->upstream);
  free(k->sealed);
  free(k->reason);
  memset(k, 0, sizeof *k);
}

void zg_token_free(struct zg_token *t) {
  free(t->name);
  for (size_t i = 0; i < t->n_allow; i++) free(t->allow[i]);
  free(t->allow);
  free(t->snap_text);
  memset(t, 0, sizeof *t);
}

bool zg_token_live(const struct zg_token *t) {
  return t->id[0] != '\0';
}

/* A cached text is no longer part of the state. While a snapshot borrows
 * the texts it is parked until snapshot_finalize; `f` NULL: never borrowed. */
void zg_text_drop(struct zg_fsm *f, char *text) {
  if (text == NULL) return;
  if (f == NULL || !f->snapshot_pinned) {
    free(text);
    return;
  }
  if (f->n_grave == f->grave_cap) {
    size_t cap = f->grave_cap ? 2 * f->grave_cap : 64;
    char **grown = realloc(f->grave, cap * sizeof *grown);
    if (grown == NULL) {
      /* Freeing it could corrupt the snapshot being written: leak instead. */
      ZG_LOG_WARN("consensus_snapshot_text_leaked", "out of memory parking a snapshot text");
      return;
    }
    f->grave = grown;
    f->grave_cap = cap;
  }
  f->grave[f->n_grave++] = text;
}

void zg_state_free(struct zg_state *st) {
  cJSON_Delete(st->config);
  for (size_t i = 0; i < st->n_keys; i++) zg_key_free(&st->keys[i]);
  free(st->keys);
  for (size_t i = 0; i < st->n_token_slots; i++) zg_token_free(&st->tokens[i]);
  free(st->tokens);
  free(st->token_by_sha);
  free(st->token_by_id);
  for (size_t i = 0; i < st->n_audit; i++)
    free(st->audit[(st->audit_head + i) % st->audit_cap].text);
  free(st->audit);
  zg_usage_free(&st->usage);
  memset(st, 0, sizeof *st);
}

/* Frees a state whose texts a pending snapshot of `f` may still borrow. */
void zg_state_discard(struct zg_fsm *f, struct zg_state *st) {
  for (size_t i = 0; i < st->n_token_slots; i++) {
    zg_text_drop(f, st->tokens[i].snap_text);
    st->tokens[i].snap_text = NULL;
  }
  for (size_t i = 0; i < st->n_audit; i++) {
    struct zg_audit_rec *r = &st->audit[(st->audit_head + i) % st->audit_cap];
    zg_text_drop(f, r->text);
    r->text = NULL;
  }
  zg_state_free(st);
}

int zg_state_init(struct zg_state *st, size_t audit_cap) {
  memset(st, 0, sizeof *st);
  st->audit_cap = audit_cap ? audit_cap : 1;
  st->audit = calloc(st->audit_cap, sizeof *st->audit);
  return st->audit ? 0 : -1;
}

/* Prints `o` (consumed) as ",{...}" for the snapshot arrays. NULL on ENOMEM. */
char *zg_comma_text(cJSON *o, size_t *len) {
  char *printed = o ? cJSON_PrintUnformatted(o) : NULL;
  cJSON_Delete(o);
  if (printed == NULL) return NULL;
  size_t n = strlen(printed);
  char *text = malloc(n + 2);
  if (text != NULL) {
    text[0] = ',';
    memcpy(text + 1, printed, n + 1);
    *len = n + 1;
  }
  free(printed);
  return text;
}

/* Appends a record text (ownership taken), dropping the oldest when full. */
void zg_audit_push(struct zg_fsm *f, struct zg_state *st, char *text, size_t len) {
  if (st->n_audit == st->audit_cap) {
    zg_text_drop(f, st->audit[st->audit_head].text);
    st->audit[st->audit_head] = (struct zg_audit_rec){text, len};
    st->audit_head = (st->audit_head + 1) % st->audit_cap;
    return;
  }
  st->audit[(st->audit_head + st->n_audit) % st->audit_cap] = (struct zg_audit_rec){text, len};
  st->n_audit++;
}

struct zg_key *zg_key_find(struct zg_state *st, const char *id) {
  for (size_t i = 0; i < st->n_keys; i++)
    if (strcmp(st->keys[i].id, id) == 0) return &st->keys[i];
  return NULL;
}

/* Inserts a copy of *k at position `at` (0 = highest priority) or the end. */
int zg_key_insert(struct zg_state *st, const struct zg_key *k, bool first) {
  struct zg_key *grown = realloc(st->keys, (st->n_keys + 1) * sizeof *grown);
  if (grown == NULL) return -1;
  st->keys = grown;
  if (first) {
    memmove(&st->keys[1], &st->keys[0], st->n_keys * sizeof *grown);
    st->keys[0] = *k;
  } else {
    st->keys[st->n_keys] = *k;
  }
  st->n_keys++;
  return 0;
}

/* 64-bit FNV-1a; keys are ids and SHA-256 hex chosen by the cluster. */
static uint64_t hash_string(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    h ^= *p;
    h *= 0x100000001b3ull;
  }
  return h;
}

static const char *token_key(const struct zg_token *t, bool by_sha) {
  return by_sha ? t->sha256 : t->id;
}

/* Slot of the live token with this sha256 (by_sha) or id, or -1. */
long zg_token_index_find(const struct zg_state *st, bool by_sha, const char *key) {
  if (st->token_buckets == 0) return -1;
  const uint32_t *tab = by_sha ? st->token_by_sha : st->token_by_id;
  size_t mask = st->token_buckets - 1;
  for (size_t i = hash_string(key) & mask;; i = (i + 1) & mask) {
    uint32_t v = tab[i];
    if (v == INDEX_EMPTY) return -1;
    if (v != INDEX_DELETED && strcmp(token_key(&st->tokens[v - 1], by_sha), key) == 0)
      return (long)(v - 1);
  }
}

/* Always takes an empty bucket (never a deleted one), so both indexes hold
 * the same number of non-empty buckets. The load stays <= 1/2. */
static void index_put(uint32_t *tab, size_t buckets, const char *key, uint32_t value) {
  size_t mask = buckets - 1, i = hash_string(key) & mask;
  while (tab[i] != INDEX_EMPTY) i = (i + 1) & mask;
  tab[i] = value;
}

static void index_remove(uint32_t *tab, size_t buckets, const char *key, uint32_t value) {
  size_t mask = buckets - 1;
  for (size_t i = hash_string(key) & mask; tab[i] != INDEX_EMPTY; i = (i + 1) & mask)
    if (tab[i] == value) {
      tab[i] = INDEX_DELETED;
      return;
    }
}

/* Rebuilds both indexes for room to grow (and no deleted marks); when
 * `compact` also squeezes revoked slots out of the array (order kept).
 * On ENOMEM nothing changes. Amortised O(1) per insert/remove. */
int zg_token_reindex(struct zg_state *st, bool compact) {
  size_t buckets = INDEX_MIN_BUCKETS;
  while (buckets < 4 * (st->n_tokens + 1)) buckets *= 2;
  uint32_t *by_sha = calloc(buckets, sizeof *by_sha), *by_id = calloc(buckets, sizeof *by_id);
  if (by_sha == NULL || by_id == NULL) {
    free(by_sha);
    free(by_id);
    return -1;
  }
  if (compact) {
    size_t live = 0;
    for (size_t i = 0; i < st->n_token_slots; i++)
      if (zg_token_live(&st->tokens[i])) st->tokens[live++] = st->tokens[i];
    st->n_token_slots = live;
  }
  for (size_t i = 0; i < st->n_token_slots; i++) {
    const struct zg_token *t = &st->tokens[i];
    if (!zg_token_live(t)) continue;
    index_put(by_sha, buckets, t->sha256, (uint32_t)i + 1);
    index_put(by_id, buckets, t->id, (uint32_t)i + 1);
  }
  free(st->token_by_sha);
  free(st->token_by_id);
  st->token_by_sha = by_sha;
  st->token_by_id = by_id;
  st->token_buckets = buckets;
  st->token_buckets_used = st->n_tokens;
  return 0;
}

const struct zg_token *zg_state_token_find(const struct zg_state *st, const char *sha256) {
  long i = zg_token_index_find(st, true, sha256);
  return i < 0 ? NULL : &st->tokens[i];
}

/* Appends *t (ownership taken on success); the caller checked uniqueness. */
int zg_token_append(struct zg_state *st, const struct zg_token *t) {
  if (st->n_token_slots >= UINT32_MAX - 2) return -1;
  if (st->n_token_slots == st->token_cap) {
    size_t cap = st->token_cap ? 2 * st->token_cap : 16;
    struct zg_token *grown = realloc(st->tokens, cap * sizeof *grown);
    if (grown == NULL) return -1;
    st->tokens = grown;
    st->token_cap = cap;
  }
  if ((st->token_buckets_used + 1) * 2 > st->token_buckets && zg_token_reindex(st, false))
    return -1;
  size_t slot = st->n_token_slots++;
  st->tokens[slot] = *t;
  index_put(st->token_by_sha, st->token_buckets, t->sha256, (uint32_t)slot + 1);
  index_put(st->token_by_id, st->token_buckets, t->id, (uint32_t)slot + 1);
  st->token_buckets_used++;
  st->n_tokens++;
  return 0;
}

/* Revokes the token in `slot`; its cached text goes through text_drop. */
void zg_token_remove(struct zg_fsm *f, struct zg_state *st, size_t slot) {
  struct zg_token *t = &st->tokens[slot];
  index_remove(st->token_by_sha, st->token_buckets, t->sha256, (uint32_t)slot + 1);
  index_remove(st->token_by_id, st->token_buckets, t->id, (uint32_t)slot + 1);
  zg_text_drop(f, t->snap_text);
  t->snap_text = NULL;
  zg_token_free(t); /* id "" marks the slot dead */
  st->n_tokens--;
  size_t dead = st->n_token_slots - st->n_tokens;
  if (dead >= COMPACT_MIN_DEAD && dead > st->n_tokens) (void)zg_token_reindex(st, true);
}

/* ---- JSON views -------------------------------------------------------- */

cJSON *zg_key_to_json(const struct zg_key *k, bool with_sealed, uint64_t now_ms) {
  cJSON *o = cJSON_CreateObject();
  if (o == NULL) return NULL;
  cJSON_AddStringToObject(o, "id", k->id);
  cJSON_AddStringToObject(o, "upstream", k->upstream);
  cJSON_AddStringToObject(o, "state", zg_key_state_names[k->state]);
  cJSON_AddNumberToObject(o, "created_at", (double)k->created_at);
  cJSON_AddNumberToObject(o, "rotate_after_days", k->rotate_after_days);
  if (k->retire_at)
    cJSON_AddNumberToObject(o, "retire_at", (double)k->retire_at);
  else
    cJSON_AddNullToObject(o, "retire_at");
  if (k->reason) cJSON_AddStringToObject(o, "reason", k->reason);
  if (with_sealed) {
    cJSON_AddStringToObject(o, "sealed", k->sealed);
  } else {
    uint64_t age_days = now_ms > k->created_at ? (now_ms - k->created_at) / 86400000u : 0;
    cJSON_AddNumberToObject(o, "age_days", (double)age_days);
    cJSON_AddBoolToObject(o, "rotation_due",
                          k->state == ZG_KEY_ACTIVE && age_days >= k->rotate_after_days);
    cJSON_AddBoolToObject(o, "usable",
                          k->state == ZG_KEY_ACTIVE ||
                              (k->state == ZG_KEY_RETIRING && k->retire_at > now_ms));
  }
  return o;
}

cJSON *zg_token_to_json(const struct zg_token *t, bool with_hash) {
  cJSON *o = cJSON_CreateObject();
  if (o == NULL) return NULL;
  cJSON_AddStringToObject(o, "id", t->id);
  cJSON_AddStringToObject(o, "name", t->name);
  if (with_hash) {
    cJSON_AddStringToObject(o, "sha256", t->sha256);
  } else {
    char prefix[9];
    snprintf(prefix, sizeof prefix, "%.8s", t->sha256);
    cJSON_AddStringToObject(o, "sha256_prefix", prefix);
  }
  cJSON_AddNumberToObject(o, "created_at", (double)t->created_at);
  if (t->expires_at)
    cJSON_AddNumberToObject(o, "expires_at", (double)t->expires_at);
  else
    cJSON_AddNullToObject(o, "expires_at");
  cJSON_AddNumberToObject(o, "rpm", t->rpm);
  cJSON_AddNumberToObject(o, "tpm", (double)t->tpm);
  cJSON_AddNumberToObject(o, "budget_day", (double)t->budget_day);
  cJSON_AddNumberToObject(o, "budget_month", (double)t->budget_month);
  cJSON *allow = cJSON_AddArrayToObject(o, "allow");
  for (size_t i = 0; allow && i < t->n_allow; i++)
    cJSON_AddItemToArray(allow, cJSON_CreateString(t->allow[i]));
  return o;
}

cJSON *zg_state_keys_json(const struct zg_state *st, uint64_t now_ms) {
  cJSON *arr = cJSON_CreateArray();
  for (size_t i = 0; arr && i < st->n_keys; i++)
    cJSON_AddItemToArray(arr, zg_key_to_json(&st->keys[i], false, now_ms));
  return arr;
}

cJSON *zg_state_tokens_json(const struct zg_state *st) {
  cJSON *arr = cJSON_CreateArray();
  for (size_t i = 0; arr && i < st->n_token_slots; i++)
    if (zg_token_live(&st->tokens[i]))
      cJSON_AddItemToArray(arr, zg_token_to_json(&st->tokens[i], false));
  return arr;
}

cJSON *zg_state_audit_json(const struct zg_state *st, size_t limit) {
  cJSON *arr = cJSON_CreateArray();
  size_t start = (limit > 0 && st->n_audit > limit) ? st->n_audit - limit : 0;
  for (size_t i = start; arr && i < st->n_audit; i++) {
    const struct zg_audit_rec *r = &st->audit[(st->audit_head + i) % st->audit_cap];
    cJSON *rec = cJSON_ParseWithLength(r->text + 1, r->len - 1);
    if (rec) cJSON_AddItemToArray(arr, rec);
  }
  return arr;
}

/* ---- argument validation ---------------------------------------------- */

bool zg_cidr_valid(const char *cidr) {
  char addr[64];
  const char *slash = strchr(cidr, '/');
  size_t alen = slash ? (size_t)(slash - cidr) : strlen(cidr);
  if (alen == 0 || alen >= sizeof addr) return false;
  memcpy(addr, cidr, alen);
  addr[alen] = '\0';
  unsigned char bin[16];
  int max_prefix;
  if (inet_pton(AF_INET, addr, bin) == 1)
    max_prefix = 32;
  else if (inet_pton(AF_INET6, addr, bin) == 1)
    max_prefix = 128;
  else
    return false;
  if (slash == NULL) return true;
  const char *p = slash + 1;
  if (*p == '\0' || strlen(p) > 3) return false;
  int prefix = 0;
  for (; *p; p++) {
    if (!isdigit((unsigned char)*p)) return false;
    prefix = prefix * 10 + (*p - '0');
  }
  return prefix <= max_prefix;
}

bool zg_id_valid(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_ID_LEN) return false;
  for (; *s; s++)
    if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && *s != '.') return false;
  return true;
}

/* Reads an optional/required string field; NULL *out if absent. */
int zg_arg_string(const cJSON *args, const char *name, bool required, size_t max_len,
                  const char **out, char *err, size_t errlen) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(args, name);
  *out = NULL;
  if (item == NULL || cJSON_IsNull(item)) {
    if (!required) return 0;
    snprintf(err, errlen, "field '%s' is required (a string)", name);
    return -1;
  }
  if (!cJSON_IsString(item)) {
    snprintf(err, errlen, "field '%s' must be a string", name);
    return -1;
  }
  size_t n = strlen(item->valuestring);
  if ((required && n == 0) || n > max_len) {
    snprintf(err, errlen, "field '%s' must be 1..%zu characters, found %zu", name, max_len, n);
    return -1;
  }
  *out = item->valuestring;
  return 0;
}

int zg_arg_uint(const cJSON *args, const char *name, bool required, uint64_t min, uint64_t max,
                uint64_t dflt, uint64_t *out, char *err, size_t errlen) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(args, name);
  *out = dflt;
  if (item == NULL || cJSON_IsNull(item)) {
    if (!required) return 0;
    snprintf(err, errlen, "field '%s' is required (a number)", name);
    return -1;
  }
  double v = cJSON_IsNumber(item) ? item->valuedouble : -1;
  if (!cJSON_IsNumber(item) || !isfinite(v) || v != floor(v) || v < (double)min ||
      v > (double)max) {
    snprintf(err, errlen, "field '%s' must be a whole number in %llu..%llu", name,
             (unsigned long long)min, (unsigned long long)max);
    return -1;
  }
  *out = (uint64_t)v;
  return 0;
}

int zg_arg_bool(const cJSON *args, const char *name, bool dflt, bool *out, char *err,
                size_t errlen) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(args, name);
  *out = dflt;
  if (item == NULL || cJSON_IsNull(item)) return 0;
  if (!cJSON_IsBool(item)) {
    snprintf(err, errlen, "field '%s' must be true or false", name);
    return -1;
  }
  *out = cJSON_IsTrue(item);
  return 0;
}

int zg_check_known_fields(const cJSON *args, const char *const *known, char *err, size_t errlen) {
  const cJSON *item;
  cJSON_ArrayForEach(item, args) {
    bool ok = false;
    for (const char *const *k = known; *k && !ok; k++)
      ok = item->string && !strcmp(item->string, *k);
    if (!ok) {
      snprintf(err, errlen, "unknown field '%.64s'", item->string ? item->string : "?");
      return -1;
    }
  }
  return 0;
}

bool zg_sha256_hex_valid(const char *s) {
  if (strlen(s) != 64) return false;
  for (; *s; s++)
    if (!isxdigit((unsigned char)*s)) return false;
  return true;
}

void zg_random_id(const char *prefix, char *out, size_t outlen) {
  uint8_t raw[4] = {0};
  (void)zg_random_bytes(raw, sizeof raw);
  snprintf(out, outlen, "%s%02x%02x%02x%02x", prefix, raw[0], raw[1], raw[2], raw[3]);
}

/* Validates a token's fields (shared by token.create and cluster.seed). */
/* The optional "allow" field of a token: absent, null, or an array of at
 * most MAX_ALLOW CIDR strings. 0, or -1 with err naming the bad element. */
int zg_check_allow(const cJSON *args, char *err, size_t errlen) {
  const cJSON *allow = cJSON_GetObjectItemCaseSensitive(args, "allow");
  if (allow == NULL || cJSON_IsNull(allow)) return 0;
  if (!cJSON_IsArray(allow) || cJSON_GetArraySize(allow) > MAX_ALLOW) {
    snprintf(err, errlen, "field 'allow' must be an array of at most %d CIDR strings", MAX_ALLOW);
    return -1;
  }
  int i = 0;
  const cJSON *c;
  cJSON_ArrayForEach(c, allow) {
    if (!cJSON_IsString(c) || !zg_cidr_valid(c->valuestring)) {
      snprintf(err, errlen, "field 'allow[%d]' is not a valid CIDR (e.g. 10.0.0.0/8)", i);
      return -1;
    }
    i++;
  }
  return 0;
}

int zg_validate_token_args(const cJSON *args, bool need_id, char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  if (need_id &&
      (zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen) || !zg_id_valid(s))) {
    if (s) snprintf(err, errlen, "field 'id' must use A-Z a-z 0-9 . _ -");
    return -1;
  }
  if (zg_arg_string(args, "name", true, MAX_NAME_LEN, &s, err, errlen)) return -1;
  if (zg_arg_string(args, "sha256", true, 64, &s, err, errlen)) return -1;
  if (!zg_sha256_hex_valid(s)) {
    snprintf(err, errlen, "field 'sha256' must be 64 hex characters (SHA-256 of the token)");
    return -1;
  }
  if (zg_arg_uint(args, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) return -1;
  if (zg_arg_uint(args, "rpm", false, 0, 100000000ull, 0, &u, err, errlen)) return -1;
  if (zg_arg_uint(args, "tpm", false, 0, ZG_TOKEN_LIMIT_MAX, 0, &u, err, errlen) ||
      zg_arg_uint(args, "budget_day", false, 0, ZG_TOKEN_LIMIT_MAX, 0, &u, err, errlen) ||
      zg_arg_uint(args, "budget_month", false, 0, ZG_TOKEN_LIMIT_MAX, 0, &u, err, errlen))
    return -1;
  return zg_check_allow(args, err, errlen);
}

void zg_lower_hex_field(cJSON *args, const char *name) {
  cJSON *item = cJSON_GetObjectItemCaseSensitive(args, name);
  if (cJSON_IsString(item))
    for (char *p = item->valuestring; *p; p++) *p = (char)tolower((unsigned char)*p);
}

int zg_seal_secret_into(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *secret;
  if (zg_arg_string(args, "secret", true, MAX_SECRET_LEN, &secret, err, errlen)) return -1;
  char *sealed = NULL;
  if (zg_seal(master_key, SECRET_PURPOSE, secret, strlen(secret), &sealed, err, errlen)) return -1;
  cJSON *item = cJSON_GetObjectItemCaseSensitive(args, "secret");
  memset(item->valuestring, 0, strlen(item->valuestring));
  cJSON_DeleteItemFromObjectCaseSensitive(args, "secret");
  cJSON_AddStringToObject(args, "sealed", sealed);
  free(sealed);
  return 0;
}

int zg_parse_token(const cJSON *j, uint64_t created_at, struct zg_token *t, char *err,
                   size_t errlen) {
  memset(t, 0, sizeof *t);
  if (zg_validate_token_args(j, true, err, errlen)) return -1;
  uint64_t u;
  snprintf(t->id, sizeof t->id, "%s", cJSON_GetObjectItemCaseSensitive(j, "id")->valuestring);
  t->name = strdup(cJSON_GetObjectItemCaseSensitive(j, "name")->valuestring);
  snprintf(t->sha256, sizeof t->sha256, "%s",
           cJSON_GetObjectItemCaseSensitive(j, "sha256")->valuestring);
  for (char *p = t->sha256; *p; p++) *p = (char)tolower((unsigned char)*p);
  zg_arg_uint(j, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, errlen);
  t->expires_at = u;
  zg_arg_uint(j, "rpm", false, 0, 100000000ull, 0, &u, err, errlen);
  t->rpm = (unsigned)u;
  (void)zg_token_limits_parse(j, t, err, errlen); /* validated above */
  t->created_at = created_at;
  if (zg_arg_uint(j, "created_at", false, 0, 9000000000000000ull, created_at, &u, err, errlen)) {
    zg_token_free(t);
    return -1;
  }
  t->created_at = u;
  const cJSON *allow = cJSON_GetObjectItemCaseSensitive(j, "allow");
  int n = cJSON_IsArray(allow) ? cJSON_GetArraySize(allow) : 0;
  if (n > 0) {
    t->allow = calloc((size_t)n, sizeof *t->allow);
    const cJSON *c;
    cJSON_ArrayForEach(c, allow) {
      if (t->allow) t->allow[t->n_allow++] = strdup(c->valuestring);
    }
  }
  if (t->name == NULL || (n > 0 && t->allow == NULL)) {
    zg_token_free(t);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  return 0;
}

int zg_token_limits_parse(const cJSON *args, struct zg_token *t, char *err, size_t errlen) {
  static const struct {
    const char *name;
    uint64_t max;
  } fields[] = {{"rpm", 100000000ull},
                {"tpm", ZG_TOKEN_LIMIT_MAX},
                {"budget_day", ZG_TOKEN_LIMIT_MAX},
                {"budget_month", ZG_TOKEN_LIMIT_MAX}};
  uint64_t v[4];
  for (size_t i = 0; i < 4; i++) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(args, fields[i].name);
    v[i] = UINT64_MAX; /* absent: unchanged */
    if (item == NULL || cJSON_IsNull(item)) continue;
    if (zg_arg_uint(args, fields[i].name, false, 0, fields[i].max, 0, &v[i], err, errlen))
      return -1;
  }
  if (v[0] != UINT64_MAX) t->rpm = (unsigned)v[0];
  if (v[1] != UINT64_MAX) t->tpm = v[1];
  if (v[2] != UINT64_MAX) t->budget_day = v[2];
  if (v[3] != UINT64_MAX) t->budget_month = v[3];
  return 0;
}

/* Caches the token's snapshot JSON (token.update replaces it). */
int zg_token_cache_text(struct zg_token *t) {
  t->snap_text = zg_comma_text(zg_token_to_json(t, true), &t->snap_len);
  return t->snap_text ? 0 : -1;
}

int zg_parse_key(const cJSON *j, struct zg_key *k, char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  memset(k, 0, sizeof *k);
  if (zg_arg_string(j, "id", true, MAX_ID_LEN, &s, err, errlen)) return -1;
  if (!zg_id_valid(s)) {
    snprintf(err, errlen, "field 'id' has invalid characters");
    return -1;
  }
  snprintf(k->id, sizeof k->id, "%s", s);
  if (zg_arg_string(j, "upstream", true, MAX_NAME_LEN, &s, err, errlen)) return -1;
  k->upstream = strdup(s);
  if (zg_arg_string(j, "sealed", true, 4 * MAX_SECRET_LEN, &s, err, errlen)) goto bad;
  k->sealed = strdup(s);
  if (zg_arg_uint(j, "rotate_after_days", false, 0, 3650, 90, &u, err, errlen)) goto bad;
  k->rotate_after_days = (unsigned)u;
  if (zg_arg_uint(j, "created_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) goto bad;
  k->created_at = u;
  if (zg_arg_uint(j, "retire_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) goto bad;
  k->retire_at = u;
  if (zg_arg_string(j, "reason", false, 512, &s, err, errlen)) goto bad;
  if (s) k->reason = strdup(s);
  if (zg_arg_string(j, "state", false, 16, &s, err, errlen)) goto bad;
  k->state = ZG_KEY_ACTIVE;
  if (s != NULL) {
    size_t i;
    for (i = 0; i < ZG_ARRAY_LEN(zg_key_state_names); i++)
      if (strcmp(s, zg_key_state_names[i]) == 0) break;
    if (i == ZG_ARRAY_LEN(zg_key_state_names)) {
      snprintf(err, errlen, "field 'state' is not one of active/retiring/revoked/invalid");
      goto bad;
    }
    k->state = (enum zg_key_state)i;
  }
  if (k->upstream == NULL || k->sealed == NULL) {
    snprintf(err, errlen, "out of memory");
    goto bad;
  }
  return 0;
bad:
  zg_key_free(k);
  return -1;
}
