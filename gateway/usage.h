/* gateway/usage: private to the gateway module. Token usage read from the
 * upstream's answers (OpenAI's `usage` object: chat completions,
 * completions, embeddings, responses), and the one change to a stream the
 * gateway makes to learn it: when a chat completion stream did not ask for
 * usage, the gateway asks (`stream_options.include_usage`) and removes the
 * extra usage chunk (and the `"usage":null` members OpenAI adds to the
 * other chunks) before the client sees the stream, so the client gets the
 * bytes it would get without the gateway.
 *
 * All functions work on byte ranges (no NUL termination needed), allocate
 * nothing the caller must free, and never fail loudly: an answer without a
 * readable usage object is reported as unknown, never guessed.
 */
#ifndef ZG_GATEWAY_USAGE_H
#define ZG_GATEWAY_USAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct usage_counts {
  bool known; /* a usage object was read */
  uint64_t prompt, completion, total;
  uint64_t cached, reasoning; /* *_tokens_details, 0 when absent */
};

/* Reads a usage object's JSON text usage[0..len): prompt_tokens or
 * input_tokens, completion_tokens or output_tokens, total_tokens (else
 * their sum), {prompt,input}_tokens_details.cached_tokens,
 * {completion,output}_tokens_details.reasoning_tokens. Sets known and
 * each of *out's counts to the larger of it and the object's: a usage
 * object is the whole answer's count so far, so a stream's several
 * (vLLM's continuous_usage_stats sends one per chunk) are never added up,
 * and a later smaller one undoes nothing. Returns 0, or -1 when it is not
 * such an object (*out unchanged). */
int usage_read_object(const char *usage, size_t len, struct usage_counts *out);

/* A whole JSON answer body (top-level "usage"). 0 when usage was read. */
int usage_from_answer(const char *body, size_t len, struct usage_counts *out);

/* The last bytes of a JSON answer too large to hold (the gateway passed it
 * through): the last `"usage":{...}` outside a string in tail[0..len) is
 * read (OpenAI's answers end with their usage object). 0 when read. */
int usage_from_tail(const char *tail, size_t len, struct usage_counts *out);

/* The first `"usage"` (quotes included) in p[0..len), or NULL: memmem's
 * answer, faster for this needle (SSE2). */
const char *usage_find_name(const char *p, size_t len);

/* One complete SSE event event[0..len) (its blank line included). Reads
 * usage from a chat/completions chunk's top-level "usage" or a Responses
 * event's "response"."usage". With strip (the gateway asked for usage the
 * client did not), returns what the client must get instead: *keep_len 0
 * drops the event (the usage-only chunk); otherwise out[0..*keep_len) is
 * the event, minus a top-level `"usage":null` member when it had one
 * (out has room for len bytes; when nothing changes, *keep_len == len and
 * out is not written: send event itself — check *edited). That member is
 * found without validating the rest of the event (an invalid event stays
 * invalid, minus the member); everything else uses the strict scan. */
void usage_stream_event(const char *event, size_t len, bool strip, struct usage_counts *out,
                        char *edited_out, size_t *keep_len, bool *edited);

#endif
