/* alerts/internal.h (private to alerts/): libcurl's multi interface on a
 * uv loop, for alert deliveries (curl_uv.c).
 *
 * One driver per engine: one uv_poll_t per socket curl announces, one uv
 * timer for curl's timeout, curl_multi_socket_action from the poll and
 * timer callbacks, finished transfers drained with curl_multi_info_read
 * after every call. Name resolution is curl's (threaded resolver), never
 * libuv's shared threadpool.
 *
 * Everything runs on the loop thread. done() is never called from inside
 * alerts_curl_add(); it runs later from the loop, at most once per easy
 * handle, and not at all after alerts_curl_remove() or close.
 */
#ifndef ZG_ALERTS_INTERNAL_H
#define ZG_ALERTS_INTERNAL_H

#include <curl/curl.h>
#include <stddef.h>
#include <uv.h>

struct alerts_curl;

/* 0 and *out, or -1 with a message naming the failed call. */
int alerts_curl_create(uv_loop_t *loop, struct alerts_curl **out, char *errmsg, size_t errlen);
/* Starts `easy` (configured by the caller, who keeps owning it and what
 * its options point at until done() or remove). done(ud, easy, result)
 * runs once when the transfer ends. 0, or -1 (easy not added). */
int alerts_curl_add(struct alerts_curl *m, CURL *easy,
                    void (*done)(void *ud, CURL *easy, CURLcode result), void *ud);
/* Stops a running transfer; no callback follows. The caller may then
 * clean `easy` up. */
void alerts_curl_remove(struct alerts_curl *m, CURL *easy);
/* Transfers running. */
size_t alerts_curl_running(const struct alerts_curl *m);
/* Every transfer must have been removed or finished. Cleans up the multi
 * handle, closes every uv handle and calls closed(arg) from the loop once
 * all are closed. */
void alerts_curl_close(struct alerts_curl *m, void (*closed)(void *arg), void *arg);

#endif
