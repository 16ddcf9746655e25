"""Adversarial moment matching (Jia, NeurIPS 2024): the student minimizes, and the Q-heads maximize, the action-value
moment gap <p_T - p_S, f> on student rollouts (weight 1 - `amm_beta`) and off-policy completions (`amm_beta`).

The adversary f is a Q-head (`amm_trl.qhead`) reading detached hidden states; both players descend one loss, arranged
with stop-gradients (`amm_adversarial_gap`), so one backward and one optimizer step update both.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (LossContext, Objective, Part, Tokens, _as, _compute_dtype, _kl, _pair_log_probs,
                   cross_entropy, length_normalize, reward_to_go, token_log_probs)

__all__ = ["informed_prior", "critic_values", "amm_moment_gap", "amm_adversarial_gap"]


def informed_prior(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    r"""The informed critic's prior, a function of both models (detached: it is no player's parameter).

    .. math:: \pi(s, a) = \alpha \, \mathrm{sg}(\log p_T(a|s) - \log p_S(a|s))

    Its sign is the best response's, sign(p_T - p_S); c tanh(pi) is a soft version of the sup-critic c sign(.), and
    for small alpha the student's gradient under f = pi is alpha times the reverse-KL gradient. A token one model rules
    out (logit -inf, probability 0) counts as probability `tiny`, the dtype's smallest normal number: the prior stays
    finite (at most |log tiny| ~ 87 in float32, 708 in float64) and keeps its sign, instead of -inf or the dtype's
    most negative number.
    """
    log_ps, log_pt = _pair_log_probs(student_logits.detach(), teacher_logits.detach())
    floor = math.log(torch.finfo(log_pt.dtype).tiny)
    return float(alpha) * (log_pt.clamp_min(floor) - log_ps.clamp_min(floor))


def critic_values(scores: Tensor, bound: float | None, prior: Tensor | None = None) -> Tensor:
    r"""The adversary f(s, .) from a Q-head's raw scores g(s, .), optionally around a prior (:func:`informed_prior`).

    .. math:: u = \pi + g, \qquad f = c \tanh(u) \ (\text{bound } c), \qquad f = u \ (\text{bound None})

    Without a prior this is the learned critic c tanh(g); with a zero-init head (g = 0) and a prior it is the informed
    critic c tanh(alpha log(p_T / p_S)), and g learns a residual. An unbounded critic (``bound=None``) needs the L2
    penalty of :func:`amm_adversarial_gap`.
    """
    if bound is not None and not bound > 0:
        raise ValueError(f"bound must be > 0 or None, got {bound}")
    u = _as(scores, _compute_dtype(scores))
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
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    q = _as(q_values, _compute_dtype(q_values, log_ps))
    return ((log_pt.exp() - log_ps.exp()) * q).sum(-1)


def amm_adversarial_gap(student_logits: Tensor, teacher_logits: Tensor, q_values: Tensor,
                        l2: float = 0.0) -> Tensor:
    r"""The moment gap arranged for a single min-max backward (``L = D(theta, sg(phi)) - D(sg(theta), phi)``).

    .. math::
        s = \langle p_T - p_S, \mathrm{sg}(f) \rangle, \quad
        h = \langle \mathrm{sg}(p_T - p_S), f \rangle, \quad
        r = \tfrac{\lambda}{2} \textstyle\sum_a f(a)^2, \quad
        \text{returns } s - h + \mathrm{sg}(h) + r - \mathrm{sg}(r)

    The value equals :func:`amm_moment_gap`. Minimizing it makes the student *descend* the gap (its gradient
    is that of the gap) while the Q-head *ascends* the regularized gap :math:`h - r` (``l2`` = lambda; its best
    response is :math:`f^* = (p_T - p_S)/\lambda`, an unbounded critic kept finite by the penalty instead of a tanh
    that saturates). Teacher logits never receive a gradient.
    """
    _check_q(student_logits, q_values)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits.detach())
    q = _as(q_values, _compute_dtype(q_values, log_ps))
    diff = log_pt.exp() - log_ps.exp()
    s = (diff * q.detach()).sum(-1)
    h = (diff.detach() * q).sum(-1)
    out = s - h + h.detach()
    if l2:
        r = 0.5 * float(l2) * (q * q).sum(-1)
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


# ----------------------------------------------------------------------------------------------------------
# the critic's learned part: Q-heads g_phi(s, .) in R^V (raw scores; `critic_values` makes them the critic f)
# ----------------------------------------------------------------------------------------------------------
# A head reads detached hidden states (so it cannot shape the student's features) and returns one value per
# vocabulary entry, which makes E_{a~p}[f(s, a)] = <p, f(s, .)> exact for a white-box teacher. Heads are never called
# through `nn.Module.__call__` during the loss: the loss reads their parameters directly inside the vocabulary-chunked
# autograd function (`chunked.py`), which gathers them under ZeRO-3 like TRL gathers `lm_head`.
class LinearQHead(nn.Module):
    """g(s, .) = W h + b, W: (vocab, features). Zero-initialized, so the learned part of the critic starts at 0."""

    def __init__(self, features: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, features))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def zero_output_(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def scores(self, h: torch.Tensor, params: list[torch.Tensor], output_embedding: torch.Tensor) -> torch.Tensor:
        weight, bias = params
        return F.linear(h.to(weight.dtype), weight, bias).float()


class LowRankQHead(nn.Module):
    """g(s, .) = E m(h), E = the detached student output embedding (vocab, hidden), m a two-layer MLP
    features -> hidden -> hidden. The last layer is zero-initialized, so g starts at 0. Costs ~2 hidden^2."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.zero_output_()

    def zero_output_(self) -> None:
        """f starts at 0. Under `deepspeed.zero.Init` the caller must gather the parameters first: `nn.Linear` is
        partitioned as soon as it is built, so zeroing it in `__init__` writes into empty shards."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def scores(self, h: torch.Tensor, params: list[torch.Tensor], output_embedding: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = params
        m = F.linear(F.gelu(F.linear(h.to(w1.dtype), w1, b1)), w2, b2)
        return F.linear(m.to(output_embedding.dtype), output_embedding.detach()).float()


class QHeads(nn.Module):
    """The adversary: `on` and `off` heads (or one shared head, registered once and used for both)."""

    def __init__(self, head_type: str, features: int, vocab_size: int, hidden: int, shared: bool):
        super().__init__()

        def make():
            if head_type == "linear":
                return LinearQHead(features, vocab_size)
            return LowRankQHead(features, hidden)

        self.on = make()
        self.off = self.on if shared else make()

    def head(self, kind: str) -> nn.Module:
        return self.on if kind == "on" else self.off


def build_q_heads(args, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> QHeads:
    """Builds the heads like the student was built: partitioned under `deepspeed.zero.Init` when the student's own
    parameters are (ZeRO-3 with `zero3_init_flag`), else as plain modules in the student's dtype and device.

    A head created outside zero.Init next to a zero.Init student keeps its own dtype, and DeepSpeed's stage-3
    optimizer then refuses the mixed dtypes. zero.Init takes its dtype from the DeepSpeed config (as transformers'
    `from_pretrained` does): an explicit `dtype=` is ignored on accelerators without fp16 (DeepSpeed 0.19.8,
    `Init._set_dtype` operator precedence), so we check the outcome instead.

    `vocab_size` is the vocabulary the loss compares (the shared tokenizer rows), not the student's embedding rows,
    which may be padded (Qwen2.5: 151936 rows for 151665 tokens).
    """
    text_config = student.config.get_text_config()
    student_hidden = text_config.hidden_size
    features = student_hidden if args.q_head_features == "student" else teacher_hidden_size
    param = next(p for p in student.parameters() if p.is_floating_point())

    def make():
        return QHeads(args.q_head_type, features, vocab_size, student_hidden, args.q_head_shared)

    if not hasattr(param, "ds_id"):
        return make().to(device=param.device, dtype=param.dtype)
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        heads = make()
    for head in dict.fromkeys((heads.on, heads.off)):  # a shared head once
        with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0):
            head.zero_output_()
    head_dtype = next(heads.parameters()).dtype
    if head_dtype != param.dtype:
        raise ValueError(
            f"The student was loaded partitioned in {param.dtype} but the DeepSpeed config builds parameters in "
            f"{head_dtype}; ZeRO-3 needs one dtype. Set the student dtype (recipe `dtype:` / "
            f"`model_init_kwargs.dtype`) to match the bf16/fp16 setting."
        )
    return heads


class AMM(Objective):
    name = "amm"
    description = ("Adversarial moment matching: on- and off-policy Q-head distances mixed by `amm_beta` (Jia, "
                   "NeurIPS 2024).")
    own_fields = ("amm_policy_gradient",)
    needs_q_heads = True
    default_off_policy_source = "teacher"  # the paper's off-policy data are teacher generations
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
        return ["q_abs"] + (["anchor"] if self._anchored(kind) else [])

    def _anchored(self, kind: str) -> bool:
        return kind == "off" and self.args.amm_anchor_weight > 0 and self.args.amm_beta > 0

    def validate(self, fail) -> None:
        args = self.args
        if args.q_bound is None and not args.q_head_l2 > 0:
            fail("q_bound", None, "an unbounded critic needs q_head_l2 > 0 (the penalty keeps it finite), or set a "
                 "bound such as 1.0.")

    # -- the adversary
    def build_modules(self, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> nn.Module:
        head_args = self.args
        if self.shared_head:
            head_args = copy.copy(self.args)
            head_args.q_head_shared = True
        self.heads = build_q_heads(head_args, student, teacher_hidden_size, vocab_size)
        return self.heads

    def params(self, kind: str) -> list[Tensor]:
        return list(self.heads.head(kind).parameters())

    def param_groups(self, modules: nn.Module) -> list[dict]:
        """Own group: no weight decay, `q_head_learning_rate` (else `learning_rate * q_head_lr_multiplier`), the
        student's schedule."""
        lr = self.args.q_head_learning_rate or self.args.learning_rate * self.args.q_head_lr_multiplier
        return [{"params": list(modules.parameters()), "weight_decay": 0.0, "lr": lr}]

    def q_values(self, tokens: Tokens, kind: str) -> Tensor:
        """The critic f: the head's scores, around the informed prior when `q_prior_alpha` > 0, bounded or not."""
        hidden = tokens.student_hidden if self.args.q_head_features == "student" else tokens.teacher_hidden
        scores = self.heads.head(kind).scores(hidden.detach(), tokens.params, tokens.student_embedding)
        prior = (informed_prior(tokens.student_logits, tokens.teacher_logits, self.args.q_prior_alpha)
                 if self.args.q_prior_alpha else None)
        return critic_values(scores, self.args.q_bound, prior)

    def warming_up(self, step) -> bool:
        """During `q_head_warmup_steps` only the heads learn: a near-zero adversary gives the student noise that Adam
        would rescale into full-size steps. Every student-side term is masked then."""
        return step.step < self.args.q_head_warmup_steps

    def token_loss(self, tokens: Tokens, kind: str):
        q = self.q_values(tokens, kind)
        z_s = tokens.student_logits.detach() if self.warming_up(tokens.step) else tokens.student_logits
        values = amm_adversarial_gap(z_s, tokens.teacher_logits, q, self.args.q_head_l2)
        extra = [q.detach().abs().mean(-1)]
        if self._anchored(kind):
            anchor = self._anchor(z_s, tokens)
            # the part's tokens are weighted by amm_beta: divide it out, so the anchor's weight is its own
            values = values + self.args.amm_anchor_weight / self.args.amm_beta * anchor
            extra.append(anchor.detach())
        return values, extra

    def _anchor(self, student_logits: Tensor, tokens: Tokens) -> Tensor:
        """Likelihood anchor per off-policy token: KL(p_T || p_S) (`amm_anchor: fkl`) or -log p_S(y) (`ce`)."""
        if self.args.amm_anchor == "ce":
            return cross_entropy(student_logits, tokens.target_ids)
        log_ps, log_pt = _pair_log_probs(student_logits, tokens.teacher_logits.detach())
        return _kl(log_pt, log_ps)

    def clip_gradients(self, model: nn.Module, clip) -> Tensor:
        """`q_head_max_grad_norm`: the heads and the student clipped apart (a large head gradient would otherwise
        shrink the student's step); returns the student's pre-clip norm. DeepSpeed is refused by the config."""
        if self.args.q_head_max_grad_norm is None:
            return clip(model)
        heads = list(self.heads.parameters())
        head_ids = {id(p) for p in heads}
        torch.nn.utils.clip_grad_norm_(heads, self.args.q_head_max_grad_norm)
        student = [p for p in model.parameters() if id(p) not in head_ids]
        return torch.nn.utils.clip_grad_norm_(student, self.args.max_grad_norm)

    # -- the sequence-level score-function term
    def extra_loss(self, parts: dict[str, Part], ctx: LossContext) -> Tensor | None:
        if not self.args.amm_policy_gradient or "on" not in parts or self.warming_up(ctx.step):
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
