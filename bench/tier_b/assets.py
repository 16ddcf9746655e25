"""Tier B assets, built once into the suite's `assets_dir` (the suite's `prepare` hook) and reused while its
`manifest.json` holds the same settings: a pruned student, the splits, and the teacher's answers.

- teacher: SmolLM2-135M-Instruct (asset `smollm2-135m-instruct`, 30 layers), loaded in fp32;
- initial student: the teacher with the layers `drop` removed (default: the quickstart student's 10, 13, 16, 19, 22,
  25, leaving 24 layers, 113M parameters), saved in fp32; every method starts from it;
- splits of alpaca_en_demo (asset rows): train = the first 799 demo-train rows, validation = the last 100 (learning
  rate selection, curves), test = the 100 demo-eval rows;
- per row: `teacher`, one temperature-1 sample of the teacher (the off-policy data of every method but SFT, and the
  coverage measure), and on validation and test `teacher_greedy`, the teacher's greedy answer (exact TV on fixed
  data). Answers are cut at `max_new_tokens`. Deterministic: fixed seeds, one thread.

The two models are exact copies of shipped weights (the same bytes on every machine); the answers are sampled, so
their bits depend on the CPU kind. The split files are therefore committed beside the manifest and reused when present
(only the models are rebuilt on a fresh checkout), which keeps a suite that spans machines on one set of data.
"""

from __future__ import annotations

import json
import os

from bench.tier_a.assets import cached_build

DEFAULTS = {"drop": [10, 13, 16, 19, 22, 25], "validation_rows": 100, "max_new_tokens": 48, "seed": 0}


def _message(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _answers(model_dir: str, rows: list[dict], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    from amm_trl.generation import decode_completions, generate_token_ids, render_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = generate_token_ids(model_dir, render_prompts(tokenizer, [r["prompt"] for r in rows]), max_new_tokens,
                             temperature=temperature, batch_size=50, dtype="float32", seed=seed, progress=False)
    return decode_completions(tokenizer, ids)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def build(out: str, settings: dict | None = None) -> dict:
    """Builds (or reuses) the assets in `out`; returns {name: path}."""
    cfg = {**DEFAULTS, **(settings or {})}
    paths = {"teacher": os.path.join(out, "teacher"), "initial_student": os.path.join(out, "initial_student"),
             **{split: os.path.join(out, f"{split}.jsonl") for split in ("train", "validation", "test")}}
    return cached_build(out, cfg, paths, _make, "tier_b")


def _make(cfg: dict, paths: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amm_trl.assets import resolve
    from amm_trl.assets.models import drop_layers
    from amm_trl.data import load_prompt_dataset

    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    model.save_pretrained(paths["teacher"])
    tokenizer.save_pretrained(paths["teacher"])
    teacher_params, layers = sum(p.numel() for p in model.parameters()), model.config.num_hidden_layers
    student = drop_layers(model, [i for i in range(layers) if i not in set(cfg["drop"])])  # in place
    student.save_pretrained(paths["initial_student"])
    tokenizer.save_pretrained(paths["initial_student"])
    demo = [dict(r) for r in load_prompt_dataset(resolve("alpaca-demo-train"))]
    n_val = cfg["validation_rows"]
    rows = {"train": demo[:-n_val], "validation": demo[-n_val:],
            "test": [dict(r) for r in load_prompt_dataset(resolve("alpaca-demo-eval"))]}
    for i, (split, split_rows) in enumerate(rows.items()):
        if os.path.exists(paths[split]):  # committed answers: sampled once, on whichever machine built them first
            continue
        for row, sample in zip(split_rows, _answers(paths["teacher"], split_rows, cfg["max_new_tokens"], 1.0,
                                                    cfg["seed"] + i)):
            row["teacher"] = _message(sample)
        if split != "train":
            for row, answer in zip(split_rows, _answers(paths["teacher"], split_rows, cfg["max_new_tokens"], 0.0,
                                                        cfg["seed"])):
                row["teacher_greedy"] = _message(answer)
        _write_jsonl(paths[split], split_rows)
    return {"rows": {split: len(r) for split, r in rows.items()}, "teacher_params": teacher_params,
            "student_params": sum(p.numel() for p in student.parameters()),
            "student_layers": student.config.num_hidden_layers}


def prepare(suite: dict) -> dict:
    """Suite hook (`prepare: bench.tier_b.assets:prepare`): builds into `suite["assets_dir"]` (default
    `<output_dir>/assets`; the pilot and the tier share one) with `suite["task"]`."""
    return build(suite.get("assets_dir") or os.path.join(suite["output_dir"], "assets"), suite.get("task"))
