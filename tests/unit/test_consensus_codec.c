/* test_consensus_codec: the command codec (round trip, rejection of bad
 * input), sealing (round trip, wrong key, tampering) and the leader-side
 * validation of write arguments. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/consensus.h"
#include "consensus/internal.h"

static const uint8_t key[32] = {42, 1, 2, 3};

static struct raft_buffer encode(int type, const char *args_json) {
  struct zgc_command cmd = {.type = type,
                            .at = 1700000000123ull,
                            .actor = "admin",
                            .source = "10.0.0.9",
                            .args = cJSON_Parse(args_json)};
  snprintf(cmd.req_id, sizeof cmd.req_id, "00112233aabbccdd");
  struct raft_buffer buf;
  char err[256];
  assert_int_equal(zgc_encode(&cmd, &buf, err, sizeof err), 0);
  cJSON_Delete(cmd.args);
  return buf;
}

static void test_round_trip(void **state) {
  (void)state;
  struct raft_buffer buf = encode(ZGC_AUDIT_NOTE, "{\"what\":\"hello \\u00e9\"}");
  assert_int_equal(buf.len % 8, 0);
  struct zgc_command out;
  char err[256];
  assert_int_equal(zgc_decode(buf.base, buf.len, &out, err, sizeof err), 0);
  assert_int_equal(out.type, ZGC_AUDIT_NOTE);
  assert_string_equal(out.req_id, "00112233aabbccdd");
  assert_true(out.at == 1700000000123ull);
  assert_string_equal(out.actor, "admin");
  assert_string_equal(out.source, "10.0.0.9");
  assert_string_equal(cJSON_GetObjectItem(out.args, "what")->valuestring, "hello \xc3\xa9");
  zgc_command_free(&out);
  raft_free(buf.base);
}

static int decode_bytes(const void *data, size_t len, char *err, size_t errlen) {
  struct zgc_command out;
  int rv = zgc_decode(data, len, &out, err, errlen);
  if (rv == 0) zgc_command_free(&out);
  return rv;
}

static void test_rejects_bad_input(void **state) {
  (void)state;
  char err[256];
  struct raft_buffer buf = encode(ZGC_CONFIG_PUT, "{\"config\":{\"a\":1}}");
  uint8_t *p = buf.base;
  uint8_t *copy = malloc(buf.len);

  /* Every truncation fails. */
  for (size_t n = 0; n < buf.len - 8; n++)
    assert_int_equal(decode_bytes(p, n, err, sizeof err), -1);
  assert_int_equal(decode_bytes(NULL, 0, err, sizeof err), -1);
  assert_non_null(strstr(err, "truncated"));

  memcpy(copy, p, buf.len);
  copy[0] = 'X';
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);
  assert_non_null(strstr(err, "magic"));

  memcpy(copy, p, buf.len);
  copy[4] = ZGC_FORMAT_VERSION + 1; /* a future version */
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);
  assert_non_null(strstr(err, "version"));

  memcpy(copy, p, buf.len);
  copy[5] = 200; /* unknown type */
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);
  assert_non_null(strstr(err, "unknown command type"));
  copy[5] = 0;
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);

  memcpy(copy, p, buf.len);
  copy[8] = 0x7f; /* absurd length */
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);

  memcpy(copy, p, buf.len);
  copy[ZGC_HEADER_LEN] = '['; /* bad JSON */
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);

  memcpy(copy, p, buf.len);
  copy[buf.len - 1] = 'x'; /* non-zero padding or trailing garbage */
  assert_int_equal(decode_bytes(copy, buf.len, err, sizeof err), -1);

  /* Valid JSON, wrong shape. */
  struct {
    const char *json;
  } shapes[] = {{"[]"},
                {"{\"req\":\"\",\"at\":1,\"actor\":\"a\",\"source\":\"s\"}"},
                {"{\"req\":1,\"at\":1,\"actor\":\"a\",\"source\":\"s\",\"args\":{}}"},
                {"{\"req\":\"\",\"at\":-5,\"actor\":\"a\",\"source\":\"s\",\"args\":{}}"},
                {"{\"req\":\"\",\"at\":1,\"source\":\"s\",\"args\":{}}"},
                {"{\"req\":\"\",\"at\":1,\"actor\":\"a\",\"source\":\"s\",\"args\":{}} {}"}};
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    size_t jl = strlen(shapes[i].json);
    uint8_t frame[256] = {'Z', 'G', 'C', 'M', ZGC_FORMAT_VERSION, ZGC_AUDIT_NOTE, 0,
                          0,   0,   0,   0,   (uint8_t)jl};
    memcpy(frame + ZGC_HEADER_LEN, shapes[i].json, jl);
    assert_int_equal(decode_bytes(frame, ZGC_HEADER_LEN + jl, err, sizeof err), -1);
  }
  free(copy);
  raft_free(buf.base);
}

static void test_seal(void **state) {
  (void)state;
  char *sealed = NULL, *plain = NULL, err[256];
  size_t len = 0;
  assert_int_equal(zg_seal(key, "provider-key", "sk-secret", 9, &sealed, err, sizeof err), 0);
  assert_null(strstr(sealed, "sk-secret"));
  assert_int_equal(zg_unseal(key, "provider-key", sealed, &plain, &len, err, sizeof err), 0);
  assert_string_equal(plain, "sk-secret");
  assert_int_equal(len, 9);
  zg_secret_free(plain);
  /* Same plaintext, fresh nonce: different sealed text. */
  char *sealed2 = NULL;
  assert_int_equal(zg_seal(key, "provider-key", "sk-secret", 9, &sealed2, err, sizeof err), 0);
  assert_string_not_equal(sealed, sealed2);
  free(sealed2);

  uint8_t other[32] = {7};
  assert_int_equal(zg_unseal(other, "provider-key", sealed, &plain, &len, err, sizeof err), -1);
  assert_non_null(strstr(err, "authentication failed"));
  assert_int_equal(zg_unseal(key, "keycheck", sealed, &plain, &len, err, sizeof err), -1);
  /* Tamper with one base64 character in the middle. */
  size_t mid = strlen(sealed) / 2;
  sealed[mid] = sealed[mid] == 'A' ? 'B' : 'A';
  assert_int_equal(zg_unseal(key, "provider-key", sealed, &plain, &len, err, sizeof err), -1);
  assert_int_equal(zg_unseal(key, "provider-key", "AAAA", &plain, &len, err, sizeof err), -1);
  assert_int_equal(zg_unseal(key, "provider-key", "!!", &plain, &len, err, sizeof err), -1);
  free(sealed);
}

/* Expects zg_build_entry to reject args with a message naming `field`. */
static void expect_invalid(const char *type, const char *args, const char *field) {
  struct raft_buffer buf;
  char err[256] = "";
  int rv =
      zg_build_entry(type, cJSON_Parse(args), "admin", "ip", 1, "", key, &buf, err, sizeof err);
  if (rv == 0) raft_free(buf.base);
  assert_int_equal(rv, CONSENSUS_EINVALID);
  if (strstr(err, field) == NULL)
    fail_msg("'%s' %s: message '%s' does not name '%s'", type, args, err, field);
}

static void test_validation(void **state) {
  (void)state;
  expect_invalid("config.put", "{}", "config");
  expect_invalid("config.put", "{\"config\":[]}", "config");
  expect_invalid("config.put", "{\"config\":{},\"if_match\":\"3\"}", "if_match");
  expect_invalid("config.put", "{\"config\":{},\"if_match\":1.5}", "if_match");
  expect_invalid("config.put", "{\"config\":{},\"extra\":1}", "extra");
  expect_invalid("key.add", "{}", "secret");
  expect_invalid("key.add", "{\"secret\":\"\"}", "secret");
  expect_invalid("key.add", "{\"secret\":\"x\",\"id\":\"bad id!\"}", "id");
  expect_invalid("key.add", "{\"secret\":\"x\",\"rotate_after_days\":4000}", "rotate_after_days");
  expect_invalid("key.add", "{\"secret\":\"x\",\"primary\":\"yes\"}", "primary");
  expect_invalid("key.add", "{\"secret\":\"x\",\"upstream\":\"\"}", "upstream");
  expect_invalid("key.rotate", "{\"secret\":\"x\"}", "id");
  expect_invalid("key.rotate", "{\"id\":\"k\",\"secret\":\"x\",\"grace_seconds\":-1}",
                 "grace_seconds");
  expect_invalid("key.revoke", "{}", "id");
  expect_invalid("key.invalidate", "{\"id\":\"k\",\"reason\":3}", "reason");
  expect_invalid("token.create",
                 "{\"sha256\":\""
                 "0123456789abcdef0123456789abcdef"
                 "0123456789abcdef0123456789abcdef\"}",
                 "name");
  expect_invalid("token.create", "{\"name\":\"n\",\"sha256\":\"xyz\"}", "sha256");
  expect_invalid("token.create",
                 "{\"name\":\"n\",\"sha256\":\""
                 "0123456789abcdef0123456789abcdef"
                 "0123456789abcdef0123456789abcdef\",\"allow\":[\"10.0.0.0/33\"]}",
                 "allow[0]");
  expect_invalid("token.create",
                 "{\"name\":\"n\",\"sha256\":\""
                 "0123456789abcdef0123456789abcdef"
                 "0123456789abcdef0123456789abcdef\",\"allow\":[\"::1/64\",\"nope\"]}",
                 "allow[1]");
  expect_invalid("token.create",
                 "{\"name\":\"n\",\"sha256\":\""
                 "0123456789abcdef0123456789abcdef"
                 "0123456789abcdef0123456789abcdef\",\"rpm\":-1}",
                 "rpm");
  expect_invalid("token.revoke", "{\"id\":7}", "id");
  expect_invalid("audit.note", "{}", "what");
  expect_invalid("no.such.type", "{}", "no.such.type");
  assert_true(zg_cidr_valid("10.0.0.0/8"));
  assert_true(zg_cidr_valid("192.168.1.7"));
  assert_true(zg_cidr_valid("2001:db8::/32"));
  assert_false(zg_cidr_valid("10.0.0.0/"));
  assert_false(zg_cidr_valid("300.0.0.0/8"));
}

static void test_secret_sealed_before_log(void **state) {
  (void)state;
  struct raft_buffer buf;
  char err[256];
  assert_int_equal(zg_build_entry("key.add", cJSON_Parse("{\"secret\":\"sk-PLAIN-xyz\"}"), "admin",
                                  "ip", 5, "r1", key, &buf, err, sizeof err),
                   0);
  assert_null(memmem(buf.base, buf.len, "sk-PLAIN-xyz", 12));
  struct zgc_command cmd;
  assert_int_equal(zgc_decode(buf.base, buf.len, &cmd, err, sizeof err), 0);
  const cJSON *id = cJSON_GetObjectItem(cmd.args, "id");
  assert_true(cJSON_IsString(id) && strncmp(id->valuestring, "key-", 4) == 0);
  assert_string_equal(cJSON_GetObjectItem(cmd.args, "upstream")->valuestring, "default");
  assert_int_equal(cJSON_GetObjectItem(cmd.args, "rotate_after_days")->valueint, 90);
  assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cmd.args, "primary")));
  char *plain = NULL;
  assert_int_equal(zg_unseal(key, "provider-key",
                             cJSON_GetObjectItem(cmd.args, "sealed")->valuestring, &plain, NULL,
                             err, sizeof err),
                   0);
  assert_string_equal(plain, "sk-PLAIN-xyz");
  zg_secret_free(plain);
  zgc_command_free(&cmd);
  raft_free(buf.base);
}

int main(void) {
  zg_log_set_level(ZG_ERROR);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trip),
      cmocka_unit_test(test_rejects_bad_input),
      cmocka_unit_test(test_seal),
      cmocka_unit_test(test_validation),
      cmocka_unit_test(test_secret_sealed_before_log),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
