/* config: the local JSON config file and the replicated gateway config.
 *
 * One schema table (config/schema.c) drives parsing, validation errors,
 * unknown-key suggestions, defaults, the masked dump of `config check`,
 * and which top-level sections are replicated through Raft. Every error
 * names the file, the JSON path, what was expected and what was found.
 *
 * Ownership: zg_config_load() returns a config the caller frees with
 * zg_config_free(). Secrets stay as their references (env:/file:/literal)
 * inside the config; zg_secret_resolve() turns them into values when a
 * module needs them, so a config can always be printed masked.
 */
#ifndef ZG_CONFIG_H
#define ZG_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cJSON;

#define ZG_MAX_PEERS 15
#define ZG_MAX_FALLBACKS 8
#define ZG_MAX_FILE_TOKENS 64
#define ZG_MAX_TRUSTED_PROXIES 32

struct zg_peer {
  char id[64];
  char zone[32];
  char role[16]; /* "gateway" | "witness" */
  char raft[128];
  char admin[128];
  char gateway[128];
};

struct zg_fallback {
  char endpoint[512];
  char api_key[512]; /* secret reference */
};

struct zg_file_token {
  char name[64];
  char sha256[65];
};

struct zg_config {
  char path[512];
  /* node (local) */
  char node_id[64];
  char zone[32];
  char role[16];
  /* listen (local) */
  char listen_gateway[128];
  char listen_admin[128];
  char listen_raft[128];
  char listen_metrics[128]; /* "" = /metrics on the admin port only */
  /* Peers whose PROXY protocol header or X-Forwarded-For is believed. */
  char trusted_proxies[ZG_MAX_TRUSTED_PROXIES][64];
  size_t n_trusted_proxies;
  /* advertised addresses (local; default: the listen address) */
  char advertise_raft[128];
  char advertise_admin[128];
  char advertise_gateway[128];
  /* cluster (local) */
  char data_dir[512];
  struct zg_peer peers[ZG_MAX_PEERS];
  size_t n_peers;
  char cluster_secret[512]; /* secret reference; "" = none */
  bool cluster_join;        /* joins a running cluster; never bootstraps */
  unsigned election_timeout_ms, heartbeat_ms;
  unsigned snapshot_threshold, snapshot_trailing;
  unsigned max_lag;
  /* security (local) */
  char master_key[512];  /* secret reference */
  char admin_token[512]; /* secret reference */
  /* mutual TLS between nodes: PEM files ("" = plaintext) */
  char tls_cert[512], tls_key[512], tls_ca[512];
  /* optional TLS on the client port (listen.gateway_tls) */
  char gateway_tls_cert[512], gateway_tls_key[512];
  /* logging (local) */
  char log_level[16];

  /* ---- replicated: gateway behaviour ---- */
  char api_key[512]; /* secret reference, may be "" */
  char endpoint[512];
  struct zg_fallback fallbacks[ZG_MAX_FALLBACKS];
  size_t n_fallbacks;
  unsigned max_concurrent, max_queue, queue_timeout_ms;
  unsigned request_timeout_ms, connect_timeout_ms, first_byte_timeout_ms, idle_timeout_ms,
      stream_timeout_ms;
  uint64_t cache_size_bytes;
  unsigned cache_ttl_s;
  bool cache_all_temperatures;
  uint64_t max_body_bytes, max_header_bytes;
  unsigned client_timeout_ms, drain_timeout_ms, slow_client_timeout_ms;
  char upstream_client[8]; /* "auto" (lean for http://, libcurl else) | "curl" */
  bool has_temperature, has_top_p;
  double temperature, top_p;
  char auth_mode[16]; /* "token" | "none" | "bootstrap" (no auth section) */
  struct zg_file_token tokens[ZG_MAX_FILE_TOKENS];
  size_t n_tokens;
  char preferred_zone[32];
  char failback[16];
  unsigned failback_after_s;
  double lease_ratio;
  bool drills_enabled;
  bool upstream_forwarded_for;   /* send X-Forwarded-For to the upstream */
  char upstream_http_version[4]; /* "2" (HTTP/2 if offered via ALPN) | "1.1": https:// only */
  char upstream_ca_file[512];    /* PEM CA file for https:// upstreams; "" = system CAs */
  bool usage_enabled;            /* count usage and enforce tpm/budgets */
  unsigned usage_flush_ms;       /* replicated flush interval */

  struct cJSON *effective; /* the whole effective document (defaults filled) */
};

/* Loads and validates a file. Returns NULL with a message in err. */
struct zg_config *zg_config_load(const char *path, char *err, size_t errlen);
/* Same from text; `origin` names the source in messages. */
struct zg_config *zg_config_parse(const char *text, const char *origin, char *err, size_t errlen);
void zg_config_free(struct zg_config *cfg);

/* The effective document with every literal secret replaced by "****"
 * (env:/file: references are shown; they are not secrets). Caller frees. */
char *zg_config_dump_masked(const struct zg_config *cfg);
/* Warnings for literal secrets etc.; calls emit once per warning. */
void zg_config_warnings(const struct zg_config *cfg,
                        void (*emit)(void *ud, const char *path, const char *msg), void *ud);

/* The replicated sections of cfg as a new JSON object (caller frees). */
struct cJSON *zg_config_replicated_json(const struct zg_config *cfg);
/* Validates a replicated document (from the admin API) and returns a copy
 * of `local` with it applied. NULL with a message on error. */
struct zg_config *zg_config_with_replicated(const struct zg_config *local,
                                            const struct cJSON *replicated, const char *origin,
                                            char *err, size_t errlen);
/* Secret references in replicated config. A replicated document can be
 * changed by any admin token holder, so an "env:NAME" / "file:PATH" in it
 * must not reach into a node's environment or files: a node resolves such
 * a reference only when its own local file holds the very same string at
 * the same JSON path (every node's file seeds the same references; a
 * `config get` -> edit -> `config apply` round trip keeps them). Any other
 * one is "foreign".
 *
 * zg_config_foreign_refs() calls found(ud, path) for each foreign
 * reference in `replicated` (path like "alerts.channels[0].url"; the value
 * is never passed: it names a variable or file) and returns how many.
 * zg_config_without_foreign_refs() returns a copy of `replicated` (caller
 * frees) with each foreign reference neutralised, calling found() for
 * each: a config field becomes "" (no key), an alert channel using one is
 * dropped (it cannot be delivered without its secret). */
size_t zg_config_foreign_refs(const struct zg_config *local, const struct cJSON *replicated,
                              void (*found)(void *ud, const char *path), void *ud);
struct cJSON *zg_config_without_foreign_refs(const struct zg_config *local,
                                             const struct cJSON *replicated,
                                             void (*found)(void *ud, const char *path), void *ud);
/* True for "env:..." and "file:..." strings. */
bool zg_secret_is_reference(const char *value);

/* A free-form section (K_ANY in the schema, e.g. "alerts") is validated by
 * the module that owns it; node/ registers the validator at start-up.
 * The validator writes a message naming the JSON path into err. */
void zg_config_set_validator(const char *section,
                             int (*validate)(const struct cJSON *v, char *err, size_t errlen));
/* The config reference as a markdown table (key, type, default, scope,
 * meaning), generated from the schema so the docs cannot drift. Caller
 * frees. */
char *zg_config_reference_markdown(void);
/* The replicated top-level keys, "api_key, endpoint, ...", into out[size]. */
void zg_config_replicated_list(char *out, size_t size);
/* True when the top-level key belongs to the replicated part. */
bool zg_config_key_is_replicated(const char *key);

#endif
