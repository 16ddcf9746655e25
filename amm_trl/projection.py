"""Hidden states -> logits -> the values a per-token loss reads.

`Projection` is the student's (and the teacher's) output layer as the loss reads it: weights passed in by name (so the
chunked engine can gather and differentiate them), shared-vocabulary rows, the model's own logit transform (scaled as
TRL's `DistillationTrainer._compute_loss` scales them) and the temperature. `token_pass` makes the chunked engine's
per-token function of a `Term`: it projects a chunk, builds the `Tokens` value (the teacher's distribution included)
and returns the term's loss with the columns logged for every objective.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .objectives.base import Term, Tokens
from .objectives.batch import Step
from .objectives.functional import total_variation
from .objectives.teachers import DenseTeacher, TopKTeacher

TOP_K_INPUTS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_token_logprob")  # a top-k teacher's token inputs


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


def _head_params(model: str, head: nn.Module | None) -> dict[str, Tensor]:
    if head is None:
        return {}
    return {f"{model}.weight": head.weight, **({f"{model}.bias": head.bias} if head.bias is not None else {})}


class Projection:
    """The output layers, read by name from the parameters the chunked engine passes (`params`)."""

    def __init__(self, student_head: nn.Module, teacher_head: nn.Module | None, vocab: int, temperature: float,
                 student_transform, teacher_transform=None, teacher_top_k: int = 0, taken_bucket: bool = False):
        self.student = _head_params("student", student_head)
        self.teacher = _head_params("teacher", teacher_head)
        self.vocab, self.temperature = vocab, temperature
        self.teacher_top_k = teacher_top_k  # > 0: the losses see the teacher's top-k + tail (`teacher_local_top_k`)
        self.taken_bucket = taken_bucket  # a top-k teacher gives the taken token a bucket (`teacher_top_k_taken_bucket`)
        self.transforms = {"student": student_transform, "teacher": teacher_transform}

    @property
    def params(self) -> dict[str, Tensor]:
        return {**self.student, **self.teacher}

    def logits(self, model: str, hidden: Tensor, params: dict[str, Tensor]) -> Tensor:
        """`model` ("student" or "teacher") logits of `hidden`, with that model's head in `params`."""
        logits = project(hidden, params[f"{model}.weight"], params.get(f"{model}.bias"), self.vocab)
        return scale_logits(logits, self.transforms[model], self.temperature)

    def embedding(self, params: dict[str, Tensor]) -> Tensor:
        """The student's output embedding, shared-vocabulary rows."""
        return params["student.weight"][:self.vocab]


def common_metrics(student_logits: Tensor, teacher: DenseTeacher | TopKTeacher | None,
                   target_ids: Tensor) -> dict[str, Tensor]:
    """The columns logged for every objective: total variation, student entropy, the taken token's log-prob under
    each model, and a top-k teacher's coverage (`TopKTeacher.metrics`)."""
    log_p_s = torch.log_softmax(student_logits.float(), -1)
    metrics = {"entropy": -(log_p_s.exp() * log_p_s).sum(-1),
               "logp_student": log_p_s.gather(-1, target_ids[:, None]).squeeze(-1)}
    if teacher is not None:
        z_s, z_t = teacher.pair(student_logits)
        metrics["tv"] = total_variation(z_s, z_t)
        metrics["logp_teacher"] = teacher.log_prob(target_ids)
        metrics.update(teacher.metrics(student_logits))
    return metrics


def teacher_of(chunk: dict[str, Tensor], projection: Projection,
               params: dict[str, Tensor]) -> DenseTeacher | TopKTeacher | None:
    """The teacher's distribution of a chunk: projected from its hidden states (a teacher in this process; its top-k
    view with `projection.teacher_top_k`), from the top-k token inputs (served or cached), or None. A top-k teacher
    gives the taken token a bucket of its own with `projection.taken_bucket`."""
    if "teacher_hidden" in chunk:
        logits = projection.logits("teacher", chunk["teacher_hidden"], params)
        if projection.teacher_top_k:
            return TopKTeacher.of_logits(logits, chunk["target_ids"], projection.teacher_top_k,
                                         taken=projection.taken_bucket)
        return DenseTeacher(logits)
    if TOP_K_INPUTS[0] in chunk:
        return TopKTeacher(*(chunk[key] for key in TOP_K_INPUTS),
                           taken_ids=chunk["target_ids"] if projection.taken_bucket else None)
    return None


def token_pass(terms: list[Term], projection: Projection, step: Step):
    """(fn, params) for `chunked.chunked_token_loss` over the token inputs `student_hidden`, `target_ids`, optionally
    `teacher_hidden` or the `TOP_K_INPUTS`, and the terms' `inputs`: `fn(chunk, params)` returns (sum of weight * loss
    over the terms, {each term's loss under its name, the common metrics, the terms' own metrics}). No terms: loss 0
    and the common metrics (rollout log-probs)."""
    own = {f"term{i}.{name}": p for i, term in enumerate(terms) for name, p in term.params.items()}

    def fn(chunk: dict[str, Tensor], params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        z_s = projection.logits("student", chunk["student_hidden"], params)
        teacher = teacher_of(chunk, projection, params)
        metrics = common_metrics(z_s, teacher, chunk["target_ids"])
        total = torch.zeros(z_s.size(0), device=z_s.device)
        for i, term in enumerate(terms):
            prefix = f"term{i}."
            tokens = Tokens(student_logits=z_s, teacher=teacher, target_ids=chunk["target_ids"],
                            student_hidden=chunk["student_hidden"], teacher_hidden=chunk.get("teacher_hidden"),
                            inputs={key: chunk[key] for key in term.inputs},
                            params={name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)},
                            student_embedding=projection.embedding(params), step=step)
            values, extra = term.loss(tokens)
            total = total + term.weight * values
            for name, column in {term.name: values, **extra}.items():
                if name in metrics:
                    raise ValueError(f"metric {name!r} of term {term.name!r} is already taken (names so far: "
                                     f"{sorted(metrics)}): give it another name.")
                metrics[name] = column
        return total, metrics

    return fn, {**projection.params, **own}
