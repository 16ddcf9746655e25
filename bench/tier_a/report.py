"""Tier A report: per-method means with 95% t intervals over seeds, the separation check, AMM's paired differences to
every baseline, the learning-rate selection, validation curves, and the per-seed JSON.

    python bench/tier_a/report.py bench/tier_a/tier_a.yaml [--export docs/results/tier_a] [--candidate amm]

Metrics (test split, bench/tier_a/measure.py): `score_sampled` = accuracy of temperature-1 samples (the primary
metric: the task has several correct answers and noisy references, so the distribution is what is distilled),
`score` = greedy accuracy, `quality` = teacher's mean token log-prob of the student's samples, `coverage` = student's
mean token log-prob of the teacher's samples. Separation check (before any judgement): on each metric, the teacher,
SFT and FKL must lie outside each other's 95% intervals (the teacher is one deterministic model: a point).
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "quality"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from suite import load_suite, planned_runs, run_dir, selection  # noqa: E402

from bench.tier_a.stats import disjoint, mean_ci, paired_difference, sign_test  # noqa: E402

METRICS = {"score_sampled": ("sampled acc", 100.0, 1), "score": ("greedy acc", 100.0, 1),
           "quality": ("quality", 1.0, 3), "coverage": ("coverage", 1.0, 3)}
PRIMARY = "score_sampled"


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def val_curve(out: str) -> list[list[float]]:
    """[[step, sampled accuracy, greedy accuracy], ...] on the validation split, from the training log."""
    log = _read(os.path.join(out, "train_log.json")) or []
    return [[e["step"], e["val/score_sampled"], e["val/score"]] for e in log if "val/score" in e]


def collect(suite: dict) -> tuple[dict, dict, dict]:
    """(reference results by name, test records by method {seed: record}, selection records by method)."""
    refs, tests, selects = {}, {}, {}
    for run in planned_runs(suite):
        out = run_dir(suite, run)
        result = _read(os.path.join(out, "result.json"))
        if result is None:
            continue
        keep = {k: result.get(k) for k in ("seed", "learning_rate", "train_seconds", "eval_seconds", "candidate",
                                           "trial_args", *METRICS)}
        if run["group"] == "select":
            keep["candidate"] = run["candidate"]
        if run["group"] == "reference":
            refs[run["name"]] = keep
        elif run["group"] == "select":
            selects.setdefault(run["name"], []).append({**keep, "val_curve": val_curve(out)})
        else:
            tests.setdefault(run["name"], {})[run["seed"]] = {**keep, "group": run["group"],
                                                              "val_curve": val_curve(out)}
    return refs, tests, selects


def _cell(values: list[float], metric: str) -> str:
    _, scale, digits = METRICS[metric]
    mean, half = mean_ci([v * scale for v in values])
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def method_table(refs: dict, tests: dict) -> str:
    head = "| method | lr | seeds | " + " | ".join(METRICS[m][0] for m in METRICS) + " | train s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in refs.items():
        cells = [_cell([r[m]], m) if r.get(m) is not None else "-" for m in METRICS]
        lines.append(f"| {name} | - | - | " + " | ".join(cells) + " | - |")
    for name, by_seed in tests.items():
        rows = list(by_seed.values())
        cells = [_cell([r[m] for r in rows], m) for m in METRICS]
        seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
        lr = rows[0].get("learning_rate")
        lines.append(f"| {name} | {lr:g} | {len(rows)} | " + " | ".join(cells) +
                     f" | {sum(seconds) / max(len(seconds), 1):.0f} |")
    return "\n".join(lines)


def separation(refs: dict, tests: dict) -> tuple[str, dict]:
    """Per metric: do teacher, SFT and FKL lie outside each other's 95% intervals?"""
    verdicts, lines = {}, ["| metric | teacher | sft | fkl | fkl - sft (paired) | verdict |", "|---|---|---|---|---|---|"]
    if "teacher" not in refs or "sft" not in tests or "fkl" not in tests:
        return "separation check: needs the teacher, sft and fkl results", {}
    for metric, (label, scale, digits) in METRICS.items():
        teacher = (refs["teacher"][metric] * scale, 0.0)
        sft = mean_ci([r[metric] * scale for r in tests["sft"].values()])
        fkl = mean_ci([r[metric] * scale for r in tests["fkl"].values()])
        ok = all(not math.isnan(h) for _, h in (sft, fkl)) and disjoint(teacher, sft) and disjoint(
            teacher, fkl) and disjoint(sft, fkl)
        d, h, n = paired_difference({s: r[metric] * scale for s, r in tests["fkl"].items()},
                                    {s: r[metric] * scale for s, r in tests["sft"].items()})
        verdicts[metric] = "PASS" if ok else "FAIL"
        lines.append(f"| {label} | {teacher[0]:.{digits}f} | {sft[0]:.{digits}f} ± {sft[1]:.{digits}f} | "
                     f"{fkl[0]:.{digits}f} ± {fkl[1]:.{digits}f} | {d:+.{digits}f} ± {h:.{digits}f} (n={n}) | "
                     f"{verdicts[metric]} |")
    return "\n".join(lines), verdicts


def paired_table(tests: dict, candidate: str) -> str:
    """candidate - baseline per seed, mean ± 95% half-width; `>0` / `<0` where the interval excludes zero; then the
    exact sign test on the primary metric (wins-losses-ties over the seeds, two-sided p)."""
    if candidate not in tests:
        return f"no finished {candidate!r} runs"
    lines = [f"| {candidate} − baseline | " + " | ".join(METRICS[m][0] for m in METRICS) + " | sign test |",
             "|---" * (len(METRICS) + 2) + "|"]
    for name, by_seed in tests.items():
        if name == candidate:
            continue
        cells = []
        for metric, (_, scale, digits) in METRICS.items():
            d, h, n = paired_difference({s: r[metric] * scale for s, r in tests[candidate].items()},
                                        {s: r[metric] * scale for s, r in by_seed.items()})
            sign = "" if math.isnan(h) or abs(d) <= h else (" (>0)" if d > 0 else " (<0)")
            cells.append(f"{d:+.{digits}f} ± {h:.{digits}f}{sign}")
        test = sign_test({s: r[PRIMARY] for s, r in tests[candidate].items()},
                         {s: r[PRIMARY] for s, r in by_seed.items()})
        cells.append(f"{test['wins']}-{test['losses']}-{test['ties']}, p={test['p']:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"(sign test on {METRICS[PRIMARY][0]}: seeds where {candidate} is ahead-behind-level. Read the rows "
                 f"as {len(lines) - 2} comparisons: at the 5% level about one in twenty intervals excludes zero by "
                 f"chance; Bonferroni over them asks p < {0.05 / max(len(lines) - 2, 1):.3g}.)")
    return "\n".join(lines)


def flattening_table(tests: dict) -> str:
    """Whether each method's validation curve has flattened: the gain of its sampled accuracy over the last quarter
    of training (last point minus the point at 3/4 of the steps), mean ± 95% t half-width over the test seeds;
    `flat` when the interval holds zero or the gain is below 1 point."""
    lines = ["| method | steps | last-quarter gain (points) | |", "|---|---|---|---|"]
    for name, by_seed in tests.items():
        gains, last_step = [], None
        for r in by_seed.values():
            curve = r.get("val_curve") or []
            if len(curve) < 2:
                continue
            last_step = curve[-1][0]
            quarter = min(curve, key=lambda c: abs(c[0] - 0.75 * last_step))
            gains.append(100 * (curve[-1][1] - quarter[1]))
        if not gains:
            continue
        mean, half = mean_ci(gains)
        flat = abs(mean) < 1.0 or (not math.isnan(half) and abs(mean) <= half)
        lines.append(f"| {name} | {last_step} | {mean:+.1f}" + ("" if math.isnan(half) else f" ± {half:.1f}") +
                     f" | {'flat' if flat else 'STILL CHANGING'} |")
    return "\n".join(lines)


def selection_table(suite: dict, selects: dict) -> str:
    if any(r.get("trials") for r in suite["runs"]):
        return trials_table(suite, selects)
    grid = suite["select"]["learning_rates"]
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |", "|---" * (len(grid) + 2) + "|"]
    for name, rows in selects.items():
        chosen = selection(suite, name)["learning_rate"]
        cells = []
        for lr in grid:
            values = [r[suite["select"].get("metric", "score")] * 100 for r in rows if r["learning_rate"] == lr]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen if chosen is None else format(chosen, 'g')} |")
    return "\n".join(lines)


def trials_table(suite: dict, selects: dict) -> str:
    """Each method's validation candidates (its trials x learning rates) with their scores, and the chosen one."""
    metric = suite["select"].get("metric", "score")
    lines = ["| method | candidates | validation % by candidate | chosen |", "|---|---|---|---|"]
    for name, rows in selects.items():
        chosen = selection(suite, name)
        run = next(r for r in suite["runs"] if r["name"] == name)
        trials = run.get("trials") or []
        cells = []
        for row in sorted(rows, key=lambda r: r["candidate"]):
            index = int(row["candidate"][1:].split("-")[0]) if row["candidate"].startswith("t") else None
            knobs = {k: v for k, v in (trials[index] if index is not None else {}).items() if k != "learning_rate"}
            label = ", ".join(f"{k}={v}" for k, v in knobs.items()) + f" lr={row['learning_rate']:g}"
            cells.append(f"{label.strip(', ')}: {100 * row[metric]:.1f}")
        lines.append(f"| {name} | {len(rows)} | " + "; ".join(cells) + f" | {chosen['candidate']} |")
    return "\n".join(lines)


def plot_curves(tests: dict, selects: dict, refs: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for column, (ax, label) in enumerate(zip(axes, ("sampled accuracy (T=1)", "greedy accuracy")), start=1):
        for index, (name, by_seed) in enumerate(tests.items()):
            curves = [r["val_curve"] for r in by_seed.values() if r["val_curve"]]
            if not curves:
                continue
            steps = [c[0] for c in curves[0]]
            means = [100 * sum(c[i][column] for c in curves) / len(curves) for i in range(len(steps))]
            ax.plot(steps, means, label=name, color=plt.cm.tab20(index % 20),  # one color per method
                    linestyle="-" if name.startswith(("amm", "pbkd")) else "--")
        if "teacher" in refs:
            ax.axhline(100 * refs["teacher"]["score_sampled" if column == 1 else "score"], color="k", lw=0.8,
                       label="teacher (test)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {label} (%)")
        ax.set_title(f"{label}, mean over test seeds")
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle("Tier A: validation accuracy during training")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "curves_val_score.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    names = list(selects)
    if names:
        cols = 4
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
        for ax, name in zip(axes.flat, names):
            for r in sorted(selects[name], key=lambda r: r["learning_rate"]):
                if r["val_curve"]:
                    ax.plot([c[0] for c in r["val_curve"]], [100 * c[1] for c in r["val_curve"]],
                            label=f"lr {r['learning_rate']:g}")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=6)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        fig.suptitle("Learning-rate selection: validation sampled accuracy (%) vs step, seed 0")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "curves_selection.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def export(suite: dict, refs: dict, tests: dict, selects: dict, text: str, out_dir: str) -> None:
    """Per-seed JSON (one file per method, plus references and the learning-rate selection), the assets' manifest,
    and the markdown report, so the tables can be recomputed from the committed files."""
    os.makedirs(out_dir, exist_ok=True)
    files = {f"{name}.json": {"method": name, "seeds": {str(s): r for s, r in sorted(by_seed.items())}}
             for name, by_seed in tests.items()}
    files["references.json"] = refs
    files["selection.json"] = selects
    manifest = _read(os.path.join(suite["output_dir"], "assets", "manifest.json"))
    if manifest is not None:
        files["assets.json"] = manifest
    for name, obj in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--candidate", default="amm", help="method whose paired differences are shown")
    parser.add_argument("--export", help="folder for per-seed JSON, report.md and the PNG curves")
    parser.add_argument("--no_plots", action="store_true")
    a = parser.parse_args(argv)
    suite = load_suite(a.suite)
    refs, tests, selects = collect(suite)
    sep, verdicts = separation(refs, tests)
    parts = ["## Methods (test split; mean ± 95% t half-width over seeds)", method_table(refs, tests),
             "## Separation check (teacher, SFT, FKL outside each other's 95% intervals)", sep]
    if verdicts:
        parts.append(f"separation on the primary metric ({PRIMARY}): {verdicts[PRIMARY]}; "
                     + ", ".join(f"{m}: {v}" for m, v in verdicts.items()))
    parts += [f"## Paired differences ({a.candidate} − baseline, same seed; mean ± 95% t half-width)",
              paired_table(tests, a.candidate),
              "## Have the curves flattened? (validation sampled accuracy, last quarter of training)",
              flattening_table(tests)]
    if suite.get("select"):
        metric = suite["select"].get("metric", "score")
        parts += [f"## Selection (validation {METRICS[metric][0]} %, seed(s) {suite['select']['seeds']}; ties go to "
                  f"the first candidate)", selection_table(suite, selects)]
    text = "\n\n".join(parts)
    print(text)
    out_dir = a.export or suite["output_dir"]
    if a.export:
        export(suite, refs, tests, selects, text, a.export)
    if not a.no_plots:
        os.makedirs(out_dir, exist_ok=True)
        for path in plot_curves(tests, selects, refs, out_dir):
            print(f"wrote {path}")
    if verdicts:
        print(f"SEPARATION {verdicts[PRIMARY]}")
    return verdicts


if __name__ == "__main__":
    main()
