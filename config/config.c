/* config.c: load, validate and default the JSON config by walking the
 * schema table. Fails with one message naming the file, the JSON path,
 * what was expected and what was found (and the nearest known key for an
 * unknown one). Never partially applies: a config either loads whole or
 * not at all. */
#include "config/config.h"

#include "base/base.h"
#include "config/schema.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct parse_ctx {
  const char *origin;
  char *err;
  size_t errlen;
};

/* Free-form sections are validated by the module that owns them. */
static struct {
  const char *section;
  int (*validate)(const cJSON *v, char *err, size_t errlen);
} validators[4];
static size_t n_validators;

void zg_config_set_validator(const char *section,
                             int (*validate)(const struct cJSON *v, char *err, size_t errlen)) {
  if (n_validators < sizeof(validators) / sizeof(validators[0])) {
    validators[n_validators].section = section;
    validators[n_validators].validate = validate;
    n_validators++;
  }
}

static const struct schema_entry *schema_find(const char *path) {
  for (size_t i = 0; i < zg_schema_len; i++)
    if (strcmp(zg_schema[i].path, path) == 0) return &zg_schema[i];
  return NULL;
}

static const char *json_type_name(const cJSON *v) {
  if (cJSON_IsString(v)) return "a string";
  if (cJSON_IsNumber(v)) return "a number";
  if (cJSON_IsBool(v)) return "a boolean";
  if (cJSON_IsNull(v)) return "null";
  if (cJSON_IsArray(v)) return "an array";
  if (cJSON_IsObject(v)) return "an object";
  return "an invalid value";
}

static void describe_found(const cJSON *v, char *out, size_t outlen) {
  if (cJSON_IsString(v))
    snprintf(out, outlen, "\"%.60s\" (a string)", v->valuestring);
  else if (cJSON_IsNumber(v))
    snprintf(out, outlen, "%g (a number)", v->valuedouble);
  else
    snprintf(out, outlen, "%s", json_type_name(v));
}

static int fail(struct parse_ctx *ctx, const char *path, const char *expected, const cJSON *found) {
  char found_text[128];
  describe_found(found, found_text, sizeof(found_text));
  snprintf(ctx->err, ctx->errlen, "%s: %s: expected %s, found %s", ctx->origin, path, expected,
           found_text);
  return -1;
}

/* Nearest known key among the children of `parent` (schema paths). */
static const char *suggest_key(const char *parent, const char *key) {
  size_t plen = strlen(parent);
  const char *best = NULL;
  size_t best_distance = (size_t)-1;
  for (size_t i = 0; i < zg_schema_len; i++) {
    const char *p = zg_schema[i].path;
    const char *leaf;
    if (plen == 0) {
      if (strchr(p, '.')) continue;
      leaf = p;
    } else {
      if (strncmp(p, parent, plen) != 0 || p[plen] != '.') continue;
      leaf = p + plen + 1;
      if (strchr(leaf, '.')) continue;
    }
    size_t d = zg_edit_distance(key, leaf);
    if (d < best_distance) {
      best_distance = d;
      best = leaf;
    }
  }
  /* A key that exists elsewhere in the tree is a likelier typo of place. */
  if (best_distance > 2) {
    for (size_t i = 0; i < zg_schema_len; i++) {
      const char *dot = strrchr(zg_schema[i].path, '.');
      const char *leaf = dot ? dot + 1 : zg_schema[i].path;
      if (strcmp(leaf, key) == 0 && !strstr(zg_schema[i].path, "[]")) return zg_schema[i].path;
    }
  }
  return best_distance <= 4 ? best : NULL;
}

static bool enum_allows(const char *values, const char *v) {
  size_t vlen = strlen(v);
  const char *p = values;
  while (p && *p) {
    const char *bar = strchr(p, '|');
    size_t len = bar ? (size_t)(bar - p) : strlen(p);
    if (len == vlen && strncmp(p, v, len) == 0) return true;
    p = bar ? bar + 1 : NULL;
  }
  return false;
}

static int check_value(struct parse_ctx *ctx, const struct schema_entry *e, const char *path,
                       cJSON *v);

static int walk_object(struct parse_ctx *ctx, const char *schema_path, const char *json_path,
                       cJSON *obj) {
  for (cJSON *child = obj->child; child; child = child->next) {
    char sp[256], jp[256];
    snprintf(sp, sizeof(sp), "%s%s%s", schema_path, *schema_path ? "." : "", child->string);
    snprintf(jp, sizeof(jp), "%s%s%s", json_path, *json_path ? "." : "", child->string);
    const struct schema_entry *e = schema_find(sp);
    if (!e) {
      const char *hint = suggest_key(schema_path, child->string);
      if (hint)
        snprintf(ctx->err, ctx->errlen, "%s: %s: unknown key \"%s\" (did you mean \"%s\"?)",
                 ctx->origin, jp, child->string, hint);
      else
        snprintf(ctx->err, ctx->errlen, "%s: %s: unknown key \"%s\"", ctx->origin, jp,
                 child->string);
      return -1;
    }
    if (check_value(ctx, e, jp, child) != 0) return -1;
  }
  return 0;
}

static int check_value(struct parse_ctx *ctx, const struct schema_entry *e, const char *path,
                       cJSON *v) {
  char expected[256];
  switch (e->kind) {
  case K_ANY:
    for (size_t i = 0; i < n_validators; i++) {
      if (strcmp(e->path, validators[i].section) != 0) continue;
      char section_err[512];
      if (validators[i].validate(v, section_err, sizeof(section_err)) != 0) {
        snprintf(ctx->err, ctx->errlen, "%s: %s", ctx->origin, section_err);
        return -1;
      }
    }
    return 0;
  case K_OBJECT:
    if (!cJSON_IsObject(v)) return fail(ctx, path, "an object", v);
    return walk_object(ctx, e->path, path, v);
  case K_ARRAY: {
    if (!cJSON_IsArray(v)) return fail(ctx, path, "an array of objects", v);
    int n = cJSON_GetArraySize(v);
    if (n > e->max) {
      snprintf(expected, sizeof(expected), "at most %g entries", e->max);
      snprintf(ctx->err, ctx->errlen, "%s: %s: expected %s, found %d", ctx->origin, path, expected,
               n);
      return -1;
    }
    char element_schema[256];
    snprintf(element_schema, sizeof(element_schema), "%s[]", e->path);
    int i = 0;
    for (cJSON *item = v->child; item; item = item->next, i++) {
      char jp[256];
      snprintf(jp, sizeof(jp), "%.200s[%d]", path, i);
      if (!cJSON_IsObject(item)) return fail(ctx, jp, "an object", item);
      if (walk_object(ctx, element_schema, jp, item) != 0) return -1;
    }
    return 0;
  }
  case K_STRING:
  case K_SECRET:
  case K_URL:
  case K_ADDR:
  case K_ENUM:
  case K_HEX64: {
    if (!cJSON_IsString(v)) return fail(ctx, path, "a string", v);
    const char *s = v->valuestring;
    size_t len = strlen(s);
    if (e->kind == K_STRING && (len < e->min || (e->max > 0 && len > e->max))) {
      snprintf(expected, sizeof(expected), "a string of %g to %g characters", e->min, e->max);
      return fail(ctx, path, expected, v);
    }
    if (e->kind == K_ENUM && !enum_allows(e->enum_values, s)) {
      snprintf(expected, sizeof(expected), "one of %s", e->enum_values);
      return fail(ctx, path, expected, v);
    }
    if (e->kind == K_URL && len > 0 && strncmp(s, "http://", 7) != 0 &&
        strncmp(s, "https://", 8) != 0)
      return fail(ctx, path, "an http:// or https:// base URL (or \"\")", v);
    if (e->kind == K_URL && len >= 512) return fail(ctx, path, "a URL under 512 characters", v);
    if (e->kind == K_SECRET && len >= 512)
      return fail(ctx, path, "a value under 512 characters", v);
    if (e->kind == K_SECRET && (strcmp(s, "env:") == 0 || strcmp(s, "file:") == 0))
      return fail(ctx, path, "env:NAME or file:PATH with a name", v);
    if (e->kind == K_ADDR) {
      char host[128];
      int port;
      if (zg_split_host_port(s, host, sizeof(host), &port) != 0)
        return fail(ctx, path, "host:port (e.g. 0.0.0.0:18789)", v);
    }
    if (e->kind == K_HEX64) {
      bool ok = len == 64;
      for (size_t i = 0; ok && i < len; i++)
        ok = (s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
             (s[i] >= 'A' && s[i] <= 'F');
      if (!ok) return fail(ctx, path, "64 hex characters (sha256 of the token)", v);
    }
    return 0;
  }
  case K_UINT:
  case K_DOUBLE: {
    if (!cJSON_IsNumber(v)) {
      snprintf(expected, sizeof(expected), "a number between %g and %g", e->min, e->max);
      return fail(ctx, path, expected, v);
    }
    double d = v->valuedouble;
    if (e->kind == K_UINT && d != floor(d)) {
      snprintf(expected, sizeof(expected), "a whole number between %g and %g", e->min, e->max);
      return fail(ctx, path, expected, v);
    }
    if (d < e->min || d > e->max) {
      snprintf(expected, sizeof(expected), "a number between %g and %g", e->min, e->max);
      return fail(ctx, path, expected, v);
    }
    return 0;
  }
  case K_BOOL:
    if (!cJSON_IsBool(v)) return fail(ctx, path, "true or false", v);
    return 0;
  case K_CIDRS: {
    if (!cJSON_IsArray(v)) return fail(ctx, path, "an array of CIDRs (e.g. [\"10.0.0.0/8\"])", v);
    if (cJSON_GetArraySize(v) > e->max) {
      snprintf(ctx->err, ctx->errlen, "%s: %s: expected at most %g entries, found %d", ctx->origin,
               path, e->max, cJSON_GetArraySize(v));
      return -1;
    }
    int i = 0;
    for (cJSON *item = v->child; item; item = item->next, i++) {
      char jp[256];
      snprintf(jp, sizeof(jp), "%.200s[%d]", path, i);
      if (!cJSON_IsString(item) || !zg_cidr_ok(item->valuestring))
        return fail(ctx, jp, "an IPv4 or IPv6 address or CIDR (e.g. 10.0.0.0/8, fd00::/8)", item);
    }
    return 0;
  }
  case K_SIZE: {
    uint64_t bytes;
    if (cJSON_IsNumber(v) && v->valuedouble >= 0) return 0;
    if (cJSON_IsString(v) && zg_parse_size(v->valuestring, &bytes) == 0) return 0;
    return fail(ctx, path, "a size in bytes or a string like \"512MB\" or \"1GB\"", v);
  }
  }
  return 0;
}

/* Adds every schema default that is missing (not inside arrays). */
static void fill_defaults(cJSON *root) {
  for (size_t i = 0; i < zg_schema_len; i++) {
    const struct schema_entry *e = &zg_schema[i];
    if (!e->default_json || strstr(e->path, "[]")) continue;
    if (strncmp(e->path, "auth.", 5) == 0 && !cJSON_GetObjectItemCaseSensitive(root, "auth"))
      continue; /* no auth section = bootstrap-token mode; never default it */
    cJSON *parent = root;
    char path[256];
    snprintf(path, sizeof(path), "%s", e->path);
    char *save = NULL;
    char *part = strtok_r(path, ".", &save);
    while (part) {
      char *next = strtok_r(NULL, ".", &save);
      cJSON *child = cJSON_GetObjectItemCaseSensitive(parent, part);
      if (!next) {
        if (!child) cJSON_AddItemToObject(parent, part, cJSON_Parse(e->default_json));
      } else {
        if (!child) child = cJSON_AddObjectToObject(parent, part);
        parent = child;
      }
      part = next;
    }
  }
}

static cJSON *get_path(const cJSON *root, const char *dotted) {
  char path[256];
  snprintf(path, sizeof(path), "%s", dotted);
  const cJSON *cur = root;
  char *save = NULL;
  for (char *part = strtok_r(path, ".", &save); part && cur; part = strtok_r(NULL, ".", &save))
    cur = cJSON_GetObjectItemCaseSensitive(cur, part);
  return (cJSON *)cur;
}

static void copy_string(char *dst, size_t size, const char *src) {
  snprintf(dst, size, "%s", src ? src : "");
}

static void store_scalars(struct zg_config *cfg) {
  for (size_t i = 0; i < zg_schema_len; i++) {
    const struct schema_entry *e = &zg_schema[i];
    if (e->offset == (size_t)-1) continue;
    cJSON *v = get_path(cfg->effective, e->path);
    if (!v) continue;
    char *field = (char *)cfg + e->offset;
    switch (e->kind) {
    case K_STRING:
    case K_SECRET:
    case K_URL:
    case K_ADDR:
    case K_ENUM:
    case K_HEX64:
      copy_string(field, e->size, v->valuestring);
      break;
    case K_UINT:
      *(unsigned *)field = (unsigned)v->valuedouble;
      break;
    case K_DOUBLE:
      *(double *)field = v->valuedouble;
      break;
    case K_BOOL:
      *(bool *)field = cJSON_IsTrue(v);
      break;
    case K_SIZE: {
      uint64_t bytes = 0;
      if (cJSON_IsNumber(v))
        bytes = (uint64_t)v->valuedouble;
      else
        zg_parse_size(v->valuestring, &bytes);
      *(uint64_t *)field = bytes;
      break;
    }
    default:
      break;
    }
  }
}

static const char *item_string(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsString(v) ? v->valuestring : "";
}

static int store_arrays(struct parse_ctx *ctx, struct zg_config *cfg) {
  const cJSON *peers = get_path(cfg->effective, "cluster.peers");
  int i = 0;
  const cJSON *p;
  cJSON_ArrayForEach(p, peers) {
    struct zg_peer *peer = &cfg->peers[cfg->n_peers++];
    copy_string(peer->id, sizeof(peer->id), item_string(p, "id"));
    copy_string(peer->zone, sizeof(peer->zone), item_string(p, "zone"));
    copy_string(peer->role, sizeof(peer->role), item_string(p, "role"));
    if (!peer->role[0]) copy_string(peer->role, sizeof(peer->role), "gateway");
    copy_string(peer->raft, sizeof(peer->raft), item_string(p, "raft"));
    copy_string(peer->admin, sizeof(peer->admin), item_string(p, "admin"));
    copy_string(peer->gateway, sizeof(peer->gateway), item_string(p, "gateway"));
    if (!peer->id[0] || !peer->raft[0]) {
      snprintf(ctx->err, ctx->errlen,
               "%s: cluster.peers[%d]: expected \"id\" and \"raft\", found %s missing", ctx->origin,
               i, peer->id[0] ? "\"raft\"" : "\"id\"");
      return -1;
    }
    if (strcmp(peer->id, cfg->node_id) == 0) {
      snprintf(ctx->err, ctx->errlen,
               "%s: cluster.peers[%d].id: expected another member, found this node's own id \"%s\" "
               "(peers lists every OTHER member)",
               ctx->origin, i, peer->id);
      return -1;
    }
    for (size_t j = 0; j + 1 < cfg->n_peers; j++)
      if (strcmp(cfg->peers[j].id, peer->id) == 0) {
        snprintf(ctx->err, ctx->errlen,
                 "%s: cluster.peers[%d].id: expected a unique id, found \"%s\" twice", ctx->origin,
                 i, peer->id);
        return -1;
      }
    i++;
  }
  const cJSON *fallbacks = get_path(cfg->effective, "fallback_endpoints");
  i = 0;
  cJSON_ArrayForEach(p, fallbacks) {
    struct zg_fallback *fb = &cfg->fallbacks[cfg->n_fallbacks++];
    copy_string(fb->endpoint, sizeof(fb->endpoint), item_string(p, "endpoint"));
    copy_string(fb->api_key, sizeof(fb->api_key), item_string(p, "api_key"));
    if (!fb->endpoint[0]) {
      snprintf(ctx->err, ctx->errlen,
               "%s: fallback_endpoints[%d].endpoint: expected a URL, found nothing", ctx->origin,
               i);
      return -1;
    }
    i++;
  }
  const cJSON *proxies = get_path(cfg->effective, "listen.trusted_proxies");
  cJSON_ArrayForEach(p, proxies) {
    if (cfg->n_trusted_proxies >= ZG_MAX_TRUSTED_PROXIES) break;
    copy_string(cfg->trusted_proxies[cfg->n_trusted_proxies++], sizeof(cfg->trusted_proxies[0]),
                p->valuestring);
  }
  const cJSON *tokens = get_path(cfg->effective, "auth.tokens");
  i = 0;
  cJSON_ArrayForEach(p, tokens) {
    struct zg_file_token *t = &cfg->tokens[cfg->n_tokens++];
    copy_string(t->name, sizeof(t->name), item_string(p, "name"));
    copy_string(t->sha256, sizeof(t->sha256), item_string(p, "sha256"));
    for (char *c = t->sha256; *c; c++)
      if (*c >= 'A' && *c <= 'F') *c = (char)(*c - 'A' + 'a');
    if (!t->name[0] || !t->sha256[0]) {
      snprintf(ctx->err, ctx->errlen,
               "%s: auth.tokens[%d]: expected \"name\" and \"sha256\", found %s missing",
               ctx->origin, i, t->name[0] ? "\"sha256\"" : "\"name\"");
      return -1;
    }
    i++;
  }
  return 0;
}

/* Largest upstream.ca_file accepted (the system bundle is ~200 KB). */
#define CA_FILE_MAX_BYTES (16u << 20)

/* upstream.ca_file must be a regular file this node can read, of at most
 * CA_FILE_MAX_BYTES, holding at least one PEM certificate: checked wherever
 * a config is loaded or applied, so a typo is a config error, not a
 * connect failure on every request. Opened non-blocking, so a FIFO or a
 * device named by mistake can neither block nor feed the check forever. */
static int check_ca_file(struct parse_ctx *ctx, const char *path) {
  static const char expected[] = "expected a readable PEM file of CA certificates";
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) {
    snprintf(ctx->err, ctx->errlen, "%s: upstream.ca_file: %s, found \"%s\" (%s)", ctx->origin,
             expected, path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode) || st.st_size > (off_t)CA_FILE_MAX_BYTES) {
    snprintf(ctx->err, ctx->errlen, "%s: upstream.ca_file: %s, found \"%s\" (%s)", ctx->origin,
             expected, path, !S_ISREG(st.st_mode) ? "not a regular file" : "larger than 16 MiB");
    close(fd);
    return -1;
  }
  FILE *f = fdopen(fd, "r");
  if (!f) {
    snprintf(ctx->err, ctx->errlen, "%s: upstream.ca_file: %s, found \"%s\" (%s)", ctx->origin,
             expected, path, strerror(errno));
    close(fd);
    return -1;
  }
  X509 *cert = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  ERR_clear_error();
  if (!cert) {
    snprintf(ctx->err, ctx->errlen,
             "%s: upstream.ca_file: expected a PEM file of CA certificates (-----BEGIN "
             "CERTIFICATE-----), found \"%s\" with no certificate in it",
             ctx->origin, path);
    return -1;
  }
  X509_free(cert);
  return 0;
}

static int finish(struct parse_ctx *ctx, struct zg_config *cfg) {
  fill_defaults(cfg->effective);
  store_scalars(cfg);
  if (!cJSON_GetObjectItemCaseSensitive(cfg->effective, "auth"))
    copy_string(cfg->auth_mode, sizeof(cfg->auth_mode), "bootstrap");
  cfg->has_temperature = get_path(cfg->effective, "model.temperature") != NULL;
  cfg->has_top_p = get_path(cfg->effective, "model.top_p") != NULL;
  if (!cfg->advertise_raft[0])
    copy_string(cfg->advertise_raft, sizeof(cfg->advertise_raft), cfg->listen_raft);
  if (!cfg->advertise_admin[0])
    copy_string(cfg->advertise_admin, sizeof(cfg->advertise_admin), cfg->listen_admin);
  if (!cfg->advertise_gateway[0])
    copy_string(cfg->advertise_gateway, sizeof(cfg->advertise_gateway), cfg->listen_gateway);
  if (cfg->heartbeat_ms * 2 > cfg->election_timeout_ms) {
    snprintf(ctx->err, ctx->errlen,
             "%s: cluster.heartbeat_ms: expected at most half of cluster.election_timeout_ms (%u), "
             "found %u",
             ctx->origin, cfg->election_timeout_ms, cfg->heartbeat_ms);
    return -1;
  }
  bool tls_any = cfg->tls_cert[0] || cfg->tls_key[0] || cfg->tls_ca[0];
  if (tls_any && !(cfg->tls_cert[0] && cfg->tls_key[0] && cfg->tls_ca[0])) {
    snprintf(ctx->err, ctx->errlen,
             "%s: security.tls: expected \"cert\", \"key\" and \"ca\" together, found %s missing "
             "(make them with: zonegate certs init DIR --nodes ID,...)",
             ctx->origin,
             !cfg->tls_cert[0]  ? "\"cert\""
             : !cfg->tls_key[0] ? "\"key\""
                                : "\"ca\"");
    return -1;
  }
  if ((cfg->gateway_tls_cert[0] != 0) != (cfg->gateway_tls_key[0] != 0)) {
    snprintf(ctx->err, ctx->errlen,
             "%s: listen.gateway_tls: expected \"cert\" and \"key\" together, found %s missing",
             ctx->origin, cfg->gateway_tls_cert[0] ? "\"key\"" : "\"cert\"");
    return -1;
  }
  if (cfg->upstream_ca_file[0] && check_ca_file(ctx, cfg->upstream_ca_file) != 0) return -1;
  if (strcmp(cfg->auth_mode, "token") == 0 && !get_path(cfg->effective, "auth.tokens")) {
    /* token mode with no file tokens: tokens come from the admin API. */
  }
  return store_arrays(ctx, cfg);
}

/* Duplicate member names make a JSON document mean two things (cJSON
 * keeps both; a lookup sees the first): refused anywhere in a config, with
 * the path. Sorting the names keeps it O(n log n) per object. Returns 0, or
 * -1 with err "<origin>: <path>: ...". */
static int cmp_names(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int check_duplicates(const cJSON *v, const char *path, const char *origin, char *err,
                            size_t errlen) {
  if (cJSON_IsObject(v)) {
    size_t n = 0;
    for (const cJSON *c = v->child; c; c = c->next) n++;
    if (n > 1) {
      const char **names = malloc(n * sizeof(*names));
      if (!names) {
        snprintf(err, errlen, "%s: out of memory", origin);
        return -1;
      }
      size_t i = 0;
      for (const cJSON *c = v->child; c; c = c->next) names[i++] = c->string ? c->string : "";
      qsort(names, n, sizeof(*names), cmp_names);
      for (i = 1; i < n; i++)
        if (!strcmp(names[i], names[i - 1])) {
          snprintf(err, errlen, "%s: %s%s%.100s: expected each key once, found it twice", origin,
                   path, path[0] ? "." : "", names[i]);
          free(names);
          return -1;
        }
      free(names);
    }
    for (const cJSON *c = v->child; c; c = c->next) {
      char sub[512];
      snprintf(sub, sizeof(sub), "%s%s%.100s", path, path[0] ? "." : "",
               c->string ? c->string : "");
      if (check_duplicates(c, sub, origin, err, errlen)) return -1;
    }
  } else if (cJSON_IsArray(v)) {
    int i = 0;
    for (const cJSON *c = v->child; c; c = c->next, i++) {
      char sub[512];
      snprintf(sub, sizeof(sub), "%.400s[%d]", path, i);
      if (check_duplicates(c, sub, origin, err, errlen)) return -1;
    }
  }
  return 0;
}

struct zg_config *zg_config_parse(const char *text, const char *origin, char *err, size_t errlen) {
  struct parse_ctx ctx = {origin, err, errlen};
  const char *error_ptr = NULL;
  cJSON *root = cJSON_ParseWithOpts(text, &error_ptr, 1);
  if (!root) {
    int line = 1, col = 1;
    for (const char *p = text; error_ptr && p < error_ptr; p++) {
      if (*p == '\n') {
        line++;
        col = 1;
      } else {
        col++;
      }
    }
    snprintf(err, errlen,
             "%s: line %d column %d: expected valid JSON, found a syntax error near \"%.20s\"",
             origin, line, col, error_ptr ? error_ptr : "");
    return NULL;
  }
  if (!cJSON_IsObject(root)) {
    fail(&ctx, "(top level)", "a JSON object", root);
    cJSON_Delete(root);
    return NULL;
  }
  if (check_duplicates(root, "", origin, err, errlen) != 0 ||
      walk_object(&ctx, "", "", root) != 0) {
    cJSON_Delete(root);
    return NULL;
  }
  struct zg_config *cfg = calloc(1, sizeof(*cfg));
  if (!cfg) {
    cJSON_Delete(root);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  copy_string(cfg->path, sizeof(cfg->path), origin);
  cfg->effective = root;
  if (finish(&ctx, cfg) != 0) {
    zg_config_free(cfg);
    return NULL;
  }
  return cfg;
}

struct zg_config *zg_config_load(const char *path, char *err, size_t errlen) {
  zg_buf text;
  zg_buf_init(&text);
  if (zg_read_file(path, &text) != 0) {
    snprintf(err, errlen, "%s: cannot read config file: %s", path, strerror(errno));
    zg_buf_free(&text);
    return NULL;
  }
  struct zg_config *cfg = zg_config_parse(text.data, path, err, errlen);
  zg_buf_free(&text);
  return cfg;
}

void zg_config_free(struct zg_config *cfg) {
  if (!cfg) return;
  cJSON_Delete(cfg->effective);
  free(cfg);
}

static bool is_literal_secret(const char *v) {
  return v && *v && strncmp(v, "env:", 4) != 0 && strncmp(v, "file:", 5) != 0;
}

static void mask_secrets(cJSON *node, const char *schema_path) {
  for (cJSON *child = node ? node->child : NULL; child; child = child->next) {
    char sp[256];
    if (cJSON_IsArray(node))
      snprintf(sp, sizeof(sp), "%s[]", schema_path);
    else
      snprintf(sp, sizeof(sp), "%s%s%s", schema_path, *schema_path ? "." : "", child->string);
    if (cJSON_IsObject(child) || cJSON_IsArray(child)) {
      mask_secrets(child, sp);
      continue;
    }
    const struct schema_entry *e = schema_find(sp);
    bool secretish =
        (e && e->kind == K_SECRET) ||
        (child->string && (strstr(child->string, "secret") || strstr(child->string, "password") ||
                           strstr(child->string, "key") || strstr(child->string, "token")));
    if (secretish && cJSON_IsString(child) && is_literal_secret(child->valuestring) &&
        !(e && e->kind != K_SECRET))
      cJSON_SetValuestring(child, "****");
  }
}

char *zg_config_dump_masked(const struct zg_config *cfg) {
  cJSON *copy = cJSON_Duplicate(cfg->effective, 1);
  mask_secrets(copy, "");
  char *text = cJSON_Print(copy);
  cJSON_Delete(copy);
  return text;
}

void zg_config_warnings(const struct zg_config *cfg,
                        void (*emit)(void *ud, const char *path, const char *msg), void *ud) {
  struct {
    const char *path;
    const char *value;
  } secrets[] = {{"api_key", cfg->api_key},
                 {"cluster.secret", cfg->cluster_secret},
                 {"security.master_key", cfg->master_key},
                 {"security.admin_token", cfg->admin_token}};
  for (size_t i = 0; i < ZG_ARRAY_LEN(secrets); i++)
    if (is_literal_secret(secrets[i].value))
      emit(ud, secrets[i].path,
           "secret written literally in the config file; prefer \"env:NAME\" or \"file:PATH\"");
  for (size_t i = 0; i < cfg->n_fallbacks; i++)
    if (is_literal_secret(cfg->fallbacks[i].api_key))
      emit(ud, "fallback_endpoints[].api_key",
           "secret written literally in the config file; prefer \"env:NAME\" or \"file:PATH\"");
  if (!cfg->endpoint[0])
    emit(ud, "endpoint",
         "no upstream endpoint is set; chat requests will fail with 502 until it is");
  if (strcmp(cfg->auth_mode, "none") == 0)
    emit(ud, "auth.mode",
         "client authentication is OFF: anyone who reaches the port can use the upstream key");
}

cJSON *zg_config_replicated_json(const struct zg_config *cfg) {
  cJSON *out = cJSON_CreateObject();
  for (cJSON *child = cfg->effective->child; child; child = child->next)
    if (zg_config_key_is_replicated(child->string))
      cJSON_AddItemToObject(out, child->string, cJSON_Duplicate(child, 1));
  return out;
}

struct zg_config *zg_config_with_replicated(const struct zg_config *local, const cJSON *replicated,
                                            const char *origin, char *err, size_t errlen) {
  if (!cJSON_IsObject(replicated)) {
    snprintf(err, errlen, "%s: (top level): expected a JSON object", origin);
    return NULL;
  }
  if (check_duplicates(replicated, "", origin, err, errlen) != 0) return NULL;
  for (const cJSON *child = replicated->child; child; child = child->next) {
    if (!zg_config_key_is_replicated(child->string)) {
      char known[256];
      zg_config_replicated_list(known, sizeof(known));
      snprintf(err, errlen,
               "%s: %s: expected only replicated sections (%s), found \"%s\" which is local to "
               "each node's file",
               origin, child->string, known, child->string);
      return NULL;
    }
  }
  cJSON *merged = cJSON_CreateObject();
  for (cJSON *child = local->effective->child; child; child = child->next)
    if (!zg_config_key_is_replicated(child->string))
      cJSON_AddItemToObject(merged, child->string, cJSON_Duplicate(child, 1));
  for (const cJSON *child = replicated->child; child; child = child->next)
    cJSON_AddItemToObject(merged, child->string, cJSON_Duplicate(child, 1));
  char *text = cJSON_PrintUnformatted(merged);
  cJSON_Delete(merged);
  struct zg_config *cfg = zg_config_parse(text, origin, err, errlen);
  free(text);
  if (cfg) copy_string(cfg->path, sizeof(cfg->path), local->path);
  return cfg;
}

bool zg_secret_is_reference(const char *value) {
  return value && (strncmp(value, "env:", 4) == 0 || strncmp(value, "file:", 5) == 0);
}

struct foreign_walk {
  void (*found)(void *ud, const char *path);
  void *ud;
  bool neutralise;
  size_t count;
  bool channel_changed; /* inside an alert channel that differs from the local one */
};

/* Walks `node` (replicated) beside `mirror` (the same path in the local
 * file, or NULL). Every string that is a reference and differs from the
 * local string at the same path is foreign. Inside an alert channel, a
 * reference is local only when the whole channel is the local file's
 * (same url, smtp_url, recipients...): otherwise the credential it names
 * would go to a destination the admin chose. Returns true when the caller
 * must drop `node` from its parent (an alert channel holding one). */
static bool walk_foreign(struct foreign_walk *w, cJSON *node, const cJSON *mirror,
                         const char *path) {
  if (cJSON_IsString(node)) {
    if (!zg_secret_is_reference(node->valuestring)) return false;
    if (!w->channel_changed && cJSON_IsString(mirror) &&
        strcmp(mirror->valuestring, node->valuestring) == 0)
      return false;
    w->count++;
    if (w->found) w->found(w->ud, path);
    if (w->neutralise) cJSON_SetValuestring(node, "");
    return w->neutralise && strncmp(path, "alerts.channels[", 16) == 0;
  }
  if (!cJSON_IsObject(node) && !cJSON_IsArray(node)) return false;
  bool drop_self = false;
  int index = 0;
  cJSON *child = node->child;
  while (child) {
    cJSON *next = child->next;
    char sub[512];
    const cJSON *mirror_child = NULL;
    if (cJSON_IsArray(node)) {
      snprintf(sub, sizeof(sub), "%s[%d]", path, index);
      mirror_child = cJSON_IsArray(mirror) ? cJSON_GetArrayItem(mirror, index) : NULL;
    } else {
      snprintf(sub, sizeof(sub), "%s%s%s", path, path[0] ? "." : "", child->string);
      mirror_child =
          cJSON_IsObject(mirror) ? cJSON_GetObjectItemCaseSensitive(mirror, child->string) : NULL;
    }
    index++;
    bool saved = w->channel_changed;
    if (cJSON_IsArray(node) && strcmp(path, "alerts.channels") == 0)
      w->channel_changed = !(mirror_child && cJSON_Compare(child, mirror_child, true));
    bool drop = walk_foreign(w, child, mirror_child, sub);
    w->channel_changed = saved;
    if (drop) {
      /* An alert channel: the whole element of alerts.channels goes. */
      bool is_channel = cJSON_IsArray(node) && strcmp(path, "alerts.channels") == 0;
      if (is_channel)
        cJSON_Delete(cJSON_DetachItemViaPointer(node, child));
      else
        drop_self = true;
    }
    child = next;
  }
  return drop_self;
}

size_t zg_config_foreign_refs(const struct zg_config *local, const cJSON *replicated,
                              void (*found)(void *ud, const char *path), void *ud) {
  struct foreign_walk w = {found, ud, false, 0, false};
  walk_foreign(&w, (cJSON *)replicated, local ? local->effective : NULL, "");
  return w.count;
}

cJSON *zg_config_without_foreign_refs(const struct zg_config *local, const cJSON *replicated,
                                      void (*found)(void *ud, const char *path), void *ud) {
  cJSON *copy = cJSON_Duplicate(replicated, 1);
  if (!copy) return NULL;
  struct foreign_walk w = {found, ud, true, 0, false};
  walk_foreign(&w, copy, local ? local->effective : NULL, "");
  return copy;
}

static const char *kind_name(enum schema_kind k) {
  switch (k) {
  case K_OBJECT:
    return "object";
  case K_ARRAY:
    return "array";
  case K_ANY:
    return "object";
  case K_STRING:
    return "string";
  case K_SECRET:
    return "secret";
  case K_URL:
    return "URL";
  case K_ADDR:
    return "host:port";
  case K_UINT:
    return "integer";
  case K_DOUBLE:
    return "number";
  case K_BOOL:
    return "bool";
  case K_SIZE:
    return "size";
  case K_ENUM:
    return "enum";
  case K_HEX64:
    return "hex";
  case K_CIDRS:
    return "CIDR list";
  }
  return "?";
}

char *zg_config_reference_markdown(void) {
  zg_buf out;
  zg_buf_init(&out);
  zg_buf_appendf(&out, "| key | type | default | scope | meaning |\n|---|---|---|---|---|\n");
  for (size_t i = 0; i < zg_schema_len; i++) {
    const struct schema_entry *e = &zg_schema[i];
    if (e->kind == K_OBJECT) continue;
    char top[64];
    snprintf(top, sizeof(top), "%s", e->path);
    top[strcspn(top, ".[")] = '\0';
    char type[96];
    if (e->kind == K_ENUM) {
      size_t t = 0;
      for (const char *c = e->enum_values; *c && t + 4 < sizeof(type); c++) {
        if (*c == '|') {
          memcpy(type + t, " / ", 3);
          t += 3;
        } else {
          type[t++] = *c;
        }
      }
      type[t] = '\0';
    } else if (e->kind == K_UINT || e->kind == K_DOUBLE)
      snprintf(type, sizeof(type), "%s %g..%g", kind_name(e->kind), e->min, e->max);
    else
      snprintf(type, sizeof(type), "%s", kind_name(e->kind));
    zg_buf_appendf(&out, "| `%s` | %s | %s%s%s | %s | %s |\n", e->path, type,
                   e->default_json ? "`" : "", e->default_json ? e->default_json : "-",
                   e->default_json ? "`" : "",
                   zg_config_key_is_replicated(top) ? "replicated" : "local", e->help);
  }
  return zg_buf_steal(&out);
}
