"""Tier A report: per-method means with 95% t intervals over seeds, the separation check, AMM's paired differences to
every baseline, the learning-rate selection, validation curves, and the per-seed JSON.

    python bench/tier_a/report.py bench/tier_a/tier_a.yaml [--export docs/results/tier_a] [--candidate amm]

Metrics (test split, bench/tier_a/measure.py): `score_sampled` = accuracy of temperature-1 samples (the primary
metric: the task has several correct answers and noisy references, so the distribution is what is distilled),
`score` = greedy accuracy, `quality` = teacher's mean token log-prob of the student's samples, `coverage` = student's
mean token log-prob of the teacher's samples. Separation check (before any judgement): on each metric, the teacher,
SFT and FKL must lie outside each other's 95% intervals (the teacher is one deterministic model: a point).

Another suite names its own metrics in an optional `report:` block (without one, the Tier A metrics above):

    report:
      metrics:            # result key: [label, scale, digits, direction]: shown as value x scale; max = higher
                          # is better, min = lower
        tv_teacher_greedy: [exact TV, 1.0, 4, min]
        rougeL: [ROUGE-L, 1.0, 2, max]
      primary: tv_teacher_greedy   # the sign test's metric and the separation verdict (default: the first metric)
      curves: {val/tv: [exact TV, 1.0, 4, min]}   # train_log.json key: [label, scale, digits, direction]; a panel each
      flat_below: 0.005   # a last-quarter change of the first curve below this (x its scale) counts as flat
      title: ...          # optional: the curves figure's title

A curve `val/<metric>` gets the teacher's test value of `<metric>` as a reference line where the teacher has one.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "quality"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from suite import candidates, load_suite, planned_runs, run_dir, selection  # noqa: E402

from bench.tier_a.stats import disjoint, mean_ci, paired_difference, sign_test  # noqa: E402


@dataclass(frozen=True)
class Quantity:
    """How one number is shown: its label, the factor it is shown multiplied by, its digits, and whether higher
    (`max`) or lower (`min`) is better."""
    label: str
    scale: float = 1.0
    digits: int = 3
    direction: str = "max"

    def shown(self, value: float) -> float:
        return value * self.scale


@dataclass(frozen=True)
class ReportConfig:
    """The metrics of the tables, the primary one (sign test, separation verdict), the training-log curves (the first
    one is the flattening table's), the flatness threshold (in the first curve's shown units) and the plot's title."""
    metrics: dict
    primary: str
    curves: dict
    flat_below: float
    title: str


METRICS = {"score_sampled": Quantity("sampled acc", 100.0, 1), "score": Quantity("greedy acc", 100.0, 1),
           "quality": Quantity("quality", 1.0, 3), "coverage": Quantity("coverage", 1.0, 3)}
PRIMARY = "score_sampled"
TIER_A = ReportConfig(metrics=METRICS, primary=PRIMARY,
                      curves={"val/score_sampled": Quantity("sampled accuracy", 100.0, 1),
                              "val/score": Quantity("greedy accuracy", 100.0, 1)},
                      flat_below=1.0, title="Tier A: validation accuracy during training")


def _quantity(name: str, spec) -> Quantity:
    """`[label, scale, digits, direction]` (trailing items optional) or a bare label."""
    values = [spec] if isinstance(spec, str) else list(spec)
    if not 1 <= len(values) <= 4:
        raise ValueError(f"report: {name}: {spec!r}: use [label, scale, digits, direction].")
    quantity = Quantity(str(values[0]), *[t(v) for t, v in zip((float, int, str), values[1:])])
    if quantity.direction not in ("max", "min"):
        raise ValueError(f"report: {name}: direction {quantity.direction!r}: use max (higher is better) or min.")
    return quantity


def report_config(suite: dict) -> ReportConfig:
    """The suite's `report:` block over the Tier A defaults (a key it leaves out keeps Tier A's; `primary` defaults
    to its first metric when it names metrics)."""
    block = suite.get("report")
    if not block:
        return TIER_A
    unknown = set(block) - {"metrics", "primary", "curves", "flat_below", "title"}
    if unknown:
        raise KeyError(f"report: unknown keys {sorted(unknown)}.")
    metrics = {k: _quantity(k, v) for k, v in block["metrics"].items()} if "metrics" in block else TIER_A.metrics
    primary = block.get("primary", next(iter(metrics)) if "metrics" in block else TIER_A.primary)
    if primary not in metrics:
        raise KeyError(f"report: primary {primary!r} is not one of the metrics {list(metrics)}.")
    curves = {k: _quantity(k, v) for k, v in block["curves"].items()} if "curves" in block else TIER_A.curves
    title = block.get("title", "Validation curves during training" if "curves" in block else TIER_A.title)
    return ReportConfig(metrics, primary, curves, float(block.get("flat_below", TIER_A.flat_below)), title)


def _select_quantity(suite: dict, config: ReportConfig) -> tuple[str, Quantity]:
    """The selection metric and how it is shown (its own entry, else unscaled with the selection's direction)."""
    select = suite["select"]
    metric = select.get("metric", "score")
    return metric, config.metrics.get(metric) or Quantity(metric, 1.0, 4, select.get("mode", "max"))


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def val_curve(out: str, keys: tuple = tuple(TIER_A.curves)) -> list[list[float]]:
    """[[step, value of each curve key...], ...] on the validation split, from the training log (the entries that hold
    every key; Tier A: sampled and greedy accuracy)."""
    log = _read(os.path.join(out, "train_log.json")) or []
    return [[e["step"], *(e[k] for k in keys)] for e in log if all(k in e for k in keys)]


def collect(suite: dict, config: ReportConfig = TIER_A) -> tuple[dict, dict, dict]:
    """(reference results by name, test records by method {seed: record}, selection records by method)."""
    refs, tests, selects = {}, {}, {}
    keys = tuple(config.curves)
    for run in planned_runs(suite):
        out = run_dir(suite, run)
        result = _read(os.path.join(out, "result.json"))
        if result is None:
            continue
        keep = {k: result.get(k) for k in ("seed", "learning_rate", "train_seconds", "eval_seconds", "candidate",
                                           "trial_args", "cpu", *config.metrics)}
        if run["group"] == "select":
            keep["candidate"] = run["candidate"]
        if run["group"] == "reference":
            refs[run["name"]] = keep
        elif run["group"] == "select":
            selects.setdefault(run["name"], []).append({**keep, "val_curve": val_curve(out, keys)})
        else:
            tests.setdefault(run["name"], {})[run["seed"]] = {**keep, "group": run["group"],
                                                              "val_curve": val_curve(out, keys)}
    return refs, tests, selects


def _cell(values: list[float], metric: str, config: ReportConfig = TIER_A) -> str:
    """Mean ± 95% t half-width of the shown values (the mean alone for one value; `-` for none)."""
    q = config.metrics[metric]
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, half = mean_ci([q.shown(v) for v in values])
    return f"{mean:.{q.digits}f}" if math.isnan(half) else f"{mean:.{q.digits}f} ± {half:.{q.digits}f}"


def method_table(refs: dict, tests: dict, config: ReportConfig = TIER_A) -> str:
    """One row per reference model and per method (ablations included): each metric's mean ± 95% t half-width over
    the seeds, the learning rate, the number of seeds and the mean training seconds."""
    metrics = config.metrics
    head = "| method | lr | seeds | " + " | ".join(metrics[m].label for m in metrics) + " | train s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in refs.items():
        cells = [_cell([r[m]], m, config) if r.get(m) is not None else "-" for m in metrics]
        lines.append(f"| {name} | - | - | " + " | ".join(cells) + " | - |")
    for name, by_seed in tests.items():
        rows = list(by_seed.values())
        cells = [_cell([r.get(m) for r in rows], m, config) for m in metrics]
        seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
        lr = rows[0].get("learning_rate")
        lines.append(f"| {name} | {'-' if lr is None else format(lr, 'g')} | {len(rows)} | " + " | ".join(cells) +
                     f" | {sum(seconds) / max(len(seconds), 1):.0f} |")
    return "\n".join(lines)


def _by_seed(by_seed: dict, metric: str, q: Quantity) -> dict:
    """{seed: shown value} of one metric, seeds without it left out."""
    return {s: q.shown(r[metric]) for s, r in by_seed.items() if r.get(metric) is not None}


def separation(refs: dict, tests: dict, config: ReportConfig = TIER_A) -> tuple[str, dict]:
    """Per metric: do teacher, SFT and FKL lie outside each other's 95% intervals?"""
    verdicts, lines = {}, ["| metric | teacher | sft | fkl | fkl - sft (paired) | verdict |",
                           "|---|---|---|---|---|---|"]
    if "teacher" not in refs or "sft" not in tests or "fkl" not in tests:
        return "separation check: needs the teacher, sft and fkl results", {}
    for metric, q in config.metrics.items():
        digits = q.digits
        sft_values, fkl_values = _by_seed(tests["sft"], metric, q), _by_seed(tests["fkl"], metric, q)
        if refs["teacher"].get(metric) is None or not sft_values or not fkl_values:
            verdicts[metric] = "FAIL"
            lines.append(f"| {q.label} | - | - | - | - | FAIL (missing values) |")
            continue
        teacher = (q.shown(refs["teacher"][metric]), 0.0)
        sft = mean_ci(list(sft_values.values()))
        fkl = mean_ci(list(fkl_values.values()))
        ok = all(not math.isnan(h) for _, h in (sft, fkl)) and disjoint(teacher, sft) and disjoint(
            teacher, fkl) and disjoint(sft, fkl)
        d, h, n = paired_difference(fkl_values, sft_values)
        verdicts[metric] = "PASS" if ok else "FAIL"
        lines.append(f"| {q.label} | {teacher[0]:.{digits}f} | {sft[0]:.{digits}f} ± {sft[1]:.{digits}f} | "
                     f"{fkl[0]:.{digits}f} ± {fkl[1]:.{digits}f} | {d:+.{digits}f} ± {h:.{digits}f} (n={n}) | "
                     f"{verdicts[metric]} |")
    return "\n".join(lines), verdicts


def paired_table(tests: dict, candidate: str, config: ReportConfig = TIER_A) -> str:
    """candidate - baseline per seed, mean ± 95% half-width (one common seed: the difference and `(n=1)`); `>0` /
    `<0` (the arithmetic sign of the difference) where the interval excludes zero; then the exact sign test on the
    primary metric (wins-losses-ties over the seeds, two-sided p; a win is a seed where the candidate is better:
    higher, or lower for a `min` metric)."""
    if candidate not in tests:
        return f"no finished {candidate!r} runs"
    metrics, primary = config.metrics, config.metrics[config.primary]
    lines = [f"| {candidate} − baseline | " + " | ".join(metrics[m].label for m in metrics) + " | sign test |",
             "|---" * (len(metrics) + 2) + "|"]
    better = 1.0 if primary.direction == "max" else -1.0
    for name, by_seed in tests.items():
        if name == candidate:
            continue
        cells = []
        for metric, q in metrics.items():
            ours, theirs = _by_seed(tests[candidate], metric, q), _by_seed(by_seed, metric, q)
            if not set(ours) & set(theirs):
                cells.append("-")
                continue
            d, h, n = paired_difference(ours, theirs)
            if math.isnan(h):  # one common seed: a difference, no interval
                cells.append(f"{d:+.{q.digits}f} (n={n})")
                continue
            sign = "" if abs(d) <= h else (" (>0)" if d > 0 else " (<0)")
            cells.append(f"{d:+.{q.digits}f} ± {h:.{q.digits}f}{sign}")
        ours = {s: better * r[config.primary] for s, r in tests[candidate].items()
                if r.get(config.primary) is not None}
        theirs = {s: better * r[config.primary] for s, r in by_seed.items() if r.get(config.primary) is not None}
        if set(ours) & set(theirs):
            test = sign_test(ours, theirs)
            cells.append(f"{test['wins']}-{test['losses']}-{test['ties']}, p={test['p']:.3g}")
        else:
            cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lower = "" if primary.direction == "max" else " (lower is better)"
    lines.append(f"(sign test on {primary.label}{lower}: seeds where {candidate} is ahead-behind-level. Read the rows "
                 f"as {len(lines) - 2} comparisons: at the 5% level about one in twenty intervals excludes zero by "
                 f"chance; Bonferroni over them asks p < {0.05 / max(len(lines) - 2, 1):.3g}.)")
    return "\n".join(lines)


def against_table(tests: dict, candidate: str, against: list[str], config: ReportConfig = TIER_A) -> str:
    """The candidate's primary metric against another metric of each baseline that has it, paired by seed (e.g. AMM's
    temperature-1 sampled accuracy against reverse KL's at T = 0.85: `--against score_sampled_t0.85`), mean ± 95%
    half-width and the exact sign test; both shown on the primary metric's scale."""
    q = config.metrics[config.primary]
    better = 1.0 if q.direction == "max" else -1.0
    ours = _by_seed(tests.get(candidate, {}), config.primary, q)
    lines = [f"| {candidate} {q.label} − baseline's | difference | sign test |", "|---|---|---|"]
    for metric in against:
        for name, by_seed in tests.items():
            theirs = _by_seed(by_seed, metric, q)
            if name == candidate or not set(ours) & set(theirs):
                continue
            d, h, n = paired_difference(ours, theirs)
            test = sign_test({s: better * v for s, v in ours.items()}, {s: better * v for s, v in theirs.items()})
            lines.append(f"| {name} {metric} | {d:+.{q.digits}f} ± {h:.{q.digits}f} (n={n}) | "
                         f"{test['wins']}-{test['losses']}-{test['ties']}, p={test['p']:.3g} |")
    return "\n".join(lines)


def flattening_table(tests: dict, config: ReportConfig = TIER_A) -> str:
    """Whether each method's validation curve has flattened: the change of its first curve (Tier A: sampled accuracy)
    over the last quarter of training (last point minus the point at 3/4 of the steps, x the curve's scale), mean ±
    95% t half-width over the test seeds; `flat` when the interval holds zero or |change| is below `flat_below`
    (Tier A: 1 point)."""
    q = next(iter(config.curves.values()))
    what = "gain" if q.direction == "max" else "change"
    unit = " (points)" if q.scale == 100.0 else ""
    lines = [f"| method | steps | last-quarter {what}{unit} | |", "|---|---|---|---|"]
    for name, by_seed in tests.items():
        gains, last_step = [], None
        for r in by_seed.values():
            curve = r.get("val_curve") or []
            if len(curve) < 2:
                continue
            last_step = curve[-1][0]
            quarter = min(curve, key=lambda c: abs(c[0] - 0.75 * last_step))
            gains.append(q.scale * (curve[-1][1] - quarter[1]))
        if not gains:
            continue
        mean, half = mean_ci(gains)
        flat = abs(mean) < config.flat_below or (not math.isnan(half) and abs(mean) <= half)
        lines.append(f"| {name} | {last_step} | {mean:+.{q.digits}f}" +
                     ("" if math.isnan(half) else f" ± {half:.{q.digits}f}") +
                     f" | {'flat' if flat else 'STILL CHANGING'} |")
    return "\n".join(lines)


def selection_table(suite: dict, selects: dict, config: ReportConfig = TIER_A) -> str:
    """Each method's mean validation value of the selection metric (x its scale) per learning rate, and the chosen
    learning rate."""
    if any(r.get("trials") for r in suite["runs"]):
        return trials_table(suite, selects, config)
    metric, q = _select_quantity(suite, config)
    grid = sorted({lr for r in suite["runs"] if r["name"] in selects  # the grid and any rate beyond its edges
                   for _, lr, _ in candidates(suite, r)} | set(suite["select"]["learning_rates"]))
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |", "|---" * (len(grid) + 2) + "|"]
    for name, rows in selects.items():
        chosen = selection(suite, name)["learning_rate"]
        cells = []
        for lr in grid:
            values = [q.shown(r[metric]) for r in rows if r["learning_rate"] == lr and r.get(metric) is not None]
            cells.append(f"{sum(values) / len(values):.{q.digits}f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen if chosen is None else format(chosen, 'g')} |")
    return "\n".join(lines)


def trials_table(suite: dict, selects: dict, config: ReportConfig = TIER_A) -> str:
    """Each method's validation candidates (its trials x learning rates) with their scores, and the chosen one."""
    metric, q = _select_quantity(suite, config)
    shown = "%" if q.scale == 100.0 else q.label
    lines = ["| method | candidates | validation " + shown + " by candidate | chosen |", "|---|---|---|---|"]
    for name, rows in selects.items():
        chosen = selection(suite, name)
        run = next(r for r in suite["runs"] if r["name"] == name)
        trials = run.get("trials") or []
        cells, by_candidate = [], {}
        for row in sorted(rows, key=lambda r: (r["candidate"], r.get("seed") or 0)):
            by_candidate.setdefault(row["candidate"], []).append(row)
        for candidate, seeds in by_candidate.items():  # the mean over the selection seeds, then each seed's value
            index = int(candidate[1:].split("-")[0]) if candidate.startswith("t") else None
            knobs = {k: v for k, v in (trials[index] if index is not None else {}).items() if k != "learning_rate"}
            label = ", ".join(f"{k}={v}" for k, v in knobs.items()) + f" lr={seeds[0]['learning_rate']:g}"
            values = [q.shown(r[metric]) for r in seeds if r.get(metric) is not None]
            value = "-" if not values else f"{sum(values) / len(values):.{q.digits}f}"
            if len(values) > 1:
                value += " (" + ", ".join(f"{v:.{q.digits}f}" for v in values) + ")"
            cells.append(f"{label.strip(', ')}: {value}")
        lines.append(f"| {name} | {len(by_candidate)} | " + "; ".join(cells) + f" | {chosen['candidate']} |")
    return "\n".join(lines)


def _unit(q: Quantity) -> str:
    return " (%)" if q.scale == 100.0 else ""


def plot_curves(tests: dict, selects: dict, refs: dict, out_dir: str, config: ReportConfig = TIER_A) -> list[str]:
    """curves_val_score.png: one panel per curve key, each method's mean over its test seeds, the teacher's test value
    of `<metric>` as a line on a `val/<metric>` panel where the teacher has one; curves_selection.png: the selection
    runs' first curve, one panel per method (skipped when no selection run has a curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    keys = list(config.curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), sharex=True, squeeze=False)
    for column, (ax, key) in enumerate(zip(axes[0], keys), start=1):
        q = config.curves[key]
        for index, (name, by_seed) in enumerate(tests.items()):
            curves = [r["val_curve"] for r in by_seed.values() if r.get("val_curve")]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [c[0] for c in curves[0][:length]]
            means = [q.shown(sum(c[i][column] for c in curves) / len(curves)) for i in range(length)]
            ax.plot(steps, means, label=name, color=plt.cm.tab20(index % 20),  # one color per method
                    linestyle="-" if name.startswith(("amm", "pbkd")) else "--")
        reference = (refs.get("teacher") or {}).get(key.removeprefix("val/"))
        if reference is not None:
            ax.axhline(q.shown(reference), color="k", lw=0.8, label="teacher (test)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {q.label}{_unit(q)}")
        ax.set_title(f"{q.label}, mean over test seeds")
    axes[0][0].legend(fontsize=7, ncol=3)
    fig.suptitle(config.title)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "curves_val_score.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    names = [name for name, rows in selects.items() if any(r.get("val_curve") for r in rows)]
    if names:
        q = next(iter(config.curves.values()))
        cols = 4
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
        for ax, name in zip(axes.flat, names):
            for r in sorted(selects[name], key=lambda r: r["learning_rate"]):
                if r["val_curve"]:
                    ax.plot([c[0] for c in r["val_curve"]], [q.shown(c[1]) for c in r["val_curve"]],
                            label=f"lr {r['learning_rate']:g}")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=6)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        fig.suptitle(f"Learning-rate selection: validation {q.label}{_unit(q)} vs step, seed 0")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "curves_selection.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def export(suite: dict, refs: dict, tests: dict, selects: dict, text: str, out_dir: str) -> None:
    """Per-seed JSON (one file per method, plus references and the learning-rate selection), the assets' manifest
    (from the suite's `assets_dir`, else `<output_dir>/assets`), and the markdown report, so the tables can be
    recomputed from the committed files."""
    os.makedirs(out_dir, exist_ok=True)
    files = {f"{name}.json": {"method": name, "seeds": {str(s): r for s, r in sorted(by_seed.items())}}
             for name, by_seed in tests.items()}
    files["references.json"] = refs
    files["selection.json"] = selects
    assets_dir = suite.get("assets_dir") or os.path.join(suite["output_dir"], "assets")
    manifest = _read(os.path.join(assets_dir, "manifest.json"))
    if manifest is not None:
        files["assets.json"] = manifest
    for name, obj in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text + "\n")


def machine_counts(refs: dict, tests: dict, selects: dict) -> dict:
    """{CPU kind: number of finished runs} over every record that names its CPU (amm_trl.cli.cpu_kind)."""
    records = [*refs.values(), *(r for by_seed in tests.values() for r in by_seed.values()),
               *(r for rows in selects.values() for r in rows)]
    counts: dict = {}
    for r in records:
        if r.get("cpu"):
            counts[r["cpu"]] = counts.get(r["cpu"], 0) + 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--candidate", default="amm", help="method whose paired differences are shown")
    parser.add_argument("--export", help="folder for per-seed JSON, report.md and the PNG curves")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--against", nargs="*", default=[], help="other metrics of the baselines to pair the "
                        "candidate's primary metric with (e.g. score_sampled_t0.85)")
    a = parser.parse_args(argv)
    suite = load_suite(a.suite)
    config = report_config(suite)
    refs, tests, selects = collect(suite, config)
    sep, verdicts = separation(refs, tests, config)
    parts = ["## Methods (test split; mean ± 95% t half-width over seeds)", method_table(refs, tests, config),
             "## Separation check (teacher, SFT, FKL outside each other's 95% intervals)", sep]
    if verdicts:
        parts.append(f"separation on the primary metric ({config.primary}): {verdicts[config.primary]}; "
                     + ", ".join(f"{m}: {v}" for m, v in verdicts.items()))
    curve = next(iter(config.curves.values()))
    parts += [f"## Paired differences ({a.candidate} − baseline, same seed; mean ± 95% t half-width)",
              paired_table(tests, a.candidate, config),
              *([f"## {a.candidate}'s {config.metrics[config.primary].label} against other metrics of the baselines",
                 against_table(tests, a.candidate, a.against, config)] if a.against else []),
              f"## Have the curves flattened? (validation {curve.label}, last quarter of training)",
              flattening_table(tests, config)]
    machines = machine_counts(refs, tests, selects)
    if machines:
        parts += ["## Machines (runs per CPU kind; results before this record were not labelled)",
                  "; ".join(f"{cpu}: {n}" for cpu, n in machines.items())]
    if suite.get("select"):
        metric, q = _select_quantity(suite, config)
        parts += [f"## Selection (validation {q.label}{' %' if q.scale == 100.0 else ''}, seed(s) "
                  f"{suite['select']['seeds']}; ties go to the first candidate)",
                  selection_table(suite, selects, config)]
    text = "\n\n".join(parts)
    print(text)
    out_dir = a.export or suite["output_dir"]
    if a.export:
        export(suite, refs, tests, selects, text, a.export)
    if not a.no_plots:
        os.makedirs(out_dir, exist_ok=True)
        for path in plot_curves(tests, selects, refs, out_dir, config):
            print(f"wrote {path}")
    if verdicts:
        print(f"SEPARATION {verdicts[config.primary]}")
    return verdicts


if __name__ == "__main__":
    main()
