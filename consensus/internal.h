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

/* Files: codec.c (entry framing), commands.c (the command table), fsm.c
 * (apply path, raft_fsm glue), state.c (containers, records, argument
 * checks), snapshot.c, seal.c, transport.c, node.c (start/stop, writes,
 * reads), recover.c. */

/* ---- command codec (codec.c) ------------------------------------------
 * Entry layout: [4] magic "ZGCM" [1] format version [1] command type
 * [2] reserved (0) [4] payload length, big endian; then a JSON payload
 * {"req": hex request id, "at": wall ms, "actor", "source", "args": {...}},
 * zero-padded to a multiple of 8 bytes (libraft requires it). */
#define ZGC_MAGIC "ZGCM"
#define ZGC_FORMAT_VERSION 1
#define ZGC_HEADER_LEN 12
#define ZGC_MAX_PAYLOAD (4u << 20)

/* Command type numbers as written in entries: never reuse one. Each has
 * one row in the command table (commands.c). */
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
  ZGC_USAGE_ADD,    /* usage counters of one flush interval (not audited) */
  ZGC_TOKEN_UPDATE, /* limits, expiry, allowlist of an existing token */
};

struct zgc_command {
  int type;
  char req_id[17]; /* 16 hex chars, "" if none */
  uint64_t at;     /* wall ms chosen by the leader at submit */
  char *actor, *source;
  cJSON *args; /* object */
};

/* Names come from the command table. */
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
  uint64_t tpm, budget_day, budget_month; /* tokens; 0 = none */
  size_t n_allow;
  char **allow;
  /* ",{...}": this token's snapshot JSON, comma first. Replaced (never
   * edited) by token.update; the old text goes through zg_text_drop. */
  char *snap_text;
  size_t snap_len;
};

/* ---- usage store (usage.c) ----------------------------------------------
 * Replicated usage counters, fed by usage.add entries. Per token name: a
 * ring of the last ZG_USAGE_SECONDS unix seconds (requests, tokens) for
 * the rpm/tpm window, and token totals of the last ZG_USAGE_DAYS UTC days
 * and ZG_USAGE_MONTHS UTC months (budgets). Per (token, model, key): all
 * counters since the row appeared, and hourly buckets of the last
 * ZG_USAGE_RETAIN_HOURS hours. Everything is pruned on apply from the
 * entry's own `at` (never a local clock), so every node holds the same. */
#define ZG_USAGE_SECONDS 120u
#define ZG_USAGE_DAYS 4u
#define ZG_USAGE_MONTHS 3u
#define ZG_USAGE_RETAIN_HOURS (62u * 24u)
#define ZG_USAGE_MAX_TOKENS 20000u
#define ZG_USAGE_MAX_ROWS 20000u
#define ZG_USAGE_MAX_HOURS 2000000u /* hourly buckets over all rows */
#define ZG_USAGE_COUNTERS 7         /* requests prompt completion total cached reasoning unknown */

struct zg_usage_second {
  uint64_t at, requests, tokens;
};
struct zg_usage_period {
  uint64_t key, tokens; /* key: unix day (at / 86400) or year * 12 + month (0-11); 0 = unused */
};
struct zg_usage_token {
  char *name;
  uint64_t last_at;                              /* newest entry `at` that touched it */
  struct zg_usage_second ring[ZG_USAGE_SECONDS]; /* slot at % ZG_USAGE_SECONDS */
  struct zg_usage_period days[ZG_USAGE_DAYS], months[ZG_USAGE_MONTHS];
};
struct zg_usage_hour {
  uint64_t hour; /* at / 3600 */
  uint64_t c[ZG_USAGE_COUNTERS];
};
struct zg_usage_row {
  char *token, *model, *key;
  uint64_t last_at;
  uint64_t total[ZG_USAGE_COUNTERS];
  struct zg_usage_hour *hours; /* ascending hour */
  size_t n_hours, hours_cap;
};
/* The last usage.add batch applied per source (one gateway process: see
 * gateway/accounting.h): a batch whose seq is not above it was applied
 * already and is skipped. At most ZG_USAGE_MAX_SOURCES; the one applied
 * longest ago leaves first, and any idle for ZG_USAGE_SOURCE_IDLE_S. */
#define ZG_USAGE_MAX_SOURCES 64u
#define ZG_USAGE_SOURCE_LEN 40u
#define ZG_USAGE_SOURCE_IDLE_S (7u * 86400u)
struct zg_usage_source {
  char name[ZG_USAGE_SOURCE_LEN + 1];
  uint64_t seq, last_at;
};
struct zg_usage {
  struct zg_usage_source sources[ZG_USAGE_MAX_SOURCES];
  size_t n_sources;
  uint64_t duplicates;           /* batches skipped as already applied */
  struct zg_usage_token *tokens; /* sorted by name */
  size_t n_tokens, tokens_cap;
  struct zg_usage_row *rows; /* sorted by (token, model, key) */
  size_t n_rows, rows_cap;
  size_t n_hours;      /* over all rows */
  uint64_t last_at;    /* newest entry `at` applied */
  uint64_t swept_hour; /* hour of the last full prune */
  uint64_t dropped;    /* counts refused by the caps (rows/tokens/hours full) */
};
extern const char *const zg_usage_counter_names[ZG_USAGE_COUNTERS];
void zg_usage_free(struct zg_usage *u);
/* Validates and applies usage.add args (their `at`, unix seconds, is the
 * entry's time: it alone decides pruning); -1 and a message (state
 * unchanged) when the args are malformed. A batch ({"source", "seq"})
 * already applied is skipped (0, state unchanged but `duplicates`). */
int zg_usage_apply(struct zg_usage *u, const cJSON *args, char *err, size_t errlen);
/* Validates args on the leader (same checks as apply). */
int zg_usage_check_args(const cJSON *args, char *err, size_t errlen);
/* Snapshot member "usage" (compact arrays) and its restore (into an empty
 * store; -1 with a message on any malformed member). */
cJSON *zg_usage_to_json(const struct zg_usage *u);
int zg_usage_from_json(struct zg_usage *u, const cJSON *j, char *err, size_t errlen);
const struct zg_usage_token *zg_usage_token_find(const struct zg_usage *u, const char *name);
struct consensus_usage_view;
void zg_usage_view(const struct zg_usage *u, const char *token, uint64_t now_s,
                   struct consensus_usage_view *out);
/* consensus_usage_query's document (see consensus.h); NULL on ENOMEM. */
cJSON *zg_usage_query(const struct zg_usage *u, const char *token, const char *model,
                      uint64_t since_s);

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
  struct zg_usage usage; /* usage.c */
};

enum { ZG_CHANGED_CONFIG = 1, ZG_CHANGED_KEYS = 2, ZG_CHANGED_TOKENS = 4, ZG_CHANGED_AUDIT = 8 };

/* Argument and record limits. */
#define SECRET_PURPOSE "provider-key"
#define MAX_ID_LEN 47
#define MAX_NAME_LEN 128
#define MAX_SECRET_LEN 8192
#define MAX_ALLOW 64
#define MAX_GRACE_SECONDS (365u * 86400u)
#define ZG_TOKEN_LIMIT_MAX 9000000000000000ull /* tpm, budgets: exact in a JSON number */

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
  /* Why the last snapshot restore was refused ("" if none): libraft only
   * hands back RAFT_CORRUPT, and raft_start's error must name the reason. */
  char restore_error[256];
  size_t restore_len; /* the refused snapshot's size: names its file */
  bool starting;      /* raft_start's restore: its error line says it all */
};

void zg_fsm_init(struct zg_fsm *f, unsigned audit_max);
void zg_fsm_close(struct zg_fsm *f);
/* Applies one encoded entry. Never fails for raft: a malformed entry is
 * logged and counted. Returns the command status (0 or CONSENSUS_E*). */
int zg_fsm_apply_buf(struct zg_fsm *f, const void *data, size_t len);
/* Serialises the whole state: [4] "ZGSN" [1] version (2) [3] 0 [8] JSON
 * length BE [32] SHA-256 of the document, then the JSON document. 0, or -1
 * out of memory. *out is malloc'd (the caller frees it). (raft's snapshot() hands
 * out the same bytes as buffers that borrow the cached texts instead.) */
int zg_fsm_snapshot_bytes(const struct zg_fsm *f, char **out, size_t *out_len);
/* Validates a snapshot (version 2: its SHA-256 first; version 1 of older
 * builds: no digest) and, only if valid, replaces the state. data is
 * borrowed. 0, or -1 with the reason in err ("checksum mismatch" for
 * damaged bytes) and the state untouched. */
int zg_fsm_restore_bytes(struct zg_fsm *f, const void *data, size_t len, char *err, size_t errlen);

/* ---- the command table (commands.c) -----------------------------------
 * One row per command type. prepare runs on the leader before the entry
 * enters the log (args already checked against `fields`; it validates,
 * normalises, seals secrets and picks ids, editing args in place; -1 with
 * a message naming the field). apply runs on every node and must be
 * deterministic; it fills `o` (status via errmsg, result, changed bits,
 * audit target and detail). */
struct zg_apply_out {
  int status;
  char errmsg[256];
  cJSON *result; /* owned by the apply path; NULL on error */
  unsigned changed;
  const char *target; /* points into args or state; used for the audit record */
  char detail[160];
};

struct zg_command_def {
  int type;                  /* enum zgc_type: the byte in the entry header */
  const char *name;          /* consensus_write's type and the audit action */
  bool internal;             /* written by consensus itself, never by consensus_write */
  const char *const *fields; /* known argument names, NULL-terminated; NULL: unchecked */
  int (*prepare)(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen);
  int (*apply)(struct zg_fsm *f, const struct zgc_command *cmd, struct zg_apply_out *o);
  bool result_has_audit_seq; /* the result carries the audit record's seq */
  bool not_audited;          /* never written to the audit trail (usage.add) */
};
const struct zg_command_def *zg_command_by_type(int type); /* NULL if unknown */
const struct zg_command_def *zg_command_by_name(const char *name, bool include_internal);
/* Applies through the row of cmd->type (unknown: CONSENSUS_EINVALID). */
int zg_apply_command(struct zg_fsm *f, const struct zgc_command *cmd, struct zg_apply_out *o);

/* Leader-side preparation of a write: validates `args` (ownership taken),
 * seals secrets, generates ids; returns the normalized command args or NULL
 * with a message naming the field. */
cJSON *zg_prepare_args(int type, cJSON *args, const uint8_t master_key[32], char *err,
                       size_t errlen);
/* Convenience for tests and consensus_write: prepare + encode. */
int zg_build_entry(const char *type, cJSON *args, const char *actor, const char *source,
                   uint64_t at, const char *req_id, const uint8_t master_key[32],
                   struct raft_buffer *out, char *err, size_t errlen);

/* ---- containers and records (state.c) ---------------------------------
 * The helpers the commands and snapshot restore share. Allocation
 * failures return -1 and leave the state unchanged. */
extern const char *const zg_key_state_names[];
void zg_key_free(struct zg_key *k);
void zg_token_free(struct zg_token *t);
bool zg_token_live(const struct zg_token *t);
/* Frees a cached snapshot text now, or at snapshot_finalize while pinned. */
void zg_text_drop(struct zg_fsm *f, char *text);
int zg_state_init(struct zg_state *st, size_t audit_cap);
void zg_state_free(struct zg_state *st);
void zg_state_discard(struct zg_fsm *f, struct zg_state *st);
/* ",{...}" text of `o` (taken and deleted); *len its length. */
char *zg_comma_text(cJSON *o, size_t *len);
void zg_audit_push(struct zg_fsm *f, struct zg_state *st, char *text, size_t len);
struct zg_key *zg_key_find(struct zg_state *st, const char *id);
int zg_key_insert(struct zg_state *st, const struct zg_key *k, bool first);
long zg_token_index_find(const struct zg_state *st, bool by_sha, const char *key);
int zg_token_reindex(struct zg_state *st, bool compact);
int zg_token_append(struct zg_state *st, const struct zg_token *t);
void zg_token_remove(struct zg_fsm *f, struct zg_state *st, size_t slot);
cJSON *zg_key_to_json(const struct zg_key *k, bool with_sealed, uint64_t now_ms);
cJSON *zg_token_to_json(const struct zg_token *t, bool with_hash);
bool zg_id_valid(const char *s);
int zg_arg_string(const cJSON *args, const char *name, bool required, size_t max_len,
                  const char **out, char *err, size_t errlen);
int zg_arg_uint(const cJSON *args, const char *name, bool required, uint64_t min, uint64_t max,
                uint64_t dflt, uint64_t *out, char *err, size_t errlen);
int zg_arg_bool(const cJSON *args, const char *name, bool dflt, bool *out, char *err,
                size_t errlen);
int zg_check_known_fields(const cJSON *args, const char *const *known, char *err, size_t errlen);
bool zg_sha256_hex_valid(const char *s);
void zg_random_id(const char *prefix, char *out, size_t outlen);
int zg_validate_token_args(const cJSON *args, bool need_id, char *err, size_t errlen);
void zg_lower_hex_field(cJSON *args, const char *name);
int zg_seal_secret_into(cJSON *args, const uint8_t master_key[32], char *err, size_t errlen);
int zg_parse_token(const cJSON *j, uint64_t created_at, struct zg_token *t, char *err,
                   size_t errlen);
int zg_token_cache_text(struct zg_token *t);
/* Reads the optional limit fields (rpm, tpm, budget_day, budget_month) of
 * args into t (absent: unchanged); -1 with a message naming the field. */
int zg_token_limits_parse(const cJSON *args, struct zg_token *t, char *err, size_t errlen);
/* A token's optional "allow" field (null or CIDR strings): 0, or -1 with err. */
int zg_check_allow(const cJSON *args, char *err, size_t errlen);
int zg_parse_key(const cJSON *j, struct zg_key *k, char *err, size_t errlen);

/* ---- snapshots (snapshot.c) ------------------------------------------- */
/* The snapshot as buffers borrowing cached texts (see snapshot.c); free
 * with zg_snapshot_parts_free. */
int zg_snapshot_parts(const struct zg_fsm *f, struct raft_buffer **out, unsigned *n_out);
void zg_snapshot_parts_free(struct raft_buffer *bufs, unsigned n);

cJSON *zg_state_keys_json(const struct zg_state *st, uint64_t now_ms);
cJSON *zg_state_tokens_json(const struct zg_state *st);
cJSON *zg_state_audit_json(const struct zg_state *st, size_t limit);
const struct zg_token *zg_state_token_find(const struct zg_state *st, const char *sha256);
bool zg_cidr_valid(const char *cidr);

/* ---- cluster incarnation (incarnation.c) -------------------------------- */
#define ZG_INCARNATION_LEN 16
#define ZG_INCARNATION_HEX (2 * ZG_INCARNATION_LEN)
struct zg_incarnation {
  uint8_t b[ZG_INCARNATION_LEN];
};
void zg_incarnation_hex(const struct zg_incarnation *inc, char out[ZG_INCARNATION_HEX + 1]);
/* 32 lowercase hex digits, exactly: 0 or -1. */
int zg_incarnation_parse(const char *text, size_t len, struct zg_incarnation *out);
/* Wall ms of its creation (0: bootstrap or legacy). */
uint64_t zg_incarnation_time(const struct zg_incarnation *inc);
void zg_incarnation_legacy(struct zg_incarnation *out);
void zg_incarnation_bootstrap(const struct raft_configuration *conf, struct zg_incarnation *out);
int zg_incarnation_new(struct zg_incarnation *out); /* recover --force; 0 or -1 (no randomness) */
/* data_dir/incarnation: 0 read, 1 absent, -1 unreadable or malformed (err). */
int zg_incarnation_load(const char *data_dir, struct zg_incarnation *out, char *err, size_t errlen);
/* Atomic (tmp, fsync, rename): 0 or -1 with err. */
int zg_incarnation_store(const char *data_dir, const struct zg_incarnation *inc, char *err,
                         size_t errlen);
int zg_incarnation_remove(const char *data_dir); /* and the superseded marker; 0 or -1 */
/* data_dir/superseded: this data dir met a peer of a newer incarnation
 * (transport.c supersede()); the node refuses to start on it. mark: 0 ok,
 * -1 not written. superseded: 1 marked (out: "<incarnation> <peer>"),
 * 0 not. */
int zg_incarnation_mark_superseded(const char *data_dir, const struct zg_incarnation *newer,
                                   const char *peer);
int zg_incarnation_superseded(const char *data_dir, char *out, size_t outlen);
int zg_incarnation_clear_superseded(const char *data_dir); /* 0, or -1 (not removed) */

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
/* The incarnation check of the handshake (see transport.c). OFF (the
 * default): nothing sent, nothing checked. KNOWN: `inc` is sent and a peer
 * that sends another one is refused. ADOPT (a joiner with an empty log):
 * "none yet" is sent, and the first authenticated peer that sends one is
 * adopted: adopt(ud, inc) stores it (non-zero refuses that peer), then the
 * transport is KNOWN. A later peer with a newer incarnation is offered to
 * adopt() once more (0: taken, the other peers are cut; non-zero: this
 * node is superseded). */
enum zg_incarnation_mode { ZG_INC_OFF, ZG_INC_KNOWN, ZG_INC_ADOPT };
typedef int (*zg_incarnation_adopt_cb)(void *ud, const struct zg_incarnation *inc);
void zg_transport_set_incarnation(struct raft_uv_transport *t, enum zg_incarnation_mode mode,
                                  const struct zg_incarnation *inc, zg_incarnation_adopt_cb adopt,
                                  void *ud);
/* cb(ud, newer, peer_address) runs once, when a peer that proved the
 * cluster secret runs a newer incarnation than this node (see supersede()
 * in transport.c); from then on the transport refuses every peer. Both
 * arguments are valid during the call only. */
typedef void (*zg_superseded_cb)(void *ud, const struct zg_incarnation *newer,
                                 const char *peer_address);
void zg_transport_on_superseded(struct raft_uv_transport *t, zg_superseded_cb cb, void *ud);
/* Drill: cuts every peer connection and refuses new ones for duration_ms. */
void zg_transport_isolate(struct raft_uv_transport *t, unsigned duration_ms);

/* Reports that an authenticated inbound peer connection handed to raft was
 * ended by the peer or the network (EOF, reset, write error), never one
 * this node dialled or cut itself. peer is the raft id the handshake
 * proved. */
typedef void (*zg_peer_lost_cb)(void *ud, raft_id peer);
void zg_transport_on_peer_lost(struct raft_uv_transport *t, zg_peer_lost_cb cb, void *ud);

/* ---- early election on leader loss (leader_loss.c) ------------------------ */
/* raft_uv's raft_io, with its start method wrapped to remember libraft's
 * receive callback, so that a message can be delivered to raft from here.
 * `io` must stay the first member. */
struct zg_io_tap {
  struct raft_io io; /* raft_uv_init it, then give it to raft_init */
  int (*uv_start)(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick,
                  raft_io_recv_cb recv);  /* raft_uv's own */
  raft_io_recv_cb recv_cb;                /* libraft's, once started */
  raft_io_tick_cb tick_cb;                /* libraft's, once started */
  unsigned election_ms, fast_election_ms; /* normal; while an expedited candidate */
  bool expedited;                         /* the fast timeout is in force */
  bool disrupting;            /* our candidacy came from zg_leader_lost (until it ends) */
  bool in_candidacy;          /* raft was a candidate at the last settle */
  uint64_t expedite_until_ms; /* zg_mono_ms() when it ends at the latest */
  unsigned silent_ms;         /* leader silence after which a vote request is judged (tap_recv) */
  uint64_t hold_term, hold_until_ms; /* a disrupting win: not ready before hold_until_ms */
  uint64_t no_votes_until_ms;        /* after zg_leader_lost: vote requests dropped until */
  unsigned hold_ms;                  /* the old leader's longest lease: one election timeout */
  /* A follower's election timer: election_ms + timer_min_ms + a draw in
   * [0, timer_span_ms) (zg_leader_loss_settle), instead of libraft's
   * uniform 1x..2x. follower_timeout_ms is the value last set. */
  unsigned timer_min_ms, timer_span_ms, follower_timeout_ms;
  /* A voter that refused a disrupt-leader candidate whose log is behind
   * its own (only it, not that candidate, can win) since this zg_mono_ms()
   * (0: not): its follower timer is one election timeout. */
  uint64_t ahead_since_ms;
  raft_id ahead_leader; /* the leader it knew then (0: none) */
  bool refused;         /* our expedited candidacy got an explicit "no" in its term */
  /* The last message from each peer (zg_mono_ms()), for
   * zg_io_tap_quorum_heard; peers beyond ZG_TAP_PEERS are not tracked. */
#define ZG_TAP_PEERS 16
  struct {
    raft_id id;
    uint64_t at_ms;
    /* As leader: the last index this peer reported in its last
     * AppendEntries result (accepted or rejected), and when. */
    raft_index reported_last;
    uint64_t reported_at_ms;
  } heard[ZG_TAP_PEERS];
  /* As follower: the last AppendEntries seen (zg_mono_ms(), 0: none), the
   * leader's commit index it carried, and its sender: the follower learns
   * from it how far behind the leader it is (node.c, check_log_behind). */
  uint64_t ae_at_ms;
  raft_index ae_leader_commit;
  raft_id ae_from;
  uint64_t draw_state; /* xorshift64 state, seeded from the OS */
};
/* The term of the last entry in r's log (0: empty). */
raft_term zg_leader_loss_last_log_term(const struct raft *r);
/* True for a message the tap keeps from libraft: a pre-vote answer that
 * reaches a node which is no longer a candidate (works around a libraft
 * 0.22.1 bug that lets such an answer bump the term and depose a healthy
 * leader; see leader_loss.c). `r` may be NULL (not started: false). */
bool zg_leader_loss_drops(const struct raft *r, const struct raft_message *m);
/* As leader: the last index `peer` reported in an AppendEntries result
 * received within the last within_ms (into *last): true, else false. */
bool zg_io_tap_reported_last(const struct zg_io_tap *tap, raft_id peer, unsigned within_ms,
                             raft_index *last);
/* Call after raft_uv_init(&tap->io, ...) and before raft_init; the
 * timeouts are cluster.election_timeout_ms and cluster.heartbeat_ms. */
void zg_io_tap_init(struct zg_io_tap *tap, unsigned election_ms, unsigned heartbeat_ms);
/* Ranks this node's follower election timer (see leader_loss.c): a
 * gateway node fires within [1, 1.125) election timeouts of the leader's
 * last message, a witness within [1.5, 2), so the surviving gateway node
 * asks first and alone. `seed` comes from the OS. */
void zg_io_tap_rank(struct zg_io_tap *tap, bool witness, uint64_t seed);
/* Call after every loop turn: once an expedited candidate is no longer a
 * candidate, or the expedite window is over, puts the normal election
 * timeout back; gives a follower whose timer libraft re-drew the ranked
 * timeout. */
void zg_leader_loss_settle(struct zg_io_tap *tap, struct raft *r);
/* When raft's election timer (follower or candidate) runs out, in raft_uv
 * time (ms, io->time): true and *due set, false for a leader. libraft only
 * looks at it on its tick (every heartbeat_ms), which adds up to one
 * heartbeat to every failover; node.c runs zg_io_tap_tick at *due. */
bool zg_leader_loss_timer_due(const struct zg_io_tap *tap, const struct raft *r, uint64_t *due);
/* True if voters of raft's configuration that make a majority (this node
 * counted when it is a voter) sent this node any Raft message within the
 * last within_ms: it is not cut off, whoever leads. */
bool zg_io_tap_quorum_heard(const struct zg_io_tap *tap, const struct raft *r, unsigned within_ms);
/* Hands raft one tick (libraft's RAFT_TIMEOUT event: the time-based rules,
 * which only act on what is due), as raft_uv's own tick timer does. */
void zg_io_tap_tick(struct zg_io_tap *tap);
/* True while a leader that won a leader-loss election must not act as the
 * fenced leader yet (the old leader's lease may still run). */
bool zg_leader_loss_holding(const struct zg_io_tap *tap, struct raft *r);
/* The connection to `peer` ended. If raft is a persisted follower of that
 * very leader, delivers a TimeoutNow from it (libraft's leadership-transfer
 * message, thesis §3.10), so raft starts an election now with the
 * disrupt-leader flag. Returns true if raft became a candidate. */
bool zg_leader_lost(struct zg_io_tap *tap, struct raft *r, raft_id peer);
/* A connection that ends does not prove the peer dead (a reset by a
 * firewall, a conntrack flush, a spoofed RST). The probe asks the peer's
 * raft `address` ("host:port") for a new TCP connection and holds it for
 * timeout_ms: a refusal, or a connection the peer's side ends (an exiting
 * process's kernel completes it from the listen queue, then resets it),
 * means nothing serves there any more. cb(ud, peer, refused, status) is
 * called exactly once, from the loop: refused is true only in those cases;
 * a connection that stays up (a live node waits for our handshake), no
 * answer, any other error or zg_probe_cancel() gives false; status is the
 * last one seen (0, a UV_E* code, 1: no answer). The probe frees itself
 * after cb. Returns 0, or -1 (bad address, no memory: no cb). */
struct zg_probe;
typedef void (*zg_probe_cb)(void *ud, raft_id peer, bool refused, int status);
int zg_probe_start(uv_loop_t *loop, const char *address, unsigned timeout_ms, raft_id peer,
                   zg_probe_cb cb, void *ud, struct zg_probe **out);
void zg_probe_cancel(struct zg_probe *p);

/* ---- torn-tail repair (repair.c) ----------------------------------------- */
/* Before libraft reads raft_dir: cuts an incomplete final batch off the last
 * open segment (see repair.c). 0: nothing to do, or repaired (then msg says
 * what was cut); -1: damage that is not a torn tail, msg is one line naming
 * the file and what to do, nothing was changed. */
int zg_raft_repair_torn_tail(const char *raft_dir, char *msg, size_t msglen);
/* libraft's CRC-32 (byteCrc32) of len bytes, continuing from crc (0 to
 * start): what raft_uv stores in each batch's preamble. */
uint32_t zg_raft_crc32(const void *data, size_t len, uint32_t crc);

/* ---- a log that lost entries its leader counts as stored (log_gap.c) ---- */
#define ZG_GAP_TIMEOUTS 5        /* follower: election timeouts without progress */
#define ZG_GAP_REPEAT_MS 300000u /* follower: the ERROR line again at most this often */
enum zg_gap_event { ZG_GAP_NONE, ZG_GAP_STUCK, ZG_GAP_CLEARED };
struct zg_gap_follower {
  uint64_t since_ms;        /* behind and not moving since (0: not) */
  raft_index last;          /* our last index then */
  bool behind;              /* reported stuck, not cleared yet */
  uint64_t reported_ms;     /* last ERROR line */
  raft_index leader_commit; /* the leader's commit index at that line */
};
/* One sample, every loop turn: following (a follower), the last
 * AppendEntries' arrival (zg_mono_ms(), 0: none) and the leader's commit
 * index in it, our last log index. ZG_GAP_STUCK when the leader's commit
 * index has been above our last index, which did not move, for
 * ZG_GAP_TIMEOUTS election timeouts while the leader kept sending (again
 * every ZG_GAP_REPEAT_MS while it lasts), ZG_GAP_CLEARED when the log
 * moves or reaches the leader's commit index after that. g zeroed at first. */
enum zg_gap_event zg_gap_follower_step(struct zg_gap_follower *g, uint64_t now_ms, bool following,
                                       uint64_t ae_at_ms, raft_index leader_commit, raft_index last,
                                       unsigned election_ms);
struct zg_gap_leader {
  uint64_t since_ms;   /* reporting below its match index since (0: not) */
  uint64_t acted_term; /* the term it was acted on (once per term) */
};
/* One sample per follower as leader: reported (an AppendEntries result
 * arrived within an election timeout) with the last index it reported,
 * and libraft's match index for it. True once, per term, when it has kept
 * reporting below its match index for two election timeouts: its log lost
 * entries it had acknowledged. g zeroed at first. */
bool zg_gap_leader_step(struct zg_gap_leader *g, uint64_t now_ms, uint64_t term, bool reported,
                        raft_index reported_last, raft_index match, unsigned election_ms);

#endif
