/* fsm.c: the replicated state machine (config, provider keys, client tokens,
 * audit trail), its raft_fsm glue, snapshots and the leader-side validation
 * of writes.
 *
 * Apply is deterministic: every value that differs between nodes (time, ids,
 * sealed secrets) is chosen by the leader before the entry enters the log.
 * A write that is invalid against the current state (unknown id, If-Match
 * mismatch) is applied as a no-op with an error result. An entry that cannot
 * be decoded is logged, counted and skipped; apply never fails raft.
 * Snapshots are one JSON document behind a binary header; restore validates
 * the whole document into a new state before it replaces the current one.
 * Per-write work does not grow with the state: tokens are found through hash
 * indexes, and every token and audit record keeps its snapshot JSON text, so
 * taking a snapshot only lays out buffers that point at those texts.
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

#define SNAP_MAGIC "ZGSN"
#define SNAP_VERSION 1
#define SNAP_HEADER_LEN 16
#define SECRET_PURPOSE "provider-key"
#define MAX_ID_LEN 47
#define MAX_NAME_LEN 128
#define MAX_SECRET_LEN 8192
#define MAX_ALLOW 64
#define MAX_GRACE_SECONDS (365u * 86400u)

static const char *const key_state_names[] = {"active", "retiring", "revoked", "invalid"};

/* ---- state helpers ----------------------------------------------------- */

#define INDEX_EMPTY 0u
#define INDEX_DELETED UINT32_MAX
#define INDEX_MIN_BUCKETS 64u
#define COMPACT_MIN_DEAD 64u

static void key_free(struct zg_key *k) {
  free(k->upstream);
  free(k->sealed);
  free(k->reason);
  memset(k, 0, sizeof *k);
}

static void token_free(struct zg_token *t) {
  free(t->name);
  for (size_t i = 0; i < t->n_allow; i++) free(t->allow[i]);
  free(t->allow);
  free(t->snap_text);
  memset(t, 0, sizeof *t);
}

static bool token_live(const struct zg_token *t) {
  return t->id[0] != '\0';
}

/* A cached text is no longer part of the state. While a snapshot borrows
 * the texts it is parked until snapshot_finalize; `f` NULL: never borrowed. */
static void text_drop(struct zg_fsm *f, char *text) {
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

static void state_free(struct zg_state *st) {
  cJSON_Delete(st->config);
  for (size_t i = 0; i < st->n_keys; i++) key_free(&st->keys[i]);
  free(st->keys);
  for (size_t i = 0; i < st->n_token_slots; i++) token_free(&st->tokens[i]);
  free(st->tokens);
  free(st->token_by_sha);
  free(st->token_by_id);
  for (size_t i = 0; i < st->n_audit; i++)
    free(st->audit[(st->audit_head + i) % st->audit_cap].text);
  free(st->audit);
  memset(st, 0, sizeof *st);
}

/* Frees a state whose texts a pending snapshot of `f` may still borrow. */
static void state_discard(struct zg_fsm *f, struct zg_state *st) {
  for (size_t i = 0; i < st->n_token_slots; i++) {
    text_drop(f, st->tokens[i].snap_text);
    st->tokens[i].snap_text = NULL;
  }
  for (size_t i = 0; i < st->n_audit; i++) {
    struct zg_audit_rec *r = &st->audit[(st->audit_head + i) % st->audit_cap];
    text_drop(f, r->text);
    r->text = NULL;
  }
  state_free(st);
}

static int state_init(struct zg_state *st, size_t audit_cap) {
  memset(st, 0, sizeof *st);
  st->audit_cap = audit_cap ? audit_cap : 1;
  st->audit = calloc(st->audit_cap, sizeof *st->audit);
  return st->audit ? 0 : -1;
}

/* Prints `o` (consumed) as ",{...}" for the snapshot arrays. NULL on ENOMEM. */
static char *comma_text(cJSON *o, size_t *len) {
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
static void audit_push(struct zg_fsm *f, struct zg_state *st, char *text, size_t len) {
  if (st->n_audit == st->audit_cap) {
    text_drop(f, st->audit[st->audit_head].text);
    st->audit[st->audit_head] = (struct zg_audit_rec){text, len};
    st->audit_head = (st->audit_head + 1) % st->audit_cap;
    return;
  }
  st->audit[(st->audit_head + st->n_audit) % st->audit_cap] = (struct zg_audit_rec){text, len};
  st->n_audit++;
}

static struct zg_key *key_find(struct zg_state *st, const char *id) {
  for (size_t i = 0; i < st->n_keys; i++)
    if (strcmp(st->keys[i].id, id) == 0) return &st->keys[i];
  return NULL;
}

/* Inserts a copy of *k at position `at` (0 = highest priority) or the end. */
static int key_insert(struct zg_state *st, const struct zg_key *k, bool first) {
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
static long token_index_find(const struct zg_state *st, bool by_sha, const char *key) {
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
static int token_reindex(struct zg_state *st, bool compact) {
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
      if (token_live(&st->tokens[i])) st->tokens[live++] = st->tokens[i];
    st->n_token_slots = live;
  }
  for (size_t i = 0; i < st->n_token_slots; i++) {
    const struct zg_token *t = &st->tokens[i];
    if (!token_live(t)) continue;
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
  long i = token_index_find(st, true, sha256);
  return i < 0 ? NULL : &st->tokens[i];
}

/* Appends *t (ownership taken on success); the caller checked uniqueness. */
static int token_append(struct zg_state *st, const struct zg_token *t) {
  if (st->n_token_slots >= UINT32_MAX - 2) return -1;
  if (st->n_token_slots == st->token_cap) {
    size_t cap = st->token_cap ? 2 * st->token_cap : 16;
    struct zg_token *grown = realloc(st->tokens, cap * sizeof *grown);
    if (grown == NULL) return -1;
    st->tokens = grown;
    st->token_cap = cap;
  }
  if ((st->token_buckets_used + 1) * 2 > st->token_buckets && token_reindex(st, false)) return -1;
  size_t slot = st->n_token_slots++;
  st->tokens[slot] = *t;
  index_put(st->token_by_sha, st->token_buckets, t->sha256, (uint32_t)slot + 1);
  index_put(st->token_by_id, st->token_buckets, t->id, (uint32_t)slot + 1);
  st->token_buckets_used++;
  st->n_tokens++;
  return 0;
}

/* Revokes the token in `slot`; its cached text goes through text_drop. */
static void token_remove(struct zg_fsm *f, struct zg_state *st, size_t slot) {
  struct zg_token *t = &st->tokens[slot];
  index_remove(st->token_by_sha, st->token_buckets, t->sha256, (uint32_t)slot + 1);
  index_remove(st->token_by_id, st->token_buckets, t->id, (uint32_t)slot + 1);
  text_drop(f, t->snap_text);
  t->snap_text = NULL;
  token_free(t); /* id "" marks the slot dead */
  st->n_tokens--;
  size_t dead = st->n_token_slots - st->n_tokens;
  if (dead >= COMPACT_MIN_DEAD && dead > st->n_tokens) (void)token_reindex(st, true);
}

/* ---- JSON views -------------------------------------------------------- */

static cJSON *key_to_json(const struct zg_key *k, bool with_sealed, uint64_t now_ms) {
  cJSON *o = cJSON_CreateObject();
  if (o == NULL) return NULL;
  cJSON_AddStringToObject(o, "id", k->id);
  cJSON_AddStringToObject(o, "upstream", k->upstream);
  cJSON_AddStringToObject(o, "state", key_state_names[k->state]);
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

static cJSON *token_to_json(const struct zg_token *t, bool with_hash) {
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
  cJSON *allow = cJSON_AddArrayToObject(o, "allow");
  for (size_t i = 0; allow && i < t->n_allow; i++)
    cJSON_AddItemToArray(allow, cJSON_CreateString(t->allow[i]));
  return o;
}

cJSON *zg_state_keys_json(const struct zg_state *st, uint64_t now_ms) {
  cJSON *arr = cJSON_CreateArray();
  for (size_t i = 0; arr && i < st->n_keys; i++)
    cJSON_AddItemToArray(arr, key_to_json(&st->keys[i], false, now_ms));
  return arr;
}

cJSON *zg_state_tokens_json(const struct zg_state *st) {
  cJSON *arr = cJSON_CreateArray();
  for (size_t i = 0; arr && i < st->n_token_slots; i++)
    if (token_live(&st->tokens[i])) cJSON_AddItemToArray(arr, token_to_json(&st->tokens[i], false));
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

static bool id_valid(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > MAX_ID_LEN) return false;
  for (; *s; s++)
    if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && *s != '.') return false;
  return true;
}

/* Reads an optional/required string field; NULL *out if absent. */
static int arg_string(const cJSON *args, const char *name, bool required, size_t max_len,
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

static int arg_uint(const cJSON *args, const char *name, bool required, uint64_t min, uint64_t max,
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

static int arg_bool(const cJSON *args, const char *name, bool dflt, bool *out, char *err,
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

static int check_known_fields(const cJSON *args, const char *const *known, char *err,
                              size_t errlen) {
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

static bool sha256_hex_valid(const char *s) {
  if (strlen(s) != 64) return false;
  for (; *s; s++)
    if (!isxdigit((unsigned char)*s)) return false;
  return true;
}

static void random_id(const char *prefix, char *out, size_t outlen) {
  uint8_t raw[4] = {0};
  (void)zg_random_bytes(raw, sizeof raw);
  snprintf(out, outlen, "%s%02x%02x%02x%02x", prefix, raw[0], raw[1], raw[2], raw[3]);
}

/* Validates a token's fields (shared by token.create and cluster.seed). */
static int validate_token_args(const cJSON *args, bool need_id, char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  if (need_id && (arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen) || !id_valid(s))) {
    if (s) snprintf(err, errlen, "field 'id' must use A-Z a-z 0-9 . _ -");
    return -1;
  }
  if (arg_string(args, "name", true, MAX_NAME_LEN, &s, err, errlen)) return -1;
  if (arg_string(args, "sha256", true, 64, &s, err, errlen)) return -1;
  if (!sha256_hex_valid(s)) {
    snprintf(err, errlen, "field 'sha256' must be 64 hex characters (SHA-256 of the token)");
    return -1;
  }
  if (arg_uint(args, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) return -1;
  if (arg_uint(args, "rpm", false, 0, 100000000ull, 0, &u, err, errlen)) return -1;
  const cJSON *allow = cJSON_GetObjectItemCaseSensitive(args, "allow");
  if (allow != NULL && !cJSON_IsNull(allow)) {
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
  }
  return 0;
}

static void lower_hex_field(cJSON *args, const char *name) {
  cJSON *item = cJSON_GetObjectItemCaseSensitive(args, name);
  if (cJSON_IsString(item))
    for (char *p = item->valuestring; *p; p++) *p = (char)tolower((unsigned char)*p);
}

static int seal_secret_into(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *secret;
  if (arg_string(args, "secret", true, MAX_SECRET_LEN, &secret, err, errlen)) return -1;
  char *sealed = NULL;
  if (zg_seal(master_key, SECRET_PURPOSE, secret, strlen(secret), &sealed, err, errlen)) return -1;
  cJSON *item = cJSON_GetObjectItemCaseSensitive(args, "secret");
  memset(item->valuestring, 0, strlen(item->valuestring));
  cJSON_DeleteItemFromObjectCaseSensitive(args, "secret");
  cJSON_AddStringToObject(args, "sealed", sealed);
  free(sealed);
  return 0;
}

cJSON *zg_prepare_args(int type, cJSON *args, const uint8_t master_key[32], char *err,
                       size_t errlen) {
  const char *s;
  uint64_t u;
  bool b;
  char id[48];
  if (args == NULL) args = cJSON_CreateObject();
  if (!cJSON_IsObject(args)) {
    snprintf(err, errlen, "arguments must be a JSON object");
    goto fail;
  }
  switch (type) {
  case ZGC_CONFIG_PUT: {
    static const char *const known[] = {"config", "if_match", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(args, "config"))) {
      snprintf(err, errlen, "field 'config' is required (a JSON object)");
      goto fail;
    }
    if (arg_uint(args, "if_match", false, 0, 9000000000000000ull, 0, &u, err, errlen)) goto fail;
    return args;
  }
  case ZGC_KEY_ADD: {
    static const char *const known[] = {"id",      "upstream", "secret", "rotate_after_days",
                                        "primary", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (arg_string(args, "id", false, MAX_ID_LEN, &s, err, errlen)) goto fail;
    if (s != NULL && !id_valid(s)) {
      snprintf(err, errlen, "field 'id' must be 1..%d of A-Z a-z 0-9 . _ -", MAX_ID_LEN);
      goto fail;
    }
    if (s == NULL) {
      random_id("key-", id, sizeof id);
      cJSON_AddStringToObject(args, "id", id);
    }
    if (arg_string(args, "upstream", false, MAX_NAME_LEN, &s, err, errlen)) goto fail;
    if (s == NULL) {
      cJSON_DeleteItemFromObjectCaseSensitive(args, "upstream");
      cJSON_AddStringToObject(args, "upstream", "default");
    } else if (*s == '\0') {
      snprintf(err, errlen, "field 'upstream' must not be empty");
      goto fail;
    }
    if (arg_uint(args, "rotate_after_days", false, 0, 3650, 90, &u, err, errlen)) goto fail;
    cJSON_DeleteItemFromObjectCaseSensitive(args, "rotate_after_days");
    cJSON_AddNumberToObject(args, "rotate_after_days", (double)u);
    if (arg_bool(args, "primary", true, &b, err, errlen)) goto fail;
    cJSON_DeleteItemFromObjectCaseSensitive(args, "primary");
    cJSON_AddBoolToObject(args, "primary", b);
    if (seal_secret_into(args, master_key, err, errlen)) goto fail;
    return args;
  }
  case ZGC_KEY_ROTATE: {
    static const char *const known[] = {"id", "secret", "grace_seconds", "new_id", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen)) goto fail;
    if (arg_string(args, "new_id", false, MAX_ID_LEN, &s, err, errlen)) goto fail;
    if (s != NULL && !id_valid(s)) {
      snprintf(err, errlen, "field 'new_id' must be 1..%d of A-Z a-z 0-9 . _ -", MAX_ID_LEN);
      goto fail;
    }
    if (s == NULL) {
      random_id("key-", id, sizeof id);
      cJSON_AddStringToObject(args, "new_id", id);
    }
    if (arg_uint(args, "grace_seconds", false, 0, MAX_GRACE_SECONDS, 86400, &u, err, errlen))
      goto fail;
    cJSON_DeleteItemFromObjectCaseSensitive(args, "grace_seconds");
    cJSON_AddNumberToObject(args, "grace_seconds", (double)u);
    if (seal_secret_into(args, master_key, err, errlen)) goto fail;
    return args;
  }
  case ZGC_KEY_REVOKE:
  case ZGC_TOKEN_REVOKE: {
    static const char *const known[] = {"id", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen)) goto fail;
    return args;
  }
  case ZGC_KEY_INVALIDATE: {
    static const char *const known[] = {"id", "reason", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen)) goto fail;
    if (arg_string(args, "reason", false, 512, &s, err, errlen)) goto fail;
    return args;
  }
  case ZGC_TOKEN_CREATE: {
    static const char *const known[] = {"name", "sha256", "expires_at", "rpm", "allow", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    lower_hex_field(args, "sha256");
    if (validate_token_args(args, false, err, errlen)) goto fail;
    random_id("tok-", id, sizeof id);
    cJSON_AddStringToObject(args, "id", id);
    return args;
  }
  case ZGC_AUDIT_NOTE: {
    static const char *const known[] = {"what", NULL};
    if (check_known_fields(args, known, err, errlen)) goto fail;
    if (arg_string(args, "what", true, 1024, &s, err, errlen)) goto fail;
    return args;
  }
  case ZGC_CLUSTER_SEED: {
    cJSON *tokens = cJSON_GetObjectItemCaseSensitive(args, "tokens");
    cJSON *t;
    int i = 0;
    cJSON_ArrayForEach(t, tokens) {
      lower_hex_field(t, "sha256");
      if (validate_token_args(t, false, err, errlen)) {
        char inner[200];
        snprintf(inner, sizeof inner, "%s", err);
        snprintf(err, errlen, "seed token %d: %s", i, inner);
        goto fail;
      }
      random_id("tok-", id, sizeof id);
      cJSON_DeleteItemFromObjectCaseSensitive(t, "id");
      cJSON_AddStringToObject(t, "id", id);
      i++;
    }
    return args;
  }
  default:
    snprintf(err, errlen, "unknown write type");
    goto fail;
  }
fail:
  cJSON_Delete(args);
  return NULL;
}

int zg_build_entry(const char *type, cJSON *args, const char *actor, const char *source,
                   uint64_t at, const char *req_id, const uint8_t master_key[32],
                   struct raft_buffer *out, char *err, size_t errlen) {
  int t = strcmp(type, "cluster.seed") == 0 ? ZGC_CLUSTER_SEED : zgc_type_from_name(type);
  if (t == 0) {
    cJSON_Delete(args);
    snprintf(err, errlen, "unknown write type '%.40s'", type);
    return CONSENSUS_EINVALID;
  }
  cJSON *prepared = zg_prepare_args(t, args, master_key, err, errlen);
  if (prepared == NULL) return CONSENSUS_EINVALID;
  struct zgc_command cmd = {
      .type = t, .at = at, .actor = (char *)actor, .source = (char *)source, .args = prepared};
  snprintf(cmd.req_id, sizeof cmd.req_id, "%s", req_id ? req_id : "");
  int rv = zgc_encode(&cmd, out, err, errlen);
  cJSON_Delete(prepared);
  return rv == 0 ? 0 : CONSENSUS_EINVALID;
}

/* ---- apply --------------------------------------------------------------- */

struct apply_out {
  int status;
  char errmsg[256];
  cJSON *result;
  unsigned changed;
  const char *target; /* points into args or state; used for the audit record */
  char detail[160];
};

static int fail(struct apply_out *o, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct apply_out *o, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(o->errmsg, sizeof o->errmsg, fmt, ap);
  va_end(ap);
  o->status = status;
  return status;
}

static int parse_token(const cJSON *j, uint64_t created_at, struct zg_token *t, char *err,
                       size_t errlen) {
  memset(t, 0, sizeof *t);
  if (validate_token_args(j, true, err, errlen)) return -1;
  uint64_t u;
  snprintf(t->id, sizeof t->id, "%s", cJSON_GetObjectItemCaseSensitive(j, "id")->valuestring);
  t->name = strdup(cJSON_GetObjectItemCaseSensitive(j, "name")->valuestring);
  snprintf(t->sha256, sizeof t->sha256, "%s",
           cJSON_GetObjectItemCaseSensitive(j, "sha256")->valuestring);
  for (char *p = t->sha256; *p; p++) *p = (char)tolower((unsigned char)*p);
  arg_uint(j, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, errlen);
  t->expires_at = u;
  arg_uint(j, "rpm", false, 0, 100000000ull, 0, &u, err, errlen);
  t->rpm = (unsigned)u;
  t->created_at = created_at;
  if (arg_uint(j, "created_at", false, 0, 9000000000000000ull, created_at, &u, err, errlen)) {
    token_free(t);
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
    token_free(t);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  return 0;
}

/* Caches the token's snapshot JSON (it never changes afterwards). */
static int token_cache_text(struct zg_token *t) {
  t->snap_text = comma_text(token_to_json(t, true), &t->snap_len);
  return t->snap_text ? 0 : -1;
}

static int apply_token_create(struct zg_state *st, const cJSON *args, uint64_t at,
                              struct apply_out *o) {
  struct zg_token t;
  char err[200];
  if (parse_token(args, at, &t, err, sizeof err)) return fail(o, CONSENSUS_EINVALID, "%s", err);
  t.created_at = at;
  if (token_index_find(st, false, t.id) >= 0 || token_index_find(st, true, t.sha256) >= 0) {
    token_free(&t);
    return fail(o, CONSENSUS_ECONFLICT, "a token with this id or hash already exists");
  }
  if (token_cache_text(&t) || token_append(st, &t)) {
    token_free(&t);
    return fail(o, CONSENSUS_ENOMEM, "out of memory");
  }
  const struct zg_token *added = &st->tokens[st->n_token_slots - 1];
  o->result = token_to_json(added, false);
  o->target = added->id;
  snprintf(o->detail, sizeof o->detail, "name %.100s", added->name);
  o->changed = ZG_CHANGED_TOKENS;
  return 0;
}

static int parse_key(const cJSON *j, struct zg_key *k, char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  memset(k, 0, sizeof *k);
  if (arg_string(j, "id", true, MAX_ID_LEN, &s, err, errlen)) return -1;
  if (!id_valid(s)) {
    snprintf(err, errlen, "field 'id' has invalid characters");
    return -1;
  }
  snprintf(k->id, sizeof k->id, "%s", s);
  if (arg_string(j, "upstream", true, MAX_NAME_LEN, &s, err, errlen)) return -1;
  k->upstream = strdup(s);
  if (arg_string(j, "sealed", true, 4 * MAX_SECRET_LEN, &s, err, errlen)) goto bad;
  k->sealed = strdup(s);
  if (arg_uint(j, "rotate_after_days", false, 0, 3650, 90, &u, err, errlen)) goto bad;
  k->rotate_after_days = (unsigned)u;
  if (arg_uint(j, "created_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) goto bad;
  k->created_at = u;
  if (arg_uint(j, "retire_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) goto bad;
  k->retire_at = u;
  if (arg_string(j, "reason", false, 512, &s, err, errlen)) goto bad;
  if (s) k->reason = strdup(s);
  if (arg_string(j, "state", false, 16, &s, err, errlen)) goto bad;
  k->state = ZG_KEY_ACTIVE;
  if (s != NULL) {
    size_t i;
    for (i = 0; i < ZG_ARRAY_LEN(key_state_names); i++)
      if (strcmp(s, key_state_names[i]) == 0) break;
    if (i == ZG_ARRAY_LEN(key_state_names)) {
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
  key_free(k);
  return -1;
}

static int apply_key_add(struct zg_state *st, const cJSON *args, const char *id_field,
                         const char *upstream, unsigned rotate_days, uint64_t at, bool primary,
                         struct apply_out *o) {
  cJSON *copy = cJSON_Duplicate(args, true);
  if (copy == NULL) return fail(o, CONSENSUS_ENOMEM, "out of memory");
  /* Normalise into the snapshot shape, then parse with the same code. */
  if (strcmp(id_field, "id") != 0) {
    cJSON_DeleteItemFromObjectCaseSensitive(copy, "id");
    const cJSON *nid = cJSON_GetObjectItemCaseSensitive(args, id_field);
    cJSON_AddStringToObject(copy, "id", cJSON_IsString(nid) ? nid->valuestring : "");
  }
  if (upstream) {
    cJSON_DeleteItemFromObjectCaseSensitive(copy, "upstream");
    cJSON_AddStringToObject(copy, "upstream", upstream);
  }
  if (rotate_days) {
    cJSON_DeleteItemFromObjectCaseSensitive(copy, "rotate_after_days");
    cJSON_AddNumberToObject(copy, "rotate_after_days", rotate_days);
  }
  cJSON_DeleteItemFromObjectCaseSensitive(copy, "state");
  cJSON_DeleteItemFromObjectCaseSensitive(copy, "retire_at");
  cJSON_DeleteItemFromObjectCaseSensitive(copy, "created_at");
  struct zg_key k;
  char err[200];
  int rv = parse_key(copy, &k, err, sizeof err);
  cJSON_Delete(copy);
  if (rv) return fail(o, CONSENSUS_EINVALID, "%s", err);
  k.created_at = at;
  if (key_find(st, k.id) != NULL) {
    key_free(&k);
    return fail(o, CONSENSUS_ECONFLICT, "key '%s' already exists", k.id);
  }
  if (key_insert(st, &k, primary)) {
    key_free(&k);
    return fail(o, CONSENSUS_ENOMEM, "out of memory");
  }
  return 0;
}

static int apply_command(struct zg_fsm *f, const struct zgc_command *cmd, struct apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
  const char *s;
  uint64_t u;
  char err[200];
  switch (cmd->type) {
  case ZGC_CONFIG_PUT: {
    const cJSON *config = cJSON_GetObjectItemCaseSensitive(args, "config");
    if (!cJSON_IsObject(config)) return fail(o, CONSENSUS_EINVALID, "field 'config' is required");
    const cJSON *if_match = cJSON_GetObjectItemCaseSensitive(args, "if_match");
    uint64_t wanted = 0;
    if (arg_uint(args, "if_match", false, 0, 9000000000000000ull, 0, &wanted, err, sizeof err))
      return fail(o, CONSENSUS_EINVALID, "%s", err);
    if (if_match != NULL && !cJSON_IsNull(if_match) && wanted != st->config_version)
      return fail(o, CONSENSUS_ECONFLICT, "config version is %llu, If-Match asked for %llu",
                  (unsigned long long)st->config_version, (unsigned long long)wanted);
    cJSON *copy = cJSON_Duplicate(config, true);
    if (copy == NULL) return fail(o, CONSENSUS_ENOMEM, "out of memory");
    cJSON_Delete(st->config);
    st->config = copy;
    st->config_version++;
    o->result = cJSON_CreateObject();
    cJSON_AddNumberToObject(o->result, "version", (double)st->config_version);
    o->target = "config";
    snprintf(o->detail, sizeof o->detail, "version %llu", (unsigned long long)st->config_version);
    o->changed = ZG_CHANGED_CONFIG;
    return 0;
  }
  case ZGC_KEY_ADD: {
    bool primary = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(args, "primary"));
    if (apply_key_add(st, args, "id", NULL, 0, cmd->at, primary, o)) return o->status;
    const struct zg_key *k =
        key_find(st, cJSON_GetObjectItemCaseSensitive(args, "id")->valuestring);
    o->result = key_to_json(k, false, cmd->at);
    o->target = k->id;
    snprintf(o->detail, sizeof o->detail, "upstream %.100s%s", k->upstream,
             primary ? ", primary" : "");
    o->changed = ZG_CHANGED_KEYS;
    return 0;
  }
  case ZGC_KEY_ROTATE: {
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, sizeof err) ||
        arg_uint(args, "grace_seconds", false, 0, MAX_GRACE_SECONDS, 86400, &u, err, sizeof err))
      return fail(o, CONSENSUS_EINVALID, "%s", err);
    struct zg_key *old = key_find(st, s);
    if (old == NULL) return fail(o, CONSENSUS_ENOTFOUND, "key '%s' not found", s);
    if (old->state != ZG_KEY_ACTIVE)
      return fail(o, CONSENSUS_EINVALID, "key '%s' is %s; only an active key can be rotated", s,
                  key_state_names[old->state]);
    char old_id[48], *upstream = strdup(old->upstream);
    snprintf(old_id, sizeof old_id, "%s", old->id);
    unsigned days = old->rotate_after_days;
    if (upstream == NULL) return fail(o, CONSENSUS_ENOMEM, "out of memory");
    int rv = apply_key_add(st, args, "new_id", upstream, days, cmd->at, true, o);
    free(upstream);
    if (rv) return rv;
    old = key_find(st, old_id); /* array moved */
    old->state = ZG_KEY_RETIRING;
    old->retire_at = cmd->at + u * 1000u;
    const struct zg_key *nk = &st->keys[0];
    o->result = key_to_json(nk, false, cmd->at);
    cJSON_AddStringToObject(o->result, "replaces", old_id);
    o->target = nk->id;
    snprintf(o->detail, sizeof o->detail, "replaces %s, grace %llus", old_id,
             (unsigned long long)u);
    o->changed = ZG_CHANGED_KEYS;
    return 0;
  }
  case ZGC_KEY_REVOKE:
  case ZGC_KEY_INVALIDATE: {
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, sizeof err))
      return fail(o, CONSENSUS_EINVALID, "%s", err);
    struct zg_key *k = key_find(st, s);
    if (k == NULL) return fail(o, CONSENSUS_ENOTFOUND, "key '%s' not found", s);
    if (cmd->type == ZGC_KEY_REVOKE) {
      k->state = ZG_KEY_REVOKED;
      k->retire_at = 0;
      snprintf(o->detail, sizeof o->detail, "revoked");
    } else {
      const char *reason = NULL;
      if (arg_string(args, "reason", false, 512, &reason, err, sizeof err))
        return fail(o, CONSENSUS_EINVALID, "%s", err);
      if (k->state != ZG_KEY_REVOKED) k->state = ZG_KEY_INVALID;
      free(k->reason);
      k->reason = reason ? strdup(reason) : NULL;
      snprintf(o->detail, sizeof o->detail, "invalid: %.120s", reason ? reason : "");
    }
    o->result = key_to_json(k, false, cmd->at);
    o->target = k->id;
    o->changed = ZG_CHANGED_KEYS;
    return 0;
  }
  case ZGC_TOKEN_CREATE:
    return apply_token_create(st, args, cmd->at, o);
  case ZGC_TOKEN_REVOKE: {
    if (arg_string(args, "id", true, MAX_ID_LEN, &s, err, sizeof err))
      return fail(o, CONSENSUS_EINVALID, "%s", err);
    long i = token_index_find(st, false, s);
    if (i < 0) return fail(o, CONSENSUS_ENOTFOUND, "token '%s' not found", s);
    o->result = cJSON_CreateObject();
    cJSON_AddStringToObject(o->result, "id", st->tokens[i].id);
    cJSON_AddStringToObject(o->result, "name", st->tokens[i].name);
    snprintf(o->detail, sizeof o->detail, "name %.100s", st->tokens[i].name);
    token_remove(f, st, (size_t)i);
    o->target = cJSON_GetObjectItemCaseSensitive(o->result, "id")->valuestring;
    o->changed = ZG_CHANGED_TOKENS;
    return 0;
  }
  case ZGC_AUDIT_NOTE: {
    if (arg_string(args, "what", true, 1024, &s, err, sizeof err))
      return fail(o, CONSENSUS_EINVALID, "%s", err);
    snprintf(o->detail, sizeof o->detail, "%s", s);
    o->target = "";
    o->result = cJSON_CreateObject();
    return 0;
  }
  case ZGC_CLUSTER_SEED: {
    o->target = "cluster";
    o->result = cJSON_CreateObject();
    if (st->seeded) {
      cJSON_AddBoolToObject(o->result, "seeded", false);
      snprintf(o->detail, sizeof o->detail, "already seeded");
      return 0;
    }
    const cJSON *config = cJSON_GetObjectItemCaseSensitive(args, "config");
    if (cJSON_IsObject(config) && st->config_version == 0) { /* an operator's config wins */
      cJSON_Delete(st->config);
      st->config = cJSON_Duplicate(config, true);
      st->config_version = 1;
      o->changed |= ZG_CHANGED_CONFIG;
    }
    const cJSON *t;
    int n = 0;
    cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(args, "tokens")) {
      struct apply_out tok = {0};
      if (apply_token_create(st, t, cmd->at, &tok) == 0)
        n++;
      else
        ZG_LOG_WARN("consensus_seed_token_skipped", "seed token skipped: %s", tok.errmsg);
      cJSON_Delete(tok.result);
    }
    if (n) o->changed |= ZG_CHANGED_TOKENS;
    st->seeded = true;
    cJSON_AddBoolToObject(o->result, "seeded", true);
    snprintf(o->detail, sizeof o->detail, "config version %llu, %d tokens",
             (unsigned long long)st->config_version, n);
    return 0;
  }
  default:
    return fail(o, CONSENSUS_EINVALID, "unknown command type %d", cmd->type);
  }
}

static void audit_append(struct zg_fsm *f, const struct zgc_command *cmd,
                         const struct apply_out *o) {
  cJSON *rec = cJSON_CreateObject();
  if (rec == NULL) return;
  f->st.audit_seq++;
  cJSON_AddNumberToObject(rec, "seq", (double)f->st.audit_seq);
  cJSON_AddNumberToObject(rec, "at", (double)cmd->at);
  cJSON_AddStringToObject(rec, "actor", cmd->actor);
  cJSON_AddStringToObject(rec, "source", cmd->source);
  cJSON_AddStringToObject(rec, "action", zgc_type_name(cmd->type));
  cJSON_AddStringToObject(rec, "target", o->target ? o->target : "");
  cJSON_AddStringToObject(rec, "detail", o->detail);
  size_t len = 0;
  char *text = comma_text(rec, &len);
  if (text) audit_push(f, &f->st, text, len);
}

int zg_fsm_apply_buf(struct zg_fsm *f, const void *data, size_t len) {
  struct zgc_command cmd;
  char err[256];
  f->n_applied++;
  if (zgc_decode(data, len, &cmd, err, sizeof err) != 0) {
    f->n_rejected_entries++;
    ZG_LOG_ERROR("consensus_entry_undecodable",
                 "log entry of %zu bytes skipped (%s); this node may run an older version", len,
                 err);
    if (f->on_applied) f->on_applied(f->ud, NULL, CONSENSUS_EINVALID, err, NULL, 0);
    return CONSENSUS_EINVALID;
  }
  struct apply_out o = {0};
  int status = apply_command(f, &cmd, &o);
  if (status == 0) {
    audit_append(f, &cmd, &o);
    o.changed |= ZG_CHANGED_AUDIT;
    if (o.result && cmd.type == ZGC_AUDIT_NOTE)
      cJSON_AddNumberToObject(o.result, "seq", (double)f->st.audit_seq);
  } else {
    cJSON_Delete(o.result);
    o.result = NULL;
    ZG_LOG_INFO("consensus_write_rejected", "%s by %s rejected at apply: %s",
                zgc_type_name(cmd.type), cmd.actor, o.errmsg);
  }
  if (f->on_applied) f->on_applied(f->ud, &cmd, status, o.errmsg, o.result, o.changed);
  cJSON_Delete(o.result);
  zgc_command_free(&cmd);
  return status;
}

/* ---- snapshots ---------------------------------------------------------- */

static char snap_mid[] = "],\"audit\":[";
static char snap_end[] = "]}";

/* Lays the snapshot out as buffers: [0] header + the document up to
 * "tokens":[ (malloc'd: config, scalars and keys are printed here), then
 * every token's cached text, "],"audit":[", every audit record's cached
 * text, "]}". The text buffers borrow from the state (the first element of
 * each array skips its leading comma). Cost: one pass over the arrays, no
 * JSON printing per token. Free with snapshot_parts_free. */
static int snapshot_parts(const struct zg_fsm *f, struct raft_buffer **out, unsigned *n_out) {
  const struct zg_state *st = &f->st;
  size_t n_bufs = 3 + st->n_tokens + st->n_audit;
  if (n_bufs > UINT_MAX) return -1;
  cJSON *doc = cJSON_CreateObject();
  if (doc == NULL) return -1;
  cJSON_AddNumberToObject(doc, "format", SNAP_VERSION);
  if (st->config) /* shares the config's members, copies nothing */
    cJSON_AddItemReferenceToObject(doc, "config", st->config);
  else
    cJSON_AddNullToObject(doc, "config");
  cJSON_AddNumberToObject(doc, "config_version", (double)st->config_version);
  cJSON_AddBoolToObject(doc, "seeded", st->seeded);
  cJSON_AddNumberToObject(doc, "audit_seq", (double)st->audit_seq);
  cJSON *keys = cJSON_AddArrayToObject(doc, "keys");
  for (size_t i = 0; keys && i < st->n_keys; i++)
    cJSON_AddItemToArray(keys, key_to_json(&st->keys[i], true, 0));
  char *head = keys ? cJSON_PrintUnformatted(doc) : NULL;
  cJSON_Delete(doc); /* the config reference is not freed */
  if (head == NULL) return -1;
  size_t head_len = strlen(head); /* ends with '}', replaced by ,"tokens":[ */
  static const char tokens_open[] = ",\"tokens\":[";
  size_t prefix_len = SNAP_HEADER_LEN + head_len - 1 + sizeof tokens_open - 1;
  char *prefix = malloc(prefix_len);
  struct raft_buffer *bufs = malloc(n_bufs * sizeof *bufs);
  if (prefix == NULL || bufs == NULL) {
    free(head);
    free(prefix);
    free(bufs);
    return -1;
  }
  memcpy(prefix + SNAP_HEADER_LEN, head, head_len - 1);
  memcpy(prefix + SNAP_HEADER_LEN + head_len - 1, tokens_open, sizeof tokens_open - 1);
  free(head);
  size_t n = 0;
  uint64_t json_len = prefix_len - SNAP_HEADER_LEN;
  bufs[n++] = (struct raft_buffer){prefix, prefix_len};
  bool first = true;
  for (size_t i = 0; i < st->n_token_slots; i++) {
    const struct zg_token *t = &st->tokens[i];
    if (!token_live(t)) continue;
    bufs[n++] = (struct raft_buffer){t->snap_text + first, t->snap_len - first};
    json_len += t->snap_len - first;
    first = false;
  }
  bufs[n++] = (struct raft_buffer){snap_mid, sizeof snap_mid - 1};
  json_len += sizeof snap_mid - 1;
  for (size_t i = 0; i < st->n_audit; i++) {
    const struct zg_audit_rec *r = &st->audit[(st->audit_head + i) % st->audit_cap];
    bufs[n++] = (struct raft_buffer){r->text + (i == 0), r->len - (i == 0)};
    json_len += r->len - (i == 0);
  }
  bufs[n++] = (struct raft_buffer){snap_end, sizeof snap_end - 1};
  json_len += sizeof snap_end - 1;
  memcpy(prefix, SNAP_MAGIC, 4);
  prefix[4] = SNAP_VERSION;
  prefix[5] = prefix[6] = prefix[7] = 0;
  for (int i = 0; i < 8; i++) prefix[8 + i] = (char)(json_len >> (56 - 8 * i));
  *out = bufs;
  *n_out = (unsigned)n;
  return 0;
}

static void snapshot_parts_free(struct raft_buffer *bufs, unsigned n) {
  if (bufs != NULL && n > 0) free(bufs[0].base); /* only the prefix is owned */
  free(bufs);
}

int zg_fsm_snapshot_bytes(const struct zg_fsm *f, char **out, size_t *out_len) {
  struct raft_buffer *bufs;
  unsigned n;
  if (snapshot_parts(f, &bufs, &n)) return -1;
  size_t total = 0;
  for (unsigned i = 0; i < n; i++) total += bufs[i].len;
  char *buf = malloc(total ? total : 1);
  if (buf == NULL) {
    snapshot_parts_free(bufs, n);
    return -1;
  }
  size_t at = 0;
  for (unsigned i = 0; i < n; i++) {
    memcpy(buf + at, bufs[i].base, bufs[i].len);
    at += bufs[i].len;
  }
  snapshot_parts_free(bufs, n);
  *out = buf;
  *out_len = total;
  return 0;
}

int zg_fsm_restore_bytes(struct zg_fsm *f, const void *data, size_t len, char *err, size_t errlen) {
  const uint8_t *p = data;
  if (data == NULL || len < SNAP_HEADER_LEN || memcmp(p, SNAP_MAGIC, 4) != 0) {
    snprintf(err, errlen, "snapshot: missing or bad header");
    return -1;
  }
  if (p[4] != SNAP_VERSION) {
    snprintf(err, errlen, "snapshot: format version %u not supported (this build reads %d)", p[4],
             SNAP_VERSION);
    return -1;
  }
  uint64_t jlen = 0;
  for (int i = 0; i < 8; i++) jlen = (jlen << 8) | p[8 + i];
  if (jlen != len - SNAP_HEADER_LEN) {
    snprintf(err, errlen, "snapshot: length %llu disagrees with %zu bytes",
             (unsigned long long)jlen, len);
    return -1;
  }
  const char *end = NULL;
  cJSON *doc =
      cJSON_ParseWithLengthOpts((const char *)p + SNAP_HEADER_LEN, (size_t)jlen, &end, false);
  if (doc == NULL || !cJSON_IsObject(doc)) {
    cJSON_Delete(doc);
    snprintf(err, errlen, "snapshot: body is not a JSON object");
    return -1;
  }
  struct zg_state st;
  uint64_t u;
  char inner[200];
  int rv = -1;
  if (state_init(&st, f->audit_max)) {
    cJSON_Delete(doc);
    snprintf(err, errlen, "snapshot: out of memory");
    return -1;
  }
  const cJSON *config = cJSON_GetObjectItemCaseSensitive(doc, "config");
  if (config != NULL && !cJSON_IsNull(config)) {
    if (!cJSON_IsObject(config)) {
      snprintf(err, errlen, "snapshot: 'config' is not an object");
      goto done;
    }
    st.config = cJSON_Duplicate(config, true);
  }
  if (arg_uint(doc, "format", true, SNAP_VERSION, SNAP_VERSION, 0, &u, inner, sizeof inner) ||
      arg_uint(doc, "config_version", true, 0, 9000000000000000ull, 0, &st.config_version, inner,
               sizeof inner) ||
      arg_uint(doc, "audit_seq", true, 0, 9000000000000000ull, 0, &st.audit_seq, inner,
               sizeof inner)) {
    snprintf(err, errlen, "snapshot: %s", inner);
    goto done;
  }
  const cJSON *seeded = cJSON_GetObjectItemCaseSensitive(doc, "seeded");
  st.seeded = cJSON_IsTrue(seeded);
  const cJSON *keys = cJSON_GetObjectItemCaseSensitive(doc, "keys");
  const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(doc, "tokens");
  const cJSON *audit = cJSON_GetObjectItemCaseSensitive(doc, "audit");
  if (!cJSON_IsBool(seeded) || !cJSON_IsArray(keys) || !cJSON_IsArray(tokens) ||
      !cJSON_IsArray(audit)) {
    snprintf(err, errlen, "snapshot: seeded/keys/tokens/audit missing or of the wrong type");
    goto done;
  }
  const cJSON *item;
  int i = 0;
  cJSON_ArrayForEach(item, keys) {
    struct zg_key k;
    if (!cJSON_IsObject(item) || parse_key(item, &k, inner, sizeof inner)) {
      snprintf(err, errlen, "snapshot: keys[%d]: %s", i,
               cJSON_IsObject(item) ? inner : "not an object");
      goto done;
    }
    if (key_find(&st, k.id) != NULL || key_insert(&st, &k, false)) {
      key_free(&k);
      snprintf(err, errlen, "snapshot: keys[%d]: duplicate id", i);
      goto done;
    }
    i++;
  }
  i = 0;
  cJSON_ArrayForEach(item, tokens) {
    struct zg_token t;
    if (!cJSON_IsObject(item) || parse_token(item, 0, &t, inner, sizeof inner)) {
      snprintf(err, errlen, "snapshot: tokens[%d]: %s", i,
               cJSON_IsObject(item) ? inner : "not an object");
      goto done;
    }
    if (token_index_find(&st, false, t.id) >= 0 || token_index_find(&st, true, t.sha256) >= 0 ||
        token_cache_text(&t) || token_append(&st, &t)) {
      token_free(&t);
      snprintf(err, errlen, "snapshot: tokens[%d]: duplicate id or hash", i);
      goto done;
    }
    i++;
  }
  cJSON_ArrayForEach(item, audit) {
    if (!cJSON_IsObject(item)) {
      snprintf(err, errlen, "snapshot: an audit record is not an object");
      goto done;
    }
    size_t text_len = 0;
    char *text = comma_text(cJSON_Duplicate(item, true), &text_len);
    if (text == NULL) {
      snprintf(err, errlen, "snapshot: out of memory");
      goto done;
    }
    audit_push(NULL, &st, text, text_len); /* keeps the newest audit_max */
  }
  state_discard(f, &f->st);
  f->st = st;
  memset(&st, 0, sizeof st);
  rv = 0;
done:
  state_free(&st);
  cJSON_Delete(doc);
  return rv;
}

/* ---- raft_fsm glue ------------------------------------------------------ */

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result) {
  struct zg_fsm *f = fsm->data;
  zg_fsm_apply_buf(f, buf->base, buf->len);
  *result = NULL; /* results travel through on_applied, never through raft */
  return 0;
}

/* fsm version 2: snapshot() runs on the loop and hands raft buffers that
 * borrow the cached texts (no per-token printing, no copy of the state);
 * raft_uv writes them from its threadpool while applies go on; texts the
 * state drops meanwhile are parked (text_drop) until snapshot_finalize,
 * which raft calls after every successful snapshot(), written or not.
 * (libraft 0.22.1 calls a version 3 snapshot_async synchronously right
 * after snapshot(), on the loop, so version 3 would gain nothing.) */
static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs) {
  struct zg_fsm *f = fsm->data;
  if (f->snapshot_pinned) return RAFT_BUSY; /* raft takes one at a time */
  uint64_t started = zg_mono_ms();
  if (snapshot_parts(f, bufs, n_bufs)) return RAFT_NOMEM;
  f->snapshot_pinned = true;
  uint64_t took = zg_mono_ms() - started;
  if (took >= 5)
    ZG_LOG_WARN("consensus_snapshot_slow", "snapshot of %zu tokens took %llu ms on the loop",
                f->st.n_tokens, (unsigned long long)took);
  return 0;
}

static void release_grave(struct zg_fsm *f) {
  for (size_t i = 0; i < f->n_grave; i++) free(f->grave[i]);
  f->n_grave = 0;
}

static int fsm_snapshot_finalize(struct raft_fsm *fsm, struct raft_buffer *bufs[],
                                 unsigned *n_bufs) {
  struct zg_fsm *f = fsm->data;
  snapshot_parts_free(*bufs, *n_bufs);
  *bufs = NULL;
  *n_bufs = 0;
  f->snapshot_pinned = false;
  release_grave(f);
  return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf) {
  struct zg_fsm *f = fsm->data;
  char err[256];
  if (zg_fsm_restore_bytes(f, buf->base, buf->len, err, sizeof err) != 0) {
    ZG_LOG_ERROR("consensus_snapshot_rejected", "%s", err);
    return RAFT_CORRUPT;
  }
  raft_free(buf->base); /* on success the FSM owns the buffer */
  ZG_LOG_INFO("consensus_snapshot_restored", "state restored from a %zu byte snapshot", buf->len);
  if (f->on_applied)
    f->on_applied(f->ud, NULL, 0, "", NULL,
                  ZG_CHANGED_CONFIG | ZG_CHANGED_KEYS | ZG_CHANGED_TOKENS | ZG_CHANGED_AUDIT);
  return 0;
}

void zg_fsm_init(struct zg_fsm *f, unsigned audit_max) {
  memset(f, 0, sizeof *f);
  f->audit_max = audit_max ? audit_max : 1000;
  state_init(&f->st, f->audit_max);
  f->raft.version = 2;
  f->raft.data = f;
  f->raft.apply = fsm_apply;
  f->raft.snapshot = fsm_snapshot;
  f->raft.restore = fsm_restore;
  f->raft.snapshot_finalize = fsm_snapshot_finalize;
  f->raft.snapshot_async = NULL;
}

/* Called once raft has closed (no snapshot is being written any more). */
void zg_fsm_close(struct zg_fsm *f) {
  state_free(&f->st);
  release_grave(f);
  free(f->grave);
  f->grave = NULL;
  f->grave_cap = 0;
  f->snapshot_pinned = false;
}
