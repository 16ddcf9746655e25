import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if ("gpu" in item.keywords or "vllm" in item.keywords) and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny student/teacher folders and a prompt-completion jsonl, built locally once per session."""
    from tests.tiny import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_dataset(tiny):
    from datasets import load_dataset

    return load_dataset("json", data_files=tiny["data"], split="train")
