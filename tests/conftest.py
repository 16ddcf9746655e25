import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # vLLM's CPU build runs the `vllm` tests on any machine (`.ci/vllm_env.sh` builds that environment).
    skip_vllm = pytest.mark.skip(reason="vLLM is not installed (bash .ci/vllm_env.sh, then run pytest -m vllm there)")
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        elif "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny student/teacher folders and a prompt-completion jsonl, built locally once per session."""
    from tests.tiny import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_dataset(tiny):
    from datasets import load_dataset

    return load_dataset("json", data_files=tiny["data"], split="train")


SHM_DIR = "/dev/shm"


def _shm_files():
    return set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    """Fails a test that leaves a new file in /dev/shm (memory no one gives back until the machine restarts: vLLM's
    and DeepSpeed's CPU shared-memory buffers, a killed worker's segments), after removing it so that the next test
    starts clean. Files that were there before the test are left alone."""
    before = _shm_files()
    yield
    left = sorted(_shm_files() - before)
    for name in left:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass
    if left:
        pytest.fail(f"the test left {len(left)} file(s) in {SHM_DIR} (removed now): {left}")
