/* consensus/internal.h: private interfaces between the files of consensus/
 * (codec, sealing, state machine, transport). Not for other modules; the unit
 * tests and fuzz harnesses of this folder include it. */
#ifndef ZG_CONSENSUS_INTERNAL_H
#define ZG_CONSENSUS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <raft.h>
#include <raft/uv.h>

/* ---- command codec (codec.c) ------------------------------------------
 * Entry layout: [4] magic "ZGCM" [1] format version [1] command type
 * [2] reserved (0) [4] payload length, big endian; then a JSON payload
 * {"req": hex request id, "at": wall ms, "actor", "source", "args": {...}},
 * zero-padded to a multiple of 8 bytes (libraft requires it). */
#define ZGC_MAGIC "ZGCM"
#define ZGC_FORMAT_VERSION 1
#define ZGC_HEADER_LEN 12
#define ZGC_MAX_PAYLOAD (4u << 20)

enum zgc_type {
  ZGC_CONFIG_PUT = 1,
  ZGC_KEY_ADD,
  ZGC_KEY_ROTATE,
  ZGC_KEY_REVOKE,
  ZGC_KEY_INVALIDATE,
  ZGC_TOKEN_CREATE,
  ZGC_TOKEN_REVOKE,
  ZGC_AUDIT_NOTE,
  ZGC_CLUSTER_SEED, /* internal: first leader seeds config + tokens once */
  ZGC_TYPE_END
};

struct zgc_command {
  int type;
  char req_id[17]; /* 16 hex chars, "" if none */
  uint64_t at;     /* wall ms chosen by the leader at submit */
  char *actor, *source;
  cJSON *args; /* object */
};

const char *zgc_type_name(int type);      /* "config.put", ... or NULL */
int zgc_type_from_name(const char *name); /* 0 if unknown (cluster.seed is not public) */
/* Encodes into a raft_malloc'd buffer (ownership to the caller / raft_apply). */
int zgc_encode(const struct zgc_command *cmd, struct raft_buffer *out, char *err, size_t errlen);
/* Decodes; on success `out` owns copies (free with zgc_command_free). Never
 * reads past `len`. -1 and a message on any malformed input. */
int zgc_decode(const void *data, size_t len, struct zgc_command *out, char *err, size_t errlen);
void zgc_command_free(struct zgc_command *cmd);

/* ---- sealing (seal.c) --------------------------------------------------
 * base64( [1] key version (1) [12] nonce [n] ciphertext [16] GCM tag ),
 * AAD = "zonegate:" + purpose. */
#define ZG_SEAL_KEY_VERSION 1
int zg_seal(const uint8_t key[32], const char *purpose, const void *plain, size_t len,
            char **out_b64, char *err, size_t errlen);
/* *out is malloc'd and NUL-terminated (free with zg_secret_free). */
int zg_unseal(const uint8_t key[32], const char *purpose, const char *b64, char **out,
              size_t *out_len, char *err, size_t errlen);

/* ---- state machine (fsm.c) -------------------------------------------- */
enum zg_key_state { ZG_KEY_ACTIVE, ZG_KEY_RETIRING, ZG_KEY_REVOKED, ZG_KEY_INVALID };

struct zg_key {
  char id[48];
  char *upstream;
  enum zg_key_state state;
  uint64_t created_at, retire_at; /* wall ms; retire_at 0 unless retiring */
  unsigned rotate_after_days;
  char *sealed; /* zg_seal output */
  char *reason; /* for invalid, may be NULL */
};

struct zg_token {
  char id[32]; /* "" marks a revoked slot awaiting compaction */
  char *name;
  char sha256[65];
  uint64_t created_at, expires_at;
  unsigned rpm;
  size_t n_allow;
  char **allow;
  char *snap_text; /* ",{...}": this token's snapshot JSON, comma first; immutable */
  size_t snap_len;
};

/* One audit record as snapshot JSON text ",{...}" (comma first; immutable). */
struct zg_audit_rec {
  char *text;
  size_t len;
};

struct zg_state {
  cJSON *config; /* NULL until seeded */
  uint64_t config_version;
  bool seeded;
  struct zg_key *keys; /* priority order */
  size_t n_keys;
  /* Tokens in creation order. Revoked slots stay (id "") until more than
   * half the slots are dead, then the array is compacted. Two open-addressing
   * indexes (by sha256, by id) hold slot + 1 (0 empty, UINT32_MAX deleted). */
  struct zg_token *tokens;
  size_t n_token_slots, token_cap;
  size_t n_tokens; /* live tokens */
  uint32_t *token_by_sha, *token_by_id;
  size_t token_buckets, token_buckets_used; /* power of two; used counts deleted marks */
  /* Bounded audit trail: ring of audit_cap records, oldest at audit_head. */
  struct zg_audit_rec *audit;
  size_t audit_cap, audit_head, n_audit;
  uint64_t audit_seq;
};

enum { ZG_CHANGED_CONFIG = 1, ZG_CHANGED_KEYS = 2, ZG_CHANGED_TOKENS = 4, ZG_CHANGED_AUDIT = 8 };

/* Called after each applied command (also on followers). result: owned by
 * the fsm, valid during the call; NULL on error. */
typedef void (*zg_fsm_applied_fn)(void *ud, const struct zgc_command *cmd, int status,
                                  const char *errmsg, const cJSON *result, unsigned changed);

struct zg_fsm {
  struct raft_fsm raft; /* raft.data = this */
  struct zg_state st;
  unsigned audit_max;
  zg_fsm_applied_fn on_applied;
  void *ud;
  uint64_t n_applied, n_rejected_entries;
  /* Between raft's snapshot() and snapshot_finalize() the snapshot buffers
   * point at the cached texts of tokens and audit records: texts dropped
   * meanwhile wait in `grave` and are freed at finalize. */
  bool snapshot_pinned;
  char **grave;
  size_t n_grave, grave_cap;
};

void zg_fsm_init(struct zg_fsm *f, unsigned audit_max);
void zg_fsm_close(struct zg_fsm *f);
/* Applies one encoded entry. Never fails for raft: a malformed entry is
 * logged and counted. Returns the command status (0 or CONSENSUS_E*). */
int zg_fsm_apply_buf(struct zg_fsm *f, const void *data, size_t len);
/* Serialises the whole state: [4] "ZGSN" [1] version [3] 0 [8] JSON length
 * BE, then the JSON document. *out is malloc'd. (raft's snapshot() hands
 * out the same bytes as buffers that borrow the cached texts instead.) */
int zg_fsm_snapshot_bytes(const struct zg_fsm *f, char **out, size_t *out_len);
/* Validates a snapshot and, only if valid, replaces the state. Borrowed. */
int zg_fsm_restore_bytes(struct zg_fsm *f, const void *data, size_t len, char *err, size_t errlen);

/* Leader-side preparation of a write: validates `args` (ownership taken),
 * seals secrets, generates ids; returns the normalized command args or NULL
 * with a message naming the field. */
cJSON *zg_prepare_args(int type, cJSON *args, const uint8_t master_key[32], char *err,
                       size_t errlen);
/* Convenience for tests and consensus_write: prepare + encode. */
int zg_build_entry(const char *type, cJSON *args, const char *actor, const char *source,
                   uint64_t at, const char *req_id, const uint8_t master_key[32],
                   struct raft_buffer *out, char *err, size_t errlen);

cJSON *zg_state_keys_json(const struct zg_state *st, uint64_t now_ms);
cJSON *zg_state_tokens_json(const struct zg_state *st);
cJSON *zg_state_audit_json(const struct zg_state *st, size_t limit);
const struct zg_token *zg_state_token_find(const struct zg_state *st, const char *sha256);
bool zg_cidr_valid(const char *cidr);

/* ---- authenticated transport (transport.c) ---------------------------- */
/* Fills `t` (version 1). `secret` is copied. Close through t->close (raft_uv
 * does it), then zg_transport_free(). */
int zg_transport_init(struct raft_uv_transport *t, uv_loop_t *loop, const char *secret,
                      const char *bind_address, unsigned quiet_ms, char *err, size_t errlen);
void zg_transport_free(struct raft_uv_transport *t);
/* Mutual TLS on every peer connection (NULL: plaintext, as before). The
 * transport takes a reference. Call before raft starts. */
struct ssl_ctx_st;
void zg_transport_set_tls(struct raft_uv_transport *t, struct ssl_ctx_st *ctx);
/* Sets the startup quiet period; must be called before raft_start(). */
void zg_transport_set_quiet(struct raft_uv_transport *t, unsigned quiet_ms);
/* Drill: cuts every peer connection and refuses new ones for duration_ms. */
void zg_transport_isolate(struct raft_uv_transport *t, unsigned duration_ms);

#endif
