/* gateway/cache: private to the gateway module. An exact-match response
 * cache: LRU, bounded by total bytes, with optional per-entry TTL.
 *
 * Keys are 32-byte digests chosen by the caller (chat.c: SHA-256 of
 * exactly what the upstream would see). Single-threaded (the uv loop): no
 * locks.
 */
#ifndef ZG_GATEWAY_CACHE_H
#define ZG_GATEWAY_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct response_cache;

/* Fixed bookkeeping charged to every entry on top of body, content type
 * and key, so that many tiny entries cannot exceed the bound in practice. */
#define RESPONSE_CACHE_ENTRY_OVERHEAD 128u

/* max_bytes 0 creates a disabled cache: get always misses, put stores
 * nothing. Returns NULL only when out of memory. */
struct response_cache *response_cache_create(uint64_t max_bytes);
void response_cache_destroy(struct response_cache *cache); /* NULL is fine */

/* Live resize: evicts least recently used entries until the cache fits.
 * 0 empties the cache and disables it. */
void response_cache_set_max_bytes(struct response_cache *cache, uint64_t max_bytes);

/* Looks key up. On a hit, moves the entry to the front and sets *body,
 * *len, *status and *content_type (any of these pointers may be NULL).
 * The returned strings are owned by the cache and stay valid until the
 * next put, set_max_bytes or destroy on this cache: copy them (or send
 * them) before calling any of those. An expired entry is removed and
 * counted as a miss. */
bool response_cache_get(struct response_cache *cache, const uint8_t key[32], const char **body,
                        size_t *len, int *status, const char **content_type);

/* Stores a copy of body (len bytes) and content_type (NULL → none) under
 * key, replacing any previous entry. ttl_ms 0 means no expiry. An entry
 * larger than max_bytes is not stored (a previous entry under the same
 * key is still removed). Out of memory: nothing is stored. */
void response_cache_put(struct response_cache *cache, const uint8_t key[32], int status,
                        const char *content_type, const char *body, size_t len, uint64_t ttl_ms);

struct response_cache_stats {
  uint64_t hits, misses, entries, bytes, evictions;
};
/* evictions counts entries removed because the byte bound required it
 * (on put or on a resize); replacements and TTL expiries are not counted. */
void response_cache_stats(const struct response_cache *cache, struct response_cache_stats *out);

#endif
