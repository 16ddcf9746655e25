"""Short digest of bench results: the figures docs/benchmarks.md tabulates, one line per result.

    python3 bench/digest.py gpu_out/run2_results.jsonl        # the results file bench/run_gpu.sh writes
    python3 bench/digest.py /tmp/amm-gpu-out/run2/rollout.log  # any log or JSON holding RESULT lines / one result
Also writes nothing; reads `RESULT {...}` lines, JSON-lines of {"stage", "result"}, or a single JSON object.
"""

import json
import os
import sys


def _results(path):
    label = os.path.splitext(os.path.basename(path))[0]
    with open(path, errors="replace") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            yield label, json.loads(text)
            return
        except ValueError:
            pass
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("RESULT "):
            yield label, json.loads(line[7:])
        elif line.startswith("{") and '"result"' in line:
            obj = json.loads(line)
            yield obj.get("stage", label), obj["result"]


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else str(x))


def mem(m):
    if "peak_allocated_gib" in m:
        return (f"peak allocated {m['peak_allocated_gib']} GiB, reserved {m.get('peak_reserved_gib')} GiB, "
                f"device used {m.get('device_used_peak_gib')} GiB")
    return f"peak RSS {m.get('peak_rss_gib')} GiB (CPU)"


def digest(stage, r):
    run = r.get("run", {})
    head = f"[{stage}] {r.get('bench')} on {run.get('device')} {run.get('date_utc')} commit {run.get('git_commit')}"
    lines = [head]
    bench = r.get("bench")
    if bench == "rollout":
        for h in r.get("hf", []):
            lines.append(f"  hf batch {h['batch']}: {fmt(h['best_tok_per_s'], 0)} tok/s (median "
                         f"{fmt(h['median_tok_per_s'], 0)})")
        if "vllm" in r:
            v = r["vllm"]
            lines.append(f"  vllm (eager={v['eager']}, util {v['gpu_memory_utilization']}): "
                         f"{fmt(v['best_tok_per_s'], 0)} tok/s (median {fmt(v['median_tok_per_s'], 0)}), "
                         f"init {v['init_s']} s")
            lines.append(f"  ratio vllm/hf: {r.get('ratio_vllm_over_hf')} best-vs-best "
                         f"{r.get('ratio_vllm_over_hf_best')} (target >= {r.get('target_ratio')})")
        lines.append(f"  token counts match: {r.get('token_counts_match')}; notes: {r.get('notes')}")
    elif bench == "step":
        lines.append(f"  use_vllm={r['use_vllm']} deepspeed={r['deepspeed']} batch {r['batch']} x "
                     f"{r['max_completion']} (+{r['offpolicy_words']} off-policy for amm) steps {r['steps']}")
        for name, t in r.get("trainers", {}).items():
            if "error" in t:
                lines.append(f"  {name}: FAILED {t['error']}")
                continue
            m = t["memory"]
            lines.append(f"  {name}: steady step {t['steady_step_s']} s (rollout {t['steady_rollout_s']}, rest "
                         f"{t['steady_non_rollout_s']}), {fmt(t['completion_tok_per_s'], 0)} completion tok/s, "
                         f"{mem(m)}, init {t['init_s']} s")
        for key in sorted(k for k in r if k.startswith("ratio_")):
            lines.append(f"  {key}: {r[key]}")
    elif bench == "check_gpu_workers_cpu":
        lines.append(f"  all_ok: {r['all_ok']} ({r['note']})")
        for name, c in r["cases"].items():
            lines.append(f"  {name}: {'ok' if c['ok'] else 'FAILED'} {c.get('error') or ''}")
    elif bench == "7b3b" and r.get("mode") == "estimate-only":
        est = r["deepspeed_estimator"]
        p = r["params"]
        lines.append(f"  params: teacher {p['teacher']['total']:,}, student {p['student']['total']:,}, "
                     f"q-heads {p['q_heads']:,}")
        s8, t8 = est["student_plus_heads_8gpu"], est["teacher_8gpu_as_if_trained"]
        lines.append(f"  DeepSpeed ZeRO-3 estimator, student+heads, 8 GPUs: no offload "
                     f"{s8['offload_none']['per_gpu_gib']} GiB/GPU, optimizer offload "
                     f"{s8['offload_optimizer_cpu']['per_gpu_gib']} GiB/GPU; teacher as if trained "
                     f"{t8['offload_none']['per_gpu_gib']} GiB/GPU, frozen bf16 "
                     f"{r['frozen_teacher_states_gib']['8']} GiB/GPU")
        lines.append(f"  static per GPU (8 GPUs): {r.get('static_per_gpu_8gpu_gib')}")
    elif bench == "7b3b":
        c = r["config"]
        m = r.get("memory", {})
        lines.append(f"  vllm={c['use_vllm']} util {c['vllm_gpu_memory_utilization']} sleep "
                     f"{c['vllm_enable_sleep_mode']} offload {c['offload_optimizer']} batch "
                     f"{c['batch']}x{c['max_completion']} objective {c['objective']}")
        lines.append(f"  fits: {r.get('fits')} (phase {r.get('phase')}), {mem(m)}")
        if r.get("error"):
            lines.append(f"  error: {r['error'][:300]}")
        if r.get("steady_step_s") is not None:
            lines.append(f"  steady step {r['steady_step_s']} s (rollout {r['steady_rollout_s']}, rest "
                         f"{r['steady_non_rollout_s']}), {fmt(r['completion_tok_per_s'], 1)} completion tok/s, "
                         f"{r['model_tflops_per_s']} model TFLOP/s, MFU {fmt(100 * r['mfu'], 1)}% "
                         f"(excl. rollout {fmt(100 * r['mfu_excluding_rollout'], 1)}%) of {r['peak_tflops']}")
        est = r.get("per_gpu_estimate")
        if est:
            for name in ("8xA100-80GB", "8xA100-40GB"):
                lines.append(f"  {name}: {est.get(name)}")
        if r.get("profile_top"):
            lines.append("  profile top: " + "; ".join(f"{p['name']} {p['self_ms']} ms" for p in r["profile_top"][:6]))
    return "\n".join(lines)


def main(paths):
    for path in paths:
        for stage, r in _results(path):
            print(digest(stage, r))


if __name__ == "__main__":
    main(sys.argv[1:])
