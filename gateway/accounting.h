/* gateway/accounting: private to the gateway module. Usage counters and
 * per-token limits on the active node, exact across the cluster.
 *
 * The per-request work is a counter update in memory: requests when a
 * request is admitted, tokens when its answer's usage is read. Every
 * usage.flush_ms the node takes the counts since the last flush as one
 * delta (accounting_take) and writes it through Raft (one entry per
 * interval); once committed, the replicated totals hold it. Limits read
 * the replicated totals (struct gateway_usage_view, from the cluster) plus
 * the counts not yet committed (in flight or not yet taken), so they hold
 * across a switchover or failover: a new active starts from the
 * replicated counts, losing at most one flush interval.
 *
 * Time: windows use the wall clock in whole seconds (UTC) because they
 * must mean the same on every node; days and months are UTC calendar
 * days and months. Memory: one entry per (token, model, key) seen since
 * the last flush and per token with traffic in the last minute.
 */
#ifndef ZG_GATEWAY_ACCOUNTING_H
#define ZG_GATEWAY_ACCOUNTING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gateway/gateway.h"

struct cJSON;
struct accounting;

/* Counts of one (token, model, key) or one token's period. unknown counts
 * answers that carried no usage object (tokens not guessed). */
struct acct_counts {
  uint64_t requests, prompt, completion, total, cached, reasoning, unknown;
};

/* A token's limits; 0 = none. */
struct acct_limits {
  uint64_t rpm, tpm, budget_day, budget_month;
};

enum acct_limit { ACCT_OK = 0, ACCT_RPM, ACCT_TPM, ACCT_BUDGET_DAY, ACCT_BUDGET_MONTH };

/* The answer to a check: which limit (if any) is reached, when it resets
 * (seconds from now) and the request/token limit and remaining counts for
 * the x-ratelimit-* headers (limit 0 = that dimension is unlimited). */
struct acct_verdict {
  enum acct_limit limit;
  uint64_t retry_after_s;
  uint64_t limit_requests, remaining_requests, reset_requests_s;
  uint64_t limit_tokens, remaining_tokens, reset_tokens_s;
};

struct accounting *accounting_create(void);    /* NULL when out of memory */
void accounting_destroy(struct accounting *a); /* NULL is fine */

/* Checks token's limits at wall second now_s against rep (replicated) plus
 * what is not yet committed. Fills *v; returns v->limit. A request is let
 * through while the count is below the limit (the one that reaches it is
 * the last allowed). */
enum acct_limit accounting_check(struct accounting *a, const char *token,
                                 const struct acct_limits *limits,
                                 const struct gateway_usage_view *rep, uint64_t now_s,
                                 struct acct_verdict *v);

/* A request of token was admitted (counts toward rpm at once). */
void accounting_request(struct accounting *a, const char *token, uint64_t now_s);

/* Its answer: tokens (total) by model and provider key ("" = the config
 * api_key); known false counts an answer without usage. */
void accounting_usage(struct accounting *a, const char *token, const char *model,
                      const char *key_id, bool known, const struct acct_counts *tokens,
                      uint64_t now_s);

/* Takes the counts since the last take as the args of one usage.add
 * command: {"at": now_s, "rows": [{"token","model","key",
 * "requests","prompt","completion","total","cached","reasoning","unknown"}],
 * "seconds": [{"token","at","requests","tokens"}], "batch": {"source",
 * "seq"}}; the caller owns it. NULL when there is nothing (or out of
 * memory: the counts stay). The counts stay "in flight" (still counted by
 * accounting_check) until accounting_settle says committed. One take is
 * in flight at a time: NULL while one is. A batch not committed is taken
 * again as it is, same batch id, before any newer count: the store
 * applies a batch id once (consensus/usage.c), so a write whose answer
 * was lost (applied after all) is not counted twice. */
struct cJSON *accounting_take(struct accounting *a, uint64_t now_s);

/* The in-flight take was committed (committed true: the replicated view
 * has it now) or not known to be (false: the same batch is taken again). */
void accounting_settle(struct accounting *a, bool committed);

/* Limit names for errors and logs: "rpm", "tpm", "budget_day", ... */
const char *accounting_limit_name(enum acct_limit limit);

#endif
