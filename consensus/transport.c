/* transport.c: raft_uv transport over libuv TCP with a mutual
 * challenge-response handshake keyed by the cluster secret.
 *
 * Outbound (connect): resolve, connect, send HELLO {nonce_c, our raft id,
 * our address}; read CHALLENGE {nonce_s, server id, server address, mac_s};
 * check mac_s and that the server is the node we wanted; send PROOF {mac_c};
 * read OK; hand the stream to raft. Inbound (accept): the mirror image, and
 * the stream goes to raft after OK is written. Each MAC is
 * HMAC-SHA256(secret, direction label || nonce_c || nonce_s || sender id ||
 * sender address), compared with CRYPTO_memcmp.
 *
 * Cluster incarnation (incarnation.c): the address field of HELLO and
 * CHALLENGE is the raft address, then NUL, "zgi1:" and the sender's
 * incarnation in hex ("none" from a joiner that has none yet). A NUL in the
 * address is refused anywhere else. The MACs cover the raft address only,
 * so a node of the previous version (which cut the field at its first NUL)
 * still completes the handshake with us both ways; its peers see no
 * incarnation and let it in (and warn). Once the peer has proved the secret,
 * a different incarnation is refused on both sides with one ERROR line
 * `peer_incarnation_mismatch` that says what to do: the server does not
 * answer OK; the client sends its PROOF anyway (so the server can log the
 * refusal) and then fails. A joiner with an empty log (ZG_INC_ADOPT) takes
 * the incarnation of the first authenticated peer that sends one.
 *
 * Every read asks libuv for exactly the bytes the current message still
 * needs, so no raft byte is ever swallowed by the handshake. A handshake is
 * bounded to HANDSHAKE_TIMEOUT_MS and fixed sizes; a wrong secret, a timeout
 * or a malformed message closes the connection and logs WARN
 * `peer_auth_failed` with the peer's IP (never the secret). While the
 * startup quiet period runs, inbound connections are closed at once and
 * outbound ones fail, so a restarted node takes part in no election. The
 * isolate drill uses the same switch after cutting the live connections.
 *
 * Mutual TLS (security.tls in the node's config; zg_transport_set_tls):
 * every connection first runs a TLS 1.3 handshake over memory BIOs (see
 * base/tls.h), both sides presenting a certificate that must chain to the
 * cluster CA. The certificate names a node id (subjectAltName URI
 * urn:zonegate:node:<id>, else the CN), and the raft id a peer uses must be
 * consensus_raft_id() of that node id: an outbound connection checks the
 * server's certificate against the member it dialled, an inbound one checks
 * the raft id in HELLO against the client's certificate. Anything else is
 * refused with peer_auth_failed. The HMAC handshake above then runs inside
 * the TLS session as a second check (a stolen node key alone is not
 * enough). raft_uv reads and writes a uv_stream_t itself, so the stream it
 * gets is one end of a socketpair; a "tunnel" pumps between the other end
 * and the TLS session on the TCP connection, with back-pressure both ways
 * (TUNNEL_HIGH_WATER). Without TLS the tunnel pumps the bytes as they are.
 *
 * Every connection goes through a tunnel, TLS or not, so that this side
 * sees how it ends: when the peer or the network ends an inbound connection
 * already handed to raft (EOF, reset, write error: the one the peer sends
 * its messages on, its leader's heartbeats included), the peer-lost
 * callback gets the peer's raft id (node.c probes the peer, leader_loss.c
 * starts an election if it is gone). Outbound connections, and those this
 * node cuts itself (isolate drill, shutdown), are not reported.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cjson/cJSON.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

#define HANDSHAKE_TIMEOUT_MS 2000
#define MAX_INBOUND_HANDSHAKES 64
#define NONCE_LEN 32
#define MAC_LEN 32
#define ADDR_MAX 255
#define HELLO_FIXED (4 + NONCE_LEN + 8 + 1)
#define CHALLENGE_FIXED (4 + NONCE_LEN + 8 + MAC_LEN + 1)
#define PROOF_LEN (4 + MAC_LEN)
#define OK_LEN 4
/* The incarnation extension of the address field (see the header). */
#define INC_EXT_PREFIX "zgi1:"
#define INC_EXT_PREFIX_LEN 5
#define INC_EXT_NONE "none"
#define INC_EXT_MAX (1 + INC_EXT_PREFIX_LEN + ZG_INCARNATION_HEX)
#define ADDR_TEXT_MAX (ADDR_MAX - INC_EXT_MAX) /* our own address, with room for the extension */
#define TUNNEL_READ_SIZE 65536
#define TUNNEL_HIGH_WATER (4u << 20) /* bytes queued on one side before the other stops */

enum hs_phase {
  HS_RESOLVING,
  HS_CONNECTING,
  HS_READ_HELLO,
  HS_READ_HELLO_ADDR,
  HS_READ_CHALLENGE,
  HS_READ_CHALLENGE_ADDR,
  HS_READ_PROOF,
  HS_READ_OK,
  HS_WRITING_OK,
  HS_DONE,
};

struct zgt;
struct tunnel;

struct handshake {
  struct zgt *tr;
  struct handshake *next, *prev;
  bool outbound, finished, tcp_open, timer_open, gai_pending, inner_open;
  enum hs_phase phase;
  uv_tcp_t *tcp; /* raft_malloc'd: raft frees it after the handoff */
  /* TLS: the tunnel owns the TCP connection (tcp is NULL then) and the HMAC
   * handshake runs on `inner`, raft's end of the socketpair. */
  struct tunnel *tunnel;
  uv_pipe_t *inner; /* raft_malloc'd, like tcp */
  uv_stream_t *io;  /* what the HMAC handshake reads and writes: tcp or inner */
  char cert_id[64]; /* node id in the peer's verified certificate */
  uv_timer_t timer;
  uv_getaddrinfo_t gai;
  uv_connect_t connect_req;
  uv_write_t write1, write2;
  int writes_pending;
  bool ok_received;
  /* The incarnation the peer sent (check_incarnation), and whether we
   * refuse it: the client then still proves itself, so that the server
   * can log the refusal too, and fails when the server closes. */
  enum { PEER_INC_ABSENT, PEER_INC_PENDING, PEER_INC_KNOWN } peer_inc_kind;
  struct zg_incarnation peer_inc;
  bool inc_refused;
  struct raft_uv_connect *req; /* outbound */
  raft_id peer_id;
  char peer_address[ADDR_MAX + 1];
  char peer_ip[64];
  uint8_t nonce_c[NONCE_LEN], nonce_s[NONCE_LEN];
  uint8_t rbuf[CHALLENGE_FIXED + ADDR_MAX];
  size_t rneed, rgot;
  uint8_t wbuf1[CHALLENGE_FIXED + ADDR_MAX], wbuf2[PROOF_LEN];
};

/* A connection to a peer (TLS or plain) and the socketpair end that raft's
 * stream talks to (see the header comment). */
struct tunnel {
  struct zgt *tr;
  struct tunnel *next, *prev;
  struct handshake *hs; /* while the handshake runs */
  uv_tcp_t *tcp;        /* raft_malloc'd (came from the handshake) */
  uv_pipe_t pipe;       /* our end of the socketpair */
  struct zg_tls *tls;   /* NULL: plaintext */
  int handles_open;
  bool pipe_open, closing, tcp_paused, pipe_paused, established;
  bool handed;     /* raft has its end: a peer-side end is reported */
  bool outbound;   /* we dialled: not reported (the peer's own connection carries its messages) */
  raft_id peer_id; /* proved by the handshake (set when handed) */
  char peer_ip[64];
};

struct tunnel_write {
  uv_write_t req;
  struct tunnel *t;
  bool to_tcp;
  char data[];
};

struct zgt {
  struct raft_uv_transport *t;
  uv_loop_t *loop;
  char *secret;
  SSL_CTX *tls; /* NULL: plaintext peer traffic */
  struct tunnel *tunnels;
  raft_id id;
  char address[ADDR_MAX + 1];
  char bind_address[ADDR_MAX + 1];
  uv_tcp_t listener;
  uv_timer_t quiet_timer;
  bool listener_open, quiet_timer_open, quiet;
  unsigned quiet_ms;
  raft_uv_accept_cb accept_cb;
  struct handshake *handshakes;
  unsigned n_inbound;
  bool closing;
  raft_uv_transport_close_cb close_cb;
  enum zg_incarnation_mode inc_mode;
  struct zg_incarnation inc;
  zg_incarnation_adopt_cb adopt;
  void *adopt_ud;
  zg_peer_lost_cb peer_lost;
  void *peer_lost_ud;
  /* A peer of a newer incarnation was met: this node's data is stale.
   * From then on every peer connection is refused, both ways, for good. */
  bool superseded;
  bool adopted; /* the incarnation came from a peer (ZG_INC_ADOPT), in this process */
  zg_superseded_cb superseded_cb;
  void *superseded_ud;
};

static void hs_fail(struct handshake *hs, const char *why);
static void maybe_finish_close(struct zgt *tr);
static void tunnel_close(struct tunnel *t, const char *why);
static void tunnel_peer_ended(struct tunnel *t);
static void tunnel_open_inner(struct handshake *hs);
static void hs_tls_ready(struct handshake *hs);

/* ---- MACs ---------------------------------------------------------------- */

static void put_be64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint64_t get_be64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
  return v;
}

static void compute_mac(const struct zgt *tr, const char *label, const uint8_t *nonce_c,
                        const uint8_t *nonce_s, raft_id sender_id, const char *sender_address,
                        uint8_t out[MAC_LEN]) {
  uint8_t data[64 + 2 * NONCE_LEN + 8 + ADDR_MAX];
  size_t n = 0, label_len = strlen(label), addr_len = strlen(sender_address);
  memcpy(data + n, label, label_len);
  n += label_len;
  memcpy(data + n, nonce_c, NONCE_LEN);
  n += NONCE_LEN;
  memcpy(data + n, nonce_s, NONCE_LEN);
  n += NONCE_LEN;
  put_be64(data + n, sender_id);
  n += 8;
  memcpy(data + n, sender_address, addr_len);
  n += addr_len;
  unsigned int mac_len = MAC_LEN;
  HMAC(EVP_sha256(), tr->secret, (int)strlen(tr->secret), data, n, out, &mac_len);
}

/* ---- handshake lifetime --------------------------------------------------- */

static void hs_release(struct handshake *hs) {
  if (hs->tcp_open || hs->inner_open || hs->timer_open || hs->gai_pending) return;
  struct zgt *tr = hs->tr;
  if (hs->prev)
    hs->prev->next = hs->next;
  else
    tr->handshakes = hs->next;
  if (hs->next) hs->next->prev = hs->prev;
  if (!hs->outbound) tr->n_inbound--;
  free(hs);
  maybe_finish_close(tr);
}

static void hs_tcp_close_cb(uv_handle_t *h) {
  struct handshake *hs = h->data;
  raft_free(h);
  hs->tcp = NULL;
  hs->tcp_open = false;
  hs_release(hs);
}

static void hs_inner_close_cb(uv_handle_t *h) {
  struct handshake *hs = h->data;
  raft_free(h);
  hs->inner = NULL;
  hs->inner_open = false;
  hs_release(hs);
}

static void hs_timer_close_cb(uv_handle_t *h) {
  struct handshake *hs = h->data;
  hs->timer_open = false;
  hs_release(hs);
}

static void hs_close_handles(struct handshake *hs, bool close_tcp) {
  if (hs->timer_open && !uv_is_closing((uv_handle_t *)&hs->timer))
    uv_close((uv_handle_t *)&hs->timer, hs_timer_close_cb);
  if (close_tcp && hs->tcp_open && !uv_is_closing((uv_handle_t *)hs->tcp))
    uv_close((uv_handle_t *)hs->tcp, hs_tcp_close_cb);
  if (close_tcp && hs->inner_open && !uv_is_closing((uv_handle_t *)hs->inner))
    uv_close((uv_handle_t *)hs->inner, hs_inner_close_cb);
  if (close_tcp && hs->tunnel) {
    struct tunnel *t = hs->tunnel;
    hs->tunnel = NULL;
    t->hs = NULL;
    tunnel_close(t, NULL);
  }
}

/* Logs WARN peer_auth_failed with the peer's IP, at most once per peer IP
 * and direction every AUTH_LOG_INTERVAL_MS (a misconfigured node retries
 * several times a second); the next line says how many were suppressed. */
#define AUTH_LOG_INTERVAL_MS 10000
static void log_auth_failure(struct handshake *hs, const char *why) {
  static struct zg_log_throttle throttle = {.interval_ms = AUTH_LOG_INTERVAL_MS};
  char key[72];
  snprintf(key, sizeof key, "%c%.63s", hs->outbound ? 'o' : 'i', hs->peer_ip);
  unsigned suppressed = 0;
  if (!zg_log_throttle(&throttle, key, &suppressed)) return;
  cJSON *fields = cJSON_CreateObject();
  if (fields != NULL) {
    cJSON_AddStringToObject(fields, "peer_ip", hs->peer_ip[0] ? hs->peer_ip : "?");
    cJSON_AddStringToObject(fields, "direction", hs->outbound ? "outbound" : "inbound");
    if (hs->peer_address[0]) cJSON_AddStringToObject(fields, "peer_raft_address", hs->peer_address);
    cJSON_AddStringToObject(fields, "reason", why);
    cJSON_AddNumberToObject(fields, "suppressed_since_last", suppressed);
    char msg[200];
    snprintf(msg, sizeof msg, "raft peer %.63s rejected: %.80s", hs->peer_ip[0] ? hs->peer_ip : "?",
             why);
    cJSON_AddStringToObject(fields, "msg", msg);
  }
  zg_log_fields(ZG_WARN, "peer_auth_failed", fields);
}

/* Ends a handshake with an error: closes its handles and, for an outbound
 * one, tells raft the connect failed. */
static void hs_fail(struct handshake *hs, const char *why) {
  if (hs->finished) return;
  hs->finished = true;
  hs->phase = HS_DONE;
  if (why != NULL && !hs->inc_refused) log_auth_failure(hs, why);
  if (hs->gai_pending) uv_cancel((uv_req_t *)&hs->gai);
  hs_close_handles(hs, true);
  if (hs->outbound && hs->req != NULL) {
    struct raft_uv_connect *req = hs->req;
    hs->req = NULL;
    req->cb(req, NULL, hs->tr->closing ? RAFT_CANCELED : RAFT_NOCONNECTION);
  }
  hs_release(hs);
}

/* Hands the authenticated stream to raft. */
static void hs_succeed(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  if (tr->superseded) {
    hs_fail(hs, NULL);
    return;
  }
  uv_stream_t *stream = hs->io;
  uv_read_stop(stream);
  /* The tunnel lives on, pumping for raft's end of the socketpair. */
  hs->tunnel->hs = NULL;
  hs->tunnel->handed = true;
  hs->tunnel->peer_id = hs->peer_id;
  hs->tunnel = NULL;
  hs->inner = NULL;
  hs->inner_open = false;
  hs->io = NULL;
  hs->finished = true;
  hs->phase = HS_DONE;
  stream->data = NULL;
  hs_close_handles(hs, false);
  ZG_LOG_INFO("peer_authenticated", "raft peer %llu (%s, %s) authenticated%s%s, %s",
              (unsigned long long)hs->peer_id, hs->peer_address, hs->peer_ip,
              hs->cert_id[0] ? " by certificate for " : "", hs->cert_id,
              hs->outbound ? "outbound" : "inbound");
  if (hs->outbound) {
    struct raft_uv_connect *req = hs->req;
    hs->req = NULL;
    req->cb(req, stream, 0);
  } else {
    tr->accept_cb(tr->t, hs->peer_id, hs->peer_address, stream);
  }
  hs_release(hs);
}

static void hs_timeout_cb(uv_timer_t *timer) {
  struct handshake *hs = timer->data;
  hs_fail(hs,
          hs->phase == HS_CONNECTING || hs->phase == HS_RESOLVING ? NULL : "handshake timed out");
}

static struct handshake *hs_new(struct zgt *tr, bool outbound) {
  struct handshake *hs = calloc(1, sizeof *hs);
  if (hs == NULL) return NULL;
  hs->tr = tr;
  hs->outbound = outbound;
  if (uv_timer_init(tr->loop, &hs->timer) != 0) {
    free(hs);
    return NULL;
  }
  hs->timer.data = hs;
  hs->timer_open = true;
  hs->next = tr->handshakes;
  if (hs->next) hs->next->prev = hs;
  tr->handshakes = hs;
  if (!outbound) tr->n_inbound++;
  uv_timer_start(&hs->timer, hs_timeout_cb, HANDSHAKE_TIMEOUT_MS, 0);
  return hs;
}

static void note_peer_ip(struct handshake *hs) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  if (uv_tcp_getpeername(hs->tcp, (struct sockaddr *)&ss, &len) != 0) return;
  if (ss.ss_family == AF_INET)
    uv_ip4_name((struct sockaddr_in *)&ss, hs->peer_ip, sizeof hs->peer_ip);
  else if (ss.ss_family == AF_INET6)
    uv_ip6_name((struct sockaddr_in6 *)&ss, hs->peer_ip, sizeof hs->peer_ip);
}

/* ---- I/O ------------------------------------------------------------------ */

static void hs_write_cb(uv_write_t *w, int status) {
  struct handshake *hs = w->data;
  hs->writes_pending--;
  if (hs->finished) return;
  if (status != 0) {
    hs_fail(hs, NULL);
    return;
  }
  if (!hs->outbound && hs->phase == HS_WRITING_OK && hs->writes_pending == 0)
    hs_succeed(hs);
  else if (hs->outbound && hs->ok_received && hs->writes_pending == 0)
    hs_succeed(hs);
}

static int hs_write(struct handshake *hs, uv_write_t *w, const uint8_t *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  w->data = hs;
  int rv = uv_write(w, hs->io, &buf, 1, hs_write_cb);
  if (rv == 0) hs->writes_pending++;
  return rv;
}

static void hs_expect(struct handshake *hs, enum hs_phase phase, size_t len) {
  hs->phase = phase;
  hs->rneed = len;
  hs->rgot = 0;
}

static void hs_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct handshake *hs = h->data;
  /* Exactly the bytes still missing from the current message. */
  size_t want = hs->rneed > hs->rgot ? hs->rneed - hs->rgot : 0;
  *buf = uv_buf_init((char *)hs->rbuf + hs->rgot, (unsigned)want);
}

/* ---- incarnation ---------------------------------------------------------- */

/* Our address field: the raft address, then (unless the check is off) NUL,
 * "zgi1:" and the incarnation in hex, or "none" while we wait to adopt one.
 * Returns its length (at most ADDR_MAX: tr_init keeps the address short). */
static size_t put_address_field(const struct zgt *tr, uint8_t *w) {
  size_t n = strlen(tr->address);
  memcpy(w, tr->address, n);
  if (tr->inc_mode == ZG_INC_OFF) return n;
  w[n++] = '\0';
  memcpy(w + n, INC_EXT_PREFIX, INC_EXT_PREFIX_LEN);
  n += INC_EXT_PREFIX_LEN;
  if (tr->inc_mode == ZG_INC_ADOPT) {
    memcpy(w + n, INC_EXT_NONE, strlen(INC_EXT_NONE));
    return n + strlen(INC_EXT_NONE);
  }
  char hex[ZG_INCARNATION_HEX + 1];
  zg_incarnation_hex(&tr->inc, hex);
  memcpy(w + n, hex, ZG_INCARNATION_HEX);
  return n + ZG_INCARNATION_HEX;
}

/* Splits a peer's address field into the raft address (into out, NUL
 * terminated) and the incarnation extension (into hs). An address is text:
 * a NUL is allowed only as the start of a well-formed extension. NULL, or
 * why the field is refused. */
static const char *parse_address_field(struct handshake *hs, const uint8_t *p, size_t len,
                                       char out[ADDR_MAX + 1]) {
  const uint8_t *nul = memchr(p, '\0', len);
  size_t alen = nul ? (size_t)(nul - p) : len;
  hs->peer_inc_kind = PEER_INC_ABSENT;
  if (alen == 0) return "empty peer address";
  memcpy(out, p, alen);
  out[alen] = '\0';
  if (nul == NULL) return NULL;
  const char *ext = (const char *)nul + 1;
  size_t elen = len - alen - 1;
  if (elen > INC_EXT_PREFIX_LEN && memcmp(ext, INC_EXT_PREFIX, INC_EXT_PREFIX_LEN) == 0) {
    ext += INC_EXT_PREFIX_LEN;
    elen -= INC_EXT_PREFIX_LEN;
    if (elen == strlen(INC_EXT_NONE) && memcmp(ext, INC_EXT_NONE, elen) == 0) {
      hs->peer_inc_kind = PEER_INC_PENDING;
      return NULL;
    }
    if (zg_incarnation_parse(ext, elen, &hs->peer_inc) == 0) {
      hs->peer_inc_kind = PEER_INC_KNOWN;
      return NULL;
    }
  }
  return "peer address contains a NUL byte";
}

#define INC_LOG_INTERVAL_MS 10000
/* One ERROR line per peer and direction every INC_LOG_INTERVAL_MS: what
 * happened and what to do. The side with the older incarnation is the
 * stale one (recover --force stamps the time into the new one). */
static void log_incarnation_mismatch(struct handshake *hs) {
  static struct zg_log_throttle throttle = {.interval_ms = INC_LOG_INTERVAL_MS};
  char key[72];
  snprintf(key, sizeof key, "%c%.63s", hs->outbound ? 'o' : 'i', hs->peer_ip);
  unsigned suppressed = 0;
  if (!zg_log_throttle(&throttle, key, &suppressed)) return;
  const struct zgt *tr = hs->tr;
  char here[ZG_INCARNATION_HEX + 1], there[ZG_INCARNATION_HEX + 1], peer[360], msg[700];
  zg_incarnation_hex(&tr->inc, here);
  zg_incarnation_hex(&hs->peer_inc, there);
  snprintf(peer, sizeof peer, "%s (%s)", hs->peer_address[0] ? hs->peer_address : "?",
           hs->peer_ip[0] ? hs->peer_ip : "?");
  uint64_t t_here = zg_incarnation_time(&tr->inc), t_there = zg_incarnation_time(&hs->peer_inc);
  if (t_there > t_here)
    snprintf(msg, sizeof msg,
             "this node is from an older incarnation of the cluster than peer %s, which was "
             "recovered with zonegate recover --force: stop this node, empty its data dir and add "
             "it again with `zonegate members add` on the recovered cluster",
             peer);
  else if (t_there < t_here)
    snprintf(msg, sizeof msg,
             "peer %s is from another incarnation of this cluster (recovered with zonegate recover "
             "--force): empty its data dir and add it again with `zonegate members add`",
             peer);
  else
    snprintf(msg, sizeof msg,
             "peer %s is from another incarnation of this cluster (incarnation %s here, %s there): "
             "keep the nodes of the cluster you recovered with zonegate recover --force, empty the "
             "data dir of the others and add them again with `zonegate members add`",
             peer, here, there);
  cJSON *fields = cJSON_CreateObject();
  if (fields != NULL) {
    cJSON_AddStringToObject(fields, "peer_ip", hs->peer_ip[0] ? hs->peer_ip : "?");
    cJSON_AddStringToObject(fields, "peer_raft_address", hs->peer_address);
    cJSON_AddStringToObject(fields, "direction", hs->outbound ? "outbound" : "inbound");
    cJSON_AddStringToObject(fields, "incarnation", here);
    cJSON_AddStringToObject(fields, "peer_incarnation", there);
    cJSON_AddNumberToObject(fields, "suppressed_since_last", suppressed);
    cJSON_AddStringToObject(fields, "msg", msg);
  }
  zg_log_fields(ZG_ERROR, "peer_incarnation_mismatch", fields);
}

/* The peer runs a newer incarnation (a recover --force after this node's
 * data was written): this node must never again take part in a quorum,
 * or it and other stale nodes could elect an active node beside the
 * recovered cluster's (review finding: two stale nodes did). Every other
 * connection is cut, new ones are refused like in a quiet period that
 * never ends, and the owner is told once (it stops serving and marks the
 * data dir). `hs` (failing now) is left to its caller. */
/* Cuts every peer connection and handshake but hs's; the count cut. */
static unsigned cut_other_peers(struct zgt *tr, struct handshake *hs) {
  unsigned cut = 0;
  for (struct handshake *h = tr->handshakes, *next; h != NULL; h = next) {
    next = h->next;
    if (h != hs) hs_fail(h, NULL);
  }
  for (struct tunnel *tn = tr->tunnels; tn != NULL; tn = tn->next)
    if (!tn->closing && tn->hs != hs) { /* hs still tells the peer (see on_challenge) */
      tunnel_close(tn, NULL);
      cut++;
    }
  return cut;
}

static void supersede(struct zgt *tr, struct handshake *hs) {
  if (tr->superseded) return;
  tr->superseded = true;
  tr->quiet = true;
  if (tr->quiet_timer_open) uv_timer_stop(&tr->quiet_timer);
  unsigned cut = cut_other_peers(tr, hs);
  char newer[ZG_INCARNATION_HEX + 1];
  zg_incarnation_hex(&hs->peer_inc, newer);
  ZG_LOG_ERROR("raft_superseded",
               "raft peer %s runs incarnation %s, newer than this node's: every raft connection is "
               "refused from now on (%u cut)",
               hs->peer_address[0] ? hs->peer_address : hs->peer_ip, newer, cut);
  if (tr->superseded_cb != NULL)
    tr->superseded_cb(tr->superseded_ud, &hs->peer_inc, hs->peer_address);
}

/* Runs once the peer has proved the cluster secret. 0: go on; -1: another
 * incarnation (logged); -2: a joiner could not store the one it adopts. */
static int check_incarnation(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  if (tr->inc_mode == ZG_INC_OFF || hs->peer_inc_kind == PEER_INC_PENDING) return 0;
  if (hs->peer_inc_kind == PEER_INC_ABSENT) {
    /* A zonegate from before incarnations: let it in (rolling upgrades). */
    static struct zg_log_throttle throttle = {.interval_ms = 600000};
    if (tr->inc_mode == ZG_INC_KNOWN && zg_log_throttle(&throttle, hs->peer_ip, NULL))
      ZG_LOG_WARN("peer_without_incarnation",
                  "raft peer %s (%s) runs a zonegate without the cluster incarnation check: "
                  "upgrade it (a node of another incarnation is refused only by upgraded nodes)",
                  hs->peer_address, hs->peer_ip);
    return 0;
  }
  if (tr->inc_mode == ZG_INC_ADOPT) {
    if (tr->adopt != NULL && tr->adopt(tr->adopt_ud, &hs->peer_inc) != 0) return -2;
    tr->inc = hs->peer_inc;
    tr->inc_mode = ZG_INC_KNOWN;
    tr->adopted = true;
    char hex[ZG_INCARNATION_HEX + 1];
    zg_incarnation_hex(&tr->inc, hex);
    ZG_LOG_INFO("incarnation_adopted", "joined cluster incarnation %s (from raft peer %s, %s)", hex,
                hs->peer_address, hs->peer_ip);
    return 0;
  }
  if (memcmp(tr->inc.b, hs->peer_inc.b, ZG_INCARNATION_LEN) == 0) return 0;
  bool newer = zg_incarnation_time(&hs->peer_inc) > zg_incarnation_time(&tr->inc);
  /* A joiner that adopted a stale node's incarnation first (any peer may
   * answer first) takes the newer one while its log is still empty (the
   * adopt callback decides), and drops the connections of the old one
   * (review finding: it kept the old one and was then superseded). */
  if (newer && tr->adopted && tr->adopt != NULL && tr->adopt(tr->adopt_ud, &hs->peer_inc) == 0) {
    tr->inc = hs->peer_inc;
    unsigned cut = cut_other_peers(tr, hs);
    char hex[ZG_INCARNATION_HEX + 1];
    zg_incarnation_hex(&tr->inc, hex);
    ZG_LOG_WARN("incarnation_adopted",
                "joined the newer cluster incarnation %s instead (from raft peer %s, %s); %u "
                "connections of the older one cut",
                hex, hs->peer_address, hs->peer_ip, cut);
    return 0;
  }
  log_incarnation_mismatch(hs);
  if (newer) supersede(tr, hs);
  return -1;
}

#define ADOPT_FAILED "could not store the cluster incarnation this joining node adopts"

/* Server side: HELLO complete. */
static void on_hello(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  const uint8_t *p = hs->rbuf;
  if (memcmp(p, "ZGH1", 4) != 0) {
    hs_fail(hs, "not a zonegate raft handshake");
    return;
  }
  size_t addr_len = p[HELLO_FIXED - 1];
  if (hs->phase == HS_READ_HELLO && addr_len > 0) {
    /* Keep the fixed part, then read the address behind it. */
    hs->phase = HS_READ_HELLO_ADDR;
    hs->rneed = HELLO_FIXED + addr_len;
    return;
  }
  const char *bad = parse_address_field(hs, p + HELLO_FIXED, addr_len, hs->peer_address);
  if (bad != NULL) {
    hs->peer_address[0] = '\0';
    hs_fail(hs, bad);
    return;
  }
  memcpy(hs->nonce_c, p + 4, NONCE_LEN);
  hs->peer_id = get_be64(p + 4 + NONCE_LEN);
  if (hs->peer_id == 0) {
    hs_fail(hs, "peer sent raft id 0");
    return;
  }
  if (tr->tls && consensus_raft_id(hs->cert_id) != hs->peer_id) {
    char why[160];
    snprintf(why, sizeof why,
             "certificate is for node '%.63s' but the peer claims another member's raft id",
             hs->cert_id);
    hs_fail(hs, why);
    return;
  }
  if (zg_random_bytes(hs->nonce_s, NONCE_LEN) != 0) {
    hs_fail(hs, "no randomness");
    return;
  }
  uint8_t *w = hs->wbuf1;
  memcpy(w, "ZGH2", 4);
  memcpy(w + 4, hs->nonce_s, NONCE_LEN);
  put_be64(w + 4 + NONCE_LEN, tr->id);
  /* The MAC covers the raft address only, as before incarnations: a node
   * of the previous version verifies it over the text before the NUL. */
  compute_mac(tr, "zonegate-raft-server", hs->nonce_c, hs->nonce_s, tr->id, tr->address,
              w + 4 + NONCE_LEN + 8);
  size_t my_len = put_address_field(tr, w + CHALLENGE_FIXED);
  w[CHALLENGE_FIXED - 1] = (uint8_t)my_len;
  if (hs_write(hs, &hs->write1, w, CHALLENGE_FIXED + my_len) != 0) {
    hs_fail(hs, NULL);
    return;
  }
  hs_expect(hs, HS_READ_PROOF, PROOF_LEN);
}

/* Server side: PROOF complete. */
static void on_proof(struct handshake *hs) {
  uint8_t expected[MAC_LEN];
  if (memcmp(hs->rbuf, "ZGH3", 4) != 0) {
    hs_fail(hs, "malformed proof message");
    return;
  }
  compute_mac(hs->tr, "zonegate-raft-client", hs->nonce_c, hs->nonce_s, hs->peer_id,
              hs->peer_address, expected);
  if (CRYPTO_memcmp(expected, hs->rbuf + 4, MAC_LEN) != 0) {
    hs_fail(hs, "wrong cluster secret (client proof did not verify)");
    return;
  }
  int inc = check_incarnation(hs);
  if (inc != 0) {
    hs->inc_refused = inc == -1; /* logged: no peer_auth_failed line too */
    hs_fail(hs, ADOPT_FAILED);
    return;
  }
  uv_read_stop(hs->io);
  memcpy(hs->wbuf2, "ZGH4", 4);
  hs->phase = HS_WRITING_OK;
  hs->rneed = hs->rgot = 0;
  if (hs_write(hs, &hs->write2, hs->wbuf2, OK_LEN) != 0) hs_fail(hs, NULL);
}

/* Client side: CHALLENGE complete. */
static void on_challenge(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  const uint8_t *p = hs->rbuf;
  if (memcmp(p, "ZGH2", 4) != 0) {
    hs_fail(hs, "not a zonegate raft handshake");
    return;
  }
  size_t addr_len = p[CHALLENGE_FIXED - 1];
  if (hs->phase == HS_READ_CHALLENGE && addr_len > 0) {
    hs->phase = HS_READ_CHALLENGE_ADDR;
    hs->rneed = CHALLENGE_FIXED + addr_len;
    return;
  }
  char server_address[ADDR_MAX + 1];
  const char *bad = parse_address_field(hs, p + CHALLENGE_FIXED, addr_len, server_address);
  if (bad != NULL) {
    hs_fail(hs, bad);
    return;
  }
  memcpy(hs->nonce_s, p + 4, NONCE_LEN);
  raft_id server_id = get_be64(p + 4 + NONCE_LEN);
  uint8_t expected[MAC_LEN];
  compute_mac(tr, "zonegate-raft-server", hs->nonce_c, hs->nonce_s, server_id, server_address,
              expected);
  if (CRYPTO_memcmp(expected, p + 4 + NONCE_LEN + 8, MAC_LEN) != 0) {
    hs_fail(hs, "wrong cluster secret (server proof did not verify)");
    return;
  }
  if (server_id != hs->peer_id) {
    hs_fail(hs, "the node at this address has another raft id");
    return;
  }
  int inc = check_incarnation(hs);
  if (inc == -2) {
    hs_fail(hs, ADOPT_FAILED);
    return;
  }
  /* Refused (-1): still prove ourselves so the server logs it too, then
   * fail when it closes (or, should it answer OK, on the OK). */
  hs->inc_refused = inc == -1;
  uint8_t *w = hs->wbuf2;
  memcpy(w, "ZGH3", 4);
  compute_mac(tr, "zonegate-raft-client", hs->nonce_c, hs->nonce_s, tr->id, tr->address, w + 4);
  if (hs_write(hs, &hs->write2, w, PROOF_LEN) != 0) {
    hs_fail(hs, NULL);
    return;
  }
  hs_expect(hs, HS_READ_OK, OK_LEN);
}

static void on_ok(struct handshake *hs) {
  if (memcmp(hs->rbuf, "ZGH4", 4) != 0 || hs->inc_refused) {
    hs_fail(hs, "malformed handshake confirmation");
    return;
  }
  uv_read_stop(hs->io);
  hs->ok_received = true;
  hs->rneed = hs->rgot = 0;
  if (hs->writes_pending == 0) hs_succeed(hs);
}

static void hs_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct handshake *hs = s->data;
  if (hs->finished) return;
  if (nread < 0) {
    hs_fail(hs, hs->phase == HS_READ_OK || hs->phase == HS_READ_PROOF
                    ? "peer closed during the handshake (it may have rejected our proof)"
                    : NULL);
    return;
  }
  hs->rgot += (size_t)nread;
  if (hs->rgot < hs->rneed) return;
  switch (hs->phase) {
  case HS_READ_HELLO:
  case HS_READ_HELLO_ADDR:
    on_hello(hs);
    break;
  case HS_READ_PROOF:
    on_proof(hs);
    break;
  case HS_READ_CHALLENGE:
  case HS_READ_CHALLENGE_ADDR:
    on_challenge(hs);
    break;
  case HS_READ_OK:
    on_ok(hs);
    break;
  default:
    hs_fail(hs, "unexpected data during the handshake");
  }
}

/* ---- TLS tunnel ---------------------------------------------------------- */

static void tunnel_handle_closed(struct tunnel *t) {
  if (--t->handles_open > 0) return;
  struct zgt *tr = t->tr;
  if (t->prev)
    t->prev->next = t->next;
  else
    tr->tunnels = t->next;
  if (t->next) t->next->prev = t->prev;
  zg_tls_free(t->tls);
  free(t);
  maybe_finish_close(tr);
}

static void tunnel_tcp_closed(uv_handle_t *h) {
  struct tunnel *t = h->data;
  raft_free(h);
  tunnel_handle_closed(t);
}

static void tunnel_pipe_closed(uv_handle_t *h) {
  tunnel_handle_closed(h->data);
}

static void tunnel_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char slab[TUNNEL_READ_SIZE]; /* single-threaded loop: one read at a time */
  *buf = uv_buf_init(slab, sizeof slab);
}

static void tunnel_on_tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void tunnel_on_pipe_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void tunnel_write_cb(uv_write_t *req, int status) {
  struct tunnel_write *w = (struct tunnel_write *)req;
  struct tunnel *t = w->t;
  bool to_tcp = w->to_tcp;
  free(w);
  if (t->closing) return;
  if (status != 0) {
    if (to_tcp)
      tunnel_peer_ended(t); /* a reset or broken pipe towards the peer */
    else
      tunnel_close(t, NULL);
    return;
  }
  /* Resume the side that was paused because this one was full. */
  if (to_tcp && t->pipe_paused &&
      uv_stream_get_write_queue_size((uv_stream_t *)t->tcp) < TUNNEL_HIGH_WATER / 2) {
    t->pipe_paused = false;
    uv_read_start((uv_stream_t *)&t->pipe, tunnel_alloc, tunnel_on_pipe_read);
  } else if (!to_tcp && t->tcp_paused &&
             uv_stream_get_write_queue_size((uv_stream_t *)&t->pipe) < TUNNEL_HIGH_WATER / 2) {
    t->tcp_paused = false;
    uv_read_start((uv_stream_t *)t->tcp, tunnel_alloc, tunnel_on_tcp_read);
  }
}

static int tunnel_write(struct tunnel *t, bool to_tcp, const void *data, size_t len) {
  uv_stream_t *dst = to_tcp ? (uv_stream_t *)t->tcp : (uv_stream_t *)&t->pipe;
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  if (uv_stream_get_write_queue_size(dst) == 0) {
    int n = uv_try_write(dst, &b, 1);
    if (n == (int)len) return 0;
    if (n > 0) {
      data = (const char *)data + n;
      len -= (size_t)n;
    }
  }
  struct tunnel_write *w = malloc(sizeof *w + len);
  if (!w) return -1;
  w->t = t;
  w->to_tcp = to_tcp;
  memcpy(w->data, data, len);
  b = uv_buf_init(w->data, (unsigned)len);
  if (uv_write(&w->req, dst, &b, 1, tunnel_write_cb) != 0) {
    free(w);
    return -1;
  }
  if (uv_stream_get_write_queue_size(dst) >= TUNNEL_HIGH_WATER) {
    /* Stop the producer of this side until it drains. */
    if (to_tcp && !t->pipe_paused && t->pipe_open) {
      t->pipe_paused = true;
      uv_read_stop((uv_stream_t *)&t->pipe);
    } else if (!to_tcp && !t->tcp_paused) {
      t->tcp_paused = true;
      uv_read_stop((uv_stream_t *)t->tcp);
    }
  }
  return 0;
}

/* Sends whatever ciphertext the TLS session has produced. */
static int tunnel_flush(struct tunnel *t) {
  char buf[16384];
  while (zg_tls_pending(t->tls) > 0) {
    size_t n = zg_tls_take(t->tls, buf, sizeof buf);
    if (n == 0) break;
    if (tunnel_write(t, true, buf, n) != 0) return -1;
  }
  return 0;
}

static void tunnel_close(struct tunnel *t, const char *why) {
  if (t->closing) return;
  t->closing = true;
  struct handshake *hs = t->hs;
  t->hs = NULL;
  if (hs) {
    hs->tunnel = NULL;
    hs_fail(hs, why);
  }
  if (t->established && t->tls) {
    /* Best effort close_notify; the connection goes either way. */
    zg_tls_shutdown(t->tls);
    char buf[256];
    size_t n = zg_tls_take(t->tls, buf, sizeof buf);
    if (n > 0 && uv_stream_get_write_queue_size((uv_stream_t *)t->tcp) == 0) {
      uv_buf_t b = uv_buf_init(buf, (unsigned)n);
      uv_try_write((uv_stream_t *)t->tcp, &b, 1);
    }
  }
  uv_close((uv_handle_t *)t->tcp, tunnel_tcp_closed);
  if (t->pipe_open) uv_close((uv_handle_t *)&t->pipe, tunnel_pipe_closed);
}

/* The peer or the network ended a connection raft was using. */
static void tunnel_peer_ended(struct tunnel *t) {
  struct zgt *tr = t->tr;
  bool report = t->handed && !t->outbound && !t->closing && !tr->closing && tr->peer_lost != NULL;
  raft_id peer = t->peer_id;
  tunnel_close(t, NULL);
  if (report) tr->peer_lost(tr->peer_lost_ud, peer);
}

static void tunnel_on_tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct tunnel *t = s->data;
  if (t->closing || nread == 0) return;
  if (nread < 0) {
    if (t->handed) {
      tunnel_peer_ended(t);
      return;
    }
    /* Before TLS is up that is a node in its quiet period or overloaded;
     * after, while the handshake runs, usually a refused certificate. */
    tunnel_close(t, t->established && t->tls ? "peer closed during the handshake (it may have "
                                               "refused our certificate or proof)"
                                             : NULL);
    return;
  }
  if (t->tls == NULL) { /* plaintext: pass the bytes on as they are */
    if (tunnel_write(t, false, buf->base, (size_t)nread) != 0) tunnel_close(t, NULL);
    return;
  }
  if (zg_tls_feed(t->tls, buf->base, (size_t)nread) != 0) {
    tunnel_close(t, "out of memory");
    return;
  }
  if (!t->established) {
    int h = zg_tls_handshake(t->tls);
    if (tunnel_flush(t) != 0 || h == ZG_TLS_ERROR) {
      char why[300];
      snprintf(why, sizeof why, "TLS handshake failed: %s", zg_tls_error(t->tls));
      tunnel_close(t, h == ZG_TLS_ERROR ? why : NULL);
      return;
    }
    if (h != 1) return;
    t->established = true;
    if (t->hs) hs_tls_ready(t->hs); /* may close t */
    if (t->closing) return;
  }
  static char plain[TUNNEL_READ_SIZE];
  for (;;) {
    int n = zg_tls_read(t->tls, plain, sizeof plain);
    if (n > 0) {
      if (tunnel_write(t, false, plain, (size_t)n) != 0) {
        tunnel_close(t, NULL);
        return;
      }
      continue;
    }
    if (n == ZG_TLS_WANT) break;
    if (t->handed) {
      tunnel_peer_ended(t);
      return;
    }
    char why[300];
    snprintf(why, sizeof why, "TLS session ended: %s",
             n == ZG_TLS_CLOSED ? "close_notify" : zg_tls_error(t->tls));
    tunnel_close(t, t->hs ? why : NULL);
    return;
  }
  if (tunnel_flush(t) != 0) tunnel_close(t, NULL);
}

static void tunnel_on_pipe_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct tunnel *t = s->data;
  if (t->closing || nread == 0) return;
  if (nread < 0) { /* raft (or the handshake) closed its end */
    tunnel_close(t, NULL);
    return;
  }
  if (t->tls == NULL) {
    if (tunnel_write(t, true, buf->base, (size_t)nread) != 0) tunnel_close(t, NULL);
    return;
  }
  if (zg_tls_write(t->tls, buf->base, (size_t)nread) != 0 || tunnel_flush(t) != 0)
    tunnel_close(t, NULL);
}

/* Takes over the handshake's TCP connection and starts TLS on it. */
static int tunnel_start(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  struct tunnel *t = calloc(1, sizeof *t);
  if (!t) return -1;
  if (tr->tls) {
    t->tls = zg_tls_new(tr->tls, !hs->outbound);
    if (!t->tls) {
      free(t);
      return -1;
    }
  }
  t->tr = tr;
  t->outbound = hs->outbound;
  t->tcp = hs->tcp;
  t->tcp->data = t;
  t->handles_open = 1;
  t->hs = hs;
  snprintf(t->peer_ip, sizeof t->peer_ip, "%s", hs->peer_ip);
  hs->tcp = NULL;
  hs->tcp_open = false;
  hs->tunnel = t;
  t->next = tr->tunnels;
  if (t->next) t->next->prev = t;
  tr->tunnels = t;
  uv_tcp_nodelay(t->tcp, 1);
  if (t->tls && hs->outbound) {
    zg_tls_handshake(t->tls); /* ClientHello */
    if (tunnel_flush(t) != 0) return -1;
  }
  if (uv_read_start((uv_stream_t *)t->tcp, tunnel_alloc, tunnel_on_tcp_read) != 0) return -1;
  if (t->tls == NULL) {
    t->established = true;
    tunnel_open_inner(hs); /* fails the handshake itself */
  }
  return 0;
}

/* TLS is up: check who the certificate names, then open the socketpair
 * and run the HMAC handshake on raft's end of it. */
static void send_hello(struct handshake *hs);
static void hs_tls_ready(struct handshake *hs) {
  struct tunnel *t = hs->tunnel;
  if (zg_tls_peer_node_id(zg_tls_ssl(t->tls), hs->cert_id, sizeof hs->cert_id) != 0) {
    hs_fail(hs, "peer certificate names no node id");
    return;
  }
  if (hs->outbound && consensus_raft_id(hs->cert_id) != hs->peer_id) {
    char why[320];
    snprintf(why, sizeof why,
             "certificate is for node '%.63s', not the member dialled at %.80s (wrong node or "
             "address)",
             hs->cert_id, hs->peer_address);
    hs_fail(hs, why);
    return;
  }
  tunnel_open_inner(hs);
}

/* Opens the socketpair whose one end raft will get, and runs the HMAC
 * handshake on it. On failure the handshake fails (and closes the tunnel). */
static void tunnel_open_inner(struct handshake *hs) {
  struct tunnel *t = hs->tunnel;
  uv_os_sock_t fds[2];
  if (uv_socketpair(SOCK_STREAM, 0, fds, UV_NONBLOCK_PIPE, UV_NONBLOCK_PIPE) != 0) {
    hs_fail(hs, NULL);
    return;
  }
  hs->inner = raft_malloc(sizeof *hs->inner);
  if (!hs->inner || uv_pipe_init(hs->tr->loop, hs->inner, 0) != 0) {
    raft_free(hs->inner);
    hs->inner = NULL;
    close(fds[0]);
    close(fds[1]);
    hs_fail(hs, NULL);
    return;
  }
  hs->inner->data = hs;
  hs->inner_open = true;
  uv_pipe_init(hs->tr->loop, &t->pipe, 0);
  t->pipe.data = t;
  t->pipe_open = true;
  t->handles_open++;
  if (uv_pipe_open(&t->pipe, fds[0]) != 0) {
    close(fds[0]);
    close(fds[1]);
    hs_fail(hs, NULL);
    return;
  }
  if (uv_pipe_open(hs->inner, fds[1]) != 0) {
    close(fds[1]);
    hs_fail(hs, NULL);
    return;
  }
  hs->io = (uv_stream_t *)hs->inner;
  if (uv_read_start((uv_stream_t *)&t->pipe, tunnel_alloc, tunnel_on_pipe_read) != 0) {
    hs_fail(hs, NULL);
    return;
  }
  if (hs->outbound) {
    send_hello(hs);
  } else {
    hs_expect(hs, HS_READ_HELLO, HELLO_FIXED);
    if (uv_read_start(hs->io, hs_alloc_cb, hs_read_cb) != 0) hs_fail(hs, NULL);
  }
}

/* ---- inbound ------------------------------------------------------------- */

static void reject_close_cb(uv_handle_t *h) {
  raft_free(h);
}

static void on_connection(uv_stream_t *server, int status) {
  struct zgt *tr = server->data;
  if (status != 0 || tr->closing) return;
  uv_tcp_t *tcp = raft_malloc(sizeof *tcp);
  if (tcp == NULL) return;
  if (uv_tcp_init(tr->loop, tcp) != 0) {
    raft_free(tcp);
    return;
  }
  if (uv_accept(server, (uv_stream_t *)tcp) != 0 || tr->quiet ||
      tr->n_inbound >= MAX_INBOUND_HANDSHAKES) {
    uv_close((uv_handle_t *)tcp, reject_close_cb);
    return;
  }
  struct handshake *hs = hs_new(tr, false);
  if (hs == NULL) {
    uv_close((uv_handle_t *)tcp, reject_close_cb);
    return;
  }
  hs->tcp = tcp;
  hs->tcp_open = true;
  tcp->data = hs;
  note_peer_ip(hs);
  if (tunnel_start(hs) != 0) hs_fail(hs, NULL);
}

/* ---- outbound ------------------------------------------------------------ */

static void on_connect(uv_connect_t *creq, int status) {
  struct handshake *hs = creq->data;
  if (hs->finished) return;
  if (status != 0) {
    hs_fail(hs, NULL);
    return;
  }
  note_peer_ip(hs);
  if (tunnel_start(hs) != 0) hs_fail(hs, NULL);
}

static void send_hello(struct handshake *hs) {
  struct zgt *tr = hs->tr;
  uint8_t *w = hs->wbuf1;
  if (zg_random_bytes(hs->nonce_c, NONCE_LEN) != 0) {
    hs_fail(hs, "no randomness");
    return;
  }
  memcpy(w, "ZGH1", 4);
  memcpy(w + 4, hs->nonce_c, NONCE_LEN);
  put_be64(w + 4 + NONCE_LEN, tr->id);
  size_t my_len = put_address_field(tr, w + HELLO_FIXED);
  w[HELLO_FIXED - 1] = (uint8_t)my_len;
  if (hs_write(hs, &hs->write1, w, HELLO_FIXED + my_len) != 0) {
    hs_fail(hs, NULL);
    return;
  }
  hs_expect(hs, HS_READ_CHALLENGE, CHALLENGE_FIXED);
  if (uv_read_start(hs->io, hs_alloc_cb, hs_read_cb) != 0) hs_fail(hs, NULL);
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  struct handshake *hs = gai->data;
  hs->gai_pending = false;
  if (hs->finished || status != 0 || res == NULL) {
    if (res) uv_freeaddrinfo(res);
    if (!hs->finished)
      hs_fail(hs, NULL);
    else
      hs_release(hs);
    return;
  }
  struct zgt *tr = hs->tr;
  hs->tcp = raft_malloc(sizeof *hs->tcp);
  if (hs->tcp == NULL || uv_tcp_init(tr->loop, hs->tcp) != 0) {
    raft_free(hs->tcp);
    hs->tcp = NULL;
    uv_freeaddrinfo(res);
    hs_fail(hs, NULL);
    return;
  }
  hs->tcp->data = hs;
  hs->tcp_open = true;
  hs->phase = HS_CONNECTING;
  hs->connect_req.data = hs;
  int rv = uv_tcp_connect(&hs->connect_req, hs->tcp, res->ai_addr, on_connect);
  uv_freeaddrinfo(res);
  if (rv != 0) hs_fail(hs, NULL);
}

static void fail_soon_cb(uv_timer_t *timer) {
  hs_fail(timer->data, NULL);
}

static int tr_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                      const char *address, raft_uv_connect_cb cb) {
  struct zgt *tr = t->impl;
  if (tr->closing) return RAFT_CANCELED;
  char host[ADDR_MAX + 1], port_text[16];
  int port;
  if (strlen(address) > ADDR_MAX || zg_split_host_port(address, host, sizeof host, &port) != 0) {
    snprintf(t->errmsg, sizeof t->errmsg, "bad raft address '%.200s' (want host:port)", address);
    return RAFT_INVALID;
  }
  struct handshake *hs = hs_new(tr, true);
  if (hs == NULL) return RAFT_NOMEM;
  req->cb = cb;
  hs->req = req;
  hs->peer_id = id;
  snprintf(hs->peer_address, sizeof hs->peer_address, "%s", address);
  snprintf(hs->peer_ip, sizeof hs->peer_ip, "%.63s", host);
  if (tr->quiet) {
    /* Not yet: fail asynchronously so raft retries later. */
    uv_timer_start(&hs->timer, fail_soon_cb, 0, 0);
    return 0;
  }
  snprintf(port_text, sizeof port_text, "%d", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  hs->gai.data = hs;
  hs->phase = HS_RESOLVING;
  if (uv_getaddrinfo(tr->loop, &hs->gai, on_resolved, host, port_text, &hints) != 0) {
    uv_timer_start(&hs->timer, fail_soon_cb, 0, 0);
    return 0;
  }
  hs->gai_pending = true;
  return 0;
}

/* ---- lifecycle ----------------------------------------------------------- */

static int tr_init(struct raft_uv_transport *t, raft_id id, const char *address) {
  struct zgt *tr = t->impl;
  if (strlen(address) > ADDR_TEXT_MAX) {
    snprintf(t->errmsg, sizeof t->errmsg, "raft address too long (at most %d bytes)",
             ADDR_TEXT_MAX);
    return RAFT_NAMETOOLONG;
  }
  tr->id = id;
  snprintf(tr->address, sizeof tr->address, "%s", address);
  if (tr->bind_address[0] == '\0')
    snprintf(tr->bind_address, sizeof tr->bind_address, "%s", address);
  return 0;
}

static void quiet_over_cb(uv_timer_t *timer) {
  struct zgt *tr = timer->data;
  if (tr->superseded) return;
  tr->quiet = false;
  ZG_LOG_INFO("raft_quiet_period_over", "raft peer traffic allowed again");
}

static int tr_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb) {
  struct zgt *tr = t->impl;
  char host[ADDR_MAX + 1];
  int port, rv;
  struct sockaddr_storage ss;
  if (zg_split_host_port(tr->bind_address, host, sizeof host, &port) != 0) {
    snprintf(t->errmsg, sizeof t->errmsg, "bad raft listen address '%.200s'", tr->bind_address);
    return RAFT_INVALID;
  }
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
    snprintf(t->errmsg, sizeof t->errmsg, "raft listen address '%.200s' is not an IP address",
             tr->bind_address);
    return RAFT_INVALID;
  }
  tr->accept_cb = cb;
  if ((rv = uv_tcp_init(tr->loop, &tr->listener)) != 0) {
    snprintf(t->errmsg, sizeof t->errmsg, "uv_tcp_init(): %s", uv_strerror(rv));
    return RAFT_IOERR;
  }
  tr->listener.data = tr;
  tr->listener_open = true;
  if ((rv = uv_tcp_bind(&tr->listener, (struct sockaddr *)&ss, 0)) != 0 ||
      (rv = uv_listen((uv_stream_t *)&tr->listener, 64, on_connection)) != 0) {
    snprintf(t->errmsg, sizeof t->errmsg, "listen on %.200s: %s", tr->bind_address,
             uv_strerror(rv));
    return RAFT_IOERR; /* the handle is closed by tr_close */
  }
  uv_timer_init(tr->loop, &tr->quiet_timer);
  tr->quiet_timer.data = tr;
  tr->quiet_timer_open = true;
  if (tr->quiet_ms > 0) {
    tr->quiet = true;
    uv_timer_start(&tr->quiet_timer, quiet_over_cb, tr->quiet_ms, 0);
    ZG_LOG_INFO("raft_quiet_period", "restarted node stays off the raft network for %u ms",
                tr->quiet_ms);
  }
  return 0;
}

static void maybe_finish_close(struct zgt *tr) {
  if (!tr->closing || tr->listener_open || tr->quiet_timer_open || tr->handshakes != NULL ||
      tr->tunnels != NULL || tr->close_cb == NULL)
    return;
  raft_uv_transport_close_cb cb = tr->close_cb;
  tr->close_cb = NULL;
  cb(tr->t);
}

static void listener_close_cb(uv_handle_t *h) {
  struct zgt *tr = h->data;
  tr->listener_open = false;
  maybe_finish_close(tr);
}

static void quiet_timer_close_cb(uv_handle_t *h) {
  struct zgt *tr = h->data;
  tr->quiet_timer_open = false;
  maybe_finish_close(tr);
}

static void tr_close(struct raft_uv_transport *t, raft_uv_transport_close_cb cb) {
  struct zgt *tr = t->impl;
  tr->closing = true;
  tr->close_cb = cb;
  bool pending = false;
  if (tr->listener_open) {
    uv_close((uv_handle_t *)&tr->listener, listener_close_cb);
    pending = true;
  }
  if (tr->quiet_timer_open) {
    uv_close((uv_handle_t *)&tr->quiet_timer, quiet_timer_close_cb);
    pending = true;
  }
  for (struct handshake *hs = tr->handshakes, *next; hs != NULL; hs = next) {
    next = hs->next;
    pending = true;
    hs_fail(hs, NULL); /* may free hs */
  }
  for (struct tunnel *tn = tr->tunnels; tn != NULL; tn = tn->next) {
    pending = true;
    tunnel_close(tn, NULL); /* freed from close callbacks, never here */
  }
  if (!pending && tr->handshakes == NULL) {
    /* Nothing to wait for: still call back from the loop, never inline. */
    uv_timer_init(tr->loop, &tr->quiet_timer);
    tr->quiet_timer.data = tr;
    tr->quiet_timer_open = true;
    uv_close((uv_handle_t *)&tr->quiet_timer, quiet_timer_close_cb);
  }
}

int zg_transport_init(struct raft_uv_transport *t, uv_loop_t *loop, const char *secret,
                      const char *bind_address, unsigned quiet_ms, char *err, size_t errlen) {
  memset(t, 0, sizeof *t);
  struct zgt *tr = calloc(1, sizeof *tr);
  if (tr == NULL || (tr->secret = strdup(secret)) == NULL) {
    free(tr);
    snprintf(err, errlen, "zg_transport_init(): out of memory");
    return -1;
  }
  if (bind_address && strlen(bind_address) > ADDR_MAX) {
    zg_secret_free(tr->secret);
    free(tr);
    snprintf(err, errlen, "zg_transport_init(): bind address too long");
    return -1;
  }
  tr->t = t;
  tr->loop = loop;
  tr->quiet_ms = quiet_ms;
  if (bind_address) snprintf(tr->bind_address, sizeof tr->bind_address, "%s", bind_address);
  t->version = 1;
  t->impl = tr;
  t->init = tr_init;
  t->listen = tr_listen;
  t->connect = tr_connect;
  t->close = tr_close;
  return 0;
}

void zg_transport_set_quiet(struct raft_uv_transport *t, unsigned quiet_ms) {
  struct zgt *tr = t->impl;
  tr->quiet_ms = quiet_ms;
}

void zg_transport_on_superseded(struct raft_uv_transport *t, zg_superseded_cb cb, void *ud) {
  struct zgt *tr = t->impl;
  tr->superseded_cb = cb;
  tr->superseded_ud = ud;
}

void zg_transport_isolate(struct raft_uv_transport *t, unsigned duration_ms) {
  struct zgt *tr = t->impl;
  if (tr == NULL || tr->closing || !tr->quiet_timer_open || tr->superseded) return;
  tr->quiet = true;
  uv_timer_start(&tr->quiet_timer, quiet_over_cb, duration_ms, 0);
  unsigned cut = 0;
  for (struct handshake *hs = tr->handshakes, *next; hs != NULL; hs = next) {
    next = hs->next;
    hs_fail(hs, NULL);
  }
  for (struct tunnel *tn = tr->tunnels; tn != NULL; tn = tn->next)
    if (!tn->closing) {
      tunnel_close(tn, NULL); /* raft sees its end of the socketpair close */
      cut++;
    }
  ZG_LOG_WARN("raft_isolated", "raft peer traffic dropped for %u ms (%u connections cut)",
              duration_ms, cut);
}

void zg_transport_on_peer_lost(struct raft_uv_transport *t, zg_peer_lost_cb cb, void *ud) {
  struct zgt *tr = t->impl;
  tr->peer_lost = cb;
  tr->peer_lost_ud = ud;
}

void zg_transport_set_tls(struct raft_uv_transport *t, SSL_CTX *ctx) {
  struct zgt *tr = t->impl;
  if (tr->tls) SSL_CTX_free(tr->tls);
  tr->tls = ctx;
  if (ctx) SSL_CTX_up_ref(ctx);
}

void zg_transport_set_incarnation(struct raft_uv_transport *t, enum zg_incarnation_mode mode,
                                  const struct zg_incarnation *inc, zg_incarnation_adopt_cb adopt,
                                  void *ud) {
  struct zgt *tr = t->impl;
  tr->inc_mode = mode;
  if (inc != NULL) tr->inc = *inc;
  tr->adopt = adopt;
  tr->adopt_ud = ud;
}

void zg_transport_free(struct raft_uv_transport *t) {
  struct zgt *tr = t->impl;
  if (tr == NULL) return;
  if (tr->tls) SSL_CTX_free(tr->tls);
  zg_secret_free(tr->secret);
  free(tr);
  t->impl = NULL;
}
