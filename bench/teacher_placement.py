"""The teacher local vs served vs cached (`teacher_placement`): the training process's peak RSS and step time, and
the cache's size per token, on the quickstart's SmolLM2 pair (offline assets) on CPU.

One prompt set (the first `--rows` alpaca-demo rows), completions and top-k log-probs written once by
`amm-trl generate --teacher_top_k K` (the cache), then the same `fkl` run (`recipes/quickstart_fkl.yaml`, `--steps`
steps on those completions) four times, each in its own process: the teacher loaded in the trainer (`local`),
served by `vllm serve` on this machine (`server`, top-k over HTTP), read from the cache (`cache`), or served as a
pooling server's last hidden states, to which the trainer applies the teacher's output layer (`server_hidden_states`:
the exact distribution, the output layer alone loaded). Peak RSS is the
trainer process's own (`memory/peak_rss_gib`, logged by the trainer); a served teacher's memory is in the server's
processes, reported apart. The step time is the median of steps 2..N. Run it in the vLLM environment (the server
and all three trainers use the same Python):

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/teacher_placement.py --json out.json

Prints one line `RESULT {...}` with the ratios served/local and cached/local.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from amm_trl.assets import prepare  # noqa: E402
from amm_trl.cli import cpu_kind  # noqa: E402


def rss_tree_gib(pid):
    """Resident memory of a process and its descendants (the server's engine core runs in a child)."""
    total, pids = 0, [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total / 2 ** 20


def train(placement, cache, workdir, steps, k, url=None, hidden_states=None):
    """One `fkl` run of `steps` steps in its own process; `hidden_states`: the teacher's path, its output layer applied
    to a pooling server's hidden states (`teacher_server_output: hidden_states`)."""
    out = os.path.join(workdir, f"out-{placement}" + ("-hidden" if hidden_states else ""))
    argv = ["--config", "quickstart_fkl", "--dataset_name", cache, "--max_steps", str(steps), "--logging_steps", "1",
            "--output_dir", out, "--max_completion_length", "32", "--seed", "0", "--save_strategy", "steps",
            "--save_steps", str(steps)]
    if placement != "local":
        argv += ["--teacher_placement", placement, "--teacher_top_k", str(k)]
    if placement == "server":
        argv += ["--teacher_server_base_url", url]
    if hidden_states:
        argv += ["--teacher_server_output", "hidden_states", "--teacher_model_name_or_path", hidden_states]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{placement} run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    with open(os.path.join(out, f"checkpoint-{steps}", "trainer_state.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    return {"wall_s": round(time.perf_counter() - start, 1), "loss": [round(h["loss"], 5) for h in logs],
            "peak_rss_gib": round(max(h["memory/peak_rss_gib"] for h in logs), 3),
            "step_s_median": round(statistics.median(h["step_time"] for h in logs[1:]), 3),
            "teacher_mass": round(statistics.mean(h.get("teacher_mass/off", 1.0) for h in logs), 4)}


def served(teacher, workdir, name, flags, run):
    """`run(url)` against `vllm serve teacher *flags` started on this machine; adds the server's resident memory."""
    from amm_trl.rollouts import wait_for_health

    port = C.free_port()
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", teacher, "--host",
                               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
                               "--enforce-eager", *flags], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        problem = wait_for_health(f"http://127.0.0.1:{port}", 300)
        if problem:
            raise SystemExit(f"the teacher server ({name}) did not start: {problem}")
        result = run(f"http://127.0.0.1:{port}")
        result["server_rss_gib"] = round(rss_tree_gib(server.pid), 3)
        return result
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--cache-ks", default="8,32,128", help="cache sizes measured (bytes per token, mass)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    teacher, _, data = prepare(["smollm2-135m-instruct", "smollm2-135m-student-24l", "alpaca-demo-train"])
    workdir = tempfile.mkdtemp(prefix="bench-teacher-placement-")
    prompts = os.path.join(workdir, "prompts.jsonl")
    with open(data) as src, open(prompts, "w") as dst:
        for _, line in zip(range(args.rows), src):
            dst.write(line)
    caches = {}
    for k in sorted({int(x) for x in args.cache_ks.split(",")} | {args.top_k}):
        path = os.path.join(workdir, f"cache-k{k}.parquet")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "amm_trl.cli", "generate", "--model_name_or_path", teacher,
                               "--dataset_name", prompts, "--output_file", path, "--max_new_tokens", "32",
                               "--temperature", "1.0", "--teacher_top_k", str(k), "--dtype", "float32"],
                              capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("amm-trl: wrote"))
        caches[k] = {**json.loads(line[line.index("{"):]), "path": path, "seconds": round(time.perf_counter() - start)}
    cache = caches[args.top_k]["path"]
    runs = {"local": train("local", cache, workdir, args.steps, args.top_k),
            "cache": train("cache", cache, workdir, args.steps, args.top_k)}
    from amm_trl.teacher import POOLER_CONFIG

    runs["server"] = served(teacher, workdir, "server", ["--max-logprobs", str(args.top_k)],
                            lambda url: train("server", cache, workdir, args.steps, args.top_k, url))
    runs["server_hidden_states"] = served(
        teacher, workdir, "pooling", ["--runner", "pooling", "--pooler-config", POOLER_CONFIG],
        lambda url: train("server", cache, workdir, args.steps, args.top_k, url, hidden_states=teacher))
    result = {"meta": C.run_info(), "cpu": cpu_kind(), "rows": args.rows, "steps": args.steps,
              "top_k": args.top_k, "runs": runs,
              "caches": {k: {n: v for n, v in c.items() if n != "path"} for k, c in caches.items()},
              "ratio_rss_server_local": round(runs["server"]["peak_rss_gib"] / runs["local"]["peak_rss_gib"], 3),
              "ratio_rss_cache_local": round(runs["cache"]["peak_rss_gib"] / runs["local"]["peak_rss_gib"], 3),
              "ratio_step_server_local": round(runs["server"]["step_s_median"] / runs["local"]["step_s_median"], 3),
              "ratio_step_cache_local": round(runs["cache"]["step_s_median"] / runs["local"]["step_s_median"], 3),
              "ratio_rss_hidden_local": round(runs["server_hidden_states"]["peak_rss_gib"]
                                              / runs["local"]["peak_rss_gib"], 3),
              "ratio_step_hidden_local": round(runs["server_hidden_states"]["step_s_median"]
                                               / runs["local"]["step_s_median"], 3)}
    C.emit(result, args.json)


if __name__ == "__main__":
    main()
