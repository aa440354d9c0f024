/* snapshot.c: the state as one JSON document behind a binary header, for
 * raft snapshots: laid out as buffers that borrow the cached texts of
 * tokens and audit records (no per-token printing), and restored by
 * validating the whole document into a new state before it replaces the
 * current one.
 *
 * The usage store is the member "usage" (usage.c; absent in snapshots of
 * builds before it: restored empty).
 *
 * Envelope (version 2): [4] "ZGSN" [1] version 2 [3] zero [8] JSON length
 * BE [32] SHA-256 of the JSON document, then the document. SHA-256 rather
 * than a CRC: OpenSSL's is already linked and fast (hardware SHA where the
 * CPU has it), and it leaves no doubt for any damage pattern. Version-1
 * snapshots (16-byte header, no digest) of older builds are still read.
 *
 * Failure modes: a malformed, unknown-version or checksum-mismatching
 * snapshot is refused with a message naming the reason ("checksum
 * mismatch" for damaged bytes) and the running state is kept; at start-up
 * that stops the node (consensus_start names the file).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

#define SNAP_MAGIC "ZGSN"
#define SNAP_VERSION 2    /* the envelope: 2 adds the digest */
#define SNAP_DOC_FORMAT 1 /* the document's "format" member (unchanged) */
#define SNAP_V1_HEADER_LEN 16
#define SNAP_DIGEST_LEN 32
#define SNAP_HEADER_LEN (SNAP_V1_HEADER_LEN + SNAP_DIGEST_LEN)

/* SHA-256 over the buffers from index `from` on, plus `first_len` bytes at
 * `first` ahead of them. 0, or -1 when OpenSSL fails (out of memory). */
static int digest_parts(const void *first, size_t first_len, const struct raft_buffer *bufs,
                        unsigned from, unsigned n, uint8_t out[SNAP_DIGEST_LEN]) {
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  unsigned out_len = 0;
  int ok = ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
           EVP_DigestUpdate(ctx, first, first_len) == 1;
  for (unsigned i = from; ok && i < n; i++)
    ok = EVP_DigestUpdate(ctx, bufs[i].base, bufs[i].len) == 1;
  ok = ok && EVP_DigestFinal_ex(ctx, out, &out_len) == 1 && out_len == SNAP_DIGEST_LEN;
  EVP_MD_CTX_free(ctx);
  return ok ? 0 : -1;
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
int zg_snapshot_parts(const struct zg_fsm *f, struct raft_buffer **out, unsigned *n_out) {
  const struct zg_state *st = &f->st;
  size_t n_bufs = 3 + st->n_tokens + st->n_audit;
  if (n_bufs > UINT_MAX) return -1;
  cJSON *doc = cJSON_CreateObject();
  if (doc == NULL) return -1;
  cJSON_AddNumberToObject(doc, "format", SNAP_DOC_FORMAT);
  if (st->config) /* shares the config's members, copies nothing */
    cJSON_AddItemReferenceToObject(doc, "config", st->config);
  else
    cJSON_AddNullToObject(doc, "config");
  cJSON_AddNumberToObject(doc, "config_version", (double)st->config_version);
  cJSON_AddBoolToObject(doc, "seeded", st->seeded);
  cJSON_AddNumberToObject(doc, "audit_seq", (double)st->audit_seq);
  cJSON *keys = cJSON_AddArrayToObject(doc, "keys");
  for (size_t i = 0; keys && i < st->n_keys; i++)
    cJSON_AddItemToArray(keys, zg_key_to_json(&st->keys[i], true, 0));
  /* The usage counters are printed here too: bounded (usage.c), and they
   * change every flush interval, so there is no text worth caching. */
  cJSON *usage = zg_usage_to_json(&st->usage);
  bool usage_ok = usage != NULL && cJSON_AddItemToObject(doc, "usage", usage);
  if (usage != NULL && !usage_ok) cJSON_Delete(usage);
  char *head = keys && usage_ok ? cJSON_PrintUnformatted(doc) : NULL;
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
    if (!zg_token_live(t)) continue;
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
  if (digest_parts(prefix + SNAP_HEADER_LEN, prefix_len - SNAP_HEADER_LEN, bufs, 1, (unsigned)n,
                   (uint8_t *)prefix + SNAP_V1_HEADER_LEN) != 0) {
    zg_snapshot_parts_free(bufs, (unsigned)n);
    return -1;
  }
  *out = bufs;
  *n_out = (unsigned)n;
  return 0;
}

void zg_snapshot_parts_free(struct raft_buffer *bufs, unsigned n) {
  if (bufs != NULL && n > 0) free(bufs[0].base); /* only the prefix is owned */
  free(bufs);
}

int zg_fsm_snapshot_bytes(const struct zg_fsm *f, char **out, size_t *out_len) {
  struct raft_buffer *bufs;
  unsigned n;
  if (zg_snapshot_parts(f, &bufs, &n)) return -1;
  size_t total = 0;
  for (unsigned i = 0; i < n; i++) total += bufs[i].len;
  char *buf = malloc(total ? total : 1);
  if (buf == NULL) {
    zg_snapshot_parts_free(bufs, n);
    return -1;
  }
  size_t at = 0;
  for (unsigned i = 0; i < n; i++) {
    memcpy(buf + at, bufs[i].base, bufs[i].len);
    at += bufs[i].len;
  }
  zg_snapshot_parts_free(bufs, n);
  *out = buf;
  *out_len = total;
  return 0;
}

int zg_fsm_restore_bytes(struct zg_fsm *f, const void *data, size_t len, char *err, size_t errlen) {
  const uint8_t *p = data;
  if (data == NULL || len < SNAP_V1_HEADER_LEN || memcmp(p, SNAP_MAGIC, 4) != 0) {
    snprintf(err, errlen, "snapshot: missing or bad header");
    return -1;
  }
  if (p[4] != SNAP_VERSION && p[4] != 1) {
    snprintf(err, errlen, "snapshot: format version %u not supported (this build reads 1 and %d)",
             p[4], SNAP_VERSION);
    return -1;
  }
  size_t header_len = p[4] == 1 ? SNAP_V1_HEADER_LEN : SNAP_HEADER_LEN;
  if (len < header_len || (p[4] != 1 && (p[5] | p[6] | p[7]) != 0)) {
    snprintf(err, errlen, "snapshot: missing or bad header");
    return -1;
  }
  uint64_t jlen = 0;
  for (int i = 0; i < 8; i++) jlen = (jlen << 8) | p[8 + i];
  if (jlen != len - header_len) {
    snprintf(err, errlen, "snapshot: length %llu disagrees with %zu bytes",
             (unsigned long long)jlen, len);
    return -1;
  }
  if (p[4] != 1) {
    uint8_t digest[SNAP_DIGEST_LEN];
    if (digest_parts(p + header_len, (size_t)jlen, NULL, 0, 0, digest) != 0) {
      snprintf(err, errlen, "snapshot: out of memory");
      return -1;
    }
    if (memcmp(digest, p + SNAP_V1_HEADER_LEN, SNAP_DIGEST_LEN) != 0) {
      snprintf(err, errlen,
               "snapshot: checksum mismatch (SHA-256 of the %llu byte document differs from "
               "the one written with it: the file is damaged)",
               (unsigned long long)jlen);
      return -1;
    }
  }
  const char *end = NULL;
  cJSON *doc = cJSON_ParseWithLengthOpts((const char *)p + header_len, (size_t)jlen, &end, false);
  if (doc == NULL || !cJSON_IsObject(doc)) {
    cJSON_Delete(doc);
    snprintf(err, errlen, "snapshot: body is not a JSON object");
    return -1;
  }
  struct zg_state st;
  uint64_t u;
  char inner[200];
  int rv = -1;
  if (zg_state_init(&st, f->audit_max)) {
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
  if (zg_arg_uint(doc, "format", true, SNAP_DOC_FORMAT, SNAP_DOC_FORMAT, 0, &u, inner,
                  sizeof inner) ||
      zg_arg_uint(doc, "config_version", true, 0, 9000000000000000ull, 0, &st.config_version, inner,
                  sizeof inner) ||
      zg_arg_uint(doc, "audit_seq", true, 0, 9000000000000000ull, 0, &st.audit_seq, inner,
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
  if (zg_usage_from_json(&st.usage, cJSON_GetObjectItemCaseSensitive(doc, "usage"), inner,
                         sizeof inner)) {
    snprintf(err, errlen, "snapshot: %s", inner);
    goto done;
  }
  const cJSON *item;
  int i = 0;
  cJSON_ArrayForEach(item, keys) {
    struct zg_key k;
    if (!cJSON_IsObject(item) || zg_parse_key(item, &k, inner, sizeof inner)) {
      snprintf(err, errlen, "snapshot: keys[%d]: %s", i,
               cJSON_IsObject(item) ? inner : "not an object");
      goto done;
    }
    if (zg_key_find(&st, k.id) != NULL || zg_key_insert(&st, &k, false)) {
      zg_key_free(&k);
      snprintf(err, errlen, "snapshot: keys[%d]: duplicate id", i);
      goto done;
    }
    i++;
  }
  i = 0;
  cJSON_ArrayForEach(item, tokens) {
    struct zg_token t;
    if (!cJSON_IsObject(item) || zg_parse_token(item, 0, &t, inner, sizeof inner)) {
      snprintf(err, errlen, "snapshot: tokens[%d]: %s", i,
               cJSON_IsObject(item) ? inner : "not an object");
      goto done;
    }
    if (zg_token_index_find(&st, false, t.id) >= 0 ||
        zg_token_index_find(&st, true, t.sha256) >= 0 || zg_token_cache_text(&t) ||
        zg_token_append(&st, &t)) {
      zg_token_free(&t);
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
    char *text = zg_comma_text(cJSON_Duplicate(item, true), &text_len);
    if (text == NULL) {
      snprintf(err, errlen, "snapshot: out of memory");
      goto done;
    }
    zg_audit_push(NULL, &st, text, text_len); /* keeps the newest audit_max */
  }
  zg_state_discard(f, &f->st);
  f->st = st;
  memset(&st, 0, sizeof st);
  rv = 0;
done:
  zg_state_free(&st);
  cJSON_Delete(doc);
  return rv;
}
