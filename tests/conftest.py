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
