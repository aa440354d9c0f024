/* config_cmd.c: `zonegate config check FILE` validates a config file the
 * way `serve` would and prints the effective config (defaults filled in)
 * with every literal secret masked. Exit 1 with the error on a bad file.
 * `zonegate config reference` prints the key reference (markdown). */
#include "base/base.h"
#include "config/config.h"
#include "node/node.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_warning(void *ud, const char *path, const char *msg) {
  fprintf(stderr, "warning: %s: %s: %s\n", (const char *)ud, path, msg);
}

int node_config_command(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "check")) {
    if (argc != 3) {
      fprintf(stderr, "usage: zonegate config check FILE\n");
      return 2;
    }
    char err[1024];
    struct zg_config *cfg = zg_config_load(argv[2], err, sizeof(err));
    if (!cfg) {
      fprintf(stderr, "error: %s\n", err);
      return 1;
    }
    zg_config_warnings(cfg, print_warning, argv[2]);
    char *dump = zg_config_dump_masked(cfg);
    printf("%s\n", dump);
    free(dump);
    fprintf(stderr, "%s: OK\n", argv[2]);
    zg_config_free(cfg);
    return 0;
  }
  if (argc >= 2 && !strcmp(argv[1], "reference")) {
    char *text = zg_config_reference_markdown();
    printf("%s", text);
    free(text);
    return 0;
  }
  return node_cli("config", argc, argv);
}
