"""What a step generates, around TRL's generation: the vLLM generator without the Q-heads, the server probe, the vLLM
sampling correction, the off-policy completions (the dataset's, tokenized as the student would emit them, or the
teacher's, sampled online), and the prompt-length limit the trainer cuts or refuses prompts by."""

import math
import os
import time
import warnings
from urllib.parse import urlparse

import torch
from accelerate.utils import is_peft_model
from trl.data_utils import is_conversational
from trl.generation.vllm_generation import VLLMGeneration
from trl.models.utils import unwrap_model_for_generation

from .objectives import vllm_importance_weights
from .qhead import is_head_parameter


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
        if is_peft_model(self.model) or self._dist.is_fsdp:
            yield from ((n, p) for n, p in super()._iter_named_params() if not is_head_parameter(n))
            return
        for name, param in self.model.named_parameters():
            if is_head_parameter(name):
                continue
            with self._dist.gather_params([param]):
                yield self._fix_param_name_to_vllm(name), param.data


def _server_url(args) -> tuple[str, str]:
    if args.vllm_server_base_url is not None:
        return args.vllm_server_base_url.rstrip("/"), f"vllm_server_base_url={args.vllm_server_base_url!r}"
    return (f"http://{args.vllm_server_host}:{args.vllm_server_port}",
            f"vllm_server_host={args.vllm_server_host!r}, vllm_server_port={args.vllm_server_port}")


def wait_for_health(url: str, timeout: float) -> str | None:
    """Polls a vLLM server's `/health` until it answers 200 (None) or `timeout` seconds pass (the last problem seen),
    each request bounded by the time left."""
    import requests  # TRL's dependency for server mode

    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{url}/health", timeout=max(deadline - time.monotonic(), 0.1))
            if response.status_code == 200:
                return None
            problem = f"GET /health answered {response.status_code}"
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        left = deadline - time.monotonic()
        if left <= 0:
            return problem
        time.sleep(min(1.0, left))


def wait_for_vllm_server(args, model) -> None:
    """Server mode: polls the server's `/health` until `vllm_server_timeout`, each request bounded by the time left,
    and raises an error naming the fields to fix. TRL's client polls with `requests.get` without a timeout, so a host
    that accepts connections but never answers (or silently drops packets) would block it far past the timeout."""
    url, where = _server_url(args)
    problem = wait_for_health(url, float(args.vllm_server_timeout))
    if problem is None:
        return
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "STUDENT")
    raise ConnectionError(
        f"No vLLM server answered at {url} ({where}) within vllm_server_timeout={args.vllm_server_timeout} s "
        f"(last attempt: {problem}). Start the server first, on GPUs the trainer does not use, e.g. "
        f"`CUDA_VISIBLE_DEVICES=1 trl vllm-serve --model {name} --port {urlparse(url).port or 8000}`, and point "
        f"vllm_server_base_url (or vllm_server_host and vllm_server_port) at it; raise vllm_server_timeout if it is "
        f"still loading."
    )


def check_vllm_memory(args, model) -> None:
    """Colocated vLLM on a GPU: refuses (before any model loads) a `vllm_gpu_memory_utilization` whose share of the
    GPU cannot hold the student's weights (the safetensors files of a local model folder, split over the engine's
    tensor-parallel ranks) plus 1 GiB of KV cache: vLLM would fail to start after both models loaded."""
    if not (args.use_vllm and args.vllm_mode == "colocate" and torch.cuda.is_available()):
        return
    if not (isinstance(model, str) and os.path.isdir(model)):
        return  # a hub name or a model object: the weights' size is not known before loading
    weights = sum(os.path.getsize(os.path.join(model, name)) for name in os.listdir(model)
                  if name.endswith(".safetensors"))
    if not weights:
        return
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
    per_rank = weights / max(1, args.vllm_tensor_parallel_size)
    share = args.vllm_gpu_memory_utilization * gpu.total_memory
    needed = per_rank + 2**30
    if share < needed:
        minimum = math.ceil(needed / gpu.total_memory * 20) / 20  # rounded up to 0.05
        raise ValueError(
            f"AMMConfig.vllm_gpu_memory_utilization={args.vllm_gpu_memory_utilization} gives vLLM "
            f"{share / 2**30:.1f} GiB of this GPU's {gpu.total_memory / 2**30:.1f} GiB ({gpu.name}), but the "
            f"student's weights take {per_rank / 2**30:.1f} GiB per engine rank ({model}) and the KV cache needs "
            f"room too: set vllm_gpu_memory_utilization >= {minimum:.2f} (the GPU recipes use 0.15 on 80 GB GPUs, "
            f"0.3 on 40 GB).")


def configure_vllm_generation(generation: HeadFreeVLLMGeneration, args, is_main_process: bool) -> None:
    """The log-probs the trainer needs: TRL's distillation asks vLLM for none, `vllm_importance_sampling_correction`
    needs the sampled tokens' ones (from a server: the processed ones)."""
    if args.vllm_importance_sampling_correction:
        generation.logprobs = 0
        if args.vllm_mode == "server" and is_main_process:
            check_server_logprobs_mode(generation)


def check_server_logprobs_mode(generation: VLLMGeneration) -> None:
    """As TRL's GRPO: the ratio needs log-probs after temperature and logit processing (`trl vllm-serve` starts
    vLLM with `--logprobs-mode processed_logprobs`; plain `vllm serve` does not)."""
    try:
        mode = generation.vllm_client.get_server_info()["model_config"]["logprobs_mode"]
    except Exception as exc:  # noqa: BLE001 - `/server_info` needs VLLM_SERVER_DEV_MODE=1
        mode = f"unknown ({type(exc).__name__})"
    if mode != "processed_logprobs":
        warnings.warn(f"The vLLM server's logprobs mode is {mode}, not processed_logprobs: the importance ratios "
                      "of vllm_importance_sampling_correction are biased (start it with `trl vllm-serve`).")


def sampled_log_probs(generation: HeadFreeVLLMGeneration, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probs vLLM reported for the tokens it sampled last (NaN where it reported none), fp32."""
    sampled, generation.last_logprobs = generation.last_logprobs, None
    if sampled is None or [len(s) for s in sampled] != mask.sum(1).tolist():
        raise RuntimeError("vLLM returned no sampled-token log-probs matching the completions; "
                           "vllm_importance_sampling_correction cannot be applied.")
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, seq in enumerate(sampled):  # vLLM reports a NaN log-prob as None: NaN here, ratio 1 later
        logp[i, :len(seq)] = torch.tensor([math.nan if lp[0] is None else lp[0] for lp in seq])
    return logp


def vllm_correction(args, logp: torch.Tensor, logp_vllm: torch.Tensor, mask: torch.Tensor, gather):
    """`vllm_importance_sampling_correction`: (per-token weights of the rollouts' loss, metrics). `logp`: the
    rollout-time student's log-probs; `gather`: the accelerator's gather, one collective for all statistics."""
    weights = vllm_importance_weights(logp, logp_vllm, mask, args.vllm_importance_sampling_mode,
                                      args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
    valid = mask.bool()
    delta = (logp - logp_vllm).abs()[valid]
    delta = delta[~delta.isnan()]  # tokens vLLM could not score do not count
    token_level = args.vllm_importance_sampling_mode.startswith("token")
    ratio = weights[valid] if token_level else weights[valid.any(1)].amax(1)  # a rollout's weight, once
    zero, inf = delta.new_zeros(1), delta.new_full((1,), math.inf)
    stats = torch.stack([delta.sum(), delta.new_tensor(delta.numel()), torch.cat([delta, zero]).max(),
                         ratio.sum(), ratio.new_tensor(ratio.numel()), torch.cat([ratio, inf]).min(),
                         torch.cat([ratio, zero]).max()])
    d_sum, d_n, d_max, r_sum, r_n, r_min, r_max = gather(stats[None]).T
    return weights, {
        "sampling/sampling_logp_difference/mean": (d_sum.sum() / d_n.sum().clamp(min=1)).item(),
        "sampling/sampling_logp_difference/max": d_max.max().item(),
        "sampling/importance_sampling_ratio/min": r_min.min().item(),
        "sampling/importance_sampling_ratio/mean": (r_sum.sum() / r_n.sum().clamp(min=1)).item(),
        "sampling/importance_sampling_ratio/max": r_max.max().item(),
    }


@torch.no_grad()
def teacher_completions(teacher_model, accelerator, gather_params: bool, prompt_ids, prompt_mask, generation_config,
                        eos_token_ids) -> list[list[int]]:
    """Online off-policy data: the teacher samples a completion per prompt with the rollout settings, cut after the
    first end token."""
    with unwrap_model_for_generation(teacher_model, accelerator, gather_deepspeed3_params=gather_params) as teacher:
        out = teacher.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
    end = set(eos_token_ids)
    completions = []
    for row in out[:, prompt_ids.size(1):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in end), len(row))
        completions.append(row[:cut])
    return completions


def _ids(encoded):
    # `apply_chat_template(tokenize=True)` returns a BatchEncoding or a plain list depending on the version.
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def completion_token_ids(tokenizer, prompt, completion, eos_token_ids: list[int], max_length: int,
                         chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of `completion` as the student would emit them after `prompt`, ending with an end-of-turn token.

    Conversational rows render prompt + completion with the chat template and keep what follows the rendered prompt
    (so the end-of-turn token is the template's, e.g. `<|im_end|>`), cut after the first end token. Text rows are
    tokenized without special tokens and end with the tokenizer's eos. Truncated to `max_length` tokens.
    """
    end = set(eos_token_ids)
    if is_conversational({"prompt": prompt}):
        kwargs = chat_template_kwargs or {}
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **kwargs))
        full_ids = _ids(tokenizer.apply_chat_template(prompt + messages, tokenize=True, **kwargs))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "The chat template does not render the prompt as a prefix of prompt + completion, so the completion's "
                "tokens cannot be located. Use a prefix-preserving chat template."
            )
        ids = full_ids[len(prompt_ids):]
    else:
        text = completion if isinstance(completion, str) else completion[0]["content"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for i, token in enumerate(ids):
        if token in end:
            ids = ids[: i + 1]
            break
    return ids[:max_length]


def context_length(*configs) -> int | None:
    """The smallest `max_position_embeddings` of the given model configs (None if none declares one)."""
    lengths = [getattr(c.get_text_config(), "max_position_embeddings", None) for c in configs if c is not None]
    lengths = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(lengths) if lengths else None


def prompt_limit(args, max_completion_length: int, *model_configs) -> tuple[int | None, str]:
    """(longest allowed prompt in tokens, why): `max_prompt_length`, else the context left for the completion: the
    models' (`max_position_embeddings` of student and teacher), or vLLM's engine limit (`vllm_max_model_length`) when
    rollouts come from vLLM and it is shorter. None: no limit is known."""
    context = context_length(*model_configs)
    limits = [(context, f"the models' context of {context} tokens (max_position_embeddings)")] if context else []
    engine = args.vllm_max_model_length if args.use_vllm else None
    if engine:
        limits.append((engine, f"vLLM's limit of {engine} tokens (vllm_max_model_length)"))
    context, what = min(limits) if limits else (None, "")
    if args.max_prompt_length is not None:
        if context is not None and args.max_prompt_length + max_completion_length > context:
            raise ValueError(
                f"AMMConfig.max_prompt_length={args.max_prompt_length} plus max_completion_length="
                f"{max_completion_length} exceeds {what}: set max_prompt_length <= {context - max_completion_length}.")
        return args.max_prompt_length, f"max_prompt_length={args.max_prompt_length}"
    if context is None:
        return None, ""
    return context - max_completion_length, f"{what} minus max_completion_length={max_completion_length}"


def prompts_too_long(lengths: list[int], where: str, limit: int | None, why: str, cut_allowed: bool) -> str | None:
    """Prompts never run past the models' context. Returns the warning about the prompts longer than `limit` (they
    are cut from the left when `cut_allowed`, i.e. `max_prompt_length` is set), None if there are none; without
    `cut_allowed` they are refused, with the count and the fix."""
    too_long = [n for n in lengths if limit is not None and n > limit]
    if not too_long:
        return None
    if not cut_allowed:
        raise ValueError(
            f"{len(too_long)} of {len(lengths)} prompts of {where} are longer than {limit} tokens ({why}); the "
            f"longest has {max(too_long)}. Nothing can run past that limit. Set max_prompt_length (prompts are then "
            f"cut from the left, with a warning), lower max_completion_length, or filter them.")
    return (f"{len(too_long)} of {len(lengths)} prompts of {where} are longer than {why} tokens (longest "
            f"{max(too_long)}) and are cut from the left to {limit} tokens.")
