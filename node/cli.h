/* cli.h (private to node/): the admin API client shared by cli.c and
 * drill.c. */
#ifndef ZG_NODE_CLI_H
#define ZG_NODE_CLI_H

#include <stdbool.h>

struct cJSON;

struct cli_options {
  char addr[256];
  char token[512];
  bool json;
  bool quiet; /* cli_call prints no error (callers that retry elsewhere) */
};

/* Reads --addr, --token, --json (and ZONEGATE_ADDR / ZONEGATE_ADMIN_TOKEN)
 * and removes them from argv. */
void cli_options_parse(struct cli_options *o, int *argc, char **argv);
/* One admin API call. 0 with *answer (caller frees), or -1 after printing
 * a clear error. */
int cli_call(const struct cli_options *o, const char *method, const char *path,
             const struct cJSON *body, const char *const *extra_headers, struct cJSON **answer);

#endif
