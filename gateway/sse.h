/* gateway/sse: private to the gateway module. Finds event boundaries in a
 * Server-Sent Events stream passed through piece by piece (WHATWG HTML,
 * "Server-sent events", §9.2.5/§9.2.6: lines end with CRLF, LF or CR; an
 * empty line ends an event), so the proxy can hold back a partial event
 * and put its own error event on a boundary. No allocation; state is two
 * three flags carried across pieces.
 */
#ifndef ZG_GATEWAY_SSE_H
#define ZG_GATEWAY_SSE_H

#include <stdbool.h>
#include <stddef.h>

struct sse_cursor {
  bool line_empty; /* the current line has no byte yet */
  bool prev_cr;    /* the last byte was CR (an LF right after it ends nothing) */
  bool cr_ended;   /* ... and that CR ended an event (its LF belongs to it) */
};

/* At the start of a stream (which is on a boundary). */
void sse_cursor_init(struct sse_cursor *cur);

/* Feeds data[0..len) (the next piece of the stream). Returns the offset
 * just past the last event boundary inside this piece, or 0 when the
 * piece ends no event; cur then describes the stream after the piece. */
size_t sse_last_boundary(struct sse_cursor *cur, const char *data, size_t len);

/* Like sse_last_boundary, but stops at the first boundary: returns the
 * offset just past it (cur then describes the stream up to there), or 0
 * when data[0..len) ends no event (cur has consumed all of it). */
size_t sse_next_boundary(struct sse_cursor *cur, const char *data, size_t len);

#endif
