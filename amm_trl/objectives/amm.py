"""Adversarial moment matching (Jia, NeurIPS 2024): the student minimizes, and the Q-heads maximize, the action-value
moment gap <p_T - p_S, f> on student rollouts (weight 1 - `amm_beta`) and off-policy completions (`amm_beta`).

The adversary f is a Q-head (`amm_trl.qhead`) reading detached hidden states; both players descend one loss, arranged
with stop-gradients (`amm_adversarial_gap`), so one backward and one optimizer step update both.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..qhead import build_q_heads
from .base import (LossContext, Objective, Part, Tokens, _as, _compute_dtype, _pair_log_probs, length_normalize,
                   reward_to_go, token_log_probs)

__all__ = ["bounded_q", "amm_moment_gap", "amm_adversarial_gap"]


def bounded_q(raw: Tensor, bound: float) -> Tensor:
    r"""Bounded Q-head output (the adversary's function class |f| <= c).

    .. math:: f = c \tanh(\text{raw})
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    return float(bound) * torch.tanh(_as(raw, _compute_dtype(raw)))


def _check_q(student_logits: Tensor, q_values: Tensor) -> None:
    if q_values.shape != student_logits.shape:
        raise ValueError(
            f"q_values {tuple(q_values.shape)} must have the shape of student_logits {tuple(student_logits.shape)}"
        )


def amm_moment_gap(student_logits: Tensor, teacher_logits: Tensor, q_values: Tensor) -> Tensor:
    r"""Per-state action-value moment gap; gradients flow to all three inputs.

    .. math:: h(s) = \sum_a (p_T(a|s) - p_S(a|s)) \, f(s, a) = \langle p_T - p_S, f \rangle

    With f = c sign(p_T - p_S) it equals 2c TV(p_T, p_S), the sup over |f| <= c.
    """
    _check_q(student_logits, q_values)
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    q = _as(q_values, _compute_dtype(q_values, log_ps))
    return ((log_pt.exp() - log_ps.exp()) * q).sum(-1)


def amm_adversarial_gap(student_logits: Tensor, teacher_logits: Tensor, q_values: Tensor) -> Tensor:
    r"""The moment gap arranged for a single min-max backward (``L = D(theta, sg(phi)) - D(sg(theta), phi)``).

    .. math::
        s = \langle p_T - p_S, \mathrm{sg}(f) \rangle, \quad
        h = \langle \mathrm{sg}(p_T - p_S), f \rangle, \quad
        \text{returns } s - h + \mathrm{sg}(h)

    The value equals :func:`amm_moment_gap`. Minimizing it makes the student *descend* the gap (its gradient
    is that of the gap) while the Q-head *ascends* it (its gradient is the negated gap gradient). Teacher
    logits never receive a gradient.
    """
    _check_q(student_logits, q_values)
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits.detach())
    q = _as(q_values, _compute_dtype(q_values, log_ps))
    diff = log_pt.exp() - log_ps.exp()
    s = (diff * q.detach()).sum(-1)
    h = (diff.detach() * q).sum(-1)
    return s - h + h.detach()


def score_function_advantages(gaps: Tensor, valid: Tensor, length_normalization: bool, baseline: str,
                              clip: float | None) -> Tensor:
    r"""Advantages of the on-policy score-function term, per valid token:
    A_t = sum_{t' > t} h(s_{t'}) (optionally / remaining length), minus the batch mean, clipped to [-clip, clip]."""
    rewards = torch.zeros(valid.shape, device=gaps.device, dtype=torch.float32)
    rewards[valid] = gaps.float()
    mask = valid.float()
    advantages = reward_to_go(rewards, mask, include_current=False)
    if length_normalization:
        advantages = length_normalize(advantages, mask, include_current=False)
    advantages = advantages[valid]
    if baseline == "mean" and advantages.numel() > 0:
        advantages = advantages - advantages.mean()
    return advantages.clamp(-clip, clip) if clip is not None else advantages


class AMM(Objective):
    name = "amm"
    description = ("Adversarial moment matching: on- and off-policy Q-head distances mixed by `amm_beta` (Jia, "
                   "NeurIPS 2024).")
    own_fields = ("amm_policy_gradient",)
    needs_q_heads = True
    shared_head = False  # one head for both data kinds regardless of `q_head_shared`

    def __init__(self, args):
        super().__init__(args)
        self.heads = None

    @property
    def uses_rollouts(self) -> bool:
        return self.args.amm_beta < 1.0

    @property
    def uses_off_policy(self) -> bool:
        return self.args.amm_beta > 0.0

    def part_weight(self, kind: str) -> float:
        return self.args.amm_beta if kind == "off" else 1.0 - self.args.amm_beta

    def loss_name(self, kind: str) -> str:
        return "amm_gap"

    def metric_names(self, kind: str) -> list[str]:
        return ["q_abs"]

    # -- the adversary
    def build_modules(self, student: nn.Module, teacher_hidden_size: int) -> nn.Module:
        head_args = self.args
        if self.shared_head:
            head_args = copy.copy(self.args)
            head_args.q_head_shared = True
        self.heads = build_q_heads(head_args, student, teacher_hidden_size)
        return self.heads

    def params(self, kind: str) -> list[Tensor]:
        return list(self.heads.head(kind).parameters())

    def param_groups(self, modules: nn.Module) -> list[dict]:
        """Own group: no weight decay, `learning_rate * q_head_lr_multiplier`, the student's schedule."""
        return [{"params": list(modules.parameters()), "weight_decay": 0.0,
                 "lr": self.args.learning_rate * self.args.q_head_lr_multiplier}]

    def q_values(self, tokens: Tokens, kind: str) -> Tensor:
        hidden = tokens.student_hidden if self.args.q_head_features == "student" else tokens.teacher_hidden
        return self.heads.head(kind).q_values(hidden.detach(), tokens.params, tokens.student_embedding)

    def token_loss(self, tokens: Tokens, kind: str):
        q = self.q_values(tokens, kind)
        # While the heads warm up only they learn: a near-zero adversary gives the student noise that Adam would
        # rescale into full-size steps.
        warming_up = tokens.step.step < self.args.q_head_warmup_steps
        z_s = tokens.student_logits.detach() if warming_up else tokens.student_logits
        return amm_adversarial_gap(z_s, tokens.teacher_logits, q), [q.detach().abs().mean(-1)]

    # -- the sequence-level score-function term
    def extra_loss(self, parts: dict[str, Part], ctx: LossContext) -> Tensor | None:
        if not self.args.amm_policy_gradient or "on" not in parts:
            return None
        return score_function_term(parts["on"], ctx, self.args)


def score_function_term(part: Part, ctx: LossContext, args) -> Tensor:
    """sum_t log p_S(y_t|s_t) * A_t with A_t from the future moment gaps (`score_function_advantages`); value 0,
    gradient only."""
    advantages = score_function_advantages(part.column(part.names[0]), part.valid, args.pg_length_normalization,
                                           args.pg_baseline, args.pg_clip)
    projection = ctx.projection

    def fn(h, y, a, *p):
        values = token_log_probs(projection.student_logits(h, list(p)), y) * a
        return values, values.detach()[:, None]

    token_inputs = [part.student_hidden[part.valid], part.completion_ids[part.valid], advantages]
    surrogate, _ = ctx.run(token_inputs, part.weights, fn, projection.student)
    ctx.add_metric("pg/advantage_abs", advantages.abs().sum(), advantages.numel())
    return surrogate - surrogate.detach()
