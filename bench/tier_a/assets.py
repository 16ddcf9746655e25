"""Tier A assets, built once into `<output_dir>/assets` (the suite's `prepare` hook) and reused while its
`manifest.json` exists: the task's splits, a teacher trained from scratch on the task, the initial (untrained) student,
and the teacher's sampled answers (temperature 1) for every split, as the `teacher` column next to the reference
`completion`. Deterministic: fixed seeds and one thread while training."""

from __future__ import annotations

import json
import os
import time

from . import task
from .pretrain import accuracy, train_lm

DEFAULTS = {
    "train_rows": 4000,          # distillation prompts (train split)
    "validation_rows": 300,      # learning-rate selection and the in-training curves
    "test_rows": 1000,           # final scores
    "teacher_rows": 60000,       # the teacher's own training data (train split, another seed)
    "teacher": {"hidden": 64, "layers": 3, "heads": 4, "steps": 1000, "batch_size": 64, "lr": 3.0e-3},
    "student": {"hidden": 24, "layers": 2, "heads": 4},
    "reference_noise": task.REFERENCE_NOISE,  # share of wrong reference answers in the train split
    "max_new_tokens": task.MAX_ITEMS + 2,
}


def _teacher_samples(model_dir: str, rows: list[dict], max_new_tokens: int, seed: int) -> list[str]:
    from amm_trl.generation import decode_completions, generate_token_ids, render_prompts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = generate_token_ids(model_dir, render_prompts(tokenizer, [r["prompt"] for r in rows]), max_new_tokens,
                             temperature=1.0, batch_size=500, dtype="float32", seed=seed, progress=False)
    return decode_completions(tokenizer, ids)


def digest(paths: dict, stamps: bool = True) -> str:
    """sha256 over the bytes of every asset file (folders: every file in them, by relative name). `stamps=False`: the
    content digest, where a JSON file is hashed without the `transformers_version` that `save_pretrained` writes into
    `config.json` and `generation_config.json` (the same weights and data saved by another transformers release)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(paths):
        path = paths[name]
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
        for file in files:
            h.update(os.path.relpath(file, os.path.dirname(path)).encode())
            with open(file, "rb") as f:
                data = f.read()
            if not stamps and file.endswith(".json"):
                parsed = json.loads(data)
                if isinstance(parsed, dict) and "transformers_version" in parsed:
                    parsed.pop("transformers_version")
                    data = json.dumps(parsed, sort_keys=True).encode()
            h.update(data)
    return h.hexdigest()


def _digest_key(recorded: dict) -> str:
    """The digest a manifest is compared on: its `content_digest` where it has one (version stamps aside), else its
    byte `digest` (manifests written before the content digest)."""
    return "content_digest" if recorded.get("content_digest") else "digest"


def _same_assets(recorded: dict, paths: dict) -> bool:
    """Whether the files in `paths` are the ones `recorded` (a manifest) describes, on its :func:`_digest_key`; a
    manifest with neither digest accepts any files."""
    key = _digest_key(recorded)
    return recorded.get(key) in (None, digest(paths, stamps=key == "digest"))


def cached_build(out: str, cfg: dict, paths: dict, make, name: str) -> dict:
    """`paths` as built by `make(cfg, paths) -> manifest` into `out`, once: reused while `out/manifest.json` holds the
    same settings (another setting is refused, naming both); the manifest is written last, atomically, with the
    files' `digest`. A committed manifest whose files are gone (a fresh checkout of a suite that is part done) has them
    rebuilt, and a rebuild that differs from the recorded digest (another CPU kind can compute another teacher) is
    refused: the finished runs used the recorded assets."""
    manifest_path = os.path.join(out, "manifest.json")
    recorded = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            recorded = json.load(f)
        if recorded["settings"] != json.loads(json.dumps(cfg)):
            raise ValueError(f"{manifest_path} was built with other settings {recorded['settings']}; delete {out} "
                             f"to rebuild it with {cfg}.")
        if all(os.path.exists(p) for p in paths.values()):
            if not _same_assets(recorded, paths):  # e.g. committed assets changed by hand
                raise ValueError(f"The assets in {out} differ from the digest {manifest_path} records: restore them "
                                 f"(git checkout {out}) or delete {out} and rerun the suite from scratch.")
            return paths
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible
    try:
        start = time.perf_counter()
        os.makedirs(out, exist_ok=True)
        manifest = {"settings": cfg, **make(cfg, paths), "build_seconds": time.perf_counter() - start}
    finally:
        torch.set_num_threads(threads)
    manifest["digest"], manifest["content_digest"] = digest(paths), digest(paths, stamps=False)
    if recorded is not None:
        key = _digest_key(recorded)
        if recorded.get(key) not in (None, manifest[key]):
            raise ValueError(f"The assets rebuilt in {out} differ from those {manifest_path} records ({key} "
                             f"{manifest[key][:12]} vs {recorded[key][:12]}): this machine computes other "
                             f"models or data (another CPU kind or library version), so the suite's finished runs "
                             f"would not compare with new ones. Finish the suite where it started, or rerun it all.")
        return paths
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    print(f"{name}: built assets in {out}: " + json.dumps({k: v for k, v in manifest.items()
                                                         if k not in ("teacher_training", "settings")}), flush=True)
    return paths


def build(out: str, settings: dict | None = None) -> dict:
    """Builds (or reuses) the assets in `out`; returns {name: path}."""
    cfg = {**DEFAULTS, **(settings or {})}
    paths = {"teacher": os.path.join(out, "teacher"), "initial_student": os.path.join(out, "initial_student"),
             **{split: os.path.join(out, f"{split}.jsonl") for split in ("train", "validation", "test")}}
    return cached_build(out, cfg, paths, _make, "tier_a")


def _make(cfg: dict, paths: dict) -> dict:
    tokenizer = task.build_tokenizer()
    rows = {split: task.make_rows(split, cfg[f"{split}_rows"], seed=0,
                                  noise=cfg["reference_noise"] if split == "train" else 0.0)
            for split in ("train", "validation", "test")}
    teacher_rows = task.make_rows("train", cfg["teacher_rows"], seed=1)
    t = cfg["teacher"]
    teacher = task.build_model(len(tokenizer), t["hidden"], t["layers"], t["heads"], seed=0)
    log = train_lm(teacher, tokenizer, teacher_rows, t["steps"], t["batch_size"], t["lr"], seed=0,
                   log_every=max(1, t["steps"] // 10),
                   eval_fn=lambda m: accuracy(m, tokenizer, rows["validation"]))
    teacher.save_pretrained(paths["teacher"])
    tokenizer.save_pretrained(paths["teacher"])
    s = cfg["student"]
    student = task.build_model(len(tokenizer), s["hidden"], s["layers"], s["heads"], seed=0)
    student.save_pretrained(paths["initial_student"])
    tokenizer.save_pretrained(paths["initial_student"])
    for i, split in enumerate(("train", "validation", "test")):
        for row, sample in zip(rows[split], _teacher_samples(paths["teacher"], rows[split],
                                                              cfg["max_new_tokens"], seed=i)):
            row["teacher"] = sample
        task.write_jsonl(paths[split], rows[split])
    return {
        "teacher_training": log,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "reference_accuracy": {split: sum(task.is_correct(r["completion"], r["prompt"]) for r in rows[split])
                               / len(rows[split]) for split in rows},
        "teacher_sample_accuracy": {split: sum(task.is_correct(r["teacher"], r["prompt"]) for r in rows[split])
                                    / len(rows[split]) for split in rows},
        "mean_correct_answers": {split: sum(task.num_correct_answers(r["prompt"].split()[:-1]) for r in
                                            rows[split]) / len(rows[split]) for split in rows},
    }


def prepare(suite: dict) -> dict:
    """Suite hook (`prepare: bench.tier_a.assets:prepare`): builds into `<output_dir>/assets` with `suite["task"]`."""
    return build(os.path.join(suite["output_dir"], "assets"), suite.get("task"))
