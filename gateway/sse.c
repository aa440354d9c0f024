/* sse.c: event-boundary tracking for a passed-through SSE stream (see
 * sse.h). One pass over each piece, jumping from line end to line end;
 * cannot fail. */
#include "gateway/sse.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

void sse_cursor_init(struct sse_cursor *cur) {
  cur->line_empty = true;
  cur->prev_cr = false;
  cur->cr_ended = false;
}

/* The offset of the first CR or LF in data[i..len), or len. Every other
 * byte moves the cursor the same way (the line has a byte, no CR before
 * the next one), so the loops below jump over them: 16 bytes per step
 * (SSE2, x86-64's baseline), an event's data line at a time. */
static size_t next_line_end(const char *data, size_t i, size_t len) {
#if defined(__SSE2__)
  const __m128i lf = _mm_set1_epi8('\n'), cr = _mm_set1_epi8('\r');
  while (len - i >= 16) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(data + i));
    unsigned mask =
        (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, lf), _mm_cmpeq_epi8(v, cr)));
    if (mask) return i + (size_t)__builtin_ctz(mask);
    i += 16;
  }
#endif
  while (i < len && data[i] != '\n' && data[i] != '\r') i++;
  return i;
}

size_t sse_last_boundary(struct sse_cursor *cur, const char *data, size_t len) {
  size_t last = 0;
  for (size_t i = 0; i < len; i++) {
    char ch = data[i];
    if (ch != '\n' && ch != '\r') { /* a run of line bytes, up to the next CR or LF */
      cur->prev_cr = cur->cr_ended = cur->line_empty = false;
      i = next_line_end(data, i, len) - 1;
      continue;
    }
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
    if (ch != '\n' && ch != '\r') {
      cur->prev_cr = cur->line_empty = false;
      i = next_line_end(data, i, len) - 1;
      continue;
    }
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
