/* seal.c: AES-256-GCM sealing of provider key secrets under the master key.
 *
 * Sealed form: base64 of [1] key version [12] random nonce [n] ciphertext
 * [16] tag, with "zonegate:<purpose>" as additional authenticated data so a
 * sealed value cannot be replayed for another purpose. Opening fails (-1,
 * message without any secret) on a wrong key, tampering, a truncated value or
 * an unknown key version. Plaintext buffers are wiped before being freed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "base/base.h"
#include "consensus/internal.h"

#define SEAL_NONCE_LEN 12
#define SEAL_TAG_LEN 16
#define SEAL_MAX_PLAIN (64 * 1024)

static int aad_for(const char *purpose, char *out, size_t outlen) {
  int n = snprintf(out, outlen, "zonegate:%s", purpose ? purpose : "");
  return (n < 0 || (size_t)n >= outlen) ? -1 : n;
}

int zg_seal(const uint8_t key[32], const char *purpose, const void *plain, size_t len,
            char **out_b64, char *err, size_t errlen) {
  char aad[128];
  int aad_len = aad_for(purpose, aad, sizeof aad);
  if (aad_len < 0 || len > SEAL_MAX_PLAIN) {
    snprintf(err, errlen, "zg_seal(): purpose too long or secret over %d bytes", SEAL_MAX_PLAIN);
    return -1;
  }
  size_t raw_len = 1 + SEAL_NONCE_LEN + len + SEAL_TAG_LEN;
  uint8_t *raw = malloc(raw_len);
  size_t b64_cap = 4 * ((raw_len + 2) / 3) + 1;
  char *b64 = malloc(b64_cap);
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  int out_len = 0, final_len = 0, rv = -1;
  if (raw == NULL || b64 == NULL || ctx == NULL) {
    snprintf(err, errlen, "zg_seal(): out of memory");
    goto done;
  }
  raw[0] = ZG_SEAL_KEY_VERSION;
  if (zg_random_bytes(raw + 1, SEAL_NONCE_LEN) != 0) {
    snprintf(err, errlen, "zg_seal(): no randomness for the nonce");
    goto done;
  }
  uint8_t *ct = raw + 1 + SEAL_NONCE_LEN;
  if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, SEAL_NONCE_LEN, NULL) != 1 ||
      EVP_EncryptInit_ex(ctx, NULL, NULL, key, raw + 1) != 1 ||
      EVP_EncryptUpdate(ctx, NULL, &out_len, (const uint8_t *)aad, aad_len) != 1 ||
      EVP_EncryptUpdate(ctx, ct, &out_len, plain, (int)len) != 1 ||
      EVP_EncryptFinal_ex(ctx, ct + out_len, &final_len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, SEAL_TAG_LEN, ct + len) != 1) {
    snprintf(err, errlen, "zg_seal(): AES-256-GCM encryption failed");
    goto done;
  }
  if (zg_base64_encode(raw, raw_len, b64, b64_cap) < 0) {
    snprintf(err, errlen, "zg_seal(): base64 encoding failed");
    goto done;
  }
  *out_b64 = b64;
  b64 = NULL;
  rv = 0;
done:
  EVP_CIPHER_CTX_free(ctx);
  free(raw);
  free(b64);
  return rv;
}

int zg_unseal(const uint8_t key[32], const char *purpose, const char *b64, char **out,
              size_t *out_len, char *err, size_t errlen) {
  char aad[128];
  int aad_len = aad_for(purpose, aad, sizeof aad);
  size_t b64_len = b64 ? strlen(b64) : 0;
  if (aad_len < 0 || b64_len == 0 || b64_len > 4 * SEAL_MAX_PLAIN) {
    snprintf(err, errlen, "zg_unseal(): empty or oversized sealed value");
    return -1;
  }
  size_t raw_cap = b64_len / 4 * 3 + 3;
  uint8_t *raw = malloc(raw_cap);
  if (raw == NULL) {
    snprintf(err, errlen, "zg_unseal(): out of memory");
    return -1;
  }
  int raw_len = zg_base64_decode(b64, raw, raw_cap);
  if (raw_len < 1 + SEAL_NONCE_LEN + SEAL_TAG_LEN) {
    free(raw);
    snprintf(err, errlen, "zg_unseal(): sealed value is not valid base64 or is truncated");
    return -1;
  }
  if (raw[0] != ZG_SEAL_KEY_VERSION) {
    snprintf(err, errlen, "zg_unseal(): sealed with unknown key version %u", raw[0]);
    free(raw);
    return -1;
  }
  size_t ct_len = (size_t)raw_len - 1 - SEAL_NONCE_LEN - SEAL_TAG_LEN;
  uint8_t *ct = raw + 1 + SEAL_NONCE_LEN;
  char *plain = malloc(ct_len + 1);
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  int n = 0, final_len = 0, rv = -1;
  if (plain == NULL || ctx == NULL) {
    snprintf(err, errlen, "zg_unseal(): out of memory");
    goto done;
  }
  if (EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, SEAL_NONCE_LEN, NULL) != 1 ||
      EVP_DecryptInit_ex(ctx, NULL, NULL, key, raw + 1) != 1 ||
      EVP_DecryptUpdate(ctx, NULL, &n, (const uint8_t *)aad, aad_len) != 1 ||
      EVP_DecryptUpdate(ctx, (uint8_t *)plain, &n, ct, (int)ct_len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, SEAL_TAG_LEN, ct + ct_len) != 1 ||
      EVP_DecryptFinal_ex(ctx, (uint8_t *)plain + n, &final_len) != 1) {
    snprintf(err, errlen,
             "zg_unseal(): authentication failed (wrong master key or tampered value)");
    goto done;
  }
  plain[ct_len] = '\0';
  *out = plain;
  if (out_len) *out_len = ct_len;
  plain = NULL;
  rv = 0;
done:
  EVP_CIPHER_CTX_free(ctx);
  if (plain != NULL) {
    OPENSSL_cleanse(plain, ct_len + 1);
    free(plain);
  }
  free(raw);
  return rv;
}
