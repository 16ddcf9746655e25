"""2-rank DeepSpeed ZeRO-3 on CPU (gloo): the real partitioned paths, through torchrun and accelerate launch."""

import json
import os
import subprocess
import sys

import pytest

from amm_trl.procs import free_port

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed", "zero3_worker.py")


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def torchrun(phase, assets, out, *extra):
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), WORKER, phase, assets, out, *extra])
    with open(os.path.join(out, f"{phase}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    from tests.tiny import build_tiny_assets

    root = tmp_path_factory.mktemp("zero3")
    assets = build_tiny_assets(str(root / "assets"))
    out = str(root / "out")
    os.makedirs(out)
    return os.path.dirname(assets["student"]), out


@pytest.fixture(scope="module")
def trained(zero3):
    """The train phase (2 steps, checkpoint at step 2), run once for the tests that read it or resume from it."""
    assets, out = zero3
    return torchrun("train", assets, out)


def test_zero3_train_partitions_student_and_heads_and_sync_skips_heads(trained):
    result = trained
    # every head parameter is split over the two ranks (64 x 32 weight -> 1024 elements each)
    assert result["partitioned"]["on.weight"] == [[64, 32], 1024]
    assert result["partitioned"]["off.bias"] == [[64], 32]
    assert result["lrs"] == [1e-2, 1e-2, 5e-2]  # student groups (decay / no decay), heads (x q_head_lr_multiplier)
    assert result["stream"] == 21  # all student weights, gathered, and nothing else
    assert "amm_q_heads.safetensors" in result["checkpoint_files"] and "global_step2" in result["checkpoint_files"]
    assert result["metrics"]["amm_gap/on"] > 0 and result["metrics"]["tv/off"] > 0


def test_zero3_resume_restores_heads_and_optimizer_exactly(zero3, trained):
    assets, out = zero3
    result = torchrun("resume", assets, out)
    assert result["restored_heads"] == ["off.bias", "off.weight", "on.bias", "on.weight"]
    assert result["optimizer_tensors_compared"] > 0 and len(result["losses"]) == 4


def test_zero3_lora_student_sync_merges_without_heads_or_adapters(zero3):
    assets, out = zero3
    result = torchrun("peft", assets, out)
    assert result["stream"] == 21


def test_zero3_every_objective_runs_two_steps(zero3):
    assets, out = zero3
    objectives = ["sft", "seqkd", "fkl", "rkl", "tvd", "gkd", "imitkd", "jsd", "distillm", "minillm", "pbkd"]
    result = torchrun("objectives", assets, out, *objectives)
    # The loss metric of each objective, on the data kinds its schedule trains on (gkd/imitkd draw one per step).
    expected = {"sft": {"ce/off"}, "seqkd": {"ce/off"}, "fkl": {"fkl/off"}, "rkl": {"rkl/on"}, "tvd": {"tvd/on"},
                "distillm": {"distillm/on", "distillm/off"},
                "minillm": {"minillm/on", "minillm_kd/off", "ppo_ratio/on"},
                "pbkd": {"pbkd_gap/on", "pbkd_gap/off", "pbkd/bt_loss"}, "jsd": set()}
    for objective in objectives:
        losses, logged = result["losses"][objective], set(result["logged"][objective])
        assert len(losses) == 2, (objective, losses)  # finite: checked on both ranks by the worker
        assert expected.get(objective, set()) <= logged, (objective, sorted(logged))
        assert result["lm_head_change"][objective] > 0, objective  # the student learned under ZeRO-3
    for objective in ("gkd", "imitkd"):
        assert {f"{objective}/on", f"{objective}/off"} & set(result["logged"][objective]), objective
    assert result["distillm_source"]["distillm"] == [2.0, 1.0]  # step 0 on rollouts, step 1 on the replay buffer


def test_cli_under_accelerate_launch_zero3(zero3, tmp_path):
    """`accelerate launch --config_file deepspeed_configs/zero3_cpu.yaml -m amm_trl.cli train` end to end."""
    assets, _ = zero3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {assets}/student\nteacher_model_name_or_path: {assets}/teacher\n"
        f"dataset_name: {assets}/data.jsonl\ndtype: float32\nteacher_model_init_kwargs: {{dtype: float32}}\n"
        f"output_dir: {tmp_path}/out\nmax_steps: 2\nper_device_train_batch_size: 2\nmax_completion_length: 6\n"
        "use_cpu: true\nbf16: false\ngradient_checkpointing: false\nreport_to: none\nsave_strategy: 'no'\n"
        "logging_steps: 1\n")
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "deepspeed_configs/zero3_cpu.yaml",
         "--main_process_port", str(free_port()), "-m", "amm_trl.cli", "train", "--config", str(recipe)])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # gathered 16-bit save: a plain model
    assert model.lm_head.weight.shape == (64, 32)
    assert os.path.exists(tmp_path / "out" / "amm_q_heads.safetensors")


def test_amm_trl_train_launches_itself_with_a_packaged_accelerate_config(zero3, tmp_path):
    """`amm-trl train --accelerate_config zero3_cpu --num_processes 2` (TRL's CLI style), started outside the
    repository: the packaged config is found by name, its DeepSpeed file resolved, and 2 ranks train under ZeRO-3."""
    assets, _ = zero3
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {assets}/student\nteacher_model_name_or_path: {assets}/teacher\n"
        f"dataset_name: {assets}/data.jsonl\ndtype: float32\nteacher_model_init_kwargs: {{dtype: float32}}\n"
        f"output_dir: {tmp_path}/out\nmax_steps: 1\nper_device_train_batch_size: 2\nmax_completion_length: 4\n"
        "use_cpu: true\nbf16: false\ngradient_checkpointing: false\nreport_to: none\nsave_strategy: 'no'\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", "--accelerate_config", "zero3_cpu",
                           "--num_processes", "2", "--main_process_port", str(free_port()), "--config", str(recipe)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "student saved" in proc.stdout and os.path.exists(tmp_path / "out" / "model.safetensors")
    rows = sum(1 for line in open(f"{assets}/data.jsonl") if line.strip())
    assert f"'epoch': '{2 * 2 / rows:.4g}'" in proc.stdout  # one step read 2 rows on each of 2 ranks


def test_accelerate_config_names_the_packaged_ones_when_unknown():
    from amm_trl.launch import resolve_config

    with pytest.raises(FileNotFoundError, match=r"--accelerate_config 'zero9': no such file, and no packaged config "
                                                r"of that name \[.*'zero3', 'zero3_cpu', 'zero3_offload'\]"):
        resolve_config("zero9")


MASTER_WORKER = os.path.join(ROOT, "tests", "distributed", "master_heads_worker.py")


@pytest.mark.slow
def test_bf16_deepspeed_checkpoint_keeps_fp32_master_heads_and_plain_resume_restores_them(zero3, tmp_path):
    """Under DeepSpeed bf16 the trained heads are 16-bit copies of an fp32 master; the checkpoint's heads file holds
    the master, so a resume without DeepSpeed restores the heads bit-exactly."""
    import torch
    from datasets import load_dataset
    from safetensors.torch import load_file

    from amm_trl import AMMConfig, AMMTrainer

    assets, _ = zero3
    out = str(tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), MASTER_WORKER, "bf16", assets, out])
    with open(os.path.join(out, "bf16.json")) as f:
        assert json.load(f)["dtypes"] == ["torch.bfloat16"]  # the heads DeepSpeed trains are bf16 ...
    master = torch.load(os.path.join(out, "master_heads.pt"))
    checkpoint = os.path.join(out, "bf16", "checkpoint-2")
    saved = load_file(os.path.join(checkpoint, "amm_q_heads.safetensors"))
    assert sorted(saved) == sorted(master) == ["off.bias", "off.weight", "on.bias", "on.weight"]
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, master[name]), name  # ... the file the master
        assert not torch.equal(tensor.bfloat16().float(), tensor), name  # which no bf16 copy could hold

    args = AMMConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, bf16=False, report_to="none",
                     per_device_train_batch_size=2, max_completion_length=4, model_init_kwargs={"dtype": "float32"},
                     teacher_model_init_kwargs={"dtype": "float32"})
    trainer = AMMTrainer(model=os.path.join(assets, "student"), teacher_model=os.path.join(assets, "teacher"),
                         args=args, train_dataset=load_dataset("json", data_files=os.path.join(assets, "data.jsonl"),
                                                               split="train"))
    trainer._load_from_checkpoint(checkpoint)  # no DeepSpeed: reads the heads file
    for name, p in trainer.q_heads.named_parameters():
        assert torch.equal(p.detach(), master[name]), name


def test_missing_distillm_state_warns_once_for_all_ranks(zero3, tmp_path):
    assets, _ = zero3
    out = str(tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), MASTER_WORKER, "distillm", assets, out])
    with open(os.path.join(out, "distillm.json")) as f:
        per_rank = json.load(f)["warnings_per_rank"]
    assert per_rank[1] == [] and len(per_rank[0]) == 1
    assert per_rank[0][0].endswith("checkpoint-2 has no DistiLLM state of rank(s) [0, 1] (distillm_state_rank0.pt, "
                                   "...): their replay buffer and threshold start afresh.")


def test_divergence_stops_every_rank_at_the_same_step_under_zero3(zero3, tmp_path):
    from amm_trl.checkpoints import checkpoint_problem

    assets, _ = zero3
    out = str(tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), MASTER_WORKER, "diverge", assets, out])
    with open(os.path.join(out, "diverge.json")) as f:
        result = json.load(f)
    (message0, step0), (message1, step1) = result["per_rank"]
    assert step0 == step1 and message0 is not None and message1 is not None
    assert message0 == message1 and message0.startswith(f"Training diverged at step {step0 + 1}: loss nan, nan (per "
                                                        f"process), gradient norm ")
    assert "Stopped before saving anything of this step" in message0
    assert result["checkpoints"] == [f"checkpoint-{s}" for s in range(1, step0 + 1)]
    assert checkpoint_problem(os.path.join(out, "diverge", f"checkpoint-{step0}")) is None
