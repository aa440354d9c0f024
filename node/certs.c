/* certs.c: `zonegate certs init DIR --nodes gw-a,gw-b,witness [--hosts H,...]
 * [--days N]`: a cluster CA and one certificate per node, with OpenSSL's C
 * API (no openssl CLI).
 *
 * DIR/ca.crt, DIR/ca.key: the cluster CA (ECDSA P-256, 10 years). An
 * existing CA in DIR is reused, so the command also issues certificates
 * for nodes added later. DIR/<id>.crt, DIR/<id>.key: ECDSA P-256, valid
 * --days (default 825), CN=<id>, subjectAltName URI:urn:zonegate:node:<id>
 * (what nodes check), DNS:<id>, DNS:localhost, IP:127.0.0.1, IP:::1, plus
 * every --hosts entry (IPs and DNS names the CLI and peers dial), extended
 * key usage serverAuth + clientAuth. Keys are written 0600; existing node
 * files are kept (delete them to reissue).
 */
#include "node/node.h"

#include <arpa/inet.h>
#include <stdbool.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CA_DAYS 3650
#define DEFAULT_NODE_DAYS 825

static void print_openssl_error(const char *what) {
  char detail[256] = "";
  unsigned long e = ERR_get_error();
  if (e) ERR_error_string_n(e, detail, sizeof detail);
  ERR_clear_error();
  fprintf(stderr, "error: %s%s%s\n", what, detail[0] ? ": " : "", detail);
}

static EVP_PKEY *new_key(void) {
  return EVP_EC_gen("P-256");
}

static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
  X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
  if (!ext) return -1;
  int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return ok == 1 ? 0 : -1;
}

static X509 *new_cert(const char *cn, EVP_PKEY *key, long days) {
  X509 *cert = X509_new();
  if (!cert) return NULL;
  unsigned char serial[16];
  BIGNUM *bn = NULL;
  if (RAND_bytes(serial, sizeof serial) != 1) goto fail;
  serial[0] &= 0x7f; /* positive */
  bn = BN_bin2bn(serial, sizeof serial, NULL);
  if (!bn || !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert))) goto fail;
  BN_free(bn);
  bn = NULL;
  X509_set_version(cert, 2);
  X509_gmtime_adj(X509_getm_notBefore(cert), -300); /* small clock skew between nodes */
  X509_gmtime_adj(X509_getm_notAfter(cert), days * 86400L);
  X509_set_pubkey(cert, key);
  X509_NAME *name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"zonegate", -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
  return cert;
fail:
  BN_free(bn);
  X509_free(cert);
  return NULL;
}

static int write_key(const char *path, EVP_PKEY *key) {
  unlink(path);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    fprintf(stderr, "error: cannot create %s: %s\n", path, strerror(errno));
    return -1;
  }
  FILE *f = fdopen(fd, "w");
  if (!f) {
    close(fd);
    return -1;
  }
  int ok = PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
  if (fclose(f) != 0 || ok != 1) {
    fprintf(stderr, "error: cannot write %s\n", path);
    return -1;
  }
  return 0;
}

static int write_cert(const char *path, X509 *cert) {
  FILE *f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "error: cannot create %s: %s\n", path, strerror(errno));
    return -1;
  }
  int ok = PEM_write_X509(f, cert);
  if (fclose(f) != 0 || ok != 1) {
    fprintf(stderr, "error: cannot write %s\n", path);
    return -1;
  }
  chmod(path, 0644);
  return 0;
}

static bool valid_id(const char *id) {
  if (!id[0] || strlen(id) > 63) return false;
  for (const char *p = id; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '-' || *p == '_' || *p == '.'))
      return false;
  return true;
}

static bool is_ip(const char *h) {
  unsigned char buf[16];
  return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

/* Loads DIR/ca.crt + DIR/ca.key, or makes them. */
static int load_or_make_ca(const char *dir, X509 **ca, EVP_PKEY **ca_key) {
  char crt[600], key[600];
  snprintf(crt, sizeof crt, "%s/ca.crt", dir);
  snprintf(key, sizeof key, "%s/ca.key", dir);
  FILE *fc = fopen(crt, "r"), *fk = fopen(key, "r");
  if (fc && fk) {
    *ca = PEM_read_X509(fc, NULL, NULL, NULL);
    *ca_key = PEM_read_PrivateKey(fk, NULL, NULL, NULL);
    fclose(fc);
    fclose(fk);
    if (!*ca || !*ca_key || X509_check_private_key(*ca, *ca_key) != 1) {
      print_openssl_error(
          "the existing CA in the directory is unreadable or its key does not match");
      return -1;
    }
    printf("kept     %s (existing cluster CA)\n", crt);
    return 0;
  }
  if (fc) fclose(fc);
  if (fk) fclose(fk);
  *ca_key = new_key();
  if (!*ca_key) {
    print_openssl_error("cannot make a P-256 key");
    return -1;
  }
  *ca = new_cert("zonegate cluster CA", *ca_key, CA_DAYS);
  if (!*ca) {
    print_openssl_error("cannot make the CA certificate");
    return -1;
  }
  X509_set_issuer_name(*ca, X509_get_subject_name(*ca));
  if (add_ext(*ca, *ca, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") ||
      add_ext(*ca, *ca, NID_key_usage, "critical,keyCertSign,cRLSign") ||
      add_ext(*ca, *ca, NID_subject_key_identifier, "hash") ||
      X509_sign(*ca, *ca_key, EVP_sha256()) == 0) {
    print_openssl_error("cannot sign the CA certificate");
    return -1;
  }
  if (write_key(key, *ca_key) != 0 || write_cert(crt, *ca) != 0) return -1;
  printf("created  %s and %s (cluster CA, %d days; keep ca.key offline)\n", crt, key, CA_DAYS);
  return 0;
}

static int make_node(const char *dir, const char *id, const char *hosts, long days, X509 *ca,
                     EVP_PKEY *ca_key) {
  char crt[600], keyp[600];
  snprintf(crt, sizeof crt, "%s/%s.crt", dir, id);
  snprintf(keyp, sizeof keyp, "%s/%s.key", dir, id);
  if (access(crt, F_OK) == 0 && access(keyp, F_OK) == 0) {
    printf("kept     %s (exists; delete it and its key to reissue)\n", crt);
    return 0;
  }
  EVP_PKEY *key = new_key();
  X509 *cert = key ? new_cert(id, key, days) : NULL;
  char san[2048];
  int n = snprintf(san, sizeof san,
                   "URI:urn:zonegate:node:%s,DNS:%s,DNS:localhost,IP:127.0.0.1,IP:::1", id, id);
  if (hosts && hosts[0]) {
    char copy[1024];
    snprintf(copy, sizeof copy, "%s", hosts);
    for (char *save = NULL, *h = strtok_r(copy, ",", &save); h; h = strtok_r(NULL, ",", &save)) {
      if (!h[0]) continue;
      n += snprintf(san + n, sizeof san - (size_t)n, ",%s:%s", is_ip(h) ? "IP" : "DNS", h);
      if ((size_t)n >= sizeof san) {
        fprintf(stderr, "error: --hosts is too long\n");
        goto fail;
      }
    }
  }
  if (!cert) {
    print_openssl_error("cannot make a node key or certificate");
    goto fail;
  }
  X509_set_issuer_name(cert, X509_get_subject_name(ca));
  if (add_ext(cert, ca, NID_basic_constraints, "critical,CA:FALSE") ||
      add_ext(cert, ca, NID_key_usage, "critical,digitalSignature") ||
      add_ext(cert, ca, NID_ext_key_usage, "serverAuth,clientAuth") ||
      add_ext(cert, ca, NID_subject_key_identifier, "hash") ||
      add_ext(cert, ca, NID_authority_key_identifier, "keyid:always") ||
      add_ext(cert, ca, NID_subject_alt_name, san)) {
    print_openssl_error("bad certificate extension (check --hosts)");
    goto fail;
  }
  if (X509_sign(cert, ca_key, EVP_sha256()) == 0) {
    print_openssl_error("cannot sign the node certificate");
    goto fail;
  }
  if (write_key(keyp, key) != 0 || write_cert(crt, cert) != 0) goto fail;
  printf("created  %s and %s (node %s, %ld days)\n", crt, keyp, id, days);
  X509_free(cert);
  EVP_PKEY_free(key);
  return 0;
fail:
  X509_free(cert);
  EVP_PKEY_free(key);
  return -1;
}

static void certs_usage(FILE *out) {
  fprintf(out, "usage: zonegate certs init DIR --nodes ID[,ID...] [--hosts HOST[,HOST...]] "
               "[--days N]\n"
               "  a cluster CA (DIR/ca.crt, DIR/ca.key) and DIR/ID.crt + DIR/ID.key per node;\n"
               "  an existing CA in DIR is reused (issue certificates for new members).\n");
}

int node_certs(int argc, char **argv) {
  if (argc < 3 || strcmp(argv[1], "init") != 0) {
    certs_usage(stderr);
    return 2;
  }
  const char *dir = argv[2], *nodes = NULL, *hosts = NULL;
  long days = DEFAULT_NODE_DAYS;
  for (int i = 3; i < argc; i++) {
    if (!strcmp(argv[i], "--nodes") && i + 1 < argc)
      nodes = argv[++i];
    else if (!strcmp(argv[i], "--hosts") && i + 1 < argc)
      hosts = argv[++i];
    else if (!strcmp(argv[i], "--days") && i + 1 < argc)
      days = strtol(argv[++i], NULL, 10);
    else {
      certs_usage(stderr);
      return 2;
    }
  }
  if (!nodes || days < 1 || days > 3650) {
    certs_usage(stderr);
    return 2;
  }
  if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
    fprintf(stderr, "error: cannot create %s: %s\n", dir, strerror(errno));
    return 1;
  }
  X509 *ca = NULL;
  EVP_PKEY *ca_key = NULL;
  int rc = 1;
  if (load_or_make_ca(dir, &ca, &ca_key) != 0) goto out;
  char copy[1024];
  snprintf(copy, sizeof copy, "%s", nodes);
  for (char *save = NULL, *id = strtok_r(copy, ",", &save); id; id = strtok_r(NULL, ",", &save)) {
    if (!valid_id(id)) {
      fprintf(stderr, "error: '%s' is not a node id (letters, digits, '-', '_', '.')\n", id);
      goto out;
    }
    if (make_node(dir, id, hosts, days, ca, ca_key) != 0) goto out;
  }
  printf("\nIn each node's config:\n"
         "  \"security\": {\"tls\": {\"cert\": \"%s/ID.crt\", \"key\": \"%s/ID.key\", \"ca\": "
         "\"%s/ca.crt\"}}\n"
         "Copy only ca.crt, ID.crt and ID.key to node ID. For the CLI: ZONEGATE_CA=%s/ca.crt\n",
         dir, dir, dir, dir);
  rc = 0;
out:
  X509_free(ca);
  EVP_PKEY_free(ca_key);
  return rc;
}
