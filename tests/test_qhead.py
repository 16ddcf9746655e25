"""Q-head construction: sized by the shared vocabulary, zero output at the start (also under ZeRO-3's zero.Init)."""

import json
import math
import os
import subprocess
import sys

from tests.test_trainer import make_trainer
from tests.tiny import build_tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_padded_student_vocab_sizes_heads_by_the_tokenizer(tmp_path, tiny_dataset):
    assets = build_tiny_assets(str(tmp_path / "padded"), student_vocab_pad=8)  # 72 student rows, 64 tokens
    for head_type in ("linear", "low_rank"):
        trainer = make_trainer(assets, tiny_dataset, tmp_path / head_type, max_steps=1, q_head_type=head_type)
        assert trainer.vocab_size == 64
        if head_type == "linear":
            assert tuple(trainer.q_heads.on.weight.shape) == (64, 32)
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_heads_start_at_zero_under_zero_init():
    from tests.test_distributed import free_port

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "distributed", "zero_init_heads.py"),
                           str(free_port())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["low_rank"] == {"abs_sum": 0.0, "shapes": [[32, 32], [32]], "partitioned": True}
    assert result["linear"]["abs_sum"] == 0.0 and result["linear"]["shapes"] == [[64, 32], [64]]


def test_user_optimizer_would_leave_heads_without_group(tiny, tiny_dataset, tmp_path):
    import pytest
    import torch

    from amm_trl import AMMTrainer
    from tests.test_trainer import make_config

    student = torch.nn.Linear(1, 1)  # any optimizer the user built before the trainer
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizers=\(optimizer, scheduler\).*no parameter group.*"
                                         r"optimizers=\(None, None\)"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=make_config(tmp_path),
                   train_dataset=tiny_dataset, optimizers=(optimizer, None))
    plain = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"],
                       args=make_config(tmp_path, objective="fkl"),
                       train_dataset=tiny_dataset, optimizers=(torch.optim.SGD(student.parameters(), lr=0.1), None))
    assert plain.q_heads is None  # objectives without heads keep accepting a user optimizer


def test_deepspeed_file_with_optimizer_section_is_refused(tmp_path):
    from tests.test_distributed import free_port

    assets = os.path.dirname(build_tiny_assets(str(tmp_path))["student"])
    for mode, source in (("path", "deepspeed='"), ("accelerate", "the accelerate config's deepspeed_config_file")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "distributed", "ds_optimizer_section.py"),
                               mode, str(free_port()), assets], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr[-4000:]
        error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
        assert error is not None and source in error and "has an 'optimizer' section" in error, (mode, error)
        assert "Remove the 'optimizer' section" in error
