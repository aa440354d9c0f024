/* consensus: the replicated state of a zonegate cluster.
 *
 * One libraft group (raft_uv on-disk storage, an authenticated TCP peer
 * transport) replicates a small state machine: the gateway config (versioned),
 * provider keys (secrets sealed with AES-256-GCM under the master key before
 * they enter the log), client tokens (SHA-256 only, with their limits), a
 * bounded audit trail and bounded usage counters (consensus/usage.c).
 *
 * It uses base/ only (cmake/modules.cmake); failover/ reads it to decide the
 * role, node/ to answer the gateway's token and key questions.
 *
 * Everything runs on the caller's uv loop; no function here is thread-safe.
 * Reads look at the state applied on this node. Writes are accepted only on
 * the leader and answer after the entry is committed and applied here.
 */
#ifndef ZG_CONSENSUS_H
#define ZG_CONSENSUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>
#include <cjson/cJSON.h>

struct consensus; /* opaque */

enum consensus_role { CONSENSUS_GATEWAY, CONSENSUS_WITNESS };

/* Error statuses (negative) passed to callbacks and returned by calls. */
enum {
  CONSENSUS_OK = 0,
  CONSENSUS_ENOTLEADER = -1, /* this node is not the (fenced) leader: forward the write */
  CONSENSUS_ECONFLICT = -2,  /* If-Match version mismatch */
  CONSENSUS_ENOTFOUND = -3,  /* key/token id unknown */
  CONSENSUS_EINVALID = -4,   /* bad argument; the message names the field */
  CONSENSUS_ESHUTDOWN = -5,  /* consensus_close() was called */
  CONSENSUS_EIO = -6,        /* raft or disk failure */
  CONSENSUS_ENOMEM = -7,
  CONSENSUS_EBUSY = -8, /* another membership change / transfer is under way */
  /* A leadership transfer ended with this node still leader (the target
   * was not caught up, did not answer, or lost the election it started). */
  CONSENSUS_ENOTMOVED = -9,
};
const char *consensus_strerror(int status);

/* One voter of the static initial configuration. */
struct consensus_member {
  const char *id, *zone;
  enum consensus_role role;
  const char *raft_address;                    /* host:port peers connect to */
  const char *admin_address, *gateway_address; /* may be NULL; kept for status/forwarding */
};

enum consensus_event {
  CONSENSUS_EV_LEADER_CHANGED, /* raft leader, term or fenced-leader state changed */
  CONSENSUS_EV_STATE_APPLIED,  /* fsm changed: config/keys/tokens */
  CONSENSUS_EV_CONFIG_CHANGED, /* replicated gateway config has a new version */
  CONSENSUS_EV_KEYS_CHANGED,   /* provider keys changed */
  CONSENSUS_EV_DISK_ERROR,     /* raft reported an I/O error / became unavailable */
};

struct consensus_options {
  const struct consensus_member *self;  /* self->raft_address = the address others use for us */
  const char *raft_listen;              /* bind address, e.g. 0.0.0.0:18791 (NULL: raft_address) */
  const struct consensus_member *peers; /* every OTHER member */
  size_t n_peers;
  const char *data_dir;       /* created 0700 if missing; raft files live in data_dir/raft */
  const char *cluster_secret; /* >= 16 chars; HMAC key for the peer handshake */
  const uint8_t *master_key;  /* 32 bytes; AES-256-GCM key for provider key secrets */
  unsigned election_timeout_ms, heartbeat_ms;     /* defaults 1000 / 100 */
  unsigned snapshot_threshold, snapshot_trailing; /* defaults 1024 / 128 */
  unsigned audit_max;                             /* bounded audit trail, default 1000 records */
  const cJSON *seed_config; /* replicated gateway config seeded when a new cluster is bootstrapped
                               (borrowed; copied during consensus_start) */
  const cJSON
      *seed_tokens; /* array of {"name","sha256"}, seeded at bootstrap (borrowed, may be NULL) */
  void (*on_event)(void *ud, enum consensus_event ev); /* may be NULL */
  void *ud;
  /* Added: milliseconds a restarted node (non-empty data dir) stays off the
   * network before joining, so it cannot vote inside a lease it acknowledged
   * before a crash. 0 = election_timeout_ms. A freshly bootstrapped node joins
   * at once. */
  unsigned startup_quiet_ms;
  /* Added: true for a node that joins an existing cluster (the leader calls
   * consensus_add_member for it): an empty data dir is NOT bootstrapped, the
   * node waits to be contacted by the leader. `peers` then only feeds the
   * member metadata shown in status. */
  bool join_existing;
  /* Added: mutual TLS on the Raft transport (security.tls): a context from
   * base/tls.h (the transport takes a reference). NULL: plaintext. */
  struct ssl_ctx_st *tls;
};

/* Starts raft on `loop`. Returns 0 and *out, or a negative status with a
 * message in errmsg naming the failing call and path. Nothing is left open
 * on failure. `opts` and everything it points to are copied (borrowed only
 * during the call). */
int consensus_start(uv_loop_t *loop, const struct consensus_options *opts, struct consensus **out,
                    char *errmsg, size_t errlen);
/* Closes raft and all handles; pending writes get CONSENSUS_ESHUTDOWN. `done`
 * runs (from the loop) once all memory is released. */
void consensus_close(struct consensus *c, void (*done)(void *arg), void *arg);

/* Writes. Ownership of `args` is taken (always, even on error). `actor` = who
 * (token name/"admin"), `source` = from where (IP); both copied.
 *
 * The callback runs exactly once: after the entry is committed AND applied on
 * this node (status 0), or with an error (status < 0). When the write is
 * rejected at once (ENOTLEADER, EINVALID, ESHUTDOWN, ENOMEM) the callback runs
 * before consensus_write returns and the same status is returned; otherwise
 * consensus_write returns 0 and the callback runs later from the loop.
 * `result` (owned by the callee, valid only during the callback, NULL on
 * error) is the applied object's metadata, never a secret.
 *
 * Types: config.put, key.add, key.rotate, key.revoke, key.invalidate,
 * token.create, token.update, token.revoke, audit.note, usage.add (one row
 * each in the command table, consensus/commands.c, which lists their fields).
 *
 * token.create / token.update limits: rpm (requests per minute), tpm
 * (tokens per minute), budget_day / budget_month (tokens per UTC day /
 * month); whole numbers, 0 = none. token.update {"id": id or name, any of
 * rpm, tpm, budget_day, budget_month, expires_at (wall ms, 0 = never),
 * allow ([] = any address)}: absent fields are unchanged; a name that
 * matches several tokens is ECONFLICT (use the id).
 *
 * usage.add {"at": unix s, "rows": [{"token", "model", "key", "requests",
 * "prompt", "completion", "total", "cached", "reasoning", "unknown"}],
 * "seconds": [{"token", "at", "requests", "tokens"}]}: the gateway's
 * counts of one flush interval (gateway/accounting.h). Not written to the
 * audit trail. */
typedef void (*consensus_write_cb)(void *ud, int status, const char *errmsg, const cJSON *result);
int consensus_write(struct consensus *c, const char *type, cJSON *args, const char *actor,
                    const char *source, consensus_write_cb cb, void *ud);

/* Reads (local applied state; pointers valid until the next apply/loop turn). */
const cJSON *consensus_config(const struct consensus *c); /* NULL before the seed applied */
uint64_t consensus_config_version(const struct consensus *c);

struct consensus_token_view {
  const char *id, *name;
  uint64_t expires_at;               /* wall ms, 0 = never */
  unsigned rpm;                      /* 0 = unlimited */
  uint64_t tpm;                      /* tokens per minute; 0 = unlimited */
  uint64_t budget_day, budget_month; /* tokens per UTC day / month; 0 = unlimited */
  size_t n_allow;
  const char *const *allow; /* CIDR strings; n_allow == 0: any address */
};
/* True if a non-revoked token with this SHA-256 (lowercase hex) exists.
 * Expiry is NOT checked here (the view carries expires_at). */
bool consensus_token_lookup(const struct consensus *c, const char sha256_hex[65],
                            struct consensus_token_view *out);

/* Keys usable for an upstream, in priority order (active first, then retiring
 * before their retire_at). The secret is opened with the master key into a
 * malloc'd string the caller frees with zg_secret_free(). Returns count
 * written. A key whose secret cannot be opened is skipped (logged). */
struct consensus_key_use {
  char id[48];
  char *secret;
};
size_t consensus_usable_keys(const struct consensus *c, const char *upstream,
                             struct consensus_key_use *out, size_t max);

/* One usable key by id: active, or retiring before its retire_at. Fills
 * out->id and out->secret (malloc'd; the caller frees it with
 * zg_secret_free()) and returns true; false (out untouched) when the id is
 * unknown, revoked, invalid, past its retire_at, or its secret cannot be
 * opened (logged). */
bool consensus_key_by_id(const struct consensus *c, const char *id, struct consensus_key_use *out);

/* Replicated usage counters of one client token (by name) at wall second
 * now_s (unix s, UTC): requests and tokens in the 60 s window
 * (now_s - 60, now_s], minute_oldest_s the oldest second of that window
 * with traffic (0: none), and the token totals of now_s's UTC day and
 * UTC month. Unknown token or no traffic: all 0. Never fails. */
struct consensus_usage_view {
  uint64_t minute_requests, minute_tokens, minute_oldest_s;
  uint64_t day_tokens, month_tokens;
};
void consensus_usage_view(const struct consensus *c, const char *token, uint64_t now_s,
                          struct consensus_usage_view *out);
/* Usage totals as a new JSON document (caller cJSON_Deletes it; NULL only
 * when out of memory). token / model: exact filters, NULL = all.
 * since_s: unix s; 0 = everything kept (each row's counters since it
 * appeared), otherwise the hourly buckets from the hour holding since_s
 * (hour granularity; buckets are kept 62 days). Shape:
 * {"since", "since_hour", "rows": [{"token", "model", "keys" (provider
 * keys summed), "requests", "prompt", "completion", "total", "cached",
 * "reasoning", "unknown"}] (sorted by token, model; rows with nothing in
 * the window left out), "sum": {the same counters}, "dropped" (requests
 * the store's caps refused, ever)}. Counts are tokens as the upstream
 * reported them; "unknown" counts answers without a usage object. */
cJSON *consensus_usage_query(const struct consensus *c, const char *token, const char *model,
                             uint64_t since_s);

/* Caller frees the returned cJSON (cJSON_Delete). Never contain secrets. */
cJSON *consensus_keys_json(const struct consensus *c);   /* id, upstream, state, created_at,
                                    rotate_after_days, age_days, retire_at, rotation_due */
cJSON *consensus_tokens_json(const struct consensus *c); /* id, name, created_at, expires_at, rpm,
                                                            tpm, budget_day, budget_month, allow,
                                                            sha256_prefix (8 chars) */
cJSON *consensus_audit_json(const struct consensus *c, size_t limit); /* newest last; 0 = all */
/* node, leader {id, address}, term, commit_index, applied_index, last_log_index,
 * state (follower/candidate/leader/unavailable), is_leader (fenced), log_behind_leader
 * (consensus_log_behind), superseded (consensus_superseded), incarnation (the
 * cluster incarnation, 32 hex digits; null while a joiner waits to learn it), members [...] */
cJSON *consensus_status_json(const struct consensus *c);

/* True once a raft peer of a newer cluster incarnation was met (this
 * node's data predates a `recover --force` elsewhere): the transport then
 * refuses every peer, and the node must serve nothing (failover/role.c).
 * The data dir is marked; the next start refuses it with one line. */
bool consensus_superseded(const struct consensus *c);
bool consensus_is_leader(const struct consensus *c); /* raft leader AND its post-election barrier
                                                        has committed in the current term */
/* The two halves of consensus_is_leader, for failover's role table:
 * raft leader whose post-election barrier committed in the current term
 * (and, after an election started because the old leader's connection
 * ended, one election timeout has passed since the win: the old leader's
 * lease may run until then; consensus/leader_loss.c);
 * a leadership transfer started by this leader and not yet finished. */
bool consensus_barrier_committed(const struct consensus *c);
bool consensus_transfer_under_way(const struct consensus *c);
unsigned consensus_voter_count(const struct consensus *c); /* in the latest configuration */
/* True if a majority of the voters (this node included when it votes)
 * sent this node a Raft message within the last within_ms: a node that
 * knows no leader but can still reach a quorum takes part in the
 * election; one that cannot is cut off. */
bool consensus_quorum_heard(const struct consensus *c, unsigned within_ms);
const struct consensus_member *consensus_leader(const struct consensus *c); /* NULL if unknown */
const struct consensus_member *consensus_self(const struct consensus *c);
uint64_t consensus_term(const struct consensus *c);
uint64_t consensus_commit_index(const struct consensus *c);
uint64_t consensus_applied_index(const struct consensus *c);
uint64_t consensus_last_log_index(const struct consensus *c);
/* True while this follower's log is stuck behind its leader: the leader's
 * commit index stayed above our last index, which did not move, for
 * several election timeouts (it lost entries the leader counts as stored
 * here; consensus/log_gap.c). Not a healthy standby then. */
bool consensus_log_behind(const struct consensus *c);

/* Leadership transfer to `to_node_id` (NULL = the most caught-up voter).
 * cb status 0 when this node is no longer leader afterwards, else
 * CONSENSUS_ENOTMOVED (or CONSENSUS_ESHUTDOWN when closing). The callback
 * runs exactly once unless the call returns an error (ENOTLEADER,
 * EINVALID: unknown or self target, ENOMEM, or libraft's refusal mapped). */
int consensus_transfer_leadership(struct consensus *c, const char *to_node_id,
                                  void (*cb)(void *ud, int status), void *ud);
/* Commits a barrier (for the failover lease). cb runs exactly once unless the
 * call returns an error. */
int consensus_barrier(struct consensus *c, void (*cb)(void *ud, int status), void *ud);

/* Membership: adds `m` as a spare, then assigns it the voter role (libraft
 * catches it up before promotion). `m` is copied. The new member's metadata
 * is kept on this node only (status); the new node itself must list the
 * existing members as its peers. cb runs exactly once unless an error is
 * returned. */
int consensus_add_member(struct consensus *c, const struct consensus_member *m,
                         void (*cb)(void *ud, int status, const char *errmsg), void *ud);
int consensus_remove_member(struct consensus *c, const char *node_id,
                            void (*cb)(void *ud, int status, const char *errmsg), void *ud);

/* Drill "isolate": drops all raft peer traffic of this node for duration_ms
 * (live peer connections are cut, new ones refused both ways); the client
 * and admin ports are untouched. A leader loses its lease and steps down;
 * afterwards the node rejoins on its own. 0 ok, CONSENSUS_ESHUTDOWN. */
int consensus_isolate(struct consensus *c, unsigned duration_ms);

/* Offline disaster recovery (consensus/recover.c), on a STOPPED node's
 * data dir. inspect: the log's current term and last index (pick the
 * survivor with the longest log). recover_single: force a configuration
 * of this node alone (libraft raft_recover) and give it a new cluster
 * incarnation; afterwards the node starts as a one-voter cluster, nodes
 * still holding the old data are refused at the peer handshake, and the
 * others rejoin with empty data dirs (`zonegate members add`). Both
 * return 0, or -1 with a message. */
int consensus_inspect_log(const char *data_dir, const char *node_id, const char *raft_address,
                          uint64_t *term, uint64_t *last_index, char *errmsg, size_t errlen);
int consensus_recover_single(const char *data_dir, const char *node_id, const char *raft_address,
                             char *errmsg, size_t errlen);

/* Stable raft id of a node id (64-bit FNV-1a, never 0). */
uint64_t consensus_raft_id(const char *node_id);

#endif
