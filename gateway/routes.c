/* routes.c: parsing and lookup of the `models` table (see routes.h). A
 * table of at most ROUTES_MAX_MODELS models is searched linearly (names
 * are compared once per request). Failure: a malformed table is refused
 * as a whole with the path of the first problem; nothing half-applies.
 */
#include "gateway/routes.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void routes_base_url(const char *url, char *out, size_t size) {
  size_t len = strlen(url);
  while (len > 0 && url[len - 1] == '/') len--;
  /* "https://api.example.com" and "https://api.example.com/v1" are the same */
  if (len >= 3 && strncmp(url + len - 3, "/v1", 3) == 0) len -= 3;
  snprintf(out, size, "%.*s/v1", (int)len, url);
}

static int bad(char *err, size_t errlen, const char *path, const char *what) {
  snprintf(err, errlen, "%s: %s", path, what);
  return -1;
}

static bool is_reference(const char *s) {
  return !strncmp(s, "env:", 4) || !strncmp(s, "file:", 5);
}

static int copy_name(const cJSON *v, char *out, size_t size, const char *path, char *err,
                     size_t errlen) {
  if (!cJSON_IsString(v) || !v->valuestring[0])
    return bad(err, errlen, path, "expected a non-empty string");
  if (strlen(v->valuestring) >= size) return bad(err, errlen, path, "too long");
  snprintf(out, size, "%s", v->valuestring);
  return 0;
}

static int parse_endpoint(const cJSON *e, struct route_endpoint *ep, const char *path, char *err,
                          size_t errlen) {
  char p[200];
  if (!cJSON_IsObject(e)) return bad(err, errlen, path, "expected an object");
  const cJSON *f;
  cJSON_ArrayForEach(f, e) {
    if (strcmp(f->string, "endpoint") && strcmp(f->string, "keys") && strcmp(f->string, "model")) {
      snprintf(p, sizeof(p), "%.120s.%.60s", path, f->string);
      return bad(err, errlen, p,
                 !strcmp(f->string, "api_key")
                     ? "a secret never goes into the replicated config: add the key with "
                       "`zonegate keys add --id ID` and list its id in \"keys\""
                     : "unknown key (known: endpoint, keys, model)");
    }
  }
  const cJSON *url = cJSON_GetObjectItemCaseSensitive(e, "endpoint");
  snprintf(p, sizeof(p), "%.120s.endpoint", path);
  if (!cJSON_IsString(url) ||
      (strncmp(url->valuestring, "http://", 7) && strncmp(url->valuestring, "https://", 8)))
    return bad(err, errlen, p, "expected an http:// or https:// URL");
  if (strlen(url->valuestring) > 400) return bad(err, errlen, p, "too long");
  routes_base_url(url->valuestring, ep->base_url, sizeof(ep->base_url));
  const cJSON *keys = cJSON_GetObjectItemCaseSensitive(e, "keys");
  snprintf(p, sizeof(p), "%.120s.keys", path);
  if (keys && !cJSON_IsArray(keys)) return bad(err, errlen, p, "expected an array of key ids");
  const cJSON *k;
  cJSON_ArrayForEach(k, keys) {
    if (ep->n_keys >= ROUTE_MAX_KEYS) return bad(err, errlen, p, "at most 8 keys");
    if (cJSON_IsString(k) && is_reference(k->valuestring))
      return bad(err, errlen, p, "key ids, not secrets or secret references");
    if (copy_name(k, ep->keys[ep->n_keys], sizeof(ep->keys[0]), p, err, errlen)) return -1;
    ep->n_keys++;
  }
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(e, "model");
  snprintf(p, sizeof(p), "%.120s.model", path);
  if (model && copy_name(model, ep->model, sizeof(ep->model), p, err, errlen)) return -1;
  return 0;
}

static int parse_model(const cJSON *m, struct model_route *r, const char *path, char *err,
                       size_t errlen) {
  char p[200];
  if (!cJSON_IsObject(m)) return bad(err, errlen, path, "expected an object");
  const cJSON *f;
  cJSON_ArrayForEach(f, m) {
    if (strcmp(f->string, "name") && strcmp(f->string, "aliases") &&
        strcmp(f->string, "endpoints")) {
      snprintf(p, sizeof(p), "%.120s.%.60s", path, f->string);
      return bad(err, errlen, p, "unknown key (known: name, aliases, endpoints)");
    }
  }
  snprintf(p, sizeof(p), "%.120s.name", path);
  if (copy_name(cJSON_GetObjectItemCaseSensitive(m, "name"), r->name, sizeof(r->name), p, err,
                errlen))
    return -1;
  const cJSON *aliases = cJSON_GetObjectItemCaseSensitive(m, "aliases");
  snprintf(p, sizeof(p), "%.120s.aliases", path);
  if (aliases && !cJSON_IsArray(aliases)) return bad(err, errlen, p, "expected an array of names");
  const cJSON *a;
  cJSON_ArrayForEach(a, aliases) {
    if (r->n_aliases >= ROUTE_MAX_ALIASES) return bad(err, errlen, p, "at most 8 aliases");
    if (copy_name(a, r->aliases[r->n_aliases], sizeof(r->aliases[0]), p, err, errlen)) return -1;
    r->n_aliases++;
  }
  const cJSON *eps = cJSON_GetObjectItemCaseSensitive(m, "endpoints");
  snprintf(p, sizeof(p), "%.120s.endpoints", path);
  if (!cJSON_IsArray(eps) || cJSON_GetArraySize(eps) == 0)
    return bad(err, errlen, p, "expected a non-empty array of endpoints");
  const cJSON *e;
  cJSON_ArrayForEach(e, eps) {
    if (r->n_endpoints >= ROUTE_MAX_ENDPOINTS) return bad(err, errlen, p, "at most 4 endpoints");
    char ep_path[200];
    snprintf(ep_path, sizeof(ep_path), "%.120s.endpoints[%zu]", path, r->n_endpoints);
    if (parse_endpoint(e, &r->endpoints[r->n_endpoints], ep_path, err, errlen)) return -1;
    r->n_endpoints++;
  }
  return 0;
}

int routes_parse(const cJSON *models, struct routes *out, char *err, size_t errlen) {
  memset(out, 0, sizeof(*out));
  if (!models || cJSON_IsNull(models)) return 0;
  if (!cJSON_IsArray(models)) return bad(err, errlen, "models", "expected an array");
  size_t n = (size_t)cJSON_GetArraySize(models);
  if (n > ROUTES_MAX_MODELS) return bad(err, errlen, "models", "at most 64 models");
  if (n == 0) return 0;
  out->models = calloc(n, sizeof(*out->models));
  if (!out->models) return bad(err, errlen, "models", "out of memory");
  const cJSON *m;
  cJSON_ArrayForEach(m, models) {
    char path[64];
    snprintf(path, sizeof(path), "models[%zu]", out->n);
    struct model_route *r = &out->models[out->n];
    if (parse_model(m, r, path, err, errlen)) goto fail;
    /* names and aliases are unique across the table */
    for (size_t i = 0; i <= r->n_aliases; i++) {
      const char *name = i == 0 ? r->name : r->aliases[i - 1];
      const struct model_route *other = NULL;
      for (size_t j = 0; j < out->n && !other; j++)
        other = routes_find(&(struct routes){&out->models[j], 1}, name);
      for (size_t k = 0; k < i && !other; k++)
        if (!strcmp(k == 0 ? r->name : r->aliases[k - 1], name)) other = r;
      if (other) {
        char what[200];
        snprintf(what, sizeof(what), "the name \"%.120s\" is used twice", name);
        bad(err, errlen, path, what);
        goto fail;
      }
    }
    out->n++;
  }
  return 0;
fail:
  routes_free(out);
  return -1;
}

void routes_free(struct routes *r) {
  free(r->models);
  r->models = NULL;
  r->n = 0;
}

const struct model_route *routes_find(const struct routes *r, const char *model) {
  if (!model || !model[0]) return NULL;
  for (size_t i = 0; i < r->n; i++) {
    const struct model_route *m = &r->models[i];
    if (!strcmp(m->name, model)) return m;
    for (size_t a = 0; a < m->n_aliases; a++)
      if (!strcmp(m->aliases[a], model)) return m;
  }
  return NULL;
}

void routes_names(const struct routes *r, char *out, size_t size) {
  size_t n = 0;
  out[0] = '\0';
  for (size_t i = 0; i < r->n && n + 1 < size; i++)
    n += (size_t)snprintf(out + n, size - n, "%s%s", i ? ", " : "", r->models[i].name);
  if (n >= size && size > 4) strcpy(out + size - 4, "...");
}

static cJSON *model_object(const char *id) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "id", id);
  cJSON_AddStringToObject(o, "object", "model");
  cJSON_AddNumberToObject(o, "created", 0);
  cJSON_AddStringToObject(o, "owned_by", "zonegate");
  return o;
}

char *routes_models_json(const struct routes *r, const char *id) {
  cJSON *doc;
  if (id) {
    const struct model_route *m = routes_find(r, id);
    if (!m) return NULL;
    doc = model_object(id);
  } else {
    doc = cJSON_CreateObject();
    cJSON_AddStringToObject(doc, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(doc, "data");
    for (size_t i = 0; i < r->n; i++) {
      cJSON_AddItemToArray(data, model_object(r->models[i].name));
      for (size_t a = 0; a < r->models[i].n_aliases; a++)
        cJSON_AddItemToArray(data, model_object(r->models[i].aliases[a]));
    }
  }
  char *text = cJSON_PrintUnformatted(doc);
  cJSON_Delete(doc);
  return text;
}
