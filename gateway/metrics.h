/* gateway/metrics: private to the gateway module. A small Prometheus
 * registry rendered in the text exposition format 0.0.4.
 *
 * A family has a name, help text and fixed label names. Children (one per
 * tuple of label values) are created on first use and live as long as the
 * registry; after that, updating a child is a hash lookup with no
 * allocation. Label values are passed as variadic `const char *`
 * arguments, exactly as many as the family has label names, in the same
 * order (none for a family without labels); NULL is read as "".
 *
 * Every function accepts a NULL family handle and then does nothing, so a
 * failed registration never crashes the hot path. Single-threaded (the uv
 * loop): no locks.
 */
#ifndef ZG_GATEWAY_METRICS_H
#define ZG_GATEWAY_METRICS_H

#include <stddef.h>

#include "base/base.h"

struct metrics;
struct metric_counter;
struct metric_gauge;
struct metric_histogram;

/* At most this many label names per family. */
#define METRICS_MAX_LABELS 8

/* Latency buckets in seconds, 0.0005 … 60 (+Inf is implicit). */
extern const double metrics_default_latency_buckets[];
extern const size_t metrics_default_latency_buckets_count;

struct metrics *metrics_create(void);          /* NULL when out of memory */
void metrics_destroy(struct metrics *metrics); /* frees every family; NULL is fine */

/* Registration. name must match [a-zA-Z_:][a-zA-Z0-9_:]*; label_names is a
 * comma-separated list ("route,code") of names matching
 * [a-zA-Z_][a-zA-Z0-9_]* (not starting with "__"), or NULL/"" for none.
 * help is copied. Registering the same name again with the same type and
 * label names returns the existing family; any other clash, a bad name,
 * or out of memory returns NULL. The registry owns the families. */
struct metric_counter *metrics_counter(struct metrics *metrics, const char *name, const char *help,
                                       const char *label_names);
/* Adds v (v < 0 or NaN is ignored: counters only go up). */
void metrics_counter_add(struct metric_counter *counter, double v, ...);

struct metric_gauge *metrics_gauge(struct metrics *metrics, const char *name, const char *help,
                                   const char *label_names);
void metrics_gauge_set(struct metric_gauge *gauge, double v, ...);
void metrics_gauge_add(struct metric_gauge *gauge, double delta, ...);

/* A gauge without labels evaluated at scrape time: fn(ud) is called by
 * metrics_render. Returns 0, or -1 on a bad/duplicate name or no memory. */
int metrics_gauge_fn(struct metrics *metrics, const char *name, const char *help,
                     double (*fn)(void *ud), void *ud);

/* Same, rendered as a counter: for totals kept elsewhere (cache hits,
 * process CPU seconds) so that rate() works on them. fn must never go
 * down. */
int metrics_counter_fn(struct metrics *metrics, const char *name, const char *help,
                       double (*fn)(void *ud), void *ud);

/* buckets: upper bounds, strictly increasing (a trailing +Inf is
 * accepted and ignored: +Inf is always implicit); NULL uses
 * metrics_default_latency_buckets. The bounds are copied. "le" is not
 * allowed as a label name. */
struct metric_histogram *metrics_histogram(struct metrics *metrics, const char *name,
                                           const char *help, const char *label_names,
                                           const double *buckets, size_t n_buckets);
void metrics_histogram_observe(struct metric_histogram *histogram, double v, ...);

/* Appends the text exposition of every family (in registration order,
 * children in first-use order) to out: "# HELP", "# TYPE", samples;
 * histograms as _bucket{le="…"} (cumulative, ending at +Inf), _sum and
 * _count. Label values are escaped (\\, \", \n), help text too (\\, \n).
 * Families with labels and no child yet render only their HELP/TYPE lines.
 * Returns 0, or -1 when out of memory (out then holds partial text). */
int metrics_render(const struct metrics *metrics, zg_buf *out);

#endif
