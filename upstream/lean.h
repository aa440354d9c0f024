/* upstream/lean.h: private to upstream/. The lean HTTP/1.1 client for plain
 * http:// upstreams (lean.c) and its response reader (lean_response.c).
 *
 * client.c dispatches: upstream_start() hands a plain http:// request to
 * lean_start() unless the request asks for libcurl (curl_only, TLS
 * options, a URL the lean client does not take); every other public call
 * on a transfer is routed by the tag both transfer structs start with.
 * The lean client keeps the contract of upstream.h exactly (callbacks
 * never inside upstream_start, cancel, pause/resume, phase timers, result
 * codes); what it does differently is said in lean.c.
 *
 * Not a module API: only upstream/ and the unit tests include it.
 */
#ifndef ZG_UPSTREAM_LEAN_H
#define ZG_UPSTREAM_LEAN_H

#include "upstream/upstream.h"

#include <http_parser.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

/* The first member of both transfer structs (client.c and lean.c): which
 * client runs the transfer. */
enum upstream_engine {
  UPSTREAM_ENGINE_CURL = 0x43,
  UPSTREAM_ENGINE_LEAN = 0x4c,
};

/* ---- response reader (lean_response.c) ----------------------------------
 *
 * Parses one HTTP/1.1 response (after any number of interim 1xx ones) fed
 * in pieces of any size, decodes a gzip/deflate body, and reports through
 * the callbacks below. Refused as an error (the transfer is then BROKEN):
 * anything http_parser refuses (bad status line, bad header bytes, bad
 * chunk size, ...), an obs-fold header continuation line, more than
 * LEAN_MAX_RESPONSE_HEADERS header lines or LEAN_MAX_RESPONSE_HEAD_BYTES of
 * header text, a 101 (never asked for), a Content-Encoding other than
 * identity, gzip, x-gzip or deflate, a body that does not decode. Header
 * values are never copied into error texts. */

#define LEAN_MAX_RESPONSE_HEADERS 256
#define LEAN_MAX_RESPONSE_HEAD_BYTES (64 * 1024)

struct lean_response_callbacks {
  /* Final status and headers ("Name: value" lines, NULL-terminated; valid
   * during the call; content_type may be NULL). */
  void (*on_head)(void *ud, int status, const char *content_type, const char *const *headers);
  /* A piece of the (decoded) body, valid during the call. */
  void (*on_body)(void *ud, const char *data, size_t len);
};

struct lean_response {
  http_parser parser;
  const struct lean_response_callbacks *cb;
  void *ud;
  bool head_request;     /* the request was HEAD: no body follows */
  bool interim;          /* the head being read is a 1xx one */
  bool head_delivered;   /* on_head was called; later header lines are trailers */
  bool complete;         /* the final response ended */
  bool keep_alive;       /* when complete: the connection may carry another request */
  bool stop;             /* set by the owner from a callback: stop parsing now */
  bool last_was_value;   /* the previous header callback was a value piece */
  bool value_at_end;     /* ... and it ended at the end of its input piece */
  unsigned exec_serial;  /* counts lean_response_feed calls (obs-fold detection) */
  unsigned value_serial; /* exec_serial of the last value piece */
  const char *exec_data; /* the piece being parsed */
  size_t exec_len;
  /* Header lines of the head being read, each "Name: value\0". */
  char *head_text;
  size_t head_len, head_cap;
  size_t head_count;
  bool in_value; /* the current line's ": " is written */
  /* Body decoding. */
  enum { LEAN_DECODE_NONE, LEAN_DECODE_ZLIB } decode;
  bool z_ready;
  /* "deflate": zlib-wrapped or raw (as some servers send it) is decided on
   * the first two body bytes, kept here until both arrived. */
  bool z_sniff;
  unsigned char sniff[2];
  size_t sniff_len;
  z_stream z;
  bool z_pending; /* zlib may hold decoded output not yet delivered */
  /* Body bytes (as received, still encoded) taken while r->stop was set,
   * delivered by lean_response_resume_body(): held[held_off..held_len). */
  char *held;
  size_t held_len, held_off, held_cap;
  uint64_t bytes_seen; /* response bytes parsed so far */
  char error[96];      /* set with a failure; never holds header values */
};

enum lean_feed_result {
  LEAN_FEED_MORE,     /* all input taken; the response goes on (or body bytes are held) */
  LEAN_FEED_STOPPED,  /* lean_response_resume_body(): r->stop was set again */
  LEAN_FEED_COMPLETE, /* the response ended and every body byte was delivered */
  LEAN_FEED_ERROR,    /* r->error says why */
};

/* Starts reading a response (r is zeroed first). head_request: the request
 * was HEAD. r owns memory until lean_response_free(). */
void lean_response_init(struct lean_response *r, const struct lean_response_callbacks *cb, void *ud,
                        bool head_request);
/* Resets r for the next response on the same connection (memory kept). */
void lean_response_reset(struct lean_response *r, bool head_request);
/* Frees the header text once the head was delivered (it is not read again
 * for this response) and the held-body buffer while it is empty, so a long
 * body (an event stream) does not keep them; both grow again when needed. */
void lean_response_trim(struct lean_response *r);
void lean_response_free(struct lean_response *r);

/* Parses data[0..len); callbacks run inside. *used: bytes taken (all of
 * them unless the response ended inside the piece; bytes after the end
 * clear r->keep_alive). While r->stop is set body bytes are held, not
 * delivered; r->complete may then be set with MORE returned. */
enum lean_feed_result lean_response_feed(struct lean_response *r, const char *data, size_t len,
                                         size_t *used);
/* After a stop (clear r->stop first): delivers the held body bytes.
 * Returns COMPLETE when the response has ended and nothing is held, MORE
 * when nothing is held and the response goes on, STOPPED when r->stop was
 * set again, ERROR on a decoding error. */
enum lean_feed_result lean_response_resume_body(struct lean_response *r);
/* The connection ended (EOF). COMPLETE when that ends the response (a
 * close-delimited body); ERROR otherwise. */
enum lean_feed_result lean_response_eof(struct lean_response *r);
/* True once any byte of a response was parsed. */
bool lean_response_started(const struct lean_response *r);

/* ---- client (lean.c) ---------------------------------------------------- */

struct lean_client;
struct lean_transfer;

/* True when the lean client takes req: an http:// URL it can parse (host
 * name or address, optional port, no user info), no TLS options, and not
 * curl_only. */
bool lean_accepts(const struct upstream_request *req);

/* Same contracts as their upstream_* counterparts in upstream.h. */
int lean_client_create(uv_loop_t *loop, struct lean_client **out, char *errmsg, size_t errlen);
void lean_client_close(struct lean_client *c, void (*done)(void *arg), void *arg);
int lean_start(struct lean_client *c, const struct upstream_request *req,
               const struct upstream_callbacks *cb, void *ud, struct lean_transfer **out,
               char *errmsg, size_t errlen);
void lean_cancel(struct lean_transfer *t);
void lean_pause(struct lean_transfer *t);
void lean_resume(struct lean_transfer *t);
void lean_get_timing(const struct lean_transfer *t, struct upstream_timing *out);
bool lean_body_done(const struct lean_transfer *t);
size_t lean_active_count(const struct lean_client *c);

/* Connections opened, and requests sent on a reused one, since creation
 * (for tests). */
struct lean_stats {
  uint64_t connections_opened, requests_on_reused, retries;
};
void lean_get_stats(const struct lean_client *c, struct lean_stats *out);

#endif
