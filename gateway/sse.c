/* sse.c: event-boundary tracking for a passed-through SSE stream (see
 * sse.h). One pass over each piece; cannot fail. */
#include "gateway/sse.h"

void sse_cursor_init(struct sse_cursor *cur) {
  cur->line_empty = true;
  cur->prev_cr = false;
  cur->cr_ended = false;
}

size_t sse_last_boundary(struct sse_cursor *cur, const char *data, size_t len) {
  size_t last = 0;
  for (size_t i = 0; i < len; i++) {
    char ch = data[i];
    if (ch == '\n' && cur->prev_cr) {
      cur->prev_cr = false;
      /* The LF of a CRLF that ended the event, also when the CR came at
       * the end of the previous piece (then only cur knows). */
      if (cur->cr_ended) last = i + 1;
      cur->cr_ended = false;
      continue;
    }
    cur->prev_cr = ch == '\r';
    cur->cr_ended = false;
    if (ch == '\n' || ch == '\r') {
      if (cur->line_empty) {
        last = i + 1;
        cur->cr_ended = ch == '\r';
      }
      cur->line_empty = true;
    } else {
      cur->line_empty = false;
    }
  }
  return last;
}

size_t sse_next_boundary(struct sse_cursor *cur, const char *data, size_t len) {
  for (size_t i = 0; i < len; i++) {
    char ch = data[i];
    if (ch == '\n' && cur->prev_cr) {
      cur->prev_cr = false;
      continue;
    }
    cur->prev_cr = ch == '\r';
    if (ch == '\n' || ch == '\r') {
      bool ends = cur->line_empty;
      cur->line_empty = true;
      if (ends) {
        /* a CRLF's LF belongs to the boundary it ends */
        if (ch == '\r' && i + 1 < len && data[i + 1] == '\n') {
          cur->prev_cr = false;
          return i + 2;
        }
        return i + 1;
      }
    } else {
      cur->line_empty = false;
    }
  }
  return 0;
}
