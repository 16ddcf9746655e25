"""Quality benchmark suite: train every method from one shared starting student, evaluate, repeat over seeds.

    python bench/quality/suite.py bench/quality/alpaca.yaml            # run (or continue) the whole suite
    python bench/quality/suite.py bench/quality/alpaca.yaml --only amm  # a subset of runs (names or groups)
    python bench/quality/report.py bench/quality/alpaca.yaml            # tables (mean, std over seeds) + PNG curves

A suite file names the teacher, the initial student, an optional shared start (a recipe run once, e.g. SFT on the
train split), the evaluation settings and the runs: each run is a packaged recipe (`amm-trl train --config <recipe>`)
plus overrides, trained once per seed. Everything runs in this one process through the same functions as
`amm-trl train` / `amm-trl eval` (saves ~10 s of imports per run on a CPU). A finished run leaves `result.json`;
re-running the suite skips it, so an interrupted suite continues where it stopped. Trained weights are deleted after
evaluation unless `--keep_models` (33 students of 113M params would take 15 GB).
"""

import argparse
import gc
import glob
import json
import os
import sys
import time

import yaml


def load_suite(path: str) -> dict:
    with open(path) as f:
        suite = yaml.safe_load(f)
    suite.setdefault("seeds", [0])
    suite.setdefault("common", {})
    return suite


def _flags(overrides: dict) -> list[str]:
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return argv


def _resolve(name: str) -> str:
    if name.startswith("asset:"):
        from amm_trl.assets import resolve

        return resolve(name[len("asset:"):])
    return name


def planned_runs(suite: dict) -> list[dict]:
    """Eval-only reference rows first, then every method for seed 0, seed 1, ..., then the ablations the same way: a
    suite cut short by the time budget still has complete rows for the seeds it reached."""
    runs = [{"name": "teacher", "group": "reference", "model": suite["teacher"], "seed": None},
            {"name": "initial_student", "group": "reference", "model": suite["initial_student"], "seed": None}]
    if suite.get("start"):
        runs.append({"name": "start", "group": "reference", "seed": None, **suite["start"]})
    for group in ("method", "ablation"):  # the methods over all seeds first: they are the main table
        for seed in suite["seeds"]:
            runs += [{**run, "group": group, "seed": seed} for run in suite["runs"]
                     if run.get("group", "method") == group and seed in run.get("seeds", suite["seeds"])]
    return runs


def run_dir(suite: dict, run: dict) -> str:
    leaf = run["name"] if run["seed"] is None else f"{run['name']}/seed{run['seed']}"
    return os.path.join(suite["output_dir"], leaf)


def train_one(suite: dict, run: dict, out: str) -> dict:
    from amm_trl import cli

    overrides = dict(suite["common"]) if run["group"] != "reference" else {}
    overrides.update(run.get("args", {}))
    if run["group"] != "reference":
        overrides["model_name_or_path"] = start_model(suite)
    if run["seed"] is not None:
        overrides["seed"] = run["seed"]
    overrides.update(output_dir=out, save_strategy="no", report_to="none")
    argv = ["--config", run["recipe"]] + _flags(overrides)
    print(f"suite: amm-trl train {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    trainer = cli.train(argv)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    del trainer
    gc.collect()
    _write_json(os.path.join(out, "train_log.json"), history)
    return {"train_seconds": seconds, "train_argv": argv}


def start_model(suite: dict) -> str:
    if not suite.get("start"):
        return suite["initial_student"]
    return run_dir(suite, {"name": "start", "seed": None})


def eval_one(suite: dict, model: str, out: str, seed: int) -> dict:
    from amm_trl.evaluation import EvalArguments, evaluate

    settings = dict(suite["eval"])
    settings["dataset_name"] = _resolve(settings["dataset_name"])
    a = EvalArguments(model_name_or_path=_resolve(model), output_dir=os.path.join(out, "eval"), seed=seed or 0,
                      **settings)
    start = time.perf_counter()
    summary = evaluate(a)
    summary.pop("settings", None)
    return {**summary, "eval_seconds": time.perf_counter() - start}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def execute(suite: dict, run: dict, keep_models: bool) -> dict:
    out = run_dir(suite, run)
    record = {"name": run["name"], "group": run["group"], "seed": run["seed"]}
    trained = os.path.exists(os.path.join(out, "train_log.json")) and glob.glob(os.path.join(out, "*.safetensors"))
    if "recipe" in run and trained:  # interrupted during evaluation: the student is there, evaluate it
        record["train_seconds"] = None
        model = out
    elif "recipe" in run:
        record.update(train_one(suite, run, out))
        model = out
    else:
        model = run["model"]
    record.update(eval_one(suite, model, out, run["seed"]))
    if "recipe" in run and not keep_models and run["name"] != "start":
        for path in glob.glob(os.path.join(out, "*.safetensors")):
            os.remove(path)
    _write_json(os.path.join(out, "result.json"), record)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite YAML (bench/quality/*.yaml)")
    parser.add_argument("--only", nargs="*", help="run names or groups to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, help="override the suite's seeds")
    parser.add_argument("--keep_models", action="store_true", help="keep every trained student's weights")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    a = parser.parse_args(argv)
    suite = load_suite(a.suite)
    if a.seeds:
        suite["seeds"] = a.seeds
    import torch

    torch.set_flush_denormal(True)  # as `amm-trl train` does on CPU (evaluation runs in this process too)
    for run in planned_runs(suite):
        if a.only and run["name"] not in a.only and run["group"] not in a.only:
            continue
        done = os.path.exists(os.path.join(run_dir(suite, run), "result.json"))
        tag = f"{run['name']} seed={run['seed']}"
        if a.dry_run or done:
            print(f"suite: {'done' if done else 'todo'} {tag}", flush=True)
            continue
        record = execute(suite, run, a.keep_models)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items() if k != "train_argv"}
        print(f"suite: finished {tag}: {json.dumps(shown)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
