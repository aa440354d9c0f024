/* node.c: the consensus node: starts libraft on raft_uv storage with the
 * authenticated transport and the zonegate state machine, tracks leadership,
 * submits writes and answers reads from the applied state.
 *
 * Start-up: check options, create data_dir (0700), verify the master key
 * against data_dir/keycheck, raft_uv_init on data_dir/raft, raft_init,
 * raft_bootstrap (a fresh dir: self + peers, all voters, sorted by raft id)
 * and raft_start, as an init ladder: a failure undoes exactly the steps that
 * succeeded, in reverse, and returns an error naming the call and the path.
 * A node that restarts from disk stays off the network for one election
 * timeout (see transport.c). A new leader commits a barrier before
 * consensus_is_leader() turns true; the first such leader of a fresh cluster
 * seeds the replicated config and tokens. State changes are noticed from a
 * uv_check handle after every loop turn; RAFT_UNAVAILABLE (raft's answer to
 * disk errors) is logged as ERROR and reported as CONSENSUS_EV_DISK_ERROR.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

#define KEYCHECK_FILE "keycheck"
#define KEYCHECK_PURPOSE "keycheck"
#define KEYCHECK_CONSTANT "zonegate master key check v1"

struct member_rec {
  struct consensus_member pub; /* strings point at owned copies below */
  char *id, *zone, *raft_address, *admin_address, *gateway_address;
  raft_id raft_id;
  raft_index last_match;
  uint64_t last_progress_ms; /* monotonic: last time its match index advanced or was current */
  struct zg_gap_leader gap;  /* as leader: has its log lost entries it acked? (log_gap.c) */
  bool lost_waiting;         /* its lost entries were reported; waiting for a voter to take over */
};

struct pending_write {
  struct raft_apply req;
  struct consensus *c;
  char req_id[17];
  consensus_write_cb cb;
  void *ud;
  bool applied;
  int status;
  char errmsg[256];
  cJSON *result;
  struct pending_write *next, *prev;
};

struct consensus {
  uv_loop_t *loop;
  struct raft raft;
  struct zg_io_tap io; /* raft_uv's io, plus leader-loss delivery (leader_loss.c) */
  /* the leader whose connection ended while our log was still being
   * persisted: retried every loop turn until lost_leader_until_ms */
  raft_id lost_leader;
  uint64_t lost_leader_until_ms;
  unsigned election_ms, heartbeat_ms;
  struct zg_probe *probe; /* is the leader whose connection ended gone? */
  unsigned probe_attempts;
  struct raft_uv_transport transport;
  struct zg_fsm fsm;
  uv_check_t check;
  bool check_open;
  uv_timer_t wake; /* wakes the loop when a leader-loss hold ends (check_cb) */
  uint64_t wake_term;
  /* Ticks raft when its election timer runs out (zg_leader_loss_timer_due),
   * not up to a heartbeat later; election_due: raft_uv time it is armed for. */
  uv_timer_t election_tick;
  uint64_t election_due;
  struct member_rec *members; /* [0] = self */
  size_t n_members;
  uint8_t master_key[32];
  char *data_dir, *raft_dir;
  void (*on_event)(void *ud, enum consensus_event ev);
  void *ud;
  cJSON *seed_config, *seed_tokens;
  /* cluster incarnation (incarnation.c); known false while a joiner waits */
  struct zg_incarnation incarnation;
  bool incarnation_known;
  bool superseded; /* a peer of a newer incarnation was met (on_superseded) */
  /* leadership tracking */
  unsigned last_state;
  raft_id last_leader;
  raft_term last_term;
  raft_term barrier_submitted_term, barrier_committed_term;
  bool last_fenced;
  bool seed_inflight;
  bool disk_error_reported;
  struct zg_gap_follower gap; /* as follower: stuck behind the leader? (log_gap.c) */
  /* As leader: no answer from a majority while our own messages still go
   * out (check_unheard): since when (0: heard), the last check, and the
   * term in which this leader fenced itself and asks a follower to run. */
  uint64_t unheard_since_ms, unheard_check_ms;
  raft_term unheard_fenced_term;
  struct pending_write *pending;
  /* shutdown */
  bool closing;
  int close_waits;
  void (*close_done)(void *arg);
  void *close_arg;
};

const char *consensus_strerror(int status) {
  switch (status) {
  case CONSENSUS_OK:
    return "ok";
  case CONSENSUS_ENOTLEADER:
    return "not the leader";
  case CONSENSUS_ECONFLICT:
    return "version conflict";
  case CONSENSUS_ENOTFOUND:
    return "not found";
  case CONSENSUS_EINVALID:
    return "invalid argument";
  case CONSENSUS_ESHUTDOWN:
    return "shutting down";
  case CONSENSUS_EIO:
    return "raft or disk error";
  case CONSENSUS_ENOMEM:
    return "out of memory";
  case CONSENSUS_EBUSY:
    return "busy";
  case CONSENSUS_ENOTMOVED:
    return "leadership did not move (the target was not caught up, did not answer, or lost "
           "the election it was asked to start)";
  default:
    return "unknown error";
  }
}

uint64_t consensus_raft_id(const char *node_id) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const unsigned char *p = (const unsigned char *)node_id; *p; p++) {
    h ^= *p;
    h *= 0x100000001b3ull;
  }
  return h ? h : 1;
}

static void emit(struct consensus *c, enum consensus_event ev) {
  if (c->on_event && !c->closing) c->on_event(c->ud, ev);
}

/* ---- members -------------------------------------------------------------- */

static char *dup_or_null(const char *s) {
  return s ? strdup(s) : NULL;
}

static void member_free(struct member_rec *m) {
  free(m->id);
  free(m->zone);
  free(m->raft_address);
  free(m->admin_address);
  free(m->gateway_address);
}

static int member_copy(struct member_rec *dst, const struct consensus_member *src) {
  memset(dst, 0, sizeof *dst);
  dst->id = strdup(src->id);
  dst->zone = strdup(src->zone ? src->zone : "");
  dst->raft_address = strdup(src->raft_address);
  dst->admin_address = dup_or_null(src->admin_address);
  dst->gateway_address = dup_or_null(src->gateway_address);
  if (!dst->id || !dst->zone || !dst->raft_address || (src->admin_address && !dst->admin_address) ||
      (src->gateway_address && !dst->gateway_address)) {
    member_free(dst);
    return -1;
  }
  dst->pub = (struct consensus_member){dst->id,           dst->zone,          src->role,
                                       dst->raft_address, dst->admin_address, dst->gateway_address};
  dst->raft_id = consensus_raft_id(src->id);
  return 0;
}

static struct member_rec *member_by_raft_id(const struct consensus *c, raft_id id) {
  for (size_t i = 0; i < c->n_members; i++)
    if (c->members[i].raft_id == id) return &c->members[i];
  return NULL;
}

static struct member_rec *member_by_id(const struct consensus *c, const char *id) {
  for (size_t i = 0; i < c->n_members; i++)
    if (strcmp(c->members[i].id, id) == 0) return &c->members[i];
  return NULL;
}

/* ---- files ---------------------------------------------------------------- */

/* Names the snapshot file raft_start refused: libraft hands the state
 * machine only the bytes, so this picks the newest snapshot-TERM-INDEX-TS
 * data file (libraft's own order) of that size. "" when none matches. */
static void refused_snapshot_name(const char *raft_dir, size_t len, char *out, size_t outlen) {
  unsigned long long best[3] = {0, 0, 0};
  out[0] = '\0';
  DIR *d = opendir(raft_dir);
  if (d == NULL) return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    unsigned long long t, i, ts;
    int used = 0;
    if (sscanf(e->d_name, "snapshot-%llu-%llu-%llu%n", &t, &i, &ts, &used) != 3 ||
        e->d_name[used] != '\0')
      continue;
    char path[4200];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", raft_dir, e->d_name);
    if (stat(path, &st) != 0 || (size_t)st.st_size != len) continue;
    bool newer = out[0] == '\0' || t > best[0] || (t == best[0] && i > best[1]) ||
                 (t == best[0] && i == best[1] && ts > best[2]);
    if (!newer) continue;
    best[0] = t, best[1] = i, best[2] = ts;
    snprintf(out, outlen, "%s", path);
  }
  closedir(d);
}

static int ensure_dir(const char *path, char *errmsg, size_t errlen) {
  struct stat st;
  char partial[4096];
  size_t len = strlen(path);
  if (len >= sizeof partial) {
    snprintf(errmsg, errlen, "data dir path is too long");
    return -1;
  }
  /* Parents first (like mkdir -p), each created 0700 if missing. */
  for (size_t i = 1; i < len; i++) {
    if (path[i] != '/') continue;
    memcpy(partial, path, i);
    partial[i] = '\0';
    if (mkdir(partial, 0700) != 0 && errno != EEXIST) {
      snprintf(errmsg, errlen, "mkdir(%s): %s", partial, strerror(errno));
      return -1;
    }
  }
  if (mkdir(path, 0700) != 0 && errno != EEXIST) {
    snprintf(errmsg, errlen, "mkdir(%s): %s", path, strerror(errno));
    return -1;
  }
  if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
    snprintf(errmsg, errlen, "data dir %s is not a directory", path);
    return -1;
  }
  if (access(path, R_OK | W_OK | X_OK) != 0) {
    snprintf(errmsg, errlen, "data dir %s is not readable and writable by this user: %s", path,
             strerror(errno));
    return -1;
  }
  return 0;
}

static int keycheck(struct consensus *c, char *errmsg, size_t errlen) {
  char path[4096], tmp[4200], buf[512], err[256];
  snprintf(path, sizeof path, "%s/%s", c->data_dir, KEYCHECK_FILE);
  FILE *f = fopen(path, "r");
  if (f != NULL) {
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) buf[--n] = '\0';
    char *plain = NULL;
    if (zg_unseal(c->master_key, KEYCHECK_PURPOSE, buf, &plain, NULL, err, sizeof err) != 0 ||
        strcmp(plain, KEYCHECK_CONSTANT) != 0) {
      zg_secret_free(plain);
      snprintf(errmsg, errlen,
               "master key does not match the one this data dir was sealed with (%s); use the "
               "original ZONEGATE_MASTER_KEY",
               path);
      return -1;
    }
    zg_secret_free(plain);
    return 0;
  }
  if (errno != ENOENT) {
    snprintf(errmsg, errlen, "open(%s): %s", path, strerror(errno));
    return -1;
  }
  char *sealed = NULL;
  if (zg_seal(c->master_key, KEYCHECK_PURPOSE, KEYCHECK_CONSTANT, strlen(KEYCHECK_CONSTANT),
              &sealed, err, sizeof err) != 0) {
    snprintf(errmsg, errlen, "%s", err);
    return -1;
  }
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  bool ok = fd >= 0;
  if (ok) {
    size_t len = strlen(sealed);
    ok = write(fd, sealed, len) == (ssize_t)len && write(fd, "\n", 1) == 1 && fsync(fd) == 0;
    close(fd);
    ok = ok && rename(tmp, path) == 0;
  }
  free(sealed);
  if (!ok) {
    snprintf(errmsg, errlen, "writing %s: %s", path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  return 0;
}

/* ---- writes ----------------------------------------------------------------- */

static int map_raft_status(int rv) {
  switch (rv) {
  case 0:
    return 0;
  case RAFT_NOTLEADER:
  case RAFT_LEADERSHIPLOST:
    return CONSENSUS_ENOTLEADER;
  case RAFT_SHUTDOWN:
  case RAFT_CANCELED:
    return CONSENSUS_ESHUTDOWN;
  case RAFT_NOMEM:
    return CONSENSUS_ENOMEM;
  case RAFT_BUSY:
  case RAFT_CANTCHANGE:
    return CONSENSUS_EBUSY;
  case RAFT_BADID:
  case RAFT_DUPLICATEID:
  case RAFT_DUPLICATEADDRESS:
  case RAFT_BADROLE:
  case RAFT_INVALID:
    return CONSENSUS_EINVALID;
  case RAFT_NOTFOUND:
    return CONSENSUS_ENOTFOUND;
  default:
    return CONSENSUS_EIO;
  }
}

static void pending_unlink(struct consensus *c, struct pending_write *pw) {
  if (pw->prev)
    pw->prev->next = pw->next;
  else if (c->pending == pw)
    c->pending = pw->next;
  if (pw->next) pw->next->prev = pw->prev;
  pw->next = pw->prev = NULL;
}

static void pending_finish(struct pending_write *pw, int status, const char *msg) {
  if (pw->applied) {
    if (pw->cb) pw->cb(pw->ud, pw->status, pw->errmsg, pw->status == 0 ? pw->result : NULL);
  } else if (pw->cb) {
    pw->cb(pw->ud, status, msg, NULL);
  }
  cJSON_Delete(pw->result);
  free(pw);
}

static void apply_cb(struct raft_apply *req, int status, void *result) {
  struct pending_write *pw = req->data;
  struct consensus *c = pw->c;
  (void)result; /* always NULL: results come through fsm_applied */
  pending_unlink(c, pw);
  char msg[256];
  int st = map_raft_status(status);
  if (status == 0) {
    st = CONSENSUS_EIO;
    snprintf(msg, sizeof msg, "entry committed but this node could not apply it (see log)");
  } else if (st == CONSENSUS_ENOTLEADER) {
    snprintf(msg, sizeof msg,
             "leadership lost before the write was applied here (%s); it may still commit",
             raft_strerror(status));
  } else {
    snprintf(msg, sizeof msg, "raft_apply(): %s", raft_strerror(status));
  }
  pending_finish(pw, st, msg);
}

static void fsm_applied(void *ud, const struct zgc_command *cmd, int status, const char *errmsg,
                        const cJSON *result, unsigned changed) {
  struct consensus *c = ud;
  if (cmd != NULL && cmd->req_id[0] != '\0') {
    for (struct pending_write *pw = c->pending; pw; pw = pw->next) {
      if (strcmp(pw->req_id, cmd->req_id) != 0) continue;
      pw->applied = true;
      pw->status = status;
      snprintf(pw->errmsg, sizeof pw->errmsg, "%s", errmsg ? errmsg : "");
      pw->result = result ? cJSON_Duplicate(result, true) : NULL;
      break;
    }
  }
  if (cmd != NULL && cmd->type == ZGC_CLUSTER_SEED) c->seed_inflight = false;
  if (changed & (ZG_CHANGED_CONFIG | ZG_CHANGED_KEYS | ZG_CHANGED_TOKENS))
    emit(c, CONSENSUS_EV_STATE_APPLIED);
  if (changed & ZG_CHANGED_CONFIG) emit(c, CONSENSUS_EV_CONFIG_CHANGED);
  if (changed & ZG_CHANGED_KEYS) emit(c, CONSENSUS_EV_KEYS_CHANGED);
}

static int submit(struct consensus *c, const char *type, cJSON *args, const char *actor,
                  const char *source, consensus_write_cb cb, void *ud) {
  char err[256];
  struct pending_write *pw = calloc(1, sizeof *pw);
  if (pw == NULL) {
    cJSON_Delete(args);
    if (cb) cb(ud, CONSENSUS_ENOMEM, "out of memory", NULL);
    return CONSENSUS_ENOMEM;
  }
  uint8_t raw[8];
  zg_random_bytes(raw, sizeof raw);
  for (int i = 0; i < 8; i++) snprintf(pw->req_id + 2 * i, 3, "%02x", raw[i]);
  struct raft_buffer buf;
  int rv = zg_build_entry(type, args, actor ? actor : "", source ? source : "", zg_wall_ms(),
                          pw->req_id, c->master_key, &buf, err, sizeof err);
  if (rv != 0) {
    free(pw);
    if (cb) cb(ud, rv, err, NULL);
    return rv;
  }
  pw->c = c;
  pw->cb = cb;
  pw->ud = ud;
  pw->req.data = pw;
  rv = raft_apply(&c->raft, &pw->req, &buf, 1, apply_cb);
  if (rv != 0) {
    /* libraft releases the entry buffer itself when raft_apply fails. */
    free(pw);
    int st = map_raft_status(rv);
    ZG_LOG_WARN("raft_apply_failed", "raft_apply(): %s (%s)", raft_strerror(rv),
                raft_errmsg(&c->raft));
    snprintf(err, sizeof err, "raft_apply(): %s", raft_strerror(rv));
    if (cb) cb(ud, st, err, NULL);
    return st;
  }
  pw->next = c->pending;
  if (pw->next) pw->next->prev = pw;
  c->pending = pw;
  return 0;
}

int consensus_write(struct consensus *c, const char *type, cJSON *args, const char *actor,
                    const char *source, consensus_write_cb cb, void *ud) {
  char err[160];
  if (c->closing) {
    cJSON_Delete(args);
    if (cb) cb(ud, CONSENSUS_ESHUTDOWN, "consensus is shutting down", NULL);
    return CONSENSUS_ESHUTDOWN;
  }
  if (type == NULL || zgc_type_from_name(type) == 0) {
    cJSON_Delete(args);
    snprintf(err, sizeof err, "unknown write type '%.60s'", type ? type : "(null)");
    if (cb) cb(ud, CONSENSUS_EINVALID, err, NULL);
    return CONSENSUS_EINVALID;
  }
  if (!consensus_is_leader(c)) {
    cJSON_Delete(args);
    if (cb) cb(ud, CONSENSUS_ENOTLEADER, "this node is not the leader", NULL);
    return CONSENSUS_ENOTLEADER;
  }
  return submit(c, type, args, actor, source, cb, ud);
}

/* ---- leadership tracking ------------------------------------------------ */

static void seed_done(void *ud, int status, const char *errmsg, const cJSON *result) {
  struct consensus *c = ud;
  c->seed_inflight = false;
  if (status != 0)
    ZG_LOG_WARN("consensus_seed_failed", "seeding the cluster state failed: %s", errmsg);
  else if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "seeded")))
    ZG_LOG_INFO("consensus_seeded", "cluster state seeded from the local config (version %llu)",
                (unsigned long long)c->fsm.st.config_version);
}

static void maybe_seed(struct consensus *c) {
  if (c->fsm.st.seeded || c->seed_inflight || !consensus_is_leader(c)) return;
  cJSON *args = cJSON_CreateObject();
  if (args == NULL) return;
  cJSON_AddItemToObject(
      args, "config", c->seed_config ? cJSON_Duplicate(c->seed_config, true) : cJSON_CreateNull());
  cJSON_AddItemToObject(
      args, "tokens", c->seed_tokens ? cJSON_Duplicate(c->seed_tokens, true) : cJSON_CreateArray());
  c->seed_inflight = true;
  if (submit(c, "cluster.seed", args, "bootstrap", "local", seed_done, c) != 0)
    c->seed_inflight = false;
}

struct barrier_req {
  struct raft_barrier req;
  struct consensus *c;
  raft_term term;
  void (*cb)(void *ud, int status); /* user barrier; NULL for the election barrier */
  void *ud;
};

static void election_barrier_cb(struct raft_barrier *req, int status) {
  struct barrier_req *b = req->data;
  struct consensus *c = b->c;
  raft_term term = b->term;
  free(b);
  if (c->closing) return;
  if (status != 0) {
    ZG_LOG_WARN("consensus_barrier_failed", "post-election barrier of term %llu failed: %s",
                (unsigned long long)term, raft_strerror(status));
    /* Still leader of that term: let the next loop turn submit another. */
    if (raft_state(&c->raft) == RAFT_LEADER && raft_current_term(&c->raft) == term)
      c->barrier_submitted_term = 0;
    return;
  }
  if (raft_state(&c->raft) == RAFT_LEADER && raft_current_term(&c->raft) == term) {
    c->barrier_committed_term = term;
    ZG_LOG_INFO("consensus_leader_ready", "leader of term %llu: barrier committed, state current",
                (unsigned long long)term);
  }
}

static void submit_election_barrier(struct consensus *c, raft_term term) {
  struct barrier_req *b = calloc(1, sizeof *b);
  if (b == NULL) return;
  b->c = c;
  b->term = term;
  b->req.data = b;
  c->barrier_submitted_term = term;
  int rv = raft_barrier(&c->raft, &b->req, election_barrier_cb);
  if (rv != 0) {
    free(b);
    c->barrier_submitted_term = 0; /* retried on the next loop turn */
    ZG_LOG_WARN("consensus_barrier_failed", "raft_barrier(): %s", raft_strerror(rv));
  }
}

static const char *state_name(unsigned state) {
  switch (state) {
  case RAFT_FOLLOWER:
    return "follower";
  case RAFT_CANDIDATE:
    return "candidate";
  case RAFT_LEADER:
    return "leader";
  default:
    return "unavailable";
  }
}

/* A voter other than `not_this` (and this node) whose match index is our
 * last index: the one to hand leadership to. NULL if none. */
static const struct member_rec *caught_up_voter(struct consensus *c,
                                                const struct member_rec *not_this) {
  raft_index last = raft_last_index(&c->raft);
  for (size_t i = 1; i < c->n_members; i++) {
    const struct member_rec *m = &c->members[i];
    raft_index match = 0;
    if (m == not_this || raft_match_index(&c->raft, m->raft_id, &match) != 0 || match < last)
      continue;
    for (unsigned k = 0; k < c->raft.configuration.n; k++)
      if (c->raft.configuration.servers[k].id == m->raft_id &&
          c->raft.configuration.servers[k].role == RAFT_VOTER)
        return m;
  }
  return NULL;
}

/* A follower that lost entries it had acknowledged (log_gap.c): libraft
 * would never resend them while we lead, so hand leadership to a caught-up
 * voter; the new leader's replication starts afresh and fills the gap. */
static void follower_lost_entries(struct consensus *c, struct member_rec *m, raft_index reported,
                                  raft_index match) {
  char what[300];
  snprintf(what, sizeof what,
           "%s reports its Raft log ends at index %llu but it had acknowledged up to %llu (damage "
           "cut its log, e.g. a torn tail repaired at its start-up)",
           m->id, (unsigned long long)reported, (unsigned long long)match);
  if (consensus_transfer_under_way(c)) {
    ZG_LOG_ERROR("raft_follower_lost_entries",
                 "%s; a leadership transfer is under way, and the next leader's replication "
                 "starts afresh",
                 what);
    return;
  }
  const struct member_rec *to = caught_up_voter(c, m);
  if (to == NULL) {
    /* No voter has our last entry this very moment (one is usually an
     * append behind under writes): try again at the next sample instead
     * of giving up for the term (seen in CI: the follower stayed behind).
     * Said once while it waits. */
    m->gap.acted_term = 0;
    if (!m->lost_waiting)
      ZG_LOG_ERROR("raft_follower_lost_entries",
                   "%s; libraft would never resend those entries while this node leads: "
                   "leadership moves as soon as another voter has caught up (or empty its data "
                   "dir and `zonegate members add` it again)",
                   what);
    m->lost_waiting = true;
    return;
  }
  bool was_waiting = m->lost_waiting;
  m->lost_waiting = false;
  if (consensus_transfer_leadership(c, to->id, NULL, NULL) != 0)
    ZG_LOG_ERROR("raft_follower_lost_entries",
                 "%s, and the leadership transfer to %s did not start: it stays behind until the "
                 "leader changes; or empty its data dir and `zonegate members add` it again",
                 what, to->id);
  else if (was_waiting) /* the ERROR line was written when the wait began */
    ZG_LOG_INFO("raft_lost_entries_handover",
                "%s has caught up: leadership moves to it, whose replication fills %s's log",
                to->id, m->id);
  else
    ZG_LOG_ERROR("raft_follower_lost_entries",
                 "%s; libraft would never resend those entries while this node leads, so "
                 "leadership moves to %s, whose replication starts afresh",
                 what, to->id);
}

static void track_progress(struct consensus *c) {
  uint64_t now = zg_mono_ms();
  raft_index last = raft_last_index(&c->raft);
  raft_term term = raft_current_term(&c->raft);
  for (size_t i = 1; i < c->n_members; i++) {
    struct member_rec *m = &c->members[i];
    raft_index match = 0, reported = 0;
    if (raft_match_index(&c->raft, m->raft_id, &match) != 0) continue;
    if (match > m->last_match || match >= last) m->last_progress_ms = now;
    m->last_match = match;
    bool heard = zg_io_tap_reported_last(&c->io, m->raft_id, c->election_ms, &reported);
    if (zg_gap_leader_step(&m->gap, now, term, heard, reported, match, c->election_ms))
      follower_lost_entries(c, m, reported, match);
  }
}

/* A raft message sent outside libraft (TimeoutNow): freed when sent. */
static void raw_send_done(struct raft_io_send *req, int status) {
  (void)status;
  free(req);
}

/* As leader: a majority has not answered for UNHEARD_RATIO of an election
 * timeout, on two checks a heartbeat apart with no loop stall between.
 * The usual cause is a one-way cut: the followers' messages to us are
 * lost while ours reach them, so they keep hearing our heartbeats and
 * wait for libraft's check-quorum to depose us (one election timeout),
 * then for their own timers (one more): 1.2-1.3 s through the LB (review
 * finding). Instead this leader fences itself at once (not ready: the
 * role machine drops the active role and renews no lease) and sends a
 * gateway follower TimeoutNow, as a leadership transfer does (Raft thesis
 * §3.10): a follower whose log matches ours starts the election now, with
 * the disrupt-leader flag. It is sent again every check until we are no
 * longer leader (libraft ignores it while the follower still persists an
 * entry). Safe: we stop serving before anyone is asked to run; if a
 * majority answers again, the fence goes and the lease decides as ever. */
#define UNHEARD_RATIO_NUM 3
#define UNHEARD_RATIO_DEN 4

static void send_timeout_now(struct consensus *c, const struct member_rec *to) {
  struct raft_io_send *req = calloc(1, sizeof(*req));
  if (req == NULL) return;
  struct raft_message m;
  memset(&m, 0, sizeof m);
  m.type = RAFT_TIMEOUT_NOW;
  m.server_id = to->raft_id;
  m.server_address = to->raft_address;
  m.timeout_now.term = raft_current_term(&c->raft);
  m.timeout_now.last_log_index = raft_last_index(&c->raft);
  m.timeout_now.last_log_term = zg_leader_loss_last_log_term(&c->raft);
  if (c->io.io.send(&c->io.io, req, &m, raw_send_done) != 0) free(req);
}

static void check_unheard(struct consensus *c, uint64_t now) {
  raft_term term = raft_current_term(&c->raft);
  bool stalled = c->unheard_check_ms && now - c->unheard_check_ms > 2ull * c->heartbeat_ms;
  c->unheard_check_ms = now;
  unsigned within = c->election_ms * UNHEARD_RATIO_NUM / UNHEARD_RATIO_DEN;
  if (raft_state(&c->raft) != RAFT_LEADER || c->n_members < 2 || stalled ||
      zg_io_tap_quorum_heard(&c->io, &c->raft, within)) {
    if (c->unheard_fenced_term == term && raft_state(&c->raft) == RAFT_LEADER)
      ZG_LOG_INFO("leader_heard_again", "a majority answers again: ready to lead (term %llu)",
                  (unsigned long long)term);
    c->unheard_since_ms = 0;
    c->unheard_fenced_term = 0;
    return;
  }
  if (c->unheard_since_ms == 0) c->unheard_since_ms = now;
  if (now - c->unheard_since_ms < c->heartbeat_ms) return; /* seen once: confirm next check */
  /* A gateway voter to run (the witness only hands leadership on). */
  const struct member_rec *to = NULL;
  for (size_t i = 1; i < c->n_members && to == NULL; i++)
    if (c->members[i].pub.role == CONSENSUS_GATEWAY) to = &c->members[i];
  for (size_t i = 1; i < c->n_members && to == NULL; i++) to = &c->members[i];
  if (to == NULL) return;
  if (c->unheard_fenced_term != term) {
    c->unheard_fenced_term = term;
    ZG_LOG_WARN("leader_unheard",
                "no answer from a majority for %u ms while this leader's messages go out (a "
                "one-way cut?): not ready any more, asking %s to take over (term %llu)",
                within, to->id, (unsigned long long)term);
  }
  send_timeout_now(c, to);
}

/* As follower: stuck behind a leader that will not fill our gap (log_gap.c). */
static void check_log_behind(struct consensus *c) {
  raft_index last = raft_last_index(&c->raft);
  enum zg_gap_event ev =
      zg_gap_follower_step(&c->gap, zg_mono_ms(), raft_state(&c->raft) == RAFT_FOLLOWER,
                           c->io.ae_at_ms, c->io.ae_leader_commit, last, c->election_ms);
  if (ev == ZG_GAP_STUCK) {
    const struct member_rec *lm = member_by_raft_id(c, c->io.ae_from);
    ZG_LOG_ERROR("raft_log_behind_leader",
                 "this node's Raft log ends at index %llu while the leader %s has committed up to "
                 "%llu and has sent nothing to fill the gap for %u s: the log lost entries the "
                 "leader counts as stored here (e.g. a torn tail cut at start-up); this node is "
                 "not a healthy standby. A leadership change clears it (zonegate switchover); "
                 "else empty this node's data dir and `zonegate members add` it again",
                 (unsigned long long)last, lm ? lm->id : "(unknown)",
                 (unsigned long long)c->gap.leader_commit, ZG_GAP_TIMEOUTS * c->election_ms / 1000);
  } else if (ev == ZG_GAP_CLEARED) {
    ZG_LOG_INFO("raft_log_caught_up", "the Raft log moves again (last index %llu)",
                (unsigned long long)last);
  }
}

bool consensus_log_behind(const struct consensus *c) {
  return c->gap.behind;
}

static bool try_leader_lost(struct consensus *c, raft_id peer);

static void wake_cb(uv_timer_t *t) {
  (void)t; /* check_cb runs after this loop turn and sees the hold over */
}

static void election_tick_cb(uv_timer_t *t) {
  struct consensus *c = t->data;
  c->election_due = 0;
  if (!c->closing) zg_io_tap_tick(&c->io);
}

/* Arms election_tick for the moment raft's election timer runs out. */
static void arm_election_tick(struct consensus *c) {
  uint64_t due = 0;
  if (!zg_leader_loss_timer_due(&c->io, &c->raft, &due)) {
    if (c->election_due) uv_timer_stop(&c->election_tick);
    c->election_due = 0;
    return;
  }
  if (due == c->election_due) return;
  uint64_t now = c->io.io.time(&c->io.io);
  c->election_due = due;
  uv_timer_start(&c->election_tick, election_tick_cb, due > now ? due - now : 0, 0);
}

static void check_cb(uv_check_t *h) {
  struct consensus *c = h->data;
  if (c->closing) return;
  if (c->lost_leader && try_leader_lost(c, c->lost_leader)) {
    c->lost_leader = 0;
  } else if (c->lost_leader && zg_mono_ms() >= c->lost_leader_until_ms) {
    ZG_LOG_INFO("leader_connection_ended",
                "the old leader is gone but raft did not take the early election (log not "
                "persisted, or a snapshot being installed): the timers decide");
    c->lost_leader = 0;
  }
  zg_leader_loss_settle(&c->io, &c->raft);
  arm_election_tick(c);
  if (zg_leader_loss_holding(&c->io, &c->raft) && c->wake_term != c->io.hold_term) {
    /* Become ready the moment the hold ends, not on the next event. */
    c->wake_term = c->io.hold_term;
    uint64_t now = zg_mono_ms();
    uv_timer_start(&c->wake, wake_cb, c->io.hold_until_ms > now ? c->io.hold_until_ms - now : 0, 0);
  }
  unsigned state = raft_state(&c->raft);
  raft_id leader = 0;
  const char *leader_address = NULL;
  raft_leader(&c->raft, &leader, &leader_address);
  raft_term term = raft_current_term(&c->raft);
  if (state == RAFT_LEADER) {
    if (c->barrier_submitted_term != term) submit_election_barrier(c, term);
    track_progress(c);
  }
  check_unheard(c, zg_mono_ms());
  check_log_behind(c);
  bool fenced = consensus_is_leader(c);
  if (state != c->last_state || leader != c->last_leader || term != c->last_term ||
      fenced != c->last_fenced) {
    const struct member_rec *lm = member_by_raft_id(c, leader);
    ZG_LOG_INFO("raft_state_changed", "state %s, term %llu, leader %s%s", state_name(state),
                (unsigned long long)term, lm ? lm->id : (leader ? "(unknown id)" : "none"),
                fenced ? " (this node, ready)" : "");
    if (state == RAFT_LEADER && c->last_state != RAFT_LEADER)
      for (size_t i = 1; i < c->n_members; i++) c->members[i].last_progress_ms = zg_mono_ms();
    c->last_state = state;
    c->last_leader = leader;
    c->last_term = term;
    c->last_fenced = fenced;
    emit(c, CONSENSUS_EV_LEADER_CHANGED);
  }
  if (state == RAFT_UNAVAILABLE && !c->disk_error_reported) {
    c->disk_error_reported = true;
    ZG_LOG_ERROR("raft_unavailable",
                 "raft stopped (state unavailable), most likely a disk error in %s: %s",
                 c->raft_dir, raft_errmsg(&c->raft));
    emit(c, CONSENSUS_EV_DISK_ERROR);
  }
  if (fenced) maybe_seed(c);
}

/* ---- start / close ------------------------------------------------------ */

static int server_cmp(const void *a, const void *b) {
  const struct raft_server *x = a, *y = b;
  return x->id < y->id ? -1 : x->id > y->id;
}

static int validate_member(const struct consensus_member *m, const char *what, char *errmsg,
                           size_t errlen) {
  char host[256];
  int port;
  if (m == NULL || m->id == NULL || m->id[0] == '\0') {
    snprintf(errmsg, errlen, "%s: id is missing", what);
    return -1;
  }
  if (m->raft_address == NULL ||
      zg_split_host_port(m->raft_address, host, sizeof host, &port) != 0) {
    snprintf(errmsg, errlen, "%s '%.64s': raft address '%.100s' is not host:port", what, m->id,
             m->raft_address ? m->raft_address : "(null)");
    return -1;
  }
  return 0;
}

static void free_consensus(struct consensus *c) {
  for (size_t i = 0; i < c->n_members; i++) member_free(&c->members[i]);
  free(c->members);
  free(c->data_dir);
  free(c->raft_dir);
  cJSON_Delete(c->seed_config);
  cJSON_Delete(c->seed_tokens);
  zg_fsm_close(&c->fsm);
  memset(c->master_key, 0, sizeof c->master_key);
  free(c);
}

static void close_step_done(struct consensus *c) {
  if (--c->close_waits > 0) return;
  /* Writes raft did not answer (it answers pending ones on close). */
  while (c->pending) {
    struct pending_write *pw = c->pending;
    pending_unlink(c, pw);
    pw->applied = false;
    pending_finish(pw, CONSENSUS_ESHUTDOWN, "consensus closed");
  }
  void (*done)(void *) = c->close_done;
  void *arg = c->close_arg;
  free_consensus(c);
  if (done) done(arg);
}

static void on_raft_closed(struct raft *r) {
  struct consensus *c = r->data;
  raft_uv_close(&c->io.io);
  zg_transport_free(&c->transport);
  close_step_done(c);
}

static void check_close_cb(uv_handle_t *h) {
  close_step_done(h->data);
}

void consensus_close(struct consensus *c, void (*done)(void *arg), void *arg) {
  if (c == NULL || c->closing) return;
  c->closing = true;
  c->close_done = done;
  c->close_arg = arg;
  c->close_waits = 1 + (c->check_open ? 3 : 0) + (c->probe ? 1 : 0);
  if (c->probe) zg_probe_cancel(c->probe); /* on_probe_done counts down */
  if (c->check_open) {
    uv_check_stop(&c->check);
    uv_close((uv_handle_t *)&c->check, check_close_cb);
    uv_close((uv_handle_t *)&c->wake, check_close_cb);
    uv_close((uv_handle_t *)&c->election_tick, check_close_cb);
  }
  raft_close(&c->raft, on_raft_closed);
}

static int check_options(const struct consensus_options *opts, char *errmsg, size_t errlen) {
  if (opts == NULL) {
    snprintf(errmsg, errlen, "consensus_start(): no options");
    return -1;
  }
  if (validate_member(opts->self, "self", errmsg, errlen) != 0) return -1;
  for (size_t i = 0; i < opts->n_peers; i++)
    if (validate_member(&opts->peers[i], "peer", errmsg, errlen) != 0) return -1;
  if (opts->data_dir == NULL || opts->data_dir[0] == '\0') {
    snprintf(errmsg, errlen, "consensus_start(): data_dir is not set");
    return -1;
  }
  if (opts->cluster_secret == NULL || strlen(opts->cluster_secret) < 16) {
    snprintf(errmsg, errlen, "cluster secret must be at least 16 characters");
    return -1;
  }
  if (opts->master_key == NULL) {
    snprintf(errmsg, errlen, "master key (32 bytes) is not set");
    return -1;
  }
  if (opts->seed_tokens != NULL && !cJSON_IsArray(opts->seed_tokens)) {
    snprintf(errmsg, errlen, "seed tokens must be an array of {name, sha256}");
    return -1;
  }
  return 0;
}

/* The struct with copies of everything in `opts`; NULL and a message on
 * failure (nothing left allocated). */
static struct consensus *consensus_alloc(uv_loop_t *loop, const struct consensus_options *opts,
                                         int *rv, char *errmsg, size_t errlen) {
  struct consensus *c = calloc(1, sizeof *c);
  *rv = CONSENSUS_ENOMEM;
  if (c == NULL) goto nomem;
  c->loop = loop;
  c->on_event = opts->on_event;
  c->ud = opts->ud;
  memcpy(c->master_key, opts->master_key, 32);
  zg_fsm_init(&c->fsm, opts->audit_max ? opts->audit_max : 1000);
  c->fsm.on_applied = fsm_applied;
  c->fsm.ud = c;
  c->members = calloc(1 + opts->n_peers, sizeof *c->members);
  c->data_dir = strdup(opts->data_dir);
  c->raft_dir = malloc(strlen(opts->data_dir) + 8);
  if (c->members == NULL || c->data_dir == NULL || c->raft_dir == NULL) goto nomem_free;
  sprintf(c->raft_dir, "%s/raft", opts->data_dir);
  if (member_copy(&c->members[0], opts->self) != 0) goto nomem_free;
  c->n_members = 1;
  for (size_t i = 0; i < opts->n_peers; i++) {
    if (member_copy(&c->members[c->n_members], &opts->peers[i]) != 0) goto nomem_free;
    c->n_members++;
  }
  for (size_t i = 0; i < c->n_members; i++)
    for (size_t j = i + 1; j < c->n_members; j++) {
      if (c->members[i].raft_id == c->members[j].raft_id ||
          strcmp(c->members[i].raft_address, c->members[j].raft_address) == 0) {
        snprintf(errmsg, errlen, "members '%.64s' and '%.64s' share an id or a raft address",
                 c->members[i].id, c->members[j].id);
        free_consensus(c);
        *rv = CONSENSUS_EINVALID;
        return NULL;
      }
    }
  c->seed_config = opts->seed_config ? cJSON_Duplicate(opts->seed_config, true) : NULL;
  c->seed_tokens = opts->seed_tokens ? cJSON_Duplicate(opts->seed_tokens, true) : NULL;
  *rv = 0;
  return c;
nomem_free:
  free_consensus(c);
nomem:
  snprintf(errmsg, errlen, "consensus_start(): out of memory");
  return NULL;
}

/* The transport adopted the incarnation of the cluster this joiner joins:
 * store it before any raft byte arrives. */
static int adopt_incarnation(void *ud, const struct zg_incarnation *inc) {
  struct consensus *c = ud;
  char err[600];
  /* Again (a newer one, transport.c): only while nothing of the first one
   * reached the log; otherwise this data is that cluster's. */
  if (c->incarnation_known && raft_last_index(&c->raft) > 0) return -1;
  if (zg_incarnation_store(c->data_dir, inc, err, sizeof err) != 0) {
    ZG_LOG_ERROR("incarnation_store_failed", "%s", err);
    return -1;
  }
  c->incarnation = *inc;
  c->incarnation_known = true;
  return 0;
}

/* The transport met a peer of a newer incarnation: this data dir is
 * stale. The transport already refuses every peer; the role machine sees
 * consensus_superseded() and never serves again; the mark makes the next
 * start refuse the data dir with one line (setup_incarnation). */
static void on_superseded(void *ud, const struct zg_incarnation *newer, const char *peer) {
  struct consensus *c = ud;
  c->superseded = true;
  if (zg_incarnation_mark_superseded(c->data_dir, newer, peer) != 0)
    ZG_LOG_WARN("superseded_mark_failed", "could not write %s/superseded: %s", c->data_dir,
                strerror(errno));
  ZG_LOG_ERROR("node_superseded",
               "this node's data (%s) is from an older incarnation of the cluster: raft peer %s "
               "was recovered with zonegate recover --force after it. This node serves nothing "
               "and takes part in no election from now on. Stop it, empty its data dir and add "
               "it again with `zonegate members add` on the recovered cluster",
               c->data_dir, peer && peer[0] ? peer : "?");
}

bool consensus_superseded(const struct consensus *c) {
  return c->superseded;
}

/* Which incarnation this node is of (see incarnation.c), set on the
 * transport. fresh: the raft dir holds no state yet. */
static int setup_incarnation(struct consensus *c, const struct consensus_options *opts,
                             const struct raft_configuration *conf, bool fresh, char *errmsg,
                             size_t errlen) {
  char err[600];
  enum zg_incarnation_mode mode = ZG_INC_KNOWN;
  if (fresh && opts->join_existing) {
    /* A file left beside an emptied raft dir says nothing about the
     * cluster this node now joins. */
    zg_incarnation_remove(c->data_dir);
    mode = ZG_INC_ADOPT;
  } else if (fresh) {
    /* Stored before raft_bootstrap writes anything: a crash in between
     * must not leave raft state without its incarnation. */
    zg_incarnation_bootstrap(conf, &c->incarnation);
    if (zg_incarnation_store(c->data_dir, &c->incarnation, err, sizeof err) != 0) {
      snprintf(errmsg, errlen, "%s", err);
      return -1;
    }
  } else {
    char marked[300];
    if (zg_incarnation_superseded(c->data_dir, marked, sizeof marked)) {
      snprintf(errmsg, errlen,
               "data dir %s is from an older incarnation of the cluster (it met a node of the "
               "newer one: %s): this node must not rejoin with it. Empty the data dir and add the "
               "node again with `zonegate members add` on the recovered cluster",
               c->data_dir, marked);
      return -1;
    }
    int rv = zg_incarnation_load(c->data_dir, &c->incarnation, err, sizeof err);
    if (rv < 0) {
      snprintf(errmsg, errlen, "%s", err);
      return -1;
    }
    if (rv == 1) { /* written by a zonegate from before incarnations */
      zg_incarnation_legacy(&c->incarnation);
      if (zg_incarnation_store(c->data_dir, &c->incarnation, err, sizeof err) != 0) {
        snprintf(errmsg, errlen, "%s", err);
        return -1;
      }
      ZG_LOG_INFO("incarnation_created",
                  "data dir %s had no cluster incarnation (older zonegate): it is the cluster's "
                  "first one",
                  c->data_dir);
    }
  }
  c->incarnation_known = mode == ZG_INC_KNOWN;
  zg_transport_set_incarnation(&c->transport, mode, &c->incarnation, adopt_incarnation, c);
  return 0;
}

/* A fresh dir is bootstrapped with every member as a voter; a joiner never
 * bootstraps. *restarted: the dir already held raft state. */
static int bootstrap_if_new(struct consensus *c, const struct consensus_options *opts,
                            bool *restarted, char *errmsg, size_t errlen) {
  struct raft_configuration conf;
  raft_configuration_init(&conf);
  int rv;
  for (size_t i = 0; i < c->n_members; i++) {
    rv = raft_configuration_add(&conf, c->members[i].raft_id, c->members[i].raft_address,
                                RAFT_VOTER);
    if (rv != 0) {
      raft_configuration_close(&conf);
      snprintf(errmsg, errlen, "raft_configuration_add(%s): %s", c->members[i].id,
               raft_strerror(rv));
      return -1;
    }
  }
  qsort(conf.servers, conf.n, sizeof *conf.servers, server_cmp);
  *restarted = false;
  char meta[4200];
  struct stat st;
  snprintf(meta, sizeof meta, "%s/metadata1", c->raft_dir);
  bool have1 = stat(meta, &st) == 0;
  snprintf(meta, sizeof meta, "%s/metadata2", c->raft_dir);
  bool fresh = !have1 && stat(meta, &st) != 0;
  if (setup_incarnation(c, opts, &conf, fresh, errmsg, errlen) != 0) {
    raft_configuration_close(&conf);
    return -1;
  }
  if (opts->join_existing) {
    rv = RAFT_CANTBOOTSTRAP; /* never start a cluster of our own */
    if (fresh) {
      rv = 0; /* fresh joiner: no quiet period needed, it never voted */
      ZG_LOG_INFO("raft_joining", "empty data dir %s: waiting to be added by the leader",
                  c->raft_dir);
    }
  } else {
    rv = raft_bootstrap(&c->raft, &conf);
  }
  raft_configuration_close(&conf);
  if (rv == RAFT_CANTBOOTSTRAP) {
    *restarted = true;
  } else if (rv != 0) {
    snprintf(errmsg, errlen, "raft_bootstrap(%s): %s", c->raft_dir, raft_errmsg(&c->raft));
    return -1;
  } else if (!opts->join_existing) {
    ZG_LOG_INFO("raft_bootstrapped", "new cluster of %zu voters bootstrapped in %s", c->n_members,
                c->raft_dir);
  }
  return 0;
}

/* Tries leader_loss.c for `peer`; true once done or moot. */
static bool try_leader_lost(struct consensus *c, raft_id peer) {
  raft_id leader = 0;
  const char *address = NULL;
  raft_leader(&c->raft, &leader, &address);
  if (raft_state(&c->raft) != RAFT_FOLLOWER || leader != peer) return true; /* moot */
  raft_term term = raft_current_term(&c->raft);
  if (!zg_leader_lost(&c->io, &c->raft, peer)) return false;
  const struct member_rec *m = member_by_raft_id(c, peer);
  ZG_LOG_WARN("leader_connection_lost",
              "the connection to leader %s ended and its port refuses connections (term %llu): "
              "election started at once",
              m ? m->id : "?", (unsigned long long)term);
  return true;
}

/* The transport saw the peer or the network end a connection to `peer`.
 * If that peer is our leader, leader_loss.c starts the election now, or
 * as soon as our log is persisted (check_cb retries). */
static void start_probe(struct consensus *c, raft_id peer);

static void on_probe_done(void *ud, raft_id peer, bool refused, int status) {
  struct consensus *c = ud;
  c->probe = NULL;
  if (c->closing) {
    close_step_done(c);
    return;
  }
  const struct member_rec *m = member_by_raft_id(c, peer);
  if (!refused && status == 1 && ++c->probe_attempts < 3) {
    /* No answer at all: an exiting process may drop the SYN while its
     * listener is torn down; a fresh attempt then meets a closed port. */
    start_probe(c, peer);
    return;
  }
  if (!refused) {
    ZG_LOG_INFO("leader_connection_ended",
                "the connection to leader %s ended but its Raft port still holds a new one "
                "after %u ms (%s): no early election (the timers decide)",
                m ? m->id : "?", c->heartbeat_ms,
                status == 1   ? "no answer"
                : status == 0 ? "it accepted"
                              : uv_strerror(status));
    return;
  }
  if (try_leader_lost(c, peer)) return;
  c->lost_leader = peer;
  c->lost_leader_until_ms = zg_mono_ms() + c->election_ms;
}

static void start_probe(struct consensus *c, raft_id peer) {
  if (c->closing || c->probe != NULL) return;
  raft_id leader = 0;
  const char *address = NULL;
  raft_leader(&c->raft, &leader, &address);
  if (raft_state(&c->raft) != RAFT_FOLLOWER || leader != peer || address == NULL) return;
  /* Only a leader whose process is gone: its port refuses a new connection
   * (leader_loss.c). A live leader behind a reset keeps its leadership and
   * raft_uv reconnects. */
  if (zg_probe_start(c->loop, address, c->heartbeat_ms, peer, on_probe_done, c, &c->probe) != 0)
    c->probe = NULL;
}

static void on_peer_lost(void *ud, raft_id peer) {
  struct consensus *c = ud;
  if (c->probe != NULL) return;
  c->probe_attempts = 0;
  start_probe(c, peer);
}

/* Init ladder (dqlite-style): each step that succeeded is undone, in
 * reverse, by the label its failure jumps past. Once raft_init succeeded
 * the undo is asynchronous: raft_close, then raft_uv_close, the transport
 * and the struct from on_raft_closed. */
int consensus_start(uv_loop_t *loop, const struct consensus_options *opts, struct consensus **out,
                    char *errmsg, size_t errlen) {
  int rv;
  char err[1024]; /* one line naming a file, a reason and what to do */
  *out = NULL;
  if (check_options(opts, errmsg, errlen) != 0) return CONSENSUS_EINVALID;
  /* A peer that goes away mid-write must not kill the process. */
  signal(SIGPIPE, SIG_IGN);
  struct consensus *c = consensus_alloc(loop, opts, &rv, errmsg, errlen);
  if (c == NULL) return rv;

  rv = CONSENSUS_EIO;
  if (ensure_dir(c->data_dir, errmsg, errlen) != 0 ||
      ensure_dir(c->raft_dir, errmsg, errlen) != 0 || keycheck(c, errmsg, errlen) != 0)
    goto err_free;
  if (zg_transport_init(&c->transport, loop, opts->cluster_secret, opts->raft_listen, 0, err,
                        sizeof err) != 0) {
    snprintf(errmsg, errlen, "%s", err);
    rv = CONSENSUS_ENOMEM;
    goto err_free;
  }
  if (opts->tls) zg_transport_set_tls(&c->transport, opts->tls);
  if (zg_raft_repair_torn_tail(c->raft_dir, err, sizeof err) != 0) {
    snprintf(errmsg, errlen, "%s", err);
    rv = CONSENSUS_EIO;
    goto err_transport;
  }
  if (err[0]) ZG_LOG_WARN("raft_torn_tail_repaired", "%s", err);
  if (raft_uv_init(&c->io.io, loop, c->raft_dir, &c->transport) != 0) {
    snprintf(errmsg, errlen, "raft_uv_init(%s): %s", c->raft_dir, c->io.io.errmsg);
    goto err_transport;
  }
  unsigned election = opts->election_timeout_ms ? opts->election_timeout_ms : 1000;
  unsigned heartbeat = opts->heartbeat_ms ? opts->heartbeat_ms : 100;
  raft_uv_set_connect_retry_delay(&c->io.io, election / 4 > 50 ? election / 4 : 50);
  /* A damaged closed segment must stop the node with an error naming the
   * path, not be silently cut away: entries this node acknowledged would be
   * forgotten, which can undo a commit. The operator restores or re-joins. */
  raft_uv_set_auto_recovery(&c->io.io, false);
  zg_io_tap_init(&c->io, election, heartbeat);
  c->election_ms = election;
  c->heartbeat_ms = heartbeat;
  if (raft_init(&c->raft, &c->io.io, &c->fsm.raft, c->members[0].raft_id,
                c->members[0].raft_address) != 0) {
    snprintf(errmsg, errlen, "raft_init(%s): %s", c->raft_dir, raft_errmsg(&c->raft));
    goto err_io;
  }
  c->raft.data = c;
  if (opts->self->role != CONSENSUS_WITNESS)
    zg_transport_on_peer_lost(&c->transport, on_peer_lost, c);
  zg_transport_on_superseded(&c->transport, on_superseded, c);
  /* raft_init seeds the election timer's generator from raft_uv's random(),
   * which is rand() without srand(): every node drew the same "random"
   * election timeouts, so two followers of a dead leader timed out
   * together and split the vote again and again. Seed from the OS. */
  unsigned seed;
  if (zg_random_bytes((uint8_t *)&seed, sizeof seed) != 0)
    seed = (unsigned)zg_mono_ms() ^ (unsigned)getpid() ^ (unsigned)c->members[0].raft_id;
  raft_seed(&c->raft, seed);
  uint64_t draw_seed;
  if (zg_random_bytes((uint8_t *)&draw_seed, sizeof draw_seed) != 0)
    draw_seed = ((uint64_t)seed << 32) ^ zg_mono_ms();
  zg_io_tap_rank(&c->io, opts->self->role == CONSENSUS_WITNESS, draw_seed);
  raft_set_election_timeout(&c->raft, election);
  raft_set_heartbeat_timeout(&c->raft, heartbeat);
  raft_set_pre_vote(&c->raft, true);
  raft_set_snapshot_threshold(&c->raft, opts->snapshot_threshold ? opts->snapshot_threshold : 1024);
  raft_set_snapshot_trailing(&c->raft, opts->snapshot_trailing ? opts->snapshot_trailing : 128);
  bool restarted = false;
  if (bootstrap_if_new(c, opts, &restarted, errmsg, errlen) != 0) goto err_raft;
  if (restarted && c->n_members > 1)
    zg_transport_set_quiet(&c->transport,
                           opts->startup_quiet_ms ? opts->startup_quiet_ms : election);
  c->fsm.restore_error[0] = '\0';
  c->fsm.starting = true;
  rv = raft_start(&c->raft);
  c->fsm.starting = false;
  if (rv != 0) {
    /* The reason may sit in raft's message, raft_uv's, or the state
     * machine's (a snapshot it refused): name whichever is there. */
    const char *why = raft_errmsg(&c->raft);
    if (!why || !why[0]) why = c->io.io.errmsg;
    if (c->fsm.restore_error[0]) {
      char file[4200];
      refused_snapshot_name(c->raft_dir, c->fsm.restore_len, file, sizeof file);
      /* raft's message then only holds leftovers of its segment scan. */
      snprintf(errmsg, errlen, "raft_start(%s): snapshot refused: %s%s%s", c->raft_dir,
               file[0] ? file : "", file[0] ? ": " : "", c->fsm.restore_error);
    } else
      snprintf(errmsg, errlen, "raft_start(%s): %s", c->raft_dir, why[0] ? why : raft_strerror(rv));
    rv = CONSENSUS_EIO;
    goto err_raft;
  }
  uv_check_init(loop, &c->check);
  c->check.data = c;
  uv_timer_init(loop, &c->wake);
  c->wake.data = c;
  uv_timer_init(loop, &c->election_tick);
  c->election_tick.data = c;
  c->election_due = 0;
  c->check_open = true;
  uv_check_start(&c->check, check_cb);
  c->last_state = raft_state(&c->raft);
  ZG_LOG_INFO("raft_started", "raft id %llu at %s, data %s, %s",
              (unsigned long long)c->members[0].raft_id, c->members[0].raft_address, c->raft_dir,
              restarted ? "restarted from disk" : "fresh");
  *out = c;
  return 0;

err_raft:
  c->closing = true;
  c->close_waits = 1;
  raft_close(&c->raft, on_raft_closed); /* closes io and transport, frees c */
  return rv;
err_io:
  raft_uv_close(&c->io.io);
err_transport:
  zg_transport_free(&c->transport);
err_free:
  free_consensus(c);
  return rv;
}

/* ---- reads ---------------------------------------------------------------- */

const cJSON *consensus_config(const struct consensus *c) {
  return c->fsm.st.config;
}

uint64_t consensus_config_version(const struct consensus *c) {
  return c->fsm.st.config_version;
}

bool consensus_token_lookup(const struct consensus *c, const char sha256_hex[65],
                            struct consensus_token_view *out) {
  char lower[65];
  size_t n = strnlen(sha256_hex, 65);
  if (n != 64) return false;
  for (size_t i = 0; i < 64; i++) {
    char ch = sha256_hex[i];
    lower[i] = (ch >= 'A' && ch <= 'F') ? (char)(ch - 'A' + 'a') : ch;
  }
  lower[64] = '\0';
  const struct zg_token *t = zg_state_token_find(&c->fsm.st, lower);
  if (t == NULL) return false;
  if (out) {
    out->id = t->id;
    out->name = t->name;
    out->expires_at = t->expires_at;
    out->rpm = t->rpm;
    out->tpm = t->tpm;
    out->budget_day = t->budget_day;
    out->budget_month = t->budget_month;
    out->n_allow = t->n_allow;
    out->allow = (const char *const *)t->allow;
  }
  return true;
}

size_t consensus_usable_keys(const struct consensus *c, const char *upstream,
                             struct consensus_key_use *out, size_t max) {
  const struct zg_state *st = &c->fsm.st;
  uint64_t now = zg_wall_ms();
  size_t n = 0;
  char err[256];
  for (int pass = 0; pass < 2; pass++) {
    for (size_t i = 0; i < st->n_keys && n < max; i++) {
      const struct zg_key *k = &st->keys[i];
      if (strcmp(k->upstream, upstream ? upstream : "default") != 0) continue;
      bool usable = pass == 0 ? k->state == ZG_KEY_ACTIVE
                              : (k->state == ZG_KEY_RETIRING && k->retire_at > now);
      if (!usable) continue;
      char *secret = NULL;
      if (zg_unseal(c->master_key, "provider-key", k->sealed, &secret, NULL, err, sizeof err)) {
        ZG_LOG_ERROR("key_unseal_failed", "provider key %s cannot be opened: %s", k->id, err);
        continue;
      }
      snprintf(out[n].id, sizeof out[n].id, "%s", k->id);
      out[n].secret = secret;
      n++;
    }
  }
  return n;
}

bool consensus_key_by_id(const struct consensus *c, const char *id, struct consensus_key_use *out) {
  const struct zg_state *st = &c->fsm.st;
  uint64_t now = zg_wall_ms();
  char err[256];
  for (size_t i = 0; id != NULL && i < st->n_keys; i++) {
    const struct zg_key *k = &st->keys[i];
    if (strcmp(k->id, id) != 0) continue;
    if (k->state != ZG_KEY_ACTIVE && !(k->state == ZG_KEY_RETIRING && k->retire_at > now))
      return false;
    char *secret = NULL;
    if (zg_unseal(c->master_key, SECRET_PURPOSE, k->sealed, &secret, NULL, err, sizeof err)) {
      ZG_LOG_ERROR("key_unseal_failed", "provider key %s cannot be opened: %s", k->id, err);
      return false;
    }
    snprintf(out->id, sizeof out->id, "%s", k->id);
    out->secret = secret;
    return true;
  }
  return false;
}

void consensus_usage_view(const struct consensus *c, const char *token, uint64_t now_s,
                          struct consensus_usage_view *out) {
  zg_usage_view(&c->fsm.st.usage, token, now_s, out);
}

cJSON *consensus_usage_query(const struct consensus *c, const char *token, const char *model,
                             uint64_t since_s) {
  return zg_usage_query(&c->fsm.st.usage, token, model, since_s);
}

cJSON *consensus_keys_json(const struct consensus *c) {
  return zg_state_keys_json(&c->fsm.st, zg_wall_ms());
}

cJSON *consensus_tokens_json(const struct consensus *c) {
  return zg_state_tokens_json(&c->fsm.st);
}

cJSON *consensus_audit_json(const struct consensus *c, size_t limit) {
  return zg_state_audit_json(&c->fsm.st, limit);
}

bool consensus_is_leader(const struct consensus *c) {
  struct raft *r = (struct raft *)&c->raft;
  if (c->closing || raft_state(r) != RAFT_LEADER) return false;
  if (raft_transferee(r) != 0) return false;
  if (zg_leader_loss_holding(&c->io, r)) return false;
  return c->barrier_committed_term == raft_current_term(r);
}

bool consensus_barrier_committed(const struct consensus *c) {
  struct raft *r = (struct raft *)&c->raft;
  if (zg_leader_loss_holding(&c->io, r)) return false; /* see leader_loss.c */
  if (c->unheard_fenced_term && c->unheard_fenced_term == raft_current_term(r))
    return false; /* see check_unheard */
  return !c->closing && raft_state(r) == RAFT_LEADER &&
         c->barrier_committed_term == raft_current_term(r);
}

bool consensus_transfer_under_way(const struct consensus *c) {
  return raft_transferee((struct raft *)&c->raft) != 0;
}

bool consensus_quorum_heard(const struct consensus *c, unsigned within_ms) {
  return !c->closing && zg_io_tap_quorum_heard(&c->io, &c->raft, within_ms);
}

unsigned consensus_voter_count(const struct consensus *c) {
  unsigned voters = 0;
  for (unsigned i = 0; i < c->raft.configuration.n; i++)
    if (c->raft.configuration.servers[i].role == RAFT_VOTER) voters++;
  return voters;
}

const struct consensus_member *consensus_leader(const struct consensus *c) {
  raft_id id = 0;
  const char *address = NULL;
  raft_leader((struct raft *)&c->raft, &id, &address);
  const struct member_rec *m = id ? member_by_raft_id(c, id) : NULL;
  return m ? &m->pub : NULL;
}

const struct consensus_member *consensus_self(const struct consensus *c) {
  return &c->members[0].pub;
}

uint64_t consensus_term(const struct consensus *c) {
  return raft_current_term(&c->raft);
}

uint64_t consensus_commit_index(const struct consensus *c) {
  return raft_commit_index(&c->raft);
}

uint64_t consensus_applied_index(const struct consensus *c) {
  return raft_last_applied((struct raft *)&c->raft);
}

uint64_t consensus_last_log_index(const struct consensus *c) {
  return raft_last_index((struct raft *)&c->raft);
}

static void add_opt_string(cJSON *o, const char *name, const char *value) {
  if (value)
    cJSON_AddStringToObject(o, name, value);
  else
    cJSON_AddNullToObject(o, name);
}

cJSON *consensus_status_json(const struct consensus *c) {
  struct raft *r = (struct raft *)&c->raft;
  cJSON *o = cJSON_CreateObject();
  if (o == NULL) return NULL;
  unsigned state = raft_state(r);
  cJSON_AddStringToObject(o, "node", c->members[0].id);
  raft_id leader_id = 0;
  const char *leader_address = NULL;
  raft_leader(r, &leader_id, &leader_address);
  const struct member_rec *lm = leader_id ? member_by_raft_id(c, leader_id) : NULL;
  if (leader_id) {
    cJSON *l = cJSON_AddObjectToObject(o, "leader");
    add_opt_string(l, "id", lm ? lm->id : NULL);
    add_opt_string(l, "address", leader_address);
    if (lm) {
      add_opt_string(l, "admin_address", lm->admin_address);
      add_opt_string(l, "gateway_address", lm->gateway_address);
    }
  } else {
    cJSON_AddNullToObject(o, "leader");
  }
  raft_index last = raft_last_index(r);
  cJSON_AddNumberToObject(o, "term", (double)raft_current_term(r));
  cJSON_AddNumberToObject(o, "commit_index", (double)raft_commit_index(r));
  cJSON_AddNumberToObject(o, "applied_index", (double)raft_last_applied(r));
  cJSON_AddNumberToObject(o, "last_log_index", (double)last);
  cJSON_AddStringToObject(o, "state", state_name(state));
  cJSON_AddBoolToObject(o, "is_leader", consensus_is_leader(c));
  cJSON_AddNumberToObject(o, "config_version", (double)c->fsm.st.config_version);
  cJSON_AddNumberToObject(o, "undecodable_entries", (double)c->fsm.n_rejected_entries);
  cJSON_AddBoolToObject(o, "log_behind_leader", c->gap.behind);
  cJSON_AddBoolToObject(o, "superseded", c->superseded);
  if (c->incarnation_known) {
    char hex[ZG_INCARNATION_HEX + 1];
    zg_incarnation_hex(&c->incarnation, hex);
    cJSON_AddStringToObject(o, "incarnation", hex);
  } else {
    cJSON_AddNullToObject(o, "incarnation");
  }
  cJSON *members = cJSON_AddArrayToObject(o, "members");
  uint64_t now = zg_mono_ms();
  for (size_t i = 0; members && i < c->n_members; i++) {
    const struct member_rec *m = &c->members[i];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "id", m->id);
    cJSON_AddStringToObject(j, "zone", m->zone);
    cJSON_AddStringToObject(j, "role", m->pub.role == CONSENSUS_WITNESS ? "witness" : "gateway");
    cJSON_AddStringToObject(j, "raft_address", m->raft_address);
    add_opt_string(j, "admin_address", m->admin_address);
    add_opt_string(j, "gateway_address", m->gateway_address);
    const char *raft_role = "none";
    for (unsigned k = 0; k < r->configuration.n; k++)
      if (r->configuration.servers[k].id == m->raft_id)
        raft_role = raft_role_name(r->configuration.servers[k].role);
    if (strcmp(raft_role, "none") == 0 && r->configuration.n > 0) {
      cJSON_Delete(j); /* removed from the group: not a member any more */
      continue;
    }
    cJSON_AddBoolToObject(j, "voter", strcmp(raft_role, "voter") == 0);
    cJSON_AddStringToObject(j, "raft_role", raft_role);
    cJSON_AddBoolToObject(j, "self", i == 0);
    cJSON_AddBoolToObject(j, "leader", m->raft_id == leader_id);
    raft_index match = 0;
    if (state == RAFT_LEADER && i == 0) {
      cJSON_AddNumberToObject(j, "match_index", (double)last);
      cJSON_AddNumberToObject(j, "lag", 0);
    } else if (state == RAFT_LEADER && raft_match_index(r, m->raft_id, &match) == 0) {
      cJSON_AddNumberToObject(j, "match_index", (double)match);
      cJSON_AddNumberToObject(j, "lag", (double)(last > match ? last - match : 0));
      /* Approximation: last time its match index advanced or was current. */
      cJSON_AddNumberToObject(j, "last_contact_ms",
                              (double)(now > m->last_progress_ms ? now - m->last_progress_ms : 0));
    }
    cJSON_AddItemToArray(members, j);
  }
  return o;
}

/* ---- leadership transfer, barriers, membership ------------------------- */

struct transfer_req {
  struct raft_transfer req;
  struct consensus *c;
  void (*cb)(void *ud, int status);
  void *ud;
};

static void transfer_cb(struct raft_transfer *req) {
  struct transfer_req *t = req->data;
  struct consensus *c = t->c;
  int status = raft_state(&c->raft) == RAFT_LEADER ? CONSENSUS_ENOTMOVED : 0;
  if (c->closing) status = CONSENSUS_ESHUTDOWN;
  ZG_LOG_INFO("raft_transfer_done", "leadership transfer %s",
              status == 0 ? "completed" : "did not move leadership");
  if (t->cb) t->cb(t->ud, status);
  free(t);
}

int consensus_transfer_leadership(struct consensus *c, const char *to_node_id,
                                  void (*cb)(void *ud, int status), void *ud) {
  if (c->closing) return CONSENSUS_ESHUTDOWN;
  if (raft_state(&c->raft) != RAFT_LEADER) return CONSENSUS_ENOTLEADER;
  raft_id id = 0;
  if (to_node_id != NULL) {
    const struct member_rec *m = member_by_id(c, to_node_id);
    if (m == NULL || m == &c->members[0]) return CONSENSUS_EINVALID;
    id = m->raft_id;
  }
  struct transfer_req *t = calloc(1, sizeof *t);
  if (t == NULL) return CONSENSUS_ENOMEM;
  t->c = c;
  t->cb = cb;
  t->ud = ud;
  t->req.data = t;
  int rv = raft_transfer(&c->raft, &t->req, id, transfer_cb);
  if (rv != 0) {
    free(t);
    ZG_LOG_WARN("raft_transfer_failed", "raft_transfer(): %s", raft_strerror(rv));
    return map_raft_status(rv);
  }
  ZG_LOG_INFO("raft_transfer_started", "leadership transfer to %s started",
              to_node_id ? to_node_id : "the most caught-up voter");
  return 0;
}

static void user_barrier_cb(struct raft_barrier *req, int status) {
  struct barrier_req *b = req->data;
  if (b->cb) b->cb(b->ud, map_raft_status(status));
  free(b);
}

int consensus_barrier(struct consensus *c, void (*cb)(void *ud, int status), void *ud) {
  if (c->closing) return CONSENSUS_ESHUTDOWN;
  if (raft_state(&c->raft) != RAFT_LEADER) return CONSENSUS_ENOTLEADER;
  struct barrier_req *b = calloc(1, sizeof *b);
  if (b == NULL) return CONSENSUS_ENOMEM;
  b->c = c;
  b->cb = cb;
  b->ud = ud;
  b->req.data = b;
  int rv = raft_barrier(&c->raft, &b->req, user_barrier_cb);
  if (rv != 0) {
    free(b);
    return map_raft_status(rv);
  }
  return 0;
}

struct change_req {
  struct raft_change req;
  struct consensus *c;
  raft_id id;
  bool promoting;
  void (*cb)(void *ud, int status, const char *errmsg);
  void *ud;
};

static void change_cb(struct raft_change *req, int status) {
  struct change_req *ch = req->data;
  struct consensus *c = ch->c;
  char msg[256];
  if (status == 0 && ch->promoting == false && ch->id != 0 && !c->closing) {
    /* Added as spare: now promote; libraft catches the node up first. */
    ch->promoting = true;
    memset(&ch->req, 0, sizeof ch->req);
    ch->req.data = ch;
    int rv = raft_assign(&c->raft, &ch->req, ch->id, RAFT_VOTER, change_cb);
    if (rv == 0) return;
    status = rv;
  }
  if (status != 0)
    snprintf(msg, sizeof msg, "membership change: %s", raft_strerror(status));
  else
    snprintf(msg, sizeof msg, "ok");
  ZG_LOG_INFO("raft_membership_changed", "%s", msg);
  if (ch->cb) ch->cb(ch->ud, map_raft_status(status), msg);
  free(ch);
}

int consensus_add_member(struct consensus *c, const struct consensus_member *m,
                         void (*cb)(void *ud, int status, const char *errmsg), void *ud) {
  char err[256];
  if (c->closing) return CONSENSUS_ESHUTDOWN;
  if (!consensus_is_leader(c)) return CONSENSUS_ENOTLEADER;
  if (validate_member(m, "member", err, sizeof err) != 0) return CONSENSUS_EINVALID;
  struct member_rec *existing = member_by_id(c, m->id);
  if (existing == NULL) {
    struct member_rec *grown = realloc(c->members, (c->n_members + 1) * sizeof *grown);
    if (grown == NULL) return CONSENSUS_ENOMEM;
    c->members = grown;
    if (member_copy(&c->members[c->n_members], m) != 0) return CONSENSUS_ENOMEM;
    c->n_members++;
  }
  struct change_req *ch = calloc(1, sizeof *ch);
  if (ch == NULL) return CONSENSUS_ENOMEM;
  ch->c = c;
  ch->cb = cb;
  ch->ud = ud;
  ch->id = consensus_raft_id(m->id);
  ch->req.data = ch;
  int rv = raft_add(&c->raft, &ch->req, ch->id, m->raft_address, change_cb);
  if (rv != 0) {
    free(ch);
    return map_raft_status(rv);
  }
  return 0;
}

int consensus_remove_member(struct consensus *c, const char *node_id,
                            void (*cb)(void *ud, int status, const char *errmsg), void *ud) {
  if (c->closing) return CONSENSUS_ESHUTDOWN;
  if (!consensus_is_leader(c)) return CONSENSUS_ENOTLEADER;
  const struct member_rec *m = node_id ? member_by_id(c, node_id) : NULL;
  if (m == NULL) return CONSENSUS_ENOTFOUND;
  struct change_req *ch = calloc(1, sizeof *ch);
  if (ch == NULL) return CONSENSUS_ENOMEM;
  ch->c = c;
  ch->cb = cb;
  ch->ud = ud;
  ch->id = 0; /* no promotion step */
  ch->promoting = true;
  ch->req.data = ch;
  int rv = raft_remove(&c->raft, &ch->req, m->raft_id, change_cb);
  if (rv != 0) {
    free(ch);
    return map_raft_status(rv);
  }
  return 0;
}

int consensus_isolate(struct consensus *c, unsigned duration_ms) {
  if (c->closing) return CONSENSUS_ESHUTDOWN;
  zg_transport_isolate(&c->transport, duration_ms);
  return 0;
}
