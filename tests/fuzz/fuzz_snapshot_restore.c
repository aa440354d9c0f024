/* fuzz_snapshot_restore: feeds arbitrary bytes to snapshot restore. A
 * rejected snapshot must leave the state untouched; an accepted one must
 * serialise back to bytes that restore to the same serialisation. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/base.h"
#include "consensus/internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  zg_log_set_level(ZG_ERROR + 1);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct zg_fsm a, b;
  char err[256], *snap1 = NULL, *snap2 = NULL;
  size_t len1 = 0, len2 = 0;
  zg_fsm_init(&a, 64);
  zg_fsm_init(&b, 64);
  if (zg_fsm_restore_bytes(&a, data, size, err, sizeof err) == 0) {
    if (zg_fsm_snapshot_bytes(&a, &snap1, &len1) != 0) abort();
    if (zg_fsm_restore_bytes(&b, snap1, len1, err, sizeof err) != 0) abort();
    if (zg_fsm_snapshot_bytes(&b, &snap2, &len2) != 0) abort();
    if (len1 != len2 || memcmp(snap1, snap2, len1) != 0) abort();
    free(snap1);
    free(snap2);
  } else if (a.st.n_keys != 0 || a.st.n_tokens != 0 || a.st.config != NULL) {
    abort(); /* a rejected snapshot must not leave partial state behind */
  }
  zg_fsm_close(&a);
  zg_fsm_close(&b);
  return 0;
}
