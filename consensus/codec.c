/* codec.c: binary framing of state machine commands in raft log entries.
 *
 * A fixed 12-byte header (magic, format version, command type, payload
 * length) is followed by a JSON payload. Decoding checks every field against
 * the buffer it was given and fails (-1 with a message) on a short buffer,
 * wrong magic, unknown (future) version or type, a length that disagrees
 * with the buffer, or a payload that is not the expected JSON object. It
 * never asserts, so a node can skip an entry it does not understand.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consensus/internal.h"

const char *zgc_type_name(int type) {
  const struct zg_command_def *def = zg_command_by_type(type);
  return def ? def->name : NULL;
}

int zgc_type_from_name(const char *name) {
  const struct zg_command_def *def = zg_command_by_name(name, false);
  return def ? def->type : 0;
}

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

int zgc_encode(const struct zgc_command *cmd, struct raft_buffer *out, char *err, size_t errlen) {
  if (zgc_type_name(cmd->type) == NULL || cmd->args == NULL || !cJSON_IsObject(cmd->args)) {
    snprintf(err, errlen, "zgc_encode(): bad command type %d or args", cmd->type);
    return -1;
  }
  cJSON *payload = cJSON_CreateObject();
  if (payload == NULL) goto nomem;
  cJSON_AddStringToObject(payload, "req", cmd->req_id);
  cJSON_AddNumberToObject(payload, "at", (double)cmd->at);
  cJSON_AddStringToObject(payload, "actor", cmd->actor ? cmd->actor : "");
  cJSON_AddStringToObject(payload, "source", cmd->source ? cmd->source : "");
  cJSON *args = cJSON_Duplicate(cmd->args, true);
  if (args == NULL) {
    cJSON_Delete(payload);
    goto nomem;
  }
  cJSON_AddItemToObject(payload, "args", args);
  char *text = cJSON_PrintUnformatted(payload);
  cJSON_Delete(payload);
  if (text == NULL) goto nomem;
  size_t len = strlen(text);
  if (len > ZGC_MAX_PAYLOAD) {
    free(text);
    snprintf(err, errlen, "zgc_encode(): payload of %zu bytes exceeds the %u byte limit", len,
             ZGC_MAX_PAYLOAD);
    return -1;
  }
  /* libraft wants entry buffers sized in multiples of 8: zero padding. */
  size_t total = (ZGC_HEADER_LEN + len + 7) & ~(size_t)7;
  uint8_t *buf = raft_calloc(1, total);
  if (buf == NULL) {
    free(text);
    goto nomem;
  }
  memcpy(buf, ZGC_MAGIC, 4);
  buf[4] = ZGC_FORMAT_VERSION;
  buf[5] = (uint8_t)cmd->type;
  buf[6] = buf[7] = 0;
  put_be32(buf + 8, (uint32_t)len);
  memcpy(buf + ZGC_HEADER_LEN, text, len);
  free(text);
  out->base = buf;
  out->len = total;
  return 0;
nomem:
  snprintf(err, errlen, "zgc_encode(): out of memory");
  return -1;
}

static char *dup_string_field(const cJSON *obj, const char *name) {
  const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, name);
  if (!cJSON_IsString(item)) return NULL;
  return strdup(item->valuestring);
}

int zgc_decode(const void *data, size_t len, struct zgc_command *out, char *err, size_t errlen) {
  const uint8_t *p = data;
  memset(out, 0, sizeof *out);
  if (data == NULL || len < ZGC_HEADER_LEN) {
    snprintf(err, errlen, "command truncated: %zu bytes, header needs %d", len, ZGC_HEADER_LEN);
    return -1;
  }
  if (memcmp(p, ZGC_MAGIC, 4) != 0) {
    snprintf(err, errlen, "command has bad magic (not a zonegate command)");
    return -1;
  }
  if (p[4] != ZGC_FORMAT_VERSION) {
    snprintf(err, errlen, "command format version %u is not supported (this build reads %d)", p[4],
             ZGC_FORMAT_VERSION);
    return -1;
  }
  int type = p[5];
  if (zgc_type_name(type) == NULL) {
    snprintf(err, errlen, "unknown command type %d", type);
    return -1;
  }
  uint32_t plen = get_be32(p + 8);
  size_t room = len - ZGC_HEADER_LEN;
  if (plen > ZGC_MAX_PAYLOAD || (size_t)plen > room || room - plen >= 8) {
    snprintf(err, errlen, "command payload length %u disagrees with entry size %zu", plen, len);
    return -1;
  }
  for (size_t i = ZGC_HEADER_LEN + plen; i < len; i++) {
    if (p[i] != 0) {
      snprintf(err, errlen, "command padding is not zero");
      return -1;
    }
  }
  const char *text = (const char *)p + ZGC_HEADER_LEN;
  const char *end = NULL;
  cJSON *payload = cJSON_ParseWithLengthOpts(text, plen, &end, false);
  if (payload == NULL) {
    snprintf(err, errlen, "command payload is not valid JSON");
    return -1;
  }
  while (end != NULL && end < text + plen &&
         (*end == ' ' || *end == '\n' || *end == '\t' || *end == '\r'))
    end++;
  if (end != text + plen || !cJSON_IsObject(payload)) {
    cJSON_Delete(payload);
    snprintf(err, errlen, "command payload is not a single JSON object");
    return -1;
  }
  const cJSON *req = cJSON_GetObjectItemCaseSensitive(payload, "req");
  const cJSON *at = cJSON_GetObjectItemCaseSensitive(payload, "at");
  cJSON *args = cJSON_GetObjectItemCaseSensitive(payload, "args");
  if (!cJSON_IsString(req) || strlen(req->valuestring) >= sizeof out->req_id ||
      !cJSON_IsNumber(at) || !(at->valuedouble >= 0 && at->valuedouble <= 9.0e15) ||
      !cJSON_IsObject(args)) {
    cJSON_Delete(payload);
    snprintf(err, errlen, "command payload lacks req/at/args or has wrong types");
    return -1;
  }
  out->actor = dup_string_field(payload, "actor");
  out->source = dup_string_field(payload, "source");
  if (out->actor == NULL || out->source == NULL) {
    cJSON_Delete(payload);
    zgc_command_free(out);
    snprintf(err, errlen, "command payload lacks actor/source strings");
    return -1;
  }
  out->type = type;
  snprintf(out->req_id, sizeof out->req_id, "%s", req->valuestring);
  out->at = (uint64_t)at->valuedouble;
  out->args = cJSON_DetachItemViaPointer(payload, args);
  cJSON_Delete(payload);
  return 0;
}

void zgc_command_free(struct zgc_command *cmd) {
  if (cmd == NULL) return;
  free(cmd->actor);
  free(cmd->source);
  cJSON_Delete(cmd->args);
  memset(cmd, 0, sizeof *cmd);
}
