"""The asset cache: its location, checksums, locks and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from filelock import FileLock

CACHE_ENV = "AMM_TRL_CACHE"
ASSET_PREFIX = "asset:"
MARKER = "amm_trl_asset.json"  # written inside every prepared model folder (provenance)


class AssetChecksumError(ValueError):
    """A downloaded or extracted file does not have the pinned sha256."""

    def __init__(self, path, expected: str, actual: str):
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


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


def file_lock(path: Path) -> FileLock:
    """Exclusive inter-process lock on `path` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


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
