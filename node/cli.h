/* cli.h (private to node/): the admin API client shared by cli.c and
 * drill.c. */
#ifndef ZG_NODE_CLI_H
#define ZG_NODE_CLI_H

#include <stdbool.h>

struct cJSON;

struct cli_options {
  char addr[256];
  char token[512];
  char ca[512]; /* --ca / ZONEGATE_CA: the cluster CA; then the admin API is reached over TLS */
  bool json;
  bool quiet; /* cli_call prints no error (callers that retry elsewhere) */
};

/* Reads --addr, --token, --ca, --json (and ZONEGATE_ADDR /
 * ZONEGATE_ADMIN_TOKEN / ZONEGATE_CA)
 * and removes them from argv. */
void cli_options_parse(struct cli_options *o, int *argc, char **argv);
/* Refuses what a subcommand does not know (exit code 2 for the caller):
 * every argument starting with "--" in argv[0..argc) must be one of
 * `known` (NULL-terminated; a trailing '=' marks an option that takes a
 * value, which must follow it). what names the subcommand in the error
 * ("zonegate tokens create"). Returns 0, or 2 after printing one line on
 * stderr naming the unknown option and the nearest known one. The options
 * every CLI command takes (--json, --addr, --token) are removed by
 * cli_options_parse first. */
int cli_check_options(const char *what, int argc, char *const *argv, const char *const *known);
/* One admin API call. 0 with *answer (caller frees), or -1 after printing
 * a clear error. */
/* Sets the TLS options of a curl handle talking to the admin API (no-op
 * without a CA) and returns the URL scheme, "https" or "http". */
typedef void CURL;
const char *cli_tls_setup(const struct cli_options *o, CURL *curl);
int cli_call(const struct cli_options *o, const char *method, const char *path,
             const struct cJSON *body, const char *const *extra_headers, struct cJSON **answer);

#endif
