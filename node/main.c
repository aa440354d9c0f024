/* main.c: the zonegate command line. Parses the subcommand and hands over
 * to it; unknown commands and flags print usage and exit 2. */
#include "node/node.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *out) {
  fprintf(out,
          "zonegate %s: OpenAI-compatible AI chat gateway, active/standby across zones\n"
          "\n"
          "Usage:\n"
          "  zonegate serve --config FILE       run a node (default FILE: /app/config.json)\n"
          "  zonegate config check FILE         validate FILE, print it with secrets masked\n"
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
  const char *cmd = argv[1];
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
  fprintf(stderr, "zonegate: unknown command '%s'\n\n", cmd);
  usage(stderr);
  return 2;
}
