"""Preemption that saves: on SIGTERM (slurm's preemption and `scancel` signal, what torchrun, accelerate and the
`deepspeed` launcher forward to their ranks) the step in progress finishes, every rank saves a complete checkpoint
at that step, training stops and the process exits with status 128 + the signal's number. A requeued job resumes
from that checkpoint (`--resume_from_checkpoint latest`) and loses no step.

All ranks must save at the same step: the handler sets accelerate's trigger (`Accelerator.set_trigger`) and each
step end `Accelerator.check_trigger` tells every rank whether any rank got the signal. A second SIGTERM while the
checkpoint is being written is ignored; SIGKILL (slurm's after its grace time, `KillWait`) is not, so the grace time
must cover a step plus a save.
"""

import signal
import threading

from transformers import TrainerCallback

PREEMPTION_SIGNALS = (signal.SIGTERM,)


class TrainingPreempted(SystemExit):
    """Raised by `AMMTrainer.train` after the preemption checkpoint is saved: exits the process with 128 + signal
    number unless caught."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(128 + signum)

    def __str__(self) -> str:
        return (f"amm-trl: got {signal.Signals(self.signum).name}: saved {self.checkpoint} at step {self.step} and "
                f"stopped. Resume with --resume_from_checkpoint latest (the slurm templates do).")


class PreemptionCallback(TrainerCallback):
    """Turns a preemption signal into a checkpoint at the end of the current step and the end of training."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum: int | None = None  # the signal this process received
        self.stopped_at: int | None = None  # the step the run stopped and saved at, once all ranks agreed
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            self.accelerator.set_trigger()
            print(f"amm-trl: got {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                  f"stopping", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self.accelerator.check_trigger():
            self.signum = self.signum or signal.SIGTERM  # a rank that got nothing stops with its peers
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Gives the signals back to the handlers they had before training (also when training raised)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

