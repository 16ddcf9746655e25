"""Divergence guard: training stops at the first step whose loss, gradient norm or weights are not finite.

The Trainer alone would carry on: it replaces a non-finite loss by the running mean in its logs
(`logging_nan_inf_filter`), applies an optimizer step with NaN gradients, saves NaN weights into the next checkpoint,
or crashes later inside sampling (`probability tensor contains either inf, nan or element < 0`). The guard checks, per
optimizer step and on every process alike:

- the step's loss on every process and the gradient norm (before clipping), after backward and before the optimizer
  step (DeepSpeed steps inside backward; nothing is saved after that step either);
- the student's sampling distribution while it generates rollouts (overflowing weights make it inf/nan);
- the weights before every checkpoint and before the final save.

`AMMTrainer` runs these checks (`training_step`, `_get_grad_norm`, `check_finite_weights`) and raises
`NonFiniteTrainingError` naming the step, the values and the likely causes; no checkpoint of that step or later is
written, so the last complete one stays resumable. With fp16 loss scaling an infinite gradient norm is an
overflow the scaler skips, so only the loss is checked there.
"""

import torch

from .checkpoints import latest_complete_checkpoint


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss, gradient norm or weight; raised before anything non-finite is saved."""


def _fmt(values) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


def local_weights(model):
    """This process's trainable weights: ZeRO-3 keeps each process's partition in `ds_tensor`; elsewhere the parameter
    holds the full weight."""
    for p in model.parameters():
        if p.requires_grad:
            yield getattr(p, "ds_tensor", p).detach()


def weights_finite_everywhere(model, accelerator) -> bool:
    """Whether every trainable weight is finite on every process (one collective; every process gets the answer)."""
    local = all(bool(torch.isfinite(w).all()) for w in local_weights(model) if w.numel())
    return accelerator.gather(torch.tensor(float(not local), device=accelerator.device)[None]).max().item() == 0


def max_abs_weight(model) -> float:
    return max((w.abs().max().item() for w in local_weights(model) if w.numel()), default=0.0)


def divergence_message(args, step: int, optimizer, what: str) -> str:
    """The error of a diverged step `step`: what is not finite, what stays resumable, and the likely causes."""
    lrs = sorted({group["lr"] for group in optimizer.param_groups}) if optimizer is not None else []
    last, _ = latest_complete_checkpoint(args.output_dir)
    resumable = (f"the newest complete checkpoint, {last}, is unaffected and resumable" if last
                 else "there is no earlier checkpoint")
    causes = [f"a learning rate too high for this model (learning rates {_fmt(lrs)} at this step; full "
              f"fine-tuning of LLMs typically uses 1e-6 to 1e-4)"]
    if args.max_grad_norm is None or args.max_grad_norm <= 0:
        causes.append("gradient clipping is off (max_grad_norm=0): set max_grad_norm 1.0")
    if args.fp16:
        causes.append("fp16 overflow: train in bf16 (`--bf16 true`) if the hardware supports it")
    causes.append("non-finite inputs: the teacher's or student's logits overflowing in a 16-bit dtype "
                  "(load the models in bf16 or fp32), or a data row that produces them")
    return (f"Training diverged at step {step}: {what}. Stopped before saving anything of this step: {resumable}. "
            f"Likely causes: " + "; ".join(causes) + ".")
