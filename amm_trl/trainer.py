"""`AMMTrainer`: TRL's `DistillationTrainer` running any objective of `amm_trl.objectives` (AMM and the baselines).

What TRL already does is kept: the generation buffer (rollouts once per optimizer step), HF `generate` / vLLM
colocate or server rollouts and weight sync, ZeRO-3 teacher preparation, PEFT handling, logging. The trainer asks the
objective unit (`self.objective_unit`) what to do and never branches on its name. The hooks overridden:

- `__init__`: loads the teacher itself (TRL refuses a padded vocabulary, e.g. 151936 vs 152064, that shares the
  tokenizer's rows), attaches the objective's modules (AMM's Q-heads) to the student (one DeepSpeed engine, one
  backward) and keeps them out of vLLM syncs; in vLLM server mode it first waits for the server.
- `_generate_and_score_completions`: the objective's data schedule: student rollouts, off-policy completions (dataset
  column or online teacher generation) or replayed rollouts; rollout scoring; vLLM importance weights.
- `_compute_loss`: one student and one teacher forward over rollouts + off-policy completions, then the objective's
  per-token loss, chunked over the vocabulary (`chunked.py`), plus its sequence-level terms.
- `create_optimizer`: the objective's modules get their own parameter groups; `_clip_grad_norm`: the objective's
  clipping (by default the Trainer's).
- `training_step` / `_get_grad_norm`: training stops at the first step whose loss or gradient norm is not finite,
  before the optimizer applies it (the guard's other checks and its message: `guards.py`).
- `_prepare_inputs`: a generation batch may serve several optimizer steps (MiniLLM's `ppo_epochs`).
- `_generate_single_turn`: an objective's logits processor inside HF `generate` (MiniLLM's teacher-mixed sampling).
- Mixins: checkpoints that are whole or recognisably incomplete and hold the Q-heads and the objective's state
  (`checkpoints.py`), finite weights before every save (`guards.py`), prompts cut to the context (`rollouts.py`);
  `ObjectiveCallback` feeds the objective the evaluation loss.

One training step reads through this file, `rollouts.py`, `objectives/base.py`, the objective's module and
`chunked.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .checkpoints import CompleteCheckpointsMixin
from .chunked import ChunkedLoss, LossSpec, auto_chunk_size
from .config import AMMConfig
from .guards import NonFiniteGuardMixin, NonFiniteTrainingError
from .data import check_dataset
from .objectives import Objective, get_objective
from .objectives.base import KINDS, LossContext, Part, Projection, RolloutScorer, Step, logit_transform, token_function
from .preemption import PreemptionCallback, TrainingPreempted
from .qhead import HEADS_ATTRIBUTE, HEADS_FILE
from .rollouts import (HeadFreeVLLMGeneration, PromptLengthMixin, check_vllm_memory, completion_token_ids,
                       configure_vllm_generation, extra_logits_processor, sampled_log_probs, teacher_completions,
                       vllm_correction, wait_for_vllm_server)
from .runlock import LOCK_FILE, lock_output_dir
from .shm import release_deepspeed_shm
from .teacher import load_teacher, shared_vocab_size, suppress_padded_rows
from .vllm_cpu import trl_builds_generation, vllm_generation_class

__all__ = ["AMMTrainer", "ObjectiveCallback", "HEADS_FILE", "HeadFreeVLLMGeneration", "wait_for_vllm_server"]


@contextlib.contextmanager
def hub_ignores(patterns: list[str]):
    """Inside the block, the Trainer's uploads of `output_dir` to the hub (`push_to_hub`, checkpoint pushes) also
    skip `patterns` (the Trainer itself skips only `_*` and `checkpoint-*`)."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.hf_api

    class Api:
        def __getattr__(self, name):
            return getattr(original(), name)

        def upload_folder(self, *args, ignore_patterns=None, **kwargs):
            return original().upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *patterns], **kwargs)

    hf_trainer.hf_api = Api
    try:
        yield
    finally:
        hf_trainer.hf_api = original

class ObjectiveCallback(TrainerCallback):
    """Feeds the objective the evaluation loss that drives it (with several eval sets, the first one; explicit
    `evaluate` calls with another prefix leave it alone)."""

    def __init__(self, objective: Objective, eval_dataset: Callable[[], object]) -> None:
        self.objective, self.eval_dataset = objective, eval_dataset

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs) -> None:
        eval_dataset = self.eval_dataset()
        driving = ["eval"] + ([f"eval_{next(iter(eval_dataset))}"] if isinstance(eval_dataset, dict) else [])
        for prefix in driving:
            if metrics is not None and f"{prefix}_loss" in metrics:
                metrics.update(self.objective.on_evaluate(metrics[f"{prefix}_loss"], prefix))
                return


class AMMTrainer(NonFiniteGuardMixin, CompleteCheckpointsMixin, PromptLengthMixin, DistillationTrainer):
    """Distills `teacher_model` into `model` with the objective `args.objective` (see `AMMConfig`).

    Used exactly like `trl.DistillationTrainer`:

    ```python
    trainer = AMMTrainer(model="student", teacher_model="teacher", args=AMMConfig(...), train_dataset=ds)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "distillation", "amm-trl"]
    _name = "amm-trl"
    _paper = {"title": "Adversarial Moment-Matching Distillation of Large Language Models", "id": "2406.02959",
              "citation": "@inproceedings{jia2024adversarial,\n    title     = {{Adversarial Moment-Matching Distillation "
                          "of Large Language Models}},\n    author    = {Jia, Chen},\n    booktitle = {Advances in "
                          "Neural Information Processing Systems (NeurIPS)},\n    year      = 2024,\n}"}

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
        off_column = args.off_policy_column if args.uses_off_policy and args.off_policy_source == "dataset" else None
        check_dataset(train_dataset, "train_dataset", off_column)
        check_dataset(eval_dataset, "eval_dataset", off_column)
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
        self._pending_metrics, self._step_losses = {}, []
        self._setup_teacher(teacher)
        self._setup_objective_modules(optimizers)
        if self.use_vllm:
            configure_vllm_generation(self.vllm_generation, args, self.accelerator.is_main_process)
        self.preemption = PreemptionCallback(self.accelerator)  # SIGTERM: checkpoint at the end of the step, then stop
        for callback in [ObjectiveCallback(objective, lambda: self.eval_dataset), *objective.callbacks(),
                         self.preemption]:
            self.add_callback(callback)
        self.check_prompt_lengths({"train_dataset": train_dataset, "eval_dataset": eval_dataset})

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """TRL's model card, naming the objective, the paper of its method (AMM's for `amm`, the baseline's own
        otherwise) and the student and teacher it was distilled between (TRL's card names no base model when the
        student was loaded from a local folder)."""
        papers = {"amm": self._paper, "gkd": DistillationTrainer._paper, "jsd": DistillationTrainer._paper,
                  "minillm": {"title": "MiniLLM: Knowledge Distillation of Large Language Models", "id": "2306.08543"},
                  "distillm": {"title": "DistiLLM: Towards Streamlined Distillation for Large Language Models",
                               "id": "2402.03898"},
                  "pbkd": {"title": "Online Knowledge Distillation with Reward Guidance", "id": "2505.18952"}}
        objective = self.args.objective
        self._paper, self._name = papers.get(objective, {}), f"amm-trl (objective `{objective}`)"  # this run's
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

    def train(self, *args, **kwargs) -> Any:
        """`Trainer.train`; after a preemption signal (see `amm_trl.preemption`) it saves, then raises
        `TrainingPreempted` (a `SystemExit` with status 128 + the signal's number)."""
        try:
            output = super().train(*args, **kwargs)
        finally:
            self.preemption.restore()  # a failed run leaves no handler behind that would swallow a later SIGTERM
        if self.preemption.stopped_at is not None:
            step = self.preemption.stopped_at
            raise TrainingPreempted(self.preemption.signum, step,
                                    os.path.join(self.args.output_dir, f"checkpoint-{step}"))
        return output

    # ----------------------------------------------------------------------------------------------- setup
    def _setup_teacher(self, teacher: PreTrainedModel | None) -> None:
        student_config = self.model.config.get_text_config()
        self.vocab_size, self._teacher_hidden_size = student_config.vocab_size, student_config.hidden_size
        self._transforms = (logit_transform(student_config), None)
        self.teacher_model = None
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
        self.q_heads = self.objective_unit.build_modules(self.model, self._teacher_hidden_size, self.vocab_size)
        if self.q_heads is not None:
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
        for group in self.objective_unit.param_groups(self.q_heads):  # ... then the objective's own groups
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
                f"max |w| = {self._max_abs_weight():.3g} after the previous step, overflow the logits)")) from exc
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
        """Clipping as the objective asks (by default the Trainer's joint clip of the student and its heads)."""
        return self.objective_unit.clip_gradients(model, super()._clip_grad_norm)

    # ------------------------------------------------------------------------------------------------ data
    def _step_info(self) -> Step:
        return Step(self.state.global_step, self.state.max_steps or self.args.max_steps,  # set once training starts
                    self.accelerator.process_index, self.model.training)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        step = self._step_info()
        schedule = self.objective_unit.schedule(len(inputs), step)
        for name, value in schedule.metrics.items():
            self._metrics["train" if step.training else "eval"][name].append(value)
        if schedule.rollouts:
            output = self._rollouts(inputs, step)
        elif schedule.replay is not None:
            output = self._padded_prompts([p for p, _ in schedule.replay])
        else:
            output = self._padded_prompts(self._tokenize_prompts([x["prompt"] for x in inputs])[0])
        if schedule.off_policy:
            if schedule.replay is not None:
                completions = [c for _, c in schedule.replay]
            elif self.args.off_policy_source == "teacher":
                completions = teacher_completions(self.teacher_model, self.accelerator,
                                                  self.args.ds3_gather_for_generation, output["prompt_ids"],
                                                  output["prompt_mask"], self.generation_config, self.eos_token_ids)
            else:
                completions = [completion_token_ids(self._tokenizer, x["prompt"], x[self.args.off_policy_column],
                                                    self.eos_token_ids, self.max_completion_length,
                                                    self.chat_template_kwargs) for x in inputs]
            self._add_off_policy(output, completions, step)
        return output

    def _rollouts(self, inputs: list[dict[str, Any]], step: Step) -> dict[str, Any]:
        """TRL's student rollouts, their throughput, the objective's scoring, and the vLLM importance weights."""
        mode = "train" if step.training else "eval"
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        elapsed = time.perf_counter() - start
        tokens = self.accelerator.gather(output["completion_mask"].sum()).sum().item()
        self._metrics[mode]["rollout/tokens_per_second"].append(tokens / max(elapsed, 1e-9))
        scorer = RolloutScorer(lambda teacher: self._rollout_log_probs(output, teacher=teacher))
        self._log_means(self.objective_unit.on_rollouts(output, scorer, step), mode)
        if self.use_vllm and self.args.vllm_importance_sampling_correction:
            # Stored in the batch, so TRL's shuffle and split over the gradient-accumulation steps and replays keep
            # the weights aligned with their tokens.
            mask = output["completion_mask"]
            output["vllm_is_weight"], metrics = vllm_correction(
                self.args, scorer.student(), sampled_log_probs(self.vllm_generation, mask), mask,
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
    def _rollout_log_probs(self, output: dict[str, Any], teacher: bool = False) -> list[torch.Tensor]:
        """Log-probs of the rollout tokens under the rollout-time student (and the teacher), (B, T) fp32, 0 at
        padding: one no-grad forward each, projected as the loss projects them."""
        c_ids, c_mask = output["completion_ids"], output["completion_mask"]
        input_ids = torch.cat([output["prompt_ids"], c_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], c_mask], dim=1)
        width, valid = c_ids.size(1), c_mask.bool()
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as student:
            h_s = self._get_last_hidden_state(student, input_ids, attention_mask, width)
            token_inputs = [h_s[valid], c_ids[valid]]
            if teacher:
                token_inputs.append(self._teacher_hidden_states(input_ids, attention_mask, width)[valid])
            projection = self._projection(self.accelerator.unwrap_model(self.model), teacher)
            fn, params, names = token_function(None, "on", projection, self._step_info())
            weights = torch.zeros(int(valid.sum()), device=h_s.device)
            _, metrics = self.loss_module(token_inputs, weights, LossSpec(fn, params, self.chunk_size))
        result = []
        for name in ("logp_student", "logp_teacher")[:1 + teacher]:
            logp = torch.zeros(valid.shape, device=h_s.device, dtype=torch.float32)
            logp[valid] = metrics[:, names.index(name)].float()
            result.append(logp)
        return result

    def _generate_single_turn(self, prompt_ids: list[list[int]], images: Any, multimodal_fields: Any,
                              has_tool_images: bool = False) -> Any:
        """TRL's HF-`generate` rollouts, with the objective's logits processor (MiniLLM's teacher-mixed sampling)."""
        objective = self.objective_unit
        if self.use_vllm or not objective.samples_with_teacher:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        student = self.accelerator.unwrap_model(self.model)
        with unwrap_model_for_generation(self.teacher_model, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as teacher, \
                extra_logits_processor(student, lambda mask: objective.logits_processor(
                    teacher, self.vocab_size, self.temperature, mask)):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """A generation batch serves `generation_batch_reuse` optimizer steps (TRL regenerates every
        `gradient_accumulation_steps` micro-steps; here only every `reuse` times that). The dataloader's prompts of
        the replayed steps are not used."""
        ga, reuse = self.args.gradient_accumulation_steps, self.objective_unit.generation_batch_reuse
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
        t_head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings() if teacher else None
        return Projection(student.get_output_embeddings(), t_head, self.vocab_size, self.temperature,
                          *self._transforms)

    def _compute_loss(self, unwrapped_student: PreTrainedModel, inputs: dict[str, Any],
                      num_items_in_batch: Any) -> Any:
        objective = self.objective_unit
        if objective.uses_trl_loss:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        kinds = [kind for kind in KINDS if self._key(kind, "ids") in inputs]
        width = max(inputs[self._key(kind, "ids")].size(1) for kind in kinds)
        ids, masks = [], []
        for kind in kinds:  # right-pad both kinds to one width: one student and one teacher forward for all
            extra = width - inputs[self._key(kind, "ids")].size(1)
            ids.append(torch.nn.functional.pad(inputs[self._key(kind, "ids")], (0, extra),
                                               value=self._tokenizer.pad_token_id))
            masks.append(torch.nn.functional.pad(inputs[self._key(kind, "mask")], (0, extra), value=0))
        completion_ids, completion_mask = torch.cat(ids), torch.cat(masks)
        batch = inputs["prompt_ids"].size(0)
        input_ids = torch.cat([inputs["prompt_ids"].repeat(len(kinds), 1), completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"].repeat(len(kinds), 1), completion_mask], dim=1)
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, width)
        h_t = self._teacher_hidden_states(input_ids, attention_mask, width) if objective.needs_teacher else None
        projection, step = self._projection(unwrapped_student, objective.needs_teacher), self._step_info()
        loss, parts = torch.zeros((), device=h_s.device), {}
        for i, kind in enumerate(kinds):
            rows = slice(i * batch, (i + 1) * batch)
            part_loss, parts[kind] = self._part_loss(
                kind, projection, step, completion_ids[rows], completion_mask[rows].bool(), h_s[rows],
                None if h_t is None else h_t[rows], inputs)
            loss = loss + part_loss
        context = LossContext(self._run_chunked, self._add_metric, projection,
                              batch * (self.args.gradient_accumulation_steps if step.training else 1), step)
        extra = objective.extra_loss(parts, context)
        entropy = sum(part.column("entropy").sum() for part in parts.values())
        n_valid = sum(part.valid.sum() for part in parts.values())
        return (loss if extra is None else loss + extra), entropy, n_valid

    def _run_chunked(self, token_inputs: list[torch.Tensor], weights: torch.Tensor, fn: Callable,
                     params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_module(token_inputs, weights, LossSpec(fn, params, self.chunk_size))

    @torch.no_grad()
    def _teacher_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               width: int) -> torch.Tensor:
        """The frozen teacher's last hidden states over the last `width` positions, through its own engine (so
        ZeRO-3 gathers its layers), as TRL runs it."""
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids,
                                         attention_mask, width)

    @staticmethod
    def _key(kind: str, what: str) -> str:
        return f"completion_{what}" if kind == "on" else f"off_completion_{what}"

    def _part_loss(self, kind: str, projection: Projection, step: Step, completion_ids: torch.Tensor,
                   valid: torch.Tensor, h_s: torch.Tensor, h_t: torch.Tensor | None,
                   inputs: dict[str, Any]) -> tuple[torch.Tensor, Part]:
        """Loss of one data kind (rollouts or off-policy completions), already weighted for the global reduction."""
        fn, params, names = token_function(self.objective_unit, kind, projection, step)
        weights = self._token_weights(kind, valid, inputs, h_s.device)
        token_inputs = [h_s[valid], completion_ids[valid]] + ([h_t[valid]] if h_t is not None else [])
        token_inputs += [_per_token(inputs[key], valid) for key in self.objective_unit.token_input_keys(kind)]
        loss, metrics = self._run_chunked(token_inputs, weights, fn, params)
        for j, name in enumerate(names):
            self._add_metric(f"{name}/{kind}", metrics[:, j].sum(), metrics.size(0))
        return loss, Part(kind, completion_ids, valid, h_s, h_t, weights, metrics, names)

    def _token_weights(self, kind: str, valid: torch.Tensor, inputs: dict[str, Any],
                       device: torch.device) -> torch.Tensor:
        """Per valid token: the objective's weight of the data kind / the loss-token count it is reduced by, times
        the vLLM importance weight on rollouts."""
        count_key = "num_items_in_batch" if kind == "on" else "num_off_items"
        if self.model.training and inputs.get(count_key) is not None:
            # Global loss-token count of the generation batch / world size: the sum over grad-accumulation steps and
            # ranks (DDP/DeepSpeed average) then reduces exactly as TRL does (`loss_is_scaled_for_ga`).
            denominator = inputs[count_key].clamp(min=1).float() / self.accelerator.num_processes
        else:
            denominator = valid.sum().clamp(min=1).float()
        weights = torch.full((int(valid.sum()),), self.objective_unit.part_weight(kind), device=device)
        weights = weights / denominator.to(device)
        if kind == "on" and "vllm_is_weight" in inputs:  # vLLM sampling correction: rollout tokens only, detached
            weights = weights * _per_token(inputs["vllm_is_weight"], valid).to(device)
        return weights

    # --------------------------------------------------------------------------------------------- metrics
    def _add_metric(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
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


def _per_token(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A (B, T') per-token batch tensor at the valid positions of the (B, T) completions (T' <= T: right-padded)."""
    return torch.nn.functional.pad(values, (0, valid.size(1) - values.size(1)))[valid].float()
