/* main.c: the zonegate command line. Parses the subcommand and hands over
 * to it; unknown commands and flags print usage and exit 2. */
#include "config/config.h"
#include "failover/failover.h"
#include "gateway/gateway.h"
#include "alerts/alerts.h"
#include "node/node.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *out) {
  fprintf(
      out,
      "zonegate %s: OpenAI-compatible AI chat gateway, active/standby across zones\n"
      "\n"
      "Usage:\n"
      "  zonegate serve --config FILE       run a node (default FILE: /app/config.json)\n"
      "  zonegate config check FILE         validate FILE, print it with secrets masked\n"
      "  zonegate certs init DIR --nodes ID,... [--hosts H,...] [--days N]\n"
      "                                     cluster CA + a TLS certificate and key per node\n"
      "  zonegate certs init DIR --nodes ID,... [--hosts H,...]\n"
      "                                     cluster CA + a TLS certificate and key per node\n"
      "\n"
      "Cluster administration (admin API; --addr HOST:PORT or ZONEGATE_ADDR, default "
      "127.0.0.1:18790;\n"
      "--token or ZONEGATE_ADMIN_TOKEN; --json for scripts):\n"
      "  zonegate status                    members, leader, term, lag\n"
      "  zonegate config get | apply FILE [--if-match VERSION]\n"
      "  zonegate keys list | add | rotate ID | revoke ID   provider keys (secret from "
      "stdin/file/env)\n"
      "  zonegate tokens create NAME [--expires-in 30d] [--rpm N] [--tpm N] [--budget-day N]\n"
      "                [--budget-month N] [--allow CIDR] | update ID|NAME [same options] | list |\n"
      "                revoke ID\n"
      "  zonegate usage [--token NAME] [--model M] [--since 24h|7d|all]   token usage\n"
      "                                     (here --token names a client token; the admin token\n"
      "                                     then comes from --admin-token or "
      "ZONEGATE_ADMIN_TOKEN)\n"
      "  zonegate audit [--limit N]\n"
      "  zonegate members add ID --raft HOST:PORT [...] | remove ID\n"
      "  zonegate switchover [--to NODE]    planned handover of the active role\n"
      "  zonegate drill switchover|crash|freeze|isolate --lb URL [--duration S] [--json]\n"
      "                                     failover rehearsal: timeline, RTO, failed requests, "
      "RPO\n"
      "  zonegate recover --force --config FILE [--yes]\n"
      "                                     quorum lost for good: rebuild a one-node cluster here\n"
      "\n"
      "  zonegate --version | --help\n"
      "\n"
      "Exit status: 0 ok, 1 failure, 2 usage error.\n",
      ZG_VERSION);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  node_disable_core_dumps();
  const char *cmd = argv[1];
  zg_config_set_validator("alerts", alerts_validate);
  zg_config_set_validator("models", gateway_models_validate);
  if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
    printf("zonegate %s\n", ZG_VERSION);
    return 0;
  }
  if (!strcmp(cmd, "serve")) return node_serve(argc - 1, argv + 1);
  if (!strcmp(cmd, "config")) return node_config_command(argc - 1, argv + 1);
  if (!strcmp(cmd, "drill")) return node_drill(argc - 1, argv + 1);
  if (!strcmp(cmd, "recover")) return node_recover(argc - 1, argv + 1);
  if (!strcmp(cmd, "certs")) return node_certs(argc - 1, argv + 1);
  if (!strcmp(cmd, "status") || !strcmp(cmd, "keys") || !strcmp(cmd, "tokens") ||
      !strcmp(cmd, "audit") || !strcmp(cmd, "members") || !strcmp(cmd, "switchover") ||
      !strcmp(cmd, "usage"))
    return node_cli(cmd, argc - 1, argv + 1);
  fprintf(stderr, "zonegate: unknown command '%s'\n\n", cmd);
  usage(stderr);
  return 2;
}
