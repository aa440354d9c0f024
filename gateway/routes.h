/* gateway/routes: private to the gateway module. The replicated `models`
 * table (model routing): a client-visible model name and its aliases map
 * to an ordered list of upstream endpoints, each with its own provider
 * keys (ids from the sealed key store: replicated config never holds a
 * secret) and an optional upstream model name. Empty table: every model
 * goes to `endpoint` (the guide's single-upstream form).
 *
 * Shape (config key "models"):
 *   [{"name": "gpt-4o", "aliases": ["default"],
 *     "endpoints": [{"endpoint": "https://api.example.com", "keys": ["key-a"],
 *                    "model": "gpt-4o-2024-08-06"}, ...]}, ...]
 */
#ifndef ZG_GATEWAY_ROUTES_H
#define ZG_GATEWAY_ROUTES_H

#include <stdbool.h>
#include <stddef.h>

struct cJSON;

#define ROUTES_MAX_MODELS 64
#define ROUTE_MAX_ALIASES 8
#define ROUTE_MAX_ENDPOINTS 4
#define ROUTE_MAX_KEYS 8

struct route_endpoint {
  char base_url[512];            /* ".../v1", as endpoint_set makes it */
  char keys[ROUTE_MAX_KEYS][48]; /* provider key ids, in order */
  size_t n_keys;                 /* 0: the config file's api_key */
  char model[128];               /* upstream model name; "" = the client's */
};

struct model_route {
  char name[128];
  char aliases[ROUTE_MAX_ALIASES][128];
  size_t n_aliases;
  struct route_endpoint endpoints[ROUTE_MAX_ENDPOINTS];
  size_t n_endpoints;
};

struct routes {
  struct model_route *models; /* owned; n of them */
  size_t n;
};

/* Parses the "models" value (NULL or absent = an empty table). Returns 0,
 * or -1 with err naming the JSON path ("models[1].endpoints[0].keys") and
 * what is wrong; *out is then empty. Names and aliases are unique across
 * the table; endpoints are http(s) URLs; no secret (or secret reference)
 * may appear. Free with routes_free. */
int routes_parse(const struct cJSON *models, struct routes *out, char *err, size_t errlen);
void routes_free(struct routes *r);

/* The route of a client-visible model name or alias, or NULL. */
const struct model_route *routes_find(const struct routes *r, const char *model);

/* "a, b, c": the known names (for an unknown-model error), into out[size]. */
void routes_names(const struct routes *r, char *out, size_t size);

/* The /v1/models answer (OpenAI's list shape) from the table, or with id
 * the one model object (NULL when unknown). Caller frees. */
char *routes_models_json(const struct routes *r, const char *id);

/* Normalises an endpoint URL to its ".../v1" base into out[size]. */
void routes_base_url(const char *url, char *out, size_t size);

#endif
