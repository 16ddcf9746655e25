"""Tier A benchmark: the task's checker and splits, the statistics against hand-computed values, and the whole
instrument end to end at a toy size (suite -> per-seed results -> report JSON / table), including resumption."""

import glob
import json
import math
import os
import random
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench", "quality"))

from bench.tier_a import task  # noqa: E402
from bench.tier_a.stats import disjoint, mean_ci, paired_difference, t_quantile_975  # noqa: E402


def test_mean_ci_matches_hand_computation():
    # mean 3, s = sqrt(2.5) = 1.58114, half-width = t_{0.975,4} * s / sqrt(5) = 2.776 * 0.707107 = 1.96293
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-12)
    assert half == pytest.approx(1.96293, abs=1e-5)
    assert math.isnan(mean_ci([0.7])[1])


def test_paired_difference_uses_common_seeds_only():
    # differences 0.5, 1.0, 1.5 -> mean 1.0, s 0.5, half = 4.303 * 0.5 / sqrt(3) = 1.24217; seed 3 has no partner
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0}
    b = {0: 0.5, 1: 1.0, 2: 2.5}
    mean, half, n = paired_difference(a, b)
    assert (mean, n) == (1.0, 3)
    assert half == pytest.approx(1.24217, abs=1e-5)
    # a constant shift has zero variance: the paired interval is a point even though each mean's own is wide
    mean, half, _ = paired_difference({s: v + 0.1 for s, v in b.items()}, b)
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-12)


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_disjoint_intervals():
    assert disjoint((1.0, 0.1), (1.5, 0.2))
    assert not disjoint((1.0, 0.3), (1.5, 0.2))
    assert disjoint((0.9, 0.0), (0.5, 0.3))  # a point (the teacher) outside an interval


def test_checker_accepts_every_tie_order_and_rejects_errors():
    symbols = [s for s in task.SYMBOLS if task.KEY[s] in (0, 1)][:5]  # classes 0 and 1, so ties exist
    rng = random.Random(0)
    answers = {tuple(task.reference_answer(symbols, rng)) for _ in range(300)}
    assert len(answers) == task.num_correct_answers(symbols) > 1  # the reference draws reach every correct answer
    prompt = " ".join(symbols + [task.SEPARATOR])
    assert all(task.is_correct(" ".join(a), prompt) for a in answers)
    good = list(next(iter(answers)))
    assert not task.is_correct(" ".join(task.corrupt(good, rng)), prompt)  # swapped across classes
    assert not task.is_correct(" ".join(good[:-1]), prompt)  # a symbol missing
    assert not task.is_correct(" ".join(good + good[:1]), prompt)  # a symbol repeated
    assert task.score(" ".join(good), "ignored", {"prompt": prompt}) == 1.0


def test_splits_are_disjoint_by_symbol_set_and_noise_only_in_train():
    sets = {split: {frozenset(r["prompt"].split()[:-1]) for r in task.make_rows(split, 300, seed=0)}
            for split in ("train", "validation", "test")}
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    noisy = task.make_rows("train", 2000, seed=0, noise=0.25)
    wrong = sum(not task.is_correct(r["completion"], r["prompt"]) for r in noisy) / len(noisy)
    assert 0.2 < wrong < 0.3  # 25%, less the rare all-one-class prompts that cannot be corrupted
    assert all(task.is_correct(r["completion"], r["prompt"]) for r in task.make_rows("test", 300, seed=0))


TOY_TASK = {"train_rows": 64, "validation_rows": 16, "test_rows": 16, "teacher_rows": 256,
            "teacher": {"hidden": 16, "layers": 1, "heads": 2, "steps": 4, "batch_size": 16, "lr": 3.0e-3},
            "student": {"hidden": 8, "layers": 1, "heads": 2}}


def toy_suite(tmp_path) -> str:
    with open(os.path.join(ROOT, "bench", "tier_a", "tier_a.yaml")) as f:
        suite = yaml.safe_load(f)
    suite.update(output_dir=str(tmp_path / "tier_a"), task=TOY_TASK, seeds=[0], curve_every=2)
    suite["start"]["args"].update(max_steps=2, per_device_train_batch_size=8)
    suite["common"].update(max_steps=3, per_device_train_batch_size=8)
    suite["select"].update(learning_rates=[1.0e-3, 1.0e-2])
    suite["runs"] = [r for r in suite["runs"] if r["name"] in ("sft", "fkl")]
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


def test_instrument_end_to_end_at_toy_size(tmp_path, capsys):
    import report as quality_report  # noqa: F401  (bench/quality/report.py imports alike)
    import suite as suite_module

    from bench.tier_a import report

    path = toy_suite(tmp_path)
    suite_module.main([path])
    out = tmp_path / "tier_a"
    manifest = json.loads((out / "assets" / "manifest.json").read_text())
    assert manifest["teacher_params"] > manifest["student_params"]
    # selection: every method x learning rate on the validation split; the test run records the chosen lr
    for name in ("sft", "fkl"):
        scores = {lr: json.loads((out / "select" / name / f"lr{lr:g}" / "seed0" / "result.json").read_text())
                  ["score_sampled"] for lr in (1.0e-3, 1.0e-2)}
        result = json.loads((out / name / "seed0" / "result.json").read_text())
        best = max(scores, key=lambda lr: (scores[lr], -[1.0e-3, 1.0e-2].index(lr)))
        assert result["learning_rate"] == best
        for key in ("score", "score_sampled", "quality", "coverage"):
            assert isinstance(result[key], float)
        assert 0.0 <= result["score"] <= 1.0 and result["quality"] < 0 and result["coverage"] < 0
        log = json.loads((out / name / "seed0" / "train_log.json").read_text())
        assert [e["step"] for e in log if "val/score" in e] == [0, 2, 3]  # step 0, every 2 steps, the last step

    # resumable: a second pass finds everything done and trains nothing
    mtime = os.path.getmtime(out / "fkl" / "seed0" / "train_log.json")
    capsys.readouterr()
    suite_module.main([path])
    assert "amm-trl train" not in capsys.readouterr().out
    assert os.path.getmtime(out / "fkl" / "seed0" / "train_log.json") == mtime

    export = tmp_path / "export"
    report.main([path, "--export", str(export), "--candidate", "fkl"])
    text = capsys.readouterr().out
    assert "| sft |" in text and "| fkl |" in text and "| teacher |" in text
    assert "SEPARATION FAIL" in text  # one seed: no interval, so the check cannot pass
    per_seed = json.loads((export / "fkl.json").read_text())
    assert per_seed["seeds"]["0"]["learning_rate"] == result["learning_rate"]
    assert set(json.loads((export / "references.json").read_text())) == {"teacher", "initial_student", "start"}
    assert (export / "curves_val_score.png").stat().st_size > 0 and (export / "report.md").exists()


def test_select_reuse_evaluates_the_chosen_selection_run_and_equals_training_it_again(tmp_path, capsys):
    """`select.reuse: true`: the method's test run on a selection seed evaluates the chosen selection run's weights
    instead of training the same student again, then deletes that seed's selection weights; with the weights gone it
    trains, and the fresh student scores exactly the same."""
    import suite as suite_module

    path = toy_suite(tmp_path)
    suite = yaml.safe_load(open(path).read())
    suite["select"]["reuse"] = True
    suite["runs"] = [r for r in suite["runs"] if r["name"] == "fkl"]
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "tier_a"
    capsys.readouterr()
    suite_module.main([path, "--only", "start", "select"])  # the selection alone: only the chosen student is kept
    assert capsys.readouterr().out.count("amm-trl train") == 1 + 2  # the shared start and the two selection runs
    chosen = suite_module.selection(suite_module.load_suite(path), "fkl")["candidate"]
    kept = {p.parent.parent.name for p in (out / "select" / "fkl").glob("*/seed0/*.safetensors")}
    assert chosen is not None and kept == {chosen}
    subprocess.run(["git", "init", "-q", str(out)], check=True)  # the runs folder's own .gitignore, written at start
    ignored = subprocess.run(["git", "-C", str(out), "check-ignore", "--no-index", *[
        str(p.relative_to(out)) for p in (out / "select" / "fkl" / chosen / "seed0").iterdir()]],
        capture_output=True, text=True).stdout.split()
    assert {os.path.basename(p) for p in ignored} >= {"config.json", "model.safetensors"}
    assert not {"result.json", "train_log.json"} & {os.path.basename(p) for p in ignored}
    suite_module.main([path])
    assert capsys.readouterr().out.count("amm-trl train") == 0  # the test run trains nothing
    reused = json.loads((out / "fkl" / "seed0" / "result.json").read_text())
    assert chosen == f"lr{reused['learning_rate']:g}" and reused["trained_in"] == f"select/fkl/{chosen}/seed0"
    trial = json.loads((out / "select" / "fkl" / chosen / "seed0" / "result.json").read_text())
    assert reused["train_seconds"] == trial["train_seconds"] and reused["train_argv"] == trial["train_argv"]
    assert (reused["train_commit"], reused["train_cpu"]) == (trial["commit"], trial["cpu"])
    log = (out / "fkl" / "seed0" / "train_log.json").read_text()
    assert log == (out / "select" / "fkl" / chosen / "seed0" / "train_log.json").read_text()
    assert not list((out / "select" / "fkl").glob("*/seed0/*.safetensors"))  # deleted once the test run is done
    assert not list((out / "fkl" / "seed0").glob("*.safetensors"))

    # the weights gone (a fresh machine): the test run trains the same student, with the same scores
    (out / "fkl" / "seed0" / "result.json").unlink()
    (out / "fkl" / "seed0" / "train_log.json").unlink()
    suite_module.main([path])
    assert capsys.readouterr().out.count("amm-trl train") == 1
    fresh = json.loads((out / "fkl" / "seed0" / "result.json").read_text())
    assert "trained_in" not in fresh and fresh["learning_rate"] == reused["learning_rate"]
    for key in ("score", "score_sampled", "quality", "coverage"):
        assert fresh[key] == reused[key], key
    assert fresh["quality"] < 0 and fresh["coverage"] < 0  # real numbers, not a shared default
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time",
              "memory/peak_rss_gib")

    def trained(text):  # the training's own numbers: losses, the curve, the student's statistics
        return [{k: v for k, v in e.items() if k not in timing} for e in json.loads(text)]

    assert trained(log) == trained((out / "fkl" / "seed0" / "train_log.json").read_text())
    assert any("train_loss" in e for e in trained(log))


def test_a_runs_measure_args_reach_its_measures_and_a_sharper_sampler_is_scored_beside(tmp_path):
    """`measure_args: {sample_temperatures: [...]}` on an ablation: its result has `score_sampled_t<T>` per
    temperature, where T = 1 repeats `score_sampled` exactly (same sampler seed); the ablation (`tune_as`, no change)
    trains the same student as its method, so every other score equals the method's; selection runs and the method
    itself get no extra keys."""
    import suite as suite_module

    path = toy_suite(tmp_path)
    suite = yaml.safe_load(open(path).read())
    suite["runs"] = [{"name": "fkl", "recipe": "quickstart_fkl"},
                     {"name": "fkl_sharp", "recipe": "quickstart_fkl", "tune_as": "fkl",
                      "measure_args": {"sample_temperatures": [0.3, 1.0]}}]
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(suite))
    suite_module.main([path])
    out = tmp_path / "tier_a"
    fkl = json.loads((out / "fkl" / "seed0" / "result.json").read_text())
    sharp = json.loads((out / "fkl_sharp" / "seed0" / "result.json").read_text())
    for key in ("score", "score_sampled", "quality", "coverage", "learning_rate"):
        assert sharp[key] == fkl[key], key
    assert sharp["score_sampled_t1"] == sharp["score_sampled"]
    assert 0.0 <= sharp["score_sampled_t0.3"] <= 1.0
    assert not [k for k in fkl if k.startswith("score_sampled_t")]
    for trial in (out / "select" / "fkl").glob("*/seed0/result.json"):
        assert not [k for k in json.loads(trial.read_text()) if k.startswith("score_sampled_t")]


def test_sign_test_hand_computed():
    from bench.tier_a.stats import sign_test

    # 8 wins, 1 loss, 1 tie: n = 9, P(<= 1 of 9) = (1 + 9) / 512, two-sided 20 / 512
    a = {s: 1.0 for s in range(10)}
    b = {**{s: 0.0 for s in range(8)}, 8: 2.0, 9: 1.0}
    assert sign_test(a, b) == {"wins": 8, "losses": 1, "ties": 1, "p": pytest.approx(20 / 512)}
    assert sign_test(a, a)["p"] == 1.0 and sign_test({0: 1.0}, {0: 0.0})["p"] == 1.0  # 1 of 1: p = 2 * 1/2


def test_trials_make_candidates_with_an_equal_budget_and_the_best_one_is_used(tmp_path):
    import suite as suite_module

    runs = [{"name": "a", "recipe": "r", "trials": [{"learning_rate": lr} for lr in (1, 2, 3, 4, 5, 6)]},
            {"name": "b", "recipe": "r", "trials": [{"beta": 0.1}, {"beta": 0.5}, {"beta": 0.9}]},
            {"name": "b_ablation", "recipe": "r", "tune_as": "b", "args": {"beta": 0.3, "x": 1}}]
    suite = {"output_dir": str(tmp_path), "seeds": [0], "common": {}, "teacher": "t", "initial_student": "s",
             "runs": runs, "select": {"learning_rates": [1.0e-3, 3.0e-3], "seeds": [0], "budget": 6,
                                      "metric": "score_sampled"}}
    assert [c[0] for c in suite_module.candidates(suite, runs[1])] == [
        "t0-lr0.001", "t0-lr0.003", "t1-lr0.001", "t1-lr0.003", "t2-lr0.001", "t2-lr0.003"]
    assert suite_module.candidates(suite, runs[0])[2] == ("t2-lr3", 3, {})
    suite_module.check_select(suite)
    with pytest.raises(ValueError, match=r"select.budget=5: these runs have another number of candidates: "
                                         r"\{'a': 6, 'b': 6\}"):
        suite_module.check_select({**suite, "select": {**suite["select"], "budget": 5}})
    with pytest.raises(ValueError, match=r"select.reuse: true needs select.curves: true .* set curves: true or "
                                         r"drop reuse"):
        suite_module.check_select({**suite, "select": {**suite["select"], "reuse": True, "curves": False}})
    plan = [r for r in suite_module.planned_runs(suite) if r["group"] == "select" and r["name"] == "b"]
    assert [(r["candidate"], r["args"]) for r in plan][2] == ("t1-lr0.001", {"beta": 0.5})
    assert suite_module.selection(suite, "b")["candidate"] is None  # nothing ran yet
    for i, run in enumerate(plan):  # t1-lr0.003 scores best
        suite_module._write_json(os.path.join(suite_module.run_dir(suite, run), "result.json"),
                                 {"score_sampled": 0.9 if run["candidate"] == "t1-lr0.003" else 0.1 * i})
    chosen = suite_module.selection(suite, "b")
    assert (chosen["candidate"], chosen["learning_rate"], chosen["trial_args"]) == ("t1-lr0.003", 3.0e-3,
                                                                                    {"beta": 0.5})
    assert chosen["scores"]["t1-lr0.003"] == [0.9]


def test_fair_suite_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """bench/tier_a/tier_a_fair.yaml at a toy size: each method's trials are its validation candidates, the test
    run trains with the chosen trial's knobs and learning rate and records them and the commit its process loaded
    (and the checkout's, where a commit landed since); AMM's equal-token batch (8 prompts: 8 rollouts + 8 teacher
    samples) reaches the trainer."""
    import suite as suite_module

    checkout = suite_module.code_version()
    monkeypatch.setattr(suite_module, "LOADED_COMMIT", "0" * 40)  # as if a commit landed after the worker started

    with open(os.path.join(ROOT, "bench", "tier_a", "tier_a_fair.yaml")) as f:
        suite = yaml.safe_load(f)
    suite.update(output_dir=str(tmp_path / "fair"), task=TOY_TASK, seeds=[0], curve_every=2)
    suite["start"]["args"].update(max_steps=2, per_device_train_batch_size=8)
    suite["common"].update(max_steps=2)
    suite["select"].update(budget=2, learning_rates=[1.0e-2])
    runs = {r["name"]: r for r in suite["runs"]}
    runs["sft"]["trials"] = runs["sft"]["trials"][:2]
    runs["amm"]["trials"] = runs["amm"]["trials"][:2]
    runs["amm"]["args"] = {**runs["amm"]["args"], "per_device_train_batch_size": 4}  # toy: half of sft's 8
    runs["sft"]["args"] = {"per_device_train_batch_size": 8}
    suite["runs"] = [runs["sft"], runs["amm"]]
    path = tmp_path / "fair.yaml"
    path.write_text(yaml.safe_dump(suite))
    suite_module.main([str(path)])
    out = tmp_path / "fair"
    result = json.loads((out / "amm" / "seed0" / "result.json").read_text())
    chosen = suite_module.selection(suite_module.prepare(suite_module.load_suite(str(path))), "amm")
    assert result["candidate"] == chosen["candidate"] and result["trial_args"] == chosen["trial_args"]
    assert result["trial_args"]["amm_beta"] in (0.25, 0.5) and result["learning_rate"] == 1.0e-2
    argv = result["train_argv"]
    assert argv[argv.index("--amm_beta") + 1] == str(result["trial_args"]["amm_beta"])
    assert argv[argv.index("--per_device_train_batch_size") + 1] == "4"
    assert argv[argv.index("--off_policy_column") + 1] == "teacher"
    assert (result["commit"], result["checkout_commit"]) == ("0" * 40, checkout) and len(checkout) >= 40
    sft = json.loads((out / "sft" / "seed0" / "result.json").read_text())
    assert sft["candidate"] in ("t0-lr0.0001", "t1-lr0.0003") and sft["learning_rate"] in (1.0e-4, 3.0e-4)


def test_report_flags_a_curve_still_rising_and_prints_the_sign_test():
    from bench.tier_a import report

    rising = {s: {"val_curve": [[0, 0.1, 0.1], [300, 0.5 + 0.01 * s, 0.5], [400, 0.6 + 0.01 * s, 0.6]]}
              for s in range(5)}
    flat = {s: {"val_curve": [[0, 0.1, 0.1], [300, 0.7, 0.7], [400, 0.7 + 0.001 * (s - 2), 0.7]]} for s in range(5)}
    text = report.flattening_table({"amm": rising, "rkl": flat})
    assert "| amm | 400 | +10.0 ± 0.0 | STILL CHANGING |" in text and "| rkl | 400 | +0.0 ± 0.2 | flat |" in text
    scores = {"score_sampled": 0.5, "score": 0.5, "quality": -1.0, "coverage": -1.0}
    tests = {"amm": {s: {**scores, "score_sampled": 0.6 + 0.01 * s} for s in range(10)},
             "rkl": {s: dict(scores) for s in range(10)}}
    table = report.paired_table(tests, "amm")
    assert "| 10-0-0, p=0.00195 |" in table and "Bonferroni over them asks p < 0.05" in table
    # the candidate's primary metric against another metric of a baseline (e.g. a sharper sampler's accuracy)
    for s in range(10):
        tests["rkl"][s]["score_sampled_t0.7"] = 0.65 if s < 8 else 0.55
    table = report.against_table(tests, "amm", ["score_sampled_t0.7"])
    diffs = [100 * (0.6 + 0.01 * s) - (65.0 if s < 8 else 55.0) for s in range(10)]
    mean = sum(diffs) / 10
    half = 2.2621571628 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 9 / 10)
    assert f"| rkl score_sampled_t0.7 | {mean:+.1f} ± {half:.1f} (n=10) | 4-5-1, p=1 |" in table  # seed 5 level
    assert table.count("\n") == 2  # amm has no such metric of its own to pair with


def test_a_variant_suite_merges_into_its_base_and_drops_changes_or_adds_runs(tmp_path):
    """bench/tier_a/tier_a_fair_800.yaml is tier_a_fair.yaml with 800 steps and without the paper's reading."""
    import suite as suite_module

    base = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_a", "tier_a_fair.yaml"))
    longer = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_a", "tier_a_fair_800.yaml"))
    assert longer["common"] == {**base["common"], "max_steps": 800}
    assert longer["output_dir"] == "docs/results/tier_a_fair_800/runs" and longer["curve_every"] == 80
    assert [r["name"] for r in longer["runs"]] == [r["name"] for r in base["runs"] if r["name"] != "amm_paper"]
    assert longer["select"] == base["select"] and longer["start"] == base["start"]
    suite_module.check_select(longer)
    (tmp_path / "v.yaml").write_text("base: " + os.path.join(ROOT, "bench", "tier_a", "tier_a_fair.yaml") +
                                     "\nruns: {gkd: {args: {beta: 0.3}}}\n")
    gkd = next(r for r in suite_module.load_suite(str(tmp_path / "v.yaml"))["runs"] if r["name"] == "gkd")
    assert gkd["args"] == {"off_policy_source": "dataset", "off_policy_column": "teacher", "beta": 0.3}
    assert gkd["trials"] == next(r for r in base["runs"] if r["name"] == "gkd")["trials"]
    (tmp_path / "w.yaml").write_text("base: " + os.path.join(ROOT, "bench", "tier_a", "tier_a_fair.yaml") +
                                     "\nruns: {gdk: null}\n")
    with pytest.raises(KeyError, match=r"runs: \['gdk'\] are not runs of the base suite \(it has \['sft', .*\), and a "
                                       r"new run needs a `recipe`"):
        suite_module.load_suite(str(tmp_path / "w.yaml"))
    # a new run (with its recipe) is added after the base's; bench/tier_a/tier_a_algo.yaml keeps rkl and amm and adds
    # AMM on rollouts only, with 6 trials like every method
    algo = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_a", "tier_a_algo.yaml"))
    assert [r["name"] for r in algo["runs"]] == ["rkl", "amm", "amm_rollouts", "amm_rollouts_clip_apart"]
    added = algo["runs"][2]
    assert added["recipe"] == "quickstart" and added["args"] == {"amm_beta": 0.0, "per_device_train_batch_size": 16}
    assert algo["common"]["max_steps"] == 800 and algo["output_dir"] == "docs/results/tier_a_algo/runs"
    suite_module.check_select(algo)


def test_under_reuse_a_methods_selection_seed_test_run_follows_its_selection(tmp_path):
    """`select.reuse`: the test run on a selection seed only evaluates the chosen selection run's weights, so it is
    planned right after that method's selection runs (a suite stopped later would lose the weights and train it
    again); the other seeds and the ablations keep their order."""
    import suite as suite_module

    runs = [{"name": "a", "recipe": "r"}, {"name": "b", "recipe": "r", "seeds": [1]},
            {"name": "a_abl", "recipe": "r", "tune_as": "a", "group": "ablation"}]
    suite = {"output_dir": str(tmp_path), "seeds": [0, 1], "common": {}, "teacher": "t", "initial_student": "s",
             "runs": runs, "select": {"learning_rates": [1.0, 2.0], "seeds": [0], "reuse": True}}
    tags = [(r["name"], r["group"], r["seed"], r.get("candidate")) for r in suite_module.planned_runs(suite)]
    assert tags == [("teacher", "reference", None, None), ("initial_student", "reference", None, None),
                    ("a", "select", 0, "lr1"), ("a", "select", 0, "lr2"), ("a", "method", 0, None),
                    ("b", "select", 0, "lr1"), ("b", "select", 0, "lr2"),  # b is not tested on seed 0
                    ("a", "method", 1, None), ("b", "method", 1, None),
                    ("a_abl", "ablation", 0, None), ("a_abl", "ablation", 1, None)]
    suite["select"]["reuse"] = False
    assert [(r["name"], r["seed"]) for r in suite_module.planned_runs(suite) if r["group"] == "method"] == [
        ("a", 0), ("a", 1), ("b", 1)]


def test_a_best_rate_at_the_grids_edge_adds_the_next_rate_beyond_it_for_every_method(tmp_path, monkeypatch):
    """`select.beyond_edges`: a method whose best rate is the grid's highest (lowest) trains the next `above` (`below`)
    rate too, again while the best stays at the edge, and its test runs wait for that; a method whose optimum lies
    inside the grid gets nothing more. The suite plans again after every run, so one worker does it all in order."""
    import suite as suite_module
    from bench.tier_a import report

    runs = [{"name": n, "recipe": "r"} for n in ("top", "bottom", "inside", "tie")]
    suite = {"output_dir": str(tmp_path), "seeds": [0, 1], "common": {}, "teacher": "t", "initial_student": "s",
             "runs": runs, "select": {"learning_rates": [1.0, 2.0, 3.0], "seeds": [0], "metric": "tv", "mode": "min",
                                      "beyond_edges": {"above": [10.0, 30.0], "below": [0.1]}}}
    tv = {"top": {1.0: 0.5, 2.0: 0.4, 3.0: 0.3, 10.0: 0.35, 30.0: 0.1},  # 10 loses: 30 is never tried
          "bottom": {0.1: 0.1, 1.0: 0.3, 2.0: 0.4, 3.0: 0.5},  # 0.1 wins and `below` has nothing more
          "inside": {1.0: 0.5, 2.0: 0.2, 3.0: 0.4},
          "tie": {1.0: 0.5, 2.0: 0.2, 3.0: 0.2}}  # the top edge ties an inside rate: nothing more, the first wins
    order = []

    def fake_execute(suite, run, keep_models):
        if run["group"] == "reference":  # the teacher's and initial student's rows
            record = {"tv": 1.0, "learning_rate": None}
        elif run["group"] == "select":
            record = {"tv": tv[run["name"]][run["learning_rate"]], "learning_rate": run["learning_rate"]}
        else:
            assert suite_module.selection(suite, run["name"])["learning_rate"] is not None  # waited for the edge
            record = {"tv": 0.0, "learning_rate": suite_module.selection(suite, run["name"])["learning_rate"]}
        order.append((run["name"], run["group"], run.get("learning_rate", record["learning_rate"]), run["seed"]))
        suite_module._write_json(os.path.join(suite_module.run_dir(suite, run), "result.json"),
                                 {"name": run["name"], "group": run["group"], "seed": run["seed"], **record})
        return record

    monkeypatch.setattr(suite_module, "execute", fake_execute)
    suite_module.check_select(suite)
    assert [c[1] for c in suite_module.candidates(suite, runs[0])] == [1.0, 2.0, 3.0]  # nothing ran yet
    suite_module.work(suite, None, keep_models=False)
    assert [n for n, g, _, _ in order[:2]] == ["teacher", "initial_student"]
    selected = [(n, lr) for n, g, lr, _ in order if g == "select"]
    assert selected == ([("top", lr) for lr in (1.0, 2.0, 3.0, 10.0)] + [("bottom", lr) for lr in (1.0, 2.0, 3.0, 0.1)]
                        + [(n, lr) for n in ("inside", "tie") for lr in (1.0, 2.0, 3.0)])  # edge rates right after
    assert [(n, lr, seed) for n, g, lr, seed in order if g == "method"] == [  # their method's grid
        (n, lr, seed) for seed in (0, 1) for n, lr in (("top", 3.0), ("bottom", 0.1), ("inside", 2.0), ("tie", 2.0))]
    assert [c[0] for c in suite_module.candidates(suite, runs[0])] == ["lr1", "lr2", "lr3", "lr10"]
    assert [c[1] for c in suite_module.candidates(suite, runs[1])] == [0.1, 1.0, 2.0, 3.0]
    assert len(suite_module.candidates(suite, runs[2])) == len(suite_module.candidates(suite, runs[3])) == 3
    assert all(len(suite_module.candidates(suite, r, edges=False)) == 3 for r in runs)
    suite_module.check_select({**suite, "select": {**suite["select"], "budget": 3}})  # edge rates aside

    selects = {r["name"]: [json.load(open(p)) for p in sorted(glob.glob(os.path.join(
        str(tmp_path), "select", r["name"], "*", "seed0", "result.json")))] for r in runs}
    table = report.selection_table(suite, selects, report.report_config(
        {"report": {"metrics": {"tv": ["exact TV", 1.0, 2, "min"]}}}))
    assert table.splitlines()[0] == "| method | lr 0.1 | lr 1 | lr 2 | lr 3 | lr 10 | chosen |"
    assert table.splitlines()[2:] == ["| top | - | 0.50 | 0.40 | 0.30 | 0.35 | 3 |",
                                      "| bottom | 0.10 | 0.30 | 0.40 | 0.50 | - | 0.1 |",
                                      "| inside | - | 0.50 | 0.20 | 0.40 | - | 2 |",
                                      "| tie | - | 0.50 | 0.20 | 0.20 | - | 2 |"]
    for edges in ({"above": [2.0]}, {"above": [30.0, 10.0]}, {"below": [0.1, 0.5]}, {"abov": [10.0]},
                  {"above": 10.0}, {"above": ["1e-3"]}, {"above": [10.0, 10.0000001]}):
        with pytest.raises(ValueError, match=r"select.beyond_edges=.*: `above` lists rates above the grid "
                                             r"\[1.0, 2.0, 3.0\], ascending, and `below` rates below it, descending"):
            suite_module.check_select({**suite, "select": {**suite["select"], "beyond_edges": edges}})
    with pytest.raises(ValueError, match=r"the grid itself ascending"):  # an edge is the highest rate, not the last
        suite_module.check_select({**suite, "select": {**suite["select"], "learning_rates": [3.0, 2.0, 1.0]}})
    for grid in ([], ["1e-4", 3.0e-4], None):
        with pytest.raises(ValueError, match=r"select.learning_rates=.*: a non-empty list of numbers \(write "
                                             r"1.0e-4, not 1e-4: YAML reads the latter as a string\)"):
            suite_module.check_select({**suite, "select": {**suite["select"], "learning_rates": grid}})
    # a test run called before its method's selection has finished refuses to train at the recipe's own rate
    os.remove(os.path.join(str(tmp_path), "select", "top", "lr10", "seed0", "result.json"))  # the edge rate pending
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"top seed 2: the learning-rate selection of top has not finished; run "
                                           r"its selection runs first"):
        suite_module.execute(suite, {"name": "top", "recipe": "r", "group": "method", "seed": 2}, keep_models=False)


def test_selection_mode_min_picks_the_lowest_metric_and_tier_b_files_load(tmp_path):
    """`select.mode: min` (Tier B selects by exact TV, lower is better); tier_b.yaml and its pilot variant load, with
    the same learning-rate grid for every method and 4 + 4 sequences for the methods that train on both kinds."""
    import suite as suite_module

    runs = [{"name": "a", "recipe": "r"}]
    suite = {"output_dir": str(tmp_path), "seeds": [0], "common": {}, "teacher": "t", "initial_student": "s",
             "runs": runs, "select": {"learning_rates": [1.0e-3, 3.0e-3, 1.0e-2], "seeds": [0], "metric": "tv",
                                      "mode": "min"}}
    for run, tv in zip([r for r in suite_module.planned_runs(suite) if r["group"] == "select"], (0.5, 0.2, 0.4)):
        suite_module._write_json(os.path.join(suite_module.run_dir(suite, run), "result.json"), {"tv": tv})
    assert suite_module.selection(suite, "a")["learning_rate"] == 3.0e-3
    suite["select"]["mode"] = "max"
    assert suite_module.selection(suite, "a")["learning_rate"] == 1.0e-3

    tier_b = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_b", "tier_b.yaml"))
    methods = [r for r in tier_b["runs"] if r.get("group", "method") == "method"]
    assert [r["name"] for r in methods] == ["sft", "fkl", "rkl", "gkd", "distillm", "minillm", "composite", "amm",
                                             "amm_rollouts"]
    assert all(len(suite_module.candidates(tier_b, r)) == 3 for r in methods)  # the learning-rate grid
    ablations = {r["name"]: r for r in tier_b["runs"] if r.get("group") == "ablation"}  # the top-k table
    assert {name: (r["tune_as"], r["args"]["teacher_local_top_k"]) for name, r in ablations.items()} == {
        **{f"{m}_k{k}": (m, k) for m in ("fkl", "amm") for k in (8, 32, 128)}, "amm_k8_taken": ("amm", 8)}
    assert [n for n, r in ablations.items() if r["args"].get("teacher_top_k_taken_bucket")] == ["amm_k8_taken"]
    assert ablations["amm_k8"]["args"]["per_device_train_batch_size"] == 4
    both = {r["name"] for r in methods if r.get("args", {}).get("per_device_train_batch_size") == 4}
    assert both == {"minillm", "composite", "amm"} and tier_b["common"]["per_device_train_batch_size"] == 8
    assert tier_b["select"]["eval"]["generate"] is False and tier_b["select"]["eval"]["only"] == ["tv_teacher_greedy"]
    pilot = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_b", "tier_b_pilot.yaml"))
    assert [r["name"] for r in pilot["runs"]] == ["sft", "fkl"] and pilot["select"] is None
    assert pilot["common"]["learning_rate"] == 3.0e-5 and pilot["common"]["max_steps"] == 40
    budget = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_b", "tier_b_budget.yaml"))
    assert [r["name"] for r in budget["runs"]] == ["fkl"] and budget["select"] is None
    assert (budget["common"]["learning_rate"], budget["common"]["max_steps"],
            budget["curve_every"]) == (3.0e-4, 160, 20)
    assert budget["assets_dir"] == tier_b["assets_dir"]  # the same committed teacher answers
    longer = suite_module.load_suite(os.path.join(ROOT, "bench", "tier_b", "tier_b_120.yaml"))  # the flattening budget
    longer_methods = [r for r in longer["runs"] if r.get("group", "method") == "method"]
    assert longer_methods == methods  # the same methods; the top-k ablations stay at 40 steps
    # its own ablations: each is an AMM-family method with one change, trained at the rate chosen for it (seed 0)
    by_name = {r["name"]: r for r in methods}
    ablations = [r for r in longer["runs"] if r.get("group") == "ablation"]
    changes = {r["name"]: {k: v for k, v in r["args"].items() if by_name[r["tune_as"]]["args"].get(k) != v}
               for r in ablations}
    assert changes == {"amm_rollouts_clip_apart": {"q_head_max_grad_norm": 1.0},
                       "amm_rollouts_l2_student": {"q_head_l2_weight": "student"},
                       "composite_clip_apart": {"q_head_max_grad_norm": 1.0},
                       "amm_clip_apart": {"q_head_max_grad_norm": 1.0},
                       "amm_critic_x1": {"q_head_learning_rate": 3.0e-4},  # the rate chosen for amm: 3e-4
                       "amm_l2_student": {"q_head_l2_weight": "student"}}
    assert {r["name"]: r["tune_as"] for r in ablations} == {
        "amm_rollouts_clip_apart": "amm_rollouts", "amm_rollouts_l2_student": "amm_rollouts",
        "composite_clip_apart": "composite", "amm_clip_apart": "amm", "amm_critic_x1": "amm", "amm_l2_student": "amm"}
    three = {"amm_critic_x1", "amm_clip_apart", "composite_clip_apart"}  # x1: AMMConfig's default; the clip's handicap
    assert all(r["seeds"] == ([0, 1, 2] if r["name"] in three else [0])
               and r["recipe"] == by_name[r["tune_as"]]["recipe"]
               and set(by_name[r["tune_as"]]["args"]) <= set(r["args"]) for r in ablations)
    assert longer["common"] == {**tier_b["common"], "max_steps": 120} and longer["curve_every"] == 30
    assert longer["select"] == {**tier_b["select"], "curves": True, "reuse": True,
                                "learning_rates": [3.0e-5, 1.0e-4, 3.0e-4],  # one step down at 120 steps
                                "beyond_edges": {"above": [1.0e-3], "below": [1.0e-5]}}
    suite_module.check_select(longer)
    assert (longer["output_dir"], longer["assets_dir"]) == ("docs/results/tier_b_120/runs", tier_b["assets_dir"])


def test_an_eval_without_generation_runs_the_named_measures_alone(tmp_path, monkeypatch):
    """`generate: false` skips `amm-trl eval`; `only` reaches the measures hook."""
    import suite as suite_module

    import amm_trl.evaluation

    seen = {}
    monkeypatch.setattr(amm_trl.evaluation, "evaluate", lambda a: seen.setdefault("evaluate", a) and {})
    monkeypatch.setattr(suite_module, "_function", lambda spec: lambda *args: seen.setdefault("measure", args[-1])
                        and {"tv": 0.25})
    record = suite_module.eval_one({"measures": "m:f"}, str(tmp_path), str(tmp_path), 0,
                                   {"dataset_name": str(tmp_path), "generate": False, "only": ["tv"],
                                    "max_new_tokens": 4})
    assert "evaluate" not in seen and seen["measure"]["only"] == ["tv"] and "generate" not in seen["measure"]
    assert record["tv"] == 0.25 and record["eval_seconds"] >= 0


def test_a_fresh_checkout_rebuilds_the_assets_and_refuses_different_ones(tmp_path):
    """The committed manifest records the assets' digest: a checkout without the files rebuilds them (the same bytes,
    one thread, fixed seeds) and goes on; a rebuild that differs (another CPU kind can train another teacher) is
    refused, because the finished runs used the recorded assets."""
    import shutil

    from bench.tier_a import assets

    out = str(tmp_path / "assets")
    paths = assets.build(out, TOY_TASK)
    manifest_path = os.path.join(out, "manifest.json")
    recorded = json.loads(open(manifest_path).read())
    assert recorded["digest"] == assets.digest(paths)
    shutil.rmtree(paths["teacher"])  # a fresh checkout: results and manifest, no models
    assert assets.build(out, TOY_TASK) == paths and assets.digest(paths) == recorded["digest"]
    recorded["digest"] = "0" * 64
    del recorded["content_digest"]  # a manifest written before the content digest: bytes are compared
    with open(manifest_path, "w") as f:
        json.dump(recorded, f)
    shutil.rmtree(paths["teacher"])
    with pytest.raises(ValueError, match=r"The assets rebuilt in .* differ from those .*manifest.json records "
                                         r"\(digest [0-9a-f]{12} vs 000000000000\): this machine computes "
                                         r"other models"):
        assets.build(out, TOY_TASK)


def test_a_rebuild_that_differs_only_in_the_transformers_version_stamp_is_accepted(tmp_path):
    """A fresh machine installs another transformers release, whose `save_pretrained` writes its own version into
    config.json: the manifest's content digest ignores that stamp (the same weights and data), and a manifest written
    before the content digest (byte digest only) still refuses a rebuild whose bytes differ; a weight that changes is
    refused under either."""
    import shutil

    from bench.tier_a import assets

    out = str(tmp_path / "assets")
    paths = assets.build(out, TOY_TASK)
    manifest_path = os.path.join(out, "manifest.json")
    recorded = json.loads(open(manifest_path).read())
    assert recorded["content_digest"] == assets.digest(paths, stamps=False) != recorded["digest"]
    config = os.path.join(paths["teacher"], "config.json")
    stamped = json.loads(open(config).read())
    stamped["transformers_version"] = "0.0.1"  # what another release would write
    with open(config, "w") as f:
        json.dump(stamped, f, indent=2)
    assert assets.digest(paths) != recorded["digest"]
    assert assets.digest(paths, stamps=False) == recorded["content_digest"]
    assert assets.build(out, TOY_TASK) == paths  # accepted as it is
    legacy = {k: v for k, v in recorded.items() if k != "content_digest"}
    with open(manifest_path, "w") as f:
        json.dump(legacy, f)
    with pytest.raises(ValueError, match=r"The assets in .* differ from the digest .*manifest.json records"):
        assets.build(out, TOY_TASK)
    with open(manifest_path, "w") as f:
        json.dump(recorded, f)
    weights = os.path.join(paths["teacher"], "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1  # one bit of one weight
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"The assets in .* differ from the digest .*manifest.json records"):
        assets.build(out, TOY_TASK)
    shutil.rmtree(paths["teacher"])  # rebuilt with the recorded weights: the same content, accepted
    assert assets.build(out, TOY_TASK) == paths and assets.digest(paths, stamps=False) == recorded["content_digest"]
    recorded["content_digest"] = "0" * 64
    with open(manifest_path, "w") as f:
        json.dump(recorded, f)
    shutil.rmtree(paths["teacher"])
    with pytest.raises(ValueError, match=r"The assets rebuilt in .* differ from those .*manifest.json records "
                                         r"\(content_digest [0-9a-f]{12} vs 000000000000\)"):
        assets.build(out, TOY_TASK)


def test_selection_runs_train_without_curves_when_asked_and_step_zero_is_measured_once(tmp_path, monkeypatch):
    """`select.curves: false` passes no callbacks to selection runs (test runs keep them); Tier B's validation curve
    measures the shared initial student at step 0 once per process and reuses that value."""
    from types import SimpleNamespace

    import suite as suite_module

    import amm_trl.cli
    from bench.tier_b import measure

    seen = []

    def fake_train(argv, callbacks):
        seen.append(len(callbacks))
        return SimpleNamespace(state=SimpleNamespace(log_history=[]))

    monkeypatch.setattr(amm_trl.cli, "train", fake_train)
    monkeypatch.setattr(suite_module, "_function", lambda spec: lambda suite: object())
    suite = {"common": {}, "callbacks": ["m:f"], "initial_student": "s", "select": {"curves": False}}
    for group in ("select", "method"):
        suite_module.train_one(suite, {"name": "a", "recipe": "r", "group": group, "seed": 0}, str(tmp_path))
    assert seen == [0, 1]

    calls = []
    monkeypatch.setattr(measure.ValidationCurve, "_tv", lambda self, model: calls.append(model) or 0.5 + len(calls))
    monkeypatch.setattr(measure, "_STEP0", {})
    logs = []
    for model in ("run1", "run2"):
        curve = measure.ValidationCurve(None, 20, start_key=("s", "validation"))
        state = SimpleNamespace(global_step=0, log_history=[])
        curve.record(state, model)
        state.global_step = 20
        curve.record(state, model)
        logs.append(state.log_history)
    assert calls == ["run1", "run1", "run2"]  # step 0 once, step 20 per run
    assert logs[1][0] == {"step": 0, "val/tv": 1.5} == logs[0][0] and logs[1][1] == {"step": 20, "val/tv": 3.5}


def tier_b_like_suite(tmp_path) -> str:
    """A Tier B-shaped suite written by hand: exact TV to the teacher (lower is better) as the primary and selection
    metric, a `val/tv` curve, an ablation on seed 0 only, the assets in their own folder. Per seed s: amm's TV is
    0.05 - 0.001 s below fkl's; amm's curve still falls by 0.03 over the last quarter, sft's by a constant 0.003
    (below flat_below), fkl's wobbles around zero, the ablation's (one seed) falls by 0.001."""
    out = tmp_path / "runs"

    def write(leaf: str, name: str, obj) -> None:
        (out / leaf).mkdir(parents=True, exist_ok=True)
        (out / leaf / name).write_text(json.dumps(obj))

    base = {"sft": 0.60, "fkl": 0.55, "amm": 0.50}
    write("teacher", "result.json", {"rougeL": 23.0, "tv_teacher_greedy": 0.0, "quality": -1.75, "coverage": -1.81})
    write("initial_student", "result.json", {"rougeL": 9.8, "tv_teacher_greedy": 0.67, "quality": -4.9,
                                             "coverage": -4.0})
    for name, tv in base.items():
        for s in range(5):
            step = 0.003 if name == "amm" else 0.002
            write(f"{name}/seed{s}", "result.json", {
                "seed": s, "learning_rate": 1.0e-4, "train_seconds": 60.0, "tv_teacher_greedy": tv + step * s,
                "rougeL": 30 - 20 * tv + 0.1 * s, "quality": -5 * tv - 0.01 * s, "coverage": -5 * tv - 0.02 * s})
            last = {"amm": 0.52 + 0.001 * s, "sft": 0.577, "fkl": 0.58 + 0.001 * (s - 2)}[name]
            write(f"{name}/seed{s}", "train_log.json", [{"step": 0, "val/tv": 0.7}, {"step": 10, "loss": 1.0},
                                                        {"step": 20, "val/tv": 0.6},
                                                        {"step": 30, "val/tv": 0.55 + 0.001 * s if name == "amm"
                                                         else 0.58},
                                                        {"step": 40, "val/tv": last}])
        for lr, tv_val in ((3.0e-5, tv + 0.01), (1.0e-4, tv - 0.0125)):
            write(f"select/{name}/lr{lr:g}/seed0", "result.json", {"learning_rate": lr, "tv_teacher_greedy": tv_val})
    write("amm_k8/seed0", "result.json", {"seed": 0, "learning_rate": 1.0e-4, "tv_teacher_greedy": 0.52,
                                          "rougeL": 19.0, "quality": -2.6, "coverage": -2.6})
    write("amm_k8/seed0", "train_log.json", [{"step": 0, "val/tv": 0.7}, {"step": 30, "val/tv": 0.53},
                                             {"step": 40, "val/tv": 0.529}])
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "manifest.json").write_text(json.dumps({"digest": "abc"}))
    with open(os.path.join(ROOT, "bench", "tier_b", "tier_b.yaml")) as f:
        report_block = yaml.safe_load(f)["report"]
    suite = {"output_dir": str(out), "assets_dir": str(tmp_path / "assets"), "teacher": "t", "initial_student": "s",
             "seeds": [0, 1, 2, 3, 4], "common": {},
             "select": {"learning_rates": [3.0e-5, 1.0e-4], "seeds": [0], "metric": "tv_teacher_greedy",
                        "mode": "min"},
             "runs": [{"name": "sft", "recipe": "r"}, {"name": "fkl", "recipe": "r"}, {"name": "amm", "recipe": "r"},
                      {"name": "amm_k8", "recipe": "r", "group": "ablation", "tune_as": "amm", "seeds": [0]}],
             "report": report_block}
    path = tmp_path / "tier_b_like.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))  # the metrics' order is the columns' order
    return str(path)


def test_report_block_reads_a_lower_is_better_metric_and_its_own_curve(tmp_path, capsys):
    """Tier B's `report:` block: exact TV (lower is better) is the primary metric, so a lower TV wins the sign test
    (the (<0) mark stays the arithmetic sign); the `val/tv` curve's last-quarter change is judged against
    flat_below; the selection table shows TV as it is; the ablation has its rows; the export holds the curve and the
    manifest from `assets_dir`."""
    import suite as suite_module

    from bench.tier_a import report

    assert report.report_config({"runs": []}) is report.TIER_A  # no block: Tier A's metrics, text and numbers
    config = report.report_config(suite_module.load_suite(os.path.join(ROOT, "bench", "tier_b", "tier_b.yaml")))
    assert config.primary == "tv_teacher_greedy" and config.metrics["tv_teacher_greedy"].direction == "min"
    assert list(config.curves) == ["val/tv"] and config.flat_below == 0.005

    path = tier_b_like_suite(tmp_path)
    export = tmp_path / "export"
    verdicts = report.main([path, "--export", str(export)])
    text = capsys.readouterr().out
    assert "| method | lr | seeds | exact TV | ROUGE-L | quality | coverage | train s |" in text
    assert "| teacher | - | - | 0.0000 | 23.00 | -1.750 | -1.810 | - |" in text
    assert "| amm | 0.0001 | 5 | 0.5060 ± 0.0059 |" in text and "| amm_k8 | 0.0001 | 1 | 0.5200 | 19.00 |" in text
    # sign test: amm's TV is lower than fkl's on all 5 seeds -> 5 wins; the difference itself is negative
    assert "| fkl | -0.0480 ± 0.0020 (<0) |" in text and "| 5-0-0, p=0.0625 |" in text
    assert "| amm_k8 | -0.0200 (n=1) |" in text and "nan" not in text  # one common seed: no interval and "| 1-0-0, p=1 |" in text
    assert "(sign test on exact TV (lower is better): seeds where amm is ahead-behind-level." in text
    assert verdicts["tv_teacher_greedy"] == "PASS"
    assert "separation on the primary metric (tv_teacher_greedy): PASS" in text
    assert "## Have the curves flattened? (validation exact TV, last quarter of training)" in text
    assert "| method | steps | last-quarter change | |" in text
    assert "| amm | 40 | -0.0300 ± 0.0000 | STILL CHANGING |" in text
    assert "| sft | 40 | -0.0030 ± 0.0000 | flat |" in text  # below flat_below although the interval excludes 0
    assert "| fkl | 40 | +0.0000 ± 0.0020 | flat |" in text and "| amm_k8 | 40 | -0.0010 | flat |" in text
    assert "## Selection (validation exact TV, seed(s) [0]; ties go to the first candidate)" in text
    assert "| amm | 0.5100 | 0.4875 | 0.0001 |" in text and "| sft | 0.6100 | 0.5875 | 0.0001 |" in text
    assert "SEPARATION PASS" in text
    amm = json.loads((export / "amm.json").read_text())
    assert amm["seeds"]["1"]["val_curve"] == [[0, 0.7], [20, 0.6], [30, 0.551], [40, 0.521]]
    assert json.loads((export / "assets.json").read_text()) == {"digest": "abc"}
    assert (export / "curves_val_score.png").stat().st_size > 0
    assert not (export / "curves_selection.png").exists()  # the selection runs have no curves


def test_tier_b_tv_keeps_the_teachers_side_and_equals_exact_tv(tiny, monkeypatch):
    """The cached exact TV gives exact_tv's number bit for bit, and loads and runs the teacher once for any number
    of models."""
    import torch
    from transformers import AutoModelForCausalLM

    from amm_trl.evaluation import exact_tv
    from bench.tier_b import measure

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, 64, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (20,), generator=g)]
    answers = [torch.randint(6, 64, (int(n),), generator=g).tolist() for n in torch.randint(0, 5, (20,), generator=g)]
    monkeypatch.setattr(measure, "_TEACHER_LOGITS", {})
    loads, load = [], measure._load
    monkeypatch.setattr(measure, "_load", lambda path: loads.append(path) or load(path))
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    for _ in range(2):
        got = measure.FixedAnswersTV(tiny["teacher"], prompts, answers).tv(student)
        assert got == exact_tv(tiny["student"], tiny["teacher"], prompts, answers)
    assert loads == [tiny["teacher"]] and 0.0 < got < 1.0


def test_k_table_pairs_each_top_k_run_with_its_dense_run_on_the_same_seeds(tmp_path):
    """bench/tier_b/k_table.py: mass metrics averaged over the log (on and off pooled), metrics averaged over seeds,
    the difference to the dense run paired by seed (mean ± 95% t half-width; the mean alone for one seed)."""
    import suite as suite_module

    from bench.tier_b import k_table

    runs = [{"name": "fkl", "recipe": "r"}, {"name": "other", "recipe": "r"},
            {"name": "fkl_k8", "recipe": "r", "group": "ablation", "tune_as": "fkl",
             "args": {"teacher_local_top_k": 8}},
            {"name": "fkl_k32", "recipe": "r", "group": "ablation", "tune_as": "fkl", "seeds": [0],
             "args": {"teacher_local_top_k": 32}},
            {"name": "fkl_k8_taken", "recipe": "r", "group": "ablation", "tune_as": "fkl", "seeds": [0],
             "args": {"teacher_local_top_k": 8, "teacher_top_k_taken_bucket": True}}]
    suite = {"output_dir": str(tmp_path), "seeds": [0, 1, 2], "common": {}, "teacher": "t", "initial_student": "s",
             "runs": runs, "report": {"metrics": {"tv": ["TV", 1.0, 3, "min"]}}}
    values = {("fkl", 0): 0.40, ("fkl", 1): 0.42, ("fkl", 2): 0.44, ("other", 0): 0.9,
              ("fkl_k8", 0): 0.41, ("fkl_k8", 1): 0.44, ("fkl_k32", 0): 0.45, ("fkl_k8_taken", 0): 0.405}
    for run in suite_module.planned_runs(suite):
        if (run["name"], run["seed"]) in values:
            out = suite_module.run_dir(suite, run)
            suite_module._write_json(os.path.join(out, "result.json"), {"tv": values[run["name"], run["seed"]]})
            log = [{"step": 5, "teacher_mass/off": 0.8, "student_mass/off": 0.5}, {"step": 10, "loss": 1.0},
                   {"step": 10, "teacher_mass/on": 0.9, "overlap_ratio/on": 0.25}]
            suite_module._write_json(os.path.join(out, "train_log.json"), log)
    lines = k_table.table(suite).splitlines()
    assert lines[0] == ("| method | teacher | seeds | covered teacher mass | student mass on the top-k | overlap | "
                        "TV (Δ vs dense) |")
    # differences 0.01 and 0.02: mean 0.015, half-width t_{0.975,1} * 0.00707 / sqrt(2) = 12.706 * 0.005 = 0.064
    assert lines[2:] == ["| fkl | dense | 3 | 1 | - | - | 0.420 |",
                         "| fkl | top-32 + tail | 1 | 0.850 | 0.500 | 0.250 | 0.450 (+0.050) |",
                         "| fkl | top-8 + tail | 2 | 0.850 | 0.500 | 0.250 | 0.425 (+0.015 ± 0.064) |",
                         "| fkl | top-8 + taken + tail | 1 | 0.850 | 0.500 | 0.250 | 0.405 (+0.005) |"]


def test_degenerate_counts_answers_whose_tail_repeats_few_characters(tmp_path, capsys):
    """bench/tier_b/degenerate.py: an answer counts when its last 20 characters hold at most 3 distinct ones; a short
    answer, or a tail of 4 distinct characters, does not; the runs are named <method>/seed<k>; no predictions below the
    folder is an error naming it."""
    from bench.tier_b import degenerate

    answers = {"amm/seed0": ["1. 1000000000000000000000", "The capital is Paris." + " ok", "....", "abab" * 10],
               "fkl/seed1": ["abcd" * 5, "x" * 19, "Fine answer, ended. aaaaaaaaaaaaaaaaaaaa"]}
    for run, rows in answers.items():
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "predictions.jsonl").write_text(
            "".join(json.dumps({"prompt": "p", "prediction": a}) + "\n" for a in rows))
    assert degenerate.is_degenerate("1. 1000000000000000000000") and not degenerate.is_degenerate("x" * 19)
    assert not degenerate.is_degenerate("abcd" * 5) and degenerate.is_degenerate("abcd" * 5, distinct=4)
    counts = degenerate.main([str(tmp_path)])
    assert counts == {"amm/seed0": {"degenerate": 2, "answers": 4}, "fkl/seed1": {"degenerate": 1, "answers": 3}}
    assert json.loads(capsys.readouterr().out) == counts
    with pytest.raises(SystemExit, match="no <method>/seed<k>/eval/predictions.jsonl below it"):
        degenerate.main([str(tmp_path / "amm")])


# The recipes' `q_head_lr_multiplier` (quickstart, quickstart_pbkd) when every committed run trained (2026-11-23 to
# 2026-12-05); AMMConfig's default and the AMM recipes have since moved to 1.
RECIPE_CRITIC_RATE_THEN = 5.0
COMMITTED_SUITES = sorted(p for p in glob.glob(os.path.join(ROOT, "bench", "*", "*.yaml"))
                          if yaml.safe_load(open(p)).get("output_dir", "").startswith("docs/results/"))


def _critic_rate(argv: list[str], recipe_rate: float) -> tuple[str, float]:
    """The critic's rate an `amm-trl train` argv trains with: its own learning rate where set, else the multiplier of
    the student's (the recipe's where no flag sets it)."""
    flags = dict(zip(argv[2::2], argv[3::2]))
    if "--q_head_learning_rate" in flags:
        return "q_head_learning_rate", float(flags["--q_head_learning_rate"])
    return "q_head_lr_multiplier", float(flags.get("--q_head_lr_multiplier", recipe_rate))


@pytest.mark.parametrize("path", COMMITTED_SUITES, ids=os.path.basename)
def test_rerunning_a_finished_suite_trains_each_committed_run_at_the_critic_rate_it_recorded(path, monkeypatch):
    """A suite reruns (a fresh machine, a lost run) with the critic rate its committed runs had, though the recipes'
    rate moved: each AMM/PbKD run's argv planned now gives the rate its result.json's train_argv recorded."""
    import suite as suite_module

    monkeypatch.chdir(ROOT)  # output_dir is relative to the repository
    suite = suite_module.load_suite(path)
    checked, critics = 0, 0
    for run in suite_module.planned_runs(suite):
        if run["group"] == "reference":
            continue
        recipe = yaml.safe_load(open(os.path.join(ROOT, "amm_trl", "recipes", f"{run['recipe']}.yaml")))
        critics += recipe.get("objective") in ("amm", "pbkd")
        out = suite_module.run_dir(suite, run)
        if recipe.get("objective") not in ("amm", "pbkd") or not os.path.exists(os.path.join(out, "result.json")):
            continue
        with open(os.path.join(out, "result.json")) as f:
            recorded = json.load(f).get("train_argv")
        if not recorded:
            continue
        planned, learning_rate, _ = suite_module.as_trained(suite, run)
        now = suite_module.train_argv(suite, planned, out, learning_rate)
        assert now[:2] == recorded[:2], out
        assert _critic_rate(now, recipe["q_head_lr_multiplier"]) == _critic_rate(recorded, RECIPE_CRITIC_RATE_THEN), out
        checked += 1
    assert checked > 0 or critics == 0  # a suite without AMM or PbKD (the Tier B pilots) has nothing to check
