"""`AMMTrainer`: TRL's `DistillationTrainer` running any objective of `amm_trl.objectives` (AMM and the baselines).

What TRL already does is kept: the generation buffer (rollouts once per optimizer step), HF `generate` / vLLM
colocate or server rollouts and weight sync, ZeRO-3 teacher preparation, PEFT handling, logging. The trainer asks the
objective (`self.objective_unit`, see `objectives/base.py`) what to do and never branches on its name. The hooks
overridden:

- `__init__`: loads the teacher itself (TRL refuses a padded vocabulary, e.g. 151936 vs 152064, that shares the
  tokenizer's rows), attaches the objective's modules (AMM's Q-heads) to the student (one DeepSpeed engine, one
  backward) and keeps them out of vLLM syncs; in vLLM server mode it first waits for the server.
- `_generate_and_score_completions`: the objective's plan: student rollouts, off-policy completions (dataset column or
  online teacher generation) or replayed rollouts; rollout scoring; vLLM importance weights.
- `_compute_loss`: one student and one teacher forward over rollouts + off-policy completions, then each data kind's
  per-token loss terms, chunked over the vocabulary (`projection.py`, `chunked.py`), plus a sequence-level term.
- `create_optimizer`: the objective's adversary gets its own parameter groups; `_clip_grad_norm`: its clipping (by
  default the Trainer's).
- `training_step` / `_get_grad_norm`: training stops at the first step whose loss or gradient norm is not finite,
  before the optimizer applies it (the guard's other checks and its message: `guards.py`).
- `_prepare_inputs`: a generation batch may serve several optimizer steps (MiniLLM's `ppo_epochs`).
- `_generate_single_turn`: the plan's sampler inside HF `generate` (MiniLLM's teacher-mixed sampling).
- `_tokenize_prompts`: prompts cut to (or refused beyond) the context (`rollouts.prompt_limit`).
- `train`, `_save_checkpoint`, `_save`, `_save_rng_state`, `_save/_load_optimizer_and_scheduler`,
  `_load_from_checkpoint`: checkpoints that are whole or recognisably incomplete, with finite weights, holding the
  Q-heads and the objective's state (the rules in `checkpoints.py` and `guards.py`); `ObjectiveCallback` feeds the
  objective's state the evaluation loss. Patches of TRL, transformers and vLLM: `patches.py`, nowhere else.

One training step reads through this file, `rollouts.py`, `projection.py`, `objectives/base.py` (with `teachers.py`),
the objective's module (AMM's with `qhead.py`) and `chunked.py`.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .cache import top_k_of
from .checkpoints import (PREFIX_CHECKPOINT_DIR, check_resume_shapes, disk_full_message, load_state,
                          remove_stale_checkpoint, resume_folder, save_state)
from .checks import check_teacher_tokenizer
from .chunked import ChunkedLoss, LossSpec, auto_chunk_size
from .config import AMMConfig
from .data import check_dataset
from .guards import NonFiniteTrainingError, divergence_message, max_abs_weight, weights_finite_everywhere
from .objectives import OBJECTIVES, get_objective
from .objectives.amm import AMM_PAPER
from .objectives.base import Checkpointed, LossContext, Metrics, Part, Term
from .objectives.batch import KINDS, Kind, Step
from .patches import extra_logits_processor, hub_ignores, trl_builds_generation
from .projection import TOP_K_INPUTS, Projection, logit_transform, token_pass
from .preemption import PreemptionCallback, TrainingPreempted
from .qhead import (HEADS_ATTRIBUTE, HEADS_FILE, is_head_parameter, load_heads, save_heads, save_master_heads,
                    split_heads)
from .rollouts import (HeadFreeVLLMGeneration, check_vllm_memory, completion_token_ids, prompt_limit, prompts_too_long,
                       configure_vllm_generation, sampled_log_probs, teacher_completions,
                       vllm_correction, wait_for_vllm_server)
from .runlock import LOCK_FILE, lock_output_dir
from .shm import release_deepspeed_shm
from .teacher import (ServedTeacher, check_cached_dataset, load_teacher, pad_top_k, served_head, shared_vocab_size,
                      suppress_padded_rows)
from .vllm_cpu import vllm_generation_class

__all__ = ["AMMTrainer", "ObjectiveCallback", "HEADS_FILE", "HeadFreeVLLMGeneration", "wait_for_vllm_server"]


class ObjectiveCallback(TrainerCallback):
    """Feeds the objective's state the evaluation loss that drives it (with several eval sets, the first one; explicit
    `evaluate` calls with another prefix leave it alone)."""

    def __init__(self, state: Checkpointed, eval_dataset: Callable[[], object]) -> None:
        self.state, self.eval_dataset = state, eval_dataset

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs) -> None:
        eval_dataset = self.eval_dataset()
        driving = ["eval"] + ([f"eval_{next(iter(eval_dataset))}"] if isinstance(eval_dataset, dict) else [])
        for prefix in driving:
            if metrics is not None and f"{prefix}_loss" in metrics:
                metrics.update(self.state.on_evaluate(metrics[f"{prefix}_loss"], prefix))
                return


class AMMTrainer(DistillationTrainer):
    """Distills `teacher_model` into `model` with the objective `args.objective` (see `AMMConfig`).

    Used exactly like `trl.DistillationTrainer`:

    ```python
    trainer = AMMTrainer(model="student", teacher_model="teacher", args=AMMConfig(...), train_dataset=ds)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "distillation", "amm-trl"]
    _name = "amm-trl"
    _paper = AMM_PAPER

    def __init__(self, model: str | PreTrainedModel, teacher_model: str | PreTrainedModel | None = None,
                 args: AMMConfig | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, callbacks: list[TrainerCallback] | None = None,
                 optimizers: tuple[Any, Any] = (None, None), quantization_config: Any = None,
                 peft_config: Any = None) -> None:
        args = AMMConfig("amm-trl-output") if args is None else args
        if not isinstance(args, AMMConfig):
            raise TypeError(f"args must be an AMMConfig, got {type(args).__name__}.")
        if args.process_index == 0:
            lock_output_dir(args.output_dir)  # one run per output_dir; refused here, before any model loads
        objective = get_objective(args)
        off_column = (args.off_policy_column if objective.data.off_policy and args.off_policy_source == "dataset"
                      else None)
        check_dataset(train_dataset, "train_dataset", off_column)
        check_dataset(eval_dataset, "eval_dataset", off_column)
        if args.teacher_placement == "cache":
            for dataset in (train_dataset, eval_dataset):
                if dataset is not None:
                    check_cached_dataset(dataset, args.off_policy_column)
        elsewhere = teacher_model or args.teacher_model_name_or_path  # a served or cached teacher's name, if given
        if args.teacher_placement != "local" and isinstance(elsewhere, str):
            check_teacher_tokenizer(model, elsewhere, processing_class)  # its ids must be the student's
        head = served_head(elsewhere, args)  # (layer, config) or None
        served = (ServedTeacher(args.teacher_server_base_url, args.teacher_top_k, args.teacher_server_timeout,
                                args.teacher_server_output, head[1].hidden_size if head else None,
                                request_timeout=args.teacher_server_request_timeout)
                  if args.teacher_placement != "local" and args.teacher_server_base_url else None)
        if args.use_vllm and args.vllm_mode == "server" and args.process_index == 0:  # where TRL's client runs
            wait_for_vllm_server(args, model)  # before loading any model: fail fast
        check_vllm_memory(args, model)
        teacher = load_teacher(teacher_model, args, objective, model, processing_class)  # tokenizer checked first
        # TRL builds our generator where it builds its own (on vLLM's CPU build: with the syncs that work there).
        with trl_builds_generation(vllm_generation_class(HeadFreeVLLMGeneration)):
            super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        release_deepspeed_shm()  # DeepSpeed's CPU allreduce buffers leave /dev/shm once every rank has mapped them
        self.objective_unit = objective
        self._pending_metrics, self._step_losses, self._plan, self._prompt_warned = {}, [], None, False
        self.served_teacher = served  # None: the teacher is local (or the objective never reads it)
        self._setup_teacher(teacher, head)
        self._setup_objective_modules(optimizers)
        if self.use_vllm:
            configure_vllm_generation(self.vllm_generation, args, self.accelerator.is_main_process)
        self.preemption = PreemptionCallback(self.accelerator)  # SIGTERM: checkpoint at the end of the step, then stop
        if objective.state is not None:
            self.add_callback(ObjectiveCallback(objective.state, lambda: self.eval_dataset))
        self.add_callback(self.preemption)
        self.check_prompt_lengths({"train_dataset": train_dataset, "eval_dataset": eval_dataset})

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """TRL's model card, naming the objective, the paper of its method (AMM's for `amm`, the baseline's own
        otherwise) and the student and teacher it was distilled between (TRL's card names no base model when the
        student was loaded from a local folder)."""
        objective = self.args.objective
        self._paper = OBJECTIVES[objective].info.paper or {}  # this run's
        self._name = f"amm-trl (objective `{objective}`)"
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        student = self.accelerator.unwrap_model(self.model).config._name_or_path
        teacher = self.args.teacher_model_name_or_path or "the teacher given to AMMTrainer"
        with open(path) as f:
            card = f.read()
        card = card.replace("This model is a fine-tuned version of [None](https://huggingface.co/None)",
                            f"This model is `{student}` distilled from `{teacher}`")
        card = card.replace('pipeline("text-generation", model="None"',
                            f'pipeline("text-generation", model="{self.hub_model_id or self.args.output_dir}"')
        with open(path, "w") as f:
            f.write(card)

    def push_to_hub(self, *args, **kwargs) -> Any:
        """`Trainer.push_to_hub`, without the run's lock file and (unless `hub_push_q_heads`) the Q-heads file."""
        with hub_ignores(self._hub_ignore_patterns()):
            return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        with hub_ignores(self._hub_ignore_patterns()):
            super()._push_from_checkpoint(checkpoint_folder)

    def _hub_ignore_patterns(self) -> list[str]:
        return [LOCK_FILE] + ([] if self.args.hub_push_q_heads else [HEADS_FILE])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs) -> Any:
        """`Trainer.train`. `resume_from_checkpoint` True or "latest" resumes from the newest *complete* checkpoint
        (an incomplete folder, or one of another model, is refused before any state loads; `checkpoints.py`). After a
        preemption signal (`amm_trl.preemption`) it saves, then raises `TrainingPreempted` (a `SystemExit` with status
        128 + the signal's number)."""
        resume = resume_folder(resume_from_checkpoint, self.args.output_dir, self.accelerator.is_main_process)
        if resume:
            model = self.accelerator.unwrap_model(self.model)
            check_resume_shapes(resume, {name: tuple(getattr(p, "ds_shape", None) or p.shape)
                                         for name, p in model.named_parameters()})
        try:
            output = super().train(resume, *args, **kwargs)
        finally:
            self.preemption.restore()  # a failed run leaves no handler behind that would swallow a later SIGTERM
        if self.preemption.stopped_at is not None:
            step = self.preemption.stopped_at
            raise TrainingPreempted(self.preemption.signum, step,
                                    os.path.join(self.args.output_dir, f"checkpoint-{step}"))
        return output

    # ----------------------------------------------------------------------------------------------- setup
    def _setup_teacher(self, teacher: PreTrainedModel | None, head: tuple[nn.Module, Any] | None = None) -> None:
        """The local teacher (sharded like the student), or only the output layer of a teacher served as hidden
        states (`head`: the layer and the teacher's config); the vocabulary both distributions share."""
        student_config = self.model.config.get_text_config()
        self.vocab_size, self._teacher_hidden_size = student_config.vocab_size, student_config.hidden_size
        self._transforms = (logit_transform(student_config), None)
        self.teacher_model, self._teacher_head = None, None
        if head is not None:
            self._teacher_head = head[0].to(self.accelerator.device)
            teacher_config = head[1]
            self.vocab_size = shared_vocab_size(student_config.vocab_size, teacher_config.vocab_size,
                                                len(self._tokenizer), self.objective_unit)
            self._teacher_hidden_size = teacher_config.hidden_size
            self._transforms = (self._transforms[0], logit_transform(teacher_config))
            suppress_padded_rows(self.generation_config, self.generation_kwargs, self.vocab_size,
                                 max(student_config.vocab_size, teacher_config.vocab_size))
        if teacher is not None:
            teacher_config = teacher.config.get_text_config()
            self.vocab_size = shared_vocab_size(student_config.vocab_size, teacher_config.vocab_size,
                                                len(self._tokenizer), self.objective_unit)
            self._teacher_hidden_size = teacher_config.hidden_size
            self._transforms = (self._transforms[0], logit_transform(teacher_config))
            teacher.requires_grad_(False)  # frozen: no gradient buffers, and no gradient computed for its lm_head
            suppress_padded_rows(self.generation_config, self.generation_kwargs, self.vocab_size,
                                 max(student_config.vocab_size, teacher_config.vocab_size))
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.chunk_size = auto_chunk_size(self.vocab_size, self.args.loss_chunk_tokens)

    def _setup_objective_modules(self, optimizers: tuple[Any, Any]) -> None:
        adversary = self.objective_unit.adversary
        self.q_heads = None
        if adversary is not None:
            self.q_heads = adversary.build(self.model, self._teacher_hidden_size, self.vocab_size)
            if optimizers[0] is not None:
                raise ValueError(
                    f"AMMTrainer got optimizers=(optimizer, scheduler), but objective {self.args.objective!r} trains "
                    "Q-heads that the trainer creates after that optimizer, so they would be in no parameter group. "
                    "Pass optimizers=(None, None) and set learning_rate / q_head_lr_multiplier (or subclass "
                    "AMMTrainer and override create_optimizer, adding `self.q_heads.parameters()` as a group).")
            self.model.add_module(HEADS_ATTRIBUTE, self.q_heads)
        # The loss reads the student `lm_head` and the Q-heads directly: a parameter-free submodule whose forward
        # computes it lets ZeRO-3 gather them around the loss's forward and backward (see `chunked.py`).
        self.loss_module = ChunkedLoss()
        self.model.add_module("amm_loss", self.loss_module)
        head = self.model.get_output_embeddings()
        self.loss_module.register_trainable_weights(
            [head.weight, head.bias] + (list(self.q_heads.parameters()) if self.q_heads is not None else []))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or self.q_heads is None:
            return super().create_optimizer(model)
        head_params = list(self.q_heads.parameters())
        for p in head_params:  # build TRL/transformers' student groups without the heads ...
            p.requires_grad_(False)
        try:
            super().create_optimizer(model)
        finally:
            for p in head_params:
                p.requires_grad_(True)
        for group in self.objective_unit.adversary.param_groups():  # ... then the adversary's own groups
            self.optimizer.add_param_group(group)
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ step
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """TRL's step; its loss is kept for the divergence check of the optimizer step (`guards.py`)."""
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except RuntimeError as exc:  # torch.multinomial on inf/nan probabilities while the student samples
            if "probability tensor contains" not in str(exc):
                raise
            raise NonFiniteTrainingError(self._divergence_message(
                "the student's next-token probabilities became inf/nan while it sampled rollouts (its weights, "
                f"max |w| = {max_abs_weight(self.model):.3g} after the previous step, overflow the logits)")) from exc
        self._step_losses.append(loss.detach().float().reshape(()))
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | float | None = None) -> Any:
        """Called once per optimizer step, after backward and clipping, before `optimizer.step()`: stops training
        if the step's loss on any process or the gradient norm is not finite (with fp16 loss scaling an infinite
        norm is an overflow the scaler skips)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        losses, self._step_losses = self._step_losses, []
        device = self.accelerator.device
        local = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
        per_process = self.accelerator.gather(local.to(device)[None]).tolist()  # every process decides alike
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if (not math.isfinite(norm) and not self.args.fp16) or not all(map(math.isfinite, per_process)):
            raise NonFiniteTrainingError(self._divergence_message(
                f"loss {', '.join(f'{v:.6g}' for v in per_process)} (per process), gradient norm {norm:.6g} "
                f"(before clipping)"))
        return grad_norm

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clipping as the adversary asks (by default the Trainer's joint clip of the student and its heads)."""
        adversary = self.objective_unit.adversary
        return super()._clip_grad_norm(model) if adversary is None else adversary.clip(model, super()._clip_grad_norm)

    # ------------------------------------------------------------------------------------------------ data
    def _step_info(self) -> Step:
        return Step(self.state.global_step, self.state.max_steps or self.args.max_steps,  # set once training starts
                    self.accelerator.process_index, self.model.training)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        step = self._step_info()
        plan = self._plan = self.objective_unit.plan(len(inputs), step)  # its sampler is read by the rollouts
        for name, value in plan.metrics.items():
            self._metrics["train" if step.training else "eval"][name].append(value)
        if plan.rollouts:
            output = self._rollouts(inputs, step)
        elif plan.replay is not None:
            output = self._padded_prompts([p for p, _ in plan.replay])
        else:
            output = self._padded_prompts(self._tokenize_prompts([x["prompt"] for x in inputs])[0])
        if plan.off_policy:
            if plan.replay is not None:
                completions = [c for _, c in plan.replay]
            elif self.args.teacher_placement == "cache":
                completions = self._cached_completions(inputs, output)
            elif self.args.off_policy_source == "teacher" and self.served_teacher is not None:
                completions = self.served_teacher.generate(_rows(output["prompt_ids"], output["prompt_mask"]),
                                                           self.max_completion_length, self.temperature,
                                                           self.generation_config.top_p or 1.0, self.eos_token_ids)
            elif self.args.off_policy_source == "teacher":
                completions = teacher_completions(self.teacher_model, self.accelerator,
                                                  self.args.ds3_gather_for_generation, output["prompt_ids"],
                                                  output["prompt_mask"], self.generation_config, self.eos_token_ids)
            else:
                completions = [completion_token_ids(self._tokenizer, x["prompt"], x[self.args.off_policy_column],
                                                    self.eos_token_ids, self.max_completion_length,
                                                    self.chat_template_kwargs) for x in inputs]
            self._add_off_policy(output, completions, step)
            if self.args.teacher_placement == "cache" and plan.replay is None:
                output.update(self._cached_top_k(inputs, output))
            elif self.served_teacher is not None and self.objective_unit.info.reads_teacher:
                output.update(self._served_teacher_values(output, KINDS["off"]))
        return output

    def _served_teacher_values(self, output: dict[str, Any], kind: Kind) -> dict[str, torch.Tensor]:
        """The served teacher's values of one kind's completions, as the batch's keys of that kind: its top-k
        log-probs, or its last hidden states (`teacher_hidden`, (B, T, H), zeros at padding)."""
        completion_ids = output[kind.ids]
        prompts, completions = _rows(output["prompt_ids"], output["prompt_mask"]), _rows(completion_ids,
                                                                                         output[kind.mask])
        if self._teacher_head is not None:
            rows = self.served_teacher.hidden_states(prompts, completions)
            hidden = torch.zeros(len(rows), completion_ids.size(1), rows[0].size(-1))
            for i, h in enumerate(rows):
                hidden[i, :len(h)] = h
            return {kind.prefix + "teacher_hidden": hidden.to(completion_ids.device)}
        scored = self.served_teacher.score(prompts, completions)
        top_k = pad_top_k(scored["ids"], scored["log_probs"], scored["token_log_prob"], completion_ids.size(1),
                          self.args.teacher_top_k, self.vocab_size, completion_ids.device)
        return {kind.prefix + name: value for name, value in top_k.items()}

    def _cached_completions(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> list[list[int]]:
        """The cached completions' token ids, after checking that each row's cached prompt is the prompt as this
        trainer renders it (the top-k log-probs were computed after it)."""
        for x, prompt in zip(inputs, _rows(output["prompt_ids"], output["prompt_mask"]), strict=True):
            if list(x["prompt_ids"]) != prompt:
                raise ValueError(
                    f"teacher_placement 'cache': the cached prompt_ids of the row with prompt "
                    f"{str(x['prompt'])[:80]!r} ({len(x['prompt_ids'])} tokens) differ from the prompt this trainer "
                    f"renders ({len(prompt)} tokens; a different tokenizer or chat template, or max_prompt_length cut "
                    f"it): regenerate the cache with the student's tokenizer (`amm-trl generate --teacher_top_k`), or "
                    f"raise max_prompt_length.")
        return [list(x["completion_ids"])[:self.max_completion_length] for x in inputs]

    def _cached_top_k(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, torch.Tensor]:
        kind = KINDS["off"]
        rows = [top_k_of(x) for x in inputs]  # either codec of `amm-trl generate --teacher_top_k_codec`
        top_k = pad_top_k([r["ids"] for r in rows], [r["log_probs"] for r in rows],
                          [r["token_log_prob"] for r in rows],
                          output[kind.ids].size(1), self.args.teacher_top_k, self.vocab_size, output[kind.ids].device)
        return {kind.prefix + name: value for name, value in top_k.items()}

    def _rollouts(self, inputs: list[dict[str, Any]], step: Step) -> dict[str, Any]:
        """TRL's student rollouts, their throughput, the objective's scoring, and the vLLM importance weights."""
        mode = "train" if step.training else "eval"
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        elapsed = time.perf_counter() - start
        if self.served_teacher is not None and self.objective_unit.info.reads_teacher:
            output.update(self._served_teacher_values(output, KINDS["on"]))
        tokens = self.accelerator.gather(output["completion_mask"].sum()).sum().item()
        self._metrics[mode]["rollout/tokens_per_second"].append(tokens / max(elapsed, 1e-9))
        correct = self.use_vllm and self.args.vllm_importance_sampling_correction
        needed = set(self.objective_unit.data.scores) | ({"logp_student"} if correct else set())
        scores = self._rollout_log_probs(output, teacher="logp_teacher" in needed) if needed else {}
        self._log_means(self.objective_unit.on_rollouts(output, scores, step), mode)
        if correct:
            # Stored in the batch, so TRL's shuffle and split over the gradient-accumulation steps and replays keep
            # the weights aligned with their tokens.
            mask = output["completion_mask"]
            output["vllm_is_weight"], metrics = vllm_correction(
                self.args, scores["logp_student"], sampled_log_probs(self.vllm_generation, mask), mask,
                self.accelerator.gather)
            for name, value in metrics.items():
                self._metrics[mode][name].append(value)
        return output

    def _add_off_policy(self, output: dict[str, Any], completions: list[list[int]], step: Step) -> None:
        device = self.accelerator.device
        ids = [torch.tensor(c, dtype=torch.long) for c in completions]
        output["off_completion_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id,
                                           padding_side="right").to(device)
        output["off_completion_mask"] = pad([torch.ones_like(c) for c in ids], padding_value=0,
                                            padding_side="right").to(device)
        output["num_off_items"] = self.accelerator.gather(output["off_completion_mask"].sum()).sum()
        self._metrics["train" if step.training else "eval"]["off_policy/mean_length"].append(
            self.accelerator.gather(output["off_completion_mask"].sum(1).float()).mean().item())

    def _padded_prompts(self, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and mask, as TRL lays out a batch (for steps without student rollouts)."""
        ids = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
        device = self.accelerator.device
        return {
            "prompt_ids": pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            "prompt_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(device),
        }

    @torch.no_grad()
    def _rollout_log_probs(self, output: dict[str, Any], teacher: bool = False) -> dict[str, torch.Tensor]:
        """Log-probs of the rollout tokens under the rollout-time student (and the teacher), (B, T) fp32, 0 at
        padding (`logp_student`, `logp_teacher`): one no-grad forward each, projected as the loss projects them."""
        c_ids, c_mask = output["completion_ids"], output["completion_mask"]
        input_ids = torch.cat([output["prompt_ids"], c_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], c_mask], dim=1)
        width, valid = c_ids.size(1), c_mask.bool()
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as student:
            h_s = self._get_last_hidden_state(student, input_ids, attention_mask, width)
            token_inputs = {"student_hidden": h_s[valid], "target_ids": c_ids[valid]}
            h_t = self._teacher_hidden(output, [KINDS["on"]], input_ids, attention_mask, width) if teacher else None
            if h_t is not None:
                token_inputs["teacher_hidden"] = h_t[valid]
            projection = self._projection(self.accelerator.unwrap_model(self.model), h_t is not None)
            fn, params = token_pass([], projection, self._step_info())
            weights = torch.zeros(int(valid.sum()), device=h_s.device)
            _, metrics = self._chunked(token_inputs, weights, fn, params)
        if teacher and h_t is None:  # a top-k teacher: the served log-prob of each taken token
            metrics["logp_teacher"] = output["teacher_token_logprob"][valid]
        result = {}
        for name in ("logp_student", "logp_teacher")[:1 + teacher]:
            result[name] = torch.zeros(valid.shape, device=h_s.device, dtype=torch.float32)
            result[name][valid] = metrics[name].float()
        return result

    def _generate_single_turn(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                              has_tool_images: bool = False) -> Any:
        """TRL's HF-`generate` rollouts, with the plan's sampler (MiniLLM's teacher-mixed sampling)."""
        sampler = self._plan.sampler if self._plan is not None else None
        if self.use_vllm or sampler is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        student = self.accelerator.unwrap_model(self.model)
        with unwrap_model_for_generation(self.teacher_model, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as teacher, \
                extra_logits_processor(student, lambda mask: sampler(teacher, self.vocab_size, self.temperature,
                                                                     mask)):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """A generation batch serves `data.reuse` optimizer steps (TRL regenerates every
        `gradient_accumulation_steps` micro-steps; here only every `reuse` times that). The dataloader's prompts of
        the replayed steps are not used."""
        ga, reuse = self.args.gradient_accumulation_steps, self.objective_unit.data.reuse
        if (self.model.training and reuse > 1 and self._buffered_inputs is not None
                and self._step % (ga * reuse) != 0):
            return self._buffered_inputs[self._step % ga]
        return super()._prepare_inputs(generation_batch)

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        self._pending_metrics = {}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_pending_metrics()
        return result

    def _projection(self, student: PreTrainedModel, teacher: bool) -> Projection:
        t_head = None
        if teacher:
            t_head = (self._teacher_head if self._teacher_head is not None
                      else self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings())
        return Projection(student.get_output_embeddings(), t_head, self.vocab_size, self.temperature,
                          *self._transforms, teacher_top_k=self.args.teacher_local_top_k,
                          taken_bucket=self.args.teacher_top_k_taken_bucket)

    def _compute_loss(self, unwrapped_student: PreTrainedModel, inputs: dict[str, Any],
                      num_items_in_batch: Any) -> Any:
        objective = self.objective_unit
        if objective.info.trl_loss:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        kinds = [kind for kind in KINDS.values() if kind.ids in inputs]
        width = max(inputs[kind.ids].size(1) for kind in kinds)
        # right-pad every kind to one width: one student and one teacher forward for all of them
        completion_ids = torch.cat([torch.nn.functional.pad(inputs[kind.ids], (0, width - inputs[kind.ids].size(1)),
                                                            value=self._tokenizer.pad_token_id) for kind in kinds])
        completion_mask = torch.cat([torch.nn.functional.pad(inputs[kind.mask], (0, width - inputs[kind.mask].size(1)))
                                     for kind in kinds])
        batch = inputs["prompt_ids"].size(0)
        input_ids = torch.cat([inputs["prompt_ids"].repeat(len(kinds), 1), completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"].repeat(len(kinds), 1), completion_mask], dim=1)
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, width)
        h_t = (self._teacher_hidden(inputs, kinds, input_ids, attention_mask, width)
               if objective.info.reads_teacher else None)  # None with a top-k teacher: its top-k is in the batch
        projection, step = self._projection(unwrapped_student, h_t is not None), self._step_info()

        def by_kind(x: torch.Tensor | None) -> dict[str, torch.Tensor | None]:  # the kinds' rows, by name
            return dict(zip([kind.name for kind in kinds], x.split(batch) if x is not None else [None] * len(kinds)))

        ids, valid, student, teacher = map(by_kind, (completion_ids, completion_mask.bool(), h_s, h_t))
        terms = objective.terms()
        loss, parts = torch.zeros((), device=h_s.device), {}
        for kind in kinds:
            part_loss, parts[kind.name] = self._part_loss(kind, terms[kind.name], projection, step, ids[kind.name],
                                                          valid[kind.name], student[kind.name], teacher[kind.name],
                                                          inputs)
            loss = loss + part_loss
        context = LossContext(self._chunked, projection,
                              batch * (self.args.gradient_accumulation_steps if step.training else 1), step)
        sequence = objective.sequence_loss(parts, context)
        if sequence is not None:
            sequence_loss, sequence_metrics = sequence
            loss = loss + sequence_loss
            self._add_metrics(sequence_metrics)
        entropy = sum(part.metrics["entropy"].sum() for part in parts.values())
        n_valid = sum(part.valid.sum() for part in parts.values())
        return loss, entropy, n_valid

    def _chunked(self, token_inputs: dict[str, torch.Tensor], weights: torch.Tensor, fn: Callable,
                 params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The chunked engine, run as the forward of the student's loss submodule (ZeRO-3 gathers its weights)."""
        return self.loss_module(token_inputs, weights, LossSpec(fn, params, self.chunk_size))

    def _teacher_hidden(self, batch: dict[str, Any], kinds: list[Kind], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, width: int) -> torch.Tensor | None:
        """The teacher's last hidden states over the last `width` positions of the kinds' rows: its forward here (a
        local teacher), or the served ones the batch carries (`teacher_server_output: hidden_states`); None for a
        top-k teacher."""
        if self.teacher_model is not None:
            return self._teacher_hidden_states(input_ids, attention_mask, width)
        if self._teacher_head is not None:
            return torch.cat([_pad_width(batch[kind.prefix + "teacher_hidden"], width) for kind in kinds])
        return None

    @torch.no_grad()
    def _teacher_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               width: int) -> torch.Tensor:
        """The frozen teacher's last hidden states over the last `width` positions, through its own engine (so
        ZeRO-3 gathers its layers), as TRL runs it."""
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids,
                                         attention_mask, width)

    def _part_loss(self, kind: Kind, terms: list[Term], projection: Projection, step: Step,
                   completion_ids: torch.Tensor, valid: torch.Tensor, h_s: torch.Tensor, h_t: torch.Tensor | None,
                   inputs: dict[str, Any]) -> tuple[torch.Tensor, Part]:
        """Loss of one data kind (rollouts or off-policy completions), already weighted for the global reduction."""
        fn, params = token_pass(terms, projection, step)
        weights = self._token_weights(kind, valid, inputs, h_s.device)
        token_inputs = {"student_hidden": h_s[valid], "target_ids": completion_ids[valid]}
        if h_t is not None:
            token_inputs["teacher_hidden"] = h_t[valid]
        elif kind.prefix + TOP_K_INPUTS[0] in inputs:  # a served or cached teacher's top-k
            token_inputs.update({name: _top_k_per_token(inputs[kind.prefix + name], valid) for name in TOP_K_INPUTS})
        token_inputs.update({key: _per_token(inputs[key], valid) for term in terms for key in term.inputs})
        loss, metrics = self._chunked(token_inputs, weights, fn, params)
        self._add_metrics({f"{name}/{kind.name}": (column.sum(), column.numel()) for name, column in metrics.items()})
        return loss, Part(kind=kind.name, completion_ids=completion_ids, valid=valid, student_hidden=h_s,
                          teacher_hidden=h_t, weights=weights, metrics=metrics)

    def _token_weights(self, kind: Kind, valid: torch.Tensor, inputs: dict[str, Any],
                       device: torch.device) -> torch.Tensor:
        """Per valid token: 1 / the loss-token count it is reduced by, times the kind's per-token weight (vLLM's
        importance weight on rollouts) where the batch has one. The objective's own weights are in its terms."""
        if self.model.training and inputs.get(kind.count) is not None:
            # Global loss-token count of the generation batch / world size: the sum over grad-accumulation steps and
            # ranks (DDP/DeepSpeed average) then reduces exactly as TRL does (`loss_is_scaled_for_ga`).
            denominator = inputs[kind.count].clamp(min=1).float() / self.accelerator.num_processes
        else:
            denominator = valid.sum().clamp(min=1).float()
        weights = torch.ones(int(valid.sum()), device=device) / denominator.to(device)
        if kind.token_weight in inputs:  # vLLM sampling correction: rollout tokens only, detached
            weights = weights * _per_token(inputs[kind.token_weight], valid).to(device)
        return weights

    # --------------------------------------------------------------------------------------------- metrics
    def _add_metrics(self, metrics: Metrics) -> None:
        """The step's metrics, (local sum, local count) each, logged once per micro-batch (`_log_pending_metrics`)."""
        for name, (total, count) in metrics.items():
            self._pending_metrics[name] = (total.detach().float(), float(count))

    def _log_means(self, sums: dict, mode: str) -> None:
        """Logs sum / count of each (local sum, local count) across ranks, in one collective."""
        if not sums:
            return
        local = torch.stack([torch.stack([s.float(), torch.as_tensor(n, device=s.device).float()])
                             for s, n in sums.values()])
        total = self.accelerator.gather(local[None]).sum(0)
        for name, (value, count) in zip(sums, total.tolist()):
            self._metrics[mode][name].append(value / max(count, 1.0))

    def _log_pending_metrics(self) -> None:
        """Gathers the step's metric sums and counts across ranks in one collective (outside the model forward)."""
        if not self._pending_metrics:
            return
        mode = "train" if self.model.training else "eval"
        names = sorted(self._pending_metrics)
        device = self.accelerator.device
        local = torch.stack([torch.stack([self._pending_metrics[n][0].to(device),
                                          torch.tensor(self._pending_metrics[n][1], device=device)]) for n in names])
        total = self.accelerator.gather(local[None]).sum(0)
        for name, (value, count) in zip(names, total.tolist()):
            if count > 0:
                self._metrics[mode][name].append(value / count)
        if torch.cuda.is_available():
            self._metrics[mode]["memory/peak_gib"].append(torch.cuda.max_memory_allocated() / 2**30)
        else:
            self._metrics[mode]["memory/peak_rss_gib"].append(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        self._pending_metrics = {}

    # --------------------------------------------------------------------------------------------- prompts
    # Prompts never run past the models' context: with `max_prompt_length` longer ones are cut from the left (the end
    # holds the question and the generation prompt), counted in a warning and `prompts/truncated`; without it they
    # are refused. Map-style datasets are checked once at start, every batch as it is tokenized.
    def check_prompt_lengths(self, datasets: dict[str, Any]) -> None:
        """Checks every prompt of the map-style datasets once, before training starts."""
        flat = {}
        for name, dataset in datasets.items():  # an eval dict holds several named sets
            flat.update({f"{name}[{k!r}]": v for k, v in dataset.items()} if isinstance(dataset, dict)
                        else {name: dataset})
        for name, dataset in flat.items():
            if dataset is None or not hasattr(dataset, "__len__") or "prompt" not in (dataset.column_names or []):
                continue
            lengths = []
            for start in range(0, len(dataset), 1024):
                lengths += [len(ids) for ids in super()._tokenize_prompts(dataset[start:start + 1024]["prompt"])[0]]
            self._prompts_too_long(lengths, name)

    def _prompts_too_long(self, lengths: list[int], where: str) -> int:
        """Warns once about (or refuses) the prompts longer than the limit; returns how many are cut."""
        teacher = getattr(self, "teacher_model", None)
        teacher_config = self.accelerator.unwrap_model(teacher).config if teacher is not None else None
        limit, why = prompt_limit(self.args, self.max_completion_length, self.model.config, teacher_config)
        warning = prompts_too_long(lengths, where, limit, why, cut_allowed=self.args.max_prompt_length is not None)
        if warning is None:
            return 0
        if not self._prompt_warned and self.accelerator.is_main_process:
            warnings.warn(warning)
        self._prompt_warned = True
        return sum(n > limit for n in lengths)

    def _tokenize_prompts(self, prompts: list) -> Any:
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        cut = self._prompts_too_long([len(ids) for ids in prompt_ids], "this batch")
        if cut:
            prompt_ids = [ids[-self.args.max_prompt_length:] for ids in prompt_ids]
        if self.args.max_prompt_length is not None:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["prompts/truncated"].append(cut / max(len(prompt_ids), 1))
        return prompt_ids, images, multimodal_fields

    # ----------------------------------------------------------------------------------------- checkpoints
    # A checkpoint folder is complete exactly when its `trainer_state.json` is valid (`checkpoints.py`): a stale
    # folder of an earlier run is removed before the step is saved again, and every process finishes its files
    # before the main process writes `trainer_state.json`. Besides the Trainer's files it holds the Q-heads in their
    # own file (the student stays a plain `from_pretrained` model), DeepSpeed's fp32 master copy of the heads, and
    # each process's objective state. Nothing non-finite is saved (`guards.py`).
    def check_finite_weights(self, what: str) -> None:
        """Raises `NonFiniteTrainingError` (on every process) if any trainable weight is inf/nan."""
        if not weights_finite_everywhere(self.model, self.accelerator):
            raise NonFiniteTrainingError(self._divergence_message(
                f"the weights after step {self.state.global_step} are not finite, so {what} is not written"))

    def _divergence_message(self, what: str) -> str:
        return divergence_message(self.args, self.state.global_step + 1, self.optimizer, what)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.check_finite_weights(os.path.basename(folder))
        if self.args.should_save:
            remove_stale_checkpoint(folder)
        self.accelerator.wait_for_everyone()  # nobody writes into the folder before the stale one is gone
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:
            full = disk_full_message(exc, folder, self.args.output_dir)
            if full is None:
                raise
            raise OSError(errno.ENOSPC, full) from exc

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()  # the main process writes trainer_state.json next: everyone is done

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the student as a plain `from_pretrained` model and the Q-heads beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.q_heads is None:
            return super()._save(output_dir, state_dict)
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        student, heads = split_heads(state_dict, self.q_heads)
        super()._save(output_dir, state_dict=student)
        if heads and self.args.should_save:
            save_heads(heads, output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.q_heads is not None and self.is_deepspeed_enabled:  # the fp32 master heads, not the 16-bit copies
            save_master_heads(self.q_heads, output_dir, self.args.should_save)
        save_state(self.objective_unit, output_dir, self.args.process_index)  # every rank: the states differ

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Every resume path (plain, DDP, DeepSpeed) runs it, after the model; no callback event gets the checkpoint.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_state(self.objective_unit, checkpoint, self.args.process_index, self.args.world_size)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # DeepSpeed restores the heads from its own engine checkpoint; other paths read the heads file.
        if self.q_heads is not None and not self.is_deepspeed_enabled:
            load_heads(self.q_heads, resume_from_checkpoint, str(self.args.device))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # The Q-heads live in their own file (loaded right after the model), so their absence from the model file
        # is no news: the Trainer would report them as "missing keys" on every resume.
        missing = [k for k in load_result.missing_keys if not is_head_parameter(k)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The unpadded token ids of each row."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _pad_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """A (B, T', ...) batch tensor right-padded with zeros (or cut) to (B, width, ...)."""
    if values.size(1) < width:
        values = torch.cat([values, values.new_zeros(values.size(0), width - values.size(1), *values.shape[2:])], 1)
    return values[:, :width]


def _top_k_per_token(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A (B, T', ...) top-k batch tensor at the valid positions of the (B, T) completions (T' <= T)."""
    return _pad_width(values, valid.size(1))[valid]


def _per_token(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A (B, T') per-token batch tensor at the valid positions of the (B, T) completions (T' <= T: right-padded)."""
    return torch.nn.functional.pad(values, (0, valid.size(1) - values.size(1)))[valid].float()
