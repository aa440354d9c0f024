/* Unit tests for the secret-reference rule of replicated config
 * (config/: a node resolves an env:/file: reference only when its own
 * local file holds the same string at the same JSON path) and for the
 * base helpers the admin API's security uses: HMAC-SHA256 (RFC 4231
 * vector) and the per-key log throttle shared with the raft transport. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "base/base.h"
#include "config/config.h"

static const char local_text[] =
    "{\"node\": {\"id\": \"gw-a\"},"
    " \"endpoint\": \"http://127.0.0.1:9\", \"api_key\": \"env:UPSTREAM_API_KEY\","
    " \"fallback_endpoints\": [{\"endpoint\": \"http://127.0.0.1:8\", \"api_key\": "
    "\"env:FALLBACK_KEY\"}],"
    " \"alerts\": {\"channels\": [{\"type\": \"webhook\", \"url\": \"env:ALERT_WEBHOOK_URL\"}]}}";

struct paths {
  char text[512];
};

static void collect(void *ud, const char *path) {
  struct paths *p = ud;
  size_t len = strlen(p->text);
  snprintf(p->text + len, sizeof(p->text) - len, "%s%s", len ? "," : "", path);
}

static struct zg_config *local_config(void) {
  char err[512];
  struct zg_config *cfg = zg_config_parse(local_text, "local.json", err, sizeof(err));
  if (!cfg) fail_msg("local config: %s", err);
  return cfg;
}

/* The seed (every node's file) and a config get -> apply round trip. */
static void test_same_references_are_local(void **state) {
  struct zg_config *local = local_config();
  cJSON *replicated = zg_config_replicated_json(local);
  struct paths p = {""};
  assert_int_equal(zg_config_foreign_refs(local, replicated, collect, &p), 0);
  assert_string_equal(p.text, "");
  cJSON_Delete(replicated);
  zg_config_free(local);
}

static void test_foreign_references_named_by_path(void **state) {
  struct zg_config *local = local_config();
  cJSON *replicated = cJSON_Parse(
      "{\"endpoint\": \"http://evil\", \"api_key\": \"env:ZONEGATE_MASTER_KEY\","
      " \"fallback_endpoints\": [{\"endpoint\": \"http://x\", \"api_key\": \"file:/etc/shadow\"}],"
      " \"alerts\": {\"channels\": [{\"type\": \"webhook\", \"url\": \"env:ALERT_WEBHOOK_URL\"},"
      "   {\"type\": \"webhook\", \"url\": \"https://h\", \"headers\": {\"X-T\": "
      "\"env:ZONEGATE_ADMIN_TOKEN\"}}]}}");
  assert_non_null(replicated);
  struct paths p = {""};
  assert_int_equal(zg_config_foreign_refs(local, replicated, collect, &p), 3);
  assert_string_equal(p.text,
                      "api_key,fallback_endpoints[0].api_key,alerts.channels[1].headers.X-T");
  /* Never the value. */
  assert_null(strstr(p.text, "MASTER"));
  cJSON_Delete(replicated);
  zg_config_free(local);
}

/* The same name at another path is not the node's own reference. */
static void test_reference_moved_to_another_path_is_foreign(void **state) {
  struct zg_config *local = local_config();
  cJSON *replicated =
      cJSON_Parse("{\"api_key\": \"env:FALLBACK_KEY\", \"fallback_endpoints\": [{\"endpoint\": "
                  "\"http://x\", \"api_key\": \"env:UPSTREAM_API_KEY\"}]}");
  struct paths p = {""};
  assert_int_equal(zg_config_foreign_refs(local, replicated, collect, &p), 2);
  assert_string_equal(p.text, "api_key,fallback_endpoints[0].api_key");
  cJSON_Delete(replicated);
  zg_config_free(local);
}

static void test_neutralised_copy(void **state) {
  struct zg_config *local = local_config();
  cJSON *replicated = cJSON_Parse(
      "{\"api_key\": \"file:/proc/self/environ\","
      " \"fallback_endpoints\": [{\"endpoint\": \"http://127.0.0.1:8\", \"api_key\": "
      "\"env:FALLBACK_KEY\"}],"
      " \"alerts\": {\"channels\": [{\"type\": \"webhook\", \"url\": \"env:ALERT_WEBHOOK_URL\"},"
      "   {\"type\": \"sms\", \"url\": \"env:EVIL\", \"to\": \"1\"}]}}");
  struct paths p = {""};
  cJSON *safe = zg_config_without_foreign_refs(local, replicated, collect, &p);
  assert_non_null(safe);
  assert_string_equal(p.text, "api_key,alerts.channels[1].url");
  assert_string_equal(cJSON_GetObjectItem(safe, "api_key")->valuestring, "");
  cJSON *fb = cJSON_GetArrayItem(cJSON_GetObjectItem(safe, "fallback_endpoints"), 0);
  assert_string_equal(cJSON_GetObjectItem(fb, "api_key")->valuestring, "env:FALLBACK_KEY");
  cJSON *channels = cJSON_GetObjectItem(cJSON_GetObjectItem(safe, "alerts"), "channels");
  assert_int_equal(cJSON_GetArraySize(channels), 1);
  assert_string_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(channels, 0), "url")->valuestring,
                      "env:ALERT_WEBHOOK_URL");
  /* The input is untouched. */
  assert_string_equal(cJSON_GetObjectItem(replicated, "api_key")->valuestring,
                      "file:/proc/self/environ");
  /* The neutralised copy is still a valid replicated config. */
  char err[512];
  struct zg_config *effective = zg_config_with_replicated(local, safe, "test", err, sizeof(err));
  if (!effective) fail_msg("%s", err);
  assert_string_equal(effective->api_key, "");
  zg_config_free(effective);
  cJSON_Delete(safe);
  cJSON_Delete(replicated);
  zg_config_free(local);
}

/* RFC 4231 test case 2. */
static void test_hmac_sha256(void **state) {
  uint8_t mac[32];
  const char *data = "what do ya want for nothing?";
  zg_hmac_sha256("Jefe", 4, data, strlen(data), mac);
  char hex[65];
  for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", mac[i]);
  assert_string_equal(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

static void test_log_throttle(void **state) {
  struct zg_log_throttle t = {.interval_ms = 200};
  unsigned suppressed = 99;
  assert_true(zg_log_throttle(&t, "10.0.0.1", &suppressed));
  assert_int_equal(suppressed, 0);
  for (int i = 0; i < 5; i++) assert_false(zg_log_throttle(&t, "10.0.0.1", &suppressed));
  /* Another key has its own budget. */
  assert_true(zg_log_throttle(&t, "10.0.0.2", &suppressed));
  assert_int_equal(suppressed, 0);
  usleep(250 * 1000);
  assert_true(zg_log_throttle(&t, "10.0.0.1", &suppressed));
  assert_int_equal(suppressed, 5);
  /* A flood of distinct keys reuses the slots, never grows. */
  char key[32];
  for (int i = 0; i < 100; i++) {
    snprintf(key, sizeof(key), "192.0.2.%d", i);
    assert_true(zg_log_throttle(&t, key, NULL));
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_same_references_are_local),
      cmocka_unit_test(test_foreign_references_named_by_path),
      cmocka_unit_test(test_reference_moved_to_another_path_is_foreign),
      cmocka_unit_test(test_neutralised_copy),
      cmocka_unit_test(test_hmac_sha256),
      cmocka_unit_test(test_log_throttle),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
