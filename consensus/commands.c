/* commands.c: the command table. One row per command type: its number in
 * the entry header, its name (consensus_write's `type` and the audit
 * action), the argument fields it accepts, prepare (leader side: validate,
 * normalise, seal secrets, choose ids; runs once before the entry enters
 * the log) and apply (every node, deterministic: only the entry's content
 * and the state decide the result).
 *
 * Adding a command type: a new number in enum zgc_type (never reuse one),
 * one row in `commands[]`, and its prepare and apply functions. The codec,
 * consensus_write, the audit trail and zg_prepare_args find it through the
 * table.
 *
 * Failure modes: prepare returns -1 with a message naming the field
 * (consensus_write answers CONSENSUS_EINVALID); apply answers
 * CONSENSUS_EINVALID / ENOTFOUND / ECONFLICT / ENOMEM through `fail`, and
 * the state is left as it was.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

static int fail(struct zg_apply_out *o, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct zg_apply_out *o, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(o->errmsg, sizeof o->errmsg, fmt, ap);
  va_end(ap);
  o->status = status;
  return status;
}

static int apply_token_create(struct zg_state *st, const cJSON *args, uint64_t at,
                              struct zg_apply_out *o) {
  struct zg_token t;
  char err[200];
  if (zg_parse_token(args, at, &t, err, sizeof err)) return fail(o, CONSENSUS_EINVALID, "%s", err);
  t.created_at = at;
  if (zg_token_index_find(st, false, t.id) >= 0 || zg_token_index_find(st, true, t.sha256) >= 0) {
    zg_token_free(&t);
    return fail(o, CONSENSUS_ECONFLICT, "a token with this id or hash already exists");
  }
  if (zg_token_cache_text(&t) || zg_token_append(st, &t)) {
    zg_token_free(&t);
    return fail(o, CONSENSUS_ENOMEM, "out of memory");
  }
  const struct zg_token *added = &st->tokens[st->n_token_slots - 1];
  o->result = zg_token_to_json(added, false);
  o->target = added->id;
  snprintf(o->detail, sizeof o->detail, "name %.100s", added->name);
  o->changed = ZG_CHANGED_TOKENS;
  return 0;
}

static int apply_key_add(struct zg_state *st, const cJSON *args, const char *id_field,
                         const char *upstream, unsigned rotate_days, uint64_t at, bool primary,
                         struct zg_apply_out *o) {
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
  int rv = zg_parse_key(copy, &k, err, sizeof err);
  cJSON_Delete(copy);
  if (rv) return fail(o, CONSENSUS_EINVALID, "%s", err);
  k.created_at = at;
  if (zg_key_find(st, k.id) != NULL) {
    zg_key_free(&k);
    return fail(o, CONSENSUS_ECONFLICT, "key '%s' already exists", k.id);
  }
  if (zg_key_insert(st, &k, primary)) {
    zg_key_free(&k);
    return fail(o, CONSENSUS_ENOMEM, "out of memory");
  }
  return 0;
}

/* ---- config.put ---------------------------------------------------------- */

static const char *const config_put_fields[] = {"config", "if_match", NULL};

static int prepare_config_put(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  uint64_t u;
  if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(args, "config"))) {
    snprintf(err, errlen, "field 'config' is required (a JSON object)");
    return -1;
  }
  return zg_arg_uint(args, "if_match", false, 0, 9000000000000000ull, 0, &u, err, errlen);
}

static int apply_config_put(struct zg_fsm *f, const struct zgc_command *cmd,
                            struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
  char err[200];
  const cJSON *config = cJSON_GetObjectItemCaseSensitive(args, "config");
  if (!cJSON_IsObject(config)) return fail(o, CONSENSUS_EINVALID, "field 'config' is required");
  const cJSON *if_match = cJSON_GetObjectItemCaseSensitive(args, "if_match");
  uint64_t wanted = 0;
  if (zg_arg_uint(args, "if_match", false, 0, 9000000000000000ull, 0, &wanted, err, sizeof err))
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

/* ---- key.add ------------------------------------------------------------- */

static const char *const key_add_fields[] = {"id",      "upstream", "secret", "rotate_after_days",
                                             "primary", NULL};

static int prepare_key_add(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  bool b;
  char id[48];
  if (zg_arg_string(args, "id", false, MAX_ID_LEN, &s, err, errlen)) return -1;
  if (s != NULL && !zg_id_valid(s)) {
    snprintf(err, errlen, "field 'id' must be 1..%d of A-Z a-z 0-9 . _ -", MAX_ID_LEN);
    return -1;
  }
  if (s == NULL) {
    zg_random_id("key-", id, sizeof id);
    cJSON_AddStringToObject(args, "id", id);
  }
  if (zg_arg_string(args, "upstream", false, MAX_NAME_LEN, &s, err, errlen)) return -1;
  if (s == NULL) {
    cJSON_DeleteItemFromObjectCaseSensitive(args, "upstream");
    cJSON_AddStringToObject(args, "upstream", "default");
  } else if (*s == '\0') {
    snprintf(err, errlen, "field 'upstream' must not be empty");
    return -1;
  }
  if (zg_arg_uint(args, "rotate_after_days", false, 0, 3650, 90, &u, err, errlen)) return -1;
  cJSON_DeleteItemFromObjectCaseSensitive(args, "rotate_after_days");
  cJSON_AddNumberToObject(args, "rotate_after_days", (double)u);
  if (zg_arg_bool(args, "primary", true, &b, err, errlen)) return -1;
  cJSON_DeleteItemFromObjectCaseSensitive(args, "primary");
  cJSON_AddBoolToObject(args, "primary", b);
  return zg_seal_secret_into(args, master_key, err, errlen);
}

static int apply_key_add_cmd(struct zg_fsm *f, const struct zgc_command *cmd,
                             struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
  bool primary = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(args, "primary"));
  if (apply_key_add(st, args, "id", NULL, 0, cmd->at, primary, o)) return o->status;
  const struct zg_key *k =
      zg_key_find(st, cJSON_GetObjectItemCaseSensitive(args, "id")->valuestring);
  o->result = zg_key_to_json(k, false, cmd->at);
  o->target = k->id;
  snprintf(o->detail, sizeof o->detail, "upstream %.100s%s", k->upstream,
           primary ? ", primary" : "");
  o->changed = ZG_CHANGED_KEYS;
  return 0;
}

/* ---- key.rotate ---------------------------------------------------------- */

static const char *const key_rotate_fields[] = {"id", "secret", "grace_seconds", "new_id", NULL};

static int prepare_key_rotate(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  char id[48];
  if (zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen)) return -1;
  if (zg_arg_string(args, "new_id", false, MAX_ID_LEN, &s, err, errlen)) return -1;
  if (s != NULL && !zg_id_valid(s)) {
    snprintf(err, errlen, "field 'new_id' must be 1..%d of A-Z a-z 0-9 . _ -", MAX_ID_LEN);
    return -1;
  }
  if (s == NULL) {
    zg_random_id("key-", id, sizeof id);
    cJSON_AddStringToObject(args, "new_id", id);
  }
  if (zg_arg_uint(args, "grace_seconds", false, 0, MAX_GRACE_SECONDS, 86400, &u, err, errlen))
    return -1;
  cJSON_DeleteItemFromObjectCaseSensitive(args, "grace_seconds");
  cJSON_AddNumberToObject(args, "grace_seconds", (double)u);
  return zg_seal_secret_into(args, master_key, err, errlen);
}

static int apply_key_rotate(struct zg_fsm *f, const struct zgc_command *cmd,
                            struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
  const char *s;
  uint64_t u;
  char err[200];
  if (zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, sizeof err) ||
      zg_arg_uint(args, "grace_seconds", false, 0, MAX_GRACE_SECONDS, 86400, &u, err, sizeof err))
    return fail(o, CONSENSUS_EINVALID, "%s", err);
  struct zg_key *old = zg_key_find(st, s);
  if (old == NULL) return fail(o, CONSENSUS_ENOTFOUND, "key '%s' not found", s);
  if (old->state != ZG_KEY_ACTIVE)
    return fail(o, CONSENSUS_EINVALID, "key '%s' is %s; only an active key can be rotated", s,
                zg_key_state_names[old->state]);
  char old_id[48], *upstream = strdup(old->upstream);
  snprintf(old_id, sizeof old_id, "%s", old->id);
  unsigned days = old->rotate_after_days;
  if (upstream == NULL) return fail(o, CONSENSUS_ENOMEM, "out of memory");
  int rv = apply_key_add(st, args, "new_id", upstream, days, cmd->at, true, o);
  free(upstream);
  if (rv) return rv;
  old = zg_key_find(st, old_id); /* array moved */
  old->state = ZG_KEY_RETIRING;
  old->retire_at = cmd->at + u * 1000u;
  const struct zg_key *nk = &st->keys[0];
  o->result = zg_key_to_json(nk, false, cmd->at);
  cJSON_AddStringToObject(o->result, "replaces", old_id);
  o->target = nk->id;
  snprintf(o->detail, sizeof o->detail, "replaces %s, grace %llus", old_id, (unsigned long long)u);
  o->changed = ZG_CHANGED_KEYS;
  return 0;
}

/* ---- key.revoke, key.invalidate ------------------------------------------ */

static const char *const id_only_fields[] = {"id", NULL};
static const char *const key_invalidate_fields[] = {"id", "reason", NULL};

static int prepare_id_only(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *s;
  return zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen);
}

static int prepare_key_invalidate(cJSON *args, const uint8_t master_key[32], char *err,
                                  size_t errlen) {
  const char *s;
  if (zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, errlen)) return -1;
  return zg_arg_string(args, "reason", false, 512, &s, err, errlen);
}

/* Finds the key named by args.id; NULL after fail(). */
static struct zg_key *key_of_args(struct zg_state *st, const cJSON *args, struct zg_apply_out *o) {
  const char *s;
  char err[200];
  if (zg_arg_string(args, "id", true, MAX_ID_LEN, &s, err, sizeof err)) {
    fail(o, CONSENSUS_EINVALID, "%s", err);
    return NULL;
  }
  struct zg_key *k = zg_key_find(st, s);
  if (k == NULL) fail(o, CONSENSUS_ENOTFOUND, "key '%s' not found", s);
  return k;
}

static int apply_key_revoke(struct zg_fsm *f, const struct zgc_command *cmd,
                            struct zg_apply_out *o) {
  struct zg_key *k = key_of_args(&f->st, cmd->args, o);
  if (k == NULL) return o->status;
  k->state = ZG_KEY_REVOKED;
  k->retire_at = 0;
  snprintf(o->detail, sizeof o->detail, "revoked");
  o->result = zg_key_to_json(k, false, cmd->at);
  o->target = k->id;
  o->changed = ZG_CHANGED_KEYS;
  return 0;
}

static int apply_key_invalidate(struct zg_fsm *f, const struct zgc_command *cmd,
                                struct zg_apply_out *o) {
  struct zg_key *k = key_of_args(&f->st, cmd->args, o);
  if (k == NULL) return o->status;
  const char *reason = NULL;
  char err[200];
  if (zg_arg_string(cmd->args, "reason", false, 512, &reason, err, sizeof err))
    return fail(o, CONSENSUS_EINVALID, "%s", err);
  if (k->state != ZG_KEY_REVOKED) k->state = ZG_KEY_INVALID;
  free(k->reason);
  k->reason = reason ? strdup(reason) : NULL;
  snprintf(o->detail, sizeof o->detail, "invalid: %.120s", reason ? reason : "");
  o->result = zg_key_to_json(k, false, cmd->at);
  o->target = k->id;
  o->changed = ZG_CHANGED_KEYS;
  return 0;
}

/* ---- token.create, token.revoke ------------------------------------------ */

static const char *const token_create_fields[] = {
    "name", "sha256", "expires_at", "rpm", "tpm", "budget_day", "budget_month", "allow", NULL};

static int prepare_token_create(cJSON *args, const uint8_t master_key[32], char *err,
                                size_t errlen) {
  char id[48];
  zg_lower_hex_field(args, "sha256");
  if (zg_validate_token_args(args, false, err, errlen)) return -1;
  zg_random_id("tok-", id, sizeof id);
  cJSON_AddStringToObject(args, "id", id);
  return 0;
}

static int apply_token_create_cmd(struct zg_fsm *f, const struct zgc_command *cmd,
                                  struct zg_apply_out *o) {
  return apply_token_create(&f->st, cmd->args, cmd->at, o);
}

static int apply_token_revoke(struct zg_fsm *f, const struct zgc_command *cmd,
                              struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const char *s;
  char err[200];
  if (zg_arg_string(cmd->args, "id", true, MAX_ID_LEN, &s, err, sizeof err))
    return fail(o, CONSENSUS_EINVALID, "%s", err);
  long i = zg_token_index_find(st, false, s);
  if (i < 0) return fail(o, CONSENSUS_ENOTFOUND, "token '%s' not found", s);
  o->result = cJSON_CreateObject();
  cJSON_AddStringToObject(o->result, "id", st->tokens[i].id);
  cJSON_AddStringToObject(o->result, "name", st->tokens[i].name);
  snprintf(o->detail, sizeof o->detail, "name %.100s", st->tokens[i].name);
  zg_token_remove(f, st, (size_t)i);
  o->target = cJSON_GetObjectItemCaseSensitive(o->result, "id")->valuestring;
  o->changed = ZG_CHANGED_TOKENS;
  return 0;
}

/* ---- token.update -------------------------------------------------------- */

static const char *const token_update_fields[] = {
    "id", "rpm", "tpm", "budget_day", "budget_month", "expires_at", "allow", NULL};

/* Checks the fields token.update may change; -1 with a message. */
static int check_token_update(const cJSON *args, char *err, size_t errlen) {
  const char *s;
  uint64_t u;
  struct zg_token scratch = {0};
  if (zg_arg_string(args, "id", true, MAX_NAME_LEN, &s, err, errlen)) return -1;
  if (zg_token_limits_parse(args, &scratch, err, errlen)) return -1;
  if (zg_arg_uint(args, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, errlen)) return -1;
  return zg_check_allow(args, err, errlen);
}

static int prepare_token_update(cJSON *args, const uint8_t master_key[32], char *err,
                                size_t errlen) {
  if (check_token_update(args, err, errlen)) return -1;
  if (cJSON_GetArraySize(args) < 2) {
    snprintf(err, errlen,
             "nothing to change: give rpm, tpm, budget_day, budget_month, expires_at or allow");
    return -1;
  }
  return 0;
}

static void detail_add(char *detail, size_t size, const char *what) {
  size_t n = strlen(detail);
  snprintf(detail + n, size - n, "%s%s", n ? ", " : "", what);
}

static int apply_token_update(struct zg_fsm *f, const struct zgc_command *cmd,
                              struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
  char err[200];
  if (check_token_update(args, err, sizeof err)) return fail(o, CONSENSUS_EINVALID, "%s", err);
  const char *ref = cJSON_GetObjectItemCaseSensitive(args, "id")->valuestring;
  long slot = zg_token_index_find(st, false, ref);
  if (slot < 0) { /* by name: it must name exactly one live token */
    size_t matches = 0;
    for (size_t i = 0; i < st->n_token_slots; i++)
      if (zg_token_live(&st->tokens[i]) && strcmp(st->tokens[i].name, ref) == 0) {
        if (matches++ == 0) slot = (long)i;
      }
    if (matches == 0) return fail(o, CONSENSUS_ENOTFOUND, "token '%s' not found", ref);
    if (matches > 1)
      return fail(o, CONSENSUS_ECONFLICT, "%zu tokens are named '%s': give the token id", matches,
                  ref);
  }
  struct zg_token *t = &st->tokens[slot];
  struct zg_token nt = *t;
  (void)zg_token_limits_parse(args, &nt, err, sizeof err);
  uint64_t u;
  const cJSON *expires = cJSON_GetObjectItemCaseSensitive(args, "expires_at");
  if (expires != NULL && !cJSON_IsNull(expires)) {
    (void)zg_arg_uint(args, "expires_at", false, 0, 9000000000000000ull, 0, &u, err, sizeof err);
    nt.expires_at = u;
  }
  const cJSON *allow = cJSON_GetObjectItemCaseSensitive(args, "allow");
  bool new_allow = allow != NULL && !cJSON_IsNull(allow);
  if (new_allow) {
    int n = cJSON_GetArraySize(allow);
    nt.allow = n > 0 ? calloc((size_t)n, sizeof *nt.allow) : NULL;
    nt.n_allow = 0;
    const cJSON *c;
    bool oom = n > 0 && nt.allow == NULL;
    cJSON_ArrayForEach(c, allow) {
      if (oom) break;
      if ((nt.allow[nt.n_allow] = strdup(c->valuestring)) == NULL)
        oom = true;
      else
        nt.n_allow++;
    }
    if (oom) {
      for (size_t i = 0; i < nt.n_allow; i++) free(nt.allow[i]);
      free(nt.allow);
      return fail(o, CONSENSUS_ENOMEM, "out of memory");
    }
  }
  nt.snap_text = NULL;
  if (zg_token_cache_text(&nt)) {
    if (new_allow) {
      for (size_t i = 0; i < nt.n_allow; i++) free(nt.allow[i]);
      free(nt.allow);
    }
    return fail(o, CONSENSUS_ENOMEM, "out of memory");
  }
  if (new_allow) {
    for (size_t i = 0; i < t->n_allow; i++) free(t->allow[i]);
    free(t->allow);
  }
  zg_text_drop(f, t->snap_text); /* a snapshot being written may still borrow it */
  *t = nt;
  char buf[80];
  snprintf(o->detail, sizeof o->detail, "name %.60s: ", t->name);
  size_t prefix = strlen(o->detail);
  char changes[120] = "";
  static const char *const limit_names[] = {"rpm", "tpm", "budget_day", "budget_month"};
  const uint64_t values[] = {t->rpm, t->tpm, t->budget_day, t->budget_month};
  for (size_t i = 0; i < 4; i++)
    if (cJSON_GetObjectItemCaseSensitive(args, limit_names[i])) {
      snprintf(buf, sizeof buf, "%s %llu", limit_names[i], (unsigned long long)values[i]);
      detail_add(changes, sizeof changes, buf);
    }
  if (expires) detail_add(changes, sizeof changes, "expires_at");
  if (new_allow) detail_add(changes, sizeof changes, "allow");
  snprintf(o->detail + prefix, sizeof o->detail - prefix, "%s", changes);
  o->result = zg_token_to_json(t, false);
  o->target = t->id;
  o->changed = ZG_CHANGED_TOKENS;
  return 0;
}

/* ---- usage.add ----------------------------------------------------------- */

static const char *const usage_add_fields[] = {"at", "rows", "seconds", "batch", NULL};

static int prepare_usage_add(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  return zg_usage_check_args(args, err, errlen);
}

static int apply_usage_add(struct zg_fsm *f, const struct zgc_command *cmd,
                           struct zg_apply_out *o) {
  char err[200];
  if (zg_usage_apply(&f->st.usage, cmd->args, err, sizeof err))
    return fail(o, CONSENSUS_EINVALID, "%s", err);
  o->result = cJSON_CreateObject();
  o->target = "";
  return 0;
}

/* ---- audit.note ---------------------------------------------------------- */

static const char *const audit_note_fields[] = {"what", NULL};

static int prepare_audit_note(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen) {
  const char *s;
  return zg_arg_string(args, "what", true, 1024, &s, err, errlen);
}

static int apply_audit_note(struct zg_fsm *f, const struct zgc_command *cmd,
                            struct zg_apply_out *o) {
  const char *s;
  char err[200];
  if (zg_arg_string(cmd->args, "what", true, 1024, &s, err, sizeof err))
    return fail(o, CONSENSUS_EINVALID, "%s", err);
  snprintf(o->detail, sizeof o->detail, "%s", s);
  o->target = "";
  o->result = cJSON_CreateObject();
  return 0;
}

/* ---- cluster.seed (internal: the first leader seeds config + tokens) ----- */

static int prepare_cluster_seed(cJSON *args, const uint8_t master_key[32], char *err,
                                size_t errlen) {
  char id[48];
  cJSON *tokens = cJSON_GetObjectItemCaseSensitive(args, "tokens");
  cJSON *t;
  int i = 0;
  cJSON_ArrayForEach(t, tokens) {
    zg_lower_hex_field(t, "sha256");
    if (zg_validate_token_args(t, false, err, errlen)) {
      char inner[200];
      snprintf(inner, sizeof inner, "%s", err);
      snprintf(err, errlen, "seed token %d: %s", i, inner);
      return -1;
    }
    zg_random_id("tok-", id, sizeof id);
    cJSON_DeleteItemFromObjectCaseSensitive(t, "id");
    cJSON_AddStringToObject(t, "id", id);
    i++;
  }
  return 0;
}

static int apply_cluster_seed(struct zg_fsm *f, const struct zgc_command *cmd,
                              struct zg_apply_out *o) {
  struct zg_state *st = &f->st;
  const cJSON *args = cmd->args;
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
    struct zg_apply_out tok = {0};
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

/* ---- the table ----------------------------------------------------------- */

static const struct zg_command_def commands[] = {
    /* type, name, internal, known fields, prepare, apply, result gets audit seq,
     * not audited */
    {ZGC_CONFIG_PUT, "config.put", false, config_put_fields, prepare_config_put, apply_config_put,
     false, false},
    {ZGC_KEY_ADD, "key.add", false, key_add_fields, prepare_key_add, apply_key_add_cmd, false,
     false},
    {ZGC_KEY_ROTATE, "key.rotate", false, key_rotate_fields, prepare_key_rotate, apply_key_rotate,
     false, false},
    {ZGC_KEY_REVOKE, "key.revoke", false, id_only_fields, prepare_id_only, apply_key_revoke, false,
     false},
    {ZGC_KEY_INVALIDATE, "key.invalidate", false, key_invalidate_fields, prepare_key_invalidate,
     apply_key_invalidate, false, false},
    {ZGC_TOKEN_CREATE, "token.create", false, token_create_fields, prepare_token_create,
     apply_token_create_cmd, false, false},
    {ZGC_TOKEN_REVOKE, "token.revoke", false, id_only_fields, prepare_id_only, apply_token_revoke,
     false, false},
    {ZGC_AUDIT_NOTE, "audit.note", false, audit_note_fields, prepare_audit_note, apply_audit_note,
     true, false},
    {ZGC_CLUSTER_SEED, "cluster.seed", true, NULL, prepare_cluster_seed, apply_cluster_seed, false,
     false},
    {ZGC_TOKEN_UPDATE, "token.update", false, token_update_fields, prepare_token_update,
     apply_token_update, false, false},
    /* usage.add is not audited: the active node writes one per usage.flush_ms
     * while there is traffic, which would flood the bounded audit trail and
     * push the operators' records out. The counters are the record. */
    {ZGC_USAGE_ADD, "usage.add", false, usage_add_fields, prepare_usage_add, apply_usage_add, false,
     true},
};

const struct zg_command_def *zg_command_by_type(int type) {
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (commands[i].type == type) return &commands[i];
  return NULL;
}

const struct zg_command_def *zg_command_by_name(const char *name, bool include_internal) {
  if (name == NULL) return NULL;
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp(commands[i].name, name) == 0 && (include_internal || !commands[i].internal))
      return &commands[i];
  return NULL;
}

cJSON *zg_prepare_args(int type, cJSON *args, const uint8_t master_key[32], char *err,
                       size_t errlen) {
  const struct zg_command_def *def = zg_command_by_type(type);
  if (args == NULL) args = cJSON_CreateObject();
  if (def == NULL) {
    snprintf(err, errlen, "unknown write type");
    goto fail;
  }
  if (!cJSON_IsObject(args)) {
    snprintf(err, errlen, "arguments must be a JSON object");
    goto fail;
  }
  if (def->fields && zg_check_known_fields(args, def->fields, err, errlen)) goto fail;
  if (def->prepare(args, master_key, err, errlen)) goto fail;
  return args;
fail:
  cJSON_Delete(args);
  return NULL;
}

int zg_build_entry(const char *type, cJSON *args, const char *actor, const char *source,
                   uint64_t at, const char *req_id, const uint8_t master_key[32],
                   struct raft_buffer *out, char *err, size_t errlen) {
  const struct zg_command_def *def = zg_command_by_name(type, true);
  if (def == NULL) {
    cJSON_Delete(args);
    snprintf(err, errlen, "unknown write type '%.40s'", type);
    return CONSENSUS_EINVALID;
  }
  cJSON *prepared = zg_prepare_args(def->type, args, master_key, err, errlen);
  if (prepared == NULL) return CONSENSUS_EINVALID;
  struct zgc_command cmd = {.type = def->type,
                            .at = at,
                            .actor = (char *)actor,
                            .source = (char *)source,
                            .args = prepared};
  snprintf(cmd.req_id, sizeof cmd.req_id, "%s", req_id ? req_id : "");
  int rv = zgc_encode(&cmd, out, err, errlen);
  cJSON_Delete(prepared);
  return rv == 0 ? 0 : CONSENSUS_EINVALID;
}

int zg_apply_command(struct zg_fsm *f, const struct zgc_command *cmd, struct zg_apply_out *o) {
  const struct zg_command_def *def = zg_command_by_type(cmd->type);
  if (def == NULL) return fail(o, CONSENSUS_EINVALID, "unknown command type %d", cmd->type);
  return def->apply(f, cmd, o);
}
