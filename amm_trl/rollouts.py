"""Rollout plumbing around TRL's generation: the vLLM generator without the Q-heads, the server probe, the vLLM
sampling correction, extra logits processors for HF `generate`, and online teacher completions."""

import contextlib
import math
import time
import warnings
from urllib.parse import urlparse

import torch
from accelerate.utils import is_peft_model
from transformers import LogitsProcessorList
from trl.generation.vllm_generation import VLLMGeneration
from trl.models.utils import unwrap_model_for_generation

from .objectives import vllm_importance_weights
from .qhead import HEADS_ATTRIBUTE


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


def _server_url(args) -> tuple[str, str]:
    if args.vllm_server_base_url is not None:
        return args.vllm_server_base_url.rstrip("/"), f"vllm_server_base_url={args.vllm_server_base_url!r}"
    return (f"http://{args.vllm_server_host}:{args.vllm_server_port}",
            f"vllm_server_host={args.vllm_server_host!r}, vllm_server_port={args.vllm_server_port}")


def wait_for_vllm_server(args, model) -> None:
    """Server mode: polls the server's `/health` until `vllm_server_timeout`, each request bounded by the time left,
    and raises an error naming the fields to fix. TRL's client polls with `requests.get` without a timeout, so a host
    that accepts connections but never answers (or silently drops packets) would block it far past the timeout."""
    import requests  # TRL's dependency for server mode

    url, where = _server_url(args)
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


@contextlib.contextmanager
def extra_logits_processor(model, make_processor):
    """HF `generate` on `model` with one more logits processor, `make_processor(attention_mask)`, per call.

    Wraps `model.generate` for the duration: TRL's HF rollout path calls `generate(**inputs, generation_config=...)`
    and offers no way to pass a logits processor (a `GenerationConfig` cannot hold one)."""
    original = model.generate

    def generate(*args, **kwargs):
        processors = LogitsProcessorList([make_processor(kwargs["attention_mask"])])
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate


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
