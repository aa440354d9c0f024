/* fuzz_admin_route: the admin API's route matching (node/admin_routes.c,
 * compiled into this harness: node/ is no library). Input: "METHOD PATH"
 * (split at the first space; no NUL bytes).
 *
 * A reference matcher splits pattern and path into '/' segments ("*"
 * matches one non-empty segment shorter than the id buffer) and a
 * reference method check splits the list at ", ". Invariants:
 *  - admin_route_match() agrees with the reference for every pattern and
 *    copies exactly the "*" segment (non-empty, no '/') into id;
 *  - no path matches two patterns (admin.c relies on it for Allow);
 *  - admin_method_allowed() is true only for a listed method (HEAD = GET);
 *  - admin_route_lookup() answers 200 with the matching pattern's route
 *    exactly when the path matches and the method is listed, 405 with that
 *    pattern's method list when only the path matches, else 404.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "node/admin_routes.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "invariant failed: %s (line %d)\n", #cond, __LINE__);                        \
      abort();                                                                                     \
    }                                                                                              \
  } while (0)

#define ID_LEN 128

/* Reference: segment-wise comparison. Fills id with the "*" segment. */
static bool ref_match(const char *pattern, const char *path, char *id) {
  id[0] = '\0';
  for (;;) {
    size_t pl = strcspn(pattern, "/"), sl = strcspn(path, "/");
    if (pl == 1 && pattern[0] == '*') {
      if (sl == 0 || sl >= ID_LEN) return false;
      memcpy(id, path, sl);
      id[sl] = '\0';
    } else if (pl != sl || memcmp(pattern, path, pl) != 0) {
      return false;
    }
    pattern += pl;
    path += sl;
    if (*pattern == '\0' || *path == '\0') return *pattern == '\0' && *path == '\0';
    pattern++; /* both at '/' */
    path++;
  }
}

static bool ref_method(const char *methods, const char *m) {
  if (strcmp(m, "HEAD") == 0) m = "GET";
  const char *p = methods;
  for (;;) {
    size_t n = strcspn(p, ",");
    if (strlen(m) == n && memcmp(p, m, n) == 0) return true;
    if (p[n] == '\0') return false;
    p += n + 1;
    while (*p == ' ') p++;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size > 4096) return 0;
  char *text = malloc(size + 1);
  CHECK(text != NULL);
  memcpy(text, data, size);
  text[size] = '\0';
  if (strlen(text) != size) {
    free(text);
    return 0;
  }
  char *space = strchr(text, ' ');
  const char *method = "GET", *path = text;
  if (space) {
    *space = '\0';
    method = text;
    path = space + 1;
  }

  size_t matched = admin_routes_len, n_matches = 0;
  for (size_t r = 0; r < admin_routes_len; r++) {
    char id[ID_LEN], ref_id[ID_LEN];
    memset(id, 0x55, sizeof id);
    bool got = admin_route_match(admin_routes[r].pattern, path, id, sizeof id);
    bool want = ref_match(admin_routes[r].pattern, path, ref_id);
    if (got != want)
      fprintf(stderr, "pattern %s path \"%s\": match %d, reference %d\n", admin_routes[r].pattern,
              path, got, want);
    CHECK(got == want);
    if (got) {
      n_matches++;
      matched = r;
      if (strchr(admin_routes[r].pattern, '*')) {
        CHECK(strcmp(id, ref_id) == 0 && id[0] != '\0' && !strchr(id, '/'));
      }
    }
    bool allowed = admin_method_allowed(admin_routes[r].methods, method);
    CHECK(allowed == ref_method(admin_routes[r].methods, method));
  }
  CHECK(n_matches <= 1);

  enum route route = (enum route) - 1;
  const char *allow = NULL;
  char id[ID_LEN];
  int status = admin_route_lookup(method, path, &route, id, sizeof id, &allow);
  if (n_matches == 0) {
    CHECK(status == 404);
  } else if (ref_method(admin_routes[matched].methods, method)) {
    CHECK(status == 200 && route == admin_routes[matched].route);
  } else {
    CHECK(status == 405 && allow == admin_routes[matched].methods);
  }
  free(text);
  return 0;
}
