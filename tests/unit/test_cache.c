/* Unit tests for gateway/cache: hits and misses, LRU
 * eviction order, the byte bound, oversize entries, TTL and live resize. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/base.h"
#include "gateway/cache.h"

/* Key from a text and an upstream id (as chat.c derives one: a digest). */
static void key_of(const char *json, const char *upstream, uint8_t key[32]) {
  char text[512];
  snprintf(text, sizeof text, "%s|%s", upstream, json);
  zg_sha256(text, strlen(text), key);
}

/* A distinct key per small integer, for eviction tests. */
static void key_n(int n, uint8_t key[32]) {
  char json[64];
  snprintf(json, sizeof json, "{\"n\":%d}", n);
  key_of(json, "up", key);
}

static void test_hit_and_miss(void **state) {
  struct response_cache *cache = response_cache_create(1 << 20);
  assert_non_null(cache);
  uint8_t key[32], other[32];
  key_of("{\"model\":\"m\",\"temperature\":0}", "up", key);
  key_of("{\"model\":\"m\",\"temperature\":0.5}", "up", other);

  const char *body = NULL, *content_type = NULL;
  size_t len = 0;
  int status = 0;
  assert_false(response_cache_get(cache, key, &body, &len, &status, &content_type));
  response_cache_put(cache, key, 200, "application/json", "{\"ok\":1}", 8, 0);
  assert_true(response_cache_get(cache, key, &body, &len, &status, &content_type));
  assert_int_equal(len, 8);
  assert_memory_equal(body, "{\"ok\":1}", 8);
  assert_int_equal(status, 200);
  assert_string_equal(content_type, "application/json");
  assert_false(response_cache_get(cache, other, NULL, NULL, NULL, NULL));

  struct response_cache_stats stats;
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.hits, 1);
  assert_int_equal(stats.misses, 2);
  assert_int_equal(stats.entries, 1);
  assert_int_equal(stats.bytes,
                   8 + strlen("application/json") + 32 + RESPONSE_CACHE_ENTRY_OVERHEAD);

  /* Replacing the entry under the same key keeps one entry. */
  response_cache_put(cache, key, 201, NULL, "x", 1, 0);
  assert_true(response_cache_get(cache, key, &body, &len, &status, &content_type));
  assert_int_equal(status, 201);
  assert_null(content_type);
  assert_int_equal(len, 1);
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.entries, 1);
  assert_int_equal(stats.evictions, 0);
  response_cache_destroy(cache);
}

/* Room for exactly three 100-byte bodies without content type. */
#define ENTRY_BYTES (100 + 32 + RESPONSE_CACHE_ENTRY_OVERHEAD)

static void test_lru_eviction_order(void **state) {
  struct response_cache *cache = response_cache_create(3 * ENTRY_BYTES);
  char body[100];
  memset(body, 'b', sizeof body);
  uint8_t k[5][32];
  for (int i = 0; i < 5; i++) key_n(i, k[i]);

  response_cache_put(cache, k[0], 200, NULL, body, 100, 0);
  response_cache_put(cache, k[1], 200, NULL, body, 100, 0);
  response_cache_put(cache, k[2], 200, NULL, body, 100, 0);
  /* Touch 0 so that 1 is now the least recently used. */
  assert_true(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));
  response_cache_put(cache, k[3], 200, NULL, body, 100, 0);
  assert_false(response_cache_get(cache, k[1], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[2], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[3], NULL, NULL, NULL, NULL));
  /* Order now (most recent first): 3, 2, 0 → inserting 4 evicts 0. */
  response_cache_put(cache, k[4], 200, NULL, body, 100, 0);
  assert_false(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[4], NULL, NULL, NULL, NULL));

  struct response_cache_stats stats;
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.evictions, 2);
  assert_int_equal(stats.entries, 3);
  response_cache_destroy(cache);
}

static void test_byte_bound_honoured(void **state) {
  const uint64_t max_bytes = 64 * 1024;
  struct response_cache *cache = response_cache_create(max_bytes);
  char body[1000];
  memset(body, 'x', sizeof body);
  struct response_cache_stats stats;
  for (int i = 0; i < 2000; i++) {
    uint8_t key[32];
    key_n(i, key);
    response_cache_put(cache, key, 200, "text/plain", body, (size_t)(i % 1000) + 1, 0);
    response_cache_stats(cache, &stats);
    assert_true(stats.bytes <= max_bytes);
  }
  assert_true(stats.entries > 10);
  assert_true(stats.evictions > 0);
  assert_int_equal(stats.entries + stats.evictions, 2000);
  /* The newest entry is present, the oldest long gone. */
  uint8_t key[32];
  key_n(1999, key);
  assert_true(response_cache_get(cache, key, NULL, NULL, NULL, NULL));
  key_n(0, key);
  assert_false(response_cache_get(cache, key, NULL, NULL, NULL, NULL));
  response_cache_destroy(cache);
}

static void test_oversize_entry_refused(void **state) {
  struct response_cache *cache = response_cache_create(2 * ENTRY_BYTES);
  char body[600]; /* 600 + overhead > 2 * ENTRY_BYTES */
  memset(body, 'o', sizeof body);
  uint8_t small[32], big[32];
  key_n(1, small);
  key_n(2, big);
  response_cache_put(cache, small, 200, NULL, body, 100, 0);
  response_cache_put(cache, big, 200, NULL, body, sizeof body, 0);
  assert_false(response_cache_get(cache, big, NULL, NULL, NULL, NULL));
  /* Refusing the big one did not evict the small one. */
  assert_true(response_cache_get(cache, small, NULL, NULL, NULL, NULL));
  struct response_cache_stats stats;
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.entries, 1);
  assert_int_equal(stats.evictions, 0);
  response_cache_destroy(cache);

  /* max_bytes 0 disables the cache. */
  cache = response_cache_create(0);
  response_cache_put(cache, small, 200, NULL, "x", 1, 0);
  assert_false(response_cache_get(cache, small, NULL, NULL, NULL, NULL));
  response_cache_destroy(cache);
}

static void test_ttl_expiry(void **state) {
  struct response_cache *cache = response_cache_create(1 << 20);
  uint8_t short_lived[32], forever[32];
  key_n(1, short_lived);
  key_n(2, forever);
  response_cache_put(cache, short_lived, 200, NULL, "a", 1, 30);
  response_cache_put(cache, forever, 200, NULL, "b", 1, 0);
  assert_true(response_cache_get(cache, short_lived, NULL, NULL, NULL, NULL));
  usleep(60 * 1000);
  assert_false(response_cache_get(cache, short_lived, NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, forever, NULL, NULL, NULL, NULL));
  struct response_cache_stats stats;
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.entries, 1);
  assert_int_equal(stats.evictions, 0);
  response_cache_destroy(cache);
}

static void test_live_resize(void **state) {
  struct response_cache *cache = response_cache_create(4 * ENTRY_BYTES);
  char body[100];
  memset(body, 'r', sizeof body);
  uint8_t k[4][32];
  for (int i = 0; i < 4; i++) {
    key_n(i, k[i]);
    response_cache_put(cache, k[i], 200, NULL, body, 100, 0);
  }
  response_cache_set_max_bytes(cache, 2 * ENTRY_BYTES);
  struct response_cache_stats stats;
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.entries, 2);
  assert_true(stats.bytes <= 2 * ENTRY_BYTES);
  assert_false(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));
  assert_false(response_cache_get(cache, k[1], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[2], NULL, NULL, NULL, NULL));
  assert_true(response_cache_get(cache, k[3], NULL, NULL, NULL, NULL));

  response_cache_set_max_bytes(cache, 0);
  response_cache_stats(cache, &stats);
  assert_int_equal(stats.entries, 0);
  assert_int_equal(stats.bytes, 0);
  response_cache_put(cache, k[0], 200, NULL, body, 100, 0);
  assert_false(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));

  /* Growing again makes it usable. */
  response_cache_set_max_bytes(cache, 10 * ENTRY_BYTES);
  response_cache_put(cache, k[0], 200, NULL, body, 100, 0);
  assert_true(response_cache_get(cache, k[0], NULL, NULL, NULL, NULL));
  response_cache_destroy(cache);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hit_and_miss),        cmocka_unit_test(test_lru_eviction_order),
      cmocka_unit_test(test_byte_bound_honoured), cmocka_unit_test(test_oversize_entry_refused),
      cmocka_unit_test(test_ttl_expiry),          cmocka_unit_test(test_live_resize),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
