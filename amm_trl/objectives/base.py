"""What every distillation objective is made of, and what the trainer asks it.

An objective is one `Objective` subclass in one module of this package (found by `amm_trl.objectives` at import, under
its `name`). It declares

* its **data schedule**: whether an optimizer step trains on student rollouts, on off-policy completions or both
  (`uses_rollouts`, `uses_off_policy`, `schedule`), optionally from a replay buffer;
* its **per-token loss** `token_loss(tokens, kind)` on `(student logits, teacher logits, extra per-token inputs)`, with
  the names of the metric columns it adds (`loss_name`, `metric_names`);
* what it **needs**: teacher logits (`needs_teacher`), trainable modules of its own such as AMM's Q-heads
  (`build_modules`, `params`, `param_groups`), per-token inputs taken from the batch (`token_input_keys`);
* optional **hooks**: rollout scoring (`on_rollouts`), sequence-level terms (`extra_loss`), a logits processor for the
  rollouts (`logits_processor`), state saved with each checkpoint (`state_dict`), evaluation feedback (`on_evaluate`),
  gradient clipping (`clip_gradients`), callbacks of its own (`callbacks`), config checks (`validate`).

The batch that flows from generation to the loss is declared once (`Batch`). The per-token functions shared by all
objectives live here too: the common metrics (total variation, entropy, token log-probs), the projection of hidden
states to logits exactly as the model's own forward scales them (`Projection`), and the chunked per-token function
built from an objective (`token_function`). Torch only: no trainer, TRL or transformers imports.

Conventions of the pure functions: ``student_logits``, ``teacher_logits``, ``q_values`` are ``(n, V)`` (any leading
shape works), restricted to the response tokens and divided by the temperature; per-token functions return ``(n,)``;
``p_S = softmax(student_logits)``, ``p_T = softmax(teacher_logits)``; mixtures are formed in log space; half precision
is upcast to float32 and nothing is downcast. Sequence functions take ``(B, T)`` tensors with a ``(B, T)`` 0/1 mask.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypedDict

import torch
from torch import Tensor, nn

__all__ = ["total_variation", "token_log_probs", "cross_entropy", "reward_to_go", "length_normalize",
           "VLLM_IS_MODES", "vllm_importance_weights"]

KINDS = ("on", "off")  # student rollouts, off-policy completions
STATE_FILE = "{name}_state_rank{rank}.pt"  # an objective's per-process state in each checkpoint


class Batch(TypedDict, total=False):
    """One generation batch, from `_generate_and_score_completions` to the loss (TRL splits it along dim 0 over the
    gradient-accumulation steps, so every tensor here has one row per prompt).

    TRL's keys: `prompt_ids`, `prompt_mask` (left-padded), `completion_ids`, `completion_mask` (right-padded student
    rollouts), `num_items_in_batch` (loss tokens of the rollouts in the whole generation batch, all ranks).
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
    minillm_old_logp: Tensor  # (B, T) log-prob of each rollout token under the rollout policy (PPO's old policy)
    minillm_advantages: Tensor  # (B, T) whitened, length-normalized future returns
    minillm_is_weight: Tensor  # (B, T) p_S / mixture weight of the single-step term (teacher-mixed sampling)


@dataclass
class Step:
    """Where training stands when the trainer asks an objective."""

    step: int  # optimizer steps done
    max_steps: int
    rank: int
    training: bool


@dataclass
class Schedule:
    """The data of one generation batch: rollouts and/or off-policy completions, or replayed (prompt, completion)
    token ids standing in for both; `metrics` are logged as they are."""

    rollouts: bool
    off_policy: bool
    replay: list[tuple[list[int], list[int]]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Tokens:
    """One chunk of response tokens as the per-token loss sees it (all `(n, ...)`)."""

    student_logits: Tensor  # scaled as the model's forward does, divided by the temperature, fp32
    teacher_logits: Tensor | None
    target_ids: Tensor  # the token taken at each position
    student_hidden: Tensor
    teacher_hidden: Tensor | None
    inputs: dict[str, Tensor]  # the objective's `token_input_keys`, one value per token
    params: list[Tensor]  # the objective's own `params(kind)`, gathered
    student_embedding: Tensor  # the student's output embedding, shared-vocabulary rows
    step: Step


@dataclass
class Part:
    """One data kind of a micro-batch after the per-token pass (what `extra_loss` may use)."""

    kind: str
    completion_ids: Tensor  # (B, T)
    valid: Tensor  # (B, T) bool
    student_hidden: Tensor  # (B, T, H)
    teacher_hidden: Tensor | None
    weights: Tensor  # per valid token: the reduction weight of its loss
    metrics: Tensor  # (valid tokens, columns), detached
    names: list[str]

    def column(self, name: str) -> Tensor:
        return self.metrics[:, self.names.index(name)]


@dataclass
class LossContext:
    """What sequence-level terms get from the trainer: the chunked per-token runner and the metric sink."""

    run: Callable[[list[Tensor], Tensor, Callable, list[Tensor]], tuple[Tensor, Tensor]]
    add_metric: Callable[[str, Tensor, float], None]
    projection: "Projection"
    pairs_per_step: int  # prompts whose loss one optimizer step averages over, on this rank
    step: Step


class Objective:
    """Base of every distillation method. Subclasses set `name` and override what differs."""

    name: ClassVar[str] = ""  # registry key = `AMMConfig.objective`; empty for abstract bases
    description: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True  # teacher logits in the loss
    needs_q_heads: ClassVar[bool] = False  # trainable modules of its own (`build_modules`)
    default_off_policy_source: ClassVar[str] = "dataset"  # what `off_policy_source: auto` means for it
    uses_trl_loss: ClassVar[bool] = False  # TRL's own loss (`DistillationTrainer._compute_loss`), unchanged
    own_fields: ClassVar[tuple[str, ...]] = ()  # config fields that only this objective reads (validated by config)
    state_title: ClassVar[str] = "objective"  # in messages about the state: "... has no <title> state of rank(s) ..."
    state_contents: ClassVar[str] = "objective states"  # "... their <contents> start afresh"

    def __init__(self, args: Any):
        self.args = args

    # ------------------------------------------------------------------------------------------- data schedule
    @property
    def uses_rollouts(self) -> bool:
        return False

    @property
    def uses_off_policy(self) -> bool:
        return False

    @property
    def generation_batch_reuse(self) -> int:
        """Optimizer steps served by one generation batch (TRL: 1)."""
        return 1

    def schedule(self, n: int, step: Step) -> Schedule:
        """The data of the next generation batch of `n` prompts."""
        return Schedule(self.uses_rollouts, self.uses_off_policy)

    def on_rollouts(self, batch: Batch, scorer: "RolloutScorer", step: Step) -> dict[str, tuple[Tensor, Tensor]]:
        """Called on each fresh rollout batch; may add keys to `batch`. Returns metrics as (local sum, local count)."""
        return {}

    @property
    def samples_with_teacher(self) -> bool:
        """Whether HF-`generate` rollouts run `logits_processor` (with the teacher at hand)."""
        return False

    def logits_processor(self, teacher: nn.Module, vocab: int, temperature: float, attention_mask: Tensor):
        """The `transformers.LogitsProcessor` added to each HF `generate` call of the rollouts."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------- loss
    def part_weight(self, kind: str) -> float:
        return 1.0

    def token_input_keys(self, kind: str) -> tuple[str, ...]:
        """Batch keys of (B, T) tensors the per-token loss reads (as `tokens.inputs[key]`)."""
        return ()

    def loss_name(self, kind: str) -> str:
        return self.name

    def metric_names(self, kind: str) -> list[str]:
        """Names of the extra columns `token_loss` returns."""
        return []

    def token_loss(self, tokens: Tokens, kind: str) -> tuple[Tensor, list[Tensor]]:
        """(per-token loss (n,), extra metric columns (n,) each). Minimized; a pure function of `tokens`."""
        raise NotImplementedError

    def extra_loss(self, parts: dict[str, Part], ctx: LossContext) -> Tensor | None:
        """Terms over whole sequences, added to the per-token loss (already reduced)."""
        return None

    # --------------------------------------------------------------------------------- modules, state, checks
    def build_modules(self, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> nn.Module | None:
        """Trainable modules of the objective (attached to the student, saved beside it)."""
        return None

    def params(self, kind: str) -> list[Tensor]:
        """The objective's own trainable tensors its per-token loss reads for `kind`."""
        return []

    def param_groups(self, modules: nn.Module) -> list[dict]:
        """Optimizer parameter groups of `build_modules`' output."""
        return [{"params": list(modules.parameters())}]

    def state_dict(self) -> dict | None:
        """Per-process state saved in each checkpoint (`STATE_FILE`), or None."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_evaluate(self, loss: float, prefix: str) -> dict[str, float]:
        """Feedback from the evaluation that drives the objective; returns metrics to add to the eval results."""
        return {}

    def callbacks(self) -> list:
        """Extra `transformers.TrainerCallback`s the objective needs (e.g. for an update order of its own)."""
        return []

    def clip_gradients(self, model: nn.Module, clip: Callable[[nn.Module], Tensor]) -> Tensor:
        """Gradient clipping before each optimizer step where the Trainer clips (not under DeepSpeed, whose engine
        clips by its `gradient_clipping`): `clip` is the Trainer's joint clip of every model parameter, the objective's
        modules included, to `max_grad_norm`. Returns the pre-clip norm the Trainer logs as `grad_norm`."""
        return clip(model)

    def validate(self, fail: Callable[[str, Any, str], None]) -> None:
        """Checks of config fields that depend on the objective; `fail(field, value, fix)` raises."""


def step_draw(seed: int, step: int) -> float:
    """A uniform draw fixed by (seed, step): the same on every rank and after a resume, no RNG state to save."""
    return random.Random(seed * 1_000_003 + step).random()


class RolloutScorer:
    """Log-probs of one rollout batch's tokens under the rollout-time student (and the teacher), computed once."""

    def __init__(self, compute: Callable[[bool], list[Tensor]]):
        self._compute, self._cache = compute, {}

    def student(self) -> Tensor:
        if "student" not in self._cache:
            self._cache["student"] = self._compute(False)[0]
        return self._cache["student"]

    def student_and_teacher(self) -> tuple[Tensor, Tensor]:
        if "teacher" not in self._cache:
            self._cache["student"], self._cache["teacher"] = self._compute(True)
        return self._cache["student"], self._cache["teacher"]


def save_state(objective: Objective, directory: str, rank: int) -> None:
    state = objective.state_dict()
    if state is None:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE.format(name=objective.name, rank=rank))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(objective: Objective, directory: str, rank: int, world_size: int = 1) -> None:
    """Restores this process's state saved by `save_state`. Ranks whose file the checkpoint lacks start afresh; rank 0
    warns once for all of them, naming them."""
    if objective.state_dict() is None:
        return
    paths = [os.path.join(directory, STATE_FILE.format(name=objective.name, rank=r)) for r in range(world_size)]
    missing = [r for r, path in enumerate(paths) if not os.path.exists(path)]
    if missing and rank == 0:
        warnings.warn(f"{directory} has no {objective.state_title} state of rank(s) {missing} "
                      f"({os.path.basename(paths[missing[0]])}, ...): their {objective.state_contents} start afresh.")
    if rank not in missing:
        objective.load_state_dict(torch.load(paths[rank], weights_only=False))


# ----------------------------------------------------------------------------------------------------------
# projection: hidden states -> logits, scaled exactly as TRL's `DistillationTrainer._compute_loss` scales them
# ----------------------------------------------------------------------------------------------------------
def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) the model's own forward applies to its logits, read from its text config in TRL 1.16's order:
    `logit_scale` (Cohere; a real 0.0 is kept), `output_multiplier`, `lm_head_multiplier` (Falcon-H1), then
    `logits_scaling` (divides, as Granite/MiniCPM3; multiplies for HyperCLOVA X); softcap `final_logit_softcapping`."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def project(hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int) -> Tensor:
    """fp32 logits of `hidden` through an `lm_head` restricted to its first `vocab` rows (the shared tokenizer)."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight[:vocab],
                                        bias[:vocab] if bias is not None else None)
    return logits.float()


def scale_logits(logits: Tensor, transform: tuple[float, float | None], temperature: float) -> Tensor:
    scale, softcap = transform
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


class Projection:
    """The student's (and the teacher's) output layer as the per-token functions read it: weights passed in (so the
    chunked loss can gather and differentiate them), shared-vocabulary rows, logit transform and temperature."""

    def __init__(self, student_head: nn.Module, teacher_head: nn.Module | None, vocab: int, temperature: float,
                 student_transform, teacher_transform=None):
        self.student = [student_head.weight] + ([student_head.bias] if student_head.bias is not None else [])
        self.teacher = [] if teacher_head is None else (
            [teacher_head.weight] + ([teacher_head.bias] if teacher_head.bias is not None else []))
        self.vocab, self.temperature = vocab, temperature
        self.transforms = (student_transform, teacher_transform)

    @property
    def params(self) -> list[Tensor]:
        return self.student + self.teacher

    @property
    def has_teacher(self) -> bool:
        return bool(self.teacher)

    def student_logits(self, hidden: Tensor, params: list[Tensor]) -> Tensor:
        bias = params[1] if len(self.student) == 2 else None
        return scale_logits(project(hidden, params[0], bias, self.vocab), self.transforms[0], self.temperature)

    def teacher_logits(self, hidden: Tensor, params: list[Tensor]) -> Tensor:
        weight, bias = params[0], (params[1] if len(self.teacher) == 2 else None)
        return scale_logits(project(hidden, weight, bias, self.vocab), self.transforms[1], self.temperature)


def common_metric_names(has_teacher: bool) -> list[str]:
    return ["tv", "entropy", "logp_student", "logp_teacher"] if has_teacher else ["entropy", "logp_student"]


def common_metrics(student_logits: Tensor, teacher_logits: Tensor | None, target_ids: Tensor) -> list[Tensor]:
    """Total variation, student entropy, and the taken token's log-prob under each model (the columns logged for
    every objective)."""
    log_p_s = torch.log_softmax(student_logits.float(), -1)
    entropy = -(log_p_s.exp() * log_p_s).sum(-1)
    logp_s = log_p_s.gather(-1, target_ids[:, None]).squeeze(-1)
    if teacher_logits is None:
        return [entropy, logp_s]
    logp_t = torch.log_softmax(teacher_logits.float(), -1).gather(-1, target_ids[:, None]).squeeze(-1)
    return [total_variation(student_logits, teacher_logits), entropy, logp_s, logp_t]


def token_function(objective: Objective | None, kind: str, projection: Projection, step: Step):
    """(fn, params, column names) for `chunked.chunked_token_loss`: `fn(h_s, y, [h_t], *inputs, *params)` projects
    the chunk's hidden states and returns (the objective's per-token loss, [loss, common metrics, extra metrics]).
    `objective=None`: loss 0, the common metrics only (rollout log-probs)."""
    own = objective.params(kind) if objective is not None else []
    keys = objective.token_input_keys(kind) if objective is not None else ()
    n_student, n_teacher = len(projection.student), len(projection.teacher)

    def fn(h_s, y, *rest):
        h_t, rest = (rest[0], rest[1:]) if n_teacher else (None, rest)
        inputs, p = rest[:len(keys)], rest[len(keys):]
        z_s = projection.student_logits(h_s, p[:n_student])
        z_t = projection.teacher_logits(h_t, p[n_student:n_student + n_teacher]) if n_teacher else None
        if objective is None:
            values, extra = torch.zeros(h_s.size(0), device=h_s.device), []
        else:
            tokens = Tokens(z_s, z_t, y, h_s, h_t, dict(zip(keys, inputs)), list(p[n_student + n_teacher:]),
                            p[0][:projection.vocab], step)
            values, extra = objective.token_loss(tokens, kind)
        columns = [values.float(), *common_metrics(z_s, z_t, y), *(c.float() for c in extra)]
        return values, torch.stack(columns, dim=1).detach()

    first = objective.loss_name(kind) if objective is not None else "none"
    names = [first, *common_metric_names(bool(n_teacher)), *(objective.metric_names(kind) if objective else [])]
    return fn, projection.params + own, names


# ----------------------------------------------------------------------------------------------------------
# shared pure functions
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
    return torch.log_softmax(_as(student_logits, dtype), dim=-1), torch.log_softmax(_as(teacher_logits, dtype), dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum_a p (log p - log q) from log-probabilities, over the last dim.

    Terms with p(a) = 0 (log p = -inf, e.g. masked vocabulary entries) contribute exactly 0, without NaN in the value
    or the gradient.
    """
    diff = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p - log_q)
    return (log_p.exp() * diff).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
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


def _check_unit(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_seq(name: str, x: Tensor, mask: Tensor) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{name} {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")


def total_variation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Total variation distance, in [0, 1] and symmetric.

    .. math:: \mathrm{TV}(p_T, p_S) = \tfrac12 \sum_a |p_T(a) - p_S(a)|
    """
    log_ps, log_pt = _pair_log_probs(student_logits, teacher_logits)
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
    z = _as(logits, _compute_dtype(logits))
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
    _check_seq("rewards", rewards, mask)
    _check_unit("gamma", gamma)
    dtype = _compute_dtype(rewards)
    m = _as(mask, dtype)
    r = _as(rewards, dtype) * m
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
    _check_seq("returns", returns, mask)
    dtype = _compute_dtype(returns)
    m = _as(mask, dtype)
    counts = m.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= t} m_k
    if not include_current:
        counts = counts - m
    return _as(returns, dtype) / counts.clamp(min=1.0) * m


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
        return ratio.clamp(min=clip_min, max=clip_max).expand_as(m) * m
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0).expand_as(m) * m
