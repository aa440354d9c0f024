/* tls.c: see base/tls.h. */
#include "base/base.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NODE_URI_PREFIX "urn:zonegate:node:"

static void openssl_error(char *err, size_t errlen, const char *what, const char *file) {
  char detail[256] = "";
  unsigned long e = ERR_get_error();
  if (e) ERR_error_string_n(e, detail, sizeof detail);
  ERR_clear_error();
  snprintf(err, errlen, "%s %s%s%s", what, file ? file : "", detail[0] ? ": " : "", detail);
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg) {
  const unsigned char *want = arg; /* length-prefixed */
  unsigned char *sel = NULL;
  if (SSL_select_next_proto(&sel, outlen, want, (unsigned)want[0] + 1, in, inlen) ==
      OPENSSL_NPN_NEGOTIATED) {
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
  }
  return SSL_TLSEXT_ERR_NOACK; /* no ALPN, or none we speak: carry on without */
}

SSL_CTX *zg_tls_ctx_new(const char *cert_file, const char *key_file, const char *ca_file,
                        enum zg_tls_verify verify, const char *alpn, char *err, size_t errlen) {
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(TLS_method());
  if (!ctx) {
    openssl_error(err, errlen, "cannot create a TLS context", NULL);
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_num_tickets(ctx, 0); /* no resumption: every connection shows its certificate */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  if (cert_file && cert_file[0]) {
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
      openssl_error(err, errlen, "cannot load the certificate", cert_file);
      goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
      openssl_error(err, errlen, "cannot load the private key", key_file);
      goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
      openssl_error(err, errlen, "the private key does not match the certificate", key_file);
      goto fail;
    }
  }
  if (ca_file && ca_file[0]) {
    if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
      openssl_error(err, errlen, "cannot load the CA certificate", ca_file);
      goto fail;
    }
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca_file);
    if (names) SSL_CTX_set_client_CA_list(ctx, names);
  } else if (verify != ZG_TLS_PEER_NONE) {
    snprintf(err, errlen, "a CA file is needed to verify peers");
    goto fail;
  }
  int mode = verify == ZG_TLS_PEER_REQUIRED   ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
             : verify == ZG_TLS_PEER_OPTIONAL ? SSL_VERIFY_PEER
                                              : SSL_VERIFY_NONE;
  SSL_CTX_set_verify(ctx, mode, NULL);
  SSL_CTX_set_verify_depth(ctx, 4);
  if (alpn && alpn[0]) {
    size_t n = strlen(alpn);
    unsigned char *wire = malloc(n + 1); /* lives as long as the process: contexts are few */
    if (!wire || n > 255) {
      free(wire);
      snprintf(err, errlen, "bad ALPN protocol");
      goto fail;
    }
    wire[0] = (unsigned char)n;
    memcpy(wire + 1, alpn, n);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, wire);
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

int zg_tls_cert_node_id(X509 *cert, char *out, size_t len) {
  if (!cert || len == 0) return -1;
  out[0] = '\0';
  GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
  int found = -1;
  for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans) && found != 0; i++) {
    const GENERAL_NAME *gn = sk_GENERAL_NAME_value(sans, i);
    if (gn->type != GEN_URI) continue;
    const char *uri = (const char *)ASN1_STRING_get0_data(gn->d.uniformResourceIdentifier);
    int ulen = ASN1_STRING_length(gn->d.uniformResourceIdentifier);
    size_t plen = strlen(NODE_URI_PREFIX);
    if (ulen > (int)plen && (size_t)ulen - plen < len && memcmp(uri, NODE_URI_PREFIX, plen) == 0 &&
        memchr(uri, '\0', (size_t)ulen) == NULL) {
      memcpy(out, uri + plen, (size_t)ulen - plen);
      out[ulen - plen] = '\0';
      found = 0;
    }
  }
  GENERAL_NAMES_free(sans);
  if (found == 0) return 0;
  int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, out, (int)len);
  if (n <= 0 || (size_t)n >= len || strlen(out) != (size_t)n) {
    out[0] = '\0';
    return -1;
  }
  return 0;
}

int zg_tls_peer_node_id(SSL *ssl, char *out, size_t len) {
  if (len) out[0] = '\0';
  if (SSL_get_verify_result(ssl) != X509_V_OK) return -1;
  X509 *peer = SSL_get0_peer_certificate(ssl);
  return zg_tls_cert_node_id(peer, out, len);
}

int64_t zg_tls_cert_file_not_after(const char *path, bool *ok) {
  *ok = false;
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  X509 *cert = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  if (!cert) {
    ERR_clear_error();
    return 0;
  }
  struct tm tm;
  int64_t when = 0;
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) == 1) {
    when = (int64_t)timegm(&tm);
    *ok = true;
  }
  X509_free(cert);
  return when;
}

/* ---- session ---------------------------------------------------------- */

struct zg_tls {
  SSL *ssl;
  BIO *rbio, *wbio; /* memory BIOs: network in, network out */
  bool established;
  char error[256];
};

struct zg_tls *zg_tls_new(SSL_CTX *ctx, bool server) {
  struct zg_tls *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->ssl = SSL_new(ctx);
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) {
    SSL_free(t->ssl);
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    free(t);
    return NULL;
  }
  BIO_set_mem_eof_return(t->rbio, -1); /* empty = "want more", not EOF */
  BIO_set_mem_eof_return(t->wbio, -1);
  SSL_set_bio(t->ssl, t->rbio, t->wbio); /* the SSL owns both now */
  if (server)
    SSL_set_accept_state(t->ssl);
  else
    SSL_set_connect_state(t->ssl);
  return t;
}

void zg_tls_free(struct zg_tls *t) {
  if (!t) return;
  SSL_free(t->ssl);
  free(t);
}

SSL *zg_tls_ssl(struct zg_tls *t) {
  return t->ssl;
}

static int fail(struct zg_tls *t, int ret) {
  int e = SSL_get_error(t->ssl, ret);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return ZG_TLS_WANT;
  if (e == SSL_ERROR_ZERO_RETURN) return ZG_TLS_CLOSED;
  if (!t->error[0]) {
    long vr = SSL_get_verify_result(t->ssl);
    unsigned long code = ERR_peek_error();
    char detail[200] = "";
    if (code) ERR_error_string_n(code, detail, sizeof detail);
    if (vr != X509_V_OK)
      snprintf(t->error, sizeof t->error, "certificate verification failed: %s",
               X509_verify_cert_error_string(vr));
    else if (detail[0])
      snprintf(t->error, sizeof t->error, "TLS error: %s", detail);
    else
      snprintf(t->error, sizeof t->error, "TLS error (SSL_get_error %d)", e);
  }
  ERR_clear_error();
  return ZG_TLS_ERROR;
}

int zg_tls_feed(struct zg_tls *t, const void *data, size_t len) {
  if (len == 0) return 0;
  return BIO_write(t->rbio, data, (int)len) == (int)len ? 0 : ZG_TLS_ERROR;
}

int zg_tls_handshake(struct zg_tls *t) {
  if (t->established) return 1;
  ERR_clear_error();
  int r = SSL_do_handshake(t->ssl);
  if (r == 1) {
    t->established = true;
    return 1;
  }
  int rc = fail(t, r);
  return rc == ZG_TLS_CLOSED ? ZG_TLS_ERROR : rc;
}

bool zg_tls_established(const struct zg_tls *t) {
  return t->established;
}

int zg_tls_read(struct zg_tls *t, void *buf, size_t len) {
  if (!t->established) {
    int h = zg_tls_handshake(t);
    if (h != 1) return h;
  }
  ERR_clear_error();
  int n = SSL_read(t->ssl, buf, (int)(len > 1u << 30 ? 1u << 30 : len));
  return n > 0 ? n : fail(t, n);
}

int zg_tls_write(struct zg_tls *t, const void *data, size_t len) {
  const char *p = data;
  while (len > 0) {
    ERR_clear_error();
    int chunk = len > 1u << 20 ? 1 << 20 : (int)len;
    int n = SSL_write(t->ssl, p, chunk);
    if (n <= 0) {
      (void)fail(t, n); /* records why */
      return ZG_TLS_ERROR;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

void zg_tls_shutdown(struct zg_tls *t) {
  if (!t->established) return;
  ERR_clear_error();
  SSL_shutdown(t->ssl);
  ERR_clear_error();
}

size_t zg_tls_pending(const struct zg_tls *t) {
  return BIO_ctrl_pending(t->wbio);
}

size_t zg_tls_take(struct zg_tls *t, void *buf, size_t len) {
  int n = BIO_read(t->wbio, buf, (int)(len > 1u << 30 ? 1u << 30 : len));
  return n > 0 ? (size_t)n : 0;
}

const char *zg_tls_error(const struct zg_tls *t) {
  return t->error[0] ? t->error : "TLS error";
}
