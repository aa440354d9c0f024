/* admin_routes.c: the admin API's route table and matcher (see
 * admin_routes.h). Pure functions; cannot fail. */
#include "node/admin_routes.h"

#include <string.h>

const struct admin_route_entry admin_routes[] = {
    {"/v1/cluster/status", "GET", R_STATUS},
    {"/v1/config", "GET, PUT", R_CONFIG},
    {"/v1/keys", "GET, POST", R_KEYS},
    {"/v1/keys/*/rotate", "POST", R_KEY_ROTATE},
    {"/v1/keys/*", "DELETE", R_KEY},
    {"/v1/tokens", "GET, POST", R_TOKENS},
    {"/v1/tokens/*", "DELETE, PATCH", R_TOKEN},
    {"/v1/usage", "GET", R_USAGE},
    {"/v1/audit", "GET, POST", R_AUDIT},
    {"/v1/cluster/members", "POST", R_MEMBERS},
    {"/v1/cluster/members/*", "DELETE", R_MEMBER},
    {"/v1/cluster/switchover", "POST", R_SWITCHOVER},
    {"/v1/drills/*", "POST", R_DRILL},
};
const size_t admin_routes_len = sizeof(admin_routes) / sizeof(admin_routes[0]);

bool admin_route_match(const char *pattern, const char *path, char *id, size_t idlen) {
  while (*pattern) {
    if (*pattern == '*') {
      size_t seg = strcspn(path, "/");
      if (seg == 0 || seg >= idlen) return false;
      memcpy(id, path, seg);
      id[seg] = '\0';
      path += seg;
      pattern++;
      continue;
    }
    if (*pattern != *path) return false;
    pattern++;
    path++;
  }
  return *path == '\0';
}

bool admin_method_allowed(const char *methods, const char *m) {
  if (!strcmp(m, "HEAD")) m = "GET";
  size_t mlen = strlen(m);
  if (mlen == 0) return false; /* strstr would find "" forever */
  for (const char *p = methods; (p = strstr(p, m)) != NULL; p += mlen)
    if ((p == methods || p[-1] == ' ') && (p[mlen] == '\0' || p[mlen] == ',')) return true;
  return false;
}

int admin_route_lookup(const char *method, const char *path, enum route *route, char *id,
                       size_t idlen, const char **allow) {
  bool path_known = false;
  for (size_t r = 0; r < admin_routes_len; r++) {
    if (!admin_route_match(admin_routes[r].pattern, path, id, idlen)) continue;
    path_known = true;
    if (admin_method_allowed(admin_routes[r].methods, method)) {
      *route = admin_routes[r].route;
      return 200;
    }
  }
  if (!path_known) return 404;
  /* Paths never match two patterns, so the last match is the one. */
  *allow = "";
  for (size_t r = 0; r < admin_routes_len; r++)
    if (admin_route_match(admin_routes[r].pattern, path, id, idlen))
      *allow = admin_routes[r].methods;
  return 405;
}
