"""Tables and training-curve plots of a quality suite run by bench/quality/suite.py.

    python bench/quality/report.py bench/quality/alpaca.yaml [--metric rougeL]

Prints a markdown table (mean and sample std over seeds, n = seeds finished; besides the eval scores: the mean answer
length in words, and exact TV / rollout length averaged over the last 3 logged training steps) and writes, into the
suite's output folder, `results.json` (every run's result) and PNG curves: `curves_<metric>.png` per logged training
metric (d_on/d_off = the head-estimated AMM distances `amm_gap/on|off`, exact total variation `tv/on|off`, the
teacher's log-probability of the student's rollouts `logp_teacher/on` (MiniLLM's reward), `minillm/reward`, `loss`),
one line per method, averaged over seeds (running mean of 4 steps: each step sees a different batch).
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
        if run["group"] == "select":  # learning-rate selection runs (validation split) are not test results
            continue
        path = os.path.join(run_dir(suite, run), "result.json")
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            results.setdefault(run["name"], []).append({**result, **derived(run_dir(suite, run))})
    return results


def derived(out: str) -> dict:
    """Evaluation answer length (words) and the training log's end state (mean of the last 3 logged steps)."""
    extra = {}
    predictions = os.path.join(out, "eval", "predictions.jsonl")
    if os.path.exists(predictions):
        with open(predictions) as f:
            words = [len(json.loads(line)["prediction"].split()) for line in f if line.strip()]
        extra["answer_words"] = sum(words) / max(len(words), 1)
    log = os.path.join(out, "train_log.json")
    if os.path.exists(log):
        with open(log) as f:
            entries = [e for e in json.load(f) if "loss" in e]
        for key, name in (("tv/on", "end_tv_on"), ("tv/off", "end_tv_off"),
                          ("completions/mean_length", "end_rollout_tokens")):
            values = [e[key] for e in entries[-3:] if isinstance(e.get(key), (int, float)) and not math.isnan(e[key])]
            if values:
                extra[name] = sum(values) / len(values)
    return extra


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
            digits = 3 if metric.startswith("end_tv") else 1 if metric in ("answer_words", "end_rollout_tokens") else 2
            cells.append(f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
        train = f"{sum(seconds) / len(seconds):.0f}" if seconds else "-"
        lines.append(f"| {name} | {rows[0]['group']} | {len(rows)} | " + " | ".join(cells) + f" | {train} |")
    return "\n".join(lines)


def curves(suite: dict, out_dir: str, smooth: int = 4) -> list[str]:
    """One PNG per logged metric: each run's curve (mean over the seeds that logged it) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in planned_runs(suite):
        path = os.path.join(run_dir(suite, run), "train_log.json")
        if run["group"] in ("reference", "select") or not os.path.exists(path):
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
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            # Every step sees a different batch: a trailing running mean over `smooth` logged steps shows the trend.
            smoothed = [sum(means[max(0, i - smooth + 1):i + 1]) / len(means[max(0, i - smooth + 1):i + 1])
                        for i in range(len(means))]
            ax.plot(steps, smoothed, label=name, linestyle="-" if name.startswith("amm") else "--")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (mean over seeds, running mean of {smooth} steps)")
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
    parser.add_argument("--metrics", default="rougeL,bleu,answer_words,end_tv_on,end_tv_off,end_rollout_tokens",
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
