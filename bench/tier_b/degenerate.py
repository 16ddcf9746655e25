"""Count the degenerate greedy answers of each Tier B run: an answer whose last `tail` characters (20) hold at most
`distinct` (3) different characters ("1. 100000000...", "........"), read from each run's `eval/predictions.jsonl`
(the `prediction` column `amm-trl eval` writes). Prints JSON: {run: {"degenerate": n, "answers": m}}.

    python bench/tier_b/degenerate.py docs/results/tier_b_120/runs [--tail 20] [--distinct 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def is_degenerate(answer: str, tail: int = 20, distinct: int = 3) -> bool:
    """Whether the answer is at least `tail` characters long and its last `tail` hold at most `distinct` characters."""
    return len(answer) >= tail and len(set(answer[-tail:])) <= distinct


def count(predictions: str, tail: int = 20, distinct: int = 3) -> dict:
    """{"degenerate": answers that end degenerate, "answers": all answers} of one predictions.jsonl."""
    with open(predictions) as f:
        answers = [json.loads(line)["prediction"] for line in f if line.strip()]
    return {"degenerate": sum(is_degenerate(a, tail, distinct) for a in answers), "answers": len(answers)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="a suite's output_dir: <method>/seed<k>/eval/predictions.jsonl below it")
    parser.add_argument("--tail", type=int, default=20)
    parser.add_argument("--distinct", type=int, default=3)
    a = parser.parse_args(argv)
    found = sorted(glob.glob(os.path.join(a.runs, "*", "seed*", "eval", "predictions.jsonl")))
    if not found:
        raise SystemExit(f"{a.runs}: no <method>/seed<k>/eval/predictions.jsonl below it; pass a suite's output_dir.")
    counts = {os.path.relpath(os.path.dirname(os.path.dirname(p)), a.runs): count(p, a.tail, a.distinct)
              for p in found}
    print(json.dumps(counts, indent=1))
    return counts


if __name__ == "__main__":
    main()
