/* cli.c: the operator's CLI for the admin API: status, config get|apply,
 * keys, tokens (create, update, list, revoke), usage, audit, members,
 * switchover. Blocking libcurl calls (a CLI
 * has no loop to share). Address and admin token from --addr/--token or
 * ZONEGATE_ADDR / ZONEGATE_ADMIN_TOKEN. Human tables by default, --json
 * for scripts. With --ca FILE or ZONEGATE_CA (the cluster CA, when nodes
 * run security.tls) the admin API is called over TLS 1.3 and the node's
 * certificate is verified against that CA and the address's host name
 * (certs init puts localhost, 127.0.0.1, the node id and --hosts in it);
 * the CLI authenticates with the admin token, not with a certificate.
 *
 * Failure modes, each one line on stderr and exit 1: the node cannot be
 * reached (names the address and how to change it), the admin token is
 * rejected, no leader (retry), or the API's own error message. Usage
 * errors exit 2. Secrets (provider keys) are read from a file, an
 * environment variable or stdin, never from the command line.
 */
#include <curl/curl.h>

#include "base/base.h"
#include "config/config.h"
#include "node/cli.h"
#include "node/node.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static size_t collect(char *data, size_t size, size_t n, void *ud) {
  zg_buf_append(ud, data, size * n);
  return size * n;
}

void cli_options_parse(struct cli_options *o, int *argc, char **argv) {
  const char *addr = getenv("ZONEGATE_ADDR");
  const char *token = getenv("ZONEGATE_ADMIN_TOKEN");
  const char *ca = getenv("ZONEGATE_CA");
  snprintf(o->ca, sizeof(o->ca), "%s", ca ? ca : "");
  snprintf(o->addr, sizeof(o->addr), "%s", addr && *addr ? addr : "127.0.0.1:18790");
  snprintf(o->token, sizeof(o->token), "%s", token ? token : "");
  o->json = false;
  o->quiet = false;
  int out = 0;
  for (int i = 0; i < *argc; i++) {
    if (!strcmp(argv[i], "--json"))
      o->json = true;
    else if (!strcmp(argv[i], "--addr") && i + 1 < *argc)
      snprintf(o->addr, sizeof(o->addr), "%s", argv[++i]);
    else if ((!strcmp(argv[i], "--token") || !strcmp(argv[i], "--admin-token")) && i + 1 < *argc)
      snprintf(o->token, sizeof(o->token), "%s", argv[++i]);
    else if (!strcmp(argv[i], "--ca") && i + 1 < *argc)
      snprintf(o->ca, sizeof(o->ca), "%s", argv[++i]);
    else
      argv[out++] = argv[i];
  }
  *argc = out;
  if (!strncmp(o->addr, "http://", 7)) memmove(o->addr, o->addr + 7, strlen(o->addr + 7) + 1);
  if (!strncmp(o->addr, "https://", 8)) memmove(o->addr, o->addr + 8, strlen(o->addr + 8) + 1);
}

const char *cli_tls_setup(const struct cli_options *o, CURL *curl) {
  if (!o->ca[0]) return "http";
  curl_easy_setopt(curl, CURLOPT_CAINFO, o->ca);
  curl_easy_setopt(curl, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_3);
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
  return "https";
}

/* Levenshtein distance of a and b (short option names). */
static size_t edit_distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 63 || lb > 63) return 64;
  size_t prev[64], cur[64];
  for (size_t j = 0; j <= lb; j++) prev[j] = j;
  for (size_t i = 1; i <= la; i++) {
    cur[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      size_t sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
      size_t del = prev[j] + 1, ins = cur[j - 1] + 1;
      cur[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
    }
    memcpy(prev, cur, (lb + 1) * sizeof(size_t));
  }
  return prev[lb];
}

int cli_check_options(const char *what, int argc, char *const *argv, const char *const *known) {
  static const char *const global[] = {
      "--json", "--addr=", "--token=", "--admin-token=", "--ca=", NULL};
  for (int i = 0; i < argc; i++) {
    const char *arg = argv[i];
    if (arg[0] != '-' || !arg[1]) continue;
    if (arg[1] != '-') { /* "-tpm": one dash is a typo of an option too */
      char dashed[80];
      snprintf(dashed, sizeof(dashed), "-%s", arg);
      fprintf(stderr, "%s: unknown option '%s' (options start with two dashes: '%s'?)\n", what, arg,
              dashed);
      return 2;
    }
    bool found = false, takes_value = false;
    const char *nearest = NULL;
    size_t best = 64;
    for (int list = 0; list < 2 && !found; list++) {
      for (const char *const *k = list ? global : known; k && *k; k++) {
        size_t len = strcspn(*k, "=");
        char name[64];
        snprintf(name, sizeof(name), "%.*s", (int)len, *k);
        if (!strcmp(arg, name)) {
          found = true;
          takes_value = (*k)[len] == '=';
          break;
        }
        size_t d = edit_distance(arg, name);
        if (d < best) {
          best = d;
          nearest = *k;
        }
      }
    }
    if (!found) {
      const char *eq = strchr(arg, '=');
      if (eq)
        fprintf(stderr, "%s: write '%.*s %s', not '%s'\n", what, (int)(eq - arg), arg, eq + 1, arg);
      else if (nearest && best <= 3)
        fprintf(stderr, "%s: unknown option '%s' (did you mean '%.*s'?)\n", what, arg,
                (int)strcspn(nearest, "="), nearest);
      else
        fprintf(stderr, "%s: unknown option '%s' (see the usage: run it without arguments)\n", what,
                arg);
      return 2;
    }
    if (takes_value) {
      if (i + 1 >= argc) {
        fprintf(stderr, "%s: option '%s' needs a value\n", what, arg);
        return 2;
      }
      i++;
    }
  }
  return 0;
}

/* Every CLI command and subcommand: its options (see cli_check_options)
 * and how many words may follow the command (the subcommand included). */
struct cli_spec {
  const char *command, *sub; /* sub NULL: the command takes no subcommand */
  int max_words;
  const char *known[8];
};
#define TOKEN_LIMITS                                                                               \
  "--expires-in=", "--rpm=", "--tpm=", "--budget-day=", "--budget-month=", "--allow="
static const struct cli_spec cli_specs[] = {
    {"status", NULL, 0, {NULL}},
    {"config", "get", 1, {NULL}},
    {"config", "apply", 2, {"--if-match=", NULL}},
    {"keys", "list", 1, {NULL}},
    {"keys",
     "add",
     1,
     {"--id=", "--upstream=", "--rotate-after-days=", "--secret-file=", "--secret-env=", NULL}},
    {"keys", "rotate", 2, {"--grace-seconds=", "--secret-file=", "--secret-env=", NULL}},
    {"keys", "revoke", 2, {NULL}},
    {"tokens", "create", 2, {TOKEN_LIMITS, NULL}},
    {"tokens", "update", 2, {TOKEN_LIMITS, NULL}},
    {"tokens", "list", 1, {NULL}},
    {"tokens", "revoke", 2, {NULL}},
    {"usage", NULL, 0, {"--token=", "--model=", "--since=", NULL}},
    {"audit", NULL, 0, {"--limit=", NULL}},
    {"members", "add", 2, {"--raft=", "--zone=", "--role=", "--admin=", "--gateway=", NULL}},
    {"members", "remove", 2, {NULL}},
    {"switchover", NULL, 0, {"--to=", NULL}},
};

/* Checks argv (after the command name) against the command's spec: the
 * subcommand (nearest one named when unknown), the options, and no word
 * more than the command takes. 0, or 2 after one line on stderr. */
static int check_command_options(const char *command, int argc, char **argv) {
  const char *sub = argc >= 1 && argv[0][0] != '-' ? argv[0] : NULL;
  const struct cli_spec *spec = NULL, *nearest = NULL;
  bool has_subs = false;
  size_t best = 64;
  for (size_t i = 0; i < ZG_ARRAY_LEN(cli_specs); i++) {
    const struct cli_spec *sp = &cli_specs[i];
    if (strcmp(sp->command, command)) continue;
    if (!sp->sub) {
      spec = sp;
      break;
    }
    has_subs = true;
    if (sub && !strcmp(sp->sub, sub)) {
      spec = sp;
      break;
    }
    size_t d = sub ? edit_distance(sub, sp->sub) : 64;
    if (d < best) best = d, nearest = sp;
  }
  char what[96];
  if (!spec) {
    if (!has_subs) return 0; /* a command without a spec (none today) */
    if (sub && nearest && best <= 3)
      fprintf(stderr, "zonegate %s: unknown subcommand '%s' (did you mean '%s'?)\n", command, sub,
              nearest->sub);
    else if (sub)
      fprintf(stderr, "zonegate %s: unknown subcommand '%s' (run 'zonegate %s' for the usage)\n",
              command, sub, command);
    else
      return 0; /* no subcommand: the command prints its usage */
    return 2;
  }
  snprintf(what, sizeof(what), "zonegate %s%s%s", command, spec->sub ? " " : "",
           spec->sub ? spec->sub : "");
  int rc = cli_check_options(what, argc, argv, spec->known);
  if (rc) return rc;
  /* words that are neither options nor option values */
  int words = 0;
  for (int i = 0; i < argc; i++) {
    if (argv[i][0] == '-' && argv[i][1]) {
      for (const char *const *k = spec->known; *k; k++)
        if (!strncmp(*k, argv[i], strlen(argv[i])) && (*k)[strlen(argv[i])] == '=') i++;
      if (!strcmp(argv[i], "--addr") || !strcmp(argv[i], "--token") ||
          !strcmp(argv[i], "--admin-token") || !strcmp(argv[i], "--ca"))
        i++;
      continue;
    }
    if (++words > spec->max_words) {
      fprintf(stderr, "%s: unexpected argument '%s'\n", what, argv[i]);
      return 2;
    }
  }
  return 0;
}

/* Without a CA the CLI speaks plain HTTP; before the admin token goes on
 * the wire, one request without it checks that the node does speak plain
 * HTTP (a node with security.tls does not): the token never reaches a TLS
 * port in plaintext. Once per process. 0, or -1 after printing why. */
static int plaintext_probe(const struct cli_options *o, FILE *err_out) {
  static int probed = 0; /* 1 ok, -1 refused */
  if (probed) return probed > 0 ? 0 : -1;
  CURL *curl = curl_easy_init();
  if (!curl) return -1;
  char url[512];
  /* /metrics needs no token: the probe leaves no failed-login line */
  snprintf(url, sizeof(url), "http://%s/metrics", o->addr);
  curl_easy_setopt(curl, CURLOPT_URL, url);
  curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 3000L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 10000L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  CURLcode rc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(curl);
  if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_OPERATION_TIMEDOUT) {
    probed = 1; /* unreachable: the real call says so */
    return 0;
  }
  if (rc != CURLE_OK || status < 100) {
    probed = -1;
    if (err_out)
      fprintf(err_out,
              "error: the admin API at %s does not answer plain HTTP (%s): it has TLS on; pass "
              "--ca FILE or set ZONEGATE_CA to the cluster CA (the admin token was not sent)\n",
              o->addr, curl_easy_strerror(rc));
    return -1;
  }
  probed = 1;
  return 0;
}

int cli_call(const struct cli_options *o, const char *method, const char *path, const cJSON *body,
             const char *const *extra_headers, cJSON **answer) {
  *answer = NULL;
  FILE *err_out = o->quiet ? NULL : stderr;
  if (!o->token[0]) {
    if (err_out)
      fprintf(err_out, "error: no admin token: pass --token or set ZONEGATE_ADMIN_TOKEN\n");
    return -1;
  }
  if (!o->ca[0] && plaintext_probe(o, err_out) != 0) return -1;
  CURL *curl = curl_easy_init();
  if (!curl) return -1;
  /* No X-Zonegate-* identity headers: the node records the actor the
   * admin token proves and this connection's address. */
  char url[512], auth[600];
  snprintf(url, sizeof(url), "%s://%s%s", cli_tls_setup(o, curl), o->addr, path);
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", o->token);
  struct curl_slist *headers = NULL;
  headers = curl_slist_append(headers, auth);
  headers = curl_slist_append(headers, "Content-Type: application/json");
  for (size_t i = 0; extra_headers && extra_headers[i]; i++)
    headers = curl_slist_append(headers, extra_headers[i]);
  char *text = body ? cJSON_PrintUnformatted(body) : NULL;
  zg_buf response;
  zg_buf_init(&response);
  curl_easy_setopt(curl, CURLOPT_URL, url);
  curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &response);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 3000L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 120000L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  if (text) curl_easy_setopt(curl, CURLOPT_POSTFIELDS, text);
  CURLcode rc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(headers);
  curl_easy_cleanup(curl);
  free(text);
  memset(auth, 0, sizeof(auth));
  if (rc != CURLE_OK) {
    if (err_out)
      fprintf(err_out,
              "error: cannot reach the admin API at %s: %s\n"
              "       is zonegate running there? set the address with --addr HOST:PORT or "
              "ZONEGATE_ADDR%s\n",
              o->addr, curl_easy_strerror(rc),
              o->ca[0] ? "; TLS: the node's certificate must chain to --ca / ZONEGATE_CA and name "
                         "this host"
                       : "; a node with security.tls needs --ca FILE or ZONEGATE_CA (the cluster "
                         "CA)");
    zg_buf_free(&response);
    return -1;
  }
  cJSON *json = response.data ? cJSON_Parse(response.data) : NULL;
  zg_buf_free(&response);
  if (status >= 400) {
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(json, "error");
    const cJSON *msg = cJSON_GetObjectItemCaseSensitive(err, "message");
    /* the switchover's answer is {"ok": false, "message": ...} */
    if (!cJSON_IsString(msg)) msg = cJSON_GetObjectItemCaseSensitive(json, "message");
    const char *text_msg = cJSON_IsString(msg) ? msg->valuestring : "no details";
    if (!err_out) {
      /* quiet: the caller reports */
    } else if (status == 401)
      fprintf(err_out,
              "error: the admin token was rejected by %s (check --token / ZONEGATE_ADMIN_TOKEN)\n",
              o->addr);
    else if (status == 503)
      fprintf(err_out, "error: %s (HTTP 503: no leader reachable; retry in a moment)\n", text_msg);
    else
      fprintf(err_out, "error: %s (HTTP %ld)\n", text_msg, status);
    cJSON_Delete(json);
    return -1;
  }
  *answer = json ? json : cJSON_CreateObject();
  return 0;
}

static void print_json(const cJSON *j) {
  char *text = cJSON_Print(j);
  printf("%s\n", text ? text : "null");
  free(text);
}

static const char *str(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsString(v) ? v->valuestring : "-";
}

static double num(const cJSON *obj, const char *key, double dflt) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

static void when(double wall_ms, char out[32]) {
  if (wall_ms <= 0) {
    snprintf(out, 32, "-");
    return;
  }
  zg_iso8601((uint64_t)wall_ms, out);
  out[19] = 'Z';
  out[20] = '\0';
}

/* ---- commands --------------------------------------------------------- */

static int cmd_status(const struct cli_options *o) {
  cJSON *a;
  if (cli_call(o, "GET", "/v1/cluster/status", NULL, NULL, &a)) return 1;
  if (o->json) {
    print_json(a);
    cJSON_Delete(a);
    return 0;
  }
  const cJSON *leader = cJSON_GetObjectItemCaseSensitive(a, "leader");
  const cJSON *fo = cJSON_GetObjectItemCaseSensitive(a, "failover");
  printf("node %s   leader %s   term %.0f   commit %.0f   applied %.0f   config v%.0f\n",
         str(a, "node"), leader ? str(leader, "id") : "none", num(a, "term", 0),
         num(a, "commit_index", 0), num(a, "applied_index", 0), num(a, "config_version", 0));
  if (fo) printf("this node: %s (%s)\n", str(fo, "role"), str(fo, "role_reason"));
  printf("\n%-12s %-6s %-8s %-7s %-7s %-8s %-7s %-10s %s\n", "MEMBER", "ZONE", "ROLE", "VOTER",
         "LEADER", "MATCH", "LAG", "CONTACT", "RAFT ADDRESS");
  const cJSON *m;
  cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(a, "members")) {
    char match[24] = "-", lag[24] = "-", contact[24] = "-";
    if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(m, "match_index")))
      snprintf(match, sizeof(match), "%.0f", num(m, "match_index", 0));
    if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(m, "lag")))
      snprintf(lag, sizeof(lag), "%.0f", num(m, "lag", 0));
    if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(m, "last_contact_ms")))
      snprintf(contact, sizeof(contact), "%.0f ms", num(m, "last_contact_ms", 0));
    printf("%-12s %-6s %-8s %-7s %-7s %-8s %-7s %-10s %s%s\n", str(m, "id"), str(m, "zone"),
           str(m, "role"),
           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "voter")) ? "yes" : "no",
           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "leader")) ? "*" : "", match, lag,
           contact, str(m, "raft_address"),
           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "self")) ? "  (this node)" : "");
  }
  cJSON_Delete(a);
  return 0;
}

static cJSON *read_json_file(const char *path) {
  zg_buf b;
  zg_buf_init(&b);
  if (zg_read_file(path, &b) != 0) {
    fprintf(stderr, "error: cannot read %s: %s\n", path, strerror(errno));
    zg_buf_free(&b);
    return NULL;
  }
  cJSON *j = b.data ? cJSON_Parse(b.data) : NULL;
  zg_buf_free(&b);
  if (!cJSON_IsObject(j)) {
    fprintf(stderr, "error: %s is not a JSON object\n", path);
    cJSON_Delete(j);
    return NULL;
  }
  return j;
}

static int cmd_config(const struct cli_options *o, int argc, char **argv) {
  if (argc >= 1 && !strcmp(argv[0], "get")) {
    cJSON *a;
    if (cli_call(o, "GET", "/v1/config", NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else {
      printf("# replicated config, version %.0f\n", num(a, "version", 0));
      print_json(cJSON_GetObjectItemCaseSensitive(a, "config"));
    }
    cJSON_Delete(a);
    return 0;
  }
  if (argc >= 2 && !strcmp(argv[0], "apply")) {
    cJSON *file = read_json_file(argv[1]);
    if (!file) return 1;
    const char *if_match = NULL;
    for (int i = 2; i + 1 < argc; i++)
      if (!strcmp(argv[i], "--if-match")) if_match = argv[i + 1];
    char header[64];
    snprintf(header, sizeof(header), "If-Match: %s", if_match ? if_match : "");
    const char *extra[] = {if_match ? header : NULL, NULL};
    /* a whole node file may be applied: its local sections are not
     * replicated, and the operator is told so rather than left guessing */
    char local[256] = "";
    for (const cJSON *c = file->child; c; c = c->next)
      if (c->string && !zg_config_key_is_replicated(c->string) && strcmp(c->string, "config") &&
          strlen(local) + strlen(c->string) + 3 < sizeof(local))
        snprintf(local + strlen(local), sizeof(local) - strlen(local), "%s%s", local[0] ? ", " : "",
                 c->string);
    cJSON *a;
    int rc = cli_call(o, "PUT", "/v1/config", file, extra, &a);
    cJSON_Delete(file);
    if (rc) return 1;
    if (local[0])
      fprintf(stderr,
              "note: %s: %s %s local to each node's own file and %s not applied; change them "
              "there (SIGHUP reloads)\n",
              argv[1], local, strchr(local, ',') ? "are" : "is",
              strchr(local, ',') ? "were" : "was");
    if (o->json)
      print_json(a);
    else
      printf("config applied: version %.0f is live on every node\n", num(a, "version", 0));
    cJSON_Delete(a);
    return 0;
  }
  fprintf(stderr, "usage: zonegate config check FILE | get | apply FILE [--if-match VERSION]\n");
  return 2;
}

/* Reads a secret from --secret-file, --secret-env or stdin (no echo on a
 * terminal). Never from the command line itself. */
static char *read_secret(int argc, char **argv) {
  for (int i = 0; i + 1 < argc; i++) {
    if (!strcmp(argv[i], "--secret-file")) {
      char spec[600], err[256];
      snprintf(spec, sizeof(spec), "file:%s", argv[i + 1]);
      char *out;
      if (zg_secret_resolve(spec, &out, NULL, err, sizeof(err))) {
        fprintf(stderr, "error: %s\n", err);
        return NULL;
      }
      return out;
    }
    if (!strcmp(argv[i], "--secret-env")) {
      const char *v = getenv(argv[i + 1]);
      if (!v || !*v) {
        fprintf(stderr, "error: environment variable %s is not set\n", argv[i + 1]);
        return NULL;
      }
      return strdup(v);
    }
  }
  bool tty = isatty(STDIN_FILENO);
  struct termios old, quiet;
  if (tty) {
    fprintf(stderr, "provider key (input hidden): ");
    tcgetattr(STDIN_FILENO, &old);
    quiet = old;
    quiet.c_lflag &= ~(tcflag_t)ECHO;
    tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
  }
  char line[4096];
  char *got = fgets(line, sizeof(line), stdin);
  if (tty) {
    tcsetattr(STDIN_FILENO, TCSANOW, &old);
    fprintf(stderr, "\n");
  }
  if (!got) {
    fprintf(stderr,
            "error: no secret given (use --secret-file PATH, --secret-env NAME or stdin)\n");
    return NULL;
  }
  line[strcspn(line, "\r\n")] = '\0';
  char *out = strdup(line);
  memset(line, 0, sizeof(line));
  return out;
}

static const char *opt(int argc, char **argv, const char *name) {
  for (int i = 0; i + 1 < argc; i++)
    if (!strcmp(argv[i], name)) return argv[i + 1];
  return NULL;
}

static void print_key(const cJSON *k) {
  char created[32], retire[32];
  when(num(k, "created_at", 0), created);
  when(num(k, "retire_at", 0), retire);
  printf("%-16s %-12s %-9s %-21s %5.0f %6.0f %-4s %s\n", str(k, "id"), str(k, "upstream"),
         str(k, "state"), created, num(k, "age_days", 0), num(k, "rotate_after_days", 0),
         cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(k, "rotation_due")) ? "yes" : "no", retire);
}

static int cmd_keys(const struct cli_options *o, int argc, char **argv) {
  const char *sub = argc >= 1 ? argv[0] : "";
  cJSON *a = NULL;
  int rc;
  if (!strcmp(sub, "list")) {
    if (cli_call(o, "GET", "/v1/keys", NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else {
      printf("%-16s %-12s %-9s %-21s %5s %6s %-4s %s\n", "ID", "UPSTREAM", "STATE", "CREATED",
             "AGE_D", "ROTATE", "DUE", "RETIRES");
      const cJSON *k;
      cJSON_ArrayForEach(k, cJSON_GetObjectItemCaseSensitive(a, "keys")) print_key(k);
    }
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "add") || (!strcmp(sub, "rotate") && argc >= 2)) {
    char *secret = read_secret(argc, argv);
    if (!secret) return 1;
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "secret", secret);
    zg_secret_free(secret);
    char path[256];
    if (!strcmp(sub, "add")) {
      if (opt(argc, argv, "--id")) cJSON_AddStringToObject(body, "id", opt(argc, argv, "--id"));
      if (opt(argc, argv, "--upstream"))
        cJSON_AddStringToObject(body, "upstream", opt(argc, argv, "--upstream"));
      if (opt(argc, argv, "--rotate-after-days"))
        cJSON_AddNumberToObject(body, "rotate_after_days",
                                atof(opt(argc, argv, "--rotate-after-days")));
      snprintf(path, sizeof(path), "/v1/keys");
    } else {
      if (opt(argc, argv, "--grace-seconds"))
        cJSON_AddNumberToObject(body, "grace_seconds", atof(opt(argc, argv, "--grace-seconds")));
      snprintf(path, sizeof(path), "/v1/keys/%s/rotate", argv[1]);
    }
    rc = cli_call(o, "POST", path, body, NULL, &a);
    cJSON_Delete(body);
    if (rc) return 1;
    if (o->json)
      print_json(a);
    else {
      printf("%s key %s (%s); every node uses it from the next request, no restart\n",
             !strcmp(sub, "add") ? "added" : "rotated to", str(a, "id"), str(a, "state"));
    }
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "revoke") && argc >= 2) {
    char path[256];
    snprintf(path, sizeof(path), "/v1/keys/%s", argv[1]);
    if (cli_call(o, "DELETE", path, NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else
      printf("revoked key %s\n", argv[1]);
    cJSON_Delete(a);
    return 0;
  }
  fprintf(
      stderr,
      "usage: zonegate keys list\n"
      "       zonegate keys add [--id ID] [--upstream NAME] [--rotate-after-days N] [--secret-file "
      "F | --secret-env VAR]\n"
      "       zonegate keys rotate ID [--grace-seconds N] [--secret-file F | --secret-env VAR]\n"
      "       zonegate keys revoke ID\n"
      "(without --secret-file/--secret-env the key is read from stdin)\n");
  return 2;
}

/* "30d", "12h", "15m", "90s" or "90" (seconds) as seconds; -1 for
 * anything else (a typo must not give a 90-second token). */
static double parse_duration_s(const char *text) {
  char *end;
  double v = strtod(text, &end);
  if (end == text || v < 0) return -1;
  if (*end == 'd')
    v *= 86400, end++;
  else if (*end == 'h')
    v *= 3600, end++;
  else if (*end == 'm')
    v *= 60, end++;
  else if (*end == 's')
    end++;
  return *end ? -1 : v;
}

/* The limit options of tokens create|update into body: --rpm, --tpm,
 * --budget-day, --budget-month (whole numbers, 0 = none), --expires-in
 * (30d, 12h, 0 = never), --allow CIDR (repeatable; "any" = no allowlist).
 * -1 after a usage message on a malformed value. */
static int token_limit_options(int argc, char **argv, cJSON *body, bool update) {
  static const char *const limits[][2] = {{"--rpm", "rpm"},
                                          {"--tpm", "tpm"},
                                          {"--budget-day", "budget_day"},
                                          {"--budget-month", "budget_month"}};
  for (size_t i = 0; i < ZG_ARRAY_LEN(limits); i++) {
    const char *v = opt(argc, argv, limits[i][0]);
    if (!v) continue;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (!*v || *end || errno || v[0] == '-' || n > 9000000000000000ull) {
      fprintf(stderr, "zonegate tokens: %s expects a whole number of %s (0 = none), not '%s'\n",
              limits[i][0], i == 0 ? "requests per minute" : "tokens", v);
      return -1;
    }
    cJSON_AddNumberToObject(body, limits[i][1], (double)n);
  }
  if (opt(argc, argv, "--expires-in")) {
    double s_in = parse_duration_s(opt(argc, argv, "--expires-in"));
    if (s_in < 0) {
      fprintf(stderr,
              "zonegate tokens: --expires-in expects a duration like 30d, 12h, 15m or 90s (0 = "
              "never), not '%s'\n",
              opt(argc, argv, "--expires-in"));
      return -1;
    }
    cJSON_AddNumberToObject(body, "expires_in_s", s_in);
  }
  bool any_allow = false;
  for (int i = 0; i + 1 < argc; i++) any_allow |= !strcmp(argv[i], "--allow");
  if (any_allow || !update) {
    cJSON *allow = cJSON_AddArrayToObject(body, "allow");
    for (int i = 0; i + 1 < argc; i++)
      if (!strcmp(argv[i], "--allow") && strcmp(argv[i + 1], "any"))
        cJSON_AddItemToArray(allow, cJSON_CreateString(argv[i + 1]));
  }
  return 0;
}

static void limit_text(const cJSON *t, const char *key, char out[24]) {
  double v = num(t, key, 0);
  if (v > 0)
    snprintf(out, 24, "%.0f", v);
  else
    snprintf(out, 24, "-");
}

static int cmd_tokens(const struct cli_options *o, int argc, char **argv) {
  const char *sub = argc >= 1 ? argv[0] : "";
  cJSON *a = NULL;
  if (!strcmp(sub, "update") && argc >= 2) {
    cJSON *body = cJSON_CreateObject();
    if (token_limit_options(argc, argv, body, true)) {
      cJSON_Delete(body);
      return 2;
    }
    if (cJSON_GetArraySize(body) == 0) {
      cJSON_Delete(body);
      fprintf(stderr, "zonegate tokens update: nothing to change (give --rpm, --tpm, "
                      "--budget-day, --budget-month, --expires-in or --allow)\n");
      return 2;
    }
    CURL *curl = curl_easy_init();
    char *escaped = curl ? curl_easy_escape(curl, argv[1], 0) : NULL;
    char path[512];
    snprintf(path, sizeof(path), "/v1/tokens/%s", escaped ? escaped : argv[1]);
    curl_free(escaped);
    if (curl) curl_easy_cleanup(curl);
    int rc = cli_call(o, "PATCH", path, body, NULL, &a);
    cJSON_Delete(body);
    if (rc) return 1;
    if (o->json) {
      print_json(a);
    } else {
      char rpm[24], tpm[24], day[24], month[24];
      limit_text(a, "rpm", rpm);
      limit_text(a, "tpm", tpm);
      limit_text(a, "budget_day", day);
      limit_text(a, "budget_month", month);
      printf("updated token %s (%s) on every node: rpm %s, tpm %s, budget_day %s, budget_month "
             "%s\n",
             str(a, "id"), str(a, "name"), rpm, tpm, day, month);
    }
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "create") && argc >= 2) {
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "name", argv[1]);
    if (token_limit_options(argc, argv, body, false)) {
      cJSON_Delete(body);
      return 2;
    }
    int rc = cli_call(o, "POST", "/v1/tokens", body, NULL, &a);
    cJSON_Delete(body);
    if (rc) return 1;
    if (o->json)
      print_json(a);
    else {
      printf("%s\n", str(a, "token"));
      fprintf(stderr, "created token %s (%s); it is shown once: store it now\n", str(a, "id"),
              str(a, "name"));
    }
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "list")) {
    if (cli_call(o, "GET", "/v1/tokens", NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else {
      printf("%-14s %-20s %-10s %-21s %-21s %6s %9s %11s %13s %s\n", "ID", "NAME", "SHA256",
             "CREATED", "EXPIRES", "RPM", "TPM", "BUDGET_DAY", "BUDGET_MONTH", "ALLOW");
      const cJSON *t;
      cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(a, "tokens")) {
        char created[32], expires[32];
        when(num(t, "created_at", 0), created);
        when(num(t, "expires_at", 0), expires);
        char allow[256] = "";
        const cJSON *c;
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(t, "allow")) {
          if (allow[0]) strncat(allow, ",", sizeof(allow) - strlen(allow) - 1);
          strncat(allow, c->valuestring, sizeof(allow) - strlen(allow) - 1);
        }
        char rpm[24], tpm[24], day[24], month[24];
        limit_text(t, "rpm", rpm);
        limit_text(t, "tpm", tpm);
        limit_text(t, "budget_day", day);
        limit_text(t, "budget_month", month);
        printf("%-14s %-20s %-10s %-21s %-21s %6s %9s %11s %13s %s\n", str(t, "id"), str(t, "name"),
               str(t, "sha256_prefix"), created, expires, rpm, tpm, day, month,
               allow[0] ? allow : "any");
      }
    }
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "revoke") && argc >= 2) {
    char path[256];
    snprintf(path, sizeof(path), "/v1/tokens/%s", argv[1]);
    if (cli_call(o, "DELETE", path, NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else
      printf("revoked token %s on every node\n", argv[1]);
    cJSON_Delete(a);
    return 0;
  }
  fprintf(stderr,
          "usage: zonegate tokens create NAME [--expires-in 30d] [--rpm N] [--tpm N] "
          "[--budget-day N] [--budget-month N] [--allow CIDR]...\n"
          "       zonegate tokens update ID|NAME [--rpm N] [--tpm N] [--budget-day N] "
          "[--budget-month N] [--expires-in 30d|0] [--allow CIDR|any]...\n"
          "       zonegate tokens list | revoke ID\n"
          "(limits: 0 = none; tpm and budgets count tokens, budgets per UTC day / month)\n");
  return 2;
}

static int cmd_audit(const struct cli_options *o, int argc, char **argv) {
  char path[128];
  const char *limit = opt(argc, argv, "--limit");
  snprintf(path, sizeof(path), "/v1/audit?limit=%s", limit ? limit : "50");
  cJSON *a;
  if (cli_call(o, "GET", path, NULL, NULL, &a)) return 1;
  if (o->json)
    print_json(a);
  else {
    printf("%-5s %-21s %-16s %-16s %-14s %-16s %s\n", "SEQ", "AT", "ACTOR", "SOURCE", "ACTION",
           "TARGET", "DETAIL");
    const cJSON *r;
    cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(a, "audit")) {
      char at[32];
      when(num(r, "at", 0), at);
      printf("%-5.0f %-21s %-16s %-16s %-14s %-16s %s\n", num(r, "seq", 0), at, str(r, "actor"),
             str(r, "source"), str(r, "action"), str(r, "target"), str(r, "detail"));
    }
  }
  cJSON_Delete(a);
  return 0;
}

static int cmd_members(const struct cli_options *o, int argc, char **argv) {
  const char *sub = argc >= 1 ? argv[0] : "";
  cJSON *a;
  if (!strcmp(sub, "add") && argc >= 2 && opt(argc, argv, "--raft")) {
    cJSON *body = cJSON_CreateObject();
    cJSON_AddStringToObject(body, "id", argv[1]);
    cJSON_AddStringToObject(body, "raft", opt(argc, argv, "--raft"));
    const char *fields[][2] = {
        {"--zone", "zone"}, {"--role", "role"}, {"--admin", "admin"}, {"--gateway", "gateway"}};
    for (size_t i = 0; i < ZG_ARRAY_LEN(fields); i++)
      if (opt(argc, argv, fields[i][0]))
        cJSON_AddStringToObject(body, fields[i][1], opt(argc, argv, fields[i][0]));
    int rc = cli_call(o, "POST", "/v1/cluster/members", body, NULL, &a);
    cJSON_Delete(body);
    if (rc) return 1;
    if (o->json)
      print_json(a);
    else
      printf("added %s: it joins as a non-voter and is promoted once caught up\n", argv[1]);
    cJSON_Delete(a);
    return 0;
  }
  if (!strcmp(sub, "remove") && argc >= 2) {
    char path[256];
    snprintf(path, sizeof(path), "/v1/cluster/members/%s", argv[1]);
    if (cli_call(o, "DELETE", path, NULL, NULL, &a)) return 1;
    if (o->json)
      print_json(a);
    else
      printf("removed %s from the group\n", argv[1]);
    cJSON_Delete(a);
    return 0;
  }
  fprintf(stderr,
          "usage: zonegate members add ID --raft HOST:PORT [--zone Z] [--role gateway|witness] "
          "[--admin HOST:PORT] [--gateway HOST:PORT]\n"
          "       zonegate members remove ID\n");
  return 2;
}

static void usage_line(const char *token, const char *model, const cJSON *c) {
  printf("%-20s %-28s %9.0f %12.0f %12.0f %12.0f %10.0f %10.0f %8.0f\n", token, model,
         num(c, "requests", 0), num(c, "prompt", 0), num(c, "completion", 0), num(c, "total", 0),
         num(c, "cached", 0), num(c, "reasoning", 0), num(c, "unknown", 0));
}

/* zonegate usage [--token NAME] [--model M] [--since 24h|7d|all]: token
 * usage per client token and model from the replicated counters. */
static int cmd_usage(const struct cli_options *o, const char *token, int argc, char **argv) {
  if (argc > 0 && strncmp(argv[0], "--", 2)) {
    fprintf(stderr, "usage: zonegate usage [--token NAME] [--model M] [--since 24h|7d|30m|all] "
                    "[--json]\n");
    return 2;
  }
  CURL *curl = curl_easy_init();
  if (!curl) return 1;
  const char *model = opt(argc, argv, "--model");
  const char *since = opt(argc, argv, "--since");
  char *t = token ? curl_easy_escape(curl, token, 0) : NULL;
  char *m = model ? curl_easy_escape(curl, model, 0) : NULL;
  char *s = curl_easy_escape(curl, since ? since : "24h", 0);
  char path[1024];
  snprintf(path, sizeof(path), "/v1/usage?since=%s%s%s%s%s", s ? s : "24h", t ? "&token=" : "",
           t ? t : "", m ? "&model=" : "", m ? m : "");
  curl_free(t);
  curl_free(m);
  curl_free(s);
  curl_easy_cleanup(curl);
  cJSON *a;
  if (cli_call(o, "GET", path, NULL, NULL, &a)) return 1;
  if (o->json) {
    print_json(a);
    cJSON_Delete(a);
    return 0;
  }
  printf("usage over %s%s (tokens as the upstream reported them)\n",
         since && !strcmp(since, "all") ? "everything kept" : "the last ",
         since && !strcmp(since, "all") ? "" : (since ? since : "24h"));
  printf("%-20s %-28s %9s %12s %12s %12s %10s %10s %8s\n", "TOKEN", "MODEL", "REQUESTS", "PROMPT",
         "COMPLETION", "TOTAL", "CACHED", "REASONING", "UNKNOWN");
  const cJSON *r;
  cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(a, "rows"))
      usage_line(str(r, "token"), str(r, "model"), r);
  usage_line("(sum)", "", cJSON_GetObjectItemCaseSensitive(a, "sum"));
  cJSON_Delete(a);
  return 0;
}

static int cmd_switchover(const struct cli_options *o, int argc, char **argv) {
  cJSON *body = cJSON_CreateObject();
  if (opt(argc, argv, "--to")) cJSON_AddStringToObject(body, "to", opt(argc, argv, "--to"));
  cJSON *a;
  uint64_t start = zg_mono_ms();
  int rc = cli_call(o, "POST", "/v1/cluster/switchover", body, NULL, &a);
  cJSON_Delete(body);
  if (rc) return 1;
  if (o->json)
    print_json(a);
  else
    printf("switchover done in %llu ms: new leader %s\n",
           (unsigned long long)(zg_mono_ms() - start), str(a, "leader"));
  cJSON_Delete(a);
  return 0;
}

int node_cli(const char *command, int argc, char **argv) {
  struct cli_options o;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  /* `zonegate usage --token NAME` names a client token: taken out before
   * the common options (the admin token: --admin-token or
   * ZONEGATE_ADMIN_TOKEN). */
  const char *usage_token = NULL;
  if (!strcmp(command, "usage")) {
    int out = 0;
    for (int i = 0; i < argc; i++) {
      if (!strcmp(argv[i], "--token") && i + 1 < argc)
        usage_token = argv[++i];
      else
        argv[out++] = argv[i];
    }
    argc = out;
  }
  cli_options_parse(&o, &argc, argv);
  /* argv[0] is the command itself */
  int rc = check_command_options(command, argc - 1, argv + 1);
  if (rc) {
    memset(o.token, 0, sizeof(o.token));
    curl_global_cleanup();
    return rc;
  }
  if (!strcmp(command, "status"))
    rc = cmd_status(&o);
  else if (!strcmp(command, "config"))
    rc = cmd_config(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "keys"))
    rc = cmd_keys(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "tokens"))
    rc = cmd_tokens(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "audit"))
    rc = cmd_audit(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "members"))
    rc = cmd_members(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "switchover"))
    rc = cmd_switchover(&o, argc - 1, argv + 1);
  else if (!strcmp(command, "usage"))
    rc = cmd_usage(&o, usage_token, argc - 1, argv + 1);
  else {
    fprintf(stderr, "zonegate: unknown command '%s' (see zonegate --help)\n", command);
    rc = 2;
  }
  memset(o.token, 0, sizeof(o.token));
  curl_global_cleanup();
  return rc;
}
