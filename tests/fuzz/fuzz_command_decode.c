/* fuzz_command_decode: feeds arbitrary bytes to the raft entry codec and,
 * when they decode, applies them to a fresh state machine. Neither may
 * crash, leak or assert on any input; a decoded command re-encodes to an
 * entry that decodes to the same type. */
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
  struct zgc_command cmd;
  char err[256];
  if (zgc_decode(data, size, &cmd, err, sizeof err) == 0) {
    struct raft_buffer again;
    if (zgc_encode(&cmd, &again, err, sizeof err) == 0) {
      struct zgc_command cmd2;
      if (zgc_decode(again.base, again.len, &cmd2, err, sizeof err) != 0 || cmd2.type != cmd.type)
        abort();
      zgc_command_free(&cmd2);
      raft_free(again.base);
    }
    zgc_command_free(&cmd);
  }
  struct zg_fsm fsm;
  zg_fsm_init(&fsm, 16);
  zg_fsm_apply_buf(&fsm, data, size);
  zg_fsm_close(&fsm);
  return 0;
}
