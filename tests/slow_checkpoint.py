"""`python tests/slow_checkpoint.py train ARGS...`: the real `amm-trl train`, with one checkpoint's writing held open.

When the Trainer has written the model, the Q-heads, the optimizer and the scheduler of `checkpoint-$HOLD_STEP` (but
not yet its RNG states and `trainer_state.json`), this touches `$HOLD_READY` and sleeps, so that a test can SIGKILL
the process while the checkpoint is half-written. With `$STEP_READY` set instead, the training step that follows
step `$STEP_READY` touches `$HOLD_READY` and takes 3 s longer, so that a signal sent then arrives inside that step.
Nothing else changes.
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


def _slow_step(self, *args, **kwargs):
    if self.state.global_step == int(os.environ["STEP_READY"]):
        open(os.environ["HOLD_READY"], "w").close()
        time.sleep(3)
    return _training_step(self, *args, **kwargs)


if os.environ.get("STEP_READY"):
    from amm_trl import AMMTrainer

    _training_step = AMMTrainer.training_step
    AMMTrainer.training_step = _slow_step

if __name__ == "__main__":
    main(sys.argv[1:])
