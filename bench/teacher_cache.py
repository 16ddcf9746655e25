"""The offline teacher cache's size and fidelity per codec (`amm-trl generate --teacher_top_k K
--teacher_top_k_codec float16|log8`), on the quickstart's SmolLM2-135M-Instruct teacher (offline asset) on CPU.

The teacher samples one completion per prompt (the first `--rows` alpaca-demo rows, temperature 1, `--max-new-tokens`)
and its top-`max(--ks)` log-probs at every completion token are computed once in float32 (`generate_with_top_k`, the
function `amm-trl generate` calls); each k's cache is that top-k written by `write_top_k_cache` in each codec (the
writer `amm-trl generate` calls), so every figure compares the same tokens. Per k and codec: the top-k columns'
bytes per completion token (compressed, as parquet stores them), the covered teacher mass, and what the codec loses
against the float32 values: the largest spread of a token's log-prob errors (`max_spread`, over the entries within
255/16 nats of the token's top: log8 keeps each within 1/32 nat of one per-token shift, so <= 1/16), the share of
entries further below (`clamped_share`, read as 255/16 below the top), and the mean and largest total variation
between the decoded and the exact top-k-plus-tail distributions.

    OMP_NUM_THREADS=1 python bench/teacher_cache.py --json out.json

Prints one line `RESULT {...}`.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from amm_trl.assets import prepare  # noqa: E402
from amm_trl.cache import CODECS, top_k_of, write_top_k_cache  # noqa: E402
from amm_trl.cli import cpu_kind  # noqa: E402


def fidelity(rows: list[dict], exact: list[dict]) -> dict:
    """Decoded vs exact log-probs of the same tokens: the largest per-token spread of the errors, and the mean TV
    between the two (top-k + tail) distributions."""
    spreads, tvs, clamped, entries = [], [], 0, 0
    for row, ref in zip(rows, exact, strict=True):
        got = top_k_of(row)
        for ids, lps, ref_ids, ref_lps in zip(got["ids"], got["log_probs"], ref["ids"], ref["log_probs"],
                                              strict=True):
            by_id = dict(zip(ids, lps))
            p = np.exp(np.array([by_id[i] for i in ref_ids], dtype=np.float64))
            q = np.exp(np.array(ref_lps, dtype=np.float64))
            error = np.log(p) - np.log(q)
            kept = np.log(q) > np.log(q).max() - 255 / 16  # log8 reads entries further below the top as 255/16
            clamped += int((~kept).sum())
            entries += len(q)
            spreads.append(float(error[kept].max() - error[kept].min()))
            tvs.append(0.5 * (np.abs(p - q).sum() + abs(p.sum() - q.sum())))
    return {"max_spread": round(max(spreads), 4), "clamped_share": round(clamped / entries, 4),
            "tv_mean": float(f"{np.mean(tvs):.3g}"), "tv_max": float(f"{max(tvs):.3g}")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from datasets import Dataset
    from transformers import AutoTokenizer

    from amm_trl.data import load_prompt_dataset
    from amm_trl.generation import decode_completions, generate_with_top_k, render_prompts

    teacher, data = prepare(["smollm2-135m-instruct", "alpaca-demo-train"])
    dataset = load_prompt_dataset(data).select(range(args.rows))
    dataset = Dataset.from_dict({"prompt": dataset["prompt"]})
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompt_ids = render_prompts(tokenizer, dataset["prompt"])
    ks = sorted(int(k) for k in args.ks.split(","))
    start = time.perf_counter()
    ids, top = generate_with_top_k(teacher, prompt_ids, args.max_new_tokens, ks[-1], temperature=1.0,
                                   batch_size=16, dtype="float32", seed=0)
    seconds = time.perf_counter() - start
    completions = [[{"role": "assistant", "content": t}] for t in decode_completions(tokenizer, ids)]
    workdir = tempfile.mkdtemp(prefix="bench-teacher-cache-")
    caches = {}
    for k in ks:
        exact = [{"ids": [t[:k] for t in row["ids"]], "log_probs": [t[:k] for t in row["log_probs"]],
                  "token_log_prob": row["token_log_prob"]} for row in top]
        for codec in CODECS:
            path = os.path.join(workdir, f"k{k}-{codec}.parquet")
            stats = write_top_k_cache(path, dataset, "completion", completions, prompt_ids, ids, exact, codec)
            caches[f"k{k}_{codec}"] = {**{n: stats[n] for n in ("k", "codec", "top_k_bytes_per_token",
                                                                 "covered_mass_mean", "covered_mass_min")},
                                       **fidelity(pq.read_table(path).to_pylist(), exact)}
            os.remove(path)
    result = {"meta": C.run_info(), "cpu": cpu_kind(), "rows": args.rows, "tokens": sum(map(len, ids)),
              "max_new_tokens": args.max_new_tokens, "teacher_seconds": round(seconds, 1), "caches": caches,
              "ratio_bytes_log8_float16": {k: round(caches[f"k{k}_log8"]["top_k_bytes_per_token"]
                                                    / caches[f"k{k}_float16"]["top_k_bytes_per_token"], 3)
                                           for k in ks}}
    C.emit(result, args.json)


if __name__ == "__main__":
    main()
