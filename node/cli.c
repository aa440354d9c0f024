/* cli.c: admin API client subcommands. Filled in with the Raft group. */
#include "node/node.h"

#include <stdio.h>

int node_cli(const char *command, int argc, char **argv) {
  fprintf(stderr, "zonegate: unknown command '%s %s' (see zonegate --help)\n", command,
          argc > 1 ? argv[1] : "");
  return 2;
}
