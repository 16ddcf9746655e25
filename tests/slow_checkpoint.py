"""`python tests/slow_checkpoint.py train ARGS...`: the real `amm-trl train`, with one checkpoint's writing held open.

When the Trainer has written the model, the Q-heads, the optimizer and the scheduler of `checkpoint-$HOLD_STEP` (but
not yet its RNG states and `trainer_state.json`), this touches `$HOLD_READY` and sleeps, so that a test can SIGKILL
the process while the checkpoint is half-written. Nothing else changes.
"""

import os
import sys
import time

from transformers import Trainer

from amm_trl.cli import main

_save_optimizer_and_scheduler = Trainer._save_optimizer_and_scheduler


def _held(self, output_dir):
    _save_optimizer_and_scheduler(self, output_dir)
    if os.path.basename(output_dir) == f"checkpoint-{os.environ['HOLD_STEP']}":
        open(os.environ["HOLD_READY"], "w").close()
        time.sleep(600)


Trainer._save_optimizer_and_scheduler = _held

if __name__ == "__main__":
    main(sys.argv[1:])
