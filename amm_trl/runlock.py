"""One run owns its `output_dir`: a lock file that a second run sees and refuses, and that no crash can leave held.

The main process holds an exclusive `flock` on `<output_dir>/.amm-trl.lock` for as long as it lives and writes its
host, pid, start time and command line into it. The kernel releases an flock when the process exits in any way
(a crash, SIGKILL, a node that goes down with a local disk), so a lock left by a dead run is simply taken over; the
file is removed on a normal exit. A second run that finds the lock held stops before loading any model and names
the run that holds it.

The lock lives on the file system of `output_dir`: flock works across the processes of one machine and, on Linux,
across machines for NFS v4 and Lustre/GPFS mounted with flock support.
"""

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys

LOCK_FILE = ".amm-trl.lock"
_held: dict[str, int] = {}  # realpath of output_dir -> file descriptor holding the lock (this process)


class OutputDirInUseError(RuntimeError):
    """Another live run holds the lock of this output_dir."""


def lock_output_dir(output_dir: str) -> str:
    """Takes the lock of `output_dir` for this process (again: a no-op). Raises `OutputDirInUseError` naming the
    other run when a live process holds it. Returns the lock file's path."""
    key = os.path.realpath(output_dir)
    path = os.path.join(key, LOCK_FILE)
    if key in _held:
        return path
    os.makedirs(key, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirInUseError(_in_use_message(output_dir, path, holder)) from None
        # the file may have been removed (and re-created) by the previous holder between open and flock
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    if len(_held) == 1:
        atexit.register(release_all)
    return path


def release_output_dir(output_dir: str) -> None:
    """Removes the lock file and releases the lock (only if this process holds it)."""
    key = os.path.realpath(output_dir)
    fd = _held.pop(key, None)
    if fd is None:
        return
    try:
        os.unlink(os.path.join(key, LOCK_FILE))  # while still holding it: no one locks a file about to vanish
    except FileNotFoundError:
        pass
    os.close(fd)


def release_all() -> None:
    for key in list(_held):
        release_output_dir(key)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _in_use_message(output_dir: str, path: str, holder: dict) -> str:
    who = (f"the run with pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')} (`{holder.get('command', '?')}`)") if holder else "another process"
    return (f"output_dir={output_dir!r} is in use by {who}: it holds {path}. Two runs writing one output_dir would "
            f"replace each other's checkpoints and model. Wait for that run to end (or stop it), or pass another "
            f"--output_dir. The lock is released whenever its process exits, even when killed, so a dead run never "
            f"blocks this folder.")

