/* fuzz_peer_handshake: the inbound side of the raft peer transport's HMAC
 * challenge-response handshake (consensus/transport.c), driven through
 * the real transport (zg_transport_init, listen) on a loopback socket: the
 * message parsing is woven into its libuv read callbacks, and the TLS work
 * about to change that file is why this harness leaves it untouched.
 *
 * Input: [1] mode, then
 *  - mode even ("raw"): bytes sent as they are, then the write side is
 *    shut down. The server must never hand the stream to raft, and must
 *    answer nothing or exactly one well-formed CHALLENGE whose MAC
 *    verifies under the cluster secret for the HELLO it got.
 *  - mode odd ("peer"): [32] nonce_c [8] raft id [1] address length
 *    [address] [1] proof flag, then the bytes raft would send next. Bits
 *    1-2 of the mode append an incarnation extension to the address field
 *    (0: none, the fuzzed bytes alone; 1: NUL "zgi1:" and the server's
 *    incarnation; 2: another (older) incarnation; 3: "zgi1:none", a joiner). The
 *    harness sends that HELLO, checks the CHALLENGE it gets (MAC, server
 *    id, address and incarnation), answers a PROOF that is right (flag
 *    even) or has one bit flipped (odd) together with the raft bytes, and
 *    expects: accepted (OK, accept callback with that id and address)
 *    exactly when the HELLO was valid (id != 0, the address before any NUL
 *    non-empty, nothing after a NUL but a well-formed extension, the same
 *    incarnation or none) and the proof right; then the stream raft gets
 *    delivers exactly the raft bytes (the handshake swallowed none of
 *    them).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "base/base.h"
#include "consensus/internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

#define SECRET "fuzz-cluster-secret-0123456789"
#define SERVER_ID 1
#define NONCE_LEN 32
#define MAC_LEN 32
#define CHALLENGE_FIXED (4 + NONCE_LEN + 8 + MAC_LEN + 1)
#define SERVER_INC "0000018f2a3b4c5d0123456789abcdef"
/* An OLDER incarnation: it is refused and changes nothing. A newer one
 * would supersede this server for good (transport.c supersede(): every
 * later handshake refused), which the integration tests cover; the
 * harness keeps one server for every input, so it must stay stateless. */
#define OTHER_INC "0000018f2a3b4c5c0123456789abcdef"
#define EXT_PREFIX "zgi1:"
/* What the server appends to its address: NUL "zgi1:" and SERVER_INC. */
#define SERVER_EXT_LEN (1 + 5 + 32)

static uv_loop_t loop;
static struct raft_uv_transport transport;
static char server_address[64];
static int port;

/* What the accept callback saw, and the stream it got. */
static struct {
  bool called;
  raft_id id;
  char address[256];
  uv_tcp_t *stream;
  zg_buf got;
  bool closed;
} accepted;

static void on_accepted_closed(uv_handle_t *h) {
  raft_free(h);
  accepted.closed = true;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  static char slab[65536];
  *buf = uv_buf_init(slab, sizeof slab);
}

static void on_accepted_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  if (n > 0) zg_buf_append(&accepted.got, buf->base, (size_t)n);
  if (n < 0 && !uv_is_closing((uv_handle_t *)s)) uv_close((uv_handle_t *)s, on_accepted_closed);
}

static void on_accept(struct raft_uv_transport *t, raft_id id, const char *address,
                      uv_stream_t *stream) {
  CHECK(!accepted.called);
  accepted.called = true;
  accepted.id = id;
  snprintf(accepted.address, sizeof accepted.address, "%s", address);
  accepted.stream = (uv_tcp_t *)stream;
  stream->data = NULL;
  uv_read_start(stream, on_alloc, on_accepted_read);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  zg_log_set_level(ZG_ERROR + 1);
  uv_loop_init(&loop);
  char err[256];
  for (int attempt = 0; attempt < 200; attempt++) {
    port = 20000 + (int)((getpid() * 11 + attempt * 137) % 40000);
    snprintf(server_address, sizeof server_address, "127.0.0.1:%d", port);
    memset(&transport, 0, sizeof transport);
    CHECK(zg_transport_init(&transport, &loop, SECRET, server_address, 0, err, sizeof err) == 0);
    CHECK(transport.init(&transport, SERVER_ID, server_address) == 0);
    struct zg_incarnation inc;
    CHECK(zg_incarnation_parse(SERVER_INC, strlen(SERVER_INC), &inc) == 0);
    zg_transport_set_incarnation(&transport, ZG_INC_KNOWN, &inc, NULL, NULL);
    if (transport.listen(&transport, on_accept) == 0) return 0;
    transport.close(&transport, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    zg_transport_free(&transport);
  }
  CHECK(!"no free port");
  return 0;
}

static void mac(const char *label, const uint8_t *nonce_c, const uint8_t *nonce_s, uint64_t id,
                const char *address, uint8_t out[MAC_LEN]) {
  uint8_t buf[512];
  size_t n = 0, ll = strlen(label), al = strlen(address);
  memcpy(buf, label, ll), n += ll;
  memcpy(buf + n, nonce_c, NONCE_LEN), n += NONCE_LEN;
  memcpy(buf + n, nonce_s, NONCE_LEN), n += NONCE_LEN;
  for (int i = 0; i < 8; i++) buf[n++] = (uint8_t)(id >> (56 - 8 * i));
  memcpy(buf + n, address, al), n += al;
  unsigned int len = MAC_LEN;
  HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), buf, n, out, &len);
}

/* ---- the peer --------------------------------------------------------- */

struct peer {
  uv_tcp_t tcp;
  uv_connect_t connect;
  uv_write_t w1, w2;
  uv_shutdown_t shutdown;
  zg_buf first, second; /* what to send at connect / after the challenge */
  bool interactive, sent_second, closed;
  zg_buf got;
  /* the HELLO as sent, to check the challenge */
  uint8_t nonce_c[NONCE_LEN];
  uint64_t id;
  char address[256];
  bool proof_right;
};

/* The server's address field: its address, NUL, "zgi1:", SERVER_INC. */
static bool is_server_field(const uint8_t *f, size_t len) {
  size_t al = strlen(server_address);
  return len == al + SERVER_EXT_LEN && memcmp(f, server_address, al) == 0 && f[al] == '\0' &&
         memcmp(f + al + 1, EXT_PREFIX SERVER_INC, SERVER_EXT_LEN - 1) == 0;
}

/* The model of an address field the server must accept: text before any
 * NUL non-empty; after a NUL only "zgi1:none" or "zgi1:" + the server's
 * own incarnation (another well-formed one is refused too, as another
 * incarnation of the cluster). */
static bool field_acceptable(const uint8_t *f, size_t len) {
  const uint8_t *nul = memchr(f, '\0', len);
  size_t text = nul ? (size_t)(nul - f) : len;
  if (text == 0) return false;
  if (!nul) return true;
  size_t rest = len - text - 1;
  const char *e = (const char *)nul + 1;
  return (rest == 9 && memcmp(e, "zgi1:none", 9) == 0) ||
         (rest == 5 + 32 && memcmp(e, EXT_PREFIX SERVER_INC, 5 + 32) == 0);
}

static void on_peer_closed(uv_handle_t *h) {
  ((struct peer *)h->data)->closed = true;
}

static void on_shutdown(uv_shutdown_t *r, int status) {}

static void send_bytes(struct peer *p, uv_write_t *w, zg_buf *b, bool then_shutdown) {
  uv_buf_t buf = uv_buf_init(b->data ? b->data : (char *)"", (unsigned)b->len);
  if (b->len) uv_write(w, (uv_stream_t *)&p->tcp, &buf, 1, NULL);
  if (then_shutdown) uv_shutdown(&p->shutdown, (uv_stream_t *)&p->tcp, on_shutdown);
}

/* Peer mode: once the whole CHALLENGE is in, check it and send PROOF. */
static void maybe_answer_challenge(struct peer *p) {
  if (!p->interactive || p->sent_second || p->got.len < CHALLENGE_FIXED) return;
  const uint8_t *c = (const uint8_t *)p->got.data;
  size_t alen = c[CHALLENGE_FIXED - 1];
  if (p->got.len < CHALLENGE_FIXED + alen) return;
  CHECK(memcmp(c, "ZGH2", 4) == 0);
  uint64_t sid = 0;
  for (int i = 0; i < 8; i++) sid = sid << 8 | c[4 + NONCE_LEN + i];
  CHECK(sid == SERVER_ID);
  CHECK(is_server_field(c + CHALLENGE_FIXED, alen));
  uint8_t want[MAC_LEN];
  mac("zonegate-raft-server", p->nonce_c, c + 4, SERVER_ID, server_address, want);
  CHECK(memcmp(want, c + 4 + NONCE_LEN + 8, MAC_LEN) == 0);
  uint8_t proof[4 + MAC_LEN];
  memcpy(proof, "ZGH3", 4);
  mac("zonegate-raft-client", p->nonce_c, c + 4, p->id, p->address, proof + 4);
  if (!p->proof_right) proof[4 + (p->id % MAC_LEN)] ^= 1;
  zg_buf msg;
  zg_buf_init(&msg);
  zg_buf_append(&msg, proof, sizeof proof);
  zg_buf_append(&msg, p->second.data ? p->second.data : "", p->second.len);
  zg_buf_free(&p->second);
  p->second = msg;
  p->sent_second = true;
  send_bytes(p, &p->w2, &p->second, false);
}

static void on_peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  struct peer *p = s->data;
  if (n > 0) {
    zg_buf_append(&p->got, buf->base, (size_t)n);
    maybe_answer_challenge(p);
    /* Accepted: everything is checked; close our side. */
    if (p->sent_second && p->got.len >= 4 && memcmp(p->got.data + p->got.len - 4, "ZGH4", 4) == 0 &&
        accepted.called && !uv_is_closing((uv_handle_t *)s))
      uv_close((uv_handle_t *)s, on_peer_closed);
  }
  if (n < 0 && !uv_is_closing((uv_handle_t *)s)) uv_close((uv_handle_t *)s, on_peer_closed);
}

static void on_peer_connect(uv_connect_t *r, int status) {
  struct peer *p = r->data;
  CHECK(status == 0);
  uv_read_start((uv_stream_t *)&p->tcp, on_alloc, on_peer_read);
  send_bytes(p, &p->w1, &p->first, !p->interactive);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1 || size > 4096) return 0;
  static struct peer p;
  memset(&p, 0, sizeof p);
  memset(&accepted, 0, sizeof accepted);
  p.interactive = data[0] & 1;
  const uint8_t *in = data + 1;
  size_t n = size - 1;
  bool hello_valid = false, field_ok = false;
  if (!p.interactive) {
    zg_buf_append(&p.first, in, n);
  } else {
    if (n < NONCE_LEN + 8 + 1) return 0;
    size_t alen = in[NONCE_LEN + 8];
    if (n < NONCE_LEN + 8 + 1 + alen + 1) return 0;
    memcpy(p.nonce_c, in, NONCE_LEN);
    for (int i = 0; i < 8; i++) p.id = p.id << 8 | in[NONCE_LEN + i];
    const uint8_t *addr = in + NONCE_LEN + 9;
    /* The raft address is the text before any NUL (the MACs cover it). */
    snprintf(p.address, sizeof p.address, "%.*s", (int)alen, (const char *)addr);
    p.proof_right = (addr[alen] & 1) == 0;
    static const char *const exts[] = {"", "zgi1:" SERVER_INC, "zgi1:" OTHER_INC, "zgi1:none"};
    const char *ext = exts[(data[0] >> 1) & 3];
    size_t ext_len = ext[0] ? 1 + strlen(ext) : 0;
    if (alen + ext_len > 255) return 0;
    uint8_t field[255];
    memcpy(field, addr, alen);
    if (ext_len) {
      field[alen] = '\0';
      memcpy(field + alen + 1, ext, ext_len - 1);
    }
    uint8_t field_len = (uint8_t)(alen + ext_len);
    zg_buf_append(&p.first, "ZGH1", 4);
    zg_buf_append(&p.first, in, NONCE_LEN + 8);
    zg_buf_append(&p.first, &field_len, 1);
    zg_buf_append(&p.first, field, field_len);
    size_t used = NONCE_LEN + 9 + alen + 1;
    zg_buf_append(&p.second, in + used, n - used);
    hello_valid = p.id != 0;
    field_ok = field_acceptable(field, field_len);
  }

  uv_tcp_init(&loop, &p.tcp);
  p.tcp.data = &p;
  p.connect.data = &p;
  struct sockaddr_in sa;
  uv_ip4_addr("127.0.0.1", port, &sa);
  CHECK(uv_tcp_connect(&p.connect, &p.tcp, (const struct sockaddr *)&sa, on_peer_connect) == 0);
  size_t raft_bytes = p.second.len;
  uint64_t start = uv_hrtime();
  for (;;) {
    bool stream_done = !accepted.called || accepted.closed ||
                       accepted.got.len >= raft_bytes; /* all raft bytes arrived */
    if (p.closed && stream_done) break;
    uv_run(&loop, UV_RUN_ONCE);
    CHECK(uv_hrtime() - start < 5000000000ull); /* the handshake timeout is 2 s */
  }
  if (accepted.called && !accepted.closed) {
    uv_close((uv_handle_t *)accepted.stream, on_accepted_closed);
    while (!accepted.closed) uv_run(&loop, UV_RUN_ONCE);
  }

  if (!p.interactive) {
    CHECK(!accepted.called);
    /* Nothing, or one CHALLENGE answering the HELLO at the input's start. */
    if (p.got.len) {
      CHECK(n >= 4 + NONCE_LEN + 8 + 1 && memcmp(in, "ZGH1", 4) == 0);
      const uint8_t *c = (const uint8_t *)p.got.data;
      CHECK(p.got.len == CHALLENGE_FIXED + strlen(server_address) + SERVER_EXT_LEN);
      CHECK(is_server_field(c + CHALLENGE_FIXED, p.got.len - CHALLENGE_FIXED));
      uint8_t want[MAC_LEN];
      mac("zonegate-raft-server", in + 4, c + 4, SERVER_ID, server_address, want);
      CHECK(memcmp(c, "ZGH2", 4) == 0 && memcmp(want, c + 4 + NONCE_LEN + 8, MAC_LEN) == 0);
    }
  } else {
    bool want_accept = hello_valid && p.proof_right && field_ok;
    if (accepted.called != want_accept)
      fprintf(stderr, "accepted %d, expected %d (id %llu, address \"%s\", proof %s)\n",
              accepted.called, want_accept, (unsigned long long)p.id, p.address,
              p.proof_right ? "right" : "wrong");
    CHECK(accepted.called == want_accept);
    if (accepted.called) {
      CHECK(accepted.id == p.id && strcmp(accepted.address, p.address) == 0);
      CHECK(accepted.got.len == raft_bytes);
      CHECK(raft_bytes == 0 ||
            memcmp(accepted.got.data, p.second.data + 4 + MAC_LEN, raft_bytes) == 0);
    }
  }
  /* Let the server release its side of the handshake. */
  for (int i = 0; i < 4; i++) uv_run(&loop, UV_RUN_NOWAIT);
  zg_buf_free(&p.first);
  zg_buf_free(&p.second);
  zg_buf_free(&p.got);
  zg_buf_free(&accepted.got);
  return 0;
}
