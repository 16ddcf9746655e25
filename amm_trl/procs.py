"""Process helpers shared by the benchmarks and the multi-process tests: a free local port, and a child process that
dies with its parent."""

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(sig: int = 9) -> None:
    """Linux: deliver `sig` to this process when its parent exits. torchrun starts its workers in their own session,
    so killing torchrun's process group leaves them running (holding the GPU, blocked on a dead rendezvous store);
    workers call this with SIGKILL, and spawned torchrun processes get SIGTERM (which they forward to their workers)
    through `preexec_fn=die_with_parent_term`. Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        return
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)


def die_with_parent_term() -> None:
    die_with_parent(15)
