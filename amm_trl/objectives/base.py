"""What every distillation objective is made of, and what the trainer asks it.

An objective is one `Objective` subclass in one module of this package, listed in that module's `OBJECTIVES`. It says

* `data` / `plan`: whether a step trains on student rollouts, on off-policy completions or both (or on replayed
  rollouts), and with which sampler;
* `terms`: the per-token loss terms of each data kind, each with its own weight, the batch keys and the trainable
  tensors it reads; a term receives a `Tokens` value (the student's logits, the teacher's distribution, the hidden
  states) and returns the per-token loss and named metric columns;
* `sequence_loss`: an optional term over whole sequences, given the per-kind `Part`s;
* optional capabilities: an `adversary` (trainable modules of its own, AMM's Q-heads), `on_rollouts` (reads fresh
  rollouts and their log-probs), `state` (saved with each checkpoint, fed the evaluation loss).

An objective never calls the trainer: the trainer reads these values and runs them. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from .batch import Batch, Plan, Step
from .teachers import DenseTeacher, TopKTeacher

Metrics = dict[str, tuple[Tensor, float]]  # name -> (local sum, local count), averaged over all ranks when logged


def invalid(name: str, value: Any, fix: str) -> ValueError:
    """The error of a config field an objective refuses (raised before any model loads)."""
    return ValueError(f"AMMConfig.{name}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class Info:
    """What an objective is, before any instance: the help text, the paper the model card cites, whether its loss reads
    the teacher's distribution, what `off_policy_source: auto` means for it, whether it runs TRL's own loss unchanged,
    and the config fields only it reads."""

    description: str
    paper: dict[str, str] | None = None
    reads_teacher: bool = True
    off_policy_default: str = "dataset"
    trl_loss: bool = False
    own_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Data:
    """The data an objective trains on at all (fixed by its settings): student rollouts, off-policy completions, how
    many optimizer steps one generation batch serves (TRL: 1), and which log-probs of fresh rollouts `on_rollouts`
    reads (`"logp_student"`: the rollout-time student's, `"logp_teacher"`: the teacher's; (B, T), 0 at padding)."""

    rollouts: bool
    off_policy: bool
    reuse: int = 1
    scores: tuple[str, ...] = ()


@dataclass
class Tokens:
    """One chunk of response tokens as a per-token loss sees it (all `(n, ...)`)."""

    student_logits: Tensor  # scaled as the model's forward does, divided by the temperature, fp32
    teacher: DenseTeacher | TopKTeacher | None  # see `teachers.py`
    target_ids: Tensor  # the token taken at each position
    student_hidden: Tensor
    teacher_hidden: Tensor | None
    inputs: dict[str, Tensor]  # the term's `inputs`, one value per token
    params: dict[str, Tensor]  # the term's `params`, gathered
    student_embedding: Tensor  # the student's output embedding, shared-vocabulary rows
    step: Step

    def pair(self) -> tuple[Tensor, Tensor]:
        """(student, teacher) logits over the teacher distribution's support (the vocabulary, or top-k + tail)."""
        return self.teacher.pair(self.student_logits)


@dataclass
class Term:
    """A per-token loss term of one data kind: `loss(tokens) -> (per-token loss (n,), {metric name: (n,)})`,
    minimized, a pure function of `tokens`. A kind's loss is the sum of its terms times their `weight`s (then reduced
    over the tokens like TRL's loss); each term's own value is logged under `name`."""

    loss: Callable[[Tokens], tuple[Tensor, dict[str, Tensor]]]
    name: str  # the loss column's metric name (logged as `<name>/<kind>`)
    weight: float = 1.0
    inputs: tuple[str, ...] = ()  # batch keys of (B, T) per-token tensors the loss reads
    params: dict[str, Tensor] = field(default_factory=dict)  # the objective's own trainable tensors it reads


@dataclass
class Part:
    """One data kind of a micro-batch after the per-token pass (what `sequence_loss` may use)."""

    kind: str
    completion_ids: Tensor  # (B, T)
    valid: Tensor  # (B, T) bool
    student_hidden: Tensor  # (B, T, H)
    teacher_hidden: Tensor | None
    weights: Tensor  # per valid token: 1 / the loss-token count it is reduced by (x vLLM's weight); no term weight
    metrics: dict[str, Tensor]  # per valid token, detached: the term's loss and every metric column


@dataclass
class LossContext:
    """What a sequence-level term gets: the chunked engine (`chunked(token_inputs, weights, fn, params)`, a module of
    the student so that ZeRO-3 gathers the weights it reads), the output layer and where training stands."""

    chunked: Callable[[dict[str, Tensor], Tensor, Callable, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
    projection: Any  # `amm_trl.projection.Projection`
    pairs_per_step: int  # prompts whose loss one optimizer step averages over, on this rank
    step: Step


class Adversary(Protocol):
    """Trainable modules of an objective (AMM's Q-heads): attached to the student (one engine, one backward), in
    optimizer groups of their own, saved beside the student."""

    def build(self, student: nn.Module, teacher_hidden_size: int, vocab_size: int) -> nn.Module: ...

    def param_groups(self) -> list[dict]: ...

    def clip(self, model: nn.Module, clip: Callable[[nn.Module], Tensor]) -> Tensor:
        """Gradient clipping where the Trainer clips (not under DeepSpeed): `clip` is the Trainer's joint clip of
        every parameter; returns the pre-clip norm logged as `grad_norm`."""


class Checkpointed(Protocol):
    """State of an objective saved per process in each checkpoint, and driven by the evaluation loss."""

    title: str  # in messages: "... has no <title> state of rank(s) ..."
    contents: str  # "... their <contents> start afresh"

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def on_evaluate(self, loss: float, prefix: str) -> dict[str, float]: ...


class Objective:
    """Base of every distillation method; `__init__` refuses settings the method cannot run (`invalid`)."""

    name: ClassVar[str] = ""  # = `AMMConfig.objective`
    info: ClassVar[Info] = Info("")
    adversary: Adversary | None = None
    state: Checkpointed | None = None

    def __init__(self, args: Any):
        self.args = args

    @property
    def data(self) -> Data:
        raise NotImplementedError

    def plan(self, n: int, step: Step) -> Plan:
        """The data of the next generation batch of `n` prompts."""
        return Plan(self.data.rollouts, self.data.off_policy)

    def terms(self) -> dict[str, list[Term]]:
        """The per-token loss terms of each data kind (`"on"`: rollouts, `"off"`: off-policy completions)."""
        raise NotImplementedError

    def sequence_loss(self, parts: dict[str, Part], ctx: LossContext) -> tuple[Tensor, Metrics] | None:
        """A term over whole sequences, added to the per-token loss (already reduced), and its metrics."""
        return None

    def on_rollouts(self, batch: Batch, scores: dict[str, Tensor], step: Step) -> Metrics:
        """Called on each fresh rollout batch with the log-probs `data.scores` names; may add per-token keys of its own
        to `batch`."""
        return {}
