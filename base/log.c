/* log.c: JSON-lines logging to stdout. One object per line with ts, level,
 * node, event and msg (or extra fields). Never blocks the caller on a
 * broken stdout: write errors are ignored. Callers must not pass secrets;
 * nothing here can tell a secret from any other string. */
#include "base/base.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static enum zg_log_level current_level = ZG_INFO;
static char node_id[64];

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void zg_log_set_level(enum zg_log_level level) {
  current_level = level;
}

bool zg_log_enabled(enum zg_log_level level) {
  return level >= current_level;
}

void zg_log_set_node(const char *id) {
  snprintf(node_id, sizeof(node_id), "%s", id ? id : "");
}

static void emit(enum zg_log_level level, const char *event, cJSON *line) {
  char ts[32];
  zg_iso8601(zg_wall_ms(), ts);
  cJSON *out = cJSON_CreateObject();
  cJSON_AddStringToObject(out, "ts", ts);
  cJSON_AddStringToObject(out, "level", level_names[level]);
  if (node_id[0]) cJSON_AddStringToObject(out, "node", node_id);
  cJSON_AddStringToObject(out, "event", event);
  if (line) {
    cJSON *item = line->child;
    while (item) {
      cJSON *next = item->next;
      cJSON_DetachItemViaPointer(line, item);
      cJSON_AddItemToObject(out, item->string, item);
      item = next;
    }
    cJSON_Delete(line);
  }
  char *text = cJSON_PrintUnformatted(out);
  if (text) {
    fputs(text, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    free(text);
  }
  cJSON_Delete(out);
}

void zg_log(enum zg_log_level level, const char *event, const char *fmt, ...) {
  if (level < current_level) return;
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  cJSON *fields = cJSON_CreateObject();
  cJSON_AddStringToObject(fields, "msg", msg);
  emit(level, event, fields);
}

void zg_log_fields(enum zg_log_level level, const char *event, cJSON *fields) {
  if (level < current_level) {
    cJSON_Delete(fields);
    return;
  }
  emit(level, event, fields);
}

/* The least recently logged slot is reused for a new key, so a flood from
 * many addresses costs at most one line per slot per interval. */
bool zg_log_throttle(struct zg_log_throttle *t, const char *key, unsigned *suppressed) {
  uint64_t now = zg_mono_ms();
  size_t slot = 0;
  bool found = false;
  for (size_t i = 0; i < ZG_LOG_THROTTLE_SLOTS; i++) {
    if (t->slots[i].key[0] && strcmp(t->slots[i].key, key) == 0) {
      slot = i;
      found = true;
      break;
    }
    if (t->slots[i].last_ms < t->slots[slot].last_ms) slot = i;
  }
  if (found && now - t->slots[slot].last_ms < t->interval_ms) {
    t->slots[slot].suppressed++;
    return false;
  }
  if (suppressed) *suppressed = found ? t->slots[slot].suppressed : 0;
  snprintf(t->slots[slot].key, sizeof(t->slots[slot].key), "%s", key);
  t->slots[slot].last_ms = now;
  t->slots[slot].suppressed = 0;
  return true;
}
