"""Checkpoints that are either complete or recognisably incomplete, and the one rule that tells them apart.

A folder `checkpoint-N` is complete when:

1. `trainer_state.json` exists, is valid JSON and records `global_step` N. The Trainer writes it last, and
   `AMMTrainer` makes every process finish its own files (model, optimizer or ZeRO shards, RNG and objective states,
   heads) before the main process writes it (a barrier after the RNG states, the last per-process files);
2. every `*.safetensors` file in it is whole: its header parses and the file is as long as the header says.

`amm-trl train --resume_from_checkpoint latest` and the slurm templates (`python -m amm_trl.checkpoints latest DIR`)
both resume from the newest complete checkpoint and name every newer folder they skip, with the reason.
"""

import errno
import json
import os
import re
import shutil
import struct
import sys
import warnings

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils' constant; not imported, so this module stays light
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STATE_FILE = "{name}_state_rank{rank}.pt"  # an objective's per-process state (`Objective.state`) in each checkpoint


def save_state(objective, directory: str, rank: int) -> None:
    """Writes this process's objective state (`objective.state.state_dict()`, if it has one), atomically."""
    import torch

    if objective.state is None:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE.format(name=objective.name, rank=rank))
    torch.save(objective.state.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(objective, directory: str, rank: int, world_size: int = 1) -> None:
    """Restores this process's state saved by `save_state`. Ranks whose file the checkpoint lacks start afresh; rank 0
    warns once for all of them, naming them."""
    import torch

    state = objective.state
    if state is None:
        return
    paths = [os.path.join(directory, STATE_FILE.format(name=objective.name, rank=r)) for r in range(world_size)]
    missing = [r for r, path in enumerate(paths) if not os.path.exists(path)]
    if missing and rank == 0:
        warnings.warn(f"{directory} has no {state.title} state of rank(s) {missing} "
                      f"({os.path.basename(paths[missing[0]])}, ...): their {state.contents} start afresh.")
    if rank not in missing:
        state.load_state_dict(torch.load(paths[rank], weights_only=False))


def safetensors_shapes(path: str) -> dict[str, tuple]:
    """{tensor name: shape} from a safetensors file's header (the data is not read)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {name: tuple(t["shape"]) for name, t in header.items() if name != "__metadata__"}


def shape_mismatch(folder: str, shapes: dict[str, tuple]) -> str | None:
    """Why the model files of checkpoint `folder` cannot be loaded into a model with parameter `shapes` (the first
    tensor whose shape differs, with both shapes), or None."""
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(("model", "adapter_model")) and name.endswith(".safetensors")):
            continue
        for tensor, shape in safetensors_shapes(os.path.join(folder, name)).items():
            if tensor in shapes and tuple(shapes[tensor]) != shape:
                return (f"{tensor} is {shape} in {os.path.join(folder, name)} but {tuple(shapes[tensor])} in this "
                        f"run's model")
    return None


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def _safetensors_problem(path: str) -> str | None:
    """Why a safetensors file is not whole (None if it is): 8-byte header length, JSON header, data of that size."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                return f"{os.path.basename(path)} is truncated ({size} bytes, header alone needs {8 + header_len})"
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{os.path.basename(path)} has no valid safetensors header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        return f"{os.path.basename(path)} is truncated ({size} bytes of {8 + header_len + end})"
    return None


def checkpoint_problem(folder: str) -> str | None:
    """Why `folder` is not a complete checkpoint, or None if it is (the rule in the module docstring)."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    if not os.path.isdir(folder):
        return "it is not a folder"
    state_path = os.path.join(folder, TRAINER_STATE)
    if not os.path.exists(state_path):
        return f"{TRAINER_STATE} is missing"
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is not valid JSON (cut off while being written)"
    if match and state.get("global_step") != int(match.group(1)):
        return f"{TRAINER_STATE} records global_step {state.get('global_step')}, not {match.group(1)}"
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(folder, name))
            if problem:
                return problem
    return None


def checkpoint_folders(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_RE.match(name))
             and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def latest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete checkpoint or None, [(newer folder skipped, why)])."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def skipped_message(skipped: list[tuple[str, str]], chosen: str | None) -> str:
    names = "; ".join(f"{os.path.basename(folder)} ({why})" for folder, why in skipped)
    target = f"resuming from {os.path.basename(chosen)}" if chosen else "no complete checkpoint left: starting fresh"
    return (f"Skipping incomplete checkpoint(s) {names}: their writing was interrupted; {target}. "
            f"They are left in place and are overwritten when training reaches their step again.")


def resolve_resume(resume: str | None, output_dir: str, is_main_process: bool = True) -> str | None:
    """`--resume_from_checkpoint` as the Trainer needs it: `latest` (or `last`, `auto`) becomes the newest complete
    checkpoint of `output_dir` (None if there is none: start fresh); an explicit incomplete folder is refused."""
    if resume in (None, "", "none", "never"):
        return None
    if resume in ("latest", "last", "auto"):
        chosen, skipped = latest_complete_checkpoint(output_dir)
        if skipped and is_main_process:
            warnings.warn(skipped_message(skipped, chosen), stacklevel=2)
        return chosen
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ValueError(
            f"resume_from_checkpoint={resume!r} is not a complete checkpoint: {problem}. Pass a complete "
            f"checkpoint-N folder, or `latest` to resume from the newest complete one in output_dir."
        )
    return resume


def disk_full_message(exc: BaseException, folder: str, output_dir: str) -> str | None:
    """What to tell a user whose checkpoint write failed for lack of space (None if `exc` is something else): torch
    reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`."""
    text = str(exc)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return None
    last, _ = latest_complete_checkpoint(output_dir)
    need = folder_bytes(last) if last else None
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or (
        ("unexpected pos" in text or "file write failed" in text) and (need is None or free < need))
    if not full:
        return None
    needed = f"a checkpoint of this run takes about {need / 2**20:.1f} MiB ({os.path.basename(last)})" if need else \
        "no complete checkpoint tells how much one needs"
    intact = f"the newest complete checkpoint, {last}, is intact" if last else "there is no complete checkpoint yet"
    return (f"Disk full while writing {folder}: {free / 2**20:.1f} MiB free on the file system of output_dir "
            f"{output_dir!r}; {needed}. The half-written folder has no trainer_state.json, so resuming skips it; "
            f"{intact}. Free space (save_total_limit keeps fewer checkpoints) or move output_dir, then resume with "
            f"--resume_from_checkpoint latest. ({type(exc).__name__}: {text.strip()[:200]})")


def resume_folder(resume, output_dir: str, is_main_process: bool = True) -> str | None:
    """The checkpoint `Trainer.train(resume_from_checkpoint=...)` should load: `True` (the Trainer's "newest
    checkpoint") and `"latest"` mean the newest *complete* one; an explicit incomplete folder is refused (see
    `resolve_resume`)."""
    if resume is True:
        chosen = resolve_resume("latest", output_dir, is_main_process)
        if chosen is None:
            raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in output_dir {output_dir!r}.")
        return chosen
    if isinstance(resume, str):
        return resolve_resume(resume, output_dir)
    return resume


def check_resume_shapes(folder: str, shapes: dict[str, tuple]) -> None:
    """A checkpoint of another model (`latest` in an output_dir another recipe wrote) is refused before any training,
    naming the folder and both shapes, instead of the loader's size-mismatch error."""
    problem = shape_mismatch(folder, shapes)
    if problem:
        raise ValueError(f"resume_from_checkpoint: {folder} was written by a different model: {problem}. Resume "
                         f"from a checkpoint of this model, or train into another output_dir.")


def remove_stale_checkpoint(folder: str) -> None:
    """A `checkpoint-N` of an earlier run (complete or not) is removed before step N is saved again, so that old and
    new files never mix under an old, valid `trainer_state.json` (removed first: a kill during the removal leaves the
    folder recognisably incomplete)."""
    if not os.path.isdir(folder):
        return
    stale = "an incomplete" if checkpoint_problem(folder) else "a complete"
    warnings.warn(f"{folder} holds {stale} checkpoint of an earlier run; it is replaced by this run's.")
    state = os.path.join(folder, TRAINER_STATE)
    if os.path.exists(state):
        os.remove(state)
    shutil.rmtree(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m amm_trl.checkpoints latest OUTPUT_DIR`: prints the newest complete checkpoint (nothing if none) and
    names the skipped incomplete folders on stderr. `python -m amm_trl.checkpoints check FOLDER`: exit status 0 if
    complete, else 1 with the reason."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("latest", "check"):
        print("usage: python -m amm_trl.checkpoints {latest OUTPUT_DIR | check CHECKPOINT_DIR}", file=sys.stderr)
        return 2
    if argv[0] == "latest":
        chosen, skipped = latest_complete_checkpoint(argv[1])
        if skipped:
            print(f"amm-trl: {skipped_message(skipped, chosen)}", file=sys.stderr)
        if chosen:
            print(chosen)
        return 0
    problem = checkpoint_problem(argv[1])
    if problem:
        print(f"amm-trl: {argv[1]} is not a complete checkpoint: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
