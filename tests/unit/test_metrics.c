/* Unit tests for gateway/metrics: the rendered text is parsed back the way
 * a Prometheus scraper reads it (HELP/TYPE lines, samples with labels,
 * escaped label values, cumulative histogram buckets). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <cmocka.h>

#include "gateway/metrics.h"

/* ---- a small exposition-format parser ------------------------------ */

#define MAX_SAMPLES 256
#define MAX_SAMPLE_LABELS 9

struct sample {
  char name[128];
  int n_labels;
  char label_names[MAX_SAMPLE_LABELS][64];
  char label_values[MAX_SAMPLE_LABELS][128];
  double value;
};

struct scrape {
  char text[16384];
  struct sample samples[MAX_SAMPLES];
  int n_samples;
  char help_lines[64][256]; /* "name help" */
  char type_lines[64][128]; /* "name type" */
  int n_help, n_type;
};

/* Parses one sample line; fails the test on any syntax error. */
static void parse_sample(const char *line, struct sample *s) {
  const char *p = line;
  size_t n = strcspn(p, "{ ");
  assert_true(n > 0 && n < sizeof s->name);
  memcpy(s->name, p, n);
  s->name[n] = '\0';
  p += n;
  s->n_labels = 0;
  if (*p == '{') {
    p++;
    while (*p != '}') {
      assert_true(s->n_labels < MAX_SAMPLE_LABELS);
      size_t name_len = strcspn(p, "=");
      assert_true(name_len > 0 && name_len < 64);
      memcpy(s->label_names[s->n_labels], p, name_len);
      s->label_names[s->n_labels][name_len] = '\0';
      p += name_len;
      assert_int_equal(*p++, '=');
      assert_int_equal(*p++, '"');
      size_t out = 0;
      while (*p != '"') {
        assert_true(*p != '\0' && *p != '\n' && out < 127);
        char c = *p++;
        if (c == '\\') {
          c = *p++;
          if (c == 'n')
            c = '\n';
          else
            assert_true(c == '\\' || c == '"');
        }
        s->label_values[s->n_labels][out++] = c;
      }
      s->label_values[s->n_labels][out] = '\0';
      p++; /* closing quote */
      s->n_labels++;
      if (*p == ',')
        p++;
      else
        assert_int_equal(*p, '}');
    }
    p++;
  }
  assert_int_equal(*p++, ' ');
  char *end = NULL;
  s->value = strtod(p, &end);
  assert_true(end != p);
  assert_int_equal(*end, '\0');
}

static void scrape(const struct metrics *metrics, struct scrape *out) {
  zg_buf buf;
  zg_buf_init(&buf);
  assert_int_equal(metrics_render(metrics, &buf), 0);
  assert_true(buf.len < sizeof out->text);
  assert_true(buf.len == 0 || buf.data[buf.len - 1] == '\n');
  memcpy(out->text, buf.data ? buf.data : "", buf.len);
  out->text[buf.len] = '\0';
  zg_buf_free(&buf);

  out->n_samples = out->n_help = out->n_type = 0;
  char copy[sizeof out->text];
  strcpy(copy, out->text);
  char *saveptr = NULL;
  for (char *line = strtok_r(copy, "\n", &saveptr); line; line = strtok_r(NULL, "\n", &saveptr)) {
    if (strncmp(line, "# HELP ", 7) == 0) {
      assert_true(out->n_help < 64);
      snprintf(out->help_lines[out->n_help++], 256, "%s", line + 7);
    } else if (strncmp(line, "# TYPE ", 7) == 0) {
      assert_true(out->n_type < 64);
      snprintf(out->type_lines[out->n_type++], 128, "%s", line + 7);
    } else {
      assert_true(line[0] != '#');
      assert_true(out->n_samples < MAX_SAMPLES);
      parse_sample(line, &out->samples[out->n_samples++]);
    }
  }
}

/* Finds the sample with this name whose labels include every pair in
 * `labels` ("k=v" strings, NULL-terminated). */
static const struct sample *find(const struct scrape *s, const char *name, ...) {
  for (int i = 0; i < s->n_samples; i++) {
    const struct sample *sample = &s->samples[i];
    if (strcmp(sample->name, name) != 0) continue;
    va_list ap;
    va_start(ap, name);
    bool match = true;
    for (const char *k = va_arg(ap, const char *); k && match; k = va_arg(ap, const char *)) {
      const char *v = va_arg(ap, const char *);
      bool found = false;
      for (int j = 0; j < sample->n_labels; j++)
        if (strcmp(sample->label_names[j], k) == 0 && strcmp(sample->label_values[j], v) == 0)
          found = true;
      match = found;
    }
    va_end(ap);
    if (match) return sample;
  }
  return NULL;
}

static bool has_line(char lines[][256], int n, const char *want) {
  for (int i = 0; i < n; i++)
    if (strcmp(lines[i], want) == 0) return true;
  return false;
}

static bool has_type(char lines[][128], int n, const char *want) {
  for (int i = 0; i < n; i++)
    if (strcmp(lines[i], want) == 0) return true;
  return false;
}

/* ---- tests --------------------------------------------------------- */

static void test_counter_with_labels(void **state) {
  struct metrics *m = metrics_create();
  struct metric_counter *requests =
      metrics_counter(m, "zonegate_requests_total", "Client requests.", "route,code");
  assert_non_null(requests);
  metrics_counter_add(requests, 1, "/v1/chat/completions", "200");
  metrics_counter_add(requests, 2, "/v1/chat/completions", "200");
  metrics_counter_add(requests, 1, "/v1/models", "401");
  metrics_counter_add(requests, -5, "/v1/models", "401"); /* ignored: counters only go up */
  struct metric_counter *plain = metrics_counter(m, "zonegate_restarts_total", "Restarts.", NULL);
  struct metric_counter *unused = metrics_counter(m, "zonegate_unused_total", "Unused.", "a");
  assert_non_null(unused);

  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_true(has_line(s->help_lines, s->n_help, "zonegate_requests_total Client requests."));
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_requests_total counter"));
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_unused_total counter"));
  const struct sample *ok =
      find(s, "zonegate_requests_total", "route", "/v1/chat/completions", "code", "200", NULL);
  assert_non_null(ok);
  assert_true(ok->value == 3);
  assert_int_equal(ok->n_labels, 2);
  assert_string_equal(ok->label_names[0], "route");
  const struct sample *denied = find(s, "zonegate_requests_total", "code", "401", NULL);
  assert_non_null(denied);
  assert_true(denied->value == 1);
  /* A family without labels renders 0 before its first update. */
  const struct sample *restarts = find(s, "zonegate_restarts_total", NULL);
  assert_non_null(restarts);
  assert_true(restarts->value == 0);
  assert_null(find(s, "zonegate_unused_total", NULL));

  metrics_counter_add(plain, 1);
  scrape(m, s);
  assert_true(find(s, "zonegate_restarts_total", NULL)->value == 1);
  assert_int_equal(s->n_samples, 3);

  /* HELP comes right before TYPE, before the samples of its family. */
  const char *help = strstr(s->text, "# HELP zonegate_requests_total");
  const char *type = strstr(s->text, "# TYPE zonegate_requests_total");
  const char *sample = strstr(s->text, "\nzonegate_requests_total{");
  assert_true(help && type && sample && help < type && type < sample);
  free(s);
  metrics_destroy(m);
}

static void test_gauges(void **state) {
  struct metrics *m = metrics_create();
  struct metric_gauge *in_flight = metrics_gauge(m, "zonegate_in_flight", "In flight.", "upstream");
  metrics_gauge_set(in_flight, 7, "main");
  metrics_gauge_add(in_flight, -2, "main");
  metrics_gauge_set(in_flight, 0.25, "backup");
  assert_int_equal(metrics_gauge_fn(m, "zonegate_level", "No function.", NULL, NULL), -1);
  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_in_flight gauge"));
  assert_true(find(s, "zonegate_in_flight", "upstream", "main", NULL)->value == 5);
  assert_true(find(s, "zonegate_in_flight", "upstream", "backup", NULL)->value == 0.25);
  free(s);
  metrics_destroy(m);
}

static double read_level(void *ud) {
  return *(double *)ud;
}

static void test_gauge_fn_evaluated_at_scrape(void **state) {
  struct metrics *m = metrics_create();
  double level = 1;
  assert_int_equal(metrics_gauge_fn(m, "zonegate_queue_depth", "Queue.", read_level, &level), 0);
  assert_int_equal(metrics_gauge_fn(m, "zonegate_queue_depth", "Again.", read_level, &level), -1);
  struct scrape *s = calloc(1, sizeof *s);
  level = 17;
  scrape(m, s);
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_queue_depth gauge"));
  assert_true(find(s, "zonegate_queue_depth", NULL)->value == 17);
  level = 3;
  scrape(m, s);
  assert_true(find(s, "zonegate_queue_depth", NULL)->value == 3);
  double hits = 12;
  assert_int_equal(metrics_counter_fn(m, "zonegate_cache_hits_total", "Hits.", read_level, &hits),
                   0);
  scrape(m, s);
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_cache_hits_total counter"));
  assert_true(find(s, "zonegate_cache_hits_total", NULL)->value == 12);
  free(s);
  metrics_destroy(m);
}

static void test_histogram_cumulative(void **state) {
  struct metrics *m = metrics_create();
  const double bounds[] = {0.1, 0.5, 1};
  struct metric_histogram *latency =
      metrics_histogram(m, "zonegate_upstream_seconds", "Upstream latency.", "upstream", bounds, 3);
  assert_non_null(latency);
  const double observations[] = {0.05, 0.1, 0.3, 0.7, 0.9, 5};
  for (size_t i = 0; i < 6; i++) metrics_histogram_observe(latency, observations[i], "main");

  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_true(has_type(s->type_lines, s->n_type, "zonegate_upstream_seconds histogram"));
  const char *les[] = {"0.1", "0.5", "1", "+Inf"};
  const double expected[] = {2, 3, 5, 6}; /* 0.1 is inside le="0.1" */
  double previous = 0;
  for (int i = 0; i < 4; i++) {
    const struct sample *b =
        find(s, "zonegate_upstream_seconds_bucket", "upstream", "main", "le", les[i], NULL);
    assert_non_null(b);
    assert_true(b->value == expected[i]);
    assert_true(b->value >= previous); /* cumulative */
    previous = b->value;
  }
  const struct sample *sum = find(s, "zonegate_upstream_seconds_sum", "upstream", "main", NULL);
  const struct sample *count = find(s, "zonegate_upstream_seconds_count", "upstream", "main", NULL);
  assert_non_null(sum);
  assert_non_null(count);
  assert_true(fabs(sum->value - 7.05) < 1e-9);
  assert_true(count->value == 6);
  /* le comes last among the labels. */
  assert_non_null(
      strstr(s->text, "zonegate_upstream_seconds_bucket{upstream=\"main\",le=\"0.5\"} 3\n"));
  free(s);
  metrics_destroy(m);
}

static void test_default_buckets(void **state) {
  assert_true(metrics_default_latency_buckets[0] == 0.0005);
  assert_true(metrics_default_latency_buckets[metrics_default_latency_buckets_count - 1] == 60);
  struct metrics *m = metrics_create();
  struct metric_histogram *h =
      metrics_histogram(m, "zonegate_request_seconds", "Latency.", NULL, NULL, 0);
  metrics_histogram_observe(h, 0.002);
  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_true(find(s, "zonegate_request_seconds_bucket", "le", "0.0005", NULL)->value == 0);
  assert_true(find(s, "zonegate_request_seconds_bucket", "le", "0.0025", NULL)->value == 1);
  assert_true(find(s, "zonegate_request_seconds_bucket", "le", "60", NULL)->value == 1);
  assert_true(find(s, "zonegate_request_seconds_bucket", "le", "+Inf", NULL)->value == 1);
  int buckets = 0;
  for (int i = 0; i < s->n_samples; i++)
    buckets += strcmp(s->samples[i].name, "zonegate_request_seconds_bucket") == 0;
  assert_int_equal(buckets, (int)metrics_default_latency_buckets_count + 1);
  free(s);
  metrics_destroy(m);
}

static void test_escaping(void **state) {
  struct metrics *m = metrics_create();
  struct metric_counter *c =
      metrics_counter(m, "zonegate_odd_total", "Help with \\ backslash\nand newline.", "value");
  const char *odd = "quote\" back\\slash\nnewline";
  metrics_counter_add(c, 1, odd);
  metrics_counter_add(c, 1, NULL); /* NULL reads as "" */
  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_non_null(
      strstr(s->text, "zonegate_odd_total{value=\"quote\\\" back\\\\slash\\nnewline\"} 1\n"));
  assert_true(has_line(s->help_lines, s->n_help,
                       "zonegate_odd_total Help with \\\\ backslash\\nand newline."));
  const struct sample *back = find(s, "zonegate_odd_total", "value", odd, NULL);
  assert_non_null(back); /* round-trips through the parser */
  assert_non_null(find(s, "zonegate_odd_total", "value", "", NULL));
  free(s);
  metrics_destroy(m);
}

static void test_registration_rules(void **state) {
  struct metrics *m = metrics_create();
  struct metric_counter *a = metrics_counter(m, "zonegate_x_total", "X.", "route");
  assert_non_null(a);
  /* Same name, type and labels: the same family. */
  assert_ptr_equal(metrics_counter(m, "zonegate_x_total", "X.", "route"), a);
  /* Clashes and bad names are refused. */
  assert_null(metrics_counter(m, "zonegate_x_total", "X.", "code"));
  assert_null(metrics_gauge(m, "zonegate_x_total", "X.", "route"));
  assert_null(metrics_counter(m, "9bad", "Bad.", NULL));
  assert_null(metrics_counter(m, "bad-name", "Bad.", NULL));
  assert_null(metrics_counter(m, "zonegate_y_total", "Y.", "bad-label"));
  assert_null(metrics_counter(m, "zonegate_y_total", "Y.", "__reserved"));
  assert_null(metrics_counter(m, "zonegate_y_total", "Y.", "a,a"));
  assert_null(metrics_histogram(m, "zonegate_h", "H.", "le", NULL, 0));
  const double unsorted[] = {1, 0.5};
  assert_null(metrics_histogram(m, "zonegate_h", "H.", NULL, unsorted, 2));
  /* NULL handles are harmless. */
  metrics_counter_add(NULL, 1, "x");
  metrics_gauge_set(NULL, 1);
  metrics_histogram_observe(NULL, 1);
  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_int_equal(s->n_type, 1);
  free(s);
  metrics_destroy(m);
}

static void test_many_children(void **state) {
  struct metrics *m = metrics_create();
  struct metric_counter *c = metrics_counter(m, "zonegate_many_total", "Many.", "id,kind");
  char id[16];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 100; i++) {
      snprintf(id, sizeof id, "%d", i);
      metrics_counter_add(c, 1, id, i % 2 ? "odd" : "even");
    }
  }
  struct scrape *s = calloc(1, sizeof *s);
  scrape(m, s);
  assert_int_equal(s->n_samples, 100);
  for (int i = 0; i < 100; i++) assert_true(s->samples[i].value == 3);
  /* First-use order is kept. */
  assert_string_equal(s->samples[0].label_values[0], "0");
  assert_string_equal(s->samples[99].label_values[0], "99");
  assert_string_equal(find(s, "zonegate_many_total", "id", "7", NULL)->label_values[1], "odd");
  free(s);
  metrics_destroy(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_counter_with_labels),
      cmocka_unit_test(test_gauges),
      cmocka_unit_test(test_gauge_fn_evaluated_at_scrape),
      cmocka_unit_test(test_histogram_cumulative),
      cmocka_unit_test(test_default_buckets),
      cmocka_unit_test(test_escaping),
      cmocka_unit_test(test_registration_rules),
      cmocka_unit_test(test_many_children),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
