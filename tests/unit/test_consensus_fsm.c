/* test_consensus_fsm: the state machine on its own: every write type, error
 * results against the current state, the bounded audit trail, snapshot and
 * restore round trip (and no plaintext secret in the snapshot), rejection of
 * corrupt snapshots without touching the state, undecodable entries, many
 * tokens (hash indexes, compaction) and snapshot buffers that borrow the
 * state while raft writes them. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

static const uint8_t key[32] = {5, 4, 3, 2, 1};
#define HASH_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define HASH_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

struct last_apply {
  int status;
  char errmsg[256];
  cJSON *result;
  unsigned changed;
  int calls;
};

static void on_applied(void *ud, const struct zgc_command *cmd, int status, const char *errmsg,
                       const cJSON *result, unsigned changed) {
  struct last_apply *la = ud;
  (void)cmd;
  la->calls++;
  la->status = status;
  snprintf(la->errmsg, sizeof la->errmsg, "%s", errmsg ? errmsg : "");
  cJSON_Delete(la->result);
  la->result = result ? cJSON_Duplicate(result, true) : NULL;
  la->changed = changed;
}

static int apply(struct zg_fsm *f, uint64_t at, const char *type, const char *args) {
  struct raft_buffer buf;
  char err[256];
  cJSON *parsed = cJSON_Parse(args);
  assert_non_null(parsed);
  assert_int_equal(
      zg_build_entry(type, parsed, "admin", "127.0.0.1", at, "r", key, &buf, err, sizeof err), 0);
  int rv = zg_fsm_apply_buf(f, buf.base, buf.len);
  raft_free(buf.base);
  return rv;
}

static const char *result_string(struct last_apply *la, const char *name) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(la->result, name);
  return cJSON_IsString(item) ? item->valuestring : NULL;
}

static void fsm_setup(struct zg_fsm *f, struct last_apply *la, unsigned audit_max) {
  memset(la, 0, sizeof *la);
  zg_fsm_init(f, audit_max);
  f->on_applied = on_applied;
  f->ud = la;
}

static void test_writes(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 100);
  uint64_t t0 = 1700000000000ull;

  assert_int_equal(apply(&f, t0, "config.put", "{\"config\":{\"a\":1}}"), 0);
  assert_int_equal(f.st.config_version, 1);
  assert_true(la.changed & ZG_CHANGED_CONFIG);
  assert_int_equal(apply(&f, t0, "config.put", "{\"config\":{\"a\":2},\"if_match\":0}"),
                   CONSENSUS_ECONFLICT);
  assert_non_null(strstr(la.errmsg, "version is 1"));
  assert_int_equal(apply(&f, t0, "config.put", "{\"config\":{\"a\":2},\"if_match\":1}"), 0);
  assert_int_equal(cJSON_GetObjectItem(f.st.config, "a")->valueint, 2);
  assert_int_equal(cJSON_GetObjectItem(la.result, "version")->valueint, 2);

  assert_int_equal(apply(&f, t0, "key.add", "{\"id\":\"k1\",\"secret\":\"s1\"}"), 0);
  assert_int_equal(apply(&f, t0, "key.add", "{\"id\":\"k1\",\"secret\":\"s1\"}"),
                   CONSENSUS_ECONFLICT);
  assert_int_equal(
      apply(&f, t0, "key.add",
            "{\"id\":\"k2\",\"secret\":\"s2\",\"primary\":false,\"upstream\":\"alt\"}"),
      0);
  assert_null(cJSON_GetObjectItem(la.result, "sealed")); /* metadata only */
  assert_string_equal(f.st.keys[0].id, "k1");
  assert_string_equal(f.st.keys[1].id, "k2");

  /* Rotation: new primary, old one retiring until at + grace. */
  assert_int_equal(
      apply(&f, t0 + 1000, "key.rotate", "{\"id\":\"k1\",\"secret\":\"s3\",\"grace_seconds\":60}"),
      0);
  const char *new_id = result_string(&la, "id");
  assert_non_null(new_id);
  assert_string_equal(f.st.keys[0].id, new_id);
  assert_int_equal(f.st.keys[0].state, ZG_KEY_ACTIVE);
  assert_string_equal(f.st.keys[1].id, "k1");
  assert_int_equal(f.st.keys[1].state, ZG_KEY_RETIRING);
  assert_true(f.st.keys[1].retire_at == t0 + 1000 + 60000);
  assert_int_equal(apply(&f, t0, "key.rotate", "{\"id\":\"k1\",\"secret\":\"x\"}"),
                   CONSENSUS_EINVALID); /* only an active key rotates */
  assert_int_equal(apply(&f, t0, "key.rotate", "{\"id\":\"nope\",\"secret\":\"x\"}"),
                   CONSENSUS_ENOTFOUND);
  assert_int_equal(apply(&f, t0, "key.invalidate", "{\"id\":\"k2\",\"reason\":\"upstream 401\"}"),
                   0);
  assert_string_equal(result_string(&la, "state"), "invalid");
  assert_int_equal(apply(&f, t0, "key.revoke", "{\"id\":\"k1\"}"), 0);
  assert_string_equal(result_string(&la, "state"), "revoked");
  assert_int_equal(apply(&f, t0, "key.revoke", "{\"id\":\"zzz\"}"), CONSENSUS_ENOTFOUND);
  cJSON *keys = zg_state_keys_json(&f.st, t0 + 91ull * 86400000ull);
  char *keys_text = cJSON_PrintUnformatted(keys);
  assert_null(strstr(keys_text, "sealed"));
  assert_non_null(strstr(keys_text, "\"rotation_due\":true"));
  free(keys_text);
  cJSON_Delete(keys);

  /* Tokens. */
  assert_int_equal(apply(&f, t0, "token.create",
                         "{\"name\":\"ci\",\"sha256\":\"" HASH_A "\",\"rpm\":5,"
                         "\"allow\":[\"10.0.0.0/8\"],\"expires_at\":1800000000000}"),
                   0);
  char tok_id[32];
  snprintf(tok_id, sizeof tok_id, "%s", result_string(&la, "id"));
  assert_string_equal(result_string(&la, "sha256_prefix"), "aaaaaaaa");
  assert_null(cJSON_GetObjectItem(la.result, "sha256"));
  const struct zg_token *t = zg_state_token_find(&f.st, HASH_A);
  assert_non_null(t);
  assert_int_equal(t->rpm, 5);
  assert_int_equal(t->n_allow, 1);
  assert_string_equal(t->allow[0], "10.0.0.0/8");
  assert_int_equal(apply(&f, t0, "token.create", "{\"name\":\"dup\",\"sha256\":\"" HASH_A "\"}"),
                   CONSENSUS_ECONFLICT);
  char args[128];
  snprintf(args, sizeof args, "{\"id\":\"%s\"}", tok_id);
  assert_int_equal(apply(&f, t0, "token.revoke", args), 0);
  assert_null(zg_state_token_find(&f.st, HASH_A));
  assert_int_equal(apply(&f, t0, "token.revoke", args), CONSENSUS_ENOTFOUND);

  /* Audit: one record per successful write, same `at` the leader chose. */
  assert_int_equal(apply(&f, t0 + 5, "audit.note", "{\"what\":\"maintenance\"}"), 0);
  cJSON *audit = zg_state_audit_json(&f.st, 1);
  assert_int_equal(cJSON_GetArraySize(audit), 1);
  cJSON *rec = cJSON_GetArrayItem(audit, 0);
  assert_string_equal(cJSON_GetObjectItem(rec, "action")->valuestring, "audit.note");
  assert_string_equal(cJSON_GetObjectItem(rec, "detail")->valuestring, "maintenance");
  assert_string_equal(cJSON_GetObjectItem(rec, "actor")->valuestring, "admin");
  assert_true((uint64_t)cJSON_GetObjectItem(rec, "at")->valuedouble == t0 + 5);
  cJSON_Delete(audit);
  audit = zg_state_audit_json(&f.st, 0);
  assert_int_equal(cJSON_GetArraySize(audit), 10); /* the successful writes above */
  char *audit_text = cJSON_PrintUnformatted(audit);
  assert_null(strstr(audit_text, "s1"));
  free(audit_text);
  cJSON_Delete(audit);

  /* An entry nobody can decode is counted, not fatal. */
  uint8_t junk[16] = "ZGCM\x09";
  assert_int_equal(zg_fsm_apply_buf(&f, junk, sizeof junk), CONSENSUS_EINVALID);
  assert_int_equal(f.n_rejected_entries, 1);

  cJSON_Delete(la.result);
  zg_fsm_close(&f);
}

static void test_audit_bounded(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 5);
  for (int i = 0; i < 12; i++)
    assert_int_equal(apply(&f, 1000 + i, "audit.note", "{\"what\":\"n\"}"), 0);
  cJSON *audit = zg_state_audit_json(&f.st, 0);
  assert_int_equal(cJSON_GetArraySize(audit), 5);
  assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(audit, 0), "seq")->valueint, 8);
  assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(audit, 4), "seq")->valueint, 12);
  cJSON_Delete(audit);
  cJSON_Delete(la.result);
  zg_fsm_close(&f);
}

/* A version-2 snapshot rewritten as version 1 (the 16-byte header of
 * older builds, no digest). malloc'd. */
static char *to_v1(const char *snap, size_t len, size_t *out_len) {
  assert_true(len > 48);
  assert_int_equal(snap[4], 2);
  char *v1 = malloc(len - 32);
  memcpy(v1, snap, 16);
  v1[4] = 1;
  memcpy(v1 + 16, snap + 48, len - 48);
  *out_len = len - 32;
  return v1;
}

static void test_snapshot_round_trip(void **state) {
  (void)state;
  struct zg_fsm a, b;
  struct last_apply la, lb;
  fsm_setup(&a, &la, 50);
  fsm_setup(&b, &lb, 50);
  assert_int_equal(apply(&a, 10, "config.put", "{\"config\":{\"endpoint\":\"https://x\"}}"), 0);
  assert_int_equal(apply(&a, 11, "key.add", "{\"id\":\"k1\",\"secret\":\"sk-TOPSECRET-1\"}"), 0);
  assert_int_equal(apply(&a, 12, "key.rotate", "{\"id\":\"k1\",\"secret\":\"sk-TOPSECRET-2\"}"), 0);
  assert_int_equal(apply(&a, 13, "key.invalidate", "{\"id\":\"k1\",\"reason\":\"401\"}"), 0);
  assert_int_equal(apply(&a, 14, "token.create",
                         "{\"name\":\"t\",\"sha256\":\"" HASH_B "\",\"allow\":[\"::1/128\"]}"),
                   0);
  char *snap1, *snap2;
  size_t len1, len2;
  assert_int_equal(zg_fsm_snapshot_bytes(&a, &snap1, &len1), 0);
  assert_null(memmem(snap1, len1, "TOPSECRET", 9));
  char err[256];
  assert_int_equal(zg_fsm_restore_bytes(&b, snap1, len1, err, sizeof err), 0);
  assert_int_equal(zg_fsm_snapshot_bytes(&b, &snap2, &len2), 0);
  assert_int_equal(len1, len2);
  assert_memory_equal(snap1, snap2, len1);
  assert_int_equal(b.st.config_version, 1);
  assert_non_null(zg_state_token_find(&b.st, HASH_B));
  assert_int_equal(b.st.n_keys, 2);
  char *plain = NULL;
  assert_int_equal(
      zg_unseal(key, "provider-key", b.st.keys[0].sealed, &plain, NULL, err, sizeof err), 0);
  assert_string_equal(plain, "sk-TOPSECRET-2");
  zg_secret_free(plain);
  /* Writes continue identically on both after the restore. */
  assert_int_equal(apply(&a, 20, "audit.note", "{\"what\":\"after\"}"), 0);
  assert_int_equal(apply(&b, 20, "audit.note", "{\"what\":\"after\"}"), 0);
  free(snap2);
  assert_int_equal(zg_fsm_snapshot_bytes(&b, &snap2, &len2), 0);
  free(snap1);
  assert_int_equal(zg_fsm_snapshot_bytes(&a, &snap1, &len1), 0);
  assert_int_equal(len1, len2);
  assert_memory_equal(snap1, snap2, len1);

  /* Corrupt snapshots are refused and leave the state as it was. */
  char *bad = malloc(len1);
  memcpy(bad, snap1, len1);
  bad[4] = 9;
  assert_int_equal(zg_fsm_restore_bytes(&b, bad, len1, err, sizeof err), -1);
  assert_non_null(strstr(err, "version"));
  assert_int_equal(zg_fsm_restore_bytes(&b, snap1, len1 - 1, err, sizeof err), -1);
  /* A bad member behind a valid envelope (a version-1 snapshot: no
   * digest) is refused by the document's validation. */
  size_t v1_len = 0;
  char *v1 = to_v1(snap1, len1, &v1_len);
  char *kpos = memmem(v1, v1_len, "\"state\":\"", 9);
  assert_non_null(kpos);
  memcpy(kpos + 9, "bogus", 5);
  assert_int_equal(zg_fsm_restore_bytes(&b, v1, v1_len, err, sizeof err), -1);
  assert_non_null(strstr(err, "keys[0]"));
  free(v1);
  free(bad);
  assert_int_equal(b.st.n_keys, 2);
  assert_int_equal(b.st.config_version, 1);

  free(snap1);
  free(snap2);
  cJSON_Delete(la.result);
  cJSON_Delete(lb.result);
  zg_fsm_close(&a);
  zg_fsm_close(&b);
}

/* The snapshot's SHA-256: one flipped byte anywhere (header, digest or
 * document) is refused and the state kept; a good snapshot round-trips; a
 * version-1 snapshot of an older build (no digest) still restores. */
static void test_snapshot_checksum(void **state) {
  (void)state;
  struct zg_fsm a, b;
  struct last_apply la, lb;
  fsm_setup(&a, &la, 50);
  fsm_setup(&b, &lb, 50);
  assert_int_equal(apply(&a, 10, "config.put", "{\"config\":{\"endpoint\":\"https://x\"}}"), 0);
  assert_int_equal(apply(&a, 11, "token.create",
                         "{\"name\":\"t\",\"sha256\":\"" HASH_B "\",\"allow\":[\"::1/128\"]}"),
                   0);
  assert_int_equal(apply(&a, 12, "audit.note", "{\"what\":\"x\"}"), 0);
  char *snap, *again;
  size_t len, again_len;
  char err[256];
  assert_int_equal(zg_fsm_snapshot_bytes(&a, &snap, &len), 0);
  assert_int_equal(snap[4], 2);
  char *bad = malloc(len);
  for (size_t i = 0; i < len; i++) {
    for (int bit = 0; bit < 8; bit += 7) { /* the lowest and the highest bit */
      memcpy(bad, snap, len);
      bad[i] = (char)(bad[i] ^ (1 << bit));
      err[0] = '\0';
      if (zg_fsm_restore_bytes(&b, bad, len, err, sizeof err) != -1)
        fail_msg("byte %zu bit %d accepted", i, bit);
      if (i >= 48 && strstr(err, "checksum mismatch") == NULL) fail_msg("byte %zu: %s", i, err);
    }
  }
  free(bad);
  assert_null(zg_state_token_find(&b.st, HASH_B)); /* nothing was restored */
  assert_int_equal(b.st.config_version, 0);
  assert_int_equal(zg_fsm_restore_bytes(&b, snap, len, err, sizeof err), 0);
  assert_non_null(zg_state_token_find(&b.st, HASH_B));
  assert_int_equal(zg_fsm_snapshot_bytes(&b, &again, &again_len), 0);
  assert_int_equal(again_len, len);
  assert_memory_equal(again, snap, len);
  free(again);
  /* Version 1 (older builds) restores to the same state. */
  struct zg_fsm c;
  struct last_apply lc;
  fsm_setup(&c, &lc, 50);
  size_t v1_len;
  char *v1 = to_v1(snap, len, &v1_len);
  assert_int_equal(zg_fsm_restore_bytes(&c, v1, v1_len, err, sizeof err), 0);
  assert_int_equal(zg_fsm_snapshot_bytes(&c, &again, &again_len), 0);
  assert_memory_equal(again, snap, len);
  free(again);
  free(v1);
  free(snap);
  cJSON_Delete(la.result);
  cJSON_Delete(lb.result);
  cJSON_Delete(lc.result);
  zg_fsm_close(&a);
  zg_fsm_close(&b);
  zg_fsm_close(&c);
}

static void test_seed_once(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 50);
  const char *seed =
      "{\"config\":{\"endpoint\":\"https://seed\"},\"tokens\":[{\"name\":\"bootstrap\","
      "\"sha256\":\"" HASH_A "\"}]}";
  assert_int_equal(apply(&f, 1, "cluster.seed", seed), 0);
  assert_int_equal(f.st.config_version, 1);
  assert_non_null(zg_state_token_find(&f.st, HASH_A));
  /* A second seed (another node's first leadership) changes nothing. */
  assert_int_equal(
      apply(&f, 2, "cluster.seed", "{\"config\":{\"endpoint\":\"https://other\"},\"tokens\":[]}"),
      0);
  assert_string_equal(cJSON_GetObjectItem(f.st.config, "endpoint")->valuestring, "https://seed");
  assert_int_equal(f.st.config_version, 1);
  zg_fsm_close(&f);
  cJSON_Delete(la.result);

  /* A config written by an operator before the seed commits is kept; the
   * seed still brings its tokens. */
  fsm_setup(&f, &la, 50);
  assert_int_equal(apply(&f, 1, "config.put", "{\"config\":{\"endpoint\":\"https://op\"}}"), 0);
  assert_int_equal(apply(&f, 2, "cluster.seed", seed), 0);
  assert_string_equal(cJSON_GetObjectItem(f.st.config, "endpoint")->valuestring, "https://op");
  assert_int_equal(f.st.config_version, 1);
  assert_non_null(zg_state_token_find(&f.st, HASH_A));
  /* The public write API cannot submit a seed. */
  assert_int_equal(zgc_type_from_name("cluster.seed"), 0);
  cJSON_Delete(la.result);
  zg_fsm_close(&f);
}

static void hash_of(unsigned i, char out[65]) {
  for (int k = 0; k < 64; k++) out[k] = "0123456789abcdef"[(i * 2654435761u >> (k % 28)) & 15];
  snprintf(out + 56, 9, "%08x", i); /* unique tail */
}

static int create_token(struct zg_fsm *f, struct last_apply *la, unsigned i, char id[32]) {
  char hash[65], args[200];
  hash_of(i, hash);
  snprintf(args, sizeof args, "{\"name\":\"t%u\",\"sha256\":\"%s\"}", i, hash);
  int rv = apply(f, 1000 + i, "token.create", args);
  if (rv == 0) snprintf(id, 32, "%s", result_string(la, "id"));
  return rv;
}

static int revoke_token(struct zg_fsm *f, const char *id) {
  char args[100];
  snprintf(args, sizeof args, "{\"id\":\"%.31s\"}", id);
  return apply(f, 5000, "token.revoke", args);
}

/* Many tokens: lookups by hash and id stay right across index growth,
 * revokes and compaction; listing keeps creation order; snapshots agree. */
static void test_many_tokens(void **state) {
  (void)state;
  enum { N = 600 };
  struct zg_fsm f, g;
  struct last_apply la, lg;
  fsm_setup(&f, &la, 20);
  fsm_setup(&g, &lg, 20);
  static char ids[N][32];
  char hash[65];
  for (unsigned i = 0; i < N; i++) assert_int_equal(create_token(&f, &la, i, ids[i]), 0);
  assert_int_equal(f.st.n_tokens, N);
  /* A duplicate hash is refused. */
  hash_of(7, hash);
  char args[200];
  snprintf(args, sizeof args, "{\"name\":\"dup\",\"sha256\":\"%s\"}", hash);
  assert_int_equal(apply(&f, 9, "token.create", args), CONSENSUS_ECONFLICT);
  /* Revoke all but every third token: forces compaction. */
  for (unsigned i = 0; i < N; i++)
    if (i % 3 != 0) assert_int_equal(revoke_token(&f, ids[i]), 0);
  assert_int_equal(revoke_token(&f, ids[1]), CONSENSUS_ENOTFOUND);
  assert_int_equal(f.st.n_tokens, N / 3);
  assert_true(f.st.n_token_slots < N); /* compacted once more than half were dead */
  for (unsigned i = 0; i < N; i++) {
    hash_of(i, hash);
    const struct zg_token *t = zg_state_token_find(&f.st, hash);
    if (i % 3 != 0) {
      assert_null(t);
      continue;
    }
    assert_non_null(t);
    assert_string_equal(t->id, ids[i]);
  }
  /* A revoked hash can be used again. */
  hash_of(1, hash);
  snprintf(args, sizeof args, "{\"name\":\"again\",\"sha256\":\"%s\"}", hash);
  assert_int_equal(apply(&f, 9, "token.create", args), 0);
  cJSON *list = zg_state_tokens_json(&f.st);
  assert_int_equal(cJSON_GetArraySize(list), N / 3 + 1);
  assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(list, 0), "name")->valuestring, "t0");
  assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(list, 1), "name")->valuestring, "t3");
  assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(list, N / 3), "name")->valuestring,
                      "again");
  cJSON_Delete(list);
  /* Round trip through a snapshot. */
  char *snap1, *snap2, err[256];
  size_t len1, len2;
  assert_int_equal(zg_fsm_snapshot_bytes(&f, &snap1, &len1), 0);
  assert_int_equal(zg_fsm_restore_bytes(&g, snap1, len1, err, sizeof err), 0);
  assert_int_equal(zg_fsm_snapshot_bytes(&g, &snap2, &len2), 0);
  assert_int_equal(len1, len2);
  assert_memory_equal(snap1, snap2, len1);
  assert_int_equal(g.st.n_tokens, N / 3 + 1);
  assert_non_null(zg_state_token_find(&g.st, hash));
  cJSON *audit = zg_state_audit_json(&g.st, 0);
  assert_int_equal(cJSON_GetArraySize(audit), 20);
  cJSON_Delete(audit);
  free(snap1);
  free(snap2);
  cJSON_Delete(la.result);
  cJSON_Delete(lg.result);
  zg_fsm_close(&f);
  zg_fsm_close(&g);
}

/* raft's snapshot() buffers borrow the state's texts: revokes, audit
 * trimming and a restore before snapshot_finalize must not change or free
 * them (ASan checks the frees). */
static void test_snapshot_buffers_survive_changes(void **state) {
  (void)state;
  struct zg_fsm f, other;
  struct last_apply la, lo;
  fsm_setup(&f, &la, 4);
  fsm_setup(&other, &lo, 4);
  static char ids[40][32];
  for (unsigned i = 0; i < 40; i++) assert_int_equal(create_token(&f, &la, i, ids[i]), 0);
  char *expected;
  size_t expected_len;
  assert_int_equal(zg_fsm_snapshot_bytes(&f, &expected, &expected_len), 0);

  struct raft_buffer *bufs = NULL;
  unsigned n_bufs = 0;
  assert_int_equal(f.raft.version, 2);
  assert_int_equal(f.raft.snapshot(&f.raft, &bufs, &n_bufs), 0);
  for (unsigned i = 0; i < 40; i++) assert_int_equal(revoke_token(&f, ids[i]), 0);
  assert_int_equal(apply(&f, 9, "audit.note", "{\"what\":\"x\"}"), 0);
  char other_id[32], *other_snap, err[256];
  size_t other_len;
  assert_int_equal(create_token(&other, &lo, 1000, other_id), 0);
  assert_int_equal(zg_fsm_snapshot_bytes(&other, &other_snap, &other_len), 0);
  assert_int_equal(zg_fsm_restore_bytes(&f, other_snap, other_len, err, sizeof err), 0);
  assert_int_equal(f.st.n_tokens, 1);

  size_t total = 0;
  for (unsigned i = 0; i < n_bufs; i++) total += bufs[i].len;
  assert_int_equal(total, expected_len);
  char *joined = malloc(total);
  assert_non_null(joined);
  size_t at = 0;
  for (unsigned i = 0; i < n_bufs; i++) {
    memcpy(joined + at, bufs[i].base, bufs[i].len);
    at += bufs[i].len;
  }
  assert_memory_equal(joined, expected, expected_len);
  assert_int_equal(f.raft.snapshot_finalize(&f.raft, &bufs, &n_bufs), 0);
  assert_null(bufs);
  assert_int_equal(f.n_grave, 0);
  /* The old bytes still restore into a fresh state machine. */
  struct zg_fsm h;
  struct last_apply lh;
  fsm_setup(&h, &lh, 4);
  assert_int_equal(zg_fsm_restore_bytes(&h, joined, total, err, sizeof err), 0);
  assert_int_equal(h.st.n_tokens, 40);
  free(joined);
  free(expected);
  free(other_snap);
  cJSON_Delete(la.result);
  cJSON_Delete(lo.result);
  zg_fsm_close(&f);
  zg_fsm_close(&other);
  zg_fsm_close(&h);
}

/* usage.add: per-second ring (window (now-60, now]), day/month totals,
 * hourly rows and their queries, pruning from the entry's own time, no
 * audit record, snapshot round trip, malformed args refused whole. */
static void test_usage(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 100);
  uint64_t at = 1700000000; /* 2023-11-14T22:13:20Z */
  char args[1024];
  snprintf(args, sizeof args,
           "{\"at\":%llu,\"rows\":[{\"token\":\"app\",\"model\":\"m1\",\"key\":\"k1\","
           "\"requests\":2,\"prompt\":10,\"completion\":5,\"total\":15,\"cached\":1,"
           "\"reasoning\":2,\"unknown\":0},{\"token\":\"app\",\"model\":\"m1\",\"key\":\"k2\","
           "\"requests\":1,\"prompt\":3,\"completion\":4,\"total\":7,\"cached\":0,"
           "\"reasoning\":0,\"unknown\":1}],\"seconds\":[{\"token\":\"app\",\"at\":%llu,"
           "\"requests\":2,\"tokens\":15},{\"token\":\"app\",\"at\":%llu,\"requests\":1,"
           "\"tokens\":7}]}",
           (unsigned long long)at, (unsigned long long)at - 1, (unsigned long long)at);
  uint64_t seq = f.st.audit_seq;
  char err[256];
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0);
  assert_int_equal(f.st.audit_seq, seq); /* not audited */
  assert_int_equal(la.changed, 0);
  struct consensus_usage_view v;
  zg_usage_view(&f.st.usage, "app", at, &v);
  assert_int_equal(v.minute_requests, 3);
  assert_int_equal(v.minute_tokens, 22);
  assert_int_equal(v.minute_oldest_s, at - 1);
  assert_int_equal(v.day_tokens, 22);
  assert_int_equal(v.month_tokens, 22);
  zg_usage_view(&f.st.usage, "app", at + 59, &v);
  assert_int_equal(v.minute_requests, 1); /* at - 1 left the window */
  zg_usage_view(&f.st.usage, "app", at + 86400, &v);
  assert_int_equal(v.minute_requests, 0);
  assert_int_equal(v.day_tokens, 0);
  zg_usage_view(&f.st.usage, "nobody", at, &v);
  assert_int_equal(v.minute_requests + v.day_tokens + v.month_tokens, 0);

  cJSON *q = zg_usage_query(&f.st.usage, NULL, NULL, at - 3600);
  const cJSON *sum = cJSON_GetObjectItemCaseSensitive(q, "sum");
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(sum, "requests")->valuedouble, 3);
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(sum, "total")->valuedouble, 22);
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(sum, "unknown")->valuedouble, 1);
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(q, "rows")), 1);
  cJSON_Delete(q);
  q = zg_usage_query(&f.st.usage, "app", "m2", 0);
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(q, "rows")), 0);
  cJSON_Delete(q);

  /* malformed (prepare would refuse it; apply must too): nothing changes */
  struct zgc_command raw = {.type = ZGC_USAGE_ADD, .at = at * 1000, .actor = "x", .source = "y"};
  raw.args = cJSON_Parse("{\"at\":1700000000,\"rows\":[{\"token\":\"app\"}]}");
  struct raft_buffer buf;
  assert_int_equal(zgc_encode(&raw, &buf, err, sizeof err), 0);
  cJSON_Delete(raw.args);
  assert_int_equal(zg_fsm_apply_buf(&f, buf.base, buf.len), CONSENSUS_EINVALID);
  raft_free(buf.base);
  zg_usage_view(&f.st.usage, "app", at, &v);
  assert_int_equal(v.minute_requests, 3);

  /* snapshot round trip keeps it exactly */
  char *snap, *snap2;
  size_t len, len2;
  assert_int_equal(zg_fsm_snapshot_bytes(&f, &snap, &len), 0);
  struct zg_fsm g;
  struct last_apply lb;
  fsm_setup(&g, &lb, 100);
  assert_int_equal(zg_fsm_restore_bytes(&g, snap, len, err, sizeof err), 0);
  assert_int_equal(zg_fsm_snapshot_bytes(&g, &snap2, &len2), 0);
  assert_int_equal(len, len2);
  assert_memory_equal(snap, snap2, len);
  free(snap2);
  zg_usage_view(&g.st.usage, "app", at, &v);
  assert_int_equal(v.minute_tokens, 22);

  /* 63 days later: the hourly buckets are pruned, the idle row leaves */
  uint64_t later = at + 63u * 86400u;
  snprintf(args, sizeof args,
           "{\"at\":%llu,\"rows\":[{\"token\":\"other\",\"model\":\"m\",\"key\":\"\","
           "\"requests\":1,\"prompt\":1,\"completion\":1,\"total\":2,\"cached\":0,"
           "\"reasoning\":0,\"unknown\":0}],\"seconds\":[]}",
           (unsigned long long)later);
  assert_int_equal(apply(&f, later * 1000, "usage.add", args), 0);
  assert_int_equal(f.st.usage.n_rows, 1);
  assert_int_equal(f.st.usage.n_hours, 1);
  zg_usage_view(&f.st.usage, "app", at, &v); /* app idle for 2 months: still kept */
  assert_int_equal(v.month_tokens, 22);

  free(snap);
  zg_fsm_close(&g);
  cJSON_Delete(lb.result);
  zg_fsm_close(&f);
  cJSON_Delete(la.result);
}

/* A usage.add batch ({"source", "seq"}) counts once: the same batch sent
 * again (its first answer was lost, or a captured relay is replayed) and
 * an older one are skipped; a newer one counts; the snapshot keeps the
 * sources, so a restored node skips the same batches. */
static void test_usage_batch_counts_once(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 100);
  uint64_t at = 1700000000;
  char args[512];
#define BATCH(src, seq)                                                                            \
  snprintf(args, sizeof args,                                                                      \
           "{\"at\":%llu,\"rows\":[{\"token\":\"app\",\"model\":\"m\",\"key\":\"\","               \
           "\"requests\":1,\"prompt\":1,\"completion\":1,\"total\":2,\"cached\":0,"                \
           "\"reasoning\":0,\"unknown\":0}],\"seconds\":[],\"batch\":{\"source\":\"%s\","          \
           "\"seq\":%d}}",                                                                         \
           (unsigned long long)at, src, seq)
  struct consensus_usage_view v;
  BATCH("g-a", 1);
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0);
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0); /* again: skipped */
  zg_usage_view(&f.st.usage, "app", at, &v);
  assert_int_equal(v.day_tokens, 2);
  BATCH("g-a", 2);
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0);
  BATCH("g-a", 1); /* older than the last applied */
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0);
  BATCH("g-b", 1); /* another process: its own sequence */
  assert_int_equal(apply(&f, at * 1000, "usage.add", args), 0);
  zg_usage_view(&f.st.usage, "app", at, &v);
  assert_int_equal(v.day_tokens, 6);
  assert_int_equal(f.st.usage.duplicates, 2);

  char *snap, err[256];
  size_t len;
  assert_int_equal(zg_fsm_snapshot_bytes(&f, &snap, &len), 0);
  struct zg_fsm g;
  struct last_apply lb;
  fsm_setup(&g, &lb, 100);
  assert_int_equal(zg_fsm_restore_bytes(&g, snap, len, err, sizeof err), 0);
  BATCH("g-b", 1);
  assert_int_equal(apply(&g, at * 1000, "usage.add", args), 0);
  zg_usage_view(&g.st.usage, "app", at, &v);
  assert_int_equal(v.day_tokens, 6);

  /* a malformed batch is refused whole */
  snprintf(args, sizeof args,
           "{\"at\":%llu,\"rows\":[],\"seconds\":[],\"batch\":{\"source\":\"\",\"seq\":0}}",
           (unsigned long long)at);
  cJSON *bad = cJSON_Parse(args);
  struct raft_buffer buf;
  assert_int_not_equal(
      zg_build_entry("usage.add", bad, "admin", "127.0.0.1", at, "r", key, &buf, err, sizeof err),
      0);
  assert_non_null(strstr(err, "batch"));
#undef BATCH
  free(snap);
  zg_fsm_close(&g);
  cJSON_Delete(lb.result);
  zg_fsm_close(&f);
  cJSON_Delete(la.result);
}

/* token.update: limits, expiry and allowlist by id or by name; audited;
 * the snapshot carries the new values. */
static void test_token_update(void **state) {
  (void)state;
  struct zg_fsm f;
  struct last_apply la;
  fsm_setup(&f, &la, 100);
  uint64_t t0 = 1700000000000ull;
  assert_int_equal(apply(&f, t0, "token.create",
                         "{\"name\":\"app\",\"sha256\":\"" HASH_A "\",\"rpm\":3,\"tpm\":100}"),
                   0);
  char id[48];
  snprintf(id, sizeof id, "%s", result_string(&la, "id"));
  const struct zg_token *t = zg_state_token_find(&f.st, HASH_A);
  assert_int_equal(t->rpm, 3);
  assert_int_equal(t->tpm, 100);
  assert_int_equal(
      apply(&f, t0, "token.update",
            "{\"id\":\"app\",\"tpm\":50,\"budget_day\":1000,\"allow\":[\"10.0.0.0/8\"]}"),
      0);
  t = zg_state_token_find(&f.st, HASH_A);
  assert_int_equal(t->rpm, 3);
  assert_int_equal(t->tpm, 50);
  assert_int_equal(t->budget_day, 1000);
  assert_int_equal(t->n_allow, 1);
  assert_non_null(strstr(t->snap_text, "\"budget_day\":1000"));
  char upd[128];
  snprintf(upd, sizeof upd, "{\"id\":\"%s\",\"allow\":[],\"budget_month\":7}", id);
  assert_int_equal(apply(&f, t0, "token.update", upd), 0);
  t = zg_state_token_find(&f.st, HASH_A);
  assert_int_equal(t->n_allow, 0);
  assert_int_equal(t->budget_month, 7);
  cJSON *audit = zg_state_audit_json(&f.st, 1);
  assert_string_equal(
      cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(audit, 0), "action")->valuestring,
      "token.update");
  cJSON_Delete(audit);
  assert_int_equal(apply(&f, t0, "token.update", "{\"id\":\"nope\",\"rpm\":1}"),
                   CONSENSUS_ENOTFOUND);
  assert_int_equal(apply(&f, t0, "token.create", "{\"name\":\"app\",\"sha256\":\"" HASH_B "\"}"),
                   0);
  assert_int_equal(apply(&f, t0, "token.update", "{\"id\":\"app\",\"rpm\":1}"),
                   CONSENSUS_ECONFLICT);
  zg_fsm_close(&f);
  cJSON_Delete(la.result);
}

int main(void) {
  zg_log_set_level(ZG_ERROR + 1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_writes),
      cmocka_unit_test(test_audit_bounded),
      cmocka_unit_test(test_snapshot_round_trip),
      cmocka_unit_test(test_snapshot_checksum),
      cmocka_unit_test(test_seed_once),
      cmocka_unit_test(test_many_tokens),
      cmocka_unit_test(test_snapshot_buffers_survive_changes),
      cmocka_unit_test(test_usage),
      cmocka_unit_test(test_usage_batch_counts_once),
      cmocka_unit_test(test_token_update),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
