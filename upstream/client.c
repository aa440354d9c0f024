/* upstream/client.c: libcurl multi interface on the libuv loop, for calls
 * to the upstream model API.
 *
 * Happy path: upstream_start() builds an easy handle and adds it to the
 * multi handle; curl asks for socket watches (on_curl_socket -> uv_poll_t)
 * and a wake-up (on_curl_timer_request -> one uv timer); when either fires we
 * call curl_multi_socket_action() and then drain curl_multi_info_read().
 * Response headers go to on_response once, body pieces straight to on_data,
 * and the end to on_done.
 *
 * Phase timeouts: curl enforces the connect timeout; after that one uv timer
 * per transfer watches the earliest deadline among first byte / idle /
 * total. It is restarted only when a deadline comes EARLIER than the one it
 * is armed for; when it fires, the deadline that applies now is computed
 * again and either its timeout fires or the timer is re-armed for the rest
 * (a response piece that pushes the idle deadline back costs nothing).
 *
 * Per-request allocations are few: the request headers for curl are one
 * block, the response header lines one growing buffer, and easy handles and
 * transfer structs (released from the timer's close callback) are pooled.
 *
 * Failure modes: curl errors are classified into enum upstream_result (see
 * upstream.h). User callbacks run inside curl_multi_socket_action(), where
 * curl forbids calling back into the multi handle, so cancel/start/close made
 * from a callback are deferred (flags on the transfer or client) and carried
 * out right after socket_action returns; a cancelled transfer's curl callbacks
 * return "abort" so curl stops reading for it at once. Memory of transfers,
 * socket watches and the client is released only from uv close callbacks.
 */
#include "upstream/upstream.h"

#include "base/base.h"
#include "upstream/lean.h"

#include <openssl/x509v3.h>

#include <curl/curl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* Response headers kept for on_response; more is treated as a broken reply. */
#define UPSTREAM_MAX_RESPONSE_HEADERS 256
/* Idle connections kept for reuse by the multi handle's connection cache. */
#define UPSTREAM_MAX_CACHED_CONNECTIONS 1024L
/* Streams one HTTP/2 connection carries at most (see upstream_client_create). */
#define UPSTREAM_H2_MAX_STREAMS 100L
/* Easy handles kept for reuse after their transfer (their buffers kept;
 * the connection and DNS caches belong to the multi). A handle whose last
 * transfer was a plain one (POST or GET, no TLS options) keeps its options
 * too: the next plain transfer sets only what differs per transfer (see
 * configure_easy); any other one is curl_easy_reset first. */
#define UPSTREAM_EASY_POOL_SIZE 256
/* Finished transfer structs kept for reuse (with their header buffer).
 * Under AddressSanitizer nothing is pooled, so a use after the end of a
 * transfer is still caught. */
#if defined(__SANITIZE_ADDRESS__)
#define UPSTREAM_TRANSFER_POOL_SIZE 0
#else
#define UPSTREAM_TRANSFER_POOL_SIZE 256
#endif

enum transfer_phase {
  PHASE_CONNECTING,         /* DNS, TCP, TLS (curl's connect timeout) */
  PHASE_WAITING_FIRST_BYTE, /* request handed to the connection */
  PHASE_RECEIVING,          /* response started */
};

/* One uv_poll_t per curl socket. A socket this module opened itself
 * (CURLOPT_OPENSOCKETFUNCTION, `owned`) keeps its watch while it idles in
 * curl's connection cache: on CURL_POLL_REMOVE the watch only forgets what
 * curl wanted (`wanted_events` = 0) and stays registered, so reusing the
 * connection for the next request costs no epoll_ctl. If an idle socket
 * becomes ready (the server closed it), polling stops then. The watch is
 * closed when curl closes the socket (CURLOPT_CLOSESOCKETFUNCTION), before
 * the fd is closed, so a reused fd number never meets a stale watch.
 * Sockets curl creates on its own (the resolver's wake-up pair) may be
 * closed without that callback: their watch is closed on REMOVE. */
struct upstream_socket_watch {
  uv_poll_t poll; /* poll.data = this */
  struct upstream_client *client;
  curl_socket_t fd;
  bool owned;
  int wanted_events;  /* UV_READABLE/UV_WRITABLE curl asked for; 0 = idle */
  int polling_events; /* what the uv_poll_t watches now; 0 = stopped */
  struct upstream_socket_watch *prev, *next;
};

/* Per-fd state, indexed by fd number. */
struct upstream_fd_slot {
  struct upstream_socket_watch *watch;
  bool owned; /* opened by on_curl_open_socket; closed by on_curl_close_socket */
};

/* What a pooled easy handle's options are set for (configure_easy). */
enum easy_profile {
  EASY_BLANK = 0, /* new or curl_easy_reset: everything must be set */
  EASY_PLAIN_POST,
  EASY_PLAIN_GET,
  EASY_OTHER, /* HEAD, another verb, TLS options: reset before reuse */
};

struct pooled_easy {
  CURL *easy;
  enum easy_profile profile;
};

struct upstream_transfer {
  unsigned char engine; /* UPSTREAM_ENGINE_CURL; first, see upstream/lean.h */
  /* Kept while the transfer sits in the client's pool (capacity reused):
   * the response header lines of the response being received, each stored
   * NUL-terminated one after the other in one growing buffer. */
  char *response_header_text;
  size_t response_header_text_cap;
  /* Per transfer: acquire_transfer zeroes everything from here on. */
  struct upstream_client *client;
  struct upstream_transfer *prev, *next; /* in client->transfers while linked */
  bool linked;
  CURL *easy;
  enum easy_profile easy_profile; /* what easy's options were set for */
  unsigned https_gen;             /* client->https_gen when easy was set up for it */
  /* The request's header lines for curl, in ONE allocation (see
   * build_request_headers); freed with free(). */
  struct curl_slist *request_headers;
  struct upstream_callbacks cb;
  void *ud;
  struct upstream_timeouts timeouts;

  uv_timer_t phase_timer; /* phase_timer.data = this */
  /* Deadline the phase timer is armed for (loop ms); 0 = not armed. The
   * timer is re-armed only when a phase needs an EARLIER deadline; when it
   * fires early (the deadline moved later meanwhile) on_phase_timer re-arms
   * it for what is left. So a response piece costs no timer operation. */
  uint64_t phase_timer_armed_ms;
  enum transfer_phase phase;
  uint64_t start_loop_ms, request_sent_loop_ms, last_activity_loop_ms;
  uint64_t start_us, connected_us, first_byte_us, done_us; /* monotonic, 0 = not yet */

  bool attached_to_multi;
  bool needs_attach; /* upstream_start() ran inside socket_action */
  bool cancelled;    /* no more user callbacks */
  bool finished;     /* detached; on_done running or done */
  bool response_delivered;
  /* Back-pressure (upstream_pause): pause_wanted until upstream_resume;
   * paused_in_curl once on_curl_body returned CURL_WRITEFUNC_PAUSE;
   * resume_pending until on_resume_timer lifts curl's pause. */
  bool pause_wanted, paused_in_curl, resume_pending;

  size_t response_header_text_len; /* bytes used in response_header_text */
  size_t response_header_count;
  bool has_forced_result;
  enum upstream_result forced_result;

  char curl_errbuf[CURL_ERROR_SIZE];
  char error_text[CURL_ERROR_SIZE + 64];
  char tls_peer_node[64]; /* upstream_tls.peer_node, for on_curl_ssl_ctx */
};

struct upstream_client {
  uv_loop_t *loop;
  CURLM *multi;
  /* TLS session cache shared by every easy handle of this client, so a new
   * connection to an https upstream resumes the session (no full
   * handshake) whichever pooled handle opens it. NULL if curl refused. */
  CURLSH *share;
  uv_timer_t multi_timer; /* curl's wake-up; multi_timer.data = this */
  /* Runs curl's 0 ms wake-up right after this loop turn's I/O callbacks
   * instead of a loop turn later; kick.data = this. */
  uv_check_t kick;
  /* Lifts curl's pause of resumed transfers from the loop (upstream_resume
   * never calls into curl itself); resume_timer.data = this. */
  uv_timer_t resume_timer;
  struct upstream_fd_slot *fds; /* indexed by fd; grows */
  size_t fds_cap;
  struct pooled_easy easy_pool[UPSTREAM_EASY_POOL_SIZE];
  size_t easy_pool_count;
  struct upstream_transfer *transfers;
  /* Finished transfers (timer closed) kept for reuse, via next. */
  struct upstream_transfer *transfer_pool;
  size_t transfer_pool_count;
  struct upstream_socket_watch *watches;
  size_t active;
  size_t open_handles;    /* uv handles not yet through their close callback */
  unsigned in_multi_call; /* > 0 while inside curl_multi_socket_action() */
  /* > 0 while a transfer's on_done runs: a close from there waits until
   * that transfer's easy handle is released (else the share, still in use
   * by it, could not be freed: found by ASan with the usage relay) */
  unsigned in_done;
  bool deferred_work;   /* cancels/attaches to do after socket_action */
  bool close_requested; /* upstream_client_close() from inside socket_action */
  bool closing;
  void (*close_done)(void *arg);
  void *close_arg;
  /* https:// upstreams without upstream_tls (upstream_client_set_https):
   * CA file ("" = the system's store; owned, never NULL) and HTTP version.
   * Pooled easy handles are reset when these change, since a plain
   * profile keeps its options. */
  char *https_ca_file;
  enum upstream_http_version https_version;
  /* Bumped by every change of the two: a handle set up under an older
   * value is reset when its transfer releases it. */
  unsigned https_gen;
  /* Plain http:// transfers (upstream/lean.c); counted in open_handles
   * until its close is done. */
  struct lean_client *lean;
  bool lean_closing;
};

static uint64_t monotonic_us(void) {
  return uv_hrtime() / 1000;
}

const char *upstream_result_name(enum upstream_result r) {
  switch (r) {
  case UPSTREAM_OK:
    return "ok";
  case UPSTREAM_CONNECT_FAILED:
    return "connect_failed";
  case UPSTREAM_CONNECT_TIMEOUT:
    return "connect_timeout";
  case UPSTREAM_FIRST_BYTE_TIMEOUT:
    return "first_byte_timeout";
  case UPSTREAM_IDLE_TIMEOUT:
    return "idle_timeout";
  case UPSTREAM_TOTAL_TIMEOUT:
    return "total_timeout";
  case UPSTREAM_BROKEN:
    return "broken";
  }
  return "unknown";
}

/* ---- closing and freeing ------------------------------------------- */

static void maybe_free_client(struct upstream_client *c) {
  if (!c->closing || c->open_handles > 0) return;
  void (*done)(void *) = c->close_done;
  void *arg = c->close_arg;
  free(c->https_ca_file);
  free(c);
  if (done) done(arg);
}

static void on_watch_closed(uv_handle_t *h) {
  struct upstream_socket_watch *w = h->data;
  struct upstream_client *c = w->client;
  free(w);
  c->open_handles--;
  maybe_free_client(c);
}

static struct upstream_fd_slot *fd_slot(struct upstream_client *c, curl_socket_t fd, bool grow) {
  if (fd < 0) return NULL;
  if ((size_t)fd >= c->fds_cap) {
    if (!grow) return NULL;
    size_t cap = c->fds_cap ? c->fds_cap : 64;
    while (cap <= (size_t)fd) cap *= 2;
    struct upstream_fd_slot *grown = realloc(c->fds, cap * sizeof *grown);
    if (!grown) return NULL;
    memset(grown + c->fds_cap, 0, (cap - c->fds_cap) * sizeof *grown);
    c->fds = grown;
    c->fds_cap = cap;
  }
  return &c->fds[fd];
}

static void close_watch(struct upstream_socket_watch *w) {
  struct upstream_client *c = w->client;
  struct upstream_fd_slot *slot = fd_slot(c, w->fd, false);
  if (slot && slot->watch == w) slot->watch = NULL;
  if (w->prev)
    w->prev->next = w->next;
  else
    c->watches = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
  uv_close((uv_handle_t *)&w->poll, on_watch_closed);
}

static void free_transfer_memory(struct upstream_transfer *t) {
  free(t->response_header_text);
  free(t);
}

/* The transfer's memory is released (pooled, or freed) only here. */
static void on_transfer_timer_closed(uv_handle_t *h) {
  struct upstream_transfer *t = h->data;
  struct upstream_client *c = t->client;
  if (!c->closing && c->transfer_pool_count + 1 <= UPSTREAM_TRANSFER_POOL_SIZE) {
    t->next = c->transfer_pool;
    c->transfer_pool = t;
    c->transfer_pool_count++;
  } else {
    free_transfer_memory(t);
  }
  c->open_handles--;
  maybe_free_client(c);
}

/* Forgets the stored response header lines (an interim response, or
 * after delivery); the buffer is kept for reuse. */
static void forget_response_headers(struct upstream_transfer *t) {
  t->response_header_text_len = 0;
  t->response_header_count = 0;
}

/* Takes t out of the client's list and out of the multi handle; no more curl
 * callbacks after this. Must not run inside curl_multi_socket_action(). */
static void detach_transfer(struct upstream_transfer *t) {
  struct upstream_client *c = t->client;
  if (!t->cancelled && !t->finished) c->active--;
  t->finished = true;
  uv_timer_stop(&t->phase_timer);
  t->phase_timer_armed_ms = 0;
  if (t->linked) {
    if (t->prev)
      t->prev->next = t->next;
    else
      c->transfers = t->next;
    if (t->next) t->next->prev = t->prev;
    t->prev = t->next = NULL;
    t->linked = false;
  }
  if (t->attached_to_multi && c->multi) curl_multi_remove_handle(c->multi, t->easy);
  t->attached_to_multi = false;
  t->needs_attach = false;
}

/* Keeps a detached easy handle for the next transfer, or cleans it up. A
 * handle set up for a plain transfer keeps its options (the next one of
 * the same kind only changes what differs); any other is reset now. */
static void release_easy(struct upstream_client *c, CURL *easy, enum easy_profile profile) {
  if (!easy) return;
  if (!c->closing && c->easy_pool_count < UPSTREAM_EASY_POOL_SIZE) {
    if (profile != EASY_PLAIN_POST && profile != EASY_PLAIN_GET) {
      curl_easy_reset(easy);
      profile = EASY_BLANK;
    }
    c->easy_pool[c->easy_pool_count++] = (struct pooled_easy){easy, profile};
    return;
  }
  curl_easy_cleanup(easy);
}

/* A pooled handle, preferably one already set up for `want`. */
static CURL *acquire_easy(struct upstream_client *c, enum easy_profile want,
                          enum easy_profile *profile) {
  *profile = EASY_BLANK;
  if (c->easy_pool_count == 0) return curl_easy_init();
  struct pooled_easy *top = &c->easy_pool[c->easy_pool_count - 1];
  if (top->profile != want && top->profile != EASY_BLANK) {
    curl_easy_reset(top->easy); /* set up for the other kind */
    top->profile = EASY_BLANK;
  }
  c->easy_pool_count--;
  *profile = top->profile;
  return top->easy;
}

/* Frees what t owns and closes its timer; t itself goes in the close cb. */
static void dispose_transfer(struct upstream_transfer *t) {
  /* A handle set up before upstream_client_set_https changed the options
   * holds the old ones: EASY_OTHER makes release_easy reset it. */
  bool current = t->https_gen == t->client->https_gen;
  release_easy(t->client, t->easy, current ? t->easy_profile : EASY_OTHER);
  t->easy = NULL;
  free(t->request_headers);
  t->request_headers = NULL;
  forget_response_headers(t);
  uv_close((uv_handle_t *)&t->phase_timer, on_transfer_timer_closed);
}

static void do_close(struct upstream_client *c);

static void finish_transfer(struct upstream_transfer *t, enum upstream_result result,
                            const char *error_text) {
  if (t->finished) return;
  struct upstream_client *c = t->client;
  bool notify = !t->cancelled;
  t->done_us = monotonic_us();
  detach_transfer(t);
  c->in_done++;
  if (notify && t->cb.on_done) t->cb.on_done(t->ud, result, error_text ? error_text : "");
  dispose_transfer(t);
  c->in_done--;
  if (c->in_done == 0 && c->in_multi_call == 0 && c->close_requested && !c->closing) do_close(c);
}

/* ---- phase timer ----------------------------------------------------- */

static void on_first_byte_timeout(struct upstream_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "no response byte within %u ms",
           t->timeouts.first_byte_ms);
  finish_transfer(t, UPSTREAM_FIRST_BYTE_TIMEOUT, t->error_text);
}

static void on_idle_timeout(struct upstream_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "response idle for %u ms", t->timeouts.idle_ms);
  finish_transfer(t, UPSTREAM_IDLE_TIMEOUT, t->error_text);
}

static void on_total_timeout(struct upstream_transfer *t) {
  snprintf(t->error_text, sizeof t->error_text, "transfer exceeded %u ms total",
           t->timeouts.total_ms);
  finish_transfer(t, UPSTREAM_TOTAL_TIMEOUT, t->error_text);
}

typedef void (*phase_timeout_fn)(struct upstream_transfer *t);

/* The earliest deadline (loop ms) that applies in the current phase, and
 * the timeout it names; UINT64_MAX and NULL when none applies. */
static uint64_t phase_deadline(const struct upstream_transfer *t, phase_timeout_fn *fire) {
  uint64_t deadline = UINT64_MAX;
  *fire = NULL;
  if (t->timeouts.total_ms) {
    deadline = t->start_loop_ms + t->timeouts.total_ms;
    *fire = on_total_timeout;
  }
  bool paused = t->pause_wanted || t->paused_in_curl; /* silence is ours, not the upstream's */
  if (t->phase == PHASE_WAITING_FIRST_BYTE && t->timeouts.first_byte_ms && !paused) {
    uint64_t first_byte_deadline = t->request_sent_loop_ms + t->timeouts.first_byte_ms;
    if (first_byte_deadline < deadline) {
      deadline = first_byte_deadline;
      *fire = on_first_byte_timeout;
    }
  }
  if (t->phase == PHASE_RECEIVING && t->timeouts.idle_ms && !paused) {
    uint64_t idle_deadline = t->last_activity_loop_ms + t->timeouts.idle_ms;
    if (idle_deadline < deadline) {
      deadline = idle_deadline;
      *fire = on_idle_timeout;
    }
  }
  return deadline;
}

static void on_phase_timer(uv_timer_t *h);

static void start_phase_timer(struct upstream_transfer *t, uint64_t deadline) {
  uint64_t now = uv_now(t->client->loop);
  t->phase_timer_armed_ms = deadline;
  uv_timer_start(&t->phase_timer, on_phase_timer, deadline > now ? deadline - now : 0, 0);
}

/* Makes sure the timer fires no later than the earliest deadline of the
 * current phase. A timer already armed for an earlier moment is left alone
 * (on_phase_timer re-checks when it fires). */
static void arm_phase_timer(struct upstream_transfer *t) {
  phase_timeout_fn fire;
  uint64_t deadline = phase_deadline(t, &fire);
  if (!fire) return; /* none applies; an armed timer finds nothing due */
  if (t->phase_timer_armed_ms && t->phase_timer_armed_ms <= deadline) return;
  start_phase_timer(t, deadline);
}

/* Fires the timeout that is due, or re-arms for the deadline that moved
 * later since the timer was armed. */
static void on_phase_timer(uv_timer_t *h) {
  struct upstream_transfer *t = h->data;
  t->phase_timer_armed_ms = 0;
  phase_timeout_fn fire;
  uint64_t deadline = phase_deadline(t, &fire);
  if (!fire) return;
  if (deadline > uv_now(t->client->loop)) {
    start_phase_timer(t, deadline);
    return;
  }
  fire(t);
}

/* ---- curl easy callbacks (run inside curl_multi_socket_action) ------- */

static int on_curl_prereq(void *clientp, char *primary_ip, char *local_ip, int primary_port,
                          int local_port) {
  struct upstream_transfer *t = clientp;
  if (t->cancelled) return CURL_PREREQFUNC_ABORT;
  t->connected_us = monotonic_us();
  t->phase = PHASE_WAITING_FIRST_BYTE;
  t->request_sent_loop_ms = uv_now(t->client->loop);
  arm_phase_timer(t);
  return CURL_PREREQFUNC_OK;
}

static void note_response_activity(struct upstream_transfer *t) {
  if (t->phase != PHASE_RECEIVING) {
    t->phase = PHASE_RECEIVING;
    t->first_byte_us = monotonic_us();
  }
  t->last_activity_loop_ms = uv_now(t->client->loop);
  arm_phase_timer(t);
}

/* The Content-Type value among the header lines, or NULL. */
static const char *find_content_type(const char *const *lines) {
  static const char name[] = "content-type:";
  for (size_t i = 0; lines[i]; i++) {
    const char *line = lines[i];
    if (strncasecmp(line, name, sizeof name - 1) == 0) {
      const char *value = line + sizeof name - 1;
      while (*value == ' ' || *value == '\t') value++;
      return value;
    }
  }
  return NULL;
}

static void deliver_response(struct upstream_transfer *t) {
  long status = 0;
  curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
  t->response_delivered = true;
  /* Point at each stored NUL-terminated line, in order. */
  const char *lines[UPSTREAM_MAX_RESPONSE_HEADERS + 1];
  const char *at = t->response_header_text;
  for (size_t i = 0; i < t->response_header_count; i++) {
    lines[i] = at;
    at += strlen(at) + 1;
  }
  lines[t->response_header_count] = NULL;
  if (t->cb.on_response) t->cb.on_response(t->ud, (int)status, find_content_type(lines), lines);
  forget_response_headers(t);
}

static int add_response_header(struct upstream_transfer *t, const char *line, size_t len) {
  if (t->response_header_count >= UPSTREAM_MAX_RESPONSE_HEADERS) return -1;
  size_t need = t->response_header_text_len + len + 1;
  if (need > t->response_header_text_cap) {
    size_t cap = t->response_header_text_cap ? t->response_header_text_cap * 2 : 512;
    while (cap < need) cap *= 2;
    char *grown = realloc(t->response_header_text, cap);
    if (!grown) return -1;
    t->response_header_text = grown;
    t->response_header_text_cap = cap;
  }
  memcpy(t->response_header_text + t->response_header_text_len, line, len);
  t->response_header_text[t->response_header_text_len + len] = '\0';
  t->response_header_text_len = need;
  t->response_header_count++;
  return 0;
}

static size_t on_curl_header(char *buffer, size_t size, size_t nitems, void *userdata) {
  struct upstream_transfer *t = userdata;
  size_t len = size * nitems;
  if (t->cancelled) return 0;
  note_response_activity(t);
  if (t->response_delivered) return len; /* trailers: ignored */

  size_t line_len = len;
  while (line_len > 0 && (buffer[line_len - 1] == '\n' || buffer[line_len - 1] == '\r')) line_len--;
  if (line_len >= 5 && memcmp(buffer, "HTTP/", 5) == 0) {
    forget_response_headers(t); /* a new status line: forget any interim response */
    return len;
  }
  if (line_len == 0) {
    long status = 0;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status >= 100 && status < 200) {
      forget_response_headers(t);
      return len;
    }
    deliver_response(t);
    return t->cancelled ? 0 : len;
  }
  if (add_response_header(t, buffer, line_len) != 0) {
    t->has_forced_result = true;
    t->forced_result = UPSTREAM_BROKEN;
    snprintf(t->error_text, sizeof t->error_text, "response headers: more than %d or out of memory",
             UPSTREAM_MAX_RESPONSE_HEADERS);
    return 0;
  }
  return len;
}

static size_t on_curl_body(char *data, size_t size, size_t nmemb, void *userdata) {
  struct upstream_transfer *t = userdata;
  size_t len = size * nmemb;
  if (t->cancelled) return 0;
  if (t->pause_wanted) {
    /* curl keeps this piece and stops reading until curl_easy_pause(CONT)
     * (on_resume_timer), which delivers it again. */
    t->paused_in_curl = true;
    return CURL_WRITEFUNC_PAUSE;
  }
  note_response_activity(t);
  if (!t->response_delivered) {
    deliver_response(t);
    if (t->cancelled) return 0;
  }
  if (len > 0 && t->cb.on_data && t->cb.on_data(t->ud, data, len) != 0) {
    upstream_cancel(t); /* deferred: we are inside socket_action */
    return 0;
  }
  return t->cancelled ? 0 : len;
}

/* ---- completion -------------------------------------------------------- */

static enum upstream_result classify_curl_error(const struct upstream_transfer *t, CURLcode code) {
  if (code == CURLE_OK) return UPSTREAM_OK;
  if (t->has_forced_result) return t->forced_result;
  switch (code) {
  case CURLE_UNSUPPORTED_PROTOCOL:
  case CURLE_URL_MALFORMAT:
  case CURLE_COULDNT_RESOLVE_PROXY:
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_CONNECT:
  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_SSL_ENGINE_INITFAILED:
  case CURLE_USE_SSL_FAILED:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_CLIENTCERT:
    return UPSTREAM_CONNECT_FAILED;
  case CURLE_OPERATION_TIMEDOUT:
    /* Only the connect timeout is given to curl; anything later is ours. */
    return t->phase == PHASE_CONNECTING ? UPSTREAM_CONNECT_TIMEOUT : UPSTREAM_TOTAL_TIMEOUT;
  default:
    /* GOT_NOTHING, RECV_ERROR, SEND_ERROR, PARTIAL_FILE, ...: the request may
     * have reached the upstream, so it is BROKEN, not CONNECT_FAILED. */
    return t->phase == PHASE_CONNECTING ? UPSTREAM_CONNECT_FAILED : UPSTREAM_BROKEN;
  }
}

static void on_transfer_completed(struct upstream_transfer *t, CURLcode code) {
  if (t->cancelled) {
    detach_transfer(t);
    dispose_transfer(t);
    return;
  }
  enum upstream_result result = classify_curl_error(t, code);
  const char *text = "";
  if (code != CURLE_OK) {
    if (t->has_forced_result)
      text = t->error_text;
    else if (t->curl_errbuf[0])
      text = t->curl_errbuf;
    else
      text = curl_easy_strerror(code);
  }
  finish_transfer(t, result, text);
}

static void drain_completed(struct upstream_client *c) {
  CURLMsg *msg;
  int left;
  while (!c->closing && c->multi && (msg = curl_multi_info_read(c->multi, &left))) {
    if (msg->msg != CURLMSG_DONE) continue;
    CURL *easy = msg->easy_handle;
    CURLcode code = msg->data.result; /* msg is invalid after remove_handle */
    char *private_ptr = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, &private_ptr);
    if (private_ptr) on_transfer_completed((struct upstream_transfer *)private_ptr, code);
  }
}

static int attach_transfer(struct upstream_transfer *t, char *errmsg, size_t errlen) {
  CURLMcode mc = curl_multi_add_handle(t->client->multi, t->easy);
  if (mc != CURLM_OK) {
    snprintf(errmsg, errlen, "curl_multi_add_handle(): %s", curl_multi_strerror(mc));
    return -1;
  }
  t->attached_to_multi = true;
  t->needs_attach = false;
  return 0;
}

/* Carries out what callbacks asked for while curl was on the stack. */
static void run_deferred_work(struct upstream_client *c) {
  while (c->deferred_work && !c->closing) {
    c->deferred_work = false;
    struct upstream_transfer *t = c->transfers;
    while (t) {
      struct upstream_transfer *next = t->next;
      if (t->cancelled) {
        detach_transfer(t);
        dispose_transfer(t);
      } else if (t->needs_attach) {
        char err[128];
        if (attach_transfer(t, err, sizeof err) != 0) {
          snprintf(t->error_text, sizeof t->error_text, "%s", err);
          finish_transfer(t, UPSTREAM_CONNECT_FAILED, t->error_text);
          c->deferred_work = true; /* on_done may have changed the list: rescan */
          break;
        }
      }
      t = next;
    }
  }
}

static void after_multi_call(struct upstream_client *c) {
  if (c->in_multi_call > 0) return;
  drain_completed(c);
  run_deferred_work(c);
  if (c->close_requested && !c->closing && c->in_done == 0) do_close(c);
}

static void run_socket_action(struct upstream_client *c, curl_socket_t fd, int flags) {
  if (c->closing || !c->multi) return;
  int running = 0;
  c->in_multi_call++;
  curl_multi_socket_action(c->multi, fd, flags, &running);
  c->in_multi_call--;
  after_multi_call(c);
}

/* ---- curl multi callbacks -------------------------------------------- */

static void on_socket_ready(uv_poll_t *h, int status, int events) {
  struct upstream_socket_watch *w = h->data;
  if (w->wanted_events == 0) {
    /* An idle cached connection became ready: the server closed it or sent
     * something unasked. Stop watching; curl checks the connection before
     * it reuses it. */
    uv_poll_stop(&w->poll);
    w->polling_events = 0;
    return;
  }
  int flags = 0;
  if (status < 0) {
    flags = CURL_CSELECT_ERR;
  } else {
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  }
  run_socket_action(w->client, w->fd, flags);
}

static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  struct upstream_client *c = userp;
  struct upstream_fd_slot *slot = fd_slot(c, fd, what != CURL_POLL_REMOVE && !c->closing);
  struct upstream_socket_watch *w = slot ? slot->watch : NULL;
  if (what == CURL_POLL_REMOVE) {
    if (!w) return 0; /* a REMOVE for a socket never announced is fine */
    if (!w->owned || c->closing) {
      close_watch(w); /* curl may close it without telling us */
      return 0;
    }
    w->wanted_events = 0;
    uv_unref((uv_handle_t *)&w->poll);     /* an idle connection keeps no loop alive */
    if (w->polling_events & UV_WRITABLE) { /* would fire at once, again and again */
      uv_poll_stop(&w->poll);
      w->polling_events = 0;
    }
    return 0;
  }
  if (c->closing) return 0;
  if (!slot) return -1;
  if (!w) {
    w = calloc(1, sizeof *w);
    if (!w) return -1;
    if (uv_poll_init_socket(c->loop, &w->poll, fd) != 0) {
      free(w);
      return -1;
    }
    w->poll.data = w;
    w->client = c;
    w->fd = fd;
    w->owned = slot->owned;
    w->next = c->watches;
    if (c->watches) c->watches->prev = w;
    c->watches = w;
    c->open_handles++;
    slot->watch = w;
  }
  int events = 0;
  if (what & CURL_POLL_IN) events |= UV_READABLE;
  if (what & CURL_POLL_OUT) events |= UV_WRITABLE;
  if (w->wanted_events == 0) uv_ref((uv_handle_t *)&w->poll);
  w->wanted_events = events;
  if (w->polling_events != events) { /* unchanged: no epoll_ctl at all */
    uv_poll_start(&w->poll, events, on_socket_ready);
    w->polling_events = events;
  }
  return 0;
}

/* CURLOPT_OPENSOCKETFUNCTION: the socket is ours to track (see
 * struct upstream_socket_watch). */
static curl_socket_t on_curl_open_socket(void *clientp, curlsocktype purpose,
                                         struct curl_sockaddr *address) {
  struct upstream_client *c = clientp;
  curl_socket_t fd = socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
  if (fd < 0) return CURL_SOCKET_BAD;
  struct upstream_fd_slot *slot = fd_slot(c, fd, true);
  if (!slot) {
    close(fd);
    return CURL_SOCKET_BAD;
  }
  if (slot->watch) close_watch(slot->watch); /* stale: its fd was closed behind our back */
  slot->owned = true;
  return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION: curl is done with the socket (curl has
 * already announced CURL_POLL_REMOVE for it). Stop watching, then close. */
static int on_curl_close_socket(void *clientp, curl_socket_t fd) {
  struct upstream_client *c = clientp;
  struct upstream_fd_slot *slot = fd_slot(c, fd, false);
  if (slot) {
    if (slot->watch) close_watch(slot->watch); /* uv_close stops epoll now */
    slot->owned = false;
  }
  return close(fd);
}

/* Lifts curl's pause of every transfer upstream_resume() asked for, then
 * lets curl run (curl_easy_pause(CONT) may deliver the held piece at once,
 * and the transfer needs a socket_action to read again). */
static void on_resume_timer(uv_timer_t *h) {
  struct upstream_client *c = h->data;
  if (c->closing || !c->multi) return;
  c->in_multi_call++; /* callbacks may run inside curl_easy_pause */
  for (struct upstream_transfer *t = c->transfers; t; t = t->next) {
    if (!t->resume_pending) continue;
    t->resume_pending = false;
    if (t->cancelled || t->finished || t->pause_wanted || !t->paused_in_curl) continue;
    t->paused_in_curl = false;
    t->last_activity_loop_ms = uv_now(c->loop);
    curl_easy_pause(t->easy, CURLPAUSE_CONT); /* an error surfaces as the transfer's result */
  }
  c->in_multi_call--;
  after_multi_call(c);
  run_socket_action(c, CURL_SOCKET_TIMEOUT, 0);
}

static void on_multi_timer(uv_timer_t *h) {
  struct upstream_client *c = h->data;
  uv_check_stop(&c->kick);
  run_socket_action(c, CURL_SOCKET_TIMEOUT, 0);
}

/* A 0 ms wake-up (a transfer was just added) runs here, after this loop
 * turn's I/O callbacks, so the requests they started go out in one
 * socket_action call without waiting for the next loop turn. */
static void on_kick(uv_check_t *h) {
  struct upstream_client *c = h->data;
  uv_check_stop(&c->kick);
  if (!uv_is_active((uv_handle_t *)&c->multi_timer)) return; /* already run */
  uv_timer_stop(&c->multi_timer);
  run_socket_action(c, CURL_SOCKET_TIMEOUT, 0);
}

/* curl wants to be woken after timeout_ms (-1: never). Never calls
 * socket_action itself: even a 0 ms request goes through the uv timer (and
 * the check handle, whichever runs first; the uv timer also keeps the
 * loop's poll from blocking meanwhile). */
static int on_curl_timer_request(CURLM *multi, long timeout_ms, void *userp) {
  struct upstream_client *c = userp;
  if (c->closing) return 0;
  if (timeout_ms < 0) {
    uv_timer_stop(&c->multi_timer);
    uv_check_stop(&c->kick);
  } else {
    uv_timer_start(&c->multi_timer, on_multi_timer, (uint64_t)timeout_ms, 0);
    if (timeout_ms == 0)
      uv_check_start(&c->kick, on_kick);
    else
      uv_check_stop(&c->kick);
  }
  return 0;
}

/* ---- client ------------------------------------------------------------ */

static void on_multi_timer_closed(uv_handle_t *h) {
  struct upstream_client *c = h->data;
  c->open_handles--;
  maybe_free_client(c);
}

static void on_kick_closed(uv_handle_t *h) {
  struct upstream_client *c = h->data;
  c->open_handles--;
  maybe_free_client(c);
}

int upstream_client_create(uv_loop_t *loop, struct upstream_client **out, char *errmsg,
                           size_t errlen) {
  static bool curl_initialised; /* loop thread only; curl_global_init is not thread-safe */
  if (!loop || !out) {
    snprintf(errmsg, errlen, "upstream_client_create(): loop and out are required");
    return -1;
  }
  if (!curl_initialised) {
    CURLcode gc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (gc != CURLE_OK) {
      snprintf(errmsg, errlen, "curl_global_init(): %s", curl_easy_strerror(gc));
      return -1;
    }
    curl_initialised = true;
  }
  struct upstream_client *c = calloc(1, sizeof *c);
  if (!c) {
    snprintf(errmsg, errlen, "upstream_client_create(): out of memory");
    return -1;
  }
  c->loop = loop;
  c->https_version = UPSTREAM_HTTP_2;
  c->https_ca_file = strdup("");
  if (!c->https_ca_file) {
    snprintf(errmsg, errlen, "upstream_client_create(): out of memory");
    goto err_after_alloc;
  }
  if (lean_client_create(loop, &c->lean, errmsg, errlen) != 0) goto err_after_alloc;
  c->multi = curl_multi_init();
  if (!c->multi) {
    snprintf(errmsg, errlen, "curl_multi_init() failed");
    goto err_after_lean;
  }
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer_request);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
  /* Keep idle connections for reuse (curl's default is 4 per easy handle
   * added, which a burst then idle period undercuts); no per-host cap. */
  curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, UPSTREAM_MAX_CACHED_CONNECTIONS);
  /* HTTP/2 upstreams: many transfers share one connection (curl's default
   * since 7.62, stated here because the easy options below rely on it). */
  curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  /* Streams per HTTP/2 connection: the lower of this and the server's
   * SETTINGS_MAX_CONCURRENT_STREAMS; past it curl opens one more
   * connection (curl's default, stated because the README quotes it). */
  curl_multi_setopt(c->multi, CURLMOPT_MAX_CONCURRENT_STREAMS, UPSTREAM_H2_MAX_STREAMS);
  c->share = curl_share_init();
  if (c->share &&
      curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK) {
    curl_share_cleanup(c->share);
    c->share = NULL;
  }
  int rv = uv_timer_init(loop, &c->multi_timer);
  if (rv != 0) {
    snprintf(errmsg, errlen, "uv_timer_init(): %s", uv_strerror(rv));
    goto err_after_multi;
  }
  c->multi_timer.data = c;
  uv_check_init(loop, &c->kick); /* cannot fail for a live loop */
  c->kick.data = c;
  uv_timer_init(loop, &c->resume_timer); /* cannot fail for a live loop */
  c->resume_timer.data = c;
  c->open_handles = 4; /* the three above and the lean client */
  *out = c;
  return 0;

err_after_multi:
  if (c->share) curl_share_cleanup(c->share);
  curl_multi_cleanup(c->multi);
err_after_lean:
  lean_client_close(c->lean, NULL, NULL); /* frees itself from its close callbacks */
err_after_alloc:
  free(c->https_ca_file);
  free(c);
  return -1;
}

static void do_close(struct upstream_client *c) {
  c->closing = true;
  while (c->transfers) {
    struct upstream_transfer *t = c->transfers;
    t->cancelled = true; /* no callback */
    detach_transfer(t);
    dispose_transfer(t);
  }
  c->active = 0;
  CURLM *multi = c->multi;
  curl_multi_cleanup(multi); /* may announce REMOVE and close cached connections */
  c->multi = NULL;
  while (c->easy_pool_count > 0) curl_easy_cleanup(c->easy_pool[--c->easy_pool_count].easy);
  if (c->share) curl_share_cleanup(c->share); /* after every easy handle that used it */
  c->share = NULL;
  while (c->transfer_pool) {
    struct upstream_transfer *t = c->transfer_pool;
    c->transfer_pool = t->next;
    free_transfer_memory(t);
  }
  c->transfer_pool_count = 0;
  while (c->watches) close_watch(c->watches);
  free(c->fds);
  c->fds = NULL;
  c->fds_cap = 0;
  uv_close((uv_handle_t *)&c->multi_timer, on_multi_timer_closed);
  uv_close((uv_handle_t *)&c->kick, on_kick_closed);
  uv_close((uv_handle_t *)&c->resume_timer, on_kick_closed);
}

static void on_lean_closed(void *arg) {
  struct upstream_client *c = arg;
  c->lean = NULL;
  c->open_handles--;
  maybe_free_client(c);
}

void upstream_client_close(struct upstream_client *c, void (*done)(void *arg), void *arg) {
  if (!c || c->closing || c->close_requested) return;
  c->close_done = done;
  c->close_arg = arg;
  if (c->lean && !c->lean_closing) {
    c->lean_closing = true; /* its transfers end now, with no callback */
    lean_client_close(c->lean, on_lean_closed, c);
  }
  if (c->in_multi_call > 0 || c->in_done > 0) {
    c->close_requested = true; /* curl or a transfer is on the stack: finish after it returns */
    /* Stop user callbacks for everything right away. */
    for (struct upstream_transfer *t = c->transfers; t; t = t->next) {
      if (!t->cancelled && !t->finished) c->active--;
      t->cancelled = true;
    }
    return;
  }
  do_close(c);
}

int upstream_client_set_https(struct upstream_client *c, const struct upstream_https_options *o,
                              char *errmsg, size_t errlen) {
  if (!c || !o || c->closing || c->close_requested) {
    snprintf(errmsg, errlen, "upstream_client_set_https(): no client or options, or it is closing");
    return -1;
  }
  const char *ca = o->ca_file ? o->ca_file : "";
  enum upstream_http_version version =
      o->http_version == UPSTREAM_HTTP_1_1 ? UPSTREAM_HTTP_1_1 : UPSTREAM_HTTP_2;
  if (strcmp(ca, c->https_ca_file) == 0 && version == c->https_version) return 0;
  char *copy = strdup(ca);
  if (!copy) {
    snprintf(errmsg, errlen, "upstream_client_set_https(): out of memory");
    return -1;
  }
  free(c->https_ca_file);
  c->https_ca_file = copy;
  c->https_version = version;
  c->https_gen++; /* handles of transfers under way are reset when released */
  /* Handles kept with a plain profile hold the old options. */
  for (size_t i = 0; i < c->easy_pool_count; i++) {
    curl_easy_reset(c->easy_pool[i].easy);
    c->easy_pool[i].profile = EASY_BLANK;
  }
  return 0;
}

size_t upstream_active_count(const struct upstream_client *c) {
  if (!c) return 0;
  return c->active + (c->lean && !c->lean_closing ? lean_active_count(c->lean) : 0);
}

static bool is_lean(const struct upstream_transfer *t) {
  return t && t->engine == UPSTREAM_ENGINE_LEAN;
}

/* ---- TLS between nodes ----------------------------------------------------- */

/* The node id a connection's certificate must name, kept with curl's
 * SSL_CTX (one per connection; a reused connection keeps it). */
static void free_ex_string(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                           void *argp) {
  free(ptr);
}

static int node_ex_index(void) {
  static int idx = -1;
  if (idx < 0) idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_ex_string);
  return idx;
}

static int verify_peer_node(int preverify, X509_STORE_CTX *x) {
  if (!preverify) return 0;
  if (X509_STORE_CTX_get_error_depth(x) != 0) return 1;
  SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
  const char *want = ssl ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), node_ex_index()) : NULL;
  char got[64];
  if (!want) return 1;
  if (zg_tls_cert_node_id(X509_STORE_CTX_get_current_cert(x), got, sizeof got) == 0 &&
      strcmp(got, want) == 0)
    return 1;
  X509_STORE_CTX_set_error(x, X509_V_ERR_HOSTNAME_MISMATCH);
  return 0;
}

static CURLcode on_curl_ssl_ctx(CURL *curl, void *ssl_ctx, void *ud) {
  struct upstream_transfer *t = ud;
  SSL_CTX *ctx = ssl_ctx;
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  if (t->tls_peer_node[0]) {
    char *want = strdup(t->tls_peer_node);
    if (!want || !SSL_CTX_set_ex_data(ctx, node_ex_index(), want)) {
      free(want);
      return CURLE_OUT_OF_MEMORY;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, verify_peer_node);
  }
  return CURLE_OK;
}

/* ---- transfers ----------------------------------------------------------- */

/* The options profile a request needs (see enum easy_profile). */
static enum easy_profile request_profile(const struct upstream_request *req) {
  if (req->tls) return EASY_OTHER;
  if (strcmp(req->method, "POST") == 0) return EASY_PLAIN_POST;
  if (strcmp(req->method, "GET") == 0 && req->body_len == 0) return EASY_PLAIN_GET;
  return EASY_OTHER;
}

/* Sets t->easy up for req. A handle already set up for the same plain
 * profile (t->easy_profile) only gets what differs per transfer: URL,
 * header list, the pointers to t, the connect timeout and the body. */
static int configure_easy(struct upstream_transfer *t, const struct upstream_request *req,
                          enum easy_profile want, char *errmsg, size_t errlen) {
  CURL *e = t->easy;
  CURLcode rc = CURLE_OK;
  bool blank = t->easy_profile != want || want == EASY_OTHER;
#define SETOPT(opt, val)                                                                           \
  do {                                                                                             \
    if (rc == CURLE_OK) {                                                                          \
      rc = curl_easy_setopt(e, opt, val);                                                          \
      if (rc != CURLE_OK)                                                                          \
        snprintf(errmsg, errlen, "curl_easy_setopt(%s): %s", #opt, curl_easy_strerror(rc));        \
    }                                                                                              \
  } while (0)

  /* Per transfer. */
  SETOPT(CURLOPT_URL, req->url);
  SETOPT(CURLOPT_PRIVATE, (void *)t);
  SETOPT(CURLOPT_ERRORBUFFER, t->curl_errbuf);
  SETOPT(CURLOPT_HTTPHEADER, t->request_headers);
  SETOPT(CURLOPT_HEADERDATA, (void *)t);
  SETOPT(CURLOPT_WRITEDATA, (void *)t);
  SETOPT(CURLOPT_PREREQDATA, (void *)t);
  /* 0 is curl's default (300 s), as when it is not set. */
  SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long)req->timeouts.connect_ms);
  /* An https upstream that offers HTTP/2 (ALPN) carries many transfers on
   * one connection: a new transfer waits for a connection being set up to
   * say whether it multiplexes rather than opening one more. */
  bool https = strncasecmp(req->url, "https://", 8) == 0;
  bool h2 = !req->tls && t->client->https_version == UPSTREAM_HTTP_2;
  SETOPT(CURLOPT_PIPEWAIT, https && h2 ? 1L : 0L);
  if (blank) {
    SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
    SETOPT(CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075700
    /* A transfer ended while its name lookup still runs (a timeout, a
     * cancelled forward, a slow DNS server) must not make libcurl join the
     * resolver thread on the loop: that stalled every client for the
     * lookup's whole time (seen as a 4.7 s loop stall when a zone was cut
     * off and its names stopped resolving). With QUICK_EXIT the thread
     * finishes and frees itself. */
    SETOPT(CURLOPT_QUICK_EXIT, 1L);
#endif
    SETOPT(CURLOPT_TCP_NODELAY, 1L);
    SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
    /* HTTP/2 when an https upstream offers it and upstream.http_version
     * allows it (2TLS: plain http:// stays HTTP/1.1; so does node-to-node
     * TLS). */
    SETOPT(CURLOPT_HTTP_VERSION, h2 ? (long)CURL_HTTP_VERSION_2TLS : (long)CURL_HTTP_VERSION_1_1);
    /* upstream.ca_file instead of the system's store (set on a blank
     * handle only: pooled handles are reset when it changes). */
    if (!req->tls && t->client->https_ca_file[0]) SETOPT(CURLOPT_CAINFO, t->client->https_ca_file);
    if (t->client->share) SETOPT(CURLOPT_SHARE, t->client->share);
    /* An encoded answer (a CDN may gzip although identity was asked for) is
     * decoded here, so the caller always sees the plain body. */
    SETOPT(CURLOPT_ACCEPT_ENCODING, "");
    /* A proxy only when the config names one: http_proxy / HTTPS_PROXY in
     * the node's environment must not reroute upstream traffic (and the
     * provider key). "" disables libcurl's environment lookup. */
    SETOPT(CURLOPT_PROXY, "");
    SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
    SETOPT(CURLOPT_HEADERFUNCTION, on_curl_header);
    SETOPT(CURLOPT_WRITEFUNCTION, on_curl_body);
    SETOPT(CURLOPT_PREREQFUNCTION, on_curl_prereq);
    SETOPT(CURLOPT_OPENSOCKETFUNCTION, on_curl_open_socket);
    SETOPT(CURLOPT_OPENSOCKETDATA, (void *)t->client);
    SETOPT(CURLOPT_CLOSESOCKETFUNCTION, on_curl_close_socket);
    SETOPT(CURLOPT_CLOSESOCKETDATA, (void *)t->client);
  }
  if (req->tls) {
    const struct upstream_tls *tls = req->tls;
    if (tls->ca_file) SETOPT(CURLOPT_CAINFO, tls->ca_file);
    if (tls->cert_file) SETOPT(CURLOPT_SSLCERT, tls->cert_file);
    if (tls->key_file) SETOPT(CURLOPT_SSLKEY, tls->key_file);
    SETOPT(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_3);
    SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
    snprintf(t->tls_peer_node, sizeof t->tls_peer_node, "%s", tls->peer_node ? tls->peer_node : "");
    if (t->tls_peer_node[0]) SETOPT(CURLOPT_SSL_VERIFYHOST, 0L); /* the node id is checked */
    SETOPT(CURLOPT_SSL_CTX_FUNCTION, on_curl_ssl_ctx);
    SETOPT(CURLOPT_SSL_CTX_DATA, (void *)t);
  }

  const char *method = req->method;
  const char *body = req->body ? req->body : "";
  if (want == EASY_PLAIN_GET) {
    if (blank) SETOPT(CURLOPT_HTTPGET, 1L);
  } else if (strcmp(method, "HEAD") == 0) {
    SETOPT(CURLOPT_NOBODY, 1L);
  } else {
    if (want == EASY_PLAIN_POST) {
      if (blank) SETOPT(CURLOPT_POST, 1L);
    } else {
      SETOPT(CURLOPT_CUSTOMREQUEST, method);
    }
    if (want == EASY_PLAIN_POST || req->body_len > 0) {
      SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
      if (req->body_kept && req->body_len > 0)
        SETOPT(CURLOPT_POSTFIELDS, body); /* the caller keeps it until the end */
      else
        SETOPT(CURLOPT_COPYPOSTFIELDS, body); /* copies body_len bytes */
    }
  }
#undef SETOPT
  t->easy_profile = rc == CURLE_OK ? want : EASY_OTHER; /* a half-set handle is reset */
  t->https_gen = t->client->https_gen;
  return rc == CURLE_OK ? 0 : -1;
}

/* Builds t->request_headers: the caller's lines and then "Expect:" (no
 * "Expect: 100-continue" round trip before the body), as a curl_slist
 * (a public struct) whose nodes and text share ONE allocation, instead of
 * two allocations per line with curl_slist_append. Freed with free(). */
static int build_request_headers(struct upstream_transfer *t, const char *const *headers,
                                 char *errmsg, size_t errlen) {
  static const char no_expect[] = "Expect:";
  size_t n = 0, text_len = sizeof no_expect;
  for (; headers && headers[n]; n++) {
    const char *line = headers[n];
    if (strpbrk(line, "\r\n")) {
      /* Name only: the value may be a secret. */
      size_t name_len = strcspn(line, ":\r\n");
      snprintf(errmsg, errlen, "request header %d (\"%.*s\") contains CR or LF", (int)n,
               (int)(name_len > 64 ? 64 : name_len), line);
      return -1;
    }
    text_len += strlen(line) + 1;
  }
  struct curl_slist *nodes = malloc((n + 1) * sizeof *nodes + text_len);
  if (!nodes) {
    snprintf(errmsg, errlen, "request headers: out of memory");
    return -1;
  }
  char *text = (char *)(nodes + n + 1);
  for (size_t i = 0; i <= n; i++) {
    const char *line = i < n ? headers[i] : no_expect;
    size_t len = strlen(line) + 1;
    memcpy(text, line, len);
    nodes[i].data = text;
    nodes[i].next = i < n ? &nodes[i + 1] : NULL;
    text += len;
  }
  t->request_headers = nodes;
  return 0;
}

/* A zeroed transfer, from the pool when one is there (its header buffer
 * kept), else newly allocated. NULL when out of memory. */
static struct upstream_transfer *acquire_transfer(struct upstream_client *c) {
  struct upstream_transfer *t = c->transfer_pool;
  if (!t) {
    t = calloc(1, sizeof *t);
    if (t) t->engine = UPSTREAM_ENGINE_CURL;
    return t;
  }
  c->transfer_pool = t->next;
  c->transfer_pool_count--;
  memset(&t->client, 0, sizeof *t - offsetof(struct upstream_transfer, client));
  return t;
}

int upstream_start(struct upstream_client *c, const struct upstream_request *req,
                   const struct upstream_callbacks *cb, void *ud, struct upstream_transfer **out,
                   char *errmsg, size_t errlen) {
  if (out) *out = NULL;
  if (!c || !req || !req->url || !req->method || !cb || (req->body_len > 0 && !req->body)) {
    snprintf(errmsg, errlen, "upstream_start(): client, url, method and callbacks are required");
    return -1;
  }
  if (c->closing || c->close_requested) {
    snprintf(errmsg, errlen, "upstream_start(): client is closing");
    return -1;
  }
  if (c->lean && lean_accepts(req))
    return lean_start(c->lean, req, cb, ud, (struct lean_transfer **)out, errmsg, errlen);
  struct upstream_transfer *t = acquire_transfer(c);
  if (!t) {
    snprintf(errmsg, errlen, "upstream_start(): out of memory");
    return -1;
  }
  t->client = c;
  t->cb = *cb;
  t->ud = ud;
  t->timeouts = req->timeouts;
  t->phase = PHASE_CONNECTING;
  t->start_us = monotonic_us();
  t->start_loop_ms = uv_now(c->loop);
  enum easy_profile want = request_profile(req);
  t->easy = acquire_easy(c, want, &t->easy_profile);
  if (!t->easy) {
    snprintf(errmsg, errlen, "curl_easy_init() failed");
    goto err_after_alloc;
  }
  if (build_request_headers(t, req->headers, errmsg, errlen) != 0) goto err_after_easy;
  if (configure_easy(t, req, want, errmsg, errlen) != 0) goto err_after_easy;
  if (c->in_multi_call > 0) {
    t->needs_attach = true; /* curl is on the stack: add after it returns */
    c->deferred_work = true;
  } else if (attach_transfer(t, errmsg, errlen) != 0) {
    goto err_after_easy;
  }
  uv_timer_init(c->loop, &t->phase_timer); /* cannot fail for a live loop */
  t->phase_timer.data = t;
  c->open_handles++;
  t->next = c->transfers;
  if (c->transfers) c->transfers->prev = t;
  c->transfers = t;
  t->linked = true;
  c->active++;
  arm_phase_timer(t);
  if (out) *out = t;
  return 0;

err_after_easy:
  release_easy(c, t->easy, t->easy_profile);
  free(t->request_headers);
err_after_alloc:
  free_transfer_memory(t);
  return -1;
}

void upstream_cancel(struct upstream_transfer *t) {
  if (is_lean(t)) {
    lean_cancel((struct lean_transfer *)t);
    return;
  }
  if (!t || t->cancelled || t->finished) return;
  struct upstream_client *c = t->client;
  t->cancelled = true;
  c->active--;
  uv_timer_stop(&t->phase_timer);
  t->phase_timer_armed_ms = 0;
  if (c->in_multi_call > 0) {
    c->deferred_work = true; /* its curl callbacks now return "abort" */
    return;
  }
  detach_transfer(t);
  dispose_transfer(t);
}

void upstream_pause(struct upstream_transfer *t) {
  if (is_lean(t)) {
    lean_pause((struct lean_transfer *)t);
    return;
  }
  if (!t || t->cancelled || t->finished) return;
  /* Only a flag: curl is stopped by on_curl_body's next call (and reads
   * nothing until then that it does not hold itself). The phase timer
   * finds no first-byte or idle deadline when it next fires. */
  t->pause_wanted = true;
}

void upstream_resume(struct upstream_transfer *t) {
  if (is_lean(t)) {
    lean_resume((struct lean_transfer *)t);
    return;
  }
  if (!t || t->cancelled || t->finished || !t->pause_wanted) return;
  struct upstream_client *c = t->client;
  t->pause_wanted = false;
  uint64_t now = uv_now(c->loop);
  t->last_activity_loop_ms = now; /* idle counts from the resume */
  if (t->phase == PHASE_WAITING_FIRST_BYTE) t->request_sent_loop_ms = now;
  arm_phase_timer(t);
  if (!t->paused_in_curl) return; /* curl never stopped */
  t->resume_pending = true;
  if (!uv_is_active((uv_handle_t *)&c->resume_timer))
    uv_timer_start(&c->resume_timer, on_resume_timer, 0, 0);
}

bool upstream_body_done(const struct upstream_transfer *t) {
  return is_lean(t) && lean_body_done((const struct lean_transfer *)t);
}

void upstream_get_timing(const struct upstream_transfer *t, struct upstream_timing *out) {
  if (is_lean(t)) {
    lean_get_timing((const struct lean_transfer *)t, out);
    return;
  }
  memset(out, 0, sizeof *out);
  if (!t) return;
  uint64_t end_us = t->done_us ? t->done_us : monotonic_us();
  if (t->connected_us) out->connect_us = t->connected_us - t->start_us;
  if (t->first_byte_us) out->first_byte_us = t->first_byte_us - t->start_us;
  out->total_us = end_us - t->start_us;
}
