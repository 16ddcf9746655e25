"""Per-token divergence objectives: SFT, SeqKD, word-level KD (FKL), RKL, TVD, GKD, ImitKD, and TRL's own JSD.

Each loss is an exact divergence of the two next-token distributions at every response position of its data.
"""

from __future__ import annotations

from torch import Tensor

from .base import Data, Info, Objective, Term, invalid
from .batch import Plan, Step
from .functional import (check_unit, cross_entropy, kl, log_mixture, pair_log_probs, step_draw,
                         total_variation)

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"]

GKD_PAPER = {  # as TRL's DistillationTrainer cites it
    "title": "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", "id": "2306.13649",
    "citation": "@inproceedings{agarwal2024on-policy,\n    title        = {{On-Policy Distillation of Language "
                "Models: Learning from Self-Generated Mistakes}},\n    author       = {Rishabh Agarwal and Nino "
                "Vieillard and Yongchao Zhou and Piotr Stanczyk and Sabela Ramos Garea and Matthieu Geist and "
                "Olivier Bachem},\n    "
                "year         = 2024,\n    booktitle    = {The Twelfth International Conference on Learning "
                "Representations, {ICLR} 2024, Vienna, Austria, May 7-11, 2024},\n    publisher    = {OpenReview.net},"
                "\n    url          = {https://openreview.net/forum?id=3zKtaqxLhW},\n}"}


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Forward KL (word-level KD, GKD beta=0).

    .. math:: \mathrm{KL}(p_T \| p_S) = \sum_a p_T(a) \, (\log p_T(a) - \log p_S(a))
    """
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    return kl(log_pt, log_ps)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Reverse KL (mode seeking, GKD beta=1, MiniLLM's per-step term).

    .. math:: \mathrm{KL}(p_S \| p_T) = \sum_a p_S(a) \, (\log p_S(a) - \log p_T(a))
    """
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    return kl(log_ps, log_pt)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    r"""Generalized Jensen-Shannon divergence (GKD, TRL convention).

    .. math::
        m = \beta p_T + (1-\beta) p_S, \qquad
        \mathrm{JSD}_\beta = \beta \, \mathrm{KL}(p_T \| m) + (1-\beta) \, \mathrm{KL}(p_S \| m)

    The endpoints are special-cased as in TRL: ``beta == 0`` returns ``KL(p_T || p_S)`` (forward KL) and
    ``beta == 1`` returns ``KL(p_S || p_T)`` (reverse KL); the formula itself would be 0 there.
    For small beta, ``JSD_beta / beta -> KL(p_T || p_S)``; for beta near 1, ``JSD_beta / (1-beta) -> KL(p_S || p_T)``.
    """
    check_unit("beta", beta)
    beta = float(beta)
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    if beta == 0.0:
        return kl(log_pt, log_ps)
    if beta == 1.0:
        return kl(log_ps, log_pt)
    log_m = log_mixture(log_pt, log_ps, beta)
    return beta * kl(log_pt, log_m) + (1.0 - beta) * kl(log_ps, log_m)


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""Skew forward KL (DistiLLM's SKL, typically alpha = 0.1); alpha = 0 is the forward KL.

    .. math:: \mathrm{SKL}_\alpha = \mathrm{KL}(p_T \| \alpha p_T + (1-\alpha) p_S)
    """
    check_unit("alpha", alpha)
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    return kl(log_pt, log_mixture(log_pt, log_ps, float(alpha)))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""Skew reverse KL (DistiLLM's SRKL, typically alpha = 0.1); alpha = 0 is the reverse KL.

    .. math:: \mathrm{SRKL}_\alpha = \mathrm{KL}(p_S \| (1-\alpha) p_T + \alpha p_S)
    """
    check_unit("alpha", alpha)
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    return kl(log_ps, log_mixture(log_ps, log_pt, float(alpha)))


def _one_kind(kind: str, name: str, loss) -> dict[str, list[Term]]:
    return {kind: [Term(lambda tokens: (loss(tokens), {}), name)]}


class SFT(Objective):
    name = "sft"
    info = Info("Cross-entropy on the off-policy completions (dataset references).", reads_teacher=False)
    data = Data(rollouts=False, off_policy=True)

    def terms(self) -> dict[str, list[Term]]:
        return _one_kind("off", "ce", lambda t: cross_entropy(t.student_logits, t.target_ids))


class SeqKD(SFT):
    name = "seqkd"
    info = Info("Sequence-level KD: cross-entropy on teacher-generated completions (`off_policy_source: teacher`, "
                "or a dataset written by `amm-trl generate`).", reads_teacher=False)


class FKL(Objective):
    name = "fkl"
    info = Info("Word-level KD: forward KL(p_T || p_S) on the off-policy completions.")
    data = Data(rollouts=False, off_policy=True)

    def terms(self) -> dict[str, list[Term]]:
        return _one_kind("off", self.name, lambda t: forward_kl(*t.pair()))


class RKL(Objective):
    name = "rkl"
    info = Info("Reverse KL(p_S || p_T) on student rollouts.")
    data = Data(rollouts=True, off_policy=False)

    def terms(self) -> dict[str, list[Term]]:
        return _one_kind("on", self.name, lambda t: reverse_kl(*t.pair()))


class TVD(RKL):
    name = "tvd"
    info = Info("Total variation 0.5*sum|p_T - p_S| on student rollouts.")

    def terms(self) -> dict[str, list[Term]]:
        return _one_kind("on", self.name, lambda t: total_variation(*t.pair()))


class JSD(RKL):
    name = "jsd"
    info = Info("TRL's own on-policy generalized JSD(`beta`) loss, unchanged (the reference trainer's objective).",
                paper=GKD_PAPER, trl_loss=True)

    def __init__(self, args):
        super().__init__(args)
        if args.vllm_importance_sampling_correction:
            raise invalid("vllm_importance_sampling_correction", True, "objective 'jsd' runs TRL's loss, which takes "
                          "no token weights: use 'gkd' with lmbda 1.0 (the same loss) or set it to false.")

    def terms(self) -> dict[str, list[Term]]:
        return {}  # TRL's `DistillationTrainer._compute_loss`


class GKD(Objective):
    """Each optimizer step is student rollouts with probability `lmbda`, else off-policy data."""

    name = "gkd"
    info = Info("Generalized JSD(`beta`) on student rollouts with probability `lmbda`, else on off-policy "
                "completions.", paper=GKD_PAPER)

    @property
    def data(self) -> Data:
        return Data(rollouts=self.args.lmbda > 0.0, off_policy=self.args.lmbda < 1.0)

    def plan(self, n: int, step: Step) -> Plan:
        on = step_draw(self.args.seed, step.step) < self.args.lmbda
        return Plan(rollouts=on, off_policy=not on)

    def terms(self) -> dict[str, list[Term]]:
        term = Term(lambda t: (generalized_jsd(*t.pair(), self.args.beta), {}), self.name)
        return {"on": [term], "off": [term]}


class ImitKD(GKD):
    name = "imitkd"
    info = Info("Forward KL on student rollouts with probability `lmbda`, else on off-policy completions.")

    def terms(self) -> dict[str, list[Term]]:
        term = Term(lambda t: (forward_kl(*t.pair()), {}), self.name)
        return {"on": [term], "off": [term]}


OBJECTIVES = [SFT, SeqKD, FKL, RKL, TVD, JSD, GKD, ImitKD]
