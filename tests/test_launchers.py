"""Launchers without slurm, on CPU, with the real `python -m amm_trl.cli train` and the tiny models of tests/tiny.py
under ZeRO-3 (gloo, 2 ranks, every parameter partitioned):

* reference: `torchrun --nproc_per_node 2` on one "node";
* two-node rendezvous simulated on one machine: two `torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d
  --rdzv_endpoint 127.0.0.1:PORT` agents, one rank each, must give the reference's weights and losses;
* the `deepspeed` launcher (`python -m deepspeed.launcher.runner`, the console script is often not on PATH) with a
  hostfile naming `localhost slots=2`, same result.

ZeRO-3 comes in through the recipe's `deepspeed: <json>` (transformers' `--deepspeed`), see docs/launching.md.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from slurm_cluster import (  # tests/ is on sys.path (pytest rootdir-relative import)
    REPO,
    final_weights,
    free_port,
    launch_env,
    logged_steps,
    tiny_assets,
    tiny_recipe,
    trainer_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
RUN_TIMEOUT = 300
TRAIN = ["-m", "amm_trl.cli", "train"]


def _start(cmd, env, log_path):
    log = open(log_path, "w")
    p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                         start_new_session=True)
    log.close()
    return p


def _finish(procs, logs, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        raise AssertionError(f"timed out after {timeout}s:\n" + "\n".join(_tail(x) for x in logs)) from None
    bad = [(p.args, p.returncode) for p in procs if p.returncode != 0]
    assert not bad, f"{bad}\n" + "\n".join(_tail(x) for x in logs)


def _tail(path, n=8000):
    with open(path, errors="replace") as f:
        return f"==== {path}\n{f.read()[-n:]}"


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _assert_same_run(out, ref_out):
    a, b = final_weights(out), final_weights(ref_out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    la = [h["loss"] for h in trainer_state(os.path.join(out, "checkpoint-4"))["log_history"] if "loss" in h]
    lb = [h["loss"] for h in trainer_state(os.path.join(ref_out, "checkpoint-4"))["log_history"] if "loss" in h]
    assert len(la) == 4 and la == pytest.approx(lb, rel=0, abs=1e-6)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(str(tmp_path_factory.mktemp("tiny-assets")))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """One node, 2 ranks: `torchrun --nproc_per_node 2`."""
    root = tmp_path_factory.mktemp("ref")
    out = str(root / "out")
    recipe = tiny_recipe(str(root / "recipe.yaml"), assets, out, deepspeed=assets["ds_config"])
    t0 = time.monotonic()
    log = str(root / "torchrun.log")
    p = _start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *TRAIN, "--config", recipe],
               launch_env(), log)
    _finish([p], [log])
    assert logged_steps(_read(log)) == [1, 2, 3, 4]
    # training moved the weights (so equal results below mean something)
    init = final_weights(assets["student"])
    trained = final_weights(out)
    assert any((trained[k] - init[k]).abs().max() > 1e-4 for k in init if k in trained)
    print(f"\nreference torchrun --nproc_per_node 2: {time.monotonic() - t0:.1f}s")
    return {"out": out, "recipe": recipe}


def test_two_node_rendezvous_matches_single_node(assets, reference, tmp_path):
    out = str(tmp_path / "out")
    recipe = tiny_recipe(str(tmp_path / "recipe.yaml"), assets, out, deepspeed=assets["ds_config"])
    port = free_port()
    env = launch_env()
    procs, logs = [], []
    t0 = time.monotonic()
    for node_rank in (0, 1):
        log = str(tmp_path / f"node{node_rank}.log")
        procs.append(_start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                             "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_id", "amm-two-node",
                             "--rdzv_endpoint", f"127.0.0.1:{port}", *TRAIN, "--config", recipe], env, log))
        logs.append(log)
    _finish(procs, logs)
    # rank 0 (whichever agent got it) logged all 4 steps; the world had 2 ranks: same data split as the reference
    steps = [logged_steps(_read(x)) for x in logs]
    assert sorted(steps) == [[], [1, 2, 3, 4]], steps
    _assert_same_run(out, reference["out"])
    print(f"\ntwo-node rendezvous (2 torchrun agents x 1 rank): {time.monotonic() - t0:.1f}s")


def test_deepspeed_launcher_with_localhost_hostfile(assets, reference, tmp_path):
    out = str(tmp_path / "out")
    recipe = tiny_recipe(str(tmp_path / "recipe.yaml"), assets, out, deepspeed=assets["ds_config"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    log = str(tmp_path / "deepspeed.log")
    t0 = time.monotonic()
    # --no_ssh_check: a one-host hostfile runs locally (no pdsh/ssh); --no_local_rank: the CLI takes a subcommand
    # first, and LOCAL_RANK is in the environment anyway
    p = _start([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh_check",
                "--no_local_rank", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "--module", "amm_trl.cli", "train", "--config", recipe], launch_env(), log)
    _finish([p], [log])
    text = _read(log)
    assert "dist_world_size=2" in text and logged_steps(text) == [1, 2, 3, 4]
    _assert_same_run(out, reference["out"])
    print(f"\ndeepspeed launcher (hostfile localhost slots=2): {time.monotonic() - t0:.1f}s")
