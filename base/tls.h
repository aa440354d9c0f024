/* base/tls.h: TLS 1.3 for zonegate (OpenSSL 3), independent of any socket.
 *
 * - Contexts from PEM files: a node's certificate and key, and the cluster
 *   CA that every peer certificate must chain to (mutual TLS between nodes),
 *   or a plain server certificate (the optional TLS client port, ALPN
 *   http/1.1). TLS 1.3 only.
 * - Node identity: `zonegate certs init` puts the node id in the
 *   certificate's subjectAltName (URI urn:zonegate:node:<id> and DNS <id>)
 *   and CN; zg_tls_cert_node_id() reads it back from a verified peer.
 * - A session over memory BIOs: the caller feeds ciphertext read from its
 *   socket, takes plaintext out, gives plaintext to send and takes the
 *   ciphertext to write. No I/O here, so it layers under any libuv stream
 *   (httpd connections, the Raft transport).
 */
#ifndef ZG_BASE_TLS_H
#define ZG_BASE_TLS_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum zg_tls_verify {
  ZG_TLS_PEER_REQUIRED, /* mutual TLS: the peer must present a cert chaining to the CA */
  ZG_TLS_PEER_OPTIONAL, /* server: a presented client cert must chain to the CA; none is ok */
  ZG_TLS_PEER_NONE,     /* server: no client certificate asked for (public client port) */
};

/* A TLS 1.3 context usable for both client and server sessions. ca may be
 * NULL with ZG_TLS_PEER_NONE. alpn: NULL, or a protocol the server selects
 * ("http/1.1"). NULL with a message naming the file on error. */
SSL_CTX *zg_tls_ctx_new(const char *cert_file, const char *key_file, const char *ca_file,
                        enum zg_tls_verify verify, const char *alpn, char *err, size_t errlen);

/* The node id in a certificate: the URI SAN urn:zonegate:node:<id>, else
 * the CN. 0, or -1 when it holds none. */
int zg_tls_cert_node_id(X509 *cert, char *out, size_t len);
/* The verified peer's node id (chain checked against the CA). 0 or -1. */
int zg_tls_peer_node_id(SSL *ssl, char *out, size_t len);
/* notAfter of the first certificate in a PEM file, as Unix seconds; 0 and
 * *ok=false when unreadable. */
int64_t zg_tls_cert_file_not_after(const char *path, bool *ok);

/* ---- session over memory BIOs ---------------------------------------- */
struct zg_tls;
enum { ZG_TLS_WANT = 0, ZG_TLS_CLOSED = -1, ZG_TLS_ERROR = -2 };

struct zg_tls *zg_tls_new(SSL_CTX *ctx, bool server);
void zg_tls_free(struct zg_tls *t);
SSL *zg_tls_ssl(struct zg_tls *t);
/* Ciphertext from the network. 0, or ZG_TLS_ERROR. */
int zg_tls_feed(struct zg_tls *t, const void *data, size_t len);
/* Drives the handshake: 1 done, ZG_TLS_WANT (0) more bytes needed,
 * ZG_TLS_ERROR (reason in zg_tls_error()). */
int zg_tls_handshake(struct zg_tls *t);
bool zg_tls_established(const struct zg_tls *t);
/* Plaintext received: > 0 bytes, ZG_TLS_WANT, ZG_TLS_CLOSED (close_notify)
 * or ZG_TLS_ERROR. Also finishes a handshake in progress. */
int zg_tls_read(struct zg_tls *t, void *buf, size_t len);
/* Plaintext to send (all of it is encrypted into the output). 0 or
 * ZG_TLS_ERROR. */
int zg_tls_write(struct zg_tls *t, const void *data, size_t len);
/* Queues a close_notify. */
void zg_tls_shutdown(struct zg_tls *t);
/* Ciphertext waiting to be sent. */
size_t zg_tls_pending(const struct zg_tls *t);
/* Moves up to len bytes of it into buf; returns how many. */
size_t zg_tls_take(struct zg_tls *t, void *buf, size_t len);
/* Why the session failed (certificate verification or protocol error). */
const char *zg_tls_error(const struct zg_tls *t);

#endif
