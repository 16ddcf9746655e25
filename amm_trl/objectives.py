"""Pure loss functions for distillation: divergences, the AMM moment gap, and policy-gradient pieces.

Formulas follow docs/algorithms.md. This module depends on torch only (no trainer, trl or transformers).

Conventions
-----------
* ``student_logits``, ``teacher_logits``, ``q_values`` have shape ``(n, V)`` (any leading shape ``(..., V)``
  works): already restricted to the valid (response) tokens and already divided by the temperature.
  Per-token functions return shape ``(n,)``; the caller reduces (sum / number of loss tokens, as TRL does).
* ``p_S = softmax(student_logits)``, ``p_T = softmax(teacher_logits)``; all log-probabilities come from
  ``log_softmax`` and all mixtures are formed in log space with ``logsumexp``.
* Half-precision inputs (fp16 / bf16) are upcast to float32; float32 and float64 are kept as they are
  (mixed inputs are promoted to the wider type). Nothing is ever downcast.
* Sequence-level (policy-gradient) functions take ``(B, T)`` tensors with a ``(B, T)`` 0/1 ``mask``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_log_probs",
    "cross_entropy",
    "bounded_q",
    "amm_moment_gap",
    "amm_adversarial_gap",
    "reward_to_go",
    "length_normalize",
    "whiten",
    "ppo_clipped_loss",
    "teacher_mix_weights",
    "bradley_terry_loss",
    "VLLM_IS_MODES",
    "vllm_importance_weights",
]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of the inputs, at least float32 (never a downcast)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _pair_log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log p_S, log p_T) over the last dim, in the common compute dtype."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_ps = torch.log_softmax(_as(student_logits, dtype), dim=-1)
    log_pt = torch.log_softmax(_as(teacher_logits, dtype), dim=-1)
    return log_ps, log_pt


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_a p (log p - log q) from log-probabilities, over the last dim.

    Terms with p(a) = 0 (log p = -inf, e.g. masked vocabulary entries) contribute exactly 0, without NaN in
    the value or the gradient.
    """
    p = log_p.exp()
    diff = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p - log_q)
    return (p * diff).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w p + (1 - w) q), computed with logaddexp; exact at w = 0 and w = 1, NaN-free where p = q = 0."""
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    # where both are -inf (masked vocabulary) logaddexp's gradient is NaN: compute on zeros there instead
    both = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = torch.zeros_like(log_p)
    mixed = torch.logaddexp(
        torch.where(both, zero, log_p) + math.log(w), torch.where(both, zero, log_q) + math.log1p(-w)
    )
    return torch.where(both, torch.full_like(mixed, -math.inf), mixed)


def _check_unit(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------------------
# per-token divergences, shape (n, V) -> (n,)
# ----------------------------------------------------------------------------------------------------------
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


def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Total variation distance, in [0, 1] and symmetric.

    .. math:: \mathrm{TV}(p_T, p_S) = \tfrac12 \sum_a |p_T(a) - p_S(a)|
    """
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)


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


# ----------------------------------------------------------------------------------------------------------
# token log-probs / SFT
# ----------------------------------------------------------------------------------------------------------
def token_log_probs(logits: Tensor, target_ids: Tensor) -> Tensor:
    r"""Log-probability of the target token, shape ``logits.shape[:-1]``.

    .. math:: \log \mathrm{softmax}(z)_y = z_y - \operatorname{logsumexp}_a z_a

    (computed as gather minus logsumexp, so no (n, V) log-softmax copy is kept).
    """
    if target_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"target_ids shape {tuple(target_ids.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
    z = _as(logits, _compute_dtype(logits))
    picked = z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def cross_entropy(student_logits: Tensor, target_ids: Tensor) -> Tensor:
    r"""Per-token cross-entropy (SFT / SeqKD).

    .. math:: \mathrm{CE} = -\log p_S(y)
    """
    return -token_log_probs(student_logits, target_ids)


# ----------------------------------------------------------------------------------------------------------
# AMM: adversarial action-value moment matching
# ----------------------------------------------------------------------------------------------------------
def bounded_q(raw: Tensor, bound: float) -> Tensor:
    r"""Bounded Q-head output (the adversary's function class |f| <= c).

    .. math:: f = c \tanh(\text{raw})
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    return float(bound) * torch.tanh(_as(raw, _compute_dtype(raw)))


def amm_moment_gap(student_logits: Tensor, teacher_logits: Tensor, q_values: Tensor) -> Tensor:
    r"""Per-state action-value moment gap; gradients flow to all three inputs.

    .. math:: h(s) = \sum_a (p_T(a|s) - p_S(a|s)) \, f(s, a) = \langle p_T - p_S, f \rangle

    With f = c sign(p_T - p_S) it equals 2c TV(p_T, p_S), the sup over |f| <= c.
    """
    if q_values.shape != student_logits.shape:
        raise ValueError(
            f"q_values {tuple(q_values.shape)} must have the shape of student_logits {tuple(student_logits.shape)}"
        )
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
    if q_values.shape != student_logits.shape:
        raise ValueError(
            f"q_values {tuple(q_values.shape)} must have the shape of student_logits {tuple(student_logits.shape)}"
        )
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits.detach())
    q = _as(q_values, _compute_dtype(q_values, log_ps))
    diff = log_pt.exp() - log_ps.exp()
    s = (diff * q.detach()).sum(-1)
    h = (diff.detach() * q).sum(-1)
    return s - h + h.detach()


# ----------------------------------------------------------------------------------------------------------
# policy-gradient pieces, (B, T) tensors with a (B, T) 0/1 mask
# ----------------------------------------------------------------------------------------------------------
def _check_seq(name: str, x: Tensor, mask: Tensor) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{name} {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0, include_current: bool = True) -> Tensor:
    r"""Discounted return of each position over the valid tokens; 0 at masked positions.

    .. math::
        G_t = \sum_{k \ge t} \gamma^{k-t} m_k r_k \quad (\text{include\_current}), \qquad
        G_t = \sum_{k > t} \gamma^{k-t-1} m_k r_k \quad (\text{otherwise})

    (MiniLLM's return uses the future only, ``include_current=False``, with gamma = 0.95.)
    """
    _check_seq("rewards", rewards, mask)
    _check_unit("gamma", gamma)
    dtype = _compute_dtype(rewards)
    m = _as(mask, dtype)
    r = _as(rewards, dtype) * m
    T = r.shape[-1]
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])  # return from position t+1 on (discounted to t+1)
    for t in range(T - 1, -1, -1):
        if include_current:
            running = r[..., t] + gamma * running
            out[..., t] = running
        else:
            out[..., t] = running
            running = r[..., t] + gamma * running
    return out * m


def length_normalize(returns: Tensor, mask: Tensor, include_current: bool = True) -> Tensor:
    r"""Divide each return by the number of valid tokens it sums over (MiniLLM's length normalization).

    .. math::
        \tilde G_t = G_t / \max(1, N_t), \qquad
        N_t = \sum_{k \ge t} m_k \ (\text{include\_current}) \ \text{ or } \ \sum_{k > t} m_k

    Masked positions are 0.
    """
    _check_seq("returns", returns, mask)
    dtype = _compute_dtype(returns)
    m = _as(mask, dtype)
    counts = m.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= t} m_k
    if not include_current:
        counts = counts - m
    return _as(returns, dtype) / counts.clamp(min=1.0) * m


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    r"""Masked whitening (mean / std over the valid entries of the whole tensor), as TRL's ``masked_whiten``.

    .. math:: \hat v = (v - \mu) / \sqrt{\sigma^2 + \epsilon} \; (+\mu \text{ if not shift\_mean})

    mu and sigma^2 (unbiased, Bessel-corrected) are taken over entries with mask = 1; masked entries return 0.
    """
    _check_seq("values", values, mask)
    dtype = _compute_dtype(values)
    m = _as(mask, dtype)
    v = _as(values, dtype)
    n = m.sum()
    if n.item() < 1:
        raise ValueError("whiten needs at least one valid (mask = 1) entry")
    mean = (v * m).sum() / n
    centered = (v - mean) * m
    var = (centered**2).sum() / (n - 1).clamp(min=1.0)
    out = (v - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_clipped_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    r"""PPO clipped surrogate, per token (to be masked and reduced by the caller).

    .. math::
        \rho = \exp(\log\pi - \log\pi_{old}), \qquad
        \ell = -\min(\rho A, \operatorname{clip}(\rho, 1-\epsilon, 1+\epsilon) A)

    Returns ``(loss, clipped)``; ``clipped`` is a bool tensor, True where the clipped branch is selected and
    differs from the unclipped one (so the token gets no gradient).
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if not (logp.shape == old_logp.shape == advantages.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    dtype = _compute_dtype(logp, old_logp, advantages)
    ratio = torch.exp(_as(logp, dtype) - _as(old_logp, dtype))
    adv = _as(advantages, dtype)
    unclipped = -ratio * adv
    clipped_loss = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


def teacher_mix_weights(student_token_logp: Tensor, teacher_token_logp: Tensor, mix: float = 0.2) -> Tensor:
    r"""Importance weight of tokens sampled from the teacher-student mixture (MiniLLM), in log space.

    .. math:: w = \frac{p_S(y)}{\lambda p_T(y) + (1-\lambda) p_S(y)}, \quad \lambda = \text{mix}

    Takes per-token log-probs of the sampled tokens. Gradients flow through the inputs; detach them if the
    weight is meant as a constant (as in MiniLLM).
    """
    _check_unit("mix", mix)
    if student_token_logp.shape != teacher_token_logp.shape:
        raise ValueError(
            f"student_token_logp {tuple(student_token_logp.shape)} and teacher_token_logp "
            f"{tuple(teacher_token_logp.shape)} must have the same shape"
        )
    dtype = _compute_dtype(student_token_logp, teacher_token_logp)
    ls = _as(student_token_logp, dtype)
    lt = _as(teacher_token_logp, dtype)
    return torch.exp(ls - _log_mixture(lt, ls, float(mix)))


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    r"""Bradley-Terry preference loss per pair (PbKD reward model: teacher response preferred).

    .. math:: \ell = -\log \sigma(r_c - r_r)
    """
    if reward_chosen.shape != reward_rejected.shape:
        raise ValueError(
            f"reward_chosen {tuple(reward_chosen.shape)} and reward_rejected {tuple(reward_rejected.shape)} "
            "must have the same shape"
        )
    dtype = _compute_dtype(reward_chosen, reward_rejected)
    return -F.logsigmoid(_as(reward_chosen, dtype) - _as(reward_rejected, dtype))


# ----------------------------------------------------------------------------------------------------------
# sampler / trainer mismatch (vLLM rollouts)
# ----------------------------------------------------------------------------------------------------------
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def vllm_importance_weights(
    logp_trainer: Tensor,
    logp_sampler: Tensor,
    mask: Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> Tensor:
    r"""Per-token importance weights that correct for the sampler (vLLM) / trainer log-prob mismatch, as TRL's GRPO
    ``vllm_importance_sampling_*`` options. ``(B, T)`` inputs: log-probs of the sampled tokens, 0/1 ``mask``.

    .. math::
        d_t = m_t (\log \pi_{train}(y_t) - \log \pi_{vLLM}(y_t)) \quad (0 \text{ where the sampler's is NaN}),
        \qquad r_t = e^{d_t} \ (\texttt{token\_*}), \qquad r_t = e^{\sum_k d_k} \ (\texttt{sequence\_*})

    ``*_truncate``: :math:`w_t = \operatorname{clip}(r_t, C_{min}, C_{max})`;
    ``*_mask``: :math:`w_t = r_t \, [C_{min} \le r_t \le C_{max}]` (a missing bound is no bound).
    Returns :math:`w_t m_t` (0 at padding), detached.
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"mode must be one of {list(VLLM_IS_MODES)}, got {mode!r}")
    _check_seq("logp_trainer", logp_trainer, mask)
    _check_seq("logp_sampler", logp_sampler, mask)
    dtype = _compute_dtype(logp_trainer, logp_sampler)
    m = _as(mask, dtype)
    diff = torch.nan_to_num((_as(logp_trainer.detach(), dtype) - _as(logp_sampler.detach(), dtype)) * m, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError(f"mode {mode!r} needs clip_min or clip_max")
        ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return ratio.expand_as(m) * m
