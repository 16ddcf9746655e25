"""One AMM training step, traced as it runs, passes through the project files of the reading path the trainer's
docstring names: the trainer's hooks, rollouts, the projection to logits, the objective interface and the teacher's
distribution, the AMM objective with its Q-heads and shared math, and the chunked loss."""

import os
import sys

from transformers import TrainerCallback

import amm_trl
from amm_trl import AMMConfig, AMMTrainer

PACKAGE = os.path.dirname(amm_trl.__file__)


class TraceOneStep(TrainerCallback):
    """Records every project function called between the second step's begin and end events (the first step also
    runs one-time setup, e.g. the optimizer's creation)."""

    def __init__(self):
        self.calls = set()

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE + os.sep):
            self.calls.add((os.path.relpath(frame.f_code.co_filename, PACKAGE), frame.f_code.co_name))

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            sys.setprofile(self._profile)

    def on_step_end(self, args, state, control, **kwargs):
        sys.setprofile(None)


def test_one_amm_step_reads_through_the_documented_project_files(tiny, tiny_dataset, tmp_path):
    trace = TraceOneStep()
    args = AMMConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=4,
                     max_completion_length=6, report_to="none", save_strategy="no", logging_steps=1,
                     gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
                     teacher_model_init_kwargs={"dtype": "float32"})
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args, train_dataset=tiny_dataset,
                         callbacks=[trace])
    try:
        trainer.train()
    finally:
        sys.setprofile(None)
    files = {f for f, _ in trace.calls}
    assert files == {"trainer.py", "rollouts.py", "projection.py", os.path.join("objectives", "base.py"),
                     os.path.join("objectives", "teachers.py"), os.path.join("objectives", "amm.py"),
                     os.path.join("objectives", "functional.py"), "qhead.py",
                     "chunked.py"}, sorted(trace.calls)
    # the step did what an AMM step does: rollouts and teacher answers, the critic, the chunked loss, the guard
    for call in [("trainer.py", "training_step"), ("trainer.py", "_get_grad_norm"),
                 ("rollouts.py", "teacher_completions"), ("objectives/amm.py", "critic_values"),
                 ("chunked.py", "chunked_token_loss")]:
        assert (os.path.normpath(call[0]), call[1]) in trace.calls
