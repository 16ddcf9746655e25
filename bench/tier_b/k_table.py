"""What a top-k teacher keeps: each `teacher_local_top_k` ablation of a suite beside the dense run it varies (its
`tune_as`), from the committed run folders (result.json + train_log.json).

    python bench/tier_b/k_table.py bench/tier_b/tier_b.yaml

One row per method and k (and with `teacher_top_k_taken_bucket`, the taken token's own bucket): the training log's
teacher mass the top-k covers, the student's mass on it and their overlap (means over the logged steps, both data
kinds), the test metrics of the suite's `report:` block (mean over seeds), and
for each metric the paired difference to the dense run on the same seeds (mean ± 95% t half-width; the mean alone for
one seed).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "quality"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from suite import load_suite, planned_runs, run_dir  # noqa: E402

from bench.tier_a.report import _read, report_config  # noqa: E402
from bench.tier_a.stats import mean_ci, paired_difference  # noqa: E402

MASS_KEYS = ("teacher_mass", "student_mass", "overlap_ratio")  # logged by the top-k teacher (verl's names)
MASS_LABELS = ("covered teacher mass", "student mass on the top-k", "overlap")


def log_means(out: str) -> dict:
    """Mean of each top-k mass metric over the logged steps (`teacher_mass/on` and `/off` pooled)."""
    sums = {}
    for entry in _read(os.path.join(out, "train_log.json")) or []:
        for key, value in entry.items():
            name = key.split("/")[0]
            if name in MASS_KEYS:
                sums.setdefault(name, []).append(value)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def rows(suite: dict) -> list[dict]:
    """[{method, k, seeds, mass..., metric: {seed: value}}] for every dense run that has top-k ablations, dense first
    (k = 0), then by decreasing k."""
    runs = {}
    for run in planned_runs(suite):
        if run["group"] not in ("method", "ablation"):
            continue
        k = int(run.get("args", {}).get("teacher_local_top_k", 0))
        taken = bool(run.get("args", {}).get("teacher_top_k_taken_bucket", False))
        method = run.get("tune_as", run["name"]) if k else run["name"]
        result = _read(os.path.join(run_dir(suite, run), "result.json"))
        if result is None:
            continue
        row = runs.setdefault((method, k, taken), {"method": method, "k": k, "taken": taken, "results": {},
                                                   "mass": []})
        row["results"][run["seed"]] = result
        row["mass"].append(log_means(run_dir(suite, run)))
    varied = {m for m, k, _ in runs if k}
    keep = [r for (m, k, _), r in runs.items() if m in varied]
    return sorted(keep, key=lambda r: (r["method"], r["k"] != 0, -r["k"], r["taken"]))


def table(suite: dict) -> str:
    config = report_config(suite)
    metrics = config.metrics
    lines = ["| method | teacher | seeds | " + " | ".join(MASS_LABELS) + " | "
             + " | ".join(f"{q.label} (Δ vs dense)" for q in metrics.values()) + " |",
             "|---" * (3 + len(MASS_KEYS) + len(metrics)) + "|"]
    dense = {}
    for row in rows(suite):
        if row["k"] == 0:
            dense[row["method"]] = row
        label = "dense" if row["k"] == 0 else f"top-{row['k']}" + (" + taken" if row["taken"] else "") + " + tail"
        cells = [row["method"], label, str(len(row["results"]))]
        for key in MASS_KEYS:
            values = [m[key] for m in row["mass"] if key in m]
            if row["k"] == 0:  # the dense teacher: all of its mass, no top-k to be on
                cells.append("1" if key == "teacher_mass" else "-")
            else:
                cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        for metric, q in metrics.items():
            ours = {s: q.shown(r[metric]) for s, r in row["results"].items() if r.get(metric) is not None}
            if not ours:
                cells.append("-")
                continue
            mean = mean_ci(list(ours.values()))[0]
            cell = f"{mean:.{q.digits}f}"
            base = dense.get(row["method"])
            if row["k"] and base:
                theirs = {s: q.shown(r[metric]) for s, r in base["results"].items() if r.get(metric) is not None}
                if set(ours) & set(theirs):
                    d, h, _ = paired_difference(ours, theirs)
                    cell += f" ({d:+.{q.digits}f})" if math.isnan(h) else f" ({d:+.{q.digits}f} ± {h:.{q.digits}f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite YAML with teacher_local_top_k ablations (bench/tier_b/tier_b.yaml)")
    a = parser.parse_args(argv)
    print(table(load_suite(a.suite)))


if __name__ == "__main__":
    main()
