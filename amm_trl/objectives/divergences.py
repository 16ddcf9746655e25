"""Per-token divergence objectives: SFT, SeqKD, word-level KD (FKL), RKL, TVD, GKD, ImitKD, and TRL's own JSD.

Each loss is an exact divergence of the two next-token distributions at every response position of its data.
"""

from __future__ import annotations

from torch import Tensor

from .base import (Objective, Schedule, Tokens, _check_unit, _kl, _log_mixture, _pair_log_probs, cross_entropy,
                   step_draw, total_variation)

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"]


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Forward KL (word-level KD, GKD beta=0).

    .. math:: \mathrm{KL}(p_T \| p_S) = \sum_a p_T(a) \, (\log p_T(a) - \log p_S(a))
    """
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    return _kl(log_pt, log_ps)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Reverse KL (mode seeking, GKD beta=1, MiniLLM's per-step term).

    .. math:: \mathrm{KL}(p_S \| p_T) = \sum_a p_S(a) \, (\log p_S(a) - \log p_T(a))
    """
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    return _kl(log_ps, log_pt)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    r"""Generalized Jensen-Shannon divergence (GKD, TRL convention).

    .. math::
        m = \beta p_T + (1-\beta) p_S, \qquad
        \mathrm{JSD}_\beta = \beta \, \mathrm{KL}(p_T \| m) + (1-\beta) \, \mathrm{KL}(p_S \| m)

    The endpoints are special-cased as in TRL: ``beta == 0`` returns ``KL(p_T || p_S)`` (forward KL) and
    ``beta == 1`` returns ``KL(p_S || p_T)`` (reverse KL); the formula itself would be 0 there.
    For small beta, ``JSD_beta / beta -> KL(p_T || p_S)``; for beta near 1, ``JSD_beta / (1-beta) -> KL(p_S || p_T)``.
    """
    _check_unit("beta", beta)
    beta = float(beta)
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    if beta == 0.0:
        return _kl(log_pt, log_ps)
    if beta == 1.0:
        return _kl(log_ps, log_pt)
    log_m = _log_mixture(log_pt, log_ps, beta)
    return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""Skew forward KL (DistiLLM's SKL, typically alpha = 0.1); alpha = 0 is the forward KL.

    .. math:: \mathrm{SKL}_\alpha = \mathrm{KL}(p_T \| \alpha p_T + (1-\alpha) p_S)
    """
    _check_unit("alpha", alpha)
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    return _kl(log_pt, _log_mixture(log_pt, log_ps, float(alpha)))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""Skew reverse KL (DistiLLM's SRKL, typically alpha = 0.1); alpha = 0 is the reverse KL.

    .. math:: \mathrm{SRKL}_\alpha = \mathrm{KL}(p_S \| (1-\alpha) p_T + \alpha p_S)
    """
    _check_unit("alpha", alpha)
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    return _kl(log_ps, _log_mixture(log_ps, log_pt, float(alpha)))


class SFT(Objective):
    name = "sft"
    description = "Cross-entropy on the off-policy completions (dataset references)."
    needs_teacher = False

    @property
    def uses_off_policy(self) -> bool:
        return True

    def loss_name(self, kind: str) -> str:
        return "ce"

    def token_loss(self, tokens: Tokens, kind: str):
        return cross_entropy(tokens.student_logits, tokens.target_ids), []


class SeqKD(SFT):
    name = "seqkd"
    description = ("Sequence-level KD: cross-entropy on teacher-generated completions (`off_policy_source: teacher`, "
                   "or a dataset written by `amm-trl generate`).")


class _OffPolicyDivergence(Objective):
    """A divergence on the off-policy completions."""

    @property
    def uses_off_policy(self) -> bool:
        return True


class _OnPolicyDivergence(Objective):
    """A divergence on the student rollouts."""

    @property
    def uses_rollouts(self) -> bool:
        return True


class FKL(_OffPolicyDivergence):
    name = "fkl"
    description = "Word-level KD: forward KL(p_T || p_S) on the off-policy completions."

    def token_loss(self, tokens: Tokens, kind: str):
        return forward_kl(tokens.student_logits, tokens.teacher_logits), []


class RKL(_OnPolicyDivergence):
    name = "rkl"
    description = "Reverse KL(p_S || p_T) on student rollouts."

    def token_loss(self, tokens: Tokens, kind: str):
        return reverse_kl(tokens.student_logits, tokens.teacher_logits), []


class TVD(_OnPolicyDivergence):
    name = "tvd"
    description = "Total variation 0.5*sum|p_T - p_S| on student rollouts."

    def token_loss(self, tokens: Tokens, kind: str):
        return total_variation(tokens.student_logits, tokens.teacher_logits), []


class JSD(_OnPolicyDivergence):
    name = "jsd"
    description = "TRL's own on-policy generalized JSD(`beta`) loss, unchanged (the reference trainer's objective)."
    uses_trl_loss = True

    def validate(self, fail):
        if self.args.vllm_importance_sampling_correction:
            fail("vllm_importance_sampling_correction", True, "objective 'jsd' runs TRL's loss, which takes no "
                 "token weights: use 'gkd' with lmbda 1.0 (the same loss) or set it to false.")


class _Mixed(Objective):
    """GKD's data schedule: each optimizer step is student rollouts with probability `lmbda`, else off-policy data."""

    @property
    def uses_rollouts(self) -> bool:
        return self.args.lmbda > 0.0

    @property
    def uses_off_policy(self) -> bool:
        return self.args.lmbda < 1.0

    def schedule(self, n, step):
        on = step_draw(self.args.seed, step.step) < self.args.lmbda
        return Schedule(on, not on)


class GKD(_Mixed):
    name = "gkd"
    description = ("Generalized JSD(`beta`) on student rollouts with probability `lmbda`, else on off-policy "
                   "completions.")

    def token_loss(self, tokens: Tokens, kind: str):
        return generalized_jsd(tokens.student_logits, tokens.teacher_logits, self.args.beta), []


class ImitKD(_Mixed):
    name = "imitkd"
    description = "Forward KL on student rollouts with probability `lmbda`, else on off-policy completions."

    def token_loss(self, tokens: Tokens, kind: str):
        return forward_kl(tokens.student_logits, tokens.teacher_logits), []
