"""The shared math of the objectives: pure tensor functions, no trainer, TRL or transformers imports.

Conventions: ``student_logits``, ``teacher_logits``, ``q_values`` are ``(n, V)`` (any leading shape works), restricted
to the response tokens and divided by the temperature; per-token functions return ``(n,)``;
``p_S = softmax(student_logits)``, ``p_T = softmax(teacher_logits)``; mixtures are formed in log space; half precision
is upcast to float32 and nothing is downcast. Sequence functions take ``(B, T)`` tensors with a ``(B, T)`` 0/1 mask.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

__all__ = ["total_variation", "token_log_probs", "cross_entropy", "reward_to_go", "length_normalize",
           "VLLM_IS_MODES", "vllm_importance_weights"]


def step_draw(seed: int, step: int) -> float:
    """A uniform draw fixed by (seed, step): the same on every rank and after a resume, no RNG state to save."""
    return random.Random(seed * 1_000_003 + step).random()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of the inputs, at least float32 (never a downcast)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def pair_log_probs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log p_S, log p_T) over the last dim, in the common compute dtype."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    return (torch.log_softmax(as_dtype(student_logits, dtype), dim=-1),
            torch.log_softmax(as_dtype(teacher_logits, dtype), dim=-1))


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_a p (log p - log q) from log-probabilities, over the last dim.

    Terms with p(a) = 0 (log p = -inf, e.g. masked vocabulary entries) contribute exactly 0, without NaN in the value
    or the gradient.
    """
    diff = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p - log_q)
    return (log_p.exp() * diff).sum(-1)


def log_mixture(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w p + (1 - w) q), computed with logaddexp; exact at w = 0 and w = 1, NaN-free where p = q = 0."""
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    # where both are -inf (masked vocabulary) logaddexp's gradient is NaN: compute on zeros there instead
    both = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = torch.zeros_like(log_p)
    mixed = torch.logaddexp(torch.where(both, zero, log_p) + math.log(w),
                            torch.where(both, zero, log_q) + math.log1p(-w))
    return torch.where(both, torch.full_like(mixed, -math.inf), mixed)


def check_unit(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_seq(name: str, x: Tensor, mask: Tensor) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{name} {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")


def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Total variation distance, in [0, 1] and symmetric.

    .. math:: \mathrm{TV}(p_T, p_S) = \tfrac12 \sum_a |p_T(a) - p_S(a)|
    """
    log_ps, log_pt = pair_log_probs(student_logits, teacher_logits)
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)


def token_log_probs(logits: Tensor, target_ids: Tensor) -> Tensor:
    r"""Log-probability of the target token, shape ``logits.shape[:-1]``.

    .. math:: \log \mathrm{softmax}(z)_y = z_y - \operatorname{logsumexp}_a z_a

    (computed as gather minus logsumexp, so no (n, V) log-softmax copy is kept).
    """
    if target_ids.shape != logits.shape[:-1]:
        raise ValueError(
            f"target_ids shape {tuple(target_ids.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
    z = as_dtype(logits, compute_dtype(logits))
    picked = z.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def cross_entropy(student_logits: Tensor, target_ids: Tensor) -> Tensor:
    r"""Per-token cross-entropy (SFT / SeqKD).

    .. math:: \mathrm{CE} = -\log p_S(y)
    """
    return -token_log_probs(student_logits, target_ids)


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0, include_current: bool = True) -> Tensor:
    r"""Discounted return of each position over the valid tokens; 0 at masked positions.

    .. math::
        G_t = \sum_{k \ge t} \gamma^{k-t} m_k r_k \quad (\text{include\_current}), \qquad
        G_t = \sum_{k > t} \gamma^{k-t-1} m_k r_k \quad (\text{otherwise})

    (MiniLLM's return uses the future only, ``include_current=False``, with gamma = 0.95.)
    """
    check_seq("rewards", rewards, mask)
    check_unit("gamma", gamma)
    dtype = compute_dtype(rewards)
    m = as_dtype(mask, dtype)
    r = as_dtype(rewards, dtype) * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])  # return from position t+1 on (discounted to t+1)
    for t in range(r.shape[-1] - 1, -1, -1):
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
    check_seq("returns", returns, mask)
    dtype = compute_dtype(returns)
    m = as_dtype(mask, dtype)
    counts = m.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= t} m_k
    if not include_current:
        counts = counts - m
    return as_dtype(returns, dtype) / counts.clamp(min=1.0) * m


# ----------------------------------------------------------------------------------------------------------
# sampler / trainer mismatch (vLLM rollouts): weights of the rollout tokens for any objective
# ----------------------------------------------------------------------------------------------------------
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def vllm_importance_weights(logp_trainer: Tensor, logp_sampler: Tensor, mask: Tensor, mode: str = "sequence_mask",
                            clip_min: float | None = None, clip_max: float | None = 3.0) -> Tensor:
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
    check_seq("logp_trainer", logp_trainer, mask)
    check_seq("logp_sampler", logp_sampler, mask)
    dtype = compute_dtype(logp_trainer, logp_sampler)
    m = as_dtype(mask, dtype)
    diff = as_dtype(logp_trainer.detach(), dtype) - as_dtype(logp_sampler.detach(), dtype)
    diff = torch.nan_to_num(diff * m, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:
            raise ValueError(f"mode {mode!r} needs clip_min or clip_max")
        return ratio.clamp(min=clip_min, max=clip_max).expand_as(m) * m
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0).expand_as(m) * m
