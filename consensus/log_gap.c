/* log_gap.c: notices a Raft log that lost entries its leader counts as
 * stored, on both sides, as pure decisions over what node.c samples every
 * loop turn (so they are unit-tested without a cluster).
 *
 * Why: a follower whose log lost acknowledged entries (a torn tail cut at
 * start-up, repair.c, when the batch had in fact been acknowledged) has a
 * last index below the match index its leader keeps for it. libraft 0.22.1
 * then never sends those entries again: it ignores the follower's
 * rejections at or below match_index (progress.c, "stale rejected index"),
 * and its probe heartbeats, anchored below match_index, send no entries
 * (the in-flight count next - match - 1 wraps). The follower stays behind
 * for as long as that leader leads, silently: its own commit index equals
 * its applied index, so it looked like a healthy standby.
 *
 * Leader side (zg_gap_leader_step): a follower whose AppendEntries results
 * keep reporting a last index below its match index for two election
 * timeouts has lost entries. node.c then logs one ERROR line and hands
 * leadership to another caught-up voter: a new leader starts every
 * follower's progress at match 0 and resends what is missing, which is
 * exactly libraft's normal catch-up. Safety: a leadership transfer is an
 * ordinary Raft operation (the new leader is elected by the usual vote
 * rule, nothing committed is lost); the only cost is one handover. Once
 * per term, so it cannot loop.
 *
 * Follower side (zg_gap_follower_step): AppendEntries from the leader keep
 * arriving with a commit index above our last index while our last index
 * does not move for ZG_GAP_TIMEOUTS election timeouts: we are stuck (the
 * leader is an older build, or had no caught-up voter to hand over to).
 * node.c logs one ERROR line (again at most every ZG_GAP_REPEAT_MS) and
 * consensus_log_behind() makes the node an unhealthy standby
 * (/health/standby 503) until the log moves again.
 *
 * Failure modes: none of its own (no allocation, no I/O); a false alarm
 * (a follower whose log is behind and not moving for that long for another
 * reason, such as a very slow snapshot transfer) only marks it unhealthy
 * until its log moves, which is true at the time.
 */
#include "consensus/internal.h"

enum zg_gap_event zg_gap_follower_step(struct zg_gap_follower *g, uint64_t now_ms, bool following,
                                       uint64_t ae_at_ms, raft_index leader_commit, raft_index last,
                                       unsigned election_ms) {
  bool fresh = following && ae_at_ms != 0 && now_ms - ae_at_ms <= election_ms;
  if (fresh && leader_commit <= last) { /* caught up */
    g->since_ms = 0;
    if (g->behind) {
      g->behind = false;
      return ZG_GAP_CLEARED;
    }
    return ZG_GAP_NONE;
  }
  if ((g->since_ms != 0 || g->behind) && last != g->last) { /* the log moves: not stuck */
    g->since_ms = 0;
    if (g->behind) {
      g->behind = false;
      g->last = last;
      return ZG_GAP_CLEARED;
    }
  }
  if (!fresh) { /* no word from a leader: nothing to judge, and the wait starts again */
    g->since_ms = 0;
    return ZG_GAP_NONE;
  }
  if (g->since_ms == 0) {
    g->since_ms = now_ms;
    g->last = last;
    return ZG_GAP_NONE;
  }
  if (now_ms - g->since_ms < (uint64_t)ZG_GAP_TIMEOUTS * election_ms) return ZG_GAP_NONE;
  if (!g->behind || now_ms - g->reported_ms >= ZG_GAP_REPEAT_MS) {
    g->behind = true;
    g->reported_ms = now_ms;
    g->leader_commit = leader_commit;
    return ZG_GAP_STUCK;
  }
  return ZG_GAP_NONE;
}

bool zg_gap_leader_step(struct zg_gap_leader *g, uint64_t now_ms, uint64_t term, bool reported,
                        raft_index reported_last, raft_index match, unsigned election_ms) {
  if (!reported || reported_last >= match) {
    g->since_ms = 0;
    return false;
  }
  if (g->since_ms == 0) {
    g->since_ms = now_ms;
    return false;
  }
  if (now_ms - g->since_ms < 2ull * election_ms || g->acted_term == term) return false;
  g->acted_term = term;
  return true;
}
