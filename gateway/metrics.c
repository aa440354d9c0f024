/* gateway/metrics: Prometheus registry. Families sit in a list in
 * registration order; each family keeps its children in a chained hash
 * table keyed by the label values (plus a list in first-use order for
 * rendering). Updating the child updated last compares its strings;
 * another existing child hashes the values, walks one chain and compares
 * strings: no allocation. Failure modes: a bad name or
 * out of memory at registration returns NULL (updates on NULL are no-ops);
 * out of memory creating a child drops that one update.
 */
#include "gateway/metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double metrics_default_latency_buckets[] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
const size_t metrics_default_latency_buckets_count = ZG_ARRAY_LEN(metrics_default_latency_buckets);

enum metric_type {
  METRIC_COUNTER,
  METRIC_GAUGE,
  METRIC_GAUGE_FN,
  METRIC_COUNTER_FN,
  METRIC_HISTOGRAM
};

struct metric_child {
  uint64_t hash;
  struct metric_child *bucket_next; /* hash chain */
  struct metric_child *order_next;  /* first-use order */
  double value;                     /* counter, gauge */
  double sum;                       /* histogram */
  uint64_t count;                   /* histogram */
  uint64_t *bucket_counts;          /* histogram, per bound, NOT cumulative */
  const char *values[];             /* n_labels strings, stored after the struct */
};

struct metric_family {
  enum metric_type type;
  char *name;
  char *help;
  size_t n_labels;
  char *label_names[METRICS_MAX_LABELS];
  double *bounds; /* histogram upper bounds without +Inf */
  size_t n_bounds;
  double (*fn)(void *ud);
  void *fn_ud;
  struct metric_child **buckets;
  size_t bucket_count; /* power of two */
  size_t child_count;
  struct metric_child *first_child, *last_child;
  struct metric_child *last_used; /* checked first: most updates repeat the last labels */
  struct metric_family *next;
};

/* The typed handles are a family underneath; the types keep callers from
 * passing a gauge to metrics_counter_add. */
struct metric_counter {
  struct metric_family family;
};
struct metric_gauge {
  struct metric_family family;
};
struct metric_histogram {
  struct metric_family family;
};

struct metrics {
  struct metric_family *first, *last;
};

struct metrics *metrics_create(void) {
  return calloc(1, sizeof(struct metrics));
}

static void family_free(struct metric_family *family) {
  struct metric_child *child = family->first_child;
  while (child) {
    struct metric_child *next = child->order_next;
    free(child->bucket_counts);
    free(child);
    child = next;
  }
  for (size_t i = 0; i < family->n_labels; i++) free(family->label_names[i]);
  free(family->buckets);
  free(family->bounds);
  free(family->name);
  free(family->help);
  free(family);
}

void metrics_destroy(struct metrics *metrics) {
  if (!metrics) return;
  struct metric_family *family = metrics->first;
  while (family) {
    struct metric_family *next = family->next;
    family_free(family);
    family = next;
  }
  free(metrics);
}

/* ---- names --------------------------------------------------------- */

static bool valid_metric_name(const char *name) {
  if (!name || !*name) return false;
  for (const char *p = name; *p; p++) {
    char c = *p;
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
              (p != name && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

static bool valid_label_name(const char *name, size_t len) {
  if (len == 0 || (len >= 2 && name[0] == '_' && name[1] == '_')) return false;
  for (size_t i = 0; i < len; i++) {
    char c = name[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

/* Splits "a,b" into family->label_names. 0 ok, -1 bad or no memory. */
static int parse_label_names(struct metric_family *family, const char *label_names) {
  if (!label_names || !*label_names) return 0;
  const char *p = label_names;
  for (;;) {
    while (*p == ' ') p++;
    const char *start = p;
    while (*p && *p != ',' && *p != ' ') p++;
    size_t len = (size_t)(p - start);
    while (*p == ' ') p++;
    if (!valid_label_name(start, len) || family->n_labels == METRICS_MAX_LABELS) return -1;
    if (family->type == METRIC_HISTOGRAM && len == 2 && memcmp(start, "le", 2) == 0) return -1;
    for (size_t i = 0; i < family->n_labels; i++)
      if (strlen(family->label_names[i]) == len && memcmp(family->label_names[i], start, len) == 0)
        return -1; /* duplicate */
    char *copy = strndup(start, len);
    if (!copy) return -1;
    family->label_names[family->n_labels++] = copy;
    if (*p == '\0') return 0;
    if (*p != ',') return -1;
    p++;
  }
}

static struct metric_family *find_family(const struct metrics *metrics, const char *name) {
  for (struct metric_family *f = metrics->first; f; f = f->next)
    if (strcmp(f->name, name) == 0) return f;
  return NULL;
}

static bool same_labels(const struct metric_family *a, const struct metric_family *b) {
  if (a->n_labels != b->n_labels) return false;
  for (size_t i = 0; i < a->n_labels; i++)
    if (strcmp(a->label_names[i], b->label_names[i]) != 0) return false;
  return true;
}

static bool same_bounds(const struct metric_family *a, const struct metric_family *b) {
  if (a->n_bounds != b->n_bounds) return false;
  for (size_t i = 0; i < a->n_bounds; i++)
    if (a->bounds[i] != b->bounds[i]) return false;
  return true;
}

/* ---- children ------------------------------------------------------ */

static uint64_t hash_values(const char *const *values, size_t n) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a, 0xff between values */
  for (size_t i = 0; i < n; i++) {
    for (const unsigned char *p = (const unsigned char *)values[i]; *p; p++) {
      h ^= *p;
      h *= 1099511628211ull;
    }
    h ^= 0xff;
    h *= 1099511628211ull;
  }
  return h;
}

static void grow_children(struct metric_family *family) {
  size_t new_count = family->bucket_count * 2;
  struct metric_child **new_buckets = calloc(new_count, sizeof *new_buckets);
  if (!new_buckets) return; /* chains just get longer */
  for (struct metric_child *c = family->first_child; c; c = c->order_next) {
    size_t b = c->hash & (new_count - 1);
    c->bucket_next = new_buckets[b];
    new_buckets[b] = c;
  }
  free(family->buckets);
  family->buckets = new_buckets;
  family->bucket_count = new_count;
}

static struct metric_child *child_create(struct metric_family *family, const char *const *values,
                                         uint64_t hash) {
  size_t strings_len = 0;
  for (size_t i = 0; i < family->n_labels; i++) strings_len += strlen(values[i]) + 1;
  size_t header = sizeof(struct metric_child) + family->n_labels * sizeof(char *);
  struct metric_child *child = calloc(1, header + strings_len);
  if (!child) return NULL;
  if (family->type == METRIC_HISTOGRAM) {
    child->bucket_counts = calloc(family->n_bounds ? family->n_bounds : 1, sizeof(uint64_t));
    if (!child->bucket_counts) {
      free(child);
      return NULL;
    }
  }
  char *strings = (char *)child + header;
  for (size_t i = 0; i < family->n_labels; i++) {
    size_t len = strlen(values[i]) + 1;
    memcpy(strings, values[i], len);
    child->values[i] = strings;
    strings += len;
  }
  child->hash = hash;
  size_t b = hash & (family->bucket_count - 1);
  child->bucket_next = family->buckets[b];
  family->buckets[b] = child;
  if (family->last_child)
    family->last_child->order_next = child;
  else
    family->first_child = child;
  family->last_child = child;
  if (++family->child_count > family->bucket_count) grow_children(family);
  return child;
}

/* Reads n_labels `const char *` from ap and returns the matching child,
 * creating it on first use. NULL when out of memory. */
static struct metric_child *child_lookup(struct metric_family *family, va_list ap) {
  const char *values[METRICS_MAX_LABELS];
  for (size_t i = 0; i < family->n_labels; i++) {
    const char *v = va_arg(ap, const char *);
    values[i] = v ? v : "";
  }
  struct metric_child *last = family->last_used;
  if (last) {
    size_t i = 0;
    while (i < family->n_labels && strcmp(last->values[i], values[i]) == 0) i++;
    if (i == family->n_labels) return last;
  }
  uint64_t hash = hash_values(values, family->n_labels);
  for (struct metric_child *c = family->buckets[hash & (family->bucket_count - 1)]; c;
       c = c->bucket_next) {
    if (c->hash != hash) continue;
    size_t i = 0;
    while (i < family->n_labels && strcmp(c->values[i], values[i]) == 0) i++;
    if (i == family->n_labels) return family->last_used = c;
  }
  struct metric_child *created = child_create(family, values, hash);
  if (created) family->last_used = created;
  return created;
}

/* ---- registration -------------------------------------------------- */

static struct metric_family *family_register(struct metrics *metrics, enum metric_type type,
                                             size_t handle_size, const char *name, const char *help,
                                             const char *label_names, const double *bounds,
                                             size_t n_bounds) {
  if (!metrics || !valid_metric_name(name)) return NULL;
  struct metric_family *family = calloc(1, handle_size);
  if (!family) return NULL;
  family->type = type;
  family->name = strdup(name);
  family->help = strdup(help ? help : "");
  family->bucket_count = 8;
  family->buckets = calloc(family->bucket_count, sizeof *family->buckets);
  if (!family->name || !family->help || !family->buckets ||
      parse_label_names(family, label_names) != 0)
    goto fail;
  if (type == METRIC_HISTOGRAM) {
    if (!bounds) {
      bounds = metrics_default_latency_buckets;
      n_bounds = metrics_default_latency_buckets_count;
    }
    if (n_bounds > 0 && isinf(bounds[n_bounds - 1]) && bounds[n_bounds - 1] > 0) n_bounds--;
    family->bounds = malloc((n_bounds ? n_bounds : 1) * sizeof(double));
    if (!family->bounds) goto fail;
    for (size_t i = 0; i < n_bounds; i++) {
      if (isnan(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) goto fail;
      family->bounds[i] = bounds[i];
    }
    family->n_bounds = n_bounds;
  }

  struct metric_family *existing = find_family(metrics, name);
  if (existing) {
    bool same = existing->type == type && type != METRIC_GAUGE_FN &&
                same_labels(existing, family) && same_bounds(existing, family);
    family_free(family);
    return same ? existing : NULL;
  }
  if (family->n_labels == 0 && type != METRIC_GAUGE_FN && type != METRIC_COUNTER_FN) {
    /* A family without labels has exactly one child: create it now so it
     * renders 0 before its first update. */
    if (!child_create(family, NULL, hash_values(NULL, 0))) goto fail;
  }
  if (metrics->last)
    metrics->last->next = family;
  else
    metrics->first = family;
  metrics->last = family;
  return family;
fail:
  family_free(family);
  return NULL;
}

struct metric_counter *metrics_counter(struct metrics *metrics, const char *name, const char *help,
                                       const char *label_names) {
  return (struct metric_counter *)family_register(
      metrics, METRIC_COUNTER, sizeof(struct metric_counter), name, help, label_names, NULL, 0);
}

struct metric_gauge *metrics_gauge(struct metrics *metrics, const char *name, const char *help,
                                   const char *label_names) {
  return (struct metric_gauge *)family_register(metrics, METRIC_GAUGE, sizeof(struct metric_gauge),
                                                name, help, label_names, NULL, 0);
}

static int register_fn(struct metrics *metrics, enum metric_type type, const char *name,
                       const char *help, double (*fn)(void *ud), void *ud) {
  if (!fn) return -1;
  struct metric_family *family =
      family_register(metrics, type, sizeof(struct metric_family), name, help, NULL, NULL, 0);
  if (!family) return -1;
  family->fn = fn;
  family->fn_ud = ud;
  return 0;
}

int metrics_gauge_fn(struct metrics *metrics, const char *name, const char *help,
                     double (*fn)(void *ud), void *ud) {
  return register_fn(metrics, METRIC_GAUGE_FN, name, help, fn, ud);
}

int metrics_counter_fn(struct metrics *metrics, const char *name, const char *help,
                       double (*fn)(void *ud), void *ud) {
  return register_fn(metrics, METRIC_COUNTER_FN, name, help, fn, ud);
}

struct metric_histogram *metrics_histogram(struct metrics *metrics, const char *name,
                                           const char *help, const char *label_names,
                                           const double *buckets, size_t n_buckets) {
  return (struct metric_histogram *)family_register(metrics, METRIC_HISTOGRAM,
                                                    sizeof(struct metric_histogram), name, help,
                                                    label_names, buckets, n_buckets);
}

/* ---- updates ------------------------------------------------------- */

void metrics_counter_add(struct metric_counter *counter, double v, ...) {
  if (!counter || !(v >= 0)) return;
  va_list ap;
  va_start(ap, v);
  struct metric_child *child = child_lookup(&counter->family, ap);
  va_end(ap);
  if (child) child->value += v;
}

void metrics_gauge_set(struct metric_gauge *gauge, double v, ...) {
  if (!gauge) return;
  va_list ap;
  va_start(ap, v);
  struct metric_child *child = child_lookup(&gauge->family, ap);
  va_end(ap);
  if (child) child->value = v;
}

void metrics_gauge_add(struct metric_gauge *gauge, double delta, ...) {
  if (!gauge) return;
  va_list ap;
  va_start(ap, delta);
  struct metric_child *child = child_lookup(&gauge->family, ap);
  va_end(ap);
  if (child) child->value += delta;
}

void metrics_histogram_observe(struct metric_histogram *histogram, double v, ...) {
  if (!histogram || isnan(v)) return;
  va_list ap;
  va_start(ap, v);
  struct metric_child *child = child_lookup(&histogram->family, ap);
  va_end(ap);
  if (!child) return;
  const struct metric_family *family = &histogram->family;
  /* Binary search for the first bound >= v; past the end means +Inf only. */
  size_t lo = 0, hi = family->n_bounds;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (v <= family->bounds[mid])
      hi = mid;
    else
      lo = mid + 1;
  }
  if (lo < family->n_bounds) child->bucket_counts[lo]++;
  child->count++;
  child->sum += v;
}

/* ---- rendering ----------------------------------------------------- */

/* Shortest text that reads back as the same double; Prometheus spellings
 * for the special values. */
static void format_value(double v, char out[40]) {
  if (isnan(v)) {
    strcpy(out, "NaN");
  } else if (isinf(v)) {
    strcpy(out, v > 0 ? "+Inf" : "-Inf");
  } else {
    snprintf(out, 40, "%.15g", v);
    if (strtod(out, NULL) != v) snprintf(out, 40, "%.17g", v);
  }
}

static int append_escaped(zg_buf *out, const char *s, bool escape_quote) {
  const char *run = s;
  for (const char *p = s;; p++) {
    const char *replacement = NULL;
    if (*p == '\\')
      replacement = "\\\\";
    else if (*p == '\n')
      replacement = "\\n";
    else if (*p == '"' && escape_quote)
      replacement = "\\\"";
    else if (*p != '\0')
      continue;
    if (zg_buf_append(out, run, (size_t)(p - run)) != 0) return -1;
    if (!replacement) return 0; /* end of string */
    if (zg_buf_append(out, replacement, strlen(replacement)) != 0) return -1;
    run = p + 1;
  }
}

/* Writes `{a="x",le="0.5"}`, or nothing when there are no labels. */
static int append_labels(zg_buf *out, const struct metric_family *family,
                         const struct metric_child *child, const char *le) {
  if (family->n_labels == 0 && !le) return 0;
  int rc = zg_buf_append(out, "{", 1);
  for (size_t i = 0; rc == 0 && i < family->n_labels; i++) {
    rc = zg_buf_appendf(out, "%s%s=\"", i ? "," : "", family->label_names[i]);
    if (rc == 0) rc = append_escaped(out, child->values[i], true);
    if (rc == 0) rc = zg_buf_append(out, "\"", 1);
  }
  if (rc == 0 && le) rc = zg_buf_appendf(out, "%sle=\"%s\"", family->n_labels ? "," : "", le);
  if (rc == 0) rc = zg_buf_append(out, "}", 1);
  return rc;
}

static int append_sample(zg_buf *out, const struct metric_family *family, const char *suffix,
                         const struct metric_child *child, const char *le, double value) {
  char text[40];
  format_value(value, text);
  if (zg_buf_appendf(out, "%s%s", family->name, suffix) != 0) return -1;
  if (child && append_labels(out, family, child, le) != 0) return -1;
  return zg_buf_appendf(out, " %s\n", text);
}

static int render_histogram_child(zg_buf *out, const struct metric_family *family,
                                  const struct metric_child *child) {
  uint64_t cumulative = 0;
  char le[40];
  for (size_t i = 0; i < family->n_bounds; i++) {
    cumulative += child->bucket_counts[i];
    format_value(family->bounds[i], le);
    if (append_sample(out, family, "_bucket", child, le, (double)cumulative) != 0) return -1;
  }
  if (append_sample(out, family, "_bucket", child, "+Inf", (double)child->count) != 0) return -1;
  if (append_sample(out, family, "_sum", child, NULL, child->sum) != 0) return -1;
  return append_sample(out, family, "_count", child, NULL, (double)child->count);
}

static const char *type_name(enum metric_type type) {
  switch (type) {
  case METRIC_COUNTER:
  case METRIC_COUNTER_FN:
    return "counter";
  case METRIC_HISTOGRAM:
    return "histogram";
  case METRIC_GAUGE:
  case METRIC_GAUGE_FN:
    break;
  }
  return "gauge";
}

int metrics_render(const struct metrics *metrics, zg_buf *out) {
  for (const struct metric_family *family = metrics->first; family; family = family->next) {
    if (zg_buf_appendf(out, "# HELP %s ", family->name) != 0 ||
        append_escaped(out, family->help, false) != 0 ||
        zg_buf_appendf(out, "\n# TYPE %s %s\n", family->name, type_name(family->type)) != 0)
      return -1;
    if (family->type == METRIC_GAUGE_FN || family->type == METRIC_COUNTER_FN) {
      if (append_sample(out, family, "", NULL, NULL, family->fn(family->fn_ud)) != 0) return -1;
      continue;
    }
    for (const struct metric_child *child = family->first_child; child; child = child->order_next) {
      int rc = family->type == METRIC_HISTOGRAM
                   ? render_histogram_child(out, family, child)
                   : append_sample(out, family, "", child, NULL, child->value);
      if (rc != 0) return -1;
    }
  }
  return 0;
}
