/* gateway/cache: exact-match response cache. A chained hash table keyed by
 * the 32-byte request digest, plus a doubly linked LRU list (front = most
 * recently used); get and put are O(1). Memory is bounded by max_bytes,
 * counting body + content type + key + a fixed per-entry overhead; the
 * least recently used entries are evicted to make room. Failure modes:
 * out of memory on put stores nothing (the request is simply not cached);
 * an entry larger than the bound is refused. TTL is checked on get.
 */
#include "gateway/cache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"

struct cache_entry {
  uint8_t key[32];
  int status;
  char *content_type; /* malloc'd, may be NULL */
  char *body;         /* malloc'd, len bytes + NUL */
  size_t len;
  uint64_t charged_bytes;
  uint64_t expires_at_ms; /* 0 = never */
  struct cache_entry *lru_prev, *lru_next;
  struct cache_entry *bucket_next;
};

struct response_cache {
  uint64_t max_bytes;
  uint64_t bytes;
  uint64_t entries;
  struct cache_entry **buckets;
  size_t bucket_count; /* power of two */
  struct cache_entry *lru_front, *lru_back;
  uint64_t hits, misses, evictions;
};

#define CACHE_INITIAL_BUCKETS 64u

static size_t bucket_of(const struct response_cache *cache, const uint8_t key[32]) {
  uint64_t h;
  memcpy(&h, key, sizeof h); /* the key is already a uniform hash */
  return (size_t)(h & (cache->bucket_count - 1));
}

struct response_cache *response_cache_create(uint64_t max_bytes) {
  struct response_cache *cache = calloc(1, sizeof *cache);
  if (!cache) return NULL;
  cache->bucket_count = CACHE_INITIAL_BUCKETS;
  cache->buckets = calloc(cache->bucket_count, sizeof *cache->buckets);
  if (!cache->buckets) {
    free(cache);
    return NULL;
  }
  cache->max_bytes = max_bytes;
  return cache;
}

static void entry_free(struct cache_entry *entry) {
  free(entry->content_type);
  free(entry->body);
  free(entry);
}

static void lru_unlink(struct response_cache *cache, struct cache_entry *entry) {
  if (entry->lru_prev)
    entry->lru_prev->lru_next = entry->lru_next;
  else
    cache->lru_front = entry->lru_next;
  if (entry->lru_next)
    entry->lru_next->lru_prev = entry->lru_prev;
  else
    cache->lru_back = entry->lru_prev;
  entry->lru_prev = entry->lru_next = NULL;
}

static void lru_push_front(struct response_cache *cache, struct cache_entry *entry) {
  entry->lru_prev = NULL;
  entry->lru_next = cache->lru_front;
  if (cache->lru_front) cache->lru_front->lru_prev = entry;
  cache->lru_front = entry;
  if (!cache->lru_back) cache->lru_back = entry;
}

/* Unlinks entry from its bucket and the LRU list, updates totals, frees it. */
static void entry_remove(struct response_cache *cache, struct cache_entry *entry) {
  struct cache_entry **link = &cache->buckets[bucket_of(cache, entry->key)];
  while (*link && *link != entry) link = &(*link)->bucket_next;
  if (*link) *link = entry->bucket_next;
  lru_unlink(cache, entry);
  cache->bytes -= entry->charged_bytes;
  cache->entries--;
  entry_free(entry);
}

static struct cache_entry *entry_find(const struct response_cache *cache, const uint8_t key[32]) {
  struct cache_entry *entry = cache->buckets[bucket_of(cache, key)];
  while (entry && memcmp(entry->key, key, 32) != 0) entry = entry->bucket_next;
  return entry;
}

void response_cache_destroy(struct response_cache *cache) {
  if (!cache) return;
  struct cache_entry *entry = cache->lru_front;
  while (entry) {
    struct cache_entry *next = entry->lru_next;
    entry_free(entry);
    entry = next;
  }
  free(cache->buckets);
  free(cache);
}

static void evict_to_fit(struct response_cache *cache, uint64_t limit) {
  while (cache->lru_back && cache->bytes > limit) {
    entry_remove(cache, cache->lru_back);
    cache->evictions++;
  }
}

void response_cache_set_max_bytes(struct response_cache *cache, uint64_t max_bytes) {
  cache->max_bytes = max_bytes;
  evict_to_fit(cache, max_bytes);
}

/* Doubles the bucket array when entries outnumber buckets. Failure to grow
 * is harmless: chains just get longer. */
static void maybe_grow(struct response_cache *cache) {
  if (cache->entries < cache->bucket_count) return;
  size_t new_count = cache->bucket_count * 2;
  struct cache_entry **new_buckets = calloc(new_count, sizeof *new_buckets);
  if (!new_buckets) return;
  for (size_t i = 0; i < cache->bucket_count; i++) {
    struct cache_entry *entry = cache->buckets[i];
    while (entry) {
      struct cache_entry *next = entry->bucket_next;
      uint64_t h;
      memcpy(&h, entry->key, sizeof h);
      size_t b = (size_t)(h & (new_count - 1));
      entry->bucket_next = new_buckets[b];
      new_buckets[b] = entry;
      entry = next;
    }
  }
  free(cache->buckets);
  cache->buckets = new_buckets;
  cache->bucket_count = new_count;
}

bool response_cache_get(struct response_cache *cache, const uint8_t key[32], const char **body,
                        size_t *len, int *status, const char **content_type) {
  struct cache_entry *entry = cache->max_bytes ? entry_find(cache, key) : NULL;
  if (entry && entry->expires_at_ms && zg_mono_ms() >= entry->expires_at_ms) {
    entry_remove(cache, entry);
    entry = NULL;
  }
  if (!entry) {
    cache->misses++;
    return false;
  }
  cache->hits++;
  lru_unlink(cache, entry);
  lru_push_front(cache, entry);
  if (body) *body = entry->body;
  if (len) *len = entry->len;
  if (status) *status = entry->status;
  if (content_type) *content_type = entry->content_type;
  return true;
}

void response_cache_put(struct response_cache *cache, const uint8_t key[32], int status,
                        const char *content_type, const char *body, size_t len, uint64_t ttl_ms) {
  struct cache_entry *old = entry_find(cache, key);
  if (old) entry_remove(cache, old);

  size_t content_type_len = content_type ? strlen(content_type) : 0;
  uint64_t charged = (uint64_t)len + content_type_len + 32 + RESPONSE_CACHE_ENTRY_OVERHEAD;
  if (charged > cache->max_bytes) return; /* also covers a disabled cache */

  struct cache_entry *entry = calloc(1, sizeof *entry);
  if (!entry) return;
  entry->body = malloc(len + 1);
  if (content_type) entry->content_type = strdup(content_type);
  if (!entry->body || (content_type && !entry->content_type)) {
    entry_free(entry);
    return;
  }
  if (len) memcpy(entry->body, body, len);
  entry->body[len] = '\0';
  entry->len = len;
  entry->status = status;
  memcpy(entry->key, key, 32);
  entry->charged_bytes = charged;
  entry->expires_at_ms = ttl_ms ? zg_mono_ms() + ttl_ms : 0;

  evict_to_fit(cache, cache->max_bytes - charged);
  size_t b = bucket_of(cache, key);
  entry->bucket_next = cache->buckets[b];
  cache->buckets[b] = entry;
  lru_push_front(cache, entry);
  cache->entries++;
  cache->bytes += charged;
  maybe_grow(cache);
}

void response_cache_stats(const struct response_cache *cache, struct response_cache_stats *out) {
  out->hits = cache->hits;
  out->misses = cache->misses;
  out->entries = cache->entries;
  out->bytes = cache->bytes;
  out->evictions = cache->evictions;
}
