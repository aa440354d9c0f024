/* pacedload.c: an open-loop, fixed-rate HTTP/1.1 load generator for the
 * zonegate benchmark (wrk2 is not available). tests/bench/run.sh compiles
 * it into its temp dir; it is not part of the CMake build.
 *
 * It sends POST requests at exactly --rate requests/s (request i is due at
 * start + i/rate) over a pool of keep-alive connections, one request in
 * flight per connection. A request that is due while every connection is
 * busy waits in a backlog, and its latency still counts from the time it
 * was due (no coordinated omission). It prints one line:
 *   PACED rate=... sent=... ok=... errors=... p50_us=... p90_us=... p99_us=...
 *         max_us=... svc_p50_us=... (svc_*: from the write, not from the due time)
 * Requests due during --warmup seconds are sent but not measured.
 *
 * Stream mode (--stream): the body asks for an SSE stream (the caller's
 * file says "stream": true) and the answer is read to its end as before,
 * but each request's time to first token (TTFT) is also taken: from the
 * time it was due to the read that brings the first body byte of an SSE
 * "data:" line (the head alone does not count). The line then also has
 *   ttft_p50_us=... ttft_p90_us=... ttft_p99_us=... ttft_max_us=...
 *   no_data=... (answers that ended without a "data:" line)
 * --header "Name: value" (repeatable) adds a request header line, e.g.
 * mockllm's X-Mock-Chunks / X-Mock-Chunk-Interval-Ms.
 *
 * Failure modes: a failed connect exits 1 with the reason on stderr; a
 * connection the server closes counts its request as an error and is
 * re-opened; the run ends at the latest 5 s after the last request was due.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256
#define RESP_BUF 65536
#define MAX_HEADERS 16

struct conn {
  int fd;
  int busy;
  int64_t seq;      /* request in flight */
  uint64_t due_ns;  /* when it was due */
  uint64_t sent_ns; /* when it was written */
  size_t len;
  size_t skipped;   /* body bytes already dropped from buf (a large answer) */
  uint64_t ttft_ns; /* stream mode: when the first "data:" byte was read; 0 = not yet */
  char buf[RESP_BUF];
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static uint64_t pct(const uint64_t *sorted, size_t n, double p) {
  if (n == 0) return 0;
  size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
  return sorted[i < n ? i : n - 1];
}

static int open_conn(const struct sockaddr_in *addr, char *errmsg, size_t errlen) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) {
    snprintf(errmsg, errlen, "socket(): %s", strerror(errno));
    return -1;
  }
  if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0) {
    snprintf(errmsg, errlen, "connect(): %s", strerror(errno));
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

/* Returns 1 when buf holds one complete response (sets *status), 0 when
 * more bytes are needed, -1 when it cannot be parsed. */
static int response_complete(const char *buf, size_t len, size_t skipped, int *status,
                             size_t *head_out) {
  const char *end = memmem(buf, len, "\r\n\r\n", 4);
  if (!end) return 0;
  size_t head_len = (size_t)(end - buf) + 4;
  *head_out = head_len;
  if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0) return -1;
  *status = atoi(buf + 9);
  long content_length = -1;
  int chunked = 0;
  for (const char *line = strstr(buf, "\r\n") + 2; line < end; line = strstr(line, "\r\n") + 2) {
    if (strncasecmp(line, "content-length:", 15) == 0) content_length = atol(line + 15);
    if (strncasecmp(line, "transfer-encoding:", 18) == 0 &&
        memmem(line, (size_t)(strstr(line, "\r\n") - line), "chunked", 7))
      chunked = 1;
  }
  /* A chunked answer (zonegate passes a large one through as it arrives)
   * ends with the last chunk; its end is in the bytes kept when skipping. */
  if (chunked) return len >= 5 && memcmp(buf + len - 5, "0\r\n\r\n", 5) == 0;
  if (content_length < 0) return -1;
  return len + skipped >= head_len + (size_t)content_length;
}

static int write_all(int fd, const char *data, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, data, len);
    if (n > 0) {
      data += n;
      len -= (size_t)n;
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      struct pollfd p = {.fd = fd, .events = POLLOUT};
      poll(&p, 1, 1000);
    } else {
      return -1;
    }
  }
  return 0;
}

static void usage(void) {
  fprintf(
      stderr,
      "usage: pacedload --port PORT --body FILE [--host 127.0.0.1] [--path /v1/chat/completions]\n"
      "                 [--rate 2000] [--duration 10] [--warmup 2] [--connections 16]\n"
      "                 [--stream] [--header 'Name: value']...\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *path = "/v1/chat/completions", *body_file = NULL;
  int port = 0, nconns = 16, stream = 0, nheaders = 0;
  const char *headers[MAX_HEADERS];
  double rate = 2000, duration = 10, warmup = 2;
  for (int i = 1; i < argc; i += 2) {
    if (!strcmp(argv[i], "--stream")) {
      stream = 1;
      i--; /* a flag: no value */
      continue;
    }
    if (i + 1 >= argc) usage();
    if (!strcmp(argv[i], "--header")) {
      if (nheaders == MAX_HEADERS) usage();
      headers[nheaders++] = argv[i + 1];
    } else if (!strcmp(argv[i], "--host"))
      host = argv[i + 1];
    else if (!strcmp(argv[i], "--port"))
      port = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--path"))
      path = argv[i + 1];
    else if (!strcmp(argv[i], "--body"))
      body_file = argv[i + 1];
    else if (!strcmp(argv[i], "--rate"))
      rate = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--duration"))
      duration = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--warmup"))
      warmup = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--connections"))
      nconns = atoi(argv[i + 1]);
    else
      usage();
  }
  if (port <= 0 || !body_file || rate <= 0 || duration <= 0 || warmup < 0 || nconns < 1 ||
      nconns > MAX_CONNS)
    usage();

  /* The body may be large (the big-prompt runs send 2 MB): read it whole. */
  FILE *f = fopen(body_file, "rb");
  if (!f) {
    fprintf(stderr, "pacedload: fopen(%s): %s\n", body_file, strerror(errno));
    return 1;
  }
  fseek(f, 0, SEEK_END);
  long file_len = ftell(f);
  fseek(f, 0, SEEK_SET);
  size_t body_len = file_len > 0 ? (size_t)file_len : 0;
  size_t extra_len = 0;
  for (int i = 0; i < nheaders; i++) extra_len += strlen(headers[i]) + 2;
  size_t request_cap = body_len + extra_len + 512;
  char *request = malloc(request_cap);
  if (!request) {
    fprintf(stderr, "pacedload: out of memory\n");
    return 1;
  }
  int head_len = snprintf(request, request_cap,
                          "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          "Content-Length: %zu\r\n",
                          path, host, port, body_len);
  for (int i = 0; i < nheaders; i++)
    head_len += snprintf(request + head_len, request_cap - (size_t)head_len, "%s\r\n", headers[i]);
  head_len += snprintf(request + head_len, request_cap - (size_t)head_len, "\r\n");
  if (fread(request + head_len, 1, body_len, f) != body_len) {
    fprintf(stderr, "pacedload: short read of %s\n", body_file);
    return 1;
  }
  fclose(f);
  int request_len = head_len + (int)body_len;

  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
    fprintf(stderr, "pacedload: bad IPv4 host %s\n", host);
    return 2;
  }
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* timer wake-ups within ~µs */

  int ep = epoll_create1(0);
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
  struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
  epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);

  static struct conn conns[MAX_CONNS];
  char errmsg[256];
  for (int i = 0; i < nconns; i++) {
    conns[i].fd = open_conn(&addr, errmsg, sizeof(errmsg));
    if (conns[i].fd < 0) {
      fprintf(stderr, "pacedload: %s:%d: %s\n", host, port, errmsg);
      return 1;
    }
    ev = (struct epoll_event){.events = EPOLLIN, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
  }

  const int64_t total = (int64_t)(rate * (warmup + duration));
  const int64_t first_measured = (int64_t)(rate * warmup);
  const double period_ns = 1e9 / rate;
  uint64_t *lat = calloc((size_t)total + 1, sizeof(uint64_t));
  uint64_t *svc = calloc((size_t)total + 1, sizeof(uint64_t));
  uint64_t *ttft = calloc((size_t)total + 1, sizeof(uint64_t));
  size_t nlat = 0, nttft = 0;
  int64_t next_seq = 0, backlog = 0, sent = 0, ok = 0, errors = 0, not_ok_status = 0, no_data = 0;
  size_t max_backlog = 0;

  const uint64_t start = now_ns() + 10000000ull; /* 10 ms from now */
#define DUE(seq) (start + (uint64_t)((double)(seq)*period_ns))
  const uint64_t hard_end = DUE(total) + 5000000000ull;

  for (;;) {
    uint64_t now = now_ns();
    while (next_seq < total && DUE(next_seq) <= now) {
      next_seq++;
      backlog++;
    }
    if ((size_t)backlog > max_backlog) max_backlog = (size_t)backlog;
    for (int i = 0; i < nconns && backlog > 0; i++) {
      struct conn *c = &conns[i];
      if (c->busy) continue;
      c->seq = next_seq - backlog;
      c->due_ns = DUE(c->seq);
      c->sent_ns = now_ns();
      c->len = 0;
      c->skipped = 0;
      c->ttft_ns = 0;
      c->busy = 1;
      backlog--;
      sent++;
      if (write_all(c->fd, request, (size_t)request_len) != 0) {
        errors++;
        c->busy = 0;
        close(c->fd);
        c->fd = open_conn(&addr, errmsg, sizeof(errmsg));
        if (c->fd < 0) {
          fprintf(stderr, "pacedload: reconnect: %s\n", errmsg);
          return 1;
        }
        ev = (struct epoll_event){.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
      }
    }
    int busy = 0;
    for (int i = 0; i < nconns; i++) busy += conns[i].busy;
    if (next_seq >= total && backlog == 0 && busy == 0) break;
    if (now > hard_end) {
      errors += busy + backlog;
      break;
    }
    if (next_seq < total) {
      uint64_t due = DUE(next_seq);
      struct itimerspec its = {.it_value = {.tv_sec = (time_t)(due / 1000000000ull),
                                            .tv_nsec = (long)(due % 1000000000ull)}};
      timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    }
    struct epoll_event events[64];
    int n = epoll_wait(ep, events, 64, 100);
    for (int e = 0; e < n; e++) {
      uint32_t id = events[e].data.u32;
      if (id == UINT32_MAX) {
        uint64_t expirations;
        ssize_t r = read(tfd, &expirations, sizeof(expirations));
        (void)r;
        continue;
      }
      struct conn *c = &conns[id];
      ssize_t r = read(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      int status = 0, done = 0;
      if (r > 0) {
        c->len += (size_t)r;
        c->buf[c->len] = '\0';
        size_t head_len = 0;
        done = response_complete(c->buf, c->len, c->skipped, &status, &head_len);
        /* the first SSE data line's first byte: in the body, after a chunk
         * size line or a previous line's end (not a header named data) */
        if (stream && c->busy && !c->ttft_ns && head_len && c->len > head_len &&
            memmem(c->buf + head_len, c->len - head_len, "data:", 5))
          c->ttft_ns = now_ns();
        if (done == 0 && c->len == sizeof(c->buf) - 1 && head_len) {
          /* a large answer: keep its head and the last 4 body bytes (the
           * end of a chunked body may span two reads), drop (count) the
           * rest of what was read so far */
          size_t keep = c->len - head_len < 4 ? c->len - head_len : 4;
          c->skipped += c->len - head_len - keep;
          memmove(c->buf + head_len, c->buf + c->len - keep, keep);
          c->len = head_len + keep;
          c->buf[c->len] = '\0';
          continue;
        }
        if (done == 0 && c->len < sizeof(c->buf) - 1) continue;
      }
      uint64_t t = now_ns();
      if (done == 1 && c->busy) {
        if (status >= 200 && status < 300)
          ok++;
        else
          not_ok_status++;
        if (c->seq >= first_measured) {
          lat[nlat] = t - c->due_ns;
          svc[nlat] = t - c->sent_ns;
          nlat++;
          if (stream && c->ttft_ns)
            ttft[nttft++] = c->ttft_ns - c->due_ns;
          else if (stream)
            no_data++;
        }
        c->busy = 0;
        c->len = 0;
        c->skipped = 0;
        continue;
      }
      /* closed, unparseable or oversized: count an error, reconnect */
      if (c->busy) errors++;
      c->busy = 0;
      epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
      close(c->fd);
      c->fd = open_conn(&addr, errmsg, sizeof(errmsg));
      if (c->fd < 0) {
        fprintf(stderr, "pacedload: reconnect: %s\n", errmsg);
        return 1;
      }
      ev = (struct epoll_event){.events = EPOLLIN, .data.u32 = id};
      epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
  }
  double elapsed_s = (double)(now_ns() - start) / 1e9;
  qsort(lat, nlat, sizeof(uint64_t), cmp_u64);
  qsort(svc, nlat, sizeof(uint64_t), cmp_u64);
  printf("PACED rate=%.0f achieved_rps=%.1f sent=%lld ok=%lld non2xx=%lld errors=%lld measured=%zu "
         "max_backlog=%zu "
         "p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f svc_p50_us=%.1f svc_p99_us=%.1f",
         rate, (double)sent / elapsed_s, (long long)sent, (long long)ok, (long long)not_ok_status,
         (long long)errors, nlat, max_backlog, pct(lat, nlat, 50) / 1e3, pct(lat, nlat, 90) / 1e3,
         pct(lat, nlat, 99) / 1e3, nlat ? lat[nlat - 1] / 1e3 : 0.0, pct(svc, nlat, 50) / 1e3,
         pct(svc, nlat, 99) / 1e3);
  if (stream) {
    qsort(ttft, nttft, sizeof(uint64_t), cmp_u64);
    printf(" ttft_p50_us=%.1f ttft_p90_us=%.1f ttft_p99_us=%.1f ttft_max_us=%.1f no_data=%lld",
           pct(ttft, nttft, 50) / 1e3, pct(ttft, nttft, 90) / 1e3, pct(ttft, nttft, 99) / 1e3,
           nttft ? ttft[nttft - 1] / 1e3 : 0.0, (long long)no_data);
  }
  printf("\n");
  free(lat);
  free(svc);
  free(ttft);
  return 0;
}
