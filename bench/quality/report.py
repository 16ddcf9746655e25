"""Tables and training-curve plots of a quality suite run by bench/quality/suite.py.

    python bench/quality/report.py bench/quality/alpaca.yaml [--metric rougeL]

Prints a markdown table (mean and sample std over seeds, n = seeds finished) and writes, into the suite's output
folder, `results.json` (every run's result) and PNG curves: `curves_<metric>.png` per logged training metric
(d_on/d_off = the head-estimated AMM distances `amm_gap/on|off`, exact total variation `tv/on|off`, the teacher's
log-probability of the student's rollouts `logp_teacher/on` (MiniLLM's reward), `minillm/reward`, `loss`), one line per
method, averaged over seeds.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from suite import load_suite, planned_runs, run_dir  # noqa: E402

CURVES = ["loss", "amm_gap/on", "amm_gap/off", "tv/on", "tv/off", "logp_teacher/on", "minillm/reward"]


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def collect(suite: dict) -> dict[str, list[dict]]:
    """Finished results by run name, in the suite's order."""
    results: dict[str, list[dict]] = {}
    for run in planned_runs(suite):
        path = os.path.join(run_dir(suite, run), "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results.setdefault(run["name"], []).append(json.load(f))
    return results


def table(results: dict[str, list[dict]], metrics: list[str]) -> str:
    lines = ["| run | group | seeds | " + " | ".join(metrics) + " | train s (mean) |",
             "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for name, rows in results.items():
        cells = []
        for metric in metrics:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if not values:
                cells.append("-")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}")
        seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
        train = f"{sum(seconds) / len(seconds):.0f}" if seconds else "-"
        lines.append(f"| {name} | {rows[0]['group']} | {len(rows)} | " + " | ".join(cells) + f" | {train} |")
    return "\n".join(lines)


def curves(suite: dict, out_dir: str) -> list[str]:
    """One PNG per logged metric: each run's curve (mean over the seeds that logged it) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in planned_runs(suite):
        path = os.path.join(run_dir(suite, run), "train_log.json")
        if run["group"] == "reference" or not os.path.exists(path):
            continue
        with open(path) as f:
            history = json.load(f)
        for entry in history:
            for metric in CURVES:
                if metric in entry and "step" in entry:
                    by_step = series.setdefault(metric, {}).setdefault(run["name"], {})
                    by_step.setdefault(entry["step"], []).append(float(entry[metric]))
    written = []
    for metric, runs in series.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, by_step in runs.items():
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=name,
                    linestyle="-" if name.startswith("amm") else "--")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{metric.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--metrics", default="rougeL,bleu,exact_match",
                        help="result keys shown as columns (e.g. score for a --scorer accuracy)")
    parser.add_argument("--no_plots", action="store_true")
    a = parser.parse_args(argv)
    suite = load_suite(a.suite)
    results = collect(suite)
    with open(os.path.join(suite["output_dir"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, [m for m in a.metrics.split(",") if m]))
    if not a.no_plots:
        for path in curves(suite, suite["output_dir"]):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
