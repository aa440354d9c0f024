/* drill.c: `zonegate drill switchover|crash|freeze|isolate|external`.
 *
 * Runs a steady probe against a running cluster and injects one fault on
 * the active node, then reports what an operator needs from a failover
 * rehearsal: time to detect, to elect, the RTO seen through the load
 * balancer, client requests failed, double-active samples and
 * acknowledged writes lost.
 *
 * Probes (one libcurl multi loop, no threads): every 10 ms /health/active
 * on every gateway node (double-active samples, lease lapse, new active);
 * every 50 ms a chat request through the LB (--lb URL) with a drill token
 * created for the run and revoked after; every 100 ms an admin write
 * (POST /v1/audit note) to any reachable node. At the end, every
 * acknowledged note is looked up in the audit trail of the new leader.
 *
 * The fault goes through the drill endpoints of the active node's admin
 * API (drills.enabled) or, for `external`, a shell command (--inject) such
 * as `docker kill gw-a` (deploy/drill.sh uses that).
 *
 * Failure modes: no admin API reachable, no active node before the fault,
 * or the drill endpoints disabled: one line, exit 1. Every loop is bounded
 * by --duration.
 */
#include "base/base.h"
#include "node/cli.h"
#include "node/node.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_NODES 16
#define HEALTH_EVERY_MS 10
#define CHAT_EVERY_MS 50
#define WRITE_EVERY_MS 100

struct drill_node {
  char id[64];
  char gateway[160];
  char admin[160];
  bool witness;
  int last_status; /* last /health/active answer, 0 = no answer */
  CURL *health;    /* in flight */
  zg_buf body;
};

struct probe {
  CURL *easy;
  zg_buf body;
  char served_by[64];
  uint64_t started_ms;
  int kind; /* 0 chat, 1 write */
  int seq;
};

struct drill {
  struct cli_options o;
  const char *kind;
  char lb[300];
  char inject_cmd[512];
  unsigned duration_s, fault_ms, inject_at_ms;
  bool json;
  struct drill_node nodes[MAX_NODES];
  size_t n_nodes;
  char old_active[64];
  char client_token[128];
  char token_id[64];
  CURLM *multi;
  uint64_t t0;
  /* results */
  int64_t t_fault, t_lease_lapsed, t_new_leader, t_new_active, t_lb_new_active;
  char new_active[64];
  unsigned chats_total, chats_failed, writes_total, writes_acked, double_active_samples,
      health_samples;
  int *acked;
  size_t n_acked, cap_acked;
  unsigned last_failed_streak;
  cJSON *timeline;
  struct probe probes[64];
};

static uint64_t now_ms(void) {
  return zg_mono_ms();
}

static void event(struct drill *d, const char *what, const char *detail) {
  int64_t at = (int64_t)(now_ms() - d->t0);
  if (!d->json) printf("  +%6lld ms  %-26s %s\n", (long long)at, what, detail ? detail : "");
  fflush(stdout);
  cJSON *e = cJSON_CreateObject();
  cJSON_AddNumberToObject(e, "at_ms", (double)at);
  cJSON_AddStringToObject(e, "event", what);
  if (detail) cJSON_AddStringToObject(e, "detail", detail);
  cJSON_AddItemToArray(d->timeline, e);
}

static size_t collect(char *data, size_t size, size_t n, void *ud) {
  zg_buf_append(ud, data, size * n);
  return size * n;
}

static size_t header_cb(char *data, size_t size, size_t n, void *ud) {
  struct probe *p = ud;
  size_t len = size * n;
  if (len > 16 && !strncasecmp(data, "X-Zonegate-Node:", 16)) {
    const char *v = data + 16;
    while (*v == ' ') v++;
    size_t vlen = strcspn(v, "\r\n");
    if (vlen >= sizeof(p->served_by)) vlen = sizeof(p->served_by) - 1;
    memcpy(p->served_by, v, vlen);
    p->served_by[vlen] = '\0';
  }
  return len;
}

static CURL *easy_for(const char *url, zg_buf *body, long timeout_ms) {
  CURL *e = curl_easy_init();
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, body);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
  return e;
}

static int load_members(struct drill *d) {
  cJSON *status;
  if (cli_call(&d->o, "GET", "/v1/cluster/status", NULL, NULL, &status)) return -1;
  const cJSON *m;
  cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(status, "members")) {
    if (d->n_nodes >= MAX_NODES) break;
    struct drill_node *n = &d->nodes[d->n_nodes++];
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "id");
    const cJSON *gw = cJSON_GetObjectItemCaseSensitive(m, "gateway_address");
    const cJSON *ad = cJSON_GetObjectItemCaseSensitive(m, "admin_address");
    const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
    snprintf(n->id, sizeof(n->id), "%s", cJSON_IsString(id) ? id->valuestring : "?");
    snprintf(n->gateway, sizeof(n->gateway), "%s", cJSON_IsString(gw) ? gw->valuestring : "");
    snprintf(n->admin, sizeof(n->admin), "%s", cJSON_IsString(ad) ? ad->valuestring : "");
    n->witness = cJSON_IsString(role) && !strcmp(role->valuestring, "witness");
    zg_buf_init(&n->body);
  }
  cJSON_Delete(status);
  return d->n_nodes ? 0 : -1;
}

static struct drill_node *node_by_id(struct drill *d, const char *id) {
  for (size_t i = 0; i < d->n_nodes; i++)
    if (!strcmp(d->nodes[i].id, id)) return &d->nodes[i];
  return NULL;
}

/* Blocking probe of /health/active on each node: who is active now. */
static const char *find_active(struct drill *d) {
  static char found[64];
  found[0] = '\0';
  for (size_t i = 0; i < d->n_nodes; i++) {
    if (d->nodes[i].witness || !d->nodes[i].gateway[0]) continue;
    char url[256];
    snprintf(url, sizeof(url), "http://%s/health/active", d->nodes[i].gateway);
    zg_buf b;
    zg_buf_init(&b);
    CURL *e = easy_for(url, &b, 1000);
    long code = 0;
    if (curl_easy_perform(e) == CURLE_OK) curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(e);
    zg_buf_free(&b);
    if (code == 200) snprintf(found, sizeof(found), "%s", d->nodes[i].id);
  }
  return found[0] ? found : NULL;
}

static struct probe *free_probe(struct drill *d) {
  for (size_t i = 0; i < ZG_ARRAY_LEN(d->probes); i++)
    if (!d->probes[i].easy) return &d->probes[i];
  return NULL;
}

static void start_chat(struct drill *d) {
  struct probe *p = free_probe(d);
  if (!p) return;
  char url[400], auth[200];
  snprintf(url, sizeof(url), "%s/v1/chat/completions", d->lb);
  zg_buf_init(&p->body);
  p->easy = easy_for(url, &p->body, 5000);
  p->kind = 0;
  p->served_by[0] = '\0';
  p->started_ms = now_ms();
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", d->client_token);
  struct curl_slist *h = curl_slist_append(NULL, auth);
  h = curl_slist_append(h, "Content-Type: application/json");
  curl_easy_setopt(p->easy, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(p->easy, CURLOPT_PRIVATE, h);
  curl_easy_setopt(p->easy, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(p->easy, CURLOPT_HEADERDATA, p);
  curl_easy_setopt(
      p->easy, CURLOPT_COPYPOSTFIELDS,
      "{\"model\":\"drill\",\"messages\":[{\"role\":\"user\",\"content\":\"drill probe\"}]}");
  curl_multi_add_handle(d->multi, p->easy);
  d->chats_total++;
}

static void start_write(struct drill *d, int seq) {
  struct probe *p = free_probe(d);
  if (!p) return;
  /* Any node: followers forward to the leader. Rotate on each write. */
  struct drill_node *n = NULL;
  for (size_t k = 0; k < d->n_nodes && !n; k++) {
    struct drill_node *c = &d->nodes[(size_t)(seq + (int)k) % d->n_nodes];
    if (c->admin[0] && strcmp(c->id, d->old_active) != 0) n = c;
  }
  if (!n) return;
  char url[300], auth[600], body[128];
  snprintf(url, sizeof(url), "%s://%s/v1/audit", d->o.ca[0] ? "https" : "http", n->admin);
  zg_buf_init(&p->body);
  p->easy = easy_for(url, &p->body, 5000);
  cli_tls_setup(&d->o, p->easy);
  p->kind = 1;
  p->seq = seq;
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", d->o.token);
  struct curl_slist *h = curl_slist_append(NULL, auth);
  h = curl_slist_append(h, "Content-Type: application/json");
  curl_easy_setopt(p->easy, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(p->easy, CURLOPT_PRIVATE, h);
  snprintf(body, sizeof(body), "{\"what\":\"drill-probe-%d\"}", seq);
  curl_easy_setopt(p->easy, CURLOPT_COPYPOSTFIELDS, body);
  curl_multi_add_handle(d->multi, p->easy);
  d->writes_total++;
}

static void start_health(struct drill *d) {
  for (size_t i = 0; i < d->n_nodes; i++) {
    struct drill_node *n = &d->nodes[i];
    if (n->witness || n->health || !n->gateway[0]) continue;
    char url[256];
    snprintf(url, sizeof(url), "http://%s/health/active", n->gateway);
    zg_buf_reset(&n->body);
    n->health = easy_for(url, &n->body, 200);
    curl_easy_setopt(n->health, CURLOPT_PRIVATE, NULL);
    curl_multi_add_handle(d->multi, n->health);
  }
}

static void note_health_round(struct drill *d) {
  int active = 0;
  char who[64] = "";
  for (size_t i = 0; i < d->n_nodes; i++)
    if (d->nodes[i].last_status == 200) {
      active++;
      snprintf(who, sizeof(who), "%s", d->nodes[i].id);
    }
  d->health_samples++;
  if (active > 1) {
    d->double_active_samples++;
    event(d, "DOUBLE ACTIVE", "two nodes answered 200 on /health/active in one sample");
  }
  if (d->t_fault < 0) return;
  struct drill_node *old = node_by_id(d, d->old_active);
  if (d->t_lease_lapsed < 0 && old && old->last_status != 200) {
    d->t_lease_lapsed = (int64_t)(now_ms() - d->t0);
    event(d, "old active stopped",
          old->last_status ? "answers non-200 on /health/active (lease lapsed)"
                           : "does not answer /health/active");
  }
  if (d->t_new_active < 0 && active == 1 && strcmp(who, d->old_active) != 0) {
    d->t_new_active = (int64_t)(now_ms() - d->t0);
    snprintf(d->new_active, sizeof(d->new_active), "%s", who);
    event(d, "new active", who);
    if (d->t_new_leader < 0) d->t_new_leader = d->t_new_active;
  }
}

static void on_done(struct drill *d, CURL *e, CURLcode result) {
  long code = 0;
  if (result == CURLE_OK) curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
  for (size_t i = 0; i < d->n_nodes; i++)
    if (d->nodes[i].health == e) {
      d->nodes[i].last_status = (int)code;
      if (d->t_fault >= 0 && d->t_new_leader < 0 && code == 429 && d->nodes[i].body.data) {
        cJSON *b = cJSON_Parse(d->nodes[i].body.data);
        const cJSON *leader = cJSON_GetObjectItemCaseSensitive(b, "leader");
        if (cJSON_IsString(leader) && leader->valuestring[0] &&
            strcmp(leader->valuestring, d->old_active)) {
          d->t_new_leader = (int64_t)(now_ms() - d->t0);
          event(d, "new leader elected", leader->valuestring);
        }
        cJSON_Delete(b);
      }
      curl_multi_remove_handle(d->multi, e);
      curl_easy_cleanup(e);
      d->nodes[i].health = NULL;
      return;
    }
  for (size_t i = 0; i < ZG_ARRAY_LEN(d->probes); i++) {
    struct probe *p = &d->probes[i];
    if (p->easy != e) continue;
    bool ok = code >= 200 && code < 300;
    if (p->kind == 0) {
      if (!ok) {
        d->chats_failed++;
        if (d->last_failed_streak++ == 0) {
          char detail[96];
          snprintf(detail, sizeof(detail), "HTTP %ld%s", code, code ? "" : " (no answer)");
          event(d, "client request failed", detail);
        }
      } else {
        if (d->last_failed_streak) {
          char detail[96];
          snprintf(detail, sizeof(detail), "after %u failed", d->last_failed_streak);
          event(d, "client requests succeed again", detail);
        }
        d->last_failed_streak = 0;
        if (d->t_fault >= 0 && d->t_lb_new_active < 0 && p->served_by[0] &&
            strcmp(p->served_by, d->old_active) != 0) {
          d->t_lb_new_active = (int64_t)(now_ms() - d->t0);
          event(d, "LB served by new active", p->served_by);
        }
      }
    } else if (ok) {
      d->writes_acked++;
      if (d->n_acked == d->cap_acked) {
        d->cap_acked = d->cap_acked ? d->cap_acked * 2 : 256;
        d->acked = realloc(d->acked, d->cap_acked * sizeof(int));
      }
      d->acked[d->n_acked++] = p->seq;
    }
    struct curl_slist *h = NULL;
    curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&h);
    curl_slist_free_all(h);
    curl_multi_remove_handle(d->multi, e);
    curl_easy_cleanup(e);
    zg_buf_free(&p->body);
    p->easy = NULL;
    return;
  }
}

static void inject(struct drill *d) {
  d->t_fault = (int64_t)(now_ms() - d->t0);
  char detail[256];
  if (!strcmp(d->kind, "external")) {
    snprintf(detail, sizeof(detail), "%.250s", d->inject_cmd);
    event(d, "fault injected", detail);
    int rc = system(d->inject_cmd);
    if (rc != 0) event(d, "inject command failed", d->inject_cmd);
    return;
  }
  struct drill_node *old = node_by_id(d, d->old_active);
  struct cli_options o = d->o;
  snprintf(o.addr, sizeof(o.addr), "%s", old->admin);
  cJSON *body = cJSON_CreateObject();
  cJSON_AddNumberToObject(body, "duration_ms", d->fault_ms);
  char path[64];
  if (!strcmp(d->kind, "switchover"))
    snprintf(path, sizeof(path), "/v1/cluster/switchover");
  else
    snprintf(path, sizeof(path), "/v1/drills/%s", d->kind);
  snprintf(detail, sizeof(detail), "%s on %s", d->kind, d->old_active);
  event(d, "fault injected", detail);
  if (!strcmp(d->kind, "switchover")) {
    /* A switchover answers when it is done: do not block the probes. */
    pid_t pid = fork();
    if (pid == 0) {
      cJSON *a = NULL;
      o.quiet = true;
      _exit(cli_call(&o, "POST", path, body, NULL, &a) ? 1 : 0);
    }
    cJSON_Delete(body);
    return;
  }
  cJSON *answer = NULL;
  if (cli_call(&o, "POST", path, body, NULL, &answer) != 0 && strcmp(d->kind, "crash") != 0)
    event(d, "inject failed", "see the error above (are drills enabled on the node?)");
  cJSON_Delete(answer);
  cJSON_Delete(body);
}

static void drive(struct drill *d) {
  uint64_t end = d->t0 + (uint64_t)d->duration_s * 1000u;
  uint64_t next_health = 0, next_chat = 0, next_write = 0;
  int seq = 0;
  bool injected = false;
  while (now_ms() < end) {
    uint64_t t = now_ms();
    if (!injected && t - d->t0 >= d->inject_at_ms) {
      injected = true;
      inject(d);
    }
    if (t >= next_health) {
      bool round_done = true;
      for (size_t i = 0; i < d->n_nodes; i++)
        if (d->nodes[i].health) round_done = false;
      if (round_done) {
        if (next_health) note_health_round(d);
        start_health(d);
      }
      next_health = t + HEALTH_EVERY_MS;
    }
    if (t >= next_chat) {
      start_chat(d);
      next_chat = t + CHAT_EVERY_MS;
    }
    if (t >= next_write) {
      start_write(d, seq++);
      next_write = t + WRITE_EVERY_MS;
    }
    int running;
    curl_multi_perform(d->multi, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(d->multi, &left)))
      if (msg->msg == CURLMSG_DONE) on_done(d, msg->easy_handle, msg->data.result);
    curl_multi_poll(d->multi, NULL, 0, 2, NULL);
  }
  /* Let in-flight probes finish (bounded by their own timeouts). */
  uint64_t drain_end = now_ms() + 6000;
  int running = 1;
  while (running && now_ms() < drain_end) {
    curl_multi_perform(d->multi, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(d->multi, &left)))
      if (msg->msg == CURLMSG_DONE) on_done(d, msg->easy_handle, msg->data.result);
    curl_multi_poll(d->multi, NULL, 0, 5, NULL);
  }
}

/* Acknowledged writes missing from the audit trail of the cluster now,
 * read on the leader (a follower may not have applied the newest entries
 * yet, which would look like a loss). */
static int count_lost_writes(struct drill *d, unsigned *lost) {
  uint64_t deadline = now_ms() + 10000;
  size_t leader = d->n_nodes;
  while (leader == d->n_nodes && now_ms() < deadline) {
    for (size_t i = 0; i < d->n_nodes && leader == d->n_nodes; i++) {
      struct cli_options o = d->o;
      snprintf(o.addr, sizeof(o.addr), "%s", d->nodes[i].admin);
      cJSON *st = NULL;
      o.quiet = true;
      int rc = cli_call(&o, "GET", "/v1/cluster/status", NULL, NULL, &st);
      if (rc == 0 && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(st, "is_leader"))) leader = i;
      cJSON_Delete(st);
    }
    if (leader == d->n_nodes) usleep(100000);
  }
  if (leader == d->n_nodes) return -1;
  for (size_t i = leader; i <= leader; i++) {
    struct cli_options o = d->o;
    snprintf(o.addr, sizeof(o.addr), "%s", d->nodes[i].admin);
    cJSON *audit = NULL;
    o.quiet = true;
    int rc = cli_call(&o, "GET", "/v1/audit?limit=0", NULL, NULL, &audit);
    if (rc) continue;
    char *text = cJSON_PrintUnformatted(audit);
    *lost = 0;
    for (size_t k = 0; k < d->n_acked; k++) {
      char needle[64];
      snprintf(needle, sizeof(needle), "\"drill-probe-%d\"", d->acked[k]);
      if (!strstr(text, needle)) {
        (*lost)++;
        fprintf(stderr,
                "lost: acknowledged write drill-probe-%d is missing from the audit trail of %s\n",
                d->acked[k], d->nodes[i].id);
      }
    }
    free(text);
    cJSON_Delete(audit);
    return 0;
  }
  return -1;
}

static void report(struct drill *d, int lost_rc, unsigned lost) {
  cJSON *r = cJSON_CreateObject();
  cJSON_AddStringToObject(r, "drill", d->kind);
  cJSON_AddStringToObject(r, "old_active", d->old_active);
  cJSON_AddStringToObject(r, "new_active", d->new_active);
#define MS_SINCE_FAULT(v) ((v) >= 0 && d->t_fault >= 0 ? (double)((v)-d->t_fault) : -1)
  cJSON_AddNumberToObject(r, "time_to_detect_ms", MS_SINCE_FAULT(d->t_lease_lapsed));
  cJSON_AddNumberToObject(r, "time_to_elect_ms", MS_SINCE_FAULT(d->t_new_leader));
  cJSON_AddNumberToObject(r, "time_to_new_active_ms", MS_SINCE_FAULT(d->t_new_active));
  cJSON_AddNumberToObject(r, "rto_lb_ms", MS_SINCE_FAULT(d->t_lb_new_active));
  cJSON_AddNumberToObject(r, "client_requests", d->chats_total);
  cJSON_AddNumberToObject(r, "client_requests_failed", d->chats_failed);
  cJSON_AddNumberToObject(r, "health_samples", d->health_samples);
  cJSON_AddNumberToObject(r, "double_active_samples", d->double_active_samples);
  cJSON_AddNumberToObject(r, "admin_writes", d->writes_total);
  cJSON_AddNumberToObject(r, "admin_writes_acknowledged", d->writes_acked);
  cJSON_AddNumberToObject(r, "acknowledged_writes_lost", lost_rc == 0 ? (double)lost : -1);
  cJSON_AddItemToObject(r, "timeline", d->timeline);
  d->timeline = NULL;
  if (d->json) {
    char *text = cJSON_Print(r);
    printf("%s\n", text);
    free(text);
  } else {
    printf("\nReport: drill %s, active was %s, now %s\n", d->kind, d->old_active,
           d->new_active[0] ? d->new_active : "(unchanged)");
    const char *names[][2] = {{"time to detect", "time_to_detect_ms"},
                              {"time to elect", "time_to_elect_ms"},
                              {"time to new active", "time_to_new_active_ms"},
                              {"RTO through the LB", "rto_lb_ms"}};
    for (size_t i = 0; i < ZG_ARRAY_LEN(names); i++) {
      double v = cJSON_GetObjectItemCaseSensitive(r, names[i][1])->valuedouble;
      if (v < 0)
        printf("  %-30s -\n", names[i][0]);
      else
        printf("  %-30s %.0f ms\n", names[i][0], v);
    }
    printf("  %-30s %u of %u\n", "client requests failed", d->chats_failed, d->chats_total);
    printf("  %-30s %u of %u samples\n", "double-active samples", d->double_active_samples,
           d->health_samples);
    printf("  %-30s %u acknowledged of %u\n", "admin writes", d->writes_acked, d->writes_total);
    if (lost_rc == 0)
      printf("  %-30s %u\n", "acknowledged writes lost", lost);
    else
      printf("  %-30s unknown (no admin API answered)\n", "acknowledged writes lost");
  }
  cJSON_Delete(r);
}

static void usage(void) {
  fprintf(
      stderr,
      "usage: zonegate drill switchover|crash|freeze|isolate|external --lb URL [--duration S]\n"
      "                      [--fault-duration S] [--inject-at S] [--inject \"COMMAND\"] [--json]\n"
      "                      [--addr HOST:PORT] [--token ADMIN_TOKEN]\n"
      "  runs client and admin-write probes through the load balancer, injects the fault on the\n"
      "  active node (drills.enabled must be true there), prints a timeline and a report.\n"
      "  external: the fault is --inject COMMAND (e.g. \"docker kill gw-a\").\n");
}

int node_drill(int argc, char **argv) {
  struct drill d;
  memset(&d, 0, sizeof(d));
  cli_options_parse(&d.o, &argc, argv);
  d.json = d.o.json;
  if (argc < 2) {
    usage();
    return 2;
  }
  d.kind = argv[1];
  if (strcmp(d.kind, "switchover") && strcmp(d.kind, "crash") && strcmp(d.kind, "freeze") &&
      strcmp(d.kind, "isolate") && strcmp(d.kind, "external")) {
    usage();
    return 2;
  }
  static const char *const known[] = {
      "--lb=", "--duration=", "--fault-duration=", "--inject-at=", "--inject=", NULL};
  if (cli_check_options("zonegate drill", argc - 2, argv + 2, known)) return 2;
  d.duration_s = 20;
  d.fault_ms = 5000;
  d.inject_at_ms = 2000;
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "--lb") && i + 1 < argc)
      snprintf(d.lb, sizeof(d.lb), "%s", argv[++i]);
    else if (!strcmp(argv[i], "--duration") && i + 1 < argc)
      d.duration_s = (unsigned)atoi(argv[++i]);
    else if (!strcmp(argv[i], "--fault-duration") && i + 1 < argc)
      d.fault_ms = (unsigned)(atof(argv[++i]) * 1000);
    else if (!strcmp(argv[i], "--inject-at") && i + 1 < argc)
      d.inject_at_ms = (unsigned)(atof(argv[++i]) * 1000);
    else if (!strcmp(argv[i], "--inject") && i + 1 < argc)
      snprintf(d.inject_cmd, sizeof(d.inject_cmd), "%s", argv[++i]);
    else {
      usage();
      return 2;
    }
  }
  if (!d.lb[0] || d.duration_s < 3 || d.duration_s > 3600 ||
      (!strcmp(d.kind, "external") && !d.inject_cmd[0])) {
    usage();
    return 2;
  }
  if (strncmp(d.lb, "http://", 7) && strncmp(d.lb, "https://", 8)) {
    char tmp[300];
    snprintf(tmp, sizeof(tmp), "http://%.290s", d.lb);
    snprintf(d.lb, sizeof(d.lb), "%s", tmp);
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (load_members(&d) != 0) return 1;
  const char *active = find_active(&d);
  if (!active) {
    fprintf(stderr,
            "error: no active node before the drill; fix the cluster first (zonegate status)\n");
    return 1;
  }
  snprintf(d.old_active, sizeof(d.old_active), "%s", active);
  cJSON *tok = cJSON_CreateObject();
  cJSON_AddStringToObject(tok, "name", "drill-probe");
  cJSON_AddNumberToObject(tok, "expires_in_s", d.duration_s + 600);
  cJSON *answer = NULL;
  int rc = cli_call(&d.o, "POST", "/v1/tokens", tok, NULL, &answer);
  cJSON_Delete(tok);
  if (rc) return 1;
  snprintf(d.client_token, sizeof(d.client_token), "%s",
           cJSON_GetObjectItemCaseSensitive(answer, "token")->valuestring);
  snprintf(d.token_id, sizeof(d.token_id), "%s",
           cJSON_GetObjectItemCaseSensitive(answer, "id")->valuestring);
  cJSON_Delete(answer);
  d.timeline = cJSON_CreateArray();
  d.t_fault = d.t_lease_lapsed = d.t_new_leader = d.t_new_active = d.t_lb_new_active = -1;
  d.multi = curl_multi_init();
  if (!d.json)
    printf("drill %s: active %s, probing through %s for %u s, fault at +%u ms\n", d.kind,
           d.old_active, d.lb, d.duration_s, d.inject_at_ms);
  d.t0 = now_ms();
  event(&d, "probes started", NULL);
  drive(&d);
  curl_multi_cleanup(d.multi);
  unsigned lost = 0;
  int lost_rc = count_lost_writes(&d, &lost);
  /* Revoke the probe token through any node that answers. */
  for (size_t i = 0; i < d.n_nodes; i++) {
    struct cli_options o = d.o;
    snprintf(o.addr, sizeof(o.addr), "%s", d.nodes[i].admin);
    char path[128];
    snprintf(path, sizeof(path), "/v1/tokens/%s", d.token_id);
    o.quiet = true;
    cJSON *a = NULL;
    int r = cli_call(&o, "DELETE", path, NULL, NULL, &a);
    cJSON_Delete(a);
    if (r == 0) break;
  }
  memset(d.client_token, 0, sizeof(d.client_token));
  report(&d, lost_rc, lost);
  while (wait(NULL) > 0) {
  }
  free(d.acked);
  for (size_t i = 0; i < d.n_nodes; i++) zg_buf_free(&d.nodes[i].body);
  curl_global_cleanup();
  bool failed_over = d.t_new_active >= 0 || !strcmp(d.kind, "freeze") || !strcmp(d.kind, "isolate");
  return d.double_active_samples == 0 && (lost_rc != 0 || lost == 0) && failed_over ? 0 : 1;
}
