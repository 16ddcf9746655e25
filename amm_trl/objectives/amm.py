"""Adversarial moment matching (Jia, NeurIPS 2024): the student minimizes, and the Q-heads maximize, the action-value
moment gap <p_T - p_S, f> on student rollouts (weight 1 - `amm_beta`) and off-policy completions (`amm_beta`).

The adversary f is a Q-head (`amm_trl.qhead`) reading detached hidden states; both players descend one loss, arranged
with stop-gradients (`amm_adversarial_gap`), so one backward and one optimizer step update both.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..qhead import QHeads, build_q_heads, head_features
from .base import Data, Info, LossContext, Metrics, Objective, Part, Term, Tokens, invalid
from .functional import (as_dtype, compute_dtype, cross_entropy, kl, length_normalize, pair_log_probs, reward_to_go,
                         token_log_probs)

__all__ = ["informed_prior", "critic_values", "amm_moment_gap", "amm_adversarial_gap", "L2_WEIGHTS"]


def informed_prior(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""The informed critic's prior, a function of both models (detached: it is no player's parameter).

    .. math:: \pi(s, a) = \alpha \, \mathrm{sg}(\log p_T(a|s) - \log p_S(a|s))

    Its sign is the best response's, sign(p_T - p_S); c tanh(pi) is a soft version of the sup-critic c sign(.), and
    for small alpha the student's gradient under f = pi is alpha times the reverse-KL gradient. A token one model rules
    out (logit -inf, probability 0) counts as probability `tiny`, the dtype's smallest normal number: the prior stays
    finite (at most |log tiny| ~ 87 in float32, 708 in float64) and keeps its sign, instead of -inf or the dtype's
    most negative number.
    """
    log_ps, log_pt = pair_log_probs(student_logits.detach(), teacher_logits.detach())
    return log_ratio_prior(log_ps, log_pt, alpha)


def log_ratio_prior(log_ps: Tensor, log_pt: Tensor, alpha: float) -> Tensor:
    """alpha * (log p_T - log p_S) from log-probabilities, each floored at the dtype's `tiny`
    (:func:`informed_prior`)."""
    floor = math.log(torch.finfo(log_pt.dtype).tiny)
    return float(alpha) * (log_pt.detach().clamp_min(floor) - log_ps.detach().clamp_min(floor))


def critic_values(scores: Tensor, bound: float | None, prior: Tensor | None = None) -> Tensor:
    r"""The adversary f(s, .) from a Q-head's raw scores g(s, .), optionally around a prior (:func:`informed_prior`).

    .. math:: u = \pi + g, \qquad f = c \tanh(u) \ (\text{bound } c), \qquad f = u \ (\text{bound None})

    Without a prior this is the learned critic c tanh(g); with a zero-init head (g = 0) and a prior it is the informed
    critic c tanh(alpha log(p_T / p_S)), and g learns a residual. An unbounded critic (``bound=None``) needs the L2
    penalty of :func:`amm_adversarial_gap`.
    """
    if bound is not None and not bound > 0:
        raise ValueError(f"bound must be > 0 or None, got {bound}")
    u = as_dtype(scores, compute_dtype(scores))
    if prior is not None:
        if prior.shape != scores.shape:
            raise ValueError(f"prior {tuple(prior.shape)} must have the shape of scores {tuple(scores.shape)}")
        u = u + prior.detach()
    return u if bound is None else float(bound) * torch.tanh(u)


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
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    q = as_dtype(q_values, compute_dtype(q_values, log_ps))
    return ((log_pt.exp() - log_ps.exp()) * q).sum(-1)


L2_WEIGHTS = ("uniform", "student", "mixture")  # `q_head_l2_weight`: what the critic's L2 penalty weighs f^2 by


def amm_adversarial_gap(student_logits: Tensor, teacher_logits: Tensor, q_values: Tensor,
                        l2: float = 0.0, l2_weight: str = "uniform") -> Tensor:
    r"""The moment gap arranged for a single min-max backward (``L = D(theta, sg(phi)) - D(sg(theta), phi)``).

    .. math::
        s = \langle p_T - p_S, \mathrm{sg}(f) \rangle, \quad
        h = \langle \mathrm{sg}(p_T - p_S), f \rangle, \quad
        r = \tfrac{\lambda}{2} \textstyle\sum_a w(a) f(a)^2, \quad
        \text{returns } s - h + \mathrm{sg}(h) + r - \mathrm{sg}(r)

    The value equals :func:`amm_moment_gap`. Minimizing it makes the student *descend* the gap (its gradient
    is that of the gap) while the Q-head *ascends* the regularized gap :math:`h - r` (``l2`` = lambda). Its best
    response :math:`f^* = (p_T - p_S) / (\lambda w)` is an unbounded critic kept finite by the penalty instead of a
    tanh that saturates, and the regularized gap there is :math:`\sum_a (p_T - p_S)^2 / (2 \lambda w)`, a divergence
    chosen by the weight ``l2_weight`` (detached; teacher logits never receive a gradient):

    - ``uniform``: w = 1, the squared L2 distance / (2 lambda). It barely sees a mode of small mass.
    - ``student``: w = sg(p_S), Pearson's chi^2(p_T || p_S) / (2 lambda). At the best response the student's gradient
      on its logits is (p_T - p_S) / lambda at each state, forward KL's: mass-covering where the student visits.
    - ``mixture``: w = sg(p_T + p_S) / 2, the triangular discrimination / lambda; |f^*| <= 2 / lambda.
    """
    _check_q(student_logits, q_values)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if l2_weight not in L2_WEIGHTS:
        raise ValueError(f"l2_weight must be one of {L2_WEIGHTS}, got {l2_weight!r}")
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits.detach())
    q = as_dtype(q_values, compute_dtype(q_values, log_ps))
    p_s, p_t = log_ps.exp(), log_pt.exp()
    diff = p_t - p_s
    s = (diff * q.detach()).sum(-1)
    h = (diff.detach() * q).sum(-1)
    out = s - h + h.detach()
    if l2:
        weight = {"uniform": None, "student": p_s.detach(), "mixture": (p_t + p_s.detach()) / 2}[l2_weight]
        r = 0.5 * float(l2) * (q * q if weight is None else weight * q * q).sum(-1)
        out = out + r - r.detach()
    return out


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


AMM_PAPER = {"title": "Adversarial Moment-Matching Distillation of Large Language Models", "id": "2406.02959",
             "citation": "@inproceedings{jia2024adversarial,\n    title     = {{Adversarial Moment-Matching "
                         "Distillation of Large Language Models}},\n    author    = {Jia, Chen},\n    booktitle = "
                         "{Advances in Neural Information Processing Systems (NeurIPS)},\n    year      = 2024,\n}"}


class QCritic:
    """The adversary of AMM (and PbKD): the Q-heads, their optimizer group and their gradient clipping."""

    def __init__(self, args, shared: bool):
        self.args, self.shared, self.heads = args, shared, None

    def build(self, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> QHeads:
        head_args = copy.copy(self.args)
        head_args.q_head_shared = self.shared
        self.heads = build_q_heads(head_args, student, teacher_hidden_size, vocab_size)
        return self.heads

    def params(self, kind: str) -> dict[str, Tensor]:
        return dict(self.heads.head(kind).named_parameters())

    def param_groups(self) -> list[dict]:
        """Own group: no weight decay, `q_head_learning_rate` (else `learning_rate * q_head_lr_multiplier`), the
        student's schedule."""
        lr = self.args.q_head_learning_rate or self.args.learning_rate * self.args.q_head_lr_multiplier
        return [{"params": list(self.heads.parameters()), "weight_decay": 0.0, "lr": lr}]

    def clip(self, model: nn.Module, clip) -> Tensor:
        """`q_head_max_grad_norm`: the heads and the student clipped apart (a large head gradient would otherwise
        shrink the student's step); returns the student's pre-clip norm. DeepSpeed is refused by the config."""
        if self.args.q_head_max_grad_norm is None:
            return clip(model)
        heads = list(self.heads.parameters())
        head_ids = {id(p) for p in heads}
        torch.nn.utils.clip_grad_norm_(heads, self.args.q_head_max_grad_norm)
        student = [p for p in model.parameters() if id(p) not in head_ids]
        return torch.nn.utils.clip_grad_norm_(student, self.args.max_grad_norm)

    def values(self, kind: str, tokens: Tokens) -> Tensor:
        """The critic f on the teacher distribution's support: the head's scores, around the informed prior when
        `q_prior_alpha` > 0, bounded or not."""
        scores = tokens.teacher.coarsen(self._scores(kind, tokens), tokens.student_logits)  # top-k: k + 1 buckets
        prior = informed_prior(*tokens.pair(), self.args.q_prior_alpha) if self.args.q_prior_alpha else None
        return critic_values(scores, self.args.q_bound, prior)

    def taken_values(self, kind: str, tokens: Tokens) -> Tensor:
        """The critic's value of each taken token, f(s_t, y_t), (n,): the vocabulary's, also with a top-k teacher
        (whose log-prob of the taken token is known)."""
        scores = self._scores(kind, tokens).gather(-1, tokens.target_ids[:, None]).squeeze(-1)
        prior = None
        if self.args.q_prior_alpha:
            log_ps = token_log_probs(tokens.student_logits.detach(), tokens.target_ids)
            log_pt = as_dtype(tokens.teacher.log_prob(tokens.target_ids), log_ps.dtype)
            prior = log_ratio_prior(log_ps, log_pt, self.args.q_prior_alpha)
        return critic_values(scores, self.args.q_bound, prior)

    def _scores(self, kind: str, tokens: Tokens) -> Tensor:
        hidden = head_features(self.args.q_head_features, tokens.student_hidden, tokens.teacher_hidden)
        return self.heads.head(kind).scores(hidden, tokens.params, tokens.student_embedding)


class AMM(Objective):
    name = "amm"
    info = Info("Adversarial moment matching: on- and off-policy Q-head distances mixed by `amm_beta` (Jia, "
                "NeurIPS 2024).", paper=AMM_PAPER, off_policy_default="teacher",  # the paper's: teacher generations
                own_fields=("amm_policy_gradient",))
    shared_head = False  # one head for both data kinds regardless of `q_head_shared`
    gap_name = "amm_gap"

    def __init__(self, args):
        super().__init__(args)
        if args.q_bound is None and not args.q_head_l2 > 0:
            raise invalid("q_bound", None, "an unbounded critic needs q_head_l2 > 0 (the penalty keeps it finite), "
                          "or set a bound such as 1.0.")
        self.adversary = QCritic(args, shared=self.shared_head or args.q_head_shared)

    @property
    def data(self) -> Data:
        return Data(rollouts=self.args.amm_beta < 1.0, off_policy=self.args.amm_beta > 0.0)

    def terms(self) -> dict[str, list[Term]]:
        """The moment gap on each kind, weighted 1 - `amm_beta` (rollouts) and `amm_beta` (off-policy), plus the
        likelihood anchor on the off-policy completions with its own weight."""
        beta, critic = self.args.amm_beta, self.adversary
        terms = {kind: [Term(lambda t, kind=kind: self.gap(kind, t), self.gap_name, weight,
                             params=critic.params(kind))] for kind, weight in (("on", 1.0 - beta), ("off", beta))}
        if self.args.amm_anchor_weight > 0 and beta > 0:
            terms["off"].append(Term(self.anchor, "anchor", self.args.amm_anchor_weight))
        return terms

    def warming_up(self, step) -> bool:
        """During `q_head_warmup_steps` only the heads learn: a near-zero adversary gives the student noise that Adam
        would rescale into full-size steps. Every student-side term is masked then."""
        return step.step < self.args.q_head_warmup_steps

    def _student_logits(self, tokens: Tokens) -> Tensor:
        return tokens.student_logits.detach() if self.warming_up(tokens.step) else tokens.student_logits

    def gap(self, kind: str, tokens: Tokens) -> tuple[Tensor, dict[str, Tensor]]:
        """Per token: the adversarial moment gap (both players descend it, see `amm_adversarial_gap`)."""
        q = self.adversary.values(kind, tokens)
        z_s, z_t = tokens.teacher.pair(self._student_logits(tokens))
        gap = amm_adversarial_gap(z_s, z_t, q, self.args.q_head_l2, self.args.q_head_l2_weight)
        return gap, {"q_abs": q.detach().abs().mean(-1)}

    def anchor(self, tokens: Tokens) -> tuple[Tensor, dict[str, Tensor]]:
        """Likelihood anchor per off-policy token: KL(p_T || p_S) (`amm_anchor: fkl`) or -log p_S(y) (`ce`)."""
        z_s = self._student_logits(tokens)
        if self.args.amm_anchor == "ce":
            return cross_entropy(z_s, tokens.target_ids), {}
        log_ps, log_pt = pair_log_probs(*tokens.teacher.pair(z_s))
        return kl(log_pt.detach(), log_ps), {}

    def sequence_loss(self, parts: dict[str, Part], ctx: LossContext) -> tuple[Tensor, Metrics] | None:
        """The on-policy score-function term (`amm_policy_gradient`)."""
        if not self.args.amm_policy_gradient or "on" not in parts or self.warming_up(ctx.step):
            return None
        # it belongs to the rollouts' gap term, so it carries that term's weight
        return score_function_term(parts["on"], ctx, self.args, self.gap_name, weight=1.0 - self.args.amm_beta)


def score_function_term(part: Part, ctx: LossContext, args, gap_name: str, weight: float) -> tuple[Tensor, Metrics]:
    """weight * sum_t log p_S(y_t|s_t) * A_t with A_t from the future moment gaps (`score_function_advantages`);
    value 0, gradient only."""
    advantages = score_function_advantages(part.metrics[gap_name], part.valid, args.pg_length_normalization,
                                           args.pg_baseline, args.pg_clip)
    projection = ctx.projection

    def fn(chunk, params):
        values = token_log_probs(projection.logits("student", chunk["student_hidden"], params),
                                 chunk["target_ids"]) * chunk["advantages"]
        return values, {}

    token_inputs = {"student_hidden": part.student_hidden[part.valid], "target_ids": part.completion_ids[part.valid],
                    "advantages": advantages}
    surrogate, _ = ctx.chunked(token_inputs, part.weights * weight, fn, projection.student)
    return surrogate - surrogate.detach(), {"pg/advantage_abs": (advantages.abs().sum(), advantages.numel())}


OBJECTIVES = [AMM]
