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

Optional suite keys (used by bench/tier_a/tier_a.yaml):
- `base: other.yaml`: this file is a variant of that suite: its mappings merge into the base's key by key, other values
  replace; `runs: {name: {...}}` merges into the named runs (`name: null` drops one; a new name with a `recipe` adds
  a run).
- `prepare: module:function`: builds local models / data once (cached) and returns {name: path}; any string
  `prepared:<name>` in the suite (models, datasets, run args) then stands for that path.
- `select: {learning_rates: [...], seeds: [...], eval: {...}, metric: score}`: fair tuning. Every method first trains
  once per candidate and selection seed and is scored on `select.eval` (a validation split); its test runs then use
  the candidate with the best mean `metric` (highest; lowest with `mode: min`; the first in order on a tie), recorded
  in `result.json`. A candidate is a learning rate of the grid, or, for a run with `trials: [{args}, ...]` (its design
  budget over its own knobs), a trial's args with each learning rate of the grid (or with the trial's own
  `learning_rate`). `select.beyond_edges: {above: [...], below: [...]}` (runs without trials): a method whose best rate
  is the grid's highest gets the next `above` rate as one more candidate, and so on while its best stays at the top
  (`below` at the bottom); the rule is the same for every method, and its test runs wait for it. `select.budget: N`
  requires every tuned run to have exactly N candidates (equal tuning for every method; edge rates aside), else the
  suite refuses to start; `select.curves: false` trains the selection runs without the `callbacks` (they are scored at
  their end only). A run with `tune_as: <name>` (an ablation: one change to that run) gets no selection of its own and
  trains with the candidate chosen for `<name>`. `select.reuse: true`: a method's test run on a selection seed is the
  chosen selection run itself (same args, learning rate, seed and data), so the selection runs keep their weights
  until that test run has evaluated the chosen one's on the test split (then all of that seed's are deleted); where the
  weights are gone (e.g. a fresh machine) the test run trains as usual.
- an eval block's `generate: false` skips `amm-trl eval` (no generation, no metric) and `only: [names]` tells the
  measures hook which of its scores to compute (e.g. a selection scored by one cheap measure);
- `measures: module:function`: extra scores `function(model_path, suite, out, seed, eval_settings) -> dict` merged
  into every result (e.g. log-probabilities under the teacher); a run's own `measure_args: {...}` reach that hook
  only, in `eval_settings` (e.g. Tier A's `sample_temperatures`), not the selection runs' evaluation.
- `callbacks: [module:function, ...]`: factories `function(suite) -> TrainerCallback` added to every training run
  (e.g. a validation score every k steps, written into the training log).
- `gpu_args: {...}`: training arguments that replace the recipes' where CUDA is available (the packaged quickstart
  recipes train on the CPU in fp32), e.g. `{use_cpu: false, bf16: true}`.
- `--workers N`: N processes share the plan (a run is claimed by a file holding the claimer's pid; a dead claimer's
  runs are taken over), each with one thread.
"""

import argparse
import gc
import glob
import json
import os
import shutil
import sys
import time

import yaml

# Hooks and scorers named `bench.<...>:function` import from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from amm_trl.cli import cpu_kind  # noqa: E402  (recorded in every result: runs may continue on another machine)


def load_suite(path: str) -> dict:
    with open(path) as f:
        suite = yaml.safe_load(f)
    if "base" in suite:  # a variant of another suite file (path relative to this one)
        base = load_suite(os.path.join(os.path.dirname(os.path.abspath(path)), suite.pop("base")))
        suite = _merge(base, suite)
    suite.setdefault("seeds", [0])
    suite.setdefault("common", {})
    return suite


def _merge(base: dict, change: dict) -> dict:
    """`base` with `change` merged in: mappings merge key by key, other values replace. `runs` in a variant is a
    mapping {run name: overrides merged into that run, null to drop it, or a new run (with its `recipe`)}."""
    out = dict(base)
    for key, value in change.items():
        if key == "runs" and isinstance(value, dict):
            names = [r["name"] for r in base["runs"]]
            added = [name for name in value if name not in names]
            unknown = [name for name in added if not (isinstance(value[name], dict) and "recipe" in value[name])]
            if unknown:
                raise KeyError(f"runs: {unknown} are not runs of the base suite (it has {names}), and a new run needs "
                               f"a `recipe`.")
            out["runs"] = [_merge(r, value[r["name"]] or {}) if r["name"] in value else r for r in base["runs"]
                           if r["name"] not in value or value[r["name"]] is not None]
            out["runs"] += [{"name": name, **value[name]} for name in added]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out


def _function(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: use the form module:function")
    return getattr(importlib.import_module(module), name)


def prepare(suite: dict) -> dict:
    """Runs the suite's `prepare` hook (idempotent, cached by the hook) and substitutes `prepared:<name>` strings."""
    if not suite.get("prepare"):
        return suite
    paths = _function(suite["prepare"])(suite)

    def sub(value):
        if isinstance(value, str) and value.startswith("prepared:"):
            name = value[len("prepared:"):]
            if name not in paths:
                raise KeyError(f"{value!r}: the prepare hook {suite['prepare']} made only {sorted(paths)}.")
            return paths[name]
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: (v if k == "prepare" else sub(v)) for k, v in suite.items()}


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


def candidates(suite: dict, run: dict, edges: bool = True) -> list[tuple[str, float, dict]]:
    """(id, learning rate, extra args) of each selection candidate of `run` (see the module docstring). `edges=False`:
    the grid alone, without the rates `select.beyond_edges` adds once a method's best rate is at the grid's edge."""
    grid = suite["select"]["learning_rates"]
    if not run.get("trials"):
        return _edge_select(suite, run["name"])[0] if edges else _lr_options(grid)
    out = []
    for i, trial in enumerate(run["trials"]):
        trial = dict(trial)
        lrs = [trial.pop("learning_rate")] if "learning_rate" in trial else grid
        out += [(f"t{i}-lr{lr:g}", lr, trial) for lr in lrs]
    return out


def _lr_options(rates: list[float]) -> list[tuple[str, float, dict]]:
    return [(f"lr{lr:g}", lr, {}) for lr in rates]


def _edge_select(suite: dict, name: str) -> tuple[list, dict, int | None]:
    """A method's learning-rate candidates, their scores and the best one's index (see `_best`): the grid, and while
    its best finished rate is strictly better than the rest and the highest (lowest) one, the next rate of
    `select.beyond_edges.above` (`.below`), the same rule for every method, so that each optimum can lie inside the
    rates its method tried (a tie at an edge adds nothing). Options, scores and choice come from one reading of the
    result files, so a run that another worker finishes meanwhile cannot make an edge look chosen."""
    select = suite["select"]
    rates = list(select["learning_rates"])
    edges = select.get("beyond_edges") or {}
    above, below = list(edges.get("above", [])), list(edges.get("below", []))
    while True:
        options = _lr_options(rates)
        scores, best, means = _best(suite, name, options)
        alone = best is not None and sum(means[cid] == means[options[best][0]] for cid, _, _ in options) == 1
        if alone and best == len(rates) - 1 and above:
            rates.append(above.pop(0))
        elif alone and best == 0 and below:
            rates.insert(0, below.pop(0))
        else:
            return options, scores, best


def _best(suite: dict, name: str, options: list) -> tuple[dict, int | None, dict]:
    """The selection scores of `name`'s candidates `options` ({id: [metric per finished seed]}), the index of the best
    one (the best mean `metric`, lowest with `mode: min`; the first in order on a tie; None until all ran) and the
    means ({id: mean}, negated under `mode: min`)."""
    select = suite["select"]
    scores: dict[str, list[float]] = {}
    for cid, _, _ in options:
        for seed in select["seeds"]:
            path = os.path.join(run_dir(suite, {"name": name, "group": "select", "seed": seed, "candidate": cid}),
                                "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    scores.setdefault(cid, []).append(json.load(f)[select.get("metric", "score")])
    complete = all(len(scores.get(cid, [])) == len(select["seeds"]) for cid, _, _ in options)
    sign = -1.0 if select.get("mode", "max") == "min" else 1.0  # `mode: min` for a metric where lower is better
    means = {cid: sign * sum(v) / len(v) for cid, v in scores.items()}
    best = max(range(len(options)), key=lambda i: (means[options[i][0]], -i)) if complete else None
    return scores, best, means


def check_select(suite: dict) -> None:
    """The `select` block before any run: `select.budget`, every tuned run has exactly that many candidates;
    `select.reuse` needs the selection runs' curves (a test run records them, so only a selection run with the same
    callbacks trained the same run)."""
    select = suite.get("select") or {}
    if select.get("reuse") and not select.get("curves", True):
        raise ValueError("select.reuse: true needs select.curves: true (a test run records its validation curve, so "
                         "only a selection run with the curves' callbacks is the same run); set curves: true or "
                         "drop reuse.")
    grid = select.get("learning_rates")
    if select and (not isinstance(grid, list) or not grid or not all(_is_rate(lr) for lr in grid)):
        raise ValueError(f"select.learning_rates={grid!r}: a non-empty list of numbers (write 1.0e-4, not 1e-4: YAML "
                         f"reads the latter as a string).")
    edges = select.get("beyond_edges")
    if edges is not None:
        valid = isinstance(edges, dict) and not set(edges) - {"above", "below"}
        above, below = (edges.get("above", []), edges.get("below", [])) if valid else ([], [])
        valid = valid and isinstance(above, list) and isinstance(below, list) and all(map(_is_rate, above + below))
        rates = grid + above + below if valid else []
        if not (valid and grid == sorted(set(grid)) and above == sorted(set(above))
                and below == sorted(set(below), reverse=True) and (not above or above[0] > grid[-1])
                and (not below or below[0] < grid[0]) and len({f"{lr:g}" for lr in rates}) == len(rates)):
            raise ValueError(f"select.beyond_edges={edges}: `above` lists rates above the grid {grid}, ascending, and "
                             f"`below` rates below it, descending (the order they are tried in), all numbers distinct "
                             f"to 6 digits; the grid itself ascending.")
    budget = select.get("budget")
    if budget is None:
        return
    wrong = {r["name"]: len(candidates(suite, r, edges=False)) for r in suite["runs"] if "tune_as" not in r
             and len(candidates(suite, r, edges=False)) != budget}
    if wrong:
        raise ValueError(f"select.budget={budget}: these runs have another number of candidates: {wrong}.")


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def planned_runs(suite: dict) -> list[dict]:
    """Eval-only reference rows first, then every method for seed 0, seed 1, ..., then the ablations the same way: a
    suite cut short by the time budget still has complete rows for the seeds it reached. Under `select.reuse` a
    method's test runs on the selection seeds come right after its selection runs: they only evaluate the chosen run's
    weights, which a suite that stops before them (a session's end, a fresh machine) loses and has to train again."""
    runs = [{"name": "teacher", "group": "reference", "model": suite["teacher"], "seed": None},
            {"name": "initial_student", "group": "reference", "model": suite["initial_student"], "seed": None}]
    if suite.get("start"):
        runs.append({"name": "start", "group": "reference", "seed": None, **suite["start"]})
    select = suite.get("select")
    if select:  # learning-rate selection on the validation split before any test run
        for run in suite["runs"]:
            if "tune_as" in run:  # an ablation: trained at the learning rate chosen for the run it varies
                continue
            for cid, lr, extra in candidates(suite, run):
                for seed in select["seeds"]:
                    runs.append({**run, "args": {**run.get("args", {}), **extra}, "group": "select", "seed": seed,
                                 "select_group": run.get("group", "method"), "learning_rate": lr, "candidate": cid})
            if _reuse(suite) and run.get("group", "method") == "method":
                runs += [{**run, "group": "method", "seed": seed} for seed in select["seeds"]
                         if seed in run.get("seeds", suite["seeds"])]
    planned = {(r["name"], r["group"], r["seed"]) for r in runs}
    for group in ("method", "ablation"):  # the methods over all seeds first: they are the main table
        for seed in suite["seeds"]:
            runs += [{**run, "group": group, "seed": seed} for run in suite["runs"]
                     if run.get("group", "method") == group and seed in run.get("seeds", suite["seeds"])
                     and (run["name"], group, seed) not in planned]
    return runs


def run_dir(suite: dict, run: dict) -> str:
    leaf = run["name"] if run["seed"] is None else f"{run['name']}/seed{run['seed']}"
    if run.get("group") == "select":
        leaf = f"select/{run['name']}/{run['candidate']}/seed{run['seed']}"
    return os.path.join(suite["output_dir"], leaf)


def selection(suite: dict, name: str) -> dict:
    """The selection runs of one method: {candidate: [metric per finished seed]}, and the chosen candidate's learning
    rate and extra args (None until all ran)."""
    run = next(r for r in suite["runs"] if r["name"] == name)
    if run.get("trials"):
        options = candidates(suite, run)
        scores, best, _ = _best(suite, name, options)
    else:  # lr-only selection: scores keyed by the learning rate, as before
        options, scores, best = _edge_select(suite, name)
        scores = {cid[2:]: v for cid, v in scores.items()}
    return {"scores": scores, "learning_rate": options[best][1] if best is not None else None,
            "candidate": options[best][0] if best is not None else None,
            "trial_args": options[best][2] if best is not None else None}


def train_argv(suite: dict, run: dict, out: str, learning_rate: float | None = None) -> list[str]:
    """The `amm-trl train` arguments of one run: its recipe, then the suite's `common` args, the run's own (a chosen
    trial's merged in by `as_trained`), its learning rate and seed."""
    overrides = dict(suite["common"]) if run["group"] != "reference" else {}
    overrides.update(run.get("args", {}))
    if run["group"] != "reference":
        overrides["model_name_or_path"] = start_model(suite)
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
    if run["seed"] is not None:
        overrides["seed"] = run["seed"]
    if suite.get("gpu_args") and _cuda():
        overrides.update(suite["gpu_args"])  # the packaged recipes are sized for a CPU
    overrides.update(output_dir=out, save_strategy="no", report_to="none")
    return ["--config", run["recipe"]] + _flags(overrides)


def train_one(suite: dict, run: dict, out: str, learning_rate: float | None = None) -> dict:
    from amm_trl import cli

    argv = train_argv(suite, run, out, learning_rate)
    curves = run["group"] != "reference" and (run["group"] != "select" or suite["select"].get("curves", True))
    callbacks = [_function(spec)(suite) for spec in suite.get("callbacks", [])] if curves else []
    print(f"suite: amm-trl train {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    trainer = cli.train(argv, callbacks=callbacks)
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    del trainer
    gc.collect()
    _write_json(os.path.join(out, "train_log.json"), history)
    return {"train_seconds": seconds, "train_argv": argv}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def start_model(suite: dict) -> str:
    if not suite.get("start"):
        return suite["initial_student"]
    return run_dir(suite, {"name": "start", "seed": None})


def eval_one(suite: dict, model: str, out: str, seed: int, settings: dict | None = None,
             measure_args: dict | None = None) -> dict:
    from amm_trl.evaluation import EvalArguments, evaluate

    settings = dict(settings or suite["eval"])
    settings["dataset_name"] = _resolve(settings["dataset_name"])
    generate = settings.pop("generate", True)  # false: the measures alone, no `amm-trl eval` generation
    only = settings.pop("only", None)  # the measures to compute (all when absent)
    start = time.perf_counter()
    summary = {}
    if generate:
        a = EvalArguments(model_name_or_path=_resolve(model), output_dir=os.path.join(out, "eval"), seed=seed or 0,
                          **settings)
        summary = evaluate(a)
        summary.pop("settings", None)
    if suite.get("measures"):
        summary.update(_function(suite["measures"])(_resolve(model), suite, out, seed or 0,
                                                    {**settings, "only": only, **(measure_args or {})}))
    return {**summary, "eval_seconds": time.perf_counter() - start}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def code_version() -> str:
    """The checkout's commit (`+dirty` with uncommitted changes), so that a later change of the loss path tells
    which runs to redo."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# The code a worker runs is what it imported at start: a commit made while it runs reaches its next runs only through
# the files read per run (recipes, data), so a run records both where they differ.
LOADED_COMMIT = code_version()


def as_trained(suite: dict, run: dict) -> tuple[dict, float | None, dict]:
    """`run` as it trains, its learning rate (None: the recipe's) and what its record keeps of the choice: a selection
    run's own rate; a test run's rate chosen on validation, the chosen trial's knobs merged into its args."""
    if run["group"] == "select":
        return run, run["learning_rate"], {"learning_rate": run["learning_rate"]}
    if not suite.get("select") or run["group"] == "reference":
        return run, None, {}
    chosen = selection(suite, run.get("tune_as", run["name"]))
    if chosen["learning_rate"] is None:  # `work` waits for the selection; a direct call must not train at the recipe's
        raise RuntimeError(f"{run['name']} seed {run['seed']}: the learning-rate selection of "
                           f"{run.get('tune_as', run['name'])} has not finished; run its selection runs first.")
    choice = {"learning_rate": chosen["learning_rate"], "selection": chosen["scores"],
              "candidate": chosen["candidate"], "trial_args": chosen["trial_args"]}
    if chosen["trial_args"]:  # the chosen trial's knobs, under the run's own args (an ablation's change wins)
        run = {**run, "args": {**chosen["trial_args"], **run.get("args", {})} if "tune_as" in run else
               {**run.get("args", {}), **chosen["trial_args"]}}
    return run, chosen["learning_rate"], choice


def execute(suite: dict, run: dict, keep_models: bool) -> dict:
    out = run_dir(suite, run)
    record = {"name": run["name"], "group": run["group"], "seed": run["seed"], "commit": LOADED_COMMIT,
              "cpu": cpu_kind()}
    checkout = code_version()
    if checkout != LOADED_COMMIT:
        record["checkout_commit"] = checkout  # the checkout at the run's start, newer than the code it runs
    run, learning_rate, choice = as_trained(suite, run)
    record.update(choice)
    settings = suite["select"]["eval"] if run["group"] == "select" else None
    trained = os.path.exists(os.path.join(out, "train_log.json")) and glob.glob(os.path.join(out, "*.safetensors"))
    reused = _reusable_selection_run(suite, run) if "recipe" in run and not trained else None
    if "recipe" in run and trained:  # interrupted during evaluation: the student is there, evaluate it
        record["train_seconds"] = None
        model = out
    elif reused:  # the chosen selection run trained exactly this student: evaluate its weights on the test split
        with open(os.path.join(reused, "result.json")) as f:
            trial = json.load(f)
        record.update(train_seconds=trial.get("train_seconds"), train_argv=trial.get("train_argv"),
                      train_commit=trial.get("commit"), train_cpu=trial.get("cpu"),
                      trained_in=os.path.relpath(reused, suite["output_dir"]))
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(os.path.join(reused, "train_log.json"), os.path.join(out, "train_log.json"))
        model = reused
    elif "recipe" in run:
        record.update(train_one(suite, run, out, learning_rate))
        model = out
    else:
        model = run["model"]
    record.update(eval_one(suite, model, out, run["seed"], settings,
                           run.get("measure_args") if run["group"] != "select" else None))
    if "recipe" in run and not keep_models and run["name"] != "start" and not _kept_for_test(suite, run):
        _delete_weights(out)
    _write_json(os.path.join(out, "result.json"), record)
    if _kept_for_test(suite, run) and not keep_models:
        _drop_unchosen(suite, run)
    if "recipe" in run and not keep_models and _reuses(suite, run):
        for cid, _, _ in candidates(suite, run):  # this seed's test run is done: its selection weights are not needed
            _delete_weights(run_dir(suite, {"name": run["name"], "group": "select", "seed": run["seed"],
                                            "candidate": cid}))
    return record


def _reuse(suite: dict) -> dict | None:
    """The suite's `select` block where it reuses selection runs as test runs (`select.reuse`; `check_select` refuses
    it without the curves' callbacks, which touch neither the RNG nor the weights); else None."""
    select = suite.get("select") or {}
    return select if select.get("reuse") else None


def _kept_for_test(suite: dict, run: dict) -> bool:
    """Whether a selection run keeps its weights for its method's test run on the same seed (`select.reuse`; whatever
    `--seeds` a worker runs with: the test run that deletes them may run in another)."""
    return _reuse(suite) is not None and run["group"] == "select" and run.get("select_group") == "method"


def _reuses(suite: dict, run: dict) -> bool:
    """Whether `run` is a method's test run on a selection seed under `select.reuse`: the chosen selection run trained
    exactly it (same args, learning rate, seed and data)."""
    select = _reuse(suite)
    return select is not None and run["group"] == "method" and "tune_as" not in run and run["seed"] in select["seeds"]


def _drop_unchosen(suite: dict, run: dict) -> None:
    """Once a method's selection is complete, only the chosen candidate's weights on a seed its test runs use are
    still needed (`select.reuse`): the others are deleted, so the selection does not hold every candidate's student
    until the test runs."""
    chosen = selection(suite, run["name"])["candidate"]
    if chosen is None:
        return
    tested = run.get("seeds", suite["seeds"])
    for cid, _, _ in candidates(suite, run):
        for seed in suite["select"]["seeds"]:
            if cid != chosen or seed not in tested:
                _delete_weights(run_dir(suite, {"name": run["name"], "group": "select", "seed": seed,
                                                "candidate": cid}))


def _delete_weights(folder: str) -> None:
    """Deletes a run's trained weights (its records stay)."""
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        os.remove(path)


def _reusable_selection_run(suite: dict, run: dict) -> str | None:
    """The folder of the selection run that trained exactly `run`, if its weights are still there; else None (the
    test run trains)."""
    if not _reuses(suite, run):
        return None
    chosen = selection(suite, run["name"])["candidate"]
    out = run_dir(suite, {"name": run["name"], "group": "select", "seed": run["seed"], "candidate": chosen})
    trained = os.path.exists(os.path.join(out, "train_log.json")) and glob.glob(os.path.join(out, "*.safetensors"))
    return out if trained else None


def _claim(out: str) -> bool:
    """Claims a run for this process (a file holding its pid); a claim whose process is gone is taken over."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "claimed")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ProcessLookupError, ValueError):
                os.remove(path)  # its process died: take the run over
                continue
            except FileNotFoundError:
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _start_missing(suite: dict, run: dict) -> bool:
    """The shared start's result is there but not its weights (results committed without models, on a fresh
    machine): it is trained again (deterministically: same data, seed and one thread) before any run that needs it."""
    return run["name"] == "start" and run["group"] == "reference" and not glob.glob(
        os.path.join(run_dir(suite, run), "*.safetensors"))


def _ready(suite: dict, run: dict) -> bool:
    """A test run needs its method's learning-rate selection; a trained run needs the shared start."""
    if run["group"] == "reference" and run["name"] != "start" or not run.get("recipe"):
        return True
    start = {"name": "start", "group": "reference", "seed": None}
    if suite.get("start") and run["name"] != "start" and (not os.path.exists(
            os.path.join(run_dir(suite, start), "result.json")) or _start_missing(suite, start)):
        return False
    if suite.get("select") and run["group"] in ("method", "ablation"):
        return selection(suite, run.get("tune_as", run["name"]))["learning_rate"] is not None
    return True


def work(suite: dict, only, keep_models: bool, dry_run: bool = False) -> None:
    """Runs every unfinished run of the plan; with several workers, waits for runs another worker must finish first."""
    import torch

    torch.set_flush_denormal(True)  # as `amm-trl train` does on CPU (evaluation runs in this process too)
    while True:  # planned again at every scan: a selection whose best rate is at the grid's edge adds one
        plan = [r for r in planned_runs(suite) if not only or r["name"] in only or r["group"] in only]
        waiting = False
        for run in plan:
            out = run_dir(suite, run)
            done = os.path.exists(os.path.join(out, "result.json")) and not _start_missing(suite, run)
            tag = f"{run['name']} {run['group']} seed={run['seed']}" + (
                f" {run['candidate']}" if run["group"] == "select" else "")
            if dry_run or done:
                if dry_run:
                    print(f"suite: {'done' if done else 'todo'} {tag}", flush=True)
                continue
            if not _ready(suite, run):
                waiting = True
                continue
            if not _claim(out):
                waiting = True
                continue
            record = execute(suite, run, keep_models)
            os.remove(os.path.join(out, "claimed"))
            shown = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in record.items()
                     if k not in ("train_argv", "selection")}
            print(f"suite: finished {tag}: {json.dumps(shown)}", flush=True)
            break  # re-scan from the top: runs that were waiting on this one may be ready now
        else:
            if dry_run or not waiting:
                return
            time.sleep(2)


RECORDS_ONLY = """# Only the per-run records are committed: models, predictions, assets and claim files stay local.
*
!*/
!result.json
!train_log.json
!.gitignore
!manifest.json
"""


def _records_only(output_dir: str) -> None:
    """A new runs folder gets a .gitignore that keeps the per-run records (commit them as runs land) and leaves the
    students' weights, predictions and claim files out; a folder's own .gitignore is left as it is."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ".gitignore")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(RECORDS_ONLY)


def _worker(suite_path: str, seeds, only, keep_models: bool) -> None:
    import torch

    torch.set_num_threads(1)
    suite = prepare(_with_seeds(load_suite(suite_path), seeds))
    work(suite, only, keep_models)


def _with_seeds(suite: dict, seeds) -> dict:
    if seeds:
        suite["seeds"] = seeds
    return suite


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite YAML (bench/quality/*.yaml)")
    parser.add_argument("--only", nargs="*", help="run names or groups to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, help="override the suite's seeds")
    parser.add_argument("--keep_models", action="store_true", help="keep every trained student's weights")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the plan (one thread each)")
    a = parser.parse_args(argv)
    suite = prepare(_with_seeds(load_suite(a.suite), a.seeds))  # builds the prepared assets once, before any worker
    check_select(suite)
    if not a.dry_run:
        _records_only(suite["output_dir"])
    if a.workers <= 1 or a.dry_run:
        work(suite, a.only, a.keep_models, a.dry_run)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(a.suite, a.seeds, a.only, a.keep_models)) for _ in range(a.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise SystemExit(f"suite: {len(failed)} worker(s) failed (exit codes {failed}); re-run to continue.")


if __name__ == "__main__":
    sys.exit(main())
