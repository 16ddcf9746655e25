"""What travels from generation to the loss, written once: the batch's keys, the two data kinds, where training
stands, and the plan of a generation batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from torch import Tensor


class Batch(TypedDict, total=False):
    """One generation batch, from `_generate_and_score_completions` to the loss (TRL splits it along dim 0 over the
    gradient-accumulation steps, so every tensor here has one row per prompt).

    TRL's keys: `prompt_ids`, `prompt_mask` (left-padded), `completion_ids`, `completion_mask` (right-padded student
    rollouts), `num_items_in_batch` (loss tokens of the rollouts in the whole generation batch, all ranks). An
    objective's rollout hook may add (B, T) per-token tensors under keys of its own, prefixed with its name; its
    `Term.inputs` reads them back, one value per token.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    num_items_in_batch: Tensor
    off_completion_ids: Tensor  # off-policy completions (dataset column, teacher samples or replayed rollouts)
    off_completion_mask: Tensor
    num_off_items: Tensor  # loss tokens of the off-policy completions in the whole generation batch, all ranks
    vllm_is_weight: Tensor  # (B, T) importance weight of each rollout token (`vllm_importance_sampling_correction`)
    # a served or cached teacher (`teacher_placement`), per kind (`off_` prefix for the off-policy completions):
    teacher_topk_ids: Tensor  # (B, T, k) the teacher's k most likely tokens at each position
    teacher_topk_logprobs: Tensor  # (B, T, k) their log-probs, -inf in empty slots
    teacher_token_logprob: Tensor  # (B, T) the taken token's log-prob, 0 at padding


@dataclass(frozen=True)
class Kind:
    """One data kind of a batch: its name (the per-kind metric suffix) and its keys."""

    name: str
    ids: str
    mask: str
    count: str  # loss tokens of this kind in the whole generation batch, all ranks
    token_weight: str | None = None  # per-token weight the trainer applies (vLLM's sampling correction)
    prefix: str = ""  # of this kind's other per-token keys (a served or cached teacher's `teacher_topk_*`)


ROLLOUTS = Kind("on", "completion_ids", "completion_mask", "num_items_in_batch", "vllm_is_weight")
OFF_POLICY = Kind("off", "off_completion_ids", "off_completion_mask", "num_off_items", prefix="off_")
KINDS = {kind.name: kind for kind in (ROLLOUTS, OFF_POLICY)}


@dataclass(frozen=True)
class Step:
    """Where training stands when the trainer asks an objective."""

    step: int  # optimizer steps done
    max_steps: int
    rank: int
    training: bool


@dataclass
class Plan:
    """The data of one generation batch: student rollouts and/or off-policy completions, or replayed (prompt,
    completion) token ids standing in for both. `sampler` makes the `transformers.LogitsProcessor` added to HF
    `generate` for this batch's rollouts (`sampler(teacher, vocab, temperature, attention_mask)`); `metrics` are
    logged as they are."""

    rollouts: bool
    off_policy: bool
    replay: list[tuple[list[int], list[int]]] | None = None
    sampler: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
