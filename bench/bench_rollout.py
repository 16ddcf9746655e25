"""Rollout throughput: vLLM `LLM.generate` vs transformers `model.generate`, same student, same prompts, one run.

Prompts are random token ids (the same list for both engines); every output is forced to exactly `--new-tokens`
tokens (vLLM `min_tokens = max_tokens, ignore_eos`; HF `min_new_tokens = max_new_tokens`), sampling at temperature
1 with no top-k/top-p, so both engines produce the same number of tokens; the JSON checks it (`token_counts_match`).
Each engine runs one untimed warm-up batch, then timed passes over all prompts (`--repeats` for vLLM, whose passes
take seconds; `--hf-repeats` per HF batch size); tokens/s is the best pass (the median is reported too). The ratio
is vLLM's tokens/s over HF's, for each HF batch size and for the best one.

    python3 bench/bench_rollout.py --json results/rollout.json            # GPU: 0.95B student built in /tmp if absent
    python3 bench/bench_rollout.py --tiny --json /tmp/rollout.json     # smoke run (vLLM too when installed)
    python3 bench/bench_rollout.py --model asset:smollm2-135m-instruct --dtype bfloat16 --num-prompts 32 \
        --prompt-len 32 --new-tokens 64 --hf-batch 32 --repeats 1      # CPU, with vLLM's CPU build
Prints one line `RESULT {...}`.

On a CPU machine vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): bf16 in a separate engine process
can die with SIGILL in vLLM's CPU attention (seen on a 2-core AMD EPYC). Its KV cache takes `VLLM_CPU_KVCACHE_SPACE`
GiB (1 unless set, `_common.py`).
"""

import argparse
import gc
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def prompt_ids(n, length, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(len(C.SPECIALS), vocab) for _ in range(length)] for _ in range(n)]


def summarize(passes):
    rates = [n / s for n, s in passes]
    return {"passes": [{"tokens": n, "seconds": round(s, 3), "tok_per_s": round(n / s, 1)} for n, s in passes],
            "best_tok_per_s": round(max(rates), 1), "median_tok_per_s": round(statistics.median(rates), 1),
            "tokens_per_pass": passes[0][0]}


def run_hf(a, prompts, batch):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - start
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.new_tokens,
              min_new_tokens=a.new_tokens, pad_token_id=3, eos_token_id=2)
    ids = torch.tensor(prompts, device=device)
    lengths = set()
    with torch.no_grad():
        warm = ids[:batch]
        model.generate(warm, attention_mask=torch.ones_like(warm), **kw)
        passes = []
        for _ in range(a.hf_repeats):
            C.cuda_sync()
            t = time.perf_counter()
            n = 0
            for i in range(0, len(prompts), batch):
                x = ids[i:i + batch]
                out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
                new = out.shape[1] - x.shape[1]
                lengths.add(new)
                n += new * x.shape[0]
            C.cuda_sync()
            passes.append((n, time.perf_counter() - t))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"engine": "hf", "batch": batch, "dtype": str(dtype).removeprefix("torch."), "load_s": round(load_s, 1),
            "output_lengths": sorted(lengths), **summarize(passes)}


def run_vllm(a, prompts):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    kw = {"attention_backend": a.attention_backend} if a.attention_backend else {}
    llm = LLM(model=a.model, dtype=a.dtype, gpu_memory_utilization=a.vllm_gpu_memory_utilization,
              enforce_eager=a.vllm_eager, seed=0, max_model_len=a.prompt_len + a.new_tokens + 64, **kw)
    init_s = time.perf_counter() - start
    sp = SamplingParams(max_tokens=a.new_tokens, min_tokens=a.new_tokens, ignore_eos=True, temperature=1.0,
                        top_p=1.0, top_k=0, detokenize=False)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:16], sp, use_tqdm=False)  # warm-up
    passes, lengths = [], set()
    for _ in range(a.repeats):
        t = time.perf_counter()
        outs = llm.generate(requests, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        lengths.update(len(o.outputs[0].token_ids) for o in outs)
        passes.append((sum(len(o.outputs[0].token_ids) for o in outs), dt))
    result = {"engine": "vllm", "dtype": a.dtype, "eager": a.vllm_eager,
              "gpu_memory_utilization": a.vllm_gpu_memory_utilization,
              "attention_backend": a.attention_backend, "init_s": round(init_s, 1),
              "output_lengths": sorted(lengths), **summarize(passes)}
    try:  # release the engine before HF runs (best effort; the HF pass needs a few GiB only)
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="student folder or `asset:NAME` (amm-trl assets); default: build the benchmark's "
                         "0.95B student")
    ap.add_argument("--dtype", default=None, help="both engines; default bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--models-dir", default="/tmp/amm-bench/models")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny model, few prompts")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-batch", default="64,256", help="comma-separated HF generate batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed vLLM passes over all prompts")
    ap.add_argument("--hf-repeats", type=int, default=1, help="timed HF passes per batch size (each is long)")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--vllm-eager", action="store_true", help="enforce_eager=True (no torch.compile/CUDA graphs)")
    ap.add_argument("--attention-backend", default=None, help="vLLM attention backend, e.g. TRITON_ATTN")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    if not cuda:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vocab = C.VOCAB
    if a.tiny:
        vocab = C.TINY_VOCAB
        a.num_prompts, a.prompt_len, a.new_tokens, a.repeats, a.hf_repeats = min(a.num_prompts, 8), 8, 8, 1, 1
        a.hf_batch = "4,8"
        if a.models_dir == "/tmp/amm-bench/models":
            a.models_dir = "/tmp/amm-bench/tiny-models"
    built = None
    if a.model is None:
        built = C.build_models(a.models_dir, {"student": "tiny_student" if a.tiny else "bench_student"}, vocab=vocab,
                               dtype="float32" if a.tiny else "bfloat16")
        a.model = built["paths"]["student"]
    elif a.model.startswith("asset:"):
        from amm_trl.assets import resolve_asset_refs

        a.model = resolve_asset_refs(a.model)
        from transformers import AutoConfig

        vocab = min(vocab, AutoConfig.from_pretrained(a.model).vocab_size)
    prompts = prompt_ids(a.num_prompts, a.prompt_len, vocab)
    batches = [int(b) for b in a.hf_batch.split(",") if b]

    notes, results = [], {}
    has_vllm = importlib.util.find_spec("vllm") is not None
    if a.skip_vllm or not has_vllm:
        why = "--skip-vllm" if a.skip_vllm else "vLLM is not installed"
        notes.append(f"vLLM path skipped ({why}): HF generate only; no vLLM figure or ratio in this result")
    else:
        # vLLM first: its engine starts in a process whose CUDA state is still clean.
        results["vllm"] = run_vllm(a, prompts)
    results["hf"] = [run_hf(a, prompts, b) for b in batches]

    out = {"bench": "rollout", "tiny": a.tiny, "model": a.model, "dtype": a.dtype, "num_prompts": a.num_prompts,
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "vllm_repeats": a.repeats,
           "hf_repeats": a.hf_repeats,
           "expected_tokens_per_pass": a.num_prompts * a.new_tokens, **results, "notes": notes,
           "run": C.run_info()}
    if built and built["build_s"]:
        out["model_build_s"] = built["build_s"]
    counts = [r["tokens_per_pass"] for r in results["hf"]] + ([results["vllm"]["tokens_per_pass"]]
                                                               if "vllm" in results else [])
    out["token_counts_match"] = all(c == a.num_prompts * a.new_tokens for c in counts)
    best_hf = max(results["hf"], key=lambda r: r["best_tok_per_s"])
    out["hf_best"] = {"batch": best_hf["batch"], "tok_per_s": best_hf["best_tok_per_s"]}
    if "vllm" in results:
        v = results["vllm"]["best_tok_per_s"]
        out["ratio_vllm_over_hf"] = {str(r["batch"]): round(v / r["best_tok_per_s"], 2) for r in results["hf"]}
        out["ratio_vllm_over_hf_best"] = round(v / best_hf["best_tok_per_s"], 2)
        if cuda:
            out["target_ratio"] = 10.0
    C.emit(out, a.json)
    sys.stdout.flush()
    os._exit(0)  # skip the slow teardown of vLLM's engine threads


if __name__ == "__main__":
    main()
