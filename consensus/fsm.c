/* fsm.c: the replicated state machine's apply path and its raft_fsm glue.
 *
 * Apply is deterministic: every value that differs between nodes (time, ids,
 * sealed secrets) is chosen by the leader before the entry enters the log
 * (commands.c, prepare). Each entry is decoded (codec.c), applied through
 * its row of the command table (commands.c) and, when it succeeds,
 * recorded in the audit trail. A write that is invalid against the current
 * state (unknown id, If-Match mismatch) is applied as a no-op with an error
 * result. An entry that cannot be decoded is logged, counted and skipped;
 * apply never fails raft. The containers live in state.c, snapshots in
 * snapshot.c.
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

static void audit_append(struct zg_fsm *f, const struct zgc_command *cmd,
                         const struct zg_apply_out *o) {
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
  char *text = zg_comma_text(rec, &len);
  if (text) zg_audit_push(f, &f->st, text, len);
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
  struct zg_apply_out o = {0};
  int status = zg_apply_command(f, &cmd, &o);
  const struct zg_command_def *def = zg_command_by_type(cmd.type);
  if (status == 0 && def->not_audited) {
    /* counters only (usage.add): no audit record, no change event */
  } else if (status == 0) {
    audit_append(f, &cmd, &o);
    o.changed |= ZG_CHANGED_AUDIT;
    if (o.result && def->result_has_audit_seq)
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
  if (zg_snapshot_parts(f, bufs, n_bufs)) return RAFT_NOMEM;
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
  zg_snapshot_parts_free(*bufs, *n_bufs);
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
    if (!f->starting) ZG_LOG_ERROR("consensus_snapshot_rejected", "%s", err);
    snprintf(f->restore_error, sizeof f->restore_error, "%s", err);
    f->restore_len = buf->len;
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
  zg_state_init(&f->st, f->audit_max);
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
  zg_state_free(&f->st);
  release_grave(f);
  free(f->grave);
  f->grave = NULL;
  f->grave_cap = 0;
  f->snapshot_pinned = false;
}
