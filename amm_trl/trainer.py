"""`AMMTrainer`: TRL's `DistillationTrainer` with adversarial moment matching and the KD baselines.

What TRL already does is kept: the generation buffer (rollouts once per optimizer step), HF `generate` / vLLM
colocate or server rollouts and weight sync, ZeRO-3 teacher preparation, PEFT handling, logging. The hooks overridden:

- `__init__`: loads the teacher itself (so a padded vocabulary, e.g. 151936 vs 152064, can share the tokenizer's
  rows), attaches the Q-heads to the student (one DeepSpeed engine, one backward) and keeps them out of vLLM syncs;
  in vLLM server mode it first waits for the server within `vllm_server_timeout` (TRL's health check may hang).
- `_generate_and_score_completions`: adds the off-policy completions (dataset column or online teacher generation)
  next to the student rollouts, as each objective's data schedule asks; with vLLM, the importance weights of the
  rollout tokens (`vllm_importance_sampling_correction`, from the sampled tokens' log-probs vLLM returns).
- `_compute_loss`: one student and one teacher forward over rollouts + off-policy completions, then the objective's
  per-token loss, chunked over the vocabulary (`chunked.py`, losses in `objectives.py`).
- `create_optimizer`: the Q-heads get their own parameter group (`q_head_lr_multiplier`).
- `_save` / `_load_from_checkpoint`: Q-heads go to `amm_q_heads.safetensors`, so the saved student is a plain model.
- `_prepare_inputs`: MiniLLM replays the buffered rollout batch for `ppo_epochs` optimizer steps.
- `_generate_single_turn`: MiniLLM's teacher-mixed sampling (`TeacherMixProcessor` inside HF `generate`).
- `evaluate`, `_save_checkpoint`, `_load_optimizer_and_scheduler`: DistiLLM's adaptive threshold follows the eval loss;
  its replay buffer and threshold are saved per rank in each checkpoint and restored on resume.
"""

import copy
import math
import os
import random
import resource
import time
import warnings
from urllib.parse import urlparse

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from trl import DistillationTrainer
from trl.generation.vllm_generation import VLLMGeneration
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import create_model_from_path, pad

from . import objectives as O
from .chunked import ChunkedLoss, LossSpec, auto_chunk_size, project
from .config import AMMConfig
from .data import check_dataset, completion_token_ids
from .qhead import HEADS_ATTRIBUTE, build_q_heads
from .replay import DistillmState, student_probability
from .vllm_cpu import trl_builds_generation, vllm_generation_class

HEADS_FILE = "amm_q_heads.safetensors"
DISTILLM_STATE_FILE = "distillm_state_rank{rank}.pt"


class HeadFreeVLLMGeneration(VLLMGeneration):
    """TRL's vLLM generator whose weight-sync stream skips the Q-heads (vLLM's model has no such weights), and which
    keeps the sampled tokens' log-probs of the last `generate` (TRL's distillation trainer discards them).

    Without PEFT each parameter is gathered one at a time, so heads are skipped *before* their gather.
    """

    last_logprobs = None

    def generate(self, *args, **kwargs):
        prompt_ids, completion_ids, logprobs, logprob_token_ids = super().generate(*args, **kwargs)
        self.last_logprobs = logprobs  # per completion, per token: [log-prob of the sampled token] (logprobs=0)
        return prompt_ids, completion_ids, logprobs, logprob_token_ids

    def _iter_named_params(self):
        prefix = HEADS_ATTRIBUTE + "."
        if is_peft_model(self.model) or self._dist.is_fsdp:
            yield from ((n, p) for n, p in super()._iter_named_params() if not n.startswith(prefix))
            return
        for name, param in self.model.named_parameters():
            if name.startswith(prefix):
                continue
            with self._dist.gather_params([param]):
                yield self._fix_param_name_to_vllm(name), param.data


class TeacherMixProcessor(LogitsProcessor):
    """MiniLLM's teacher-mixed sampling inside HF `generate`: replaces the student's next-token scores by
    temperature * log(mix * p_T + (1 - mix) * p_S), p = softmax(logits / temperature), so that `generate`'s own
    temperature warper (which runs after custom processors) samples from the mixture. The teacher runs one token at a
    time with its KV cache; positions follow the left-padded prompt mask. Tokens the earlier processors suppressed
    (score -inf) stay suppressed. Vocabulary entries beyond the shared `vocab` are -inf."""

    def __init__(self, teacher, mix: float, temperature: float, vocab: int, prompt_mask: torch.Tensor):
        self.teacher, self.mix, self.temperature, self.vocab = teacher, mix, temperature, vocab
        self.mask, self.past = prompt_mask, None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.past is None:
            ids, mask = input_ids, self.mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            ids = input_ids[:, -1:]
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
        self.mask = mask
        out = self.teacher(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                           use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        v = self.vocab
        log_p_t = torch.log_softmax(out.logits[:, -1, :v].float() / self.temperature, -1)
        student = scores[:, :v].float()
        log_p_s = torch.log_softmax(student / self.temperature, -1)
        log_mix = torch.logaddexp(log_p_t + math.log(self.mix), log_p_s + math.log1p(-self.mix))
        log_mix = torch.where(torch.isneginf(student), torch.full_like(log_mix, -math.inf), log_mix)
        mixed = torch.full_like(scores, -math.inf)
        mixed[:, :v] = (log_mix * self.temperature).to(scores.dtype)
        return mixed


def wait_for_vllm_server(args, model) -> None:
    """Server mode: polls the server's `/health` until `vllm_server_timeout`, each request bounded by the time left,
    and raises an error naming the fields to fix. TRL's client polls with `requests.get` without a timeout, so a host
    that accepts connections but never answers (or silently drops packets) would block it far past the timeout."""
    import requests  # TRL's dependency for server mode

    if args.vllm_server_base_url is not None:
        url, where = args.vllm_server_base_url.rstrip("/"), f"vllm_server_base_url={args.vllm_server_base_url!r}"
    else:
        url = f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        where = f"vllm_server_host={args.vllm_server_host!r}, vllm_server_port={args.vllm_server_port}"
    deadline = time.monotonic() + float(args.vllm_server_timeout)
    while True:
        try:
            response = requests.get(f"{url}/health", timeout=max(deadline - time.monotonic(), 0.1))
            if response.status_code == 200:
                return
            problem = f"GET /health answered {response.status_code}"
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "STUDENT")
    raise ConnectionError(
        f"No vLLM server answered at {url} ({where}) within vllm_server_timeout={args.vllm_server_timeout} s "
        f"(last attempt: {problem}). Start the server first, on GPUs the trainer does not use, e.g. "
        f"`CUDA_VISIBLE_DEVICES=1 trl vllm-serve --model {name} --port {urlparse(url).port or 8000}`, and point "
        f"vllm_server_base_url (or vllm_server_host and vllm_server_port) at it; raise vllm_server_timeout if it is "
        f"still loading."
    )


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the model's own forward applies to its logits (Cohere/Granite/Gemma styles)."""
    scale = getattr(config, "logit_scale", None) or getattr(config, "output_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    return (scale or 1.0), getattr(config, "final_logit_softcapping", None)


def _scaled(logits, transform, temperature):
    scale, softcap = transform
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


class AMMTrainer(DistillationTrainer):
    """Distills `teacher_model` into `model` with the objective `args.objective` (see `AMMConfig`).

    Used exactly like `trl.DistillationTrainer`:

    ```python
    trainer = AMMTrainer(model="student", teacher_model="teacher", args=AMMConfig(...), train_dataset=ds)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "distillation", "amm-trl"]
    _name = "AMM"

    def __init__(self, model, teacher_model=None, args: AMMConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        if args is None:
            args = AMMConfig("amm-trl-output")
        if not isinstance(args, AMMConfig):
            raise TypeError(f"args must be an AMMConfig, got {type(args).__name__}.")
        off_column = args.off_policy_column if args.uses_off_policy and args.off_policy_source == "dataset" else None
        check_dataset(train_dataset, "train_dataset", off_column)
        check_dataset(eval_dataset, "eval_dataset", off_column)
        if args.use_vllm and args.vllm_mode == "server" and args.process_index == 0:  # the process TRL's client runs on
            wait_for_vllm_server(args, model)  # before loading any model: fail fast
        needs_teacher = args.uses_teacher_logits or args.off_policy_source == "teacher" and args.uses_off_policy
        if needs_teacher and teacher_model is None:
            raise ValueError(f"teacher_model is required for objective {args.objective!r}.")
        # Objectives that never read the teacher (sft, seqkd on cached teacher data) do not load it.
        teacher = self._load_teacher(teacher_model, args) if teacher_model is not None and needs_teacher else None

        # TRL builds our generator (on vLLM's CPU build: with the weight syncs that work there, `vllm_cpu.py`).
        generation = vllm_generation_class(HeadFreeVLLMGeneration) if args.use_vllm else HeadFreeVLLMGeneration
        with trl_builds_generation(generation):
            super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)

        student_config = self.model.config.get_text_config()
        self.vocab_size = student_config.vocab_size
        self.teacher_model = None
        if teacher is not None:
            self.vocab_size = self._shared_vocab_size(student_config.vocab_size,
                                                      teacher.config.get_text_config().vocab_size)
            self._teacher_hidden_size = teacher.config.get_text_config().hidden_size
            self._teacher_transform = _logit_transform(teacher.config.get_text_config())
            teacher.requires_grad_(False)  # frozen: no gradient buffers, and no gradient computed for its lm_head
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._student_transform = _logit_transform(student_config)
        self.chunk_size = auto_chunk_size(self.vocab_size, args.loss_chunk_tokens)

        self.q_heads = None
        if args.objective in ("amm", "pbkd"):
            teacher_hidden = getattr(self, "_teacher_hidden_size", student_config.hidden_size)
            head_args = args
            if args.objective == "pbkd":  # one reward head scores both data kinds
                head_args = copy.copy(args)
                head_args.q_head_shared = True
            heads = build_q_heads(head_args, self.model, teacher_hidden)
            self.model.add_module(HEADS_ATTRIBUTE, heads)
            self.q_heads = heads
        # The loss reads the student `lm_head` and the Q-heads directly: a parameter-free submodule whose forward
        # computes it lets ZeRO-3 gather them around the loss's forward and backward (see `chunked.py`).
        self.loss_module = ChunkedLoss()
        self.model.add_module("amm_loss", self.loss_module)
        head = self.model.get_output_embeddings()
        self.loss_module.register_trainable_weights(
            [head.weight, head.bias] + (list(self.q_heads.parameters()) if self.q_heads is not None else []))
        if self.use_vllm:
            if args.vllm_importance_sampling_correction:
                self.vllm_generation.logprobs = 0  # TRL's distillation asks for none; the ratio needs the sampled ones
                if args.vllm_mode == "server" and self.accelerator.is_main_process:
                    self._check_server_logprobs_mode()
        self._pending_metrics = {}
        # DistiLLM's adaptive schedule: replay buffer of past rollouts and threshold (per process, checkpointed).
        self.distillm = DistillmState(args.replay_buffer_size, args.distillm_init_threshold) \
            if args.objective == "distillm" else None

    # ----------------------------------------------------------------------------------------------- setup
    def _check_server_logprobs_mode(self):
        """As TRL's GRPO: the ratio needs log-probs after temperature and logit processing (`trl vllm-serve` starts
        vLLM with `--logprobs-mode processed_logprobs`; plain `vllm serve` does not)."""
        try:
            mode = self.vllm_generation.vllm_client.get_server_info()["model_config"]["logprobs_mode"]
        except Exception as exc:  # noqa: BLE001 - `/server_info` needs VLLM_SERVER_DEV_MODE=1
            mode = f"unknown ({type(exc).__name__})"
        if mode != "processed_logprobs":
            warnings.warn(f"The vLLM server's logprobs mode is {mode}, not processed_logprobs: the importance ratios "
                          "of vllm_importance_sampling_correction are biased (start it with `trl vllm-serve`).")

    @staticmethod
    def _load_teacher(teacher_model, args):
        if not isinstance(teacher_model, str):
            if args.teacher_model_init_kwargs is not None:
                raise ValueError("teacher_model_init_kwargs is set but teacher_model is already instantiated.")
            return teacher_model
        kwargs = dict(args.teacher_model_init_kwargs or {})
        # A frozen teacher in the training precision: fp32 (TRL's default) would double its memory under bf16.
        dtype = kwargs.get("dtype") or ("bfloat16" if args.bf16 else "float16" if args.fp16 else "float32")
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
        if args.teacher_model_revision is not None:
            kwargs.setdefault("revision", args.teacher_model_revision)
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return create_model_from_path(teacher_model, **kwargs)

    def _shared_vocab_size(self, student_vocab: int, teacher_vocab: int) -> int:
        if student_vocab == teacher_vocab:
            return student_vocab
        tokenizer_vocab = len(self._tokenizer)
        if tokenizer_vocab > min(student_vocab, teacher_vocab):
            raise ValueError(
                f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}, and the tokenizer has "
                f"{tokenizer_vocab} tokens: the two models do not share a vocabulary. Distillation compares full "
                f"next-token distributions; use a teacher with the student's tokenizer (or TRL's GOLD trainer for "
                f"cross-tokenizer distillation)."
            )
        if self.args.objective == "jsd":
            raise ValueError(
                f"objective 'jsd' runs TRL's kernel, which needs equal vocab sizes ({student_vocab} vs "
                f"{teacher_vocab}); use objective 'gkd' with lmbda 1.0 (same loss, compares the {tokenizer_vocab} "
                f"shared tokenizer rows)."
            )
        # Same tokenizer, embedding matrices padded differently (e.g. Qwen 151936 vs 152064): compare the real rows.
        return tokenizer_vocab

    def create_optimizer(self, model=None):
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
        # ... then give the heads their own group: no weight decay, scaled learning rate, same schedule.
        self.optimizer.add_param_group({"params": head_params, "weight_decay": 0.0,
                                        "lr": self.args.learning_rate * self.args.q_head_lr_multiplier})
        return self.optimizer

    # ------------------------------------------------------------------------------------------------ data
    def _batch_kinds(self) -> tuple[bool, bool]:
        """(student rollouts?, off-policy completions?) for this optimizer step."""
        args = self.args
        if args.objective in ("gkd", "imitkd"):
            # Same draw on every rank and after a resume: seeded by the step, no RNG state to checkpoint.
            on = random.Random(args.seed * 1_000_003 + self.state.global_step).random() < args.lmbda
            return on, not on
        if args.objective == "distillm":
            if not self.model.training:  # the eval loss (which drives the threshold) is on the off-policy data
                return False, True
            on = random.Random(args.seed * 1_000_003 + self.state.global_step).random() < self._student_probability()
            return on, not on
        return args.uses_rollouts, args.uses_off_policy

    def _student_probability(self) -> float:
        total = self.state.max_steps or self.args.max_steps  # state.max_steps is set once training starts
        return student_probability(self.distillm.threshold, self.state.global_step, total)

    def _generate_and_score_completions(self, inputs):
        on, off = self._batch_kinds()
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        replay = None
        if self.distillm is not None and mode == "train":
            # Not on student rollouts this step: past rollouts from the replay buffer once it holds a batch (the
            # buffers of all ranks grow alike, so all ranks take the same branch), else the off-policy completions.
            if not on and len(self.distillm.buffer) >= len(inputs):
                rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{self.accelerator.process_index}")
                replay = self.distillm.buffer.sample(len(inputs), rng)
            m = self._metrics[mode]
            m["distillm/threshold"].append(self.distillm.threshold)
            m["distillm/student_probability"].append(self._student_probability())
            m["distillm/replay_size"].append(float(len(self.distillm.buffer)))
            m["distillm/source"].append(2.0 if on else 1.0 if replay is not None else 0.0)  # 2 student 1 replay 0 ref
        if on:
            start = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            elapsed = time.perf_counter() - start
            tokens = self.accelerator.gather(output["completion_mask"].sum()).sum().item()
            self._metrics[mode]["rollout/tokens_per_second"].append(tokens / max(elapsed, 1e-9))
            if self.distillm is not None and mode == "train":
                self._push_rollouts(output)
            if self.args.objective == "minillm":
                self._score_rollouts(output)
            if self.use_vllm and self.args.vllm_importance_sampling_correction:
                self._vllm_importance_weights(output)
        elif replay is not None:
            output = self._padded_prompts([p for p, _ in replay])
        else:
            output = self._padded_prompts(self._tokenize_prompts([x["prompt"] for x in inputs])[0])
        if off:
            if replay is not None:
                completions = [c for _, c in replay]
            elif self.args.off_policy_source == "teacher":
                completions = self._teacher_completions(output["prompt_ids"], output["prompt_mask"])
            else:
                completions = [
                    completion_token_ids(self._tokenizer, x["prompt"], x[self.args.off_policy_column],
                                         self.eos_token_ids, self.max_completion_length, self.chat_template_kwargs)
                    for x in inputs
                ]
            ids = [torch.tensor(c, dtype=torch.long) for c in completions]
            output["off_completion_ids"] = pad(ids, padding_value=self._tokenizer.pad_token_id,
                                               padding_side="right").to(device)
            output["off_completion_mask"] = pad([torch.ones_like(c) for c in ids], padding_value=0,
                                                padding_side="right").to(device)
            output["num_off_items"] = self.accelerator.gather(output["off_completion_mask"].sum()).sum()
            self._metrics[mode]["off_policy/mean_length"].append(
                self.accelerator.gather(output["off_completion_mask"].sum(1).float()).mean().item())
        return output

    def _padded_prompts(self, prompt_ids: list[list[int]]) -> dict:
        """Left-padded prompt ids and mask, as TRL lays out a batch (for steps without student rollouts)."""
        ids = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
        device = self.accelerator.device
        return {
            "prompt_ids": pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            "prompt_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(device),
        }

    @torch.no_grad()
    def _teacher_completions(self, prompt_ids, prompt_mask) -> list[list[int]]:
        """Online off-policy data: the teacher samples a completion per prompt with the rollout settings."""
        with unwrap_model_for_generation(self.teacher_model, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as teacher:
            out = teacher.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=self.generation_config)
        completions = []
        end = set(self.eos_token_ids)
        for row in out[:, prompt_ids.size(1):].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in end), len(row))
            completions.append(row[:cut])
        return completions

    def _push_rollouts(self, output):
        """DistiLLM: this step's student rollouts (unpadded prompt and completion ids) go into the replay buffer."""
        for p_ids, p_mask, c_ids, c_mask in zip(output["prompt_ids"].tolist(), output["prompt_mask"].tolist(),
                                                output["completion_ids"].tolist(), output["completion_mask"].tolist()):
            self.distillm.buffer.push([t for t, m in zip(p_ids, p_mask) if m], [t for t, m in zip(c_ids, c_mask) if m])

    @torch.no_grad()
    def _score_rollouts(self, output):
        """MiniLLM, at rollout time: the rollout policy's token log-probs (PPO's old log-probs) and the advantages.

        r_t = log p_T(y_t|s_t) - log p_S(y_t|s_t); A = whiten(length_normalize(G)), G_t = sum_{k>t} gamma^(k-t-1) r_k
        (the current token's reward is covered exactly by the single-step reverse KL term), whitened over this
        process's generation batch. One no-grad student and teacher forward, log-probs through the chunked loss path.
        """
        args = self.args
        old_logp, teacher_logp = self._rollout_log_probs(output, teacher=True)
        mask = output["completion_mask"].float()
        is_weight = mask.clone()
        behaviour_logp = old_logp
        mix = args.minillm_teacher_mix
        if mix > 0 and not self.use_vllm:
            # sampled from mix * p_T + (1 - mix) * p_S: PPO's old policy is the mixture; weight w = p_S / mixture
            behaviour_logp = torch.logaddexp(teacher_logp + math.log(mix), old_logp + math.log1p(-mix)) * mask
            is_weight = O.teacher_mix_weights(old_logp, teacher_logp, mix) * mask
        rewards = (teacher_logp - old_logp) * mask
        returns = O.reward_to_go(rewards, mask, gamma=args.minillm_gamma, include_current=False)
        returns = O.length_normalize(returns, mask, include_current=False)
        advantages = O.whiten(returns, mask) if mask.sum() > 1 else returns
        output["minillm_old_logp"], output["minillm_advantages"] = behaviour_logp, advantages
        output["minillm_is_weight"] = is_weight
        mode = "train" if self.model.training else "eval"
        sums = torch.stack([mask.sum(), rewards.sum(), returns.sum(), is_weight.sum()])
        n, reward, ret, weight = self.accelerator.gather(sums[None]).sum(0).tolist()  # one collective
        for name, total in (("reward", reward), ("return", ret), ("is_weight", weight)):
            self._metrics[mode][f"minillm/{name}"].append(total / max(n, 1.0))

    @torch.no_grad()
    def _rollout_log_probs(self, output, teacher=False) -> list[torch.Tensor]:
        """Log-probs of the rollout tokens under the rollout-time student (and the teacher), (B, T) fp32, 0 at
        padding: one no-grad forward each, projected as the loss projects (shared vocabulary, logit transform,
        temperature)."""
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
            fn, params, names = self._token_fn("on", self.accelerator.unwrap_model(self.model), plain=True,
                                               teacher=teacher)
            weights = torch.zeros(int(valid.sum()), device=h_s.device)
            _, metrics = self.loss_module(token_inputs, weights, LossSpec(fn, params, self.chunk_size))
        result = []
        for name in ("logp_student", "logp_teacher")[:1 + teacher]:
            logp = torch.zeros(valid.shape, device=h_s.device, dtype=torch.float32)
            logp[valid] = metrics[:, names.index(name)].float()
            result.append(logp)
        return result

    def _vllm_importance_weights(self, output):
        """`vllm_importance_sampling_correction`: per-token weights of the rollouts' loss from the ratio
        exp(log p_trainer - log p_vLLM) of the sampled tokens (`O.vllm_importance_weights`), the trainer's log-probs
        from the rollout-time student. Stored in the batch (`vllm_is_weight`), so TRL's shuffle and split over the
        gradient-accumulation steps and MiniLLM's replays keep them aligned with their tokens."""
        args, mask = self.args, output["completion_mask"]
        sampled, self.vllm_generation.last_logprobs = self.vllm_generation.last_logprobs, None
        if sampled is None or [len(s) for s in sampled] != mask.sum(1).tolist():
            raise RuntimeError("vLLM returned no sampled-token log-probs matching the completions; "
                               "vllm_importance_sampling_correction cannot be applied.")
        logp_vllm = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for i, seq in enumerate(sampled):  # vLLM reports a NaN log-prob as None: NaN here, ratio 1 below
            logp_vllm[i, :len(seq)] = torch.tensor([math.nan if lp[0] is None else lp[0] for lp in seq])
        # MiniLLM has already scored the rollouts with the rollout-time student (with vLLM there is no teacher mix).
        logp = output["minillm_old_logp"] if "minillm_old_logp" in output else self._rollout_log_probs(output)[0]
        token_level = args.vllm_importance_sampling_mode.startswith("token")
        weights = O.vllm_importance_weights(logp, logp_vllm, mask, args.vllm_importance_sampling_mode,
                                            args.vllm_importance_sampling_clip_min,
                                            args.vllm_importance_sampling_clip_max)
        output["vllm_is_weight"] = weights
        valid = mask.bool()
        delta = (logp - logp_vllm).abs()[valid]
        delta = delta[~delta.isnan()]  # tokens vLLM could not score do not count
        ratio = weights[valid] if token_level else weights[valid.any(1)].amax(1)  # a rollout's weight, once
        zero, inf = delta.new_zeros(1), delta.new_full((1,), math.inf)
        stats = torch.stack([delta.sum(), delta.new_tensor(delta.numel()), torch.cat([delta, zero]).max(),
                             ratio.sum(), ratio.new_tensor(ratio.numel()), torch.cat([ratio, inf]).min(),
                             torch.cat([ratio, zero]).max()])
        (d_sum, d_n, d_max, r_sum, r_n, r_min, r_max) = self.accelerator.gather(stats[None]).T  # one collective
        m = self._metrics["train" if self.model.training else "eval"]
        m["sampling/sampling_logp_difference/mean"].append((d_sum.sum() / d_n.sum().clamp(min=1)).item())
        m["sampling/sampling_logp_difference/max"].append(d_max.max().item())
        m["sampling/importance_sampling_ratio/min"].append(r_min.min().item())
        m["sampling/importance_sampling_ratio/mean"].append((r_sum.sum() / r_n.sum().clamp(min=1)).item())
        m["sampling/importance_sampling_ratio/max"].append(r_max.max().item())

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        """MiniLLM with `minillm_teacher_mix` > 0: TRL's HF-`generate` rollout path with `TeacherMixProcessor` added
        (the student's `generate` is wrapped for the duration of the call)."""
        mix = self.args.minillm_teacher_mix
        if self.args.objective != "minillm" or mix == 0 or self.use_vllm:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        student = self.accelerator.unwrap_model(self.model)
        original = student.generate
        temperature = self.temperature

        def generate(*args, **kwargs):
            processor = TeacherMixProcessor(teacher, mix, temperature, self.vocab_size, kwargs["attention_mask"])
            return original(*args, logits_processor=LogitsProcessorList([processor]), **kwargs)

        with unwrap_model_for_generation(self.teacher_model, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as teacher:
            student.generate = generate
            try:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            finally:
                del student.generate

    def _prepare_inputs(self, generation_batch):
        """MiniLLM's PPO epochs: the buffered rollout batch serves `ppo_epochs` optimizer steps (TRL regenerates every
        `gradient_accumulation_steps` micro-steps; here only every `ppo_epochs` times that). The dataloader's prompts
        of the replayed steps are not used."""
        ga = self.args.gradient_accumulation_steps
        if (self.model.training and self.args.ppo_epochs > 1 and self._buffered_inputs is not None
                and self._step % (ga * self.args.ppo_epochs) != 0):
            return self._buffered_inputs[self._step % ga]
        return super()._prepare_inputs(generation_batch)

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._pending_metrics = {}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_pending_metrics()
        return result

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.args.objective == "jsd":
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        parts = [kind for kind, key in (("on", "completion_ids"), ("off", "off_completion_ids")) if key in inputs]
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        width = max(inputs[self._key(kind, "ids")].size(1) for kind in parts)
        ids, masks = [], []
        for kind in parts:  # right-pad both kinds to one width: one student and one teacher forward for all
            c_ids, c_mask = inputs[self._key(kind, "ids")], inputs[self._key(kind, "mask")]
            extra = width - c_ids.size(1)
            ids.append(torch.nn.functional.pad(c_ids, (0, extra), value=self._tokenizer.pad_token_id))
            masks.append(torch.nn.functional.pad(c_mask, (0, extra), value=0))
        batch = prompt_ids.size(0)
        completion_ids, completion_mask = torch.cat(ids), torch.cat(masks)
        input_ids = torch.cat([prompt_ids.repeat(len(parts), 1), completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask.repeat(len(parts), 1), completion_mask], dim=1)

        h_student = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, width)
        h_teacher = None
        if self.args.uses_teacher_logits:
            h_teacher = self._teacher_hidden_states(input_ids, attention_mask, width)

        loss = torch.zeros((), device=h_student.device)
        entropy_sum = torch.zeros((), device=h_student.device)
        n_valid = torch.zeros((), device=h_student.device, dtype=torch.long)
        records = {}
        for i, kind in enumerate(parts):
            rows = slice(i * batch, (i + 1) * batch)
            part_loss, part_entropy, part_n, metrics, names = self._part_loss(
                kind, unwrapped_student, h_student[rows], None if h_teacher is None else h_teacher[rows],
                completion_ids[rows], completion_mask[rows], inputs)
            loss = loss + part_loss
            entropy_sum, n_valid = entropy_sum + part_entropy, n_valid + part_n
            records[kind] = (rows, metrics, names)
        if self.args.objective == "pbkd" and len(parts) == 2 and self.args.pbkd_bt_weight > 0:
            loss = loss + self._pbkd_preference_term(unwrapped_student, h_student, h_teacher, completion_ids,
                                                     completion_mask, batch, records)
        return loss, entropy_sum, n_valid

    @torch.no_grad()
    def _teacher_hidden_states(self, input_ids, attention_mask, width):
        """The frozen teacher's last hidden states over the last `width` positions, through its own engine (so
        ZeRO-3 gathers its layers), as TRL runs it."""
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids,
                                         attention_mask, width)

    @staticmethod
    def _key(kind, what):
        return f"completion_{what}" if kind == "on" else f"off_completion_{what}"

    def _part_loss(self, kind, student, h_s, h_t, completion_ids, completion_mask, inputs):
        """Loss of one data kind (rollouts or off-policy completions), already weighted for the global reduction."""
        args = self.args
        valid = completion_mask.bool()
        count_key = "num_items_in_batch" if kind == "on" else "num_off_items"
        if self.model.training and inputs.get(count_key) is not None:
            # Global loss-token count of the generation batch / world size: the sum over grad-accumulation steps and
            # ranks (DDP/DeepSpeed average) then reduces exactly as TRL does (`loss_is_scaled_for_ga`).
            denominator = inputs[count_key].clamp(min=1).float() / self.accelerator.num_processes
        else:
            denominator = valid.sum().clamp(min=1).float()
        coefficient = 1.0
        if args.objective in ("amm", "pbkd"):
            coefficient = args.amm_beta if kind == "off" else 1.0 - args.amm_beta
        weights = torch.full((int(valid.sum()),), coefficient, device=h_s.device) / denominator.to(h_s.device)
        if kind == "on" and "vllm_is_weight" in inputs:  # vLLM sampling correction: rollout tokens only, detached
            is_weight = inputs["vllm_is_weight"]
            weights = weights * torch.nn.functional.pad(is_weight, (0, completion_ids.size(1) - is_weight.size(1)))[
                valid].to(weights.device)

        fn, params, names = self._token_fn(kind, student)
        token_inputs = [h_s[valid], completion_ids[valid]]
        if h_t is not None:
            token_inputs.append(h_t[valid])
        if args.objective == "minillm" and kind == "on":  # rollout-time advantages and log-probs, per token
            width = completion_ids.size(1)
            token_inputs += [torch.nn.functional.pad(inputs[key], (0, width - inputs[key].size(1)))[valid].float()
                             for key in ("minillm_advantages", "minillm_old_logp", "minillm_is_weight")]
        loss, metrics = self.loss_module(token_inputs, weights, LossSpec(fn, params, self.chunk_size))
        for j, name in enumerate(names):
            self._add_metric(f"{name}/{kind}", metrics[:, j].sum(), metrics.size(0))
        if args.objective == "amm" and kind == "on" and args.amm_policy_gradient:
            loss = loss + self._score_function_term(student, h_s, completion_ids, valid, metrics[:, 0], weights)
        entropy = metrics[:, names.index("entropy")].sum()
        return loss, entropy, valid.sum(), metrics, names

    def _token_fn(self, kind, student, plain=False, teacher=True):
        """The per-token loss `fn(h_s, y, [h_t], *extra, *params) -> (values, metrics)` of the objective, its params,
        and the names of its metric columns. `plain`: no objective (values 0), only the common metrics (log-probs);
        `plain` without `teacher`: the student's only (no `h_t`).

        `extra` token inputs: MiniLLM's rollouts carry (advantage, old log-prob) per token."""
        args, vocab, temperature = self.args, self.vocab_size, self.temperature
        s_head = student.get_output_embeddings()
        params = [s_head.weight] + ([s_head.bias] if s_head.bias is not None else [])
        n_student = len(params)
        if not args.uses_teacher_logits or (plain and not teacher):
            def fn(h_s, y, *p):
                z_s = _scaled(project(h_s, p[0], p[1] if n_student == 2 else None, vocab), self._student_transform,
                              temperature)
                log_p = torch.log_softmax(z_s, -1)
                values = O.cross_entropy(z_s, y)
                metrics = torch.stack([values, -(log_p.exp() * log_p).sum(-1), -values], dim=1)
                return values, metrics.detach()

            return fn, params, ["ce", "entropy", "logp_student"]

        t_head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        params += [t_head.weight] + ([t_head.bias] if t_head.bias is not None else [])
        n_teacher = len(params) - n_student
        head = self.q_heads.head(kind) if args.objective in ("amm", "pbkd") and not plain else None
        if head is not None:
            params += list(head.parameters())
        kd_ratio, alpha = args.minillm_kd_ratio, args.skew_alpha
        divergence = {
            "fkl": O.forward_kl, "imitkd": O.forward_kl, "rkl": O.reverse_kl, "tvd": O.total_variation,
            "gkd": lambda z_s, z_t: O.generalized_jsd(z_s, z_t, args.beta),
            "distillm": (lambda z_s, z_t: O.skew_forward_kl(z_s, z_t, alpha)) if args.distillm_loss == "skl"
            else (lambda z_s, z_t: O.skew_reverse_kl(z_s, z_t, alpha)),
        }.get(args.objective)
        policy_gradient = args.objective == "minillm" and kind == "on" and not plain
        n_extra = 3 if policy_gradient else 0

        head_warmup = head is not None and self.state.global_step < args.q_head_warmup_steps

        def fn(h_s, y, h_t, *rest):
            extra_inputs, p = rest[:n_extra], rest[n_extra:]
            s_w, s_b = p[0], (p[1] if n_student == 2 else None)
            t_w, t_b = p[n_student], (p[n_student + 1] if n_teacher == 2 else None)
            z_s = _scaled(project(h_s, s_w, s_b, vocab), self._student_transform, temperature)
            z_t = _scaled(project(h_t, t_w, t_b, vocab), self._teacher_transform, temperature)
            log_p_s, log_p_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
            extra = []
            if head is not None:
                features = (h_s if args.q_head_features == "student" else h_t).detach()
                q = head.q_values(features, list(p[n_student + n_teacher:]), s_w[:vocab])
                # While the heads warm up only they learn: a near-zero adversary gives the student noise that Adam
                # would rescale into full-size steps.
                values = O.amm_adversarial_gap(z_s.detach() if head_warmup else z_s, z_t, q)
                extra = [q.detach().abs().mean(-1)]
                if args.objective == "pbkd":  # token reward r(s_t, y_t) = q(s_t)[y_t] of the taken action
                    extra.append(q.detach().gather(-1, y[:, None]).squeeze(-1))
            elif policy_gradient:
                # MiniLLM on rollouts: exact single-step reverse KL + PPO-clipped policy gradient of the future return
                # (with teacher-mixed sampling: old_logp is the mixture's, the single-step term weighted by p_S / mix)
                advantages, old_logp, is_weight = extra_inputs
                logp = O.token_log_probs(z_s, y)
                pg, clipped = O.ppo_clipped_loss(logp, old_logp, advantages, args.ppo_clip)
                rkl = O.reverse_kl(z_s, z_t)
                values = is_weight * rkl + pg
                extra = [rkl, pg, torch.exp(logp - old_logp), clipped.float()]
            elif plain:
                values = torch.zeros(h_s.size(0), device=h_s.device)
            elif args.objective == "minillm":  # reference data: MiniLLM's mixed LM / KD loss
                values = (1.0 - kd_ratio) * O.cross_entropy(z_s, y) + kd_ratio * O.forward_kl(z_s, z_t)
            else:
                values = divergence(z_s, z_t)
            metrics = [values, O.total_variation(z_s, z_t), -(log_p_s.exp() * log_p_s).sum(-1),
                       log_p_s.gather(-1, y[:, None]).squeeze(-1), log_p_t.gather(-1, y[:, None]).squeeze(-1)]
            return values, torch.stack(metrics + extra, dim=1).detach()

        first = {"amm": "amm_gap", "pbkd": "pbkd_gap"}.get(args.objective, args.objective)
        if args.objective == "minillm" and kind == "off":
            first = "minillm_kd"
        extra_names = []
        if head is not None:
            extra_names = ["q_abs"] + (["reward"] if args.objective == "pbkd" else [])
        elif policy_gradient:
            extra_names = ["minillm_rkl", "minillm_pg", "ppo_ratio", "ppo_clipped"]
        return fn, params, [first, "tv", "entropy", "logp_student", "logp_teacher"] + extra_names

    def _pbkd_preference_term(self, student, h_s, h_t, completion_ids, completion_mask, batch, records):
        """PbKD's confidence set as a penalty: `pbkd_bt_weight` * Bradley-Terry loss of the reward head on the pairs
        (off-policy completion preferred over the rollout of the same prompt), J(y) = sum_t q(s_t)[y_t].

        BT is a function of whole-sequence sums, so it is linearized: its value comes from the rewards the main pass
        already computed (metric column `reward`), its gradient from a second chunked pass over sum_t g_i q(s_t)[y_t]
        with g_i = dBT/dJ_i (detached). The head gets exactly grad BT; the student none (features are detached)."""
        args = self.args
        valid = completion_mask.bool()
        totals = {}
        for kind in ("on", "off"):
            rows, metrics, names = records[kind]
            rewards = torch.zeros(valid[rows].shape, device=h_s.device, dtype=torch.float32)
            rewards[valid[rows]] = metrics[:, names.index("reward")].float()
            totals[kind] = rewards.sum(1)
        chosen, rejected = totals["off"], totals["on"]
        bt = O.bradley_terry_loss(chosen, rejected)
        pairs = batch * (args.gradient_accumulation_steps if self.model.training else 1)
        scale = args.pbkd_bt_weight / pairs
        g = torch.sigmoid(rejected - chosen) * scale  # dBT/dJ(rejected) = -dBT/dJ(chosen)
        row_weights = torch.cat([g if kind == "on" else -g for kind in records])  # rows are in `records` order
        weights = row_weights[:, None].expand(valid.shape)[valid]
        features = (h_s if args.q_head_features == "student" else h_t).detach()[valid]
        head = self.q_heads.head("on")
        s_head = student.get_output_embeddings()
        params = [s_head.weight] + list(head.parameters())
        vocab = self.vocab_size

        def fn(f, y, *p):
            q = head.q_values(f, list(p[1:]), p[0][:vocab])
            values = q.gather(-1, y[:, None]).squeeze(-1)
            return values, values.detach()[:, None]

        surrogate, _ = self.loss_module([features, completion_ids[valid]], weights,
                                        LossSpec(fn, params, self.chunk_size))
        self._add_metric("pbkd/bt_loss", bt.sum(), bt.numel())
        self._add_metric("pbkd/reward_chosen", chosen.sum(), chosen.numel())
        self._add_metric("pbkd/reward_rejected", rejected.sum(), rejected.numel())
        self._add_metric("pbkd/bt_accuracy", (chosen > rejected).float().sum(), chosen.numel())
        return (bt.sum() * scale).detach() + surrogate - surrogate.detach()

    def _score_function_term(self, student, h_s, completion_ids, valid, gaps, weights):
        """sum_t log p_S(y_t|s_t) * A_t with A_t from the future moment gaps; value 0, gradient only."""
        args = self.args
        rewards = torch.zeros(valid.shape, device=gaps.device, dtype=torch.float32)
        rewards[valid] = gaps.float()
        mask = valid.float()
        advantages = O.reward_to_go(rewards, mask, include_current=False)
        if args.pg_length_normalization:
            advantages = O.length_normalize(advantages, mask, include_current=False)
        advantages = advantages[valid]
        if args.pg_baseline == "mean" and advantages.numel() > 0:
            advantages = advantages - advantages.mean()
        if args.pg_clip is not None:
            advantages = advantages.clamp(-args.pg_clip, args.pg_clip)
        s_head = student.get_output_embeddings()
        params = [s_head.weight] + ([s_head.bias] if s_head.bias is not None else [])
        vocab, temperature = self.vocab_size, self.temperature

        def fn(h, y, a, *p):
            z_s = _scaled(project(h, p[0], p[1] if len(p) == 2 else None, vocab), self._student_transform,
                          temperature)
            values = O.token_log_probs(z_s, y) * a
            return values, values.detach()[:, None]

        surrogate, _ = self.loss_module([h_s[valid], completion_ids[valid], advantages], weights,
                                        LossSpec(fn, params, self.chunk_size))
        self._add_metric("pg/advantage_abs", advantages.abs().sum(), advantages.numel())
        return surrogate - surrogate.detach()

    # --------------------------------------------------------------------------------------------- metrics
    def _add_metric(self, name, total, count):
        self._pending_metrics[name] = (total.detach().float(), float(count))

    def _log_pending_metrics(self):
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

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir=None, state_dict=None):
        """Saves the student as a plain `from_pretrained` model and the Q-heads beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.q_heads is None:
            return super()._save(output_dir, state_dict)
        prefix = HEADS_ATTRIBUTE + "."
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        heads = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if self.q_heads.off is self.q_heads.on:  # one shared head (pbkd, q_head_shared): stored once, as `on.*`
            heads = {k: v for k, v in heads.items() if not k.startswith("off.")}
        student = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        super()._save(output_dir, state_dict=student)
        if heads and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            tmp = os.path.join(output_dir, HEADS_FILE + ".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, tmp)
            os.replace(tmp, os.path.join(output_dir, HEADS_FILE))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.distillm is not None:  # every rank: buffers differ per rank
            output_dir = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, DISTILLM_STATE_FILE.format(rank=self.args.process_index))
            torch.save(self.distillm.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Runs on every resume path (plain, DDP, DeepSpeed), after the model is loaded.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_distillm_state(checkpoint)

    def _load_distillm_state(self, checkpoint):
        if self.distillm is None:
            return
        path = os.path.join(checkpoint, DISTILLM_STATE_FILE.format(rank=self.args.process_index))
        if not os.path.exists(path):
            warnings.warn(f"{path} not found: DistiLLM's replay buffer and threshold start afresh.")
            return
        self.distillm.load_state_dict(torch.load(path, weights_only=False))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """DistiLLM: each evaluation's loss (the skew divergence on the eval off-policy completions, gathered over
        ranks, so every rank updates alike) drives the adaptive threshold. Explicit calls with another prefix (or a
        second eval set) leave it alone."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        key = f"{metric_key_prefix}_loss"
        # With several eval sets (a dict), the Trainer calls `evaluate` once per set: the first one drives.
        driving = ("eval", f"eval_{next(iter(self.eval_dataset))}" if isinstance(self.eval_dataset, dict) else None)
        if self.distillm is not None and key in metrics and metric_key_prefix in driving:
            args = self.args
            metrics[f"{metric_key_prefix}_distillm_threshold"] = self.distillm.update_on_eval(
                metrics[key], args.distillm_loss_eps, args.distillm_threshold_step)
        return metrics

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # DeepSpeed restores the heads from its own engine checkpoint; other paths read the heads file.
        path = os.path.join(resume_from_checkpoint, HEADS_FILE)
        if self.q_heads is not None and not self.is_deepspeed_enabled and os.path.exists(path):
            heads = load_file(path, device=str(self.args.device))
            if self.q_heads.off is self.q_heads.on:
                heads.update({"off." + k[3:]: v for k, v in heads.items() if k.startswith("on.")})
            self.q_heads.load_state_dict(heads)
