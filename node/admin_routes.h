/* admin_routes.h (private to node/): the admin API's route table and its
 * pure matcher, apart from admin.c so that tests/fuzz/fuzz_admin_route.c
 * can exercise exactly the code the admin API runs (node/ is no library:
 * the harness compiles admin_routes.c into itself).
 *
 * Routes match the whole path exactly; a "*" segment is one non-empty id
 * segment (no '/'), copied out. No path matches two patterns. */
#ifndef ZG_NODE_ADMIN_ROUTES_H
#define ZG_NODE_ADMIN_ROUTES_H

#include <stdbool.h>
#include <stddef.h>

enum route {
  R_STATUS,
  R_CONFIG,
  R_KEYS,
  R_KEY_ROTATE,
  R_KEY,
  R_TOKENS,
  R_TOKEN,
  R_AUDIT,
  R_MEMBERS,
  R_MEMBER,
  R_SWITCHOVER,
  R_DRILL,
  R_USAGE,
};

struct admin_route_entry {
  const char *pattern; /* segments: literal, or "*" for one non-empty id segment */
  const char *methods; /* "GET" also allows HEAD */
  enum route route;
};

extern const struct admin_route_entry admin_routes[];
extern const size_t admin_routes_len;

/* Whole-path match; the "*" segment is copied to id (idlen bytes; a
 * longer segment does not match). */
bool admin_route_match(const char *pattern, const char *path, char *id, size_t idlen);
/* m is one of the comma-separated methods (HEAD counts as GET). */
bool admin_method_allowed(const char *methods, const char *m);
/* 200: *route and id are set. 405: the path is known, *allow lists its
 * methods. 404: no route has this path. */
int admin_route_lookup(const char *method, const char *path, enum route *route, char *id,
                       size_t idlen, const char **allow);

#endif
