"""The teacher's next-token distribution as the losses receive it: full-vocabulary logits (a teacher in the training
process) or its top-k log-probs plus a tail bucket (a teacher served by vLLM, or cached by `amm-trl generate`).

Every loss reads a teacher through `pair(student_logits)`: the student's and the teacher's distributions over one
support, as logits (any additive constant per row; the losses take `log_softmax` of them). For a dense teacher the
support is the vocabulary. For a top-k teacher it is k + 1 buckets: each of the teacher's k tokens, and the tail (every
other token), plus the taken token's own bucket where it is outside the top-k (`taken_ids`: k + 2 slots, the extra
one empty elsewhere); both distributions are coarse-grained onto them, so a divergence of the pair is the exact
divergence of the bucketed distributions (a lower bound of the full one, equal to it when the top-k covers the
vocabulary).
Torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .functional import as_dtype, compute_dtype

__all__ = ["DenseTeacher", "TopKTeacher", "tail_log_prob"]


class DenseTeacher:
    """The teacher's next-token distribution at each token, as full-vocabulary logits (n, V)."""

    def __init__(self, logits: Tensor):
        self.logits = logits

    def pair(self, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        return student_logits, self.logits

    def coarsen(self, values: Tensor, student_logits: Tensor) -> Tensor:
        """Per-token values over the vocabulary (n, V), on the pair's support: unchanged."""
        return values

    def log_prob(self, target_ids: Tensor) -> Tensor:
        """The teacher's log-probability of each taken token, (n,)."""
        return torch.log_softmax(self.logits.float(), -1).gather(-1, target_ids[:, None]).squeeze(-1)

    def metrics(self, student_logits: Tensor) -> dict[str, Tensor]:
        return {}


def tail_log_prob(top_log_probs: Tensor) -> Tensor:
    r"""log of the mass outside the top-k, from the top-k log-probs (n, k) (-inf entries are empty slots):
    :math:`\log(1 - \sum_{i \le k} e^{\ell_i})`, -inf where the top-k holds all the mass (or rounding says more)."""
    covered = torch.logsumexp(top_log_probs, -1)
    rest = -torch.expm1(covered.clamp_max(0.0))  # 1 - covered mass, without cancellation near 0
    return torch.where(rest > 0, torch.log(rest.clamp_min(torch.finfo(rest.dtype).tiny)),
                       torch.full_like(rest, -math.inf))


class TopKTeacher:
    r"""The teacher known by its k most likely tokens at each position: `ids` (n, k), their log-probs `log_probs`
    (n, k; -inf marks an empty slot, e.g. a server's padding) and the taken token's log-prob `token_log_prob` (n,).

    The support is the k tokens plus the tail bucket :math:`R` (every other token of the shared vocabulary):

    .. math::
        \bar p_T = (p_T(a_1), \dots, p_T(a_k), 1 - \textstyle\sum_i p_T(a_i)), \qquad
        \bar p_S = (p_S(a_1), \dots, p_S(a_k), \textstyle\sum_{a \in R} p_S(a))

    The student's tail is a log-sum-exp over its own logits outside the top-k (exact, differentiable); when the top-k
    covers the whole vocabulary both tails are empty (-inf), so with k = V the pair is the dense one.

    With `taken_ids` (the token taken at each position: the student's sample on a rollout, the answer's token
    off-policy), a taken token outside the top-k gets a bucket of its own, from `token_log_prob` (every server and
    cache returns it): k + 2 buckets there, a finer partition, so each divergence moves closer to the full one. Where
    the taken token is in the top-k the extra slot is empty and the pair is the k + 1 one. On a rollout the taken
    token is the student's own sample, so the partition depends on the sample: each per-token loss is the exact
    divergence of that sample's partition, and its gradient leaves out the sampling's score term (as every per-token
    loss on rollouts does). The logged `tv` is over the same buckets, so it reads higher (closer to the full TV).
    """

    @classmethod
    def of_logits(cls, logits: Tensor, target_ids: Tensor, k: int, taken: bool = False) -> "TopKTeacher":
        """The top-k view of a full distribution (n, V) (no gradient): what a server or cache at this k gives of
        it, without their rounding (`taken`: with the taken token's bucket)."""
        with torch.no_grad():
            log_pt = torch.log_softmax(logits, -1)
            values, ids = log_pt.topk(min(k, log_pt.size(-1)), -1)
            return cls(ids, values, log_pt.gather(-1, target_ids[:, None]).squeeze(-1),
                       taken_ids=target_ids if taken else None)

    def __init__(self, ids: Tensor, log_probs: Tensor, token_log_prob: Tensor, taken_ids: Tensor | None = None):
        if ids.shape != log_probs.shape or ids.dim() != 2 or token_log_prob.shape != ids.shape[:1]:
            raise ValueError(f"top-k teacher: ids {tuple(ids.shape)}, log_probs {tuple(log_probs.shape)} and "
                             f"token_log_prob {tuple(token_log_prob.shape)} must be (n, k), (n, k) and (n,)")
        self.k = ids.size(-1)  # the top-k slots (the coverage metrics read these alone)
        if taken_ids is not None:
            known = ((ids == taken_ids[:, None]) & torch.isfinite(log_probs)).any(-1)
            extra = torch.where(known, torch.full_like(token_log_prob, -math.inf), token_log_prob)
            ids = torch.cat([ids, taken_ids[:, None].to(ids.dtype)], -1)
            log_probs = torch.cat([log_probs, extra[:, None].to(log_probs.dtype)], -1)
        self.filled = torch.isfinite(log_probs)
        self.ids = torch.where(self.filled, ids.long(), torch.zeros_like(ids, dtype=torch.long))
        self.log_probs, self.token_log_prob = log_probs, token_log_prob

    def _student(self, student_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log p_S at the k slots (-inf at empty ones), log p_S of the tail, the tail's log p_S per token (-inf
        inside the top-k), in the compute dtype."""
        dtype = compute_dtype(student_logits, self.log_probs)
        log_ps = torch.log_softmax(as_dtype(student_logits, dtype), -1)
        top = torch.where(self.filled, log_ps.gather(-1, self.ids), torch.full_like(self.log_probs, -math.inf,
                                                                                   dtype=dtype))
        inside = torch.zeros_like(log_ps).scatter_add(-1, self.ids, self.filled.to(dtype)) > 0
        outside = log_ps.masked_fill(inside, -math.inf)
        empty = inside.all(-1, keepdim=True)  # a tail with no token: compute on zeros (a NaN-free gradient), then -inf
        tail = torch.logsumexp(torch.where(empty, torch.zeros_like(outside), outside), -1)
        return top, torch.where(empty.squeeze(-1), torch.full_like(tail, -math.inf), tail), outside

    def pair(self, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        """(student, teacher) log-probs over the buckets: (n, k + 1), or (n, k + 2) with the taken token's slot."""
        top_s, tail_s, _ = self._student(student_logits)
        log_pt = as_dtype(self.log_probs, top_s.dtype)
        # no token, no mass; a tail whose tokens the student holds keeps at least `tiny` of the teacher's mass: served
        # or fp16-cached top-k log-probs may sum to >= 1 by rounding, which would make reverse KL infinite
        floor = math.log(torch.finfo(log_pt.dtype).tiny)
        tail_t = torch.where(torch.isneginf(tail_s), tail_s, tail_log_prob(log_pt).clamp_min(floor))
        return torch.cat([top_s, tail_s[:, None]], -1), torch.cat([log_pt, tail_t[:, None]], -1)

    def coarsen(self, values: Tensor, student_logits: Tensor) -> Tensor:
        """Per-token values over the vocabulary (n, V) (a critic's scores) on the buckets of `pair`: the value of each
        top-k (and taken) token, and for the tail their mean under the student's distribution inside the tail
        (detached), 0 for an empty tail. Empty slots get 0."""
        _, tail_s, outside = self._student(student_logits.detach())
        top = torch.where(self.filled, values.gather(-1, self.ids), torch.zeros_like(self.log_probs,
                                                                                   dtype=values.dtype))
        inner = torch.where(torch.isneginf(tail_s)[:, None], torch.full_like(outside, -math.inf),
                            outside - tail_s[:, None]).exp()
        tail = (inner * as_dtype(values, inner.dtype)).sum(-1)
        return torch.cat([top, tail[:, None].to(top.dtype)], -1)

    def log_prob(self, target_ids: Tensor) -> Tensor:
        """The teacher's log-probability of each taken token, as served or cached, (n,)."""
        return self.token_log_prob

    def metrics(self, student_logits: Tensor) -> dict[str, Tensor]:
        """`teacher_mass`: the teacher's mass in its top-k; `student_mass`: the student's mass on those tokens;
        `overlap_ratio`: the share of the teacher's top-k among the student's k most likely tokens."""
        with torch.no_grad():
            top_s, _, _ = self._student(student_logits)
            k, ids, filled = self.k, self.ids[:, :self.k], self.filled[:, :self.k]  # the top-k (no taken bucket)
            student_top = student_logits.topk(min(k, student_logits.size(-1)), -1).indices
            shared = (ids[:, :, None] == student_top[:, None, :]).any(-1) & filled
            return {"teacher_mass": torch.logsumexp(self.log_probs[:, :k].float(), -1).exp(),
                    "student_mass": torch.logsumexp(top_s[:, :k].float(), -1).exp(),
                    "overlap_ratio": shared.sum(-1).float() / filled.sum(-1).clamp_min(1).float()}
