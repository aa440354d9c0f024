/* schema.h (private to config/): the schema table's row type. */
#ifndef ZG_CONFIG_SCHEMA_H
#define ZG_CONFIG_SCHEMA_H

#include "config/config.h"

#include <string.h>

enum schema_kind {
  K_OBJECT,
  K_ARRAY, /* of objects; element keys are "path[].key" */
  K_ANY,   /* free-form JSON, validated elsewhere */
  K_STRING,
  K_SECRET, /* env:NAME, file:PATH or a literal (warned) */
  K_URL,    /* "" or http(s)://... */
  K_ADDR,   /* host:port */
  K_UINT,
  K_DOUBLE,
  K_BOOL,
  K_SIZE, /* number of bytes or "512MB" */
  K_ENUM,
  K_HEX64,
  K_CIDRS, /* array of "address[/prefix]" strings, IPv4 or IPv6 */
};

struct schema_entry {
  const char *path;
  enum schema_kind kind;
  double min, max; /* numbers: bounds; strings: length bounds; arrays: max elements */
  const char *default_json;
  const char *enum_values; /* "a|b|c" */
  size_t offset, size;     /* into struct zg_config; (size_t)-1 when not stored there */
  const char *help;
};

extern const struct schema_entry zg_schema[];
extern const size_t zg_schema_len;

#endif
