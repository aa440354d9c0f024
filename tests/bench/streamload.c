/* streamload.c: many concurrent SSE chat streams against one HTTP/1.1 server,
 * for the 10k-stream benchmark (tests/bench/streams10k.sh compiles it into
 * its temp dir; it is not part of the CMake build).
 *
 * It opens --streams N connections to --host:--port, --rate new ones per
 * second (a ramp), and on each sends one streaming chat request (the bytes
 * streams.py sends; --prompt-bytes pads the prompt with that many spaces)
 * with X-Mock-Chunks / X-Mock-Chunk-Interval-Ms, so that
 * mockllm behind the proxy answers CHUNKS events INTERVAL_MS apart. It reads
 * each answer (head, then a chunked or a plain body), splits the decoded body
 * into SSE lines and, for every line carrying "mock_sent_at_ms":<n>, records
 * the chunk delivery delay: the wall clock at the read (ms, fractional) minus
 * n. A stream is ok when its status is 200 and "data: [DONE]" arrives. One
 * epoll loop, level-triggered, one thread. It prints one line:
 *   STREAMLOAD streams=N ok=.. failed=.. (connect=.. status=.. closed=..
 *              deadline=..) events=.. p50_ms=.. p99_ms=.. max_ms=..
 *              ramp_s=.. all_open_s=.. peak_open=.. elapsed_s=..
 *              steady_events=.. steady_p50_ms=.. steady_p99_ms=..
 * all_open_s: seconds from the start until every stream that did not fail
 * early had its first event (all N were open together once peak_open = N);
 * steady_*: the delays from then until the first stream ended (no ramp,
 * no teardown).
 *
 * Failure modes: RLIMIT_NOFILE is raised to its hard limit and the run exits
 * 1 up front when N connections cannot fit; a connect that fails, a status
 * other than 200, a connection closed before [DONE] or an unparseable head
 * counts that stream as failed (by reason) and the run goes on. The run is
 * bounded: it ends by itself at --deadline seconds (default: ramp time +
 * chunks x interval + 30 s), and the streams still open then count as failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* An SSE line longer than this keeps its first 6 bytes ("data: ") and its
 * last LINE_TAIL_BYTES (where mockllm puts "mock_sent_at_ms"). */
#define LINE_MAX_BYTES 2048
#define LINE_TAIL_BYTES 256
#define HEAD_MAX_BYTES 4096

enum state { S_CONNECTING, S_HEAD, S_BODY, S_DONE, S_FAILED };
enum body_mode { B_PLAIN, B_CHUNKED };
enum chunk_state { C_SIZE, C_EXT, C_DATA, C_DATA_CR, C_END };
enum fail_reason { F_CONNECT, F_STATUS, F_CLOSED, F_DEADLINE, F_COUNT };

struct stream {
  int fd;
  uint8_t state, mode, cstate;
  uint8_t got_event;
  uint64_t chunk_left; /* bytes left in the current chunk */
  uint16_t line_len;
  uint16_t head_len;
  uint32_t sent; /* request bytes written so far */
  char *line;    /* LINE_MAX_BYTES, or the head while in S_HEAD */
};

static double wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return x < y ? -1 : x > y;
}

static float pct(const float *sorted, size_t n, double p) {
  if (n == 0) return 0;
  size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
  return sorted[i < n ? i : n - 1];
}

/* results; steady: the delays while every stream was open (after the ramp,
 * before the first stream ended) */
static float *delays, *steady;
static size_t ndelays, delays_cap, nsteady, steady_cap;
static long failed[F_COUNT], ok_count, open_now, peak_open, first_events;
static double t_start, t_all_open = -1;

static void push(float **a, size_t *n, size_t *cap, double d) {
  if (*n == *cap) {
    *cap = *cap ? *cap * 2 : 65536;
    *a = realloc(*a, *cap * sizeof(**a));
    if (!*a) {
      fprintf(stderr, "streamload: out of memory\n");
      exit(1);
    }
  }
  (*a)[(*n)++] = (float)d;
}

static void add_delay(double d) {
  push(&delays, &ndelays, &delays_cap, d);
  if (t_all_open >= 0 && ok_count == 0) push(&steady, &nsteady, &steady_cap, d);
}

static void finish(int ep, struct stream *s, int reason) {
  if (s->state == S_DONE || s->state == S_FAILED) return;
  if (s->state == S_HEAD || s->state == S_BODY) open_now--;
  if (reason < 0) {
    s->state = S_DONE;
    ok_count++;
  } else {
    s->state = S_FAILED;
    failed[reason]++;
  }
  epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
  close(s->fd);
  s->fd = -1;
  free(s->line);
  s->line = NULL;
}

static const char PATTERN[] = "\"mock_sent_at_ms\":";

/* One complete SSE line (without its newline). Returns 1 on "data: [DONE]". */
static int sse_line(struct stream *s, const char *line, size_t len, double now) {
  if (len < 6 || memcmp(line, "data: ", 6) != 0) return 0;
  if (len >= 12 && memcmp(line + 6, "[DONE]", 6) == 0) return 1;
  const char *p = memmem(line, len, PATTERN, sizeof(PATTERN) - 1);
  if (!p) return 0;
  p += sizeof(PATTERN) - 1;
  long long sent = 0;
  int digits = 0;
  while (p < line + len && *p >= '0' && *p <= '9') {
    sent = sent * 10 + (*p++ - '0');
    digits++;
  }
  if (!digits) return 0;
  add_delay(now - (double)sent);
  if (!s->got_event) {
    s->got_event = 1;
    first_events++;
  }
  return 0;
}

/* Decoded body bytes: split into lines. Returns 1 when [DONE] was seen. */
static int body_bytes(struct stream *s, const char *p, size_t n, double now) {
  int done = 0;
  while (n > 0) {
    const char *nl = memchr(p, '\n', n);
    size_t take = nl ? (size_t)(nl - p) : n;
    for (size_t at = 0; at < take;) {
      if (s->line_len == LINE_MAX_BYTES) { /* a long line: keep its start and its tail */
        memmove(s->line + 6, s->line + LINE_MAX_BYTES - LINE_TAIL_BYTES, LINE_TAIL_BYTES);
        s->line_len = 6 + LINE_TAIL_BYTES;
      }
      size_t room = LINE_MAX_BYTES - s->line_len;
      size_t piece = take - at < room ? take - at : room;
      memcpy(s->line + s->line_len, p + at, piece);
      s->line_len += (uint16_t)piece;
      at += piece;
    }
    if (!nl) break;
    size_t len = s->line_len;
    if (len && s->line[len - 1] == '\r') len--;
    done |= sse_line(s, s->line, len, now);
    s->line_len = 0;
    p = nl + 1;
    n -= take + 1;
  }
  return done;
}

/* Raw bytes after the head: undo the chunked framing. Returns 1 at [DONE]. */
static int raw_body(struct stream *s, const char *p, size_t n, double now) {
  if (s->mode == B_PLAIN) return body_bytes(s, p, n, now);
  int done = 0;
  while (n > 0) {
    switch (s->cstate) {
    case C_SIZE: {
      char c = *p++;
      n--;
      int v = (c >= '0' && c <= '9')   ? c - '0'
              : (c >= 'a' && c <= 'f') ? c - 'a' + 10
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                       : -1;
      if (v >= 0)
        s->chunk_left = s->chunk_left * 16 + (uint64_t)v;
      else
        s->cstate = C_EXT;
      if (c == '\n') s->cstate = s->chunk_left ? C_DATA : C_END;
      break;
    }
    case C_EXT:
      if (*p == '\n') s->cstate = s->chunk_left ? C_DATA : C_END;
      p++;
      n--;
      break;
    case C_DATA: {
      size_t take = n < s->chunk_left ? n : (size_t)s->chunk_left;
      done |= body_bytes(s, p, take, now);
      p += take;
      n -= take;
      s->chunk_left -= take;
      if (!s->chunk_left) s->cstate = C_DATA_CR;
      break;
    }
    case C_DATA_CR:
      if (*p == '\n') s->cstate = C_SIZE;
      p++;
      n--;
      break;
    case C_END:
      return done;
    }
  }
  return done;
}

/* Bytes of the response head; moves to the body when the head is whole.
 * Returns -1: bad head or status (failed), 0: more needed, 1: [DONE] seen. */
static int head_bytes(struct stream *s, const char *p, size_t n, double now, int *status_fail) {
  size_t room = HEAD_MAX_BYTES - 1 - s->head_len;
  size_t take = n < room ? n : room;
  memcpy(s->line + s->head_len, p, take);
  s->head_len += (uint16_t)take;
  s->line[s->head_len] = '\0';
  char *end = strstr(s->line, "\r\n\r\n");
  if (!end) return s->head_len >= HEAD_MAX_BYTES - 1 ? -1 : 0;
  size_t head_len = (size_t)(end - s->line) + 4;
  if (strncmp(s->line, "HTTP/1.", 7) != 0 || atoi(s->line + 9) != 200) {
    *status_fail = 1;
    return -1;
  }
  s->mode = B_PLAIN;
  for (char *line = strstr(s->line, "\r\n") + 2; line < end; line = strstr(line, "\r\n") + 2)
    if (strncasecmp(line, "transfer-encoding:", 18) == 0 &&
        memmem(line, (size_t)(strstr(line, "\r\n") - line), "chunked", 7))
      s->mode = B_CHUNKED;
  /* the rest of this read (past the head) is body */
  size_t body_in_buf = s->head_len - head_len;
  size_t consumed_from_p = take - body_in_buf;
  s->state = S_BODY;
  s->cstate = C_SIZE;
  s->chunk_left = 0;
  s->line_len = 0;
  return raw_body(s, p + consumed_from_p, n - consumed_from_p, now) ? 1 : 0;
}

static void usage(void) {
  fprintf(stderr,
          "usage: streamload --port PORT [--host 127.0.0.1] [--streams 10000] [--chunks 60]\n"
          "                  [--interval-ms 500] [--rate 2000 (new connections/s)]\n"
          "                  [--deadline S (default: N/rate + chunks*interval + 30)]\n"
          "                  [--prompt-bytes 0 (spaces added to the prompt)]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1";
  int port = 0;
  long n = 10000, chunks = 60, interval_ms = 500, prompt_bytes = 0;
  double rate = 2000, deadline = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--host"))
      host = argv[i + 1];
    else if (!strcmp(argv[i], "--port"))
      port = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--streams"))
      n = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--chunks"))
      chunks = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--interval-ms"))
      interval_ms = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--rate"))
      rate = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--deadline"))
      deadline = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--prompt-bytes"))
      prompt_bytes = atol(argv[i + 1]);
    else
      usage();
  }
  if (port <= 0 || n < 1 || chunks < 1 || interval_ms < 0 || rate <= 0 || deadline < 0 ||
      prompt_bytes < 0 || prompt_bytes > 16 * 1024 * 1024)
    usage();
  if (deadline == 0) deadline = (double)n / rate + (double)(chunks * interval_ms) / 1e3 + 30;

  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < (rlim_t)n + 16) {
    fprintf(stderr,
            "streamload: RLIMIT_NOFILE %llu is too low for %ld streams (raise ulimit -Hn)\n",
            (unsigned long long)rl.rlim_cur, n);
    return 1;
  }

  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
    fprintf(stderr, "streamload: bad IPv4 host %s\n", host);
    return 2;
  }
  /* streams.py's body; --prompt-bytes pads the message (a long prompt) */
  size_t body_cap = (size_t)prompt_bytes + 256;
  char *body = malloc(body_cap);
  char *request = malloc(body_cap + 512);
  if (!body || !request) {
    fprintf(stderr, "streamload: out of memory\n");
    return 1;
  }
  int body_len = snprintf(body, body_cap,
                          "{\"model\": \"mock-gpt\", \"stream\": true, \"messages\": [{\"role\": "
                          "\"user\", \"content\": \"stream please%*s\"}]}",
                          (int)prompt_bytes, "");
  int request_len = snprintf(request, body_cap + 512,
                             "POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n"
                             "Content-Type: application/json\r\nContent-Length: %d\r\n"
                             "X-Mock-Chunks: %ld\r\nX-Mock-Chunk-Interval-Ms: %ld\r\n\r\n%s",
                             host, port, body_len, chunks, interval_ms, body);

  struct stream *streams = calloc((size_t)n, sizeof(*streams));
  if (!streams) {
    fprintf(stderr, "streamload: out of memory\n");
    return 1;
  }
  int ep = epoll_create1(0);
  static char buf[65536];
  long opened = 0;
  t_start = mono_s();
  double t_ramp = -1;
  long early_failed = 0; /* failed before their first event: not waited for in all_open_s */

  for (;;) {
    double t = mono_s() - t_start;
    /* ramp: open the connections due by now (at most 256 per pass, so reads keep up) */
    long due = (long)(t * rate) + 1;
    if (due > n) due = n;
    for (int k = 0; opened < due && k < 256; k++, opened++) {
      struct stream *s = &streams[opened];
      s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      if (s->fd < 0) {
        s->state = S_FAILED;
        failed[F_CONNECT]++;
        early_failed++;
        continue;
      }
      int one = 1;
      setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      s->state = S_CONNECTING;
      if (connect(s->fd, (const struct sockaddr *)&addr, sizeof(addr)) != 0 &&
          errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        s->state = S_FAILED;
        failed[F_CONNECT]++;
        early_failed++;
        continue;
      }
      struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)opened};
      epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    }
    if (opened == n && t_ramp < 0) t_ramp = t;
    if (t_all_open < 0 && opened == n && first_events + early_failed >= n) t_all_open = t;
    if (ok_count + failed[F_CONNECT] + failed[F_STATUS] + failed[F_CLOSED] == n) break;
    if (t > deadline) {
      for (long i = 0; i < opened; i++) {
        if (streams[i].state == S_CONNECTING || streams[i].state == S_HEAD ||
            streams[i].state == S_BODY)
          finish(ep, &streams[i], F_DEADLINE);
      }
      break;
    }

    struct epoll_event events[256];
    int ne = epoll_wait(ep, events, 256, opened < n ? 2 : 100);
    for (int e = 0; e < ne; e++) {
      struct stream *s = &streams[events[e].data.u32];
      if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (s->sent == 0) getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        int bad = err || (events[e].events & (EPOLLERR | EPOLLHUP));
        ssize_t w = bad ? -1 : write(s->fd, request + s->sent, (size_t)request_len - s->sent);
        if (!bad && w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (w <= 0) {
          finish(ep, s, F_CONNECT);
          early_failed++;
          continue;
        }
        s->sent += (uint32_t)w;
        if (s->sent < (uint32_t)request_len) continue; /* a long prompt: more on EPOLLOUT */
        s->line = malloc(HEAD_MAX_BYTES > LINE_MAX_BYTES ? HEAD_MAX_BYTES : LINE_MAX_BYTES);
        if (!s->line) {
          fprintf(stderr, "streamload: out of memory\n");
          return 1;
        }
        s->state = S_HEAD;
        s->head_len = 0;
        if (++open_now > peak_open) peak_open = open_now;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = events[e].data.u32};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        continue;
      }
      if (s->state != S_HEAD && s->state != S_BODY) continue;
      ssize_t r = read(s->fd, buf, sizeof(buf));
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (r <= 0) {
        if (!s->got_event) early_failed++;
        finish(ep, s, F_CLOSED);
        continue;
      }
      double now = wall_ms();
      int rc;
      if (s->state == S_HEAD) {
        int status_fail = 0;
        rc = head_bytes(s, buf, (size_t)r, now, &status_fail);
        if (rc < 0) {
          early_failed++;
          finish(ep, s, status_fail ? F_STATUS : F_CLOSED);
          continue;
        }
      } else {
        rc = raw_body(s, buf, (size_t)r, now);
      }
      if (rc == 1) finish(ep, s, -1);
    }
  }
  double elapsed = mono_s() - t_start;
  qsort(delays, ndelays, sizeof(*delays), cmp_float);
  qsort(steady, nsteady, sizeof(*steady), cmp_float);
  long nfailed = 0;
  for (int i = 0; i < F_COUNT; i++) nfailed += failed[i];
  printf(
      "STREAMLOAD streams=%ld ok=%ld failed=%ld (connect=%ld status=%ld closed=%ld deadline=%ld) "
      "events=%zu p50_ms=%.2f p99_ms=%.2f max_ms=%.2f ramp_s=%.2f all_open_s=%.2f "
      "peak_open=%ld elapsed_s=%.2f steady_events=%zu steady_p50_ms=%.2f steady_p99_ms=%.2f\n",
      n, ok_count, nfailed, failed[F_CONNECT], failed[F_STATUS], failed[F_CLOSED],
      failed[F_DEADLINE], ndelays, pct(delays, ndelays, 50), pct(delays, ndelays, 99),
      ndelays ? delays[ndelays - 1] : 0.0f, t_ramp, t_all_open, peak_open, elapsed, nsteady,
      pct(steady, nsteady, 50), pct(steady, nsteady, 99));
  return 0;
}
