"""Step throughput: `AMMTrainer` (objective amm, defaults) vs TRL's own `DistillationTrainer` (JSD), in one run.

Both trainers get the same student and teacher, the same prompts, batch, completion length, sampling settings and
rollout engine (`--use-vllm`), and run one after the other, each in its own subprocess (a colocated vLLM engine
does not release its GPU memory reliably inside a process, and each trainer must start from the same clean
state). With `--deepspeed zero3` each runs under ZeRO-3 in one process (`torchrun --nproc_per_node 1`).

Trainers (`--trainers`, comma-separated, default all three):
  trl           trl.DistillationTrainer, generalized JSD with `--beta` (0.5 = the symmetric JSD)
  amm           AMMTrainer, objective amm with its defaults (amm_beta 0.5: rollouts + the same number of dataset
                off-policy completions, each `--offpolicy-words` tokens long; two linear Q-heads)
  amm_onpolicy  AMMTrainer, objective amm, amm_beta 0: rollouts only, the same tokens as `trl`, so the ratio
                amm_onpolicy/trl is the cost of the moment-matching loss and heads alone

Per trainer: wall time of each optimizer step (device-synchronized callback), its rollout part (TRL's
`_generate_and_score_completions`, which includes the vLLM weight sync) and the sync alone; the steady step is the
median after the first step (first sync, compile, allocator growth); completion tokens/s = rollout tokens per step /
steady step; peak memory (torch allocated/reserved and the device's used memory, which includes vLLM's pool).
Completions are forced to full length (`min_new_tokens`/`min_tokens`), so every trainer processes the same tokens.
On vLLM's CPU build TRL's weight sync cannot update the engine (vLLM packs linear weights into its kernels' layout
on CPUs with AVX-512 BF16, bf16 models), so there both trainers sync through `amm_trl.vllm_cpu.CPUWeightSync`; on
GPUs TRL's trainer keeps its own. Each trainer's `weight_sync` field says which one ran.

    python3 bench/bench_step.py --use-vllm 0 --json results/step_hf.json        # GPU, benchmark models (0.95B / 2.07B)
    python3 bench/bench_step.py --use-vllm 1 --json results/step_vllm.json
    python3 bench/bench_step.py --use-vllm 1 --deepspeed zero3 --json results/step_vllm_zero3.json
    python3 bench/bench_step.py --tiny --json /tmp/step.json                 # CPU smoke (HF generate, tiny models)
    python3 bench/bench_step.py --tiny --use-vllm 1 --json /tmp/step.json    # the same with vLLM's CPU build
Prints one line `RESULT {...}` (ratios under `ratio_*`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SCRIPT = os.path.abspath(__file__)
TRAINERS = ("trl", "amm", "amm_onpolicy")


# ------------------------------------------------------------------------------------------------------- worker
def build_trainer(spec, dataset, callbacks):
    import torch

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    prompt_tokens, completion = spec["prompt_words"], spec["max_completion"]
    generation_kwargs = None
    if spec["fixed_length"]:  # no early EOS: every trainer generates exactly `completion` tokens per prompt
        generation_kwargs = {"min_tokens": completion} if spec["use_vllm"] else {"min_new_tokens": completion}
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-step-{spec['name']}-"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], logging_steps=1, learning_rate=1e-6,
        lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, max_completion_length=completion,
        report_to="none", save_strategy="no", shuffle_dataset=False, temperature=1.0, beta=spec["beta"],
        model_init_kwargs={"dtype": dtype}, teacher_model_init_kwargs={"dtype": dtype},
        gradient_checkpointing=spec["gradient_checkpointing"], use_vllm=spec["use_vllm"], vllm_mode="colocate",
        vllm_gpu_memory_utilization=spec["vllm_gpu_memory_utilization"],
        vllm_enable_sleep_mode=spec["vllm_enable_sleep_mode"],
        vllm_max_model_length=prompt_tokens + completion + 64, generation_kwargs=generation_kwargs, seed=0,
        deepspeed=C.zero3_config(cpu=not cuda) if spec["deepspeed"] == "zero3" else None,
    )
    if spec["name"] == "trl":
        from trl import DistillationConfig, DistillationTrainer
        from trl.generation.vllm_generation import VLLMGeneration

        from amm_trl.patches import trl_builds_generation
        from amm_trl.vllm_cpu import vllm_generation_class

        args = DistillationConfig(**common)
        # TRL's own weight sync on GPUs; on vLLM's CPU build it cannot update packed weights, so TRL's trainer gets
        # the same CPU sync as AMM's there (`weight_sync` in the JSON says which ran)
        with trl_builds_generation(vllm_generation_class(VLLMGeneration)):
            return DistillationTrainer(model=spec["student"], teacher_model=spec["teacher"], args=args,
                                       train_dataset=dataset.select_columns(["prompt"]), callbacks=callbacks)
    from amm_trl import AMMConfig, AMMTrainer

    amm_beta = 0.0 if spec["name"] == "amm_onpolicy" else spec["amm_beta"]
    args = AMMConfig(**common, objective="amm", amm_beta=amm_beta)
    return AMMTrainer(model=spec["student"], teacher_model=spec["teacher"], args=args, train_dataset=dataset,
                      callbacks=callbacks)


def weight_sync(trainer):
    """Which weight sync fed the trainer's vLLM engine: TRL's own, or amm_trl's CPU sync (vLLM's CPU build)."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return None
    from amm_trl.vllm_cpu import CPUWeightSync

    if isinstance(generation, CPUWeightSync):
        return ("amm_trl.vllm_cpu.CPUWeightSync: vLLM's CPU build packs linear weights into its kernels' layout "
                "and TRL's in-place load_weights cannot update them")
    return f"trl {type(generation).__name__}.sync_weights"


def worker(spec):
    C.die_with_parent()

    if spec["vllm_eager"]:  # test-only speed-up of the engine start; off by default (it changes the throughput)
        import functools

        import trl.generation.vllm_generation as vg

        vg.LLM = functools.partial(vg.LLM, enforce_eager=True)
    dataset = C.make_dataset(spec["steps"] * spec["batch"], spec["prompt_words"], spec["offpolicy_words"],
                             vocab=spec["vocab"], seed=0)
    timer = C.step_timer_callback()
    start = time.perf_counter()
    with C.DeviceMemoryMonitor() as monitor:
        trainer = build_trainer(spec, dataset, [timer])
        init_s = time.perf_counter() - start
        rollout_s, sync_s, tokens = [], [], []
        C.instrument_rollouts(trainer, rollout_s, sync_s, tokens)
        t = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t
    steps = timer.steps
    steady = C.steady(steps)
    rollout_tokens = [c.get("completion_mask", 0) for c in tokens]
    off_tokens = [c.get("off_completion_mask", 0) for c in tokens]
    steady_rollout_tokens = C.steady(rollout_tokens)
    logs = trainer.state.log_history
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    result = {
        "name": spec["name"], "trainer": type(trainer).__name__,
        "weight_sync": weight_sync(trainer),
        "deepspeed_zero3_active": bool(trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()),
        "world_size": trainer.accelerator.num_processes,
        "objective": getattr(trainer.args, "objective", f"trl-jsd(beta={spec['beta']})"),
        "amm_beta": getattr(trainer.args, "amm_beta", None),
        "init_s": round(init_s, 1), "train_s": round(train_s, 1), "steps": len(steps),
        "step_s": [round(s, 3) for s in steps], "steady_step_s": round(steady, 3),
        "rollout_s": [round(s, 3) for s in rollout_s],
        "steady_rollout_s": round(C.steady(rollout_s), 3) if rollout_s else None,
        "steady_non_rollout_s": round(steady - C.steady(rollout_s), 3) if rollout_s else None,
        "sync_s": [round(s, 3) for s in sync_s],
        "tokens_per_step": tokens,
        "rollout_tokens_per_step": steady_rollout_tokens, "offpolicy_tokens_per_step": C.steady(off_tokens),
        "completion_tok_per_s": round(steady_rollout_tokens / steady, 1) if steady else None,
        "loss_tok_per_s": round((steady_rollout_tokens + C.steady(off_tokens)) / steady, 1) if steady else None,
        "loss": [h["loss"] for h in logs if "loss" in h],
        "memory": {**C.torch_memory(), "device_used_peak_gib": monitor.peak_gib(), "device_used_source":
                   monitor.source},
    }
    with open(spec["result_file"], "w") as f:
        json.dump(result, f)
    print("WORKER_RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can make interpreter teardown slow


# ------------------------------------------------------------------------------------------------------- parent
def run_worker(spec, log_dir, timeout):
    argv = ["--worker", json.dumps(spec)]
    cmd = C.torchrun_cmd(SCRIPT, argv) if spec["deepspeed"] == "zero3" else [sys.executable, SCRIPT, *argv]
    log = os.path.join(log_dir, f"step_{spec['name']}.log")
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=C.ROOT,
                                  preexec_fn=C.die_with_parent_term,
                                  env={**os.environ, "PYTHONPATH": C.ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                                        "")})
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = round(time.perf_counter() - start, 1)
    if rc == 0 and os.path.exists(spec["result_file"]):
        with open(spec["result_file"]) as f:
            return {**json.load(f), "wall_s": wall, "log": log}
    with open(log) as f:
        tail = C.log_tail(f.read(), 40)
    print(f"[bench_step] worker {spec['name']} failed (rc={rc}); log tail:\n{tail}", flush=True)
    return {"name": spec["name"], "error": f"rc={rc}", "wall_s": wall, "log": log, "log_tail": tail}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--student", default=None)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--models-dir", default="/tmp/amm-bench/models", help="the benchmark models are built here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, 3 steps")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--use-vllm", type=int, default=0)
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--vllm-enable-sleep-mode", type=int, default=0)
    ap.add_argument("--vllm-eager", type=int, default=0, help="enforce_eager for the colocated engine")
    ap.add_argument("--deepspeed", choices=["none", "zero3"], default="none")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-completion", type=int, default=256)
    ap.add_argument("--offpolicy-words", type=int, default=None, help="AMM off-policy completion length "
                    "(default: --max-completion)")
    ap.add_argument("--beta", type=float, default=0.5, help="TRL's generalized-JSD beta")
    ap.add_argument("--amm-beta", type=float, default=0.5, help="AMM off-policy weight (AMMConfig default 0.5)")
    ap.add_argument("--gradient-checkpointing", type=int, default=1, help="TRL's default is on")
    ap.add_argument("--fixed-length", type=int, default=1, help="force full-length completions")
    ap.add_argument("--worker-timeout", type=int, default=600)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))

    vocab = C.VOCAB
    if a.tiny:
        vocab = C.TINY_VOCAB
        a.steps, a.batch, a.prompt_words, a.max_completion = min(a.steps, 3), min(a.batch, 2), 6, 8
        if a.models_dir == "/tmp/amm-bench/models":
            a.models_dir = "/tmp/amm-bench/tiny-models"
    if a.offpolicy_words is None:
        a.offpolicy_words = a.max_completion
    built = None
    if a.student is None or a.teacher is None:
        shapes = {"student": "tiny_student", "teacher": "tiny_teacher"} if a.tiny else \
            {"student": "bench_student", "teacher": "bench_teacher"}
        built = C.build_models(a.models_dir, shapes, vocab=vocab, dtype="float32" if a.tiny else "bfloat16")
        a.student, a.teacher = a.student or built["paths"]["student"], a.teacher or built["paths"]["teacher"]
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="bench-step-logs-")
    os.makedirs(log_dir, exist_ok=True)
    names = [n for n in a.trainers.split(",") if n]
    unknown = set(names) - set(TRAINERS)
    if unknown:
        ap.error(f"unknown trainers {sorted(unknown)}; choose from {TRAINERS}")

    results = {}
    for name in names:
        spec = {"name": name, "student": a.student, "teacher": a.teacher, "use_vllm": bool(a.use_vllm),
                "vllm_gpu_memory_utilization": a.vllm_gpu_memory_utilization,
                "vllm_enable_sleep_mode": bool(a.vllm_enable_sleep_mode), "vllm_eager": bool(a.vllm_eager),
                "deepspeed": a.deepspeed, "steps": a.steps, "batch": a.batch, "prompt_words": a.prompt_words,
                "max_completion": a.max_completion, "offpolicy_words": a.offpolicy_words, "beta": a.beta,
                "amm_beta": a.amm_beta, "gradient_checkpointing": bool(a.gradient_checkpointing),
                "fixed_length": bool(a.fixed_length), "vocab": vocab,
                "result_file": os.path.join(log_dir, f"step_{name}.json")}
        print(f"[bench_step] running {name} ...", flush=True)
        results[name] = run_worker(spec, log_dir, a.worker_timeout)

    out = {"bench": "step", "tiny": a.tiny, "student": a.student, "teacher": a.teacher, "use_vllm": bool(a.use_vllm),
           "vllm_gpu_memory_utilization": a.vllm_gpu_memory_utilization if a.use_vllm else None,
           "vllm_enable_sleep_mode": bool(a.vllm_enable_sleep_mode), "vllm_eager": bool(a.vllm_eager),
           "deepspeed": a.deepspeed, "steps": a.steps, "batch": a.batch, "prompt_words": a.prompt_words,
           "max_completion": a.max_completion, "offpolicy_words": a.offpolicy_words, "beta": a.beta,
           "amm_beta": a.amm_beta, "gradient_checkpointing": bool(a.gradient_checkpointing),
           "trainers": results, "run": C.run_info()}
    if built and built["build_s"]:
        out["model_build_s"] = built["build_s"]
    ok = {n: r for n, r in results.items() if "error" not in r}
    if "trl" in ok:
        base = ok["trl"]
        for name in ("amm", "amm_onpolicy"):
            if name in ok:
                r = ok[name]
                out[f"ratio_step_{name}_over_trl"] = round(r["steady_step_s"] / base["steady_step_s"], 3)
                out[f"ratio_non_rollout_{name}_over_trl"] = (
                    round(r["steady_non_rollout_s"] / base["steady_non_rollout_s"], 3)
                    if r.get("steady_non_rollout_s") and base.get("steady_non_rollout_s") else None)
                out[f"ratio_completion_tok_per_s_{name}_over_trl"] = round(
                    r["completion_tok_per_s"] / base["completion_tok_per_s"], 3)
        out["target_ratio_step_amm_over_trl"] = 1.15
    C.emit(out, a.json)
    return 0 if len(ok) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
