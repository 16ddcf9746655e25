"""7B -> 3B on one GPU: OpenLLaMA-7B-shaped teacher, OpenLLaMA-3B-shaped student, ZeRO-3, bf16, colocated vLLM.

Random-init bf16 models with the OpenLLaMA shapes (teacher hidden 4096, 32 layers, 32 heads, intermediate 11008;
student hidden 3200, 26 layers, 32 heads, intermediate 8640; vocab 32000) are built on the GPU and saved under
`--models-dir` (default /tmp/amm-7b3b; reused while the machine stays up). Then one process (re-launched under
`torchrun --nproc_per_node 1` if not already) trains `--steps` AMM steps with DeepSpeed ZeRO-3, bf16, gradient
checkpointing, batch `--batch` x `--max-completion` rollout tokens (forced to full length) from a colocated vLLM
engine (`--vllm-gpu-memory-utilization`, `--vllm-enable-sleep-mode`), plus as many dataset off-policy completions.

Reports: peak memory (torch allocated/reserved, and the device's used memory polled by NVML, which includes vLLM's
pool), steady step time (median after the first step), rollout and non-rollout parts, tokens/s, and MFU:
  model FLOPs per step = 6 * N_student_nonembed * T + 12 * L_s * d_s * S * T        (student fwd+bwd, PaLM attention)
                       + 2 * N_teacher_nonembed * T + 4 * L_t * d_t * S * T         (teacher forward)
                       + (6 d_s + 2 d_t + 4 d_s [Q-head, amm only]) * V * T_loss     (vocabulary projections)
  (T = non-pad tokens through the models, S = mean sequence length, T_loss = completion tokens in the loss; gradient
  checkpointing recomputation and the rollouts' own FLOPs are not counted), over the steady step time and
  `--peak-tflops` (default 989: H100 SXM dense bf16). `mfu_excluding_rollout` divides by the non-rollout time.
Also DeepSpeed's ZeRO-3 model-state estimators (`estimate_zero3_model_states_mem_needs_all_cold`) for the
student + Q-heads and for the teacher on 8 GPUs, and a per-GPU estimate for 8 x A100-80GB and 8 x A100-40GB that adds
the memory this run measured beyond the 1-GPU model states (formula in the JSON, `per_gpu_estimate`).

    python3 bench/bench_7b3b.py --json results/7b3b.json                             # GPU (H100 80GB)
    python3 bench/bench_7b3b.py --vllm-enable-sleep-mode 1 --json results/7b3b_sleep.json
    python3 bench/bench_7b3b.py --offload-optimizer cpu --json results/7b3b_offload.json
    python3 bench/bench_7b3b.py --estimate-only                                   # CPU, instant: estimators only
    python3 bench/bench_7b3b.py --tiny --json /tmp/7b3b.json                      # CPU smoke: ZeRO-3, gloo
                                                             # (colocated vLLM when installed: vLLM's CPU build)
Prints one line `RESULT {...}`; an out-of-memory run still prints it, with `fits: false` and where it failed.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SCRIPT = os.path.abspath(__file__)
A100 = {"8xA100-80GB": 80.0, "8xA100-40GB": 40.0}  # nominal GiB per GPU


# ------------------------------------------------------------------------------------------------- estimators
def deepspeed_estimates(total, largest, gpus=8) -> dict:
    """DeepSpeed's ZeRO-3 model-state estimator: its printed table (`..._all_cold`) and the two rows we use."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_cold(total_params=total, largest_layer_params=largest,
                                                       num_gpus_per_node=gpus, num_nodes=1)
    rows = {}
    for name, offload in (("offload_none", False), ("offload_optimizer_cpu", True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                            cpu_offload=offload, cpu_offload_params=False,
                                                            zero_init=True)
        rows[name] = {"per_gpu_gib": round(gpu / 2**30, 2), "per_cpu_node_gib": round(cpu / 2**30, 2)}
    return {"gpus": gpus, "total_params": total, "largest_layer_params": largest, "table": buf.getvalue().strip(),
            **rows}


def frozen_teacher_states_gib(total, largest, gpus):
    """A frozen bf16 teacher under ZeRO-3: its shard (2 bytes/param / gpus) plus one gathered layer (DeepSpeed's
    4 bytes/param allowance). DeepSpeed's estimator assumes a trained model (grads + Adam) and overstates it."""
    return round((2 * total / gpus + 4 * largest) / 2**30, 2)


def model_shapes(tiny):
    if tiny:
        return "tiny_teacher", "tiny_student", C.TINY_VOCAB
    return "openllama_7b", "openllama_3b", C.VOCAB


def static_report(a):
    """Parameter counts and estimators: needs no GPU (meta-device models)."""
    teacher_shape, student_shape, vocab = model_shapes(a.tiny)
    t, s = C.count_params(teacher_shape, vocab), C.count_params(student_shape, vocab)
    d_s = C.SHAPES[student_shape][0]
    heads = 2 * (vocab * d_s + vocab) if a.objective == "amm" else 0  # two linear Q-heads (AMMConfig defaults)
    student_trained = s["total"] + heads
    largest = max(s["largest_layer"], vocab * d_s if heads else 0)
    report = {
        "params": {"teacher": t, "student": s, "q_heads": heads, "student_plus_heads": student_trained},
        "bf16_gib": {"teacher": round(2 * t["total"] / 2**30, 2), "student": round(2 * s["total"] / 2**30, 2),
                     "q_heads": round(2 * heads / 2**30, 2)},
        "deepspeed_estimator": {
            "student_plus_heads_8gpu": deepspeed_estimates(student_trained, largest, 8),
            "teacher_8gpu_as_if_trained": deepspeed_estimates(t["total"], t["largest_layer"], 8),
            "student_plus_heads_1gpu": deepspeed_estimates(student_trained, largest, 1),
        },
        "frozen_teacher_states_gib": {str(g): frozen_teacher_states_gib(t["total"], t["largest_layer"], g)
                                      for g in (1, 8)},
    }
    return report


def per_gpu_estimate(report, measured_peak_gib, measured_total_gib, a):
    """8-GPU per-GPU memory = DeepSpeed's student+heads states on 8 GPUs + the frozen teacher's 8-GPU shard + what this
    run measured beyond its own 1-GPU states (activations, gathered layers, buffers, CUDA context, vLLM). Without
    sleep mode the vLLM pool is `vllm_gpu_memory_utilization` x the GPU's memory, so it is rescaled to each GPU."""
    est = report["deepspeed_estimator"]
    key = "offload_optimizer_cpu" if a.offload_optimizer == "cpu" else "offload_none"
    states_1 = est["student_plus_heads_1gpu"][key]["per_gpu_gib"] + report["frozen_teacher_states_gib"]["1"]
    states_8 = est["student_plus_heads_8gpu"][key]["per_gpu_gib"] + report["frozen_teacher_states_gib"]["8"]
    vllm_scaled = a.use_vllm and not a.vllm_enable_sleep_mode
    vllm_here = a.vllm_gpu_memory_utilization * measured_total_gib if vllm_scaled else 0.0
    rest = None if measured_peak_gib is None else max(measured_peak_gib - states_1 - vllm_here, 0.0)
    out = {"formula": "states_8gpu(student+heads, DeepSpeed) + frozen_teacher_8gpu + max(measured_peak - "
                      "states_1gpu - vllm_pool_here, 0) + vllm_pool_there",
           "offload": key, "states_1gpu_gib": round(states_1, 2), "states_8gpu_gib": round(states_8, 2),
           "measured_peak_gib": measured_peak_gib,
           "measured_beyond_states_gib": None if rest is None else round(rest, 2),
           "vllm_pool_rescaled": vllm_scaled}
    for name, cap in A100.items():
        vllm_there = a.vllm_gpu_memory_utilization * cap if vllm_scaled else 0.0
        if rest is None:
            out[name] = {"model_states_only_gib": round(states_8 + vllm_there, 2), "total_gib": None, "fits": None}
        else:
            total = states_8 + rest + vllm_there
            out[name] = {"total_gib": round(total, 2), "capacity_gib": cap, "fits": total <= cap}
    return out


# ----------------------------------------------------------------------------------------------------- FLOPs
def step_flops(report, tokens, a):
    """Model FLOPs of one step from its token counts (see the module docstring)."""
    teacher_shape, student_shape, vocab = model_shapes(a.tiny)
    d_s, l_s = C.SHAPES[student_shape][:2]
    d_t, l_t = C.SHAPES[teacher_shape][:2]
    n_s = report["params"]["student"]["non_embedding"]
    n_t = report["params"]["teacher"]["non_embedding"]
    prompt, rollout, off = tokens.get("prompt_mask", 0), tokens.get("completion_mask", 0), \
        tokens.get("off_completion_mask", 0)
    sequences = tokens.get("sequences", 1)
    has_off = "off_completion_mask" in tokens
    has_on = "completion_mask" in tokens
    # prompts run once per data kind (on-policy and off-policy sequences share the prompts)
    t_all = (prompt + rollout if has_on else 0) + (prompt + off if has_off else 0)
    n_seq = sequences * (int(has_on) + int(has_off))
    seq = t_all / max(n_seq, 1)
    t_loss = rollout + off
    student = 6 * n_s * t_all + 12 * l_s * d_s * seq * t_all
    teacher = 2 * n_t * t_all + 4 * l_t * d_t * seq * t_all
    heads = 4 * d_s * vocab * t_loss if a.objective == "amm" else 0
    vocab_proj = (6 * d_s + 2 * d_t) * vocab * t_loss + heads
    return {"tokens_through_models": t_all, "loss_tokens": t_loss, "mean_sequence": round(seq, 1),
            "student": student, "teacher": teacher, "vocab_projections": vocab_proj,
            "total": student + teacher + vocab_proj}


# ---------------------------------------------------------------------------------------------------- training
def profiler_callback(step_index, out_path, rows=25):
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof, self.top = None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step_index:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or self.top is not None:
                return
            C.cuda_sync()
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            averages = self.prof.key_averages()
            table = averages.table(sort_by=key, row_limit=rows)
            with open(out_path, "w") as f:
                f.write(table)
            attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            ranked = sorted(averages, key=lambda e: getattr(e, attr, 0), reverse=True)[:15]
            self.top = [{"name": e.key[:80], "self_ms": round(getattr(e, attr, 0) / 1e3, 2), "calls": e.count}
                        for e in ranked]

    return Profile()


def train(a, report):
    import torch

    teacher_shape, student_shape, vocab = model_shapes(a.tiny)
    cuda = torch.cuda.is_available()
    if a.vllm_eager:
        import functools

        import trl.generation.vllm_generation as vg

        vg.LLM = functools.partial(vg.LLM, enforce_eager=True)
    from amm_trl import AMMConfig, AMMTrainer

    dtype = "bfloat16" if cuda else "float32"
    dataset = C.make_dataset(a.steps * a.batch, a.prompt_words, a.offpolicy_words, vocab=vocab, seed=0)
    generation_kwargs = {"min_tokens": a.max_completion} if a.use_vllm else {"min_new_tokens": a.max_completion}
    args = AMMConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-7b3b-"), objective=a.objective, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, max_steps=a.steps, logging_steps=1, learning_rate=1e-6,
        lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, max_completion_length=a.max_completion,
        report_to="none", save_strategy="no", shuffle_dataset=False, temperature=1.0, seed=0,
        model_init_kwargs={"dtype": dtype, "attn_implementation": a.attn_implementation},
        teacher_model_init_kwargs={"dtype": dtype, "attn_implementation": a.attn_implementation},
        gradient_checkpointing=bool(a.gradient_checkpointing), use_vllm=bool(a.use_vllm), vllm_mode="colocate",
        vllm_gpu_memory_utilization=a.vllm_gpu_memory_utilization,
        vllm_enable_sleep_mode=bool(a.vllm_enable_sleep_mode),
        vllm_max_model_length=a.prompt_words + a.max_completion + 64, generation_kwargs=generation_kwargs,
        loss_chunk_tokens=a.loss_chunk_tokens,
        deepspeed=C.zero3_config(cpu=not cuda, offload_optimizer=a.offload_optimizer),
    )
    timer = C.step_timer_callback()
    callbacks = [timer]
    prof = None
    if a.profile_out:
        prof = profiler_callback(a.steps - 1, a.profile_out)
        callbacks.append(prof)
    result = {"phase": "init"}
    rollout_s, sync_s, tokens = [], [], []
    with C.DeviceMemoryMonitor() as monitor:
        try:
            start = time.perf_counter()
            trainer = AMMTrainer(model=os.path.join(a.models_dir, "student"),
                                 teacher_model=os.path.join(a.models_dir, "teacher"), args=args,
                                 train_dataset=dataset if a.objective == "amm" else dataset.select_columns(
                                     ["prompt"]), callbacks=callbacks)
            result["init_s"] = round(time.perf_counter() - start, 1)
            result["memory_after_init"] = {**C.torch_memory(), "device_used_peak_gib": monitor.peak_gib()}
            C.instrument_rollouts(trainer, rollout_s, sync_s, tokens)
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            result["deepspeed_zero3_active"] = bool(trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
            result["q_head_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.q_heads.parameters()) \
                if trainer.q_heads is not None else 0
            result["phase"] = "train"
            start = time.perf_counter()
            trainer.train()
            result["train_s"] = round(time.perf_counter() - start, 1)
            result["phase"] = "done"
            result["fits"] = True
            result["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        except Exception as exc:  # an OOM (torch, DeepSpeed or vLLM's own check) is a result, not a crash
            text = f"{type(exc).__name__}: {exc}"
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower() or \
                "memory" in text.lower() and ("vllm" in text.lower() or "cache blocks" in text.lower())
            result.update(fits=False if oom else None, error=text[:2000], oom=oom,
                          failed_at_step=len(timer.steps) if result["phase"] == "train" else None,
                          traceback=C.log_tail(traceback.format_exc(), 25))
    result["memory"] = {**C.torch_memory(), "device_used_peak_gib": monitor.peak_gib(),
                        "device_used_source": monitor.source}
    steps = timer.steps
    result.update(step_s=[round(s, 3) for s in steps], rollout_s=[round(s, 3) for s in rollout_s],
                  sync_s=[round(s, 3) for s in sync_s], tokens_per_step=tokens)
    if prof is not None and prof.top is not None:
        result["profile_top"] = prof.top
        result["profile_table"] = a.profile_out
    if len(steps) >= 2 or (steps and result.get("fits")):
        step = C.steady(steps)
        roll = C.steady(rollout_s) if rollout_s else 0.0
        tok = tokens[-1]
        flops = step_flops(report, tok, a)
        peak = a.peak_tflops * 1e12
        result.update(
            steady_step_s=round(step, 3), steady_rollout_s=round(roll, 3), steady_non_rollout_s=round(step - roll, 3),
            completion_tok_per_s=round(tok.get("completion_mask", 0) / step, 1),
            loss_tok_per_s=round(flops["loss_tokens"] / step, 1),
            flops_per_step=flops, model_tflops_per_s=round(flops["total"] / step / 1e12, 2),
            mfu=round(flops["total"] / step / peak, 4),
            mfu_excluding_rollout=round(flops["total"] / max(step - roll, 1e-9) / peak, 4),
            peak_tflops=a.peak_tflops)
    return result


# -------------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, ZeRO-3 on gloo")
    ap.add_argument("--estimate-only", action="store_true", help="parameter counts and DeepSpeed estimators only")
    ap.add_argument("--build-only", action="store_true", help="build and save the models, then exit")
    ap.add_argument("--models-dir", default=None, help="default /tmp/amm-7b3b (tiny: /tmp/amm-7b3b-tiny)")
    ap.add_argument("--objective", default="amm", choices=["amm", "jsd", "fkl", "rkl"])
    ap.add_argument("--use-vllm", type=int, default=1)
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.15)
    ap.add_argument("--vllm-enable-sleep-mode", type=int, default=0)
    ap.add_argument("--vllm-eager", type=int, default=0)
    ap.add_argument("--offload-optimizer", choices=["none", "cpu"], default="none")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-completion", type=int, default=256)
    ap.add_argument("--offpolicy-words", type=int, default=None, help="default: --max-completion")
    ap.add_argument("--gradient-checkpointing", type=int, default=1)
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--loss-chunk-tokens", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--profile-out", default=None, help="torch.profiler table of the last step to this file")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.tiny:  # colocated vLLM too where it is installed (vLLM's CPU build on a CPU machine)
        import importlib.util

        a.use_vllm = a.use_vllm if importlib.util.find_spec("vllm") is not None else 0
        a.steps, a.batch, a.prompt_words, a.max_completion = min(a.steps, 3), 2, 6, 8
    if a.offpolicy_words is None:
        a.offpolicy_words = a.max_completion
    a.models_dir = a.models_dir or ("/tmp/amm-7b3b-tiny" if a.tiny else "/tmp/amm-7b3b")

    report = static_report(a)
    config = {k: v for k, v in vars(a).items() if k not in ("json",)}
    if a.estimate_only:
        out = {"bench": "7b3b", "mode": "estimate-only", "config": config, **report}
        # no activations here (nothing ran): model states (no offload) + the colocated vLLM pool, per GPU
        states = report["deepspeed_estimator"]["student_plus_heads_8gpu"]["offload_none"]["per_gpu_gib"] + \
            report["frozen_teacher_states_gib"]["8"]
        out["static_per_gpu_8gpu_gib"] = {
            "model_states": round(states, 2),
            **{f"{name}_plus_vllm_pool": round(states + (a.vllm_gpu_memory_utilization * cap if a.use_vllm else 0), 2)
               for name, cap in A100.items()},
            "note": "model states (student+heads by DeepSpeed's estimator, frozen bf16 teacher shard) plus the vLLM "
                    "pool (utilization x capacity); activations, gathered layers and buffers are not included"}
        out["run"] = C.run_info()
        C.emit(out, a.json)
        return 0

    if a.build_only:
        teacher_shape, student_shape, vocab = model_shapes(a.tiny)
        built = C.build_models(a.models_dir, {"teacher": teacher_shape, "student": student_shape}, vocab=vocab,
                               dtype="float32" if a.tiny else "bfloat16")
        if built["build_s"]:
            with open(os.path.join(a.models_dir, "build_s.json"), "w") as f:
                json.dump(built["build_s"], f)
        print(f"[7b3b] models ready in {a.models_dir}: {built['build_s'] or 'reused'}", flush=True)
        return 0
    if "RANK" not in os.environ:
        # Build (or reuse) the models in a child process, so that no CUDA context of the build outlives it, then
        # re-run this script as the single DeepSpeed rank.
        subprocess.run([sys.executable, SCRIPT, *sys.argv[1:], "--build-only"], check=True)
        C.reexec_under_torchrun_if_needed(SCRIPT, sys.argv[1:])

    C.die_with_parent()  # the torchrun rank must not outlive torchrun
    try:
        result = train(a, report)
    except Exception as exc:  # before training started (config, imports): still one RESULT line
        result = {"phase": "setup", "fits": None, "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": C.log_tail(traceback.format_exc(), 25), "memory": C.torch_memory()}
    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    measured = result["memory"].get("device_used_peak_gib")
    out = {"bench": "7b3b", "mode": "tiny-cpu-smoke" if a.tiny else "gpu", "config": config, **result, **report}
    if total_gib is not None:
        out["per_gpu_estimate"] = per_gpu_estimate(report, measured if result.get("fits") else None, total_gib, a)
        out["fits_in_80gb_measured"] = bool(result.get("fits")) and measured is not None and measured <= 80.0
    out["run"] = C.run_info()
    build_file = os.path.join(a.models_dir, "build_s.json")
    if os.path.exists(build_file):
        with open(build_file) as f:
            out["model_build_s"] = json.load(f)
    C.emit(out, a.json)
    sys.stdout.flush()
    os._exit(0 if result.get("fits") else 3)


if __name__ == "__main__":
    sys.exit(main())
