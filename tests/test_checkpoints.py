"""Checkpoints are whole or recognisably incomplete: the rule, `--resume_from_checkpoint latest`, the slurm
templates' use of it, and a real `amm-trl train` killed with SIGKILL while it writes a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from amm_trl.checkpoints import checkpoint_problem, latest_complete_checkpoint, resolve_resume
from amm_trl.checkpoints import main as checkpoints_main
from amm_trl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(tmp_path, tiny, name="recipe.yaml", **extra):
    lines = {
        "model_name_or_path": tiny["student"], "teacher_model_name_or_path": tiny["teacher"],
        "dataset_name": tiny["data"], "dtype": "float32", "output_dir": str(tmp_path / "out"), "max_steps": 6,
        "per_device_train_batch_size": 4, "max_completion_length": 6, "use_cpu": True, "bf16": False,
        "gradient_checkpointing": False, "report_to": "none", "save_strategy": "steps", "save_steps": 2,
        "logging_steps": 1, "seed": 5, "learning_rate": 0.01, "teacher_model_init_kwargs": {"dtype": "float32"},
        **extra,
    }
    path = tmp_path / name
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in lines.items()) + "\n")
    return str(path)


def weights(folder):
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors.update({f"heads.{k}": v for k, v in load_file(os.path.join(folder, "amm_q_heads.safetensors")).items()})
    return tensors


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"tensors differ: {different}"


def train_one_thread(argv):
    """`amm-trl train` in this process on one thread, as the `amm-trl train` processes of the fault-injection test
    (OMP_NUM_THREADS=1): a thread count changes the order of float sums, and resumed runs are compared bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at steps 2, 4, 6), the reference of the resume tests."""
    tmp = tmp_path_factory.mktemp("reference")
    train_one_thread(["--config", recipe(tmp, tiny)])
    out = tmp / "out"
    initial = load_file(os.path.join(tiny["student"], "model.safetensors"))
    final = weights(out)
    assert any(not (final[k] == v).all() for k, v in initial.items())  # training moved the student ...
    assert all((t != 0).any() for k, t in final.items() if k.startswith("heads."))  # ... and the heads
    return out


def copy_run(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


# --------------------------------------------------------------------------------------------------- the rule
def test_rule_names_what_is_missing_or_cut(trained, tmp_path):
    out = copy_run(trained, tmp_path / "out")
    ck = out / "checkpoint-6"
    assert checkpoint_problem(str(ck)) is None and checkpoint_problem(str(out / "checkpoint-4")) is None

    state = (ck / "trainer_state.json").read_text()
    (ck / "trainer_state.json").write_text(state[: len(state) // 2])  # killed while writing it
    assert checkpoint_problem(str(ck)) == "trainer_state.json is not valid JSON (cut off while being written)"
    (ck / "trainer_state.json").write_text(state.replace('"global_step": 6', '"global_step": 5'))
    assert checkpoint_problem(str(ck)) == "trainer_state.json records global_step 5, not 6"
    (ck / "trainer_state.json").write_text(state)
    heads = (ck / "amm_q_heads.safetensors").read_bytes()
    (ck / "amm_q_heads.safetensors").write_bytes(heads[:-10])
    cut = f"amm_q_heads.safetensors is truncated ({len(heads) - 10} bytes of {len(heads)})"
    assert checkpoint_problem(str(ck)) == cut
    (ck / "amm_q_heads.safetensors").write_bytes(heads[:4])
    assert checkpoint_problem(str(ck)) == "amm_q_heads.safetensors has no valid safetensors header"
    (ck / "amm_q_heads.safetensors").write_bytes(heads)
    (ck / "trainer_state.json").unlink()
    assert checkpoint_problem(str(ck)) == "trainer_state.json is missing"


def test_half_written_newest_checkpoint_is_skipped_with_a_warning_and_resume_matches(trained, tiny, tmp_path):
    """The issue's case: model file truncated and trainer_state.json missing in the newest checkpoint."""
    out = copy_run(trained, tmp_path / "out")
    ck = out / "checkpoint-6"
    model = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(model[: len(model) // 3])
    (ck / "trainer_state.json").unlink()
    for name in ("model.safetensors", "amm_q_heads.safetensors"):
        os.remove(out / name)  # the final save of that run never happened either

    assert latest_complete_checkpoint(str(out)) == (str(out / "checkpoint-4"),
                                                    [(str(out / "checkpoint-6"), "trainer_state.json is missing")])
    import logging

    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        with pytest.warns(UserWarning, match=r"Skipping incomplete checkpoint\(s\) checkpoint-6 \(trainer_state.json "
                                             r"is missing\): their writing was interrupted; resuming from "
                                             r"checkpoint-4"):
            train_one_thread(["--config", recipe(tmp_path, tiny), "--resume_from_checkpoint", "latest"])
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    # the heads come from their own file: no "missing keys" report about them
    assert not [r for r in records if "missing keys" in r.getMessage()]
    assert checkpoint_problem(str(ck)) is None  # step 6 was written again, whole
    assert_same_weights(weights(out), weights(trained))


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "checkpoint-7"
    ck.mkdir()
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='.*checkpoint-7' is not a complete checkpoint: "
                                         r"trainer_state.json is missing\. Pass a complete checkpoint-N folder, or "
                                         r"`latest`"):
        resolve_resume(str(ck), str(tmp_path))
    assert resolve_resume("latest", str(tmp_path / "nothing-here")) is None  # fresh start


def test_module_cli_and_slurm_templates_share_the_rule(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "out")
    (out / "checkpoint-6" / "trainer_state.json").write_text("{")
    (out / "checkpoint-9").mkdir()
    assert checkpoints_main(["latest", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "checkpoint-4")
    assert "checkpoint-9 (trainer_state.json is missing); checkpoint-6 (trainer_state.json is not valid JSON" \
        in captured.err
    assert checkpoints_main(["check", str(out / "checkpoint-6")]) == 1

    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHON": sys.executable}
    for template in ("single_node", "multi_node", "vllm_server"):
        path = os.path.join(ROOT, "slurm", f"{template}.sbatch")
        function = subprocess.run(["sed", "-n", "/^latest_checkpoint() {/,/^}/p", path], capture_output=True,
                                  text=True, check=True).stdout
        assert "amm_trl.checkpoints latest" in function, template
        run = subprocess.run(["bash", "-c", f'{function}\nlatest_checkpoint "$1"', "_", str(out)], env=env,
                             capture_output=True, text=True, check=True)
        assert run.stdout.strip() == str(out / "checkpoint-4"), (template, run.stderr)
        assert "checkpoint-6 (trainer_state.json is not valid JSON" in run.stderr


def test_stale_checkpoint_of_an_earlier_run_is_replaced_not_mixed(trained, tiny, tmp_path):
    """Resuming from checkpoint-4 while an earlier run's checkpoint-6 folder exists: step 6 is written afresh."""
    out = copy_run(trained, tmp_path / "out")
    (out / "checkpoint-6" / "stale_leftover.bin").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"checkpoint-6 holds a complete checkpoint of an earlier run; it is "
                                         r"replaced"):
        train_one_thread(["--config", recipe(tmp_path, tiny), "--resume_from_checkpoint",
                          str(out / "checkpoint-4")])
    assert not (out / "checkpoint-6" / "stale_leftover.bin").exists()
    assert checkpoint_problem(str(out / "checkpoint-6")) is None
    assert_same_weights(weights(out), weights(trained))


# ---------------------------------------------------------------------------------------------- fault injection
def test_sigkill_while_writing_a_checkpoint_then_resume_latest_gives_the_same_weights(trained, tiny, tmp_path):
    """A real `amm-trl train` process is killed (SIGKILL) while checkpoint-4 is half-written (model, heads,
    optimizer and scheduler on disk; RNG states and trainer_state.json not yet). `--resume_from_checkpoint latest`
    skips it, naming it, resumes from checkpoint-2 and ends with the weights of an uninterrupted run."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HOLD_STEP": "4",
           "HOLD_READY": str(tmp_path / "ready")}
    runner = [sys.executable, os.path.join(ROOT, "tests", "slow_checkpoint.py"), "train"]
    args = []
    config = recipe(tmp_path, tiny, output_dir=str(tmp_path / "out"))
    proc = subprocess.Popen(runner + ["--config", config] + args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(env["HOLD_READY"]):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "checkpoint-4 was never reached"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    assert (out / "checkpoint-4" / "model.safetensors").exists()  # half-written: files there, no trainer_state.json
    assert checkpoint_problem(str(out / "checkpoint-4")) == "trainer_state.json is missing"

    resumed = subprocess.run(runner + ["--config", config] + args + ["--resume_from_checkpoint", "latest"],
                             env={**env, "HOLD_STEP": "none"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("Skipping incomplete checkpoint(s) checkpoint-4 (trainer_state.json is missing): their writing was "
            "interrupted; resuming from checkpoint-2") in resumed.stderr
    for step in (4, 6):
        assert checkpoint_problem(str(out / f"checkpoint-{step}")) is None
    assert_same_weights(weights(out), weights(trained))  # the uninterrupted run's
    assert_same_weights(weights(out / "checkpoint-6"), weights(trained / "checkpoint-6"))
    print(f"fault injection: {time.monotonic() - t0:.1f} s")


def test_python_api_resume_true_applies_the_rule(trained, tiny, tiny_dataset, tmp_path):
    """`trainer.train(resume_from_checkpoint=True)`, the Trainer's "newest checkpoint", skips incomplete ones too."""
    from amm_trl import AMMConfig, AMMTrainer

    out = copy_run(trained, tmp_path / "out")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    args = AMMConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=6, per_device_train_batch_size=4,
                     max_completion_length=6, report_to="none", save_strategy="no", logging_steps=1, seed=5,
                     learning_rate=0.01, gradient_checkpointing=False, model_init_kwargs={"dtype": "float32"},
                     teacher_model_init_kwargs={"dtype": "float32"})
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args, train_dataset=tiny_dataset)
    with pytest.warns(UserWarning,
                      match=r"checkpoint-6 \(trainer_state.json is missing\).*resuming from checkpoint-4"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]  # 1-4 restored

    trainer.args.output_dir = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True: no complete checkpoint in output_dir"):
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------- preemption and the lock
def start_run(tmp_path, config, ready_name, **env_extra):
    """A real `amm-trl train` (tests/slow_checkpoint.py) on one thread, its stdout and stderr in files."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HOLD_STEP": "none",
           "HOLD_READY": str(tmp_path / ready_name), **env_extra}
    out, err = open(tmp_path / f"{ready_name}.out", "w"), open(tmp_path / f"{ready_name}.err", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "slow_checkpoint.py"), "train", "--config",
                             config], env=env, stdout=out, stderr=err, text=True)
    return proc, env["HOLD_READY"]


def wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_saves_a_complete_checkpoint_exits_143_and_resume_matches(trained, tiny, tmp_path):
    """slurm's preemption signal: a real `amm-trl train` (checkpoints every 2 steps) gets SIGTERM inside step 3.
    The step finishes, checkpoint-3 is saved complete (off the save schedule), the process exits with 143, and
    `--resume_from_checkpoint latest` continues from step 3 to the uninterrupted run's weights."""
    config = recipe(tmp_path, tiny, output_dir=str(tmp_path / "out"))
    proc, ready = start_run(tmp_path, config, "ready", STEP_READY="2")
    try:
        wait_for(ready, proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    stdout, stderr = (tmp_path / "ready.out").read_text(), (tmp_path / "ready.err").read_text()
    assert rc == 128 + signal.SIGTERM, (rc, stderr[-3000:])
    out = tmp_path / "out"
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert not (out / "checkpoint-4").exists() and not (out / "model.safetensors").exists()  # stopped, not finished
    assert "got SIGTERM: saving a checkpoint at the end of this step" in stdout
    assert (f"got SIGTERM: saved {out / 'checkpoint-3'} at step 3 and stopped. Resume with --resume_from_checkpoint "
            f"latest") in stderr
    assert "student saved" not in stdout
    resumed = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", "--config", config,
                              "--resume_from_checkpoint", "latest"], env={**os.environ, "PYTHONPATH": ROOT,
                             "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(out), weights(trained))


def test_second_run_on_a_busy_output_dir_is_refused_and_a_killed_run_never_blocks_it(tiny, tmp_path):
    """Run A trains in output_dir (held while writing checkpoint-2); run B (same recipe: a second sbatch, a requeue
    racing a manual restart) stops
    before loading any model, naming A's pid and host, and A's files are untouched. After A is killed (SIGKILL:
    no clean-up ran), run C takes the folder over and finishes."""
    import socket

    config = recipe(tmp_path, tiny, output_dir=str(tmp_path / "out"))
    proc, ready = start_run(tmp_path, config, "a_ready", HOLD_STEP="2")  # A holds still inside its checkpoint-2
    try:
        wait_for(ready, proc)
        lock = tmp_path / "out" / ".amm-trl.lock"
        assert json.loads(lock.read_text())["pid"] == proc.pid
        before = sorted(str(p) for p in (tmp_path / "out").rglob("*"))
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", "--config", config],
                                env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert (f"output_dir={str(tmp_path / 'out')!r} is in use by the run with pid {proc.pid} on host "
                f"{socket.gethostname()}, started ") in second.stderr, second.stderr[-3000:]
        assert "Wait for that run to end (or stop it), or pass another --output_dir" in second.stderr
        assert "Loading" not in second.stderr and time.monotonic() - start < 60
        assert sorted(str(p) for p in (tmp_path / "out").rglob("*")) == before
        assert proc.poll() is None  # A goes on
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert lock.exists()  # SIGKILL left the file, but not the lock
    third = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", "--config", config, "--max_steps", "2"],
                           env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "student saved" in third.stdout and not lock.exists()  # released on a normal exit


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs (real ENOSPC): room for one checkpoint of the tiny run (~400 KiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_says_so_and_the_last_checkpoint_resumes(trained, tiny, tmp_path, small_disk):
    """A real `amm-trl train` whose output_dir fills up while checkpoint-4 is written: the error says the disk is
    full, which folder, how much one checkpoint needs and that checkpoint-2 is intact; checkpoint-2 is complete."""
    out = small_disk / "out"
    config = recipe(tmp_path, tiny, output_dir=str(out))
    run = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", "--config", config],
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    assert f"Disk full while writing {out / 'checkpoint-4'}: " in run.stderr, run.stderr[-3000:]
    assert "MiB free on the file system of output_dir" in run.stderr
    assert "a checkpoint of this run takes about 0.4 MiB (checkpoint-2)" in run.stderr
    assert f"the newest complete checkpoint, {out / 'checkpoint-2'}, is intact" in run.stderr
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    assert checkpoint_problem(str(out / "checkpoint-4")) is not None
    assert_same_weights(weights(out / "checkpoint-2"), weights(trained / "checkpoint-2"))
