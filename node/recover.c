/* recover.c: `zonegate recover --force --config FILE [--yes]`, disaster
 * recovery when a majority of the voters is lost for good.
 *
 * It refuses while this node is running or while a majority is reachable
 * (then the right fix is to restart the stopped nodes), prints the local
 * log's term and last index so the operator can pick the survivor with the
 * longest log, says exactly what will happen, asks for confirmation
 * (--yes for scripts), then rewrites the Raft configuration to this node
 * alone (libraft raft_recover) with a new cluster incarnation, so a node
 * that comes back with the old data is refused at the peer handshake.
 * Writes committed only on the lost nodes and not here are lost: that is
 * the price of forcing, and it is said.
 */
#include "base/base.h"
#include "config/config.h"
#include "consensus/consensus.h"
#include "node/cli.h"
#include "node/node.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool http_live(const char *address) {
  if (!address || !address[0]) return false;
  char host[128], url[300];
  int port;
  if (zg_split_host_port(address, host, sizeof(host), &port) != 0) return false;
  if (!strcmp(host, "0.0.0.0") || !strcmp(host, "::")) snprintf(host, sizeof(host), "127.0.0.1");
  snprintf(url, sizeof(url), "http://%s:%d/health/live", host, port);
  CURL *e = curl_easy_init();
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
  curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 1500L);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_NOPROXY, "*");
  long code = 0;
  bool ok = curl_easy_perform(e) == CURLE_OK &&
            curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK && code == 200;
  curl_easy_cleanup(e);
  return ok;
}

/* A peer counts as reachable if its client port answers, or its Raft port
 * accepts a TCP connection. */
static bool tcp_open(const char *address) {
  char host[128], url[300];
  int port;
  if (zg_split_host_port(address, host, sizeof(host), &port) != 0) return false;
  snprintf(url, sizeof(url), "telnet://%s:%d", host, port);
  CURL *e = curl_easy_init();
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
  curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 1500L);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  bool ok = curl_easy_perform(e) == CURLE_OK;
  curl_easy_cleanup(e);
  return ok;
}

int node_recover(int argc, char **argv) {
  const char *config_path = NULL;
  bool force = false, yes = false;
  static const char *const known[] = {"--force", "--yes", "--config=", NULL};
  if (cli_check_options("zonegate recover", argc - 1, argv + 1, known)) return 2;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--force"))
      force = true;
    else if (!strcmp(argv[i], "--yes"))
      yes = true;
    else if (!strcmp(argv[i], "--config") && i + 1 < argc)
      config_path = argv[++i];
    else {
      fprintf(stderr, "usage: zonegate recover --force --config FILE [--yes]\n");
      return 2;
    }
  }
  if (!force || !config_path) {
    fprintf(
        stderr,
        "usage: zonegate recover --force --config FILE [--yes]\n"
        "  rebuilds a one-node cluster from this node's data when a majority of voters is lost.\n");
    return 2;
  }
  char err[1024];
  struct zg_config *cfg = zg_config_load(config_path, err, sizeof(err));
  if (!cfg) {
    fprintf(stderr, "error: %s\n", err);
    return 1;
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  int rc = 1;
  if (http_live(cfg->listen_gateway) || http_live(cfg->advertise_gateway)) {
    fprintf(stderr,
            "error: zonegate is running on this node (%s answers): stop it first (systemctl stop "
            "zonegate "
            "or docker stop), then run recover again\n",
            cfg->listen_gateway);
    goto out;
  }
  size_t voters = cfg->n_peers + 1, reachable = 1;
  printf("cluster of %zu voters; probing the other members:\n", voters);
  for (size_t i = 0; i < cfg->n_peers; i++) {
    const struct zg_peer *p = &cfg->peers[i];
    bool up = http_live(p->gateway) || tcp_open(p->raft);
    if (up) reachable++;
    printf("  %-12s zone %-4s %-8s raft %-22s %s\n", p->id, p->zone, p->role, p->raft,
           up ? "REACHABLE" : "unreachable");
  }
  if (reachable * 2 > voters) {
    fprintf(
        stderr,
        "refused: %zu of %zu voters are reachable, which is a majority. A forced recovery would "
        "split the "
        "cluster. Start the stopped nodes instead (zonegate serve); they rejoin on their own.\n",
        reachable, voters);
    goto out;
  }
  uint64_t term = 0, last = 0;
  if (consensus_inspect_log(cfg->data_dir, cfg->node_id, cfg->advertise_raft, &term, &last, err,
                            sizeof(err)) != 0) {
    fprintf(stderr, "error: %s\n", err);
    goto out;
  }
  printf("\nthis node: %s (zone %s), data %s/raft\n  log: term %llu, last index %llu\n\n",
         cfg->node_id, cfg->zone, cfg->data_dir, (unsigned long long)term,
         (unsigned long long)last);
  printf(
      "This will:\n"
      "  1. rewrite the Raft configuration in %s/raft to this node ALONE (%s), a one-voter "
      "cluster;\n"
      "  2. give it a new cluster incarnation: nodes that still hold the old data are refused\n"
      "     when they connect (they log what to do) and must be re-added with an empty data dir;\n"
      "  3. after `zonegate serve`, this node becomes active by itself;\n"
      "  4. writes that were committed only on the lost nodes and not here are LOST.\n"
      "Before you go on:\n"
      "  - run it on the survivor with the HIGHEST term and then the LONGEST log (compare the line "
      "above\n"
      "    on every survivor: `zonegate recover --force --config ...` and answer no);\n"
      "  - make sure the lost nodes cannot come back with their old data (wipe their data dirs);\n"
      "  - afterwards re-add each other node with an EMPTY data dir: zonegate members add ID "
      "--raft HOST:PORT ...\n\n",
      cfg->data_dir, cfg->node_id);
  if (!yes) {
    printf("Type 'recover' to continue: ");
    fflush(stdout);
    char answer[64] = "";
    if (!fgets(answer, sizeof(answer), stdin) || strncmp(answer, "recover", 7) != 0) {
      printf("aborted; nothing was changed\n");
      rc = 1;
      goto out;
    }
  }
  if (consensus_recover_single(cfg->data_dir, cfg->node_id, cfg->advertise_raft, err,
                               sizeof(err)) != 0) {
    fprintf(stderr, "error: %s\n", err);
    goto out;
  }
  printf("recovered: %s is now the only voter, in a new cluster incarnation. Start it with "
         "`zonegate serve --config %s`,\nthen re-add each other node with an EMPTY data dir "
         "(`cluster.join: true` in its config) and `zonegate members add`.\n",
         cfg->node_id, config_path);
  rc = 0;
out:
  curl_global_cleanup();
  zg_config_free(cfg);
  return rc;
}
