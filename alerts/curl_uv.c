/* curl_uv.c: libcurl multi on the uv loop for alert deliveries (see
 * alerts/internal.h), after curl's docs/examples/multi-uv.c.
 *
 * Happy path: add → curl asks for a timeout (uv timer) and announces its
 * sockets (uv_poll each) → readiness or the timer calls
 * curl_multi_socket_action → finished transfers are read with
 * curl_multi_info_read and handed to their done callback.
 *
 * Failure modes: a socket that cannot be polled is reported to curl as an
 * error (CURL_CSELECT_ERR) so its transfer fails instead of hanging; every
 * transfer is bounded by the timeouts its owner set on the easy handle.
 */
#include "alerts/internal.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct sock_ctx {
  uv_poll_t poll;
  curl_socket_t fd;
  struct alerts_curl *m;
  struct sock_ctx *prev, *next;
};

struct transfer {
  void (*done)(void *ud, CURL *easy, CURLcode result);
  void *ud;
  struct alerts_curl *m;
  CURL *easy;
};

#define MAX_TRACKED_SOCKETS 128

struct alerts_curl {
  uv_loop_t *loop;
  /* Every socket curl opened for a transfer of ours, and that transfer's
   * easy handle (to shut a cancelled transfer's sockets down). */
  struct {
    curl_socket_t fd;
    CURL *easy;
  } tracked[MAX_TRACKED_SOCKETS];
  CURLM *multi;
  uv_timer_t timer;
  struct sock_ctx *socks;
  size_t running;
  unsigned open_handles; /* timer + polls not yet closed */
  bool closing;
  void (*closed)(void *arg);
  void *closed_arg;
};

static void maybe_closed(struct alerts_curl *m) {
  if (!m->closing || m->open_handles > 0) return;
  void (*closed)(void *) = m->closed;
  void *arg = m->closed_arg;
  free(m);
  if (closed) closed(arg);
}

static void on_sock_closed(uv_handle_t *h) {
  struct sock_ctx *s = h->data;
  struct alerts_curl *m = s->m;
  free(s);
  m->open_handles--;
  maybe_closed(m);
}

static void sock_close(struct sock_ctx *s) {
  struct alerts_curl *m = s->m;
  if (s->prev)
    s->prev->next = s->next;
  else
    m->socks = s->next;
  if (s->next) s->next->prev = s->prev;
  uv_poll_stop(&s->poll);
  uv_close((uv_handle_t *)&s->poll, on_sock_closed);
}

static void drain_finished(struct alerts_curl *m) {
  CURLMsg *msg;
  int left;
  while ((msg = curl_multi_info_read(m->multi, &left)) != NULL) {
    if (msg->msg != CURLMSG_DONE) continue;
    CURL *easy = msg->easy_handle;
    CURLcode result = msg->data.result;
    struct transfer *t = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&t);
    curl_multi_remove_handle(m->multi, easy);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    m->running--;
    for (size_t i = 0; i < MAX_TRACKED_SOCKETS; i++)
      if (m->tracked[i].easy == easy) m->tracked[i].easy = NULL; /* kept by curl's cache */
    if (t) {
      void (*done)(void *, CURL *, CURLcode) = t->done;
      void *ud = t->ud;
      free(t);
      done(ud, easy, result);
    }
  }
}

static void socket_action(struct alerts_curl *m, curl_socket_t fd, int flags) {
  int still = 0;
  curl_multi_socket_action(m->multi, fd, flags, &still);
  drain_finished(m);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  struct sock_ctx *s = p->data;
  int flags = 0;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  socket_action(s->m, s->fd, flags);
}

static void on_timer(uv_timer_t *t) {
  socket_action(t->data, CURL_SOCKET_TIMEOUT, 0);
}

/* CURLMOPT_TIMERFUNCTION: never acts itself, only arms the uv timer. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
  struct alerts_curl *m = userp;
  if (m->closing) return 0;
  if (timeout_ms < 0)
    uv_timer_stop(&m->timer);
  else
    uv_timer_start(&m->timer, on_timer, (uint64_t)timeout_ms, 0);
  return 0;
}

/* CURLMOPT_SOCKETFUNCTION. A REMOVE for a socket never announced is fine. */
static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
  struct alerts_curl *m = userp;
  struct sock_ctx *s = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (s) {
      curl_multi_assign(m->multi, fd, NULL);
      sock_close(s);
    }
    return 0;
  }
  if (!s) {
    s = calloc(1, sizeof(*s));
    if (!s) return -1;
    if (uv_poll_init_socket(m->loop, &s->poll, fd) != 0) {
      free(s);
      return -1;
    }
    s->fd = fd;
    s->m = m;
    s->poll.data = s;
    s->next = m->socks;
    if (m->socks) m->socks->prev = s;
    m->socks = s;
    m->open_handles++;
    curl_multi_assign(m->multi, fd, s);
  }
  int events = 0;
  if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) events |= UV_READABLE;
  if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) events |= UV_WRITABLE;
  uv_poll_start(&s->poll, events, on_poll);
  return 0;
}

/* CURLOPT_SOCKOPTFUNCTION: a new socket for transfer `clientp`. */
static int on_sockopt(void *clientp, curl_socket_t fd, curlsocktype purpose) {
  struct transfer *t = clientp;
  for (size_t i = 0; i < MAX_TRACKED_SOCKETS; i++)
    if (t->m->tracked[i].easy == NULL) {
      t->m->tracked[i].fd = fd;
      t->m->tracked[i].easy = t->easy;
      break;
    }
  return CURL_SOCKOPT_OK;
}

/* CURLOPT_CLOSESOCKETFUNCTION: forget the socket, then close it. */
static int on_closesocket(void *clientp, curl_socket_t fd) {
  struct alerts_curl *m = clientp;
  for (size_t i = 0; i < MAX_TRACKED_SOCKETS; i++)
    if (m->tracked[i].easy && m->tracked[i].fd == fd) m->tracked[i].easy = NULL;
  return close(fd);
}

int alerts_curl_create(uv_loop_t *loop, struct alerts_curl **out, char *errmsg, size_t errlen) {
  struct alerts_curl *m = calloc(1, sizeof(*m));
  if (!m) {
    snprintf(errmsg, errlen, "alerts: out of memory");
    return -1;
  }
  m->loop = loop;
  m->multi = curl_multi_init();
  if (!m->multi) {
    snprintf(errmsg, errlen, "alerts: curl_multi_init() failed");
    free(m);
    return -1;
  }
  curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m);
  curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, m);
  uv_timer_init(loop, &m->timer);
  m->timer.data = m;
  m->open_handles = 1;
  *out = m;
  return 0;
}

int alerts_curl_add(struct alerts_curl *m, CURL *easy,
                    void (*done)(void *ud, CURL *easy, CURLcode result), void *ud) {
  if (m->closing) return -1;
  struct transfer *t = calloc(1, sizeof(*t));
  if (!t) return -1;
  t->done = done;
  t->ud = ud;
  t->m = m;
  t->easy = easy;
  curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *)t);
  curl_easy_setopt(easy, CURLOPT_SOCKOPTFUNCTION, on_sockopt);
  curl_easy_setopt(easy, CURLOPT_SOCKOPTDATA, t);
  curl_easy_setopt(easy, CURLOPT_CLOSESOCKETFUNCTION, on_closesocket);
  curl_easy_setopt(easy, CURLOPT_CLOSESOCKETDATA, m);
  if (curl_multi_add_handle(m->multi, easy) != CURLM_OK) {
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    free(t);
    return -1;
  }
  m->running++;
  return 0;
}

void alerts_curl_remove(struct alerts_curl *m, CURL *easy) {
  struct transfer *t = NULL;
  curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&t);
  if (!t) return; /* finished already */
  /* A cancelled SMTP transfer would otherwise be closed politely: curl
   * sends QUIT and waits (blocking, on the loop) for the reply of a server
   * that may be dead. Shutting the socket down first makes that fail at
   * once. */
  for (size_t i = 0; i < MAX_TRACKED_SOCKETS; i++)
    if (m->tracked[i].easy == easy) {
      shutdown(m->tracked[i].fd, SHUT_RDWR);
      m->tracked[i].easy = NULL; /* the easy handle is about to go */
    }
  curl_multi_remove_handle(m->multi, easy);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
  free(t);
  m->running--;
}

size_t alerts_curl_running(const struct alerts_curl *m) {
  return m->running;
}

static void on_timer_closed(uv_handle_t *h) {
  struct alerts_curl *m = h->data;
  m->open_handles--;
  maybe_closed(m);
}

void alerts_curl_close(struct alerts_curl *m, void (*closed)(void *arg), void *arg) {
  m->closing = true;
  m->closed = closed;
  m->closed_arg = arg;
  curl_multi_cleanup(m->multi);
  m->multi = NULL;
  while (m->socks) sock_close(m->socks); /* any curl did not remove itself */
  uv_timer_stop(&m->timer);
  uv_close((uv_handle_t *)&m->timer, on_timer_closed);
}
