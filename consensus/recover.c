/* recover.c: offline disaster recovery on a stopped node's data dir.
 *
 * consensus_inspect_log() reads the term and last index of the log (so the
 * operator can pick the survivor with the longest log);
 * consensus_recover_single() forces a configuration of this node alone
 * (libraft raft_recover), for when a majority is lost for good.
 *
 * recover_single also gives the data dir a new cluster incarnation
 * (incarnation.c): the other nodes still hold the old one, and the peer
 * handshake refuses them until they come back with an empty data dir.
 *
 * Both run on a private uv loop and touch only data_dir/raft (and
 * data_dir/incarnation). They fail
 * with a message naming the call and path (locked or corrupt log,
 * missing data dir); the data dir is unchanged unless recover succeeds.
 */
#include "consensus/consensus.h"
#include "consensus/internal.h"

#include <raft.h>
#include <raft/uv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct offline {
  uv_loop_t loop;
  struct raft_uv_transport transport;
  struct raft_io io; /* version set by raft_uv_init */
  char raft_dir[600];
  bool transport_inited, io_inited;
};

static int offline_open(struct offline *o, const char *data_dir, char *errmsg, size_t errlen) {
  memset(o, 0, sizeof(*o));
  snprintf(o->raft_dir, sizeof(o->raft_dir), "%s/raft", data_dir);
  struct stat st;
  if (stat(o->raft_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
    snprintf(errmsg, errlen, "%s holds no Raft data (nothing to recover)", o->raft_dir);
    return -1;
  }
  uv_loop_init(&o->loop);
  o->transport.version = 1;
  int rv = raft_uv_tcp_init(&o->transport, &o->loop);
  if (rv != 0) {
    snprintf(errmsg, errlen, "raft_uv_tcp_init(): %s", raft_strerror(rv));
    return -1;
  }
  o->transport_inited = true;
  rv = raft_uv_init(&o->io, &o->loop, o->raft_dir, &o->transport);
  if (rv != 0) {
    snprintf(errmsg, errlen, "raft_uv_init(%s): %s", o->raft_dir, o->io.errmsg);
    return -1;
  }
  raft_uv_set_auto_recovery(&o->io, false);
  o->io_inited = true;
  return 0;
}

static void io_closed(struct raft_io *io) {
  (void)io;
}

static void offline_close(struct offline *o) {
  if (o->io_inited) o->io.close(&o->io, io_closed);
  uv_run(&o->loop, UV_RUN_DEFAULT);
  if (o->io_inited) raft_uv_close(&o->io);
  if (o->transport_inited) raft_uv_tcp_close(&o->transport);
  uv_loop_close(&o->loop);
}

int consensus_inspect_log(const char *data_dir, const char *node_id, const char *raft_address,
                          uint64_t *term, uint64_t *last_index, char *errmsg, size_t errlen) {
  struct offline o;
  int rc = -1;
  if (offline_open(&o, data_dir, errmsg, errlen) != 0) goto out;
  int rv = o.io.init(&o.io, consensus_raft_id(node_id), raft_address);
  if (rv != 0) {
    snprintf(errmsg, errlen, "opening %s: %s", o.raft_dir, o.io.errmsg);
    goto out;
  }
  raft_term t = 0;
  raft_id voted = 0;
  struct raft_snapshot *snap = NULL;
  raft_index start = 0;
  struct raft_entry *entries = NULL;
  size_t n = 0;
  rv = o.io.load(&o.io, &t, &voted, &snap, &start, &entries, &n);
  if (rv != 0) {
    snprintf(errmsg, errlen, "reading the log in %s: %s", o.raft_dir, o.io.errmsg);
    goto out;
  }
  *term = t;
  *last_index = n > 0 ? start + n - 1 : (snap ? snap->index : 0);
  /* The loaded entries and snapshot are ours to free. Entries read from a
   * segment share batches: free each batch once. */
  void *last_batch = NULL;
  for (size_t i = 0; i < n; i++) {
    if (entries[i].batch == NULL)
      raft_free(entries[i].buf.base);
    else if (entries[i].batch != last_batch)
      raft_free(entries[i].batch);
    if (entries[i].batch) last_batch = entries[i].batch;
  }
  raft_free(entries);
  if (snap) {
    raft_configuration_close(&snap->configuration);
    for (unsigned i = 0; i < snap->n_bufs; i++) raft_free(snap->bufs[i].base);
    raft_free(snap->bufs);
    raft_free(snap);
  }
  rc = 0;
out:
  offline_close(&o);
  return rc;
}

static int fsm_apply_unused(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result) {
  (void)fsm, (void)buf, (void)result;
  return 0;
}

static void raft_closed(struct raft *r) {
  (void)r;
}

int consensus_recover_single(const char *data_dir, const char *node_id, const char *raft_address,
                             char *errmsg, size_t errlen) {
  struct offline o;
  struct raft r;
  struct raft_fsm fsm = {0};
  fsm.version = 1;
  fsm.apply = fsm_apply_unused;
  bool raft_inited = false;
  int rc = -1;
  if (offline_open(&o, data_dir, errmsg, errlen) != 0) goto out;
  int rv = raft_init(&r, &o.io, &fsm, consensus_raft_id(node_id), raft_address);
  if (rv != 0) {
    snprintf(errmsg, errlen, "raft_init(%s): %s", o.raft_dir, raft_errmsg(&r));
    goto out;
  }
  raft_inited = true;
  /* The new incarnation is stored first: once the log is rewritten, this
   * node must never again accept a node of the old one (a crash in between
   * leaves a node refused by its old peers, which is the safe side). On a
   * failure the old file comes back. */
  struct zg_incarnation old_inc, new_inc;
  char ierr[600];
  int had_old = zg_incarnation_load(data_dir, &old_inc, ierr, sizeof ierr);
  if (zg_incarnation_new(&new_inc) != 0) {
    snprintf(errmsg, errlen, "no randomness for the new cluster incarnation");
    goto out;
  }
  if (zg_incarnation_store(data_dir, &new_inc, ierr, sizeof ierr) != 0) {
    snprintf(errmsg, errlen, "%s", ierr);
    goto out;
  }
  struct raft_configuration conf;
  raft_configuration_init(&conf);
  rv = raft_configuration_add(&conf, consensus_raft_id(node_id), raft_address, RAFT_VOTER);
  if (rv == 0) rv = raft_recover(&r, &conf);
  raft_configuration_close(&conf);
  if (rv != 0) {
    snprintf(errmsg, errlen, "raft_recover(%s): %s", o.raft_dir, raft_errmsg(&r));
    if (had_old == 0)
      zg_incarnation_store(data_dir, &old_inc, ierr, sizeof ierr);
    else if (had_old == 1)
      zg_incarnation_remove(data_dir);
    goto out;
  }
  rc = 0;
  zg_incarnation_clear_superseded(data_dir); /* a new incarnation: no longer stale */
out:
  if (raft_inited) {
    raft_close(&r, raft_closed);
    uv_run(&o.loop, UV_RUN_DEFAULT);
    o.io_inited = false; /* closed by raft_close */
    raft_uv_close(&o.io);
  }
  offline_close(&o);
  return rc;
}
