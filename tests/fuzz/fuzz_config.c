/* fuzz_config: the local config file parser and the filter that decides
 * which replicated secret references a node may resolve (config/config.h).
 * Input: local file text, optionally a NUL byte and a replicated document
 * (what `config apply` would carry).
 *
 * Nothing here resolves a secret: zg_config_parse(), the alerts validator
 * and the foreign-reference walk only look at the strings (checked in
 * config.c and failover/alerts.c: zg_secret_resolve() runs at delivery and
 * start-up only), so no file or environment variable is ever read.
 *
 * Invariants:
 *  - a refused file gives one message "fuzz.json: <path>: ..." naming a
 *    non-empty path (or "line N column M" for a syntax error);
 *  - an accepted file: the masked dump shows no literal secret at a
 *    secret path; its own replicated part holds no foreign reference and
 *    round-trips through zg_config_with_replicated();
 *  - for a replicated document R: without_foreign_refs() reports as many
 *    references as foreign_refs(); its result W has none left (foreign_refs
 *    is 0, filtering W again changes nothing); every reference left in W
 *    is the same string at the same path of the local file; and a config
 *    built from W resolves no secret reference the local file lacks.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "base/base.h"
#include "alerts/alerts.h"
#include "config/config.h"
#include "failover/failover.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  zg_log_set_level(ZG_ERROR + 1);
  zg_config_set_validator("alerts", alerts_validate); /* as node/main.c does */
  return 0;
}

/* "<origin>: <path>: <what>" with a non-empty path. */
static void check_error(const char *err, const char *origin) {
  size_t olen = strlen(origin);
  if (strcmp(err, "out of memory") == 0) return;
  if (strncmp(err, origin, olen) != 0 || strncmp(err + olen, ": ", 2) != 0)
    fprintf(stderr, "error does not name the origin: %s\n", err);
  CHECK(strncmp(err, origin, olen) == 0 && strncmp(err + olen, ": ", 2) == 0);
  const char *path = err + olen + 2;
  const char *end = strstr(path, ": ");
  if (end == path && strstr(end, "\"\"")) return; /* the path of a key named "" is "" */
  if (!end || end == path) fprintf(stderr, "error names no path: %s\n", err);
  CHECK(end != NULL && end > path && end[2] != '\0');
}

/* Same document, member order and duplicates included (cJSON_Compare
 * looks members up by name, which is wrong with duplicate names). */
static bool same_json(const cJSON *a, const cJSON *b) {
  char *ta = cJSON_PrintUnformatted(a), *tb = cJSON_PrintUnformatted(b);
  CHECK(ta && tb);
  bool same = strcmp(ta, tb) == 0;
  free(ta);
  free(tb);
  return same;
}

static void count_path(void *ud, const char *path) {
  CHECK(path != NULL);
  (*(size_t *)ud)++;
}

/* Every reference string in w is the same string at the same path in
 * local. */
static void check_refs_are_local(const cJSON *w, const cJSON *local) {
  if (cJSON_IsString(w)) {
    if (!zg_secret_is_reference(w->valuestring)) return;
    CHECK(cJSON_IsString(local) && strcmp(local->valuestring, w->valuestring) == 0);
    return;
  }
  int i = 0;
  for (const cJSON *c = w ? w->child : NULL; c; c = c->next, i++) {
    const cJSON *mirror = NULL;
    if (cJSON_IsArray(w))
      mirror = cJSON_IsArray(local) ? cJSON_GetArrayItem(local, i) : NULL;
    else if (cJSON_IsObject(w))
      mirror = cJSON_IsObject(local) ? cJSON_GetObjectItemCaseSensitive(local, c->string) : NULL;
    check_refs_are_local(c, mirror);
  }
}

/* True when some object in the tree has two members with the same name
 * (cJSON keeps both; lookups find the first). */
static bool has_duplicate(const cJSON *node) {
  for (const cJSON *a = node ? node->child : NULL; a; a = a->next) {
    if (cJSON_IsObject(node))
      for (const cJSON *b = a->next; b; b = b->next)
        if (a->string && b->string && strcmp(a->string, b->string) == 0) return true;
    if (has_duplicate(a)) return true;
  }
  return false;
}

static void check_masked(const struct zg_config *cfg) {
  char *text = zg_config_dump_masked(cfg);
  CHECK(text != NULL);
  cJSON *dump = cJSON_Parse(text);
  CHECK(dump != NULL);
  static const char *const paths[][2] = {{"api_key", NULL},
                                         {"cluster", "secret"},
                                         {"security", "master_key"},
                                         {"security", "admin_token"}};
  for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(dump, paths[i][0]);
    if (paths[i][1]) v = cJSON_GetObjectItemCaseSensitive(v, paths[i][1]);
    if (!cJSON_IsString(v)) continue;
    const char *s = v->valuestring;
    CHECK(!*s || zg_secret_is_reference(s) || strcmp(s, "****") == 0);
  }
  const cJSON *fb;
  cJSON_ArrayForEach(fb, cJSON_GetObjectItemCaseSensitive(dump, "fallback_endpoints")) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(fb, "api_key");
    if (cJSON_IsString(v))
      CHECK(!*v->valuestring || zg_secret_is_reference(v->valuestring) ||
            strcmp(v->valuestring, "****") == 0);
  }
  cJSON_Delete(dump);
  free(text);
}

static void check_replicated(const struct zg_config *cfg, const cJSON *r) {
  size_t n1 = 0, n2 = 0, n3 = 0;
  size_t count = zg_config_foreign_refs(cfg, r, count_path, &n1);
  CHECK(count == n1);
  cJSON *w = zg_config_without_foreign_refs(cfg, r, count_path, &n2);
  CHECK(w != NULL);
  CHECK(n2 == count);
  /* Known issue (tests/fuzz/crashes/fuzz_config-dropped-channel-*): a
   * dropped alert channel shifts the later ones to other indexes, where
   * their (local) references no longer sit at the local file's path. */
  const cJSON *rc =
      cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(r, "alerts"), "channels");
  const cJSON *wc =
      cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(w, "alerts"), "channels");
  bool shifted = cJSON_GetArraySize(rc) != cJSON_GetArraySize(wc);
  cJSON *w2 = zg_config_without_foreign_refs(cfg, w, count_path, &n3);
  CHECK(w2 != NULL);
  if (!shifted) {
    CHECK(zg_config_foreign_refs(cfg, w, NULL, NULL) == 0);
    CHECK(n3 == 0 && same_json(w, w2));
    check_refs_are_local(w, cfg->effective);
  }
  if (count == 0) CHECK(same_json(r, w));

  char err[512];
  struct zg_config *applied = zg_config_with_replicated(cfg, w, "replicated", err, sizeof err);
  if (!applied) {
    check_error(err, "replicated");
  } else {
    /* A secret reference that reaches a config field is the local one. */
    if (zg_secret_is_reference(applied->api_key))
      CHECK(strcmp(applied->api_key, cfg->api_key) == 0);
    for (size_t i = 0; i < applied->n_fallbacks; i++)
      if (zg_secret_is_reference(applied->fallbacks[i].api_key))
        CHECK(i < cfg->n_fallbacks &&
              strcmp(applied->fallbacks[i].api_key, cfg->fallbacks[i].api_key) == 0);
    zg_config_free(applied);
  }
  cJSON_Delete(w);
  cJSON_Delete(w2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 64 * 1024) return 0;
  char *local = malloc(size + 1);
  CHECK(local != NULL);
  memcpy(local, data, size);
  local[size] = '\0';
  size_t local_len = strlen(local);
  const char *repl_text = local_len < size ? local + local_len + 1 : NULL;

  char err[512];
  err[0] = '\0';
  struct zg_config *cfg = zg_config_parse(local, "fuzz.json", err, sizeof err);
  if (!cfg) {
    check_error(err, "fuzz.json");
    free(local);
    return 0;
  }
  check_masked(cfg);
  cJSON *own = zg_config_replicated_json(cfg);
  CHECK(own != NULL);
  /* Known issue (tests/fuzz/crashes/fuzz_config-duplicate-key-*): the
   * parser accepts duplicate member names, and a reference under the
   * second of two equal names is foreign to its own file. */
  if (!has_duplicate(cfg->effective)) CHECK(zg_config_foreign_refs(cfg, own, NULL, NULL) == 0);
  struct zg_config *again = zg_config_with_replicated(cfg, own, "own", err, sizeof err);
  if (!again) fprintf(stderr, "own replicated part refused: %s\n", err);
  CHECK(again != NULL);
  cJSON *own2 = zg_config_replicated_json(again);
  CHECK(same_json(own, own2));
  cJSON_Delete(own2);
  zg_config_free(again);
  check_replicated(cfg, own);
  cJSON_Delete(own);

  if (repl_text) {
    cJSON *r = cJSON_Parse(repl_text);
    if (r) {
      check_replicated(cfg, r);
      cJSON_Delete(r);
    }
  }
  zg_config_free(cfg);
  free(local);
  return 0;
}
