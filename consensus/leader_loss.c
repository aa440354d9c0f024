/* leader_loss.c: a follower whose leader's connection closes starts the
 * election at once instead of waiting out an election timeout; a follower
 * that has not heard from its leader for an election timeout votes.
 *
 * Why: when the active node's process dies (SIGKILL, crash, OOM, docker
 * kill), its kernel closes every TCP connection at once, so the followers
 * see the leader's peer connection end within a round trip. libraft 0.22.1
 * only notices after its randomized election timeout (1x..2x
 * cluster.election_timeout_ms), and with pre-vote a candidate is refused by
 * every voter that still "has a leader" (recv_request_vote.c rejects while
 * follower_state.current_leader is set, not only within the minimum
 * election timeout as the Raft thesis §4.2.3 says), so an election only
 * succeeded once the slowest voter's own timer fired: most of the failover
 * time was waiting.
 *
 * A connection that ends does not prove the leader dead: a firewall
 * reload, a conntrack flush or a spoofed RST end it too, and deposing a
 * live leader costs a failover. So the transport reports only the inbound
 * connection (the one the leader sends on), and node.c first asks the
 * leader's raft port for a new connection (zg_probe_start): only a refusal
 * (the process is gone, its port closed) starts the election. A leader
 * whose host vanished (no answer) is left to the timers below.
 *
 * How: libraft has no API to start an election. Its own mechanism for a
 * legitimate early election is leadership transfer (thesis §3.10): the
 * leader sends TimeoutNow, the follower starts an election at once with the
 * "disrupt leader" flag, which the other voters honour even while they
 * still believe in the old leader. When the leader's connection closes we
 * hand raft exactly that message, as if the dying leader had sent it:
 * addressed from the current leader, at the current term, with our own last
 * log index and term, so recv_timeout_now.c accepts it only when we are a
 * voter, a follower of that very leader, and fully persisted. We receive it
 * through libraft's own receive callback, captured when raft starts
 * raft_uv's raft_io (zg_io_tap), so raft processes it like any message.
 *
 * When the leader just stops (SIGSTOP, a partition) nothing closes; the
 * first voter whose timer fires asks for votes, and the others now grant
 * them once they too have not heard from the leader for an election
 * timeout (tap_recv), as the thesis says, instead of refusing until their
 * own timers fire.
 *
 * Every candidacy (started this way or by its timer) retries after one
 * heartbeat instead of an election timeout until it wins or follows
 * someone, for at most two election timeouts (zg_leader_loss_settle): the
 * first answer is often lost on a voter's stale connection. A timer-started
 * candidacy retries in pre-vote, which changes no term.
 *
 * Safety: Raft's safety never depends on who starts an election or when;
 * votes are still granted only to a candidate whose log is at least as up
 * to date (§3.6). The cost of a false alarm (a connection that ends while
 * the leader lives) is one needless election. The active/standby lease
 * (failover/role.c, failover.lease_ratio x election timeout, always under
 * one election timeout) rests on voters refusing votes for an election
 * timeout after hearing from the leader: tap_recv keeps that rule, but a
 * disrupt-leader election does not (the old leader may be alive behind a
 * cut that reset our connection), so a leader that won one is not ready
 * (consensus_is_leader) until one election timeout after its win (every
 * lease is shorter: failover.lease_ratio <= 0.95), when any
 * lease the old leader took before those votes has run out (a lease runs
 * from its barrier's submission, which preceded the voter's last ack of
 * the old leader, which preceded its vote for us). And since our own acks
 * may have renewed that lease until the connection ended, we vote for
 * no other candidate for as long either (tap_recv), so no one
 * else can win before that lease is over. Only gateway nodes do this:
 * the witness waits for its timer, so it does not race the gateway it
 * would hand leadership to anyway. Connections cut by this node itself
 * (the isolate drill, shutdown) are not reported by the transport.
 *
 * The tap also records, for log_gap.c (via node.c), what a follower
 * reports as its last index in its AppendEntries results in the current
 * term (as leader) and the leader's commit index of the last AppendEntries
 * (as follower); it changes nothing in those messages.
 */
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/internal.h"

/* Every message from a peer passes here first. A vote request (pre-vote
 * or real) that arrives after this follower has not heard from its leader
 * for `silent_ms` is marked disrupt-leader, so libraft judges it on the
 * candidate's log instead of refusing it for having a leader: the rule of
 * the Raft thesis §4.2.3 (refuse only "within the minimum election timeout
 * of hearing from a current leader"). Inside that window requests are
 * untouched, so a live leader keeps its followers (no flapping when one
 * node alone lost the leader). */
static raft_term last_log_term(const struct raft *r);

/* When the candidate that lost the leader cannot win. A gateway node that
 * missed the last committed entry (it reached only the witness before the
 * leader died) starts the early election, and the witness, whose log is
 * ahead, refuses it. Left alone, the candidate retried every heartbeat for
 * two election timeouts, and each real-election retry bumped the term,
 * which restarted the witness's own timer: the witness won only after
 * that (1.06-1.2 s, review finding). So:
 *   - the voter that refuses such a candidate (disrupt-leader, log behind
 *     its own) shortens its own follower timer to one election timeout
 *     (the least the lease allows: from its last message from the leader,
 *     or from that candidate's term bump, which restarted it) instead of
 *     its ranked one (a witness: 1.5-2);
 *   - a candidate whose expedited (real-election) retry gets an explicit
 *     refusal in its own term stops retrying fast and waits two election
 *     timeouts, leaving the term alone for the voter that can win.
 * Neither timer runs out within an election timeout of the voter's last
 * message from the leader, so the rule the lease rests on holds; the
 * winner (a witness) then hands leadership to the caught-up gateway. */
static void note_vote_traffic(struct zg_io_tap *tap, struct raft *r, const struct raft_message *m) {
  if (m->type == RAFT_REQUEST_VOTE && m->request_vote.disrupt_leader &&
      raft_state(r) != RAFT_LEADER && tap->ahead_since_ms == 0) {
    raft_term our_term = last_log_term(r);
    raft_index our_index = raft_last_index(r);
    if (m->request_vote.last_log_term < our_term ||
        (m->request_vote.last_log_term == our_term && m->request_vote.last_log_index < our_index)) {
      tap->ahead_since_ms = zg_mono_ms();
      tap->ahead_leader = raft_state(r) == RAFT_FOLLOWER ? r->follower_state.current_leader.id : 0;
    }
  }
  if (m->type == RAFT_REQUEST_VOTE_RESULT && !m->request_vote_result.vote_granted &&
      !m->request_vote_result.pre_vote && raft_state(r) == RAFT_CANDIDATE && tap->expedited &&
      m->request_vote_result.term == raft_current_term(r))
    tap->refused = true;
}

/* Notes the message's time per peer, and for log-damage detection
 * (node.c): the last index a follower reports to us as leader, the leader's
 * commit index as a follower. */
static void note_heard(struct zg_io_tap *tap, struct raft *r, const struct raft_message *m) {
  uint64_t now = zg_mono_ms();
  if (m->type == RAFT_APPEND_ENTRIES) {
    tap->ae_at_ms = now;
    tap->ae_leader_commit = m->append_entries.leader_commit;
    tap->ae_from = m->server_id;
  }
  size_t slot = ZG_TAP_PEERS;
  for (size_t i = 0; i < ZG_TAP_PEERS; i++) {
    if (tap->heard[i].id == m->server_id) {
      slot = i;
      break;
    }
    if (tap->heard[i].id == 0 && slot == ZG_TAP_PEERS) slot = i;
  }
  if (slot == ZG_TAP_PEERS) return;
  if (tap->heard[slot].id != m->server_id) {
    tap->heard[slot].id = m->server_id;
    tap->heard[slot].reported_at_ms = 0;
  }
  tap->heard[slot].at_ms = now;
  if (m->type == RAFT_APPEND_ENTRIES_RESULT && r != NULL &&
      m->append_entries_result.term == raft_current_term(r)) {
    tap->heard[slot].reported_last = m->append_entries_result.last_log_index;
    tap->heard[slot].reported_at_ms = now;
  }
}

bool zg_io_tap_reported_last(const struct zg_io_tap *tap, raft_id peer, unsigned within_ms,
                             raft_index *last) {
  uint64_t now = zg_mono_ms();
  for (size_t i = 0; i < ZG_TAP_PEERS; i++)
    if (tap->heard[i].id == peer && tap->heard[i].reported_at_ms != 0 &&
        now - tap->heard[i].reported_at_ms <= within_ms) {
      *last = tap->heard[i].reported_last;
      return true;
    }
  return false;
}

bool zg_io_tap_quorum_heard(const struct zg_io_tap *tap, const struct raft *r, unsigned within_ms) {
  uint64_t now = zg_mono_ms();
  unsigned voters = 0, heard = 0;
  for (unsigned i = 0; i < r->configuration.n; i++) {
    const struct raft_server *s = &r->configuration.servers[i];
    if (s->role != RAFT_VOTER) continue;
    voters++;
    if (s->id == r->id) {
      heard++;
      continue;
    }
    for (size_t k = 0; k < ZG_TAP_PEERS; k++)
      if (tap->heard[k].id == s->id && now - tap->heard[k].at_ms <= within_ms) {
        heard++;
        break;
      }
  }
  return voters > 0 && heard * 2 > voters;
}

/* libraft 0.22.1 (recv_request_vote_result.c) reads
 * candidate_state.in_pre_vote before it checks that this node is still a
 * candidate. In a follower that byte belongs to the leader's address
 * pointer (the union in struct raft), in a leader to its own state. A
 * pre-vote answer carries the term the candidate asked for (a refusal
 * echoes it: recv_request_vote.c), one more than ours; when it arrives
 * after we stopped being a candidate and that byte happens to read 0,
 * libraft takes it as a real term, bumps ours, and our next answer deposes
 * a healthy leader. Seen here: a restarted standby whose pre-vote crossed
 * the leader's first heartbeat took the active's place (about one restart
 * in 150 in the fault campaign; the active was gone for 620 ms). A pre-vote
 * answer means nothing outside a candidacy: it is dropped. */
bool zg_leader_loss_drops(const struct raft *r, const struct raft_message *m) {
  return r != NULL && m->type == RAFT_REQUEST_VOTE_RESULT && m->request_vote_result.pre_vote &&
         raft_state((struct raft *)r) != RAFT_CANDIDATE;
}

static void tap_recv(struct raft_io *io, struct raft_message *m) {
  struct zg_io_tap *tap = (struct zg_io_tap *)io;
  struct raft *r = io->data;
  note_heard(tap, r, m);
  if (zg_leader_loss_drops(r, m)) return; /* no payload to free: a vote answer */
  /* Our own acks may have renewed the old leader's lease up to the moment
   * its connection ended: vote for nobody until that lease has run out
   * (a lost message to the candidate, which asks again). */
  if (m->type == RAFT_REQUEST_VOTE && zg_mono_ms() < tap->no_votes_until_ms) return;
  if (m->type == RAFT_REQUEST_VOTE && !m->request_vote.disrupt_leader && r != NULL &&
      raft_state(r) == RAFT_FOLLOWER && r->follower_state.current_leader.id != 0 &&
      io->time(io) - r->election_timer_start >= tap->silent_ms)
    m->request_vote.disrupt_leader = true;
  if (r != NULL) note_vote_traffic(tap, r, m);
  tap->recv_cb(io, m);
}

static int tap_start(struct raft_io *io, unsigned msecs, raft_io_tick_cb tick,
                     raft_io_recv_cb recv) {
  struct zg_io_tap *tap = (struct zg_io_tap *)io;
  tap->recv_cb = recv;
  tap->tick_cb = tick;
  return tap->uv_start(io, msecs, tick, tap_recv);
}

bool zg_leader_loss_timer_due(const struct zg_io_tap *tap, const struct raft *r, uint64_t *due) {
  if (tap->tick_cb == NULL) return false;
  unsigned short state = raft_state((struct raft *)r);
  if (state == RAFT_FOLLOWER)
    *due = r->election_timer_start + r->follower_state.randomized_election_timeout;
  else if (state == RAFT_CANDIDATE)
    *due = r->election_timer_start + r->candidate_state.randomized_election_timeout;
  else
    return false;
  return true;
}

void zg_io_tap_tick(struct zg_io_tap *tap) {
  if (tap->tick_cb) tap->tick_cb(&tap->io);
}

void zg_io_tap_init(struct zg_io_tap *tap, unsigned election_ms, unsigned heartbeat_ms) {
  tap->uv_start = tap->io.start;
  tap->io.start = tap_start;
  tap->recv_cb = NULL;
  tap->tick_cb = NULL;
  tap->election_ms = election_ms;
  tap->fast_election_ms = heartbeat_ms < election_ms ? heartbeat_ms : election_ms;
  tap->expedited = false;
  tap->disrupting = false;
  tap->in_candidacy = false;
  tap->no_votes_until_ms = 0;
  tap->silent_ms = election_ms;
  /* The active's lease is failover.lease_ratio (at most 0.95, replicated
   * and changed live, possibly not yet applied everywhere) x the election
   * timeout: one election timeout outlasts any of them. */
  tap->hold_ms = election_ms;
  tap->hold_term = 0;
  tap->hold_until_ms = 0;
  tap->ahead_since_ms = 0;
  tap->ahead_leader = 0;
  memset(tap->heard, 0, sizeof tap->heard);
  tap->refused = false;
  zg_io_tap_rank(tap, false, 0x9e3779b97f4a7c15ull);
}

void zg_io_tap_rank(struct zg_io_tap *tap, bool witness, uint64_t seed) {
  unsigned e = tap->election_ms;
  tap->timer_min_ms = witness ? e / 2 : 0;
  tap->timer_span_ms = witness ? e / 2 : e / 8;
  if (tap->timer_span_ms == 0) tap->timer_span_ms = 1;
  tap->follower_timeout_ms = 0;
  tap->draw_state = seed ? seed : 0x9e3779b97f4a7c15ull;
}

/* xorshift64 (Marsaglia 2003): spreads timers, nothing secret. */
static unsigned draw(struct zg_io_tap *tap, unsigned span) {
  uint64_t x = tap->draw_state;
  x ^= x << 13, x ^= x >> 7, x ^= x << 17;
  tap->draw_state = x;
  return (unsigned)(x % span);
}

/* libraft draws a follower's timer uniformly in [1, 2) election timeouts
 * each time it (re)starts it (electionResetTimer: on becoming follower, on
 * granting a vote, ...; a leader's message only moves its start). Replace
 * the draw with the ranked one. Still at least one election timeout, so
 * the rule the lease rests on (no vote within an election timeout of the
 * leader's last message) holds; the value is read by libraft's tick
 * (electionTimerExpiration), through the public struct raft. */
static void rank_follower_timer(struct zg_io_tap *tap, struct raft *r) {
  if (tap->ahead_since_ms && (raft_state(r) != RAFT_FOLLOWER ||
                              (r->follower_state.current_leader.id != 0 &&
                               r->follower_state.current_leader.id != tap->ahead_leader) ||
                              zg_mono_ms() >= tap->ahead_since_ms + 3ull * tap->election_ms))
    tap->ahead_since_ms = 0; /* it ran for office, or someone leads: done */
  if (raft_state(r) != RAFT_FOLLOWER || r->election_timeout != tap->election_ms) return;
  if (tap->ahead_since_ms) { /* see note_vote_traffic */
    if (r->follower_state.randomized_election_timeout > tap->election_ms) {
      r->follower_state.randomized_election_timeout = tap->election_ms;
      tap->follower_timeout_ms = tap->election_ms;
    }
    return;
  }
  if (r->follower_state.randomized_election_timeout == tap->follower_timeout_ms) return;
  tap->follower_timeout_ms = tap->election_ms + tap->timer_min_ms + draw(tap, tap->timer_span_ms);
  r->follower_state.randomized_election_timeout = tap->follower_timeout_ms;
}

void zg_leader_loss_settle(struct zg_io_tap *tap, struct raft *r) {
  uint64_t now = zg_mono_ms();
  unsigned short state = raft_state(r);
  /* Every candidacy, however it started, retries fast for a while: the
   * answer to its first (pre-)vote request is often lost on a voter's stale
   * connection (see zg_leader_lost). Pre-vote retries change no term; a
   * node cut off from every voter stays in pre-vote and churns nothing. */
  if (state == RAFT_CANDIDATE && !tap->in_candidacy && !tap->expedited) {
    raft_set_election_timeout(r, tap->fast_election_ms);
    tap->expedited = true;
    tap->expedite_until_ms = now + 2ull * tap->election_ms;
  }
  tap->in_candidacy = state == RAFT_CANDIDATE;
  if (tap->expedited && (state != RAFT_CANDIDATE || now >= tap->expedite_until_ms)) {
    tap->expedited = false;
    raft_set_election_timeout(r, tap->election_ms);
  }
  /* The candidacy (libraft keeps its disrupt-leader flag on every retry,
   * fast or not) is over. Won with votes that ignored the old leader: its
   * lease may still run (see the header). A lease the old leader took ends
   * at most one lease after the last vote for us was granted, which was
   * before now. */
  if (tap->refused) {
    tap->refused = false;
    if (state == RAFT_CANDIDATE && tap->expedited) {
      tap->expedited = false;
      raft_set_election_timeout(r, tap->election_ms); /* restarts the timer */
      r->candidate_state.randomized_election_timeout = 2 * tap->election_ms;
    }
  }
  if (tap->disrupting && state != RAFT_CANDIDATE) {
    tap->disrupting = false;
    if (state == RAFT_LEADER) {
      tap->hold_term = raft_current_term(r);
      tap->hold_until_ms = now + tap->hold_ms;
    }
  }
  rank_follower_timer(tap, r);
}

bool zg_leader_loss_holding(const struct zg_io_tap *tap, struct raft *r) {
  return tap->hold_term != 0 && tap->hold_term == raft_current_term(r) &&
         zg_mono_ms() < tap->hold_until_ms;
}

/* The term of the last entry: the last record of the trail (libraft keeps
 * one record per term run), else the snapshot's. */
raft_term zg_leader_loss_last_log_term(const struct raft *r) {
  return last_log_term(r);
}

static raft_term last_log_term(const struct raft *r) {
  const struct raft_trail *t = &r->trail;
  unsigned n = t->front <= t->back ? t->back - t->front : t->size - t->front + t->back;
  if (n == 0) return t->snapshot.index ? t->snapshot.term : 0;
  return t->records[(t->front + n - 1) % t->size].term;
}

bool zg_leader_lost(struct zg_io_tap *tap, struct raft *r, raft_id peer) {
  if (tap->recv_cb == NULL || raft_state(r) != RAFT_FOLLOWER) return false;
  raft_id leader = 0;
  const char *address = NULL;
  raft_leader(r, &leader, &address);
  if (leader == 0 || leader != peer || address == NULL) return false;
  if (r->last_stored < raft_last_index(r)) return false; /* raft would ignore it */
  /* raft frees the leader's address when it becomes a candidate: copy it. */
  char from[256];
  snprintf(from, sizeof from, "%s", address);
  struct raft_message m;
  memset(&m, 0, sizeof m);
  m.type = RAFT_TIMEOUT_NOW;
  m.server_id = leader;
  m.server_address = from;
  m.timeout_now.term = raft_current_term(r);
  m.timeout_now.last_log_index = raft_last_index(r);
  m.timeout_now.last_log_term = last_log_term(r);
  tap->recv_cb(&tap->io, &m);
  if (raft_state(r) != RAFT_CANDIDATE) return false;
  /* The first answer to our vote request is often lost: a voter's own
   * connection to us may be a stale one (to our previous process, or cut
   * while idle), and raft_uv only notices on the failed write, dropping the
   * message. Retry the candidacy after a heartbeat, not a full election
   * timeout; zg_leader_loss_settle puts the timeout back. */
  raft_set_election_timeout(r, tap->fast_election_ms);
  tap->expedited = true;
  tap->disrupting = true;
  tap->no_votes_until_ms = zg_mono_ms() + tap->hold_ms;
  tap->expedite_until_ms = zg_mono_ms() + 2ull * tap->election_ms;
  return true;
}

/* ---- is the old leader's process gone? ------------------------------------ */

struct zg_probe {
  uv_loop_t *loop;
  uv_getaddrinfo_t gai;
  uv_tcp_t tcp;
  uv_connect_t req;
  uv_timer_t timer;
  raft_id peer;
  zg_probe_cb cb;
  void *ud;
  int open; /* handles (and the lookup) not yet closed */
  bool refused, cancelled, reported, lookup_pending;
  int status; /* of the connect: 0, a UV_E* code, or 1 = no answer yet */
};

static void probe_report(struct zg_probe *p) {
  if (p->reported) return;
  p->reported = true;
  p->cb(p->ud, p->peer, p->refused && !p->cancelled, p->status);
}

/* The probe lives until its two handles are closed and its lookup (if
 * any) has called back, whatever order those happen in. */
static void probe_unref(struct zg_probe *p) {
  if (--p->open > 0) return;
  probe_report(p);
  free(p);
}

static void probe_closed(uv_handle_t *h) {
  probe_unref(h->data);
}

static void probe_finish(struct zg_probe *p) {
  if (!uv_is_closing((uv_handle_t *)&p->timer)) uv_close((uv_handle_t *)&p->timer, probe_closed);
  if (!uv_is_closing((uv_handle_t *)&p->tcp)) uv_close((uv_handle_t *)&p->tcp, probe_closed);
}

static void probe_timeout(uv_timer_t *t) {
  probe_finish(t->data); /* no answer, or a connection that stayed up: not gone */
}

static void probe_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char byte[64];
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(byte, sizeof byte);
}

/* Connected: a live node's transport now waits for our handshake and says
 * nothing; an exiting process's kernel completes the connection from the
 * listen queue and then resets or closes it. */
static void probe_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct zg_probe *p = s->data;
  (void)buf;
  if (nread == 0) return;
  p->refused = nread < 0; /* ended: gone; data: something lives there */
  p->status = nread < 0 ? (int)nread : 0;
  probe_finish(p);
}

static void probe_connected(uv_connect_t *req, int status) {
  struct zg_probe *p = req->data;
  if (status == UV_ECANCELED) return; /* timed out or cancelled: finishing */
  p->status = status;
  /* Refused, or reset before it was set up (a listener closed with our
   * connection in its queue): nothing listens any more. */
  p->refused = status == UV_ECONNREFUSED || status == UV_ECONNRESET;
  if (status != 0 || uv_read_start((uv_stream_t *)&p->tcp, probe_alloc, probe_read) != 0)
    probe_finish(p);
}

static void probe_connect(struct zg_probe *p, const struct sockaddr *addr) {
  if (p->cancelled || uv_is_closing((uv_handle_t *)&p->tcp) ||
      uv_tcp_connect(&p->req, &p->tcp, addr, probe_connected) != 0)
    probe_finish(p);
}

static void probe_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  struct zg_probe *p = gai->data;
  if (status != 0 || res == NULL)
    probe_finish(p);
  else
    probe_connect(p, res->ai_addr); /* finishes if timed out or cancelled meanwhile */
  if (res) uv_freeaddrinfo(res);
  p->lookup_pending = false;
  probe_unref(p); /* the lookup */
}

int zg_probe_start(uv_loop_t *loop, const char *address, unsigned timeout_ms, raft_id peer,
                   zg_probe_cb cb, void *ud, struct zg_probe **out) {
  char host[256], port[16];
  int port_no;
  if (zg_split_host_port(address, host, sizeof host, &port_no) != 0) return -1;
  snprintf(port, sizeof port, "%d", port_no);
  struct zg_probe *p = calloc(1, sizeof *p);
  if (p == NULL) return -1;
  p->loop = loop;
  p->peer = peer;
  p->cb = cb;
  p->ud = ud;
  uv_tcp_init(loop, &p->tcp);
  uv_timer_init(loop, &p->timer);
  p->tcp.data = p->timer.data = p->gai.data = p->req.data = p;
  p->open = 2; /* tcp, timer (+1 while a lookup runs) */
  p->status = 1;
  uv_timer_start(&p->timer, probe_timeout, timeout_ms, 0);
  struct sockaddr_storage ss;
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  /* A numeric address needs no lookup (the thread pool may be busy with
   * raft_uv's file work). */
  if (uv_ip4_addr(host, port_no, (struct sockaddr_in *)&ss) == 0 ||
      uv_ip6_addr(host, port_no, (struct sockaddr_in6 *)&ss) == 0) {
    probe_connect(p, (const struct sockaddr *)&ss);
  } else if (uv_getaddrinfo(loop, &p->gai, probe_resolved, host, port, &hints) == 0) {
    p->open++;
    p->lookup_pending = true;
  } else {
    probe_finish(p);
  }
  *out = p;
  return 0;
}

void zg_probe_cancel(struct zg_probe *p) {
  p->cancelled = true;
  if (p->lookup_pending) uv_cancel((uv_req_t *)&p->gai);
  probe_finish(p);
}
