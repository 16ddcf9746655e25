"""Shared memory (`/dev/shm`) that CPU runs create and would otherwise never give back.

- DeepSpeed's CPU communication op (ZeRO-3 with gloo, all ranks on one machine) creates one
  `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` file per rank (66 MiB: 2 x 1 MiB + 2 x 32 MiB
  in its shm.cpp) and never unlinks it.
- vLLM's CPU build gives each tensor-parallel (and pipeline-parallel) group a `<VLLM_DIST_IDENT>-<group>-cpushm_<rank>`
  file per rank and unlinks it only in a destructor that a killed (or `os._exit`-ed) process never runs. Its colocated
  engines (TRL's `vllm_mode="colocate"`, vLLM's external launcher) all get the same identifier, so the next engine of
  that shape on the machine fails with `create shm in SHMManager failed. errno: 17` (EEXIST).

Both kinds are mapped by every rank right after they are created; a file can be unlinked as soon as every rank has
mapped it (the mappings live on until the processes exit, and the kernel frees the memory then, however they exit).
So each rank unlinks its own file once all ranks have joined: a crash or a `kill -9` later on leaves nothing behind.
"""

import os
import uuid

SHM_DIR = "/dev/shm"


def deepspeed_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU op puts `rank`'s allreduce buffer (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def release_deepspeed_shm() -> bool:
    """Unlinks this rank's DeepSpeed allreduce buffer once every rank has mapped its peers' buffers (DeepSpeed maps
    them all before `init_distributed` returns; the barrier makes sure every rank got there). Collective: every rank
    of a DeepSpeed run calls it. True when a file was removed."""
    try:
        from deepspeed import comm
    except ImportError:
        return False
    backend = getattr(comm.comm, "cdb", None)
    if backend is None or getattr(backend, "shm_comm_op", None) is None or not comm.is_initialized():
        return False
    comm.barrier()
    return _unlink(deepspeed_buffer_path(comm.get_rank()))


def shared_engine_ident(accelerator) -> str:
    """One identifier per colocated vLLM engine, equal on all its ranks (rank 0 draws it, the others receive it), for
    vLLM's `VLLM_DIST_IDENT`: engines on one machine, at once or one after the other, never share a shm name."""
    ident = [f"amm-trl-{uuid.uuid4().hex[:12]}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(ident, from_process=0)
    return ident[0]


def release_vllm_engine_shm() -> list[str]:
    """Unlinks this process's files of the colocated vLLM engine's shared-memory groups (tensor and pipeline
    parallel). vLLM's CPU communicator maps every rank's file and passes two barriers before the engine is built, so
    after the engine exists the names are no longer needed. Returns the paths removed."""
    try:
        from vllm.distributed import parallel_state
        from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed
    except ImportError:
        return []
    removed = []
    for group in (parallel_state._TP, parallel_state._PP):
        communicator = getattr(group, "device_communicator", None) if group is not None else None
        shm = getattr(communicator, "dist_module", None)
        if isinstance(shm, _CPUSHMDistributed):
            # shm_open drops the leading slashes of the name (VLLM_DIST_IDENT may be "//" for "env://")
            path = os.path.join(SHM_DIR, f"{shm.group_name.lstrip('/')}_{communicator.rank_in_group}")
            if _unlink(path):
                removed.append(path)
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
