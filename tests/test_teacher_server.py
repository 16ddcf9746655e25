"""The teacher served by a real vLLM server on CPU (`vllm serve`, vLLM's CPU build, marker `vllm`):

* with k = the vocabulary, the served top-k gives the local teacher's loss and gradients on the same batch; so do a
  pooling server's hidden states through the teacher's output layer (exact, teacher features, temperature 0.8);
* AMM trains against it with 1 rank, and with 2 ranks under ZeRO-3 (`amm-trl train --accelerate_config zero3_cpu`);
* a k beyond the server's `--max-logprobs` is refused at start-up naming the flag;
* a server that dies mid-run stops training with a clear error (1 rank, and 2 ranks under ZeRO-3: both stop), and
  every checkpoint already written is whole.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_vllm_cpu import ENV, HEAD_DIM, free_port, stop_server, worker_env

pytestmark = pytest.mark.vllm
VOCAB = 64  # tests/tiny.py: the tokenizer's 64 tokens, the models' rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.tiny import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("teacher_server_assets")), head_dim=HEAD_DIM)


def start_server(model, folder, extra=("--max-logprobs", str(VOCAB))):
    """`vllm serve MODEL` (the OpenAI server) on 127.0.0.1 in fp32; returns (url, process, log path)."""
    port = free_port()
    log_path = os.path.join(folder, f"server-{port}.log")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=folder, env={**worker_env(), "CUDA_VISIBLE_DEVICES": ""}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    from amm_trl.rollouts import wait_for_health

    deadline, problem = time.monotonic() + 240, "not polled"
    while proc.poll() is None and time.monotonic() < deadline and problem is not None:  # a server that died: at once
        problem = wait_for_health(url, 5)
    if problem is not None:
        stop_server(proc)
        pytest.fail(f"the teacher server did not start ({problem}):\n{open(log_path).read()[-4000:]}")
    return url, proc, log_path


@pytest.fixture(scope="module")
def teacher_server(assets, tmp_path_factory):
    url, proc, log = start_server(assets["teacher"], str(tmp_path_factory.mktemp("teacher_server")))
    yield {"url": url, "proc": proc, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def pooling_server(assets, tmp_path_factory):
    """The teacher as a pooling server: its last hidden state at every position (`teacher_server_output`)."""
    from amm_trl.teacher import POOLER_CONFIG

    url, proc, log = start_server(assets["teacher"], str(tmp_path_factory.mktemp("pooling_server")),
                                  extra=("--runner", "pooling", "--pooler-config", POOLER_CONFIG))
    yield {"url": url, "proc": proc, "log": log}
    stop_server(proc)


def served_and_local(assets, tmp_path, monkeypatch, served_fields, local_fields=None, **common):
    """An AMMTrainer on the served teacher, one on the local teacher (same student; `local_fields` its own), and one
    batch of the first."""
    from datasets import load_dataset

    from amm_trl import AMMTrainer
    from tests.test_trainer import fixed_batch, make_config

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    dataset = load_dataset("json", data_files=assets["data"], split="train")
    common = dict(objective="amm", max_completion_length=6, loss_chunk_tokens=3, **common)
    served = AMMTrainer(model=assets["student"], args=make_config(tmp_path / "served", teacher_placement="server",
                                                                  **served_fields, **common), train_dataset=dataset)
    assert served.teacher_model is None and served.served_teacher is not None
    local = AMMTrainer(model=assets["student"], teacher_model=assets["teacher"],
                       args=make_config(tmp_path / "local", **(local_fields or {}), **common), train_dataset=dataset)
    local.model.load_state_dict(served.model.state_dict())
    torch.manual_seed(0)
    return served, local, fixed_batch(served, dataset)


def check_same_loss_and_gradients(served, local, inputs):
    from tests.test_objectives_extra import student_params
    from tests.test_trainer import grads

    def loss_and_grads(trainer):
        params = student_params(trainer) + list(trainer.q_heads.parameters())
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.item(), grads(params)

    served_loss, served_grads = loss_and_grads(served)
    local_loss, local_grads = loss_and_grads(local)
    assert served_loss == pytest.approx(local_loss, rel=1e-4, abs=1e-6)
    assert any(g.abs().sum() > 0 for g in served_grads)
    for got, want in zip(served_grads, local_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_served_hidden_states_give_the_local_teachers_loss_and_gradients_at_any_temperature(
        assets, pooling_server, tmp_path, monkeypatch):
    """The pooling server's hidden states through the teacher's own output layer (read alone from its checkpoint):
    exact, so the critic may read teacher features and the temperature is free."""
    served, local, inputs = served_and_local(
        assets, tmp_path, monkeypatch, dict(teacher_server_base_url=pooling_server["url"],
                                            teacher_server_output="hidden_states",
                                            teacher_model_name_or_path=assets["teacher"]),
        q_head_features="teacher", temperature=0.8)
    assert served._teacher_head is not None and inputs["teacher_hidden"].shape[-1] == 48
    check_same_loss_and_gradients(served, local, inputs)


def test_a_pooling_server_is_required_for_hidden_states(assets, teacher_server, tmp_path):
    from amm_trl import AMMTrainer
    from tests.test_trainer import make_config

    with pytest.raises(ValueError, match=r"teacher_server_output 'hidden_states': the server at .* gives no token "
                                         r"hidden states .*--runner pooling"):
        AMMTrainer(model=assets["student"], args=make_config(
            tmp_path, objective="fkl", teacher_placement="server", teacher_server_base_url=teacher_server["url"],
            teacher_server_output="hidden_states", teacher_model_name_or_path=assets["teacher"]))


def test_served_top_k_with_k_equal_to_the_vocabulary_gives_the_local_teachers_loss_and_gradients(
        assets, teacher_server, tmp_path, monkeypatch):
    served, local, inputs = served_and_local(
        assets, tmp_path, monkeypatch, dict(teacher_server_base_url=teacher_server["url"], teacher_top_k=VOCAB))
    assert inputs["teacher_topk_ids"].shape[-1] == VOCAB and "off_teacher_topk_ids" in inputs

    check_same_loss_and_gradients(served, local, inputs)
    metrics = {k: v[-1] for k, v in served._metrics["train"].items()}
    assert metrics["teacher_mass/on"] == pytest.approx(1.0, abs=1e-4)


def test_served_top_5_with_the_taken_bucket_gives_the_local_teachers_top_5_view(
        assets, teacher_server, tmp_path, monkeypatch):
    """A real server's top-5 and the taken tokens' log-probs (`teacher_top_k_taken_bucket`): the loss and gradients of
    the local teacher's top-5 + taken + tail view, on rollouts (the student's samples) and the dataset's answers."""
    served, local, inputs = served_and_local(
        assets, tmp_path, monkeypatch, dict(teacher_server_base_url=teacher_server["url"], teacher_top_k=5),
        local_fields=dict(teacher_local_top_k=5), teacher_top_k_taken_bucket=True)
    assert inputs["teacher_topk_ids"].shape[-1] == 5
    taken = inputs["completion_ids"][..., None]
    outside = ~(inputs["teacher_topk_ids"] == taken).any(-1) & inputs["completion_mask"].bool()
    assert outside.any()  # some sampled tokens are outside the teacher's top-5: their buckets are in play
    check_same_loss_and_gradients(served, local, inputs)


def test_generate_with_vllm_writes_the_top_k_of_its_own_sampling_engine(assets, tmp_path):
    """`amm-trl generate --use_vllm true --teacher_top_k K`: one vLLM engine samples and gives each sampled token's
    top-k log-probs (temperature 1), equal to the teacher's own distribution (HF forward, fp16 tolerance)."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cache.parquet"
    proc = subprocess.run([sys.executable, "-m", "amm_trl.cli", "generate", "--model_name_or_path", assets["teacher"],
                           "--dataset_name", assets["data"], "--output_file", str(out), "--max_new_tokens", "6",
                           "--teacher_top_k", "8", "--use_vllm", "true", "--max_samples", "6", "--temperature",
                           "0.7", "--dtype", "float32"], cwd=str(tmp_path), env=worker_env(), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        n = len(row["prompt_ids"])
        at = log_probs[n - 1:n - 1 + len(row["completion_ids"])]  # temperature 1, whatever the sampling's
        torch.testing.assert_close(torch.tensor(row["teacher_topk_logprobs"]), at.topk(8, -1).values, rtol=2e-3,
                                   atol=2e-3)
        taken = at.gather(-1, torch.tensor(row["completion_ids"])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(row["teacher_token_logprob"]), taken, rtol=1e-4, atol=1e-4)


def recipe(tmp_path, assets, url, **extra):
    lines = {"model_name_or_path": assets["student"], "dataset_name": assets["data"], "dtype": "float32",
             "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
             "max_completion_length": 6, "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
             "report_to": "none", "save_strategy": "steps", "save_steps": 1, "logging_steps": 1, "seed": 5,
             "learning_rate": 0.01, "objective": "amm", "teacher_placement": "server", "teacher_server_base_url": url,
             "teacher_top_k": 16, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in lines.items()) + "\n")
    return str(path)


def run_train(tmp_path, argv, timeout=400):
    proc = subprocess.run([sys.executable, "-m", "amm_trl.cli", "train", *argv], cwd=str(tmp_path),
                          env=worker_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("ranks", [1, 2], ids=["1rank", "2ranks_zero3"])
def test_amm_trains_against_the_served_teacher(assets, teacher_server, tmp_path, ranks):
    argv = ["--config", recipe(tmp_path, assets, teacher_server["url"])]
    if ranks == 2:
        argv += ["--accelerate_config", "zero3_cpu", "--num_processes", "2"]
    rc, log = run_train(tmp_path, argv)
    assert rc == 0, log[-6000:]
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs), logs
    for h in logs:  # the served top-16 of a near-uniform tiny teacher holds part of its mass
        assert 0.2 < h["teacher_mass/on"] < 1.0 and 0.0 <= h["overlap_ratio/off"] <= 1.0, h
    assert teacher_server["proc"].poll() is None


def test_a_top_k_beyond_the_servers_max_logprobs_is_refused_at_start_up(assets, teacher_server, tmp_path):
    rc, log = run_train(tmp_path, ["--config", recipe(tmp_path, assets, teacher_server["url"], teacher_top_k=80)])
    assert rc != 0 and ("refuses 80 log-probs per token (teacher_top_k=80): restart it with `--max-logprobs 80`"
                        in log), \
        log[-4000:]
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_a_teacher_server_that_hangs_fails_within_the_request_timeout_naming_it():
    """A stand-in server that answers /health and /v1/models but never a completion: TRL's client has no timeout of its
    own, so without `teacher_server_request_timeout` the start-up probe (and any step) would wait for good."""
    import http.server
    import threading
    import time

    from amm_trl.teacher import ServedTeacher, TeacherServerError

    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "teacher"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            release.wait(30)  # hangs

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    import trl.generation.vllm_client  # noqa: F401  (its imports take seconds: not part of the time measured)

    start = time.monotonic()
    try:
        with pytest.raises(TeacherServerError, match=rf"The teacher server at {url} gave no answer within "
                                                     r"teacher_server_request_timeout=0.5 s .*resume with"):
            ServedTeacher(url, top_k=4, timeout=10, request_timeout=0.5)
        # one try: a request that timed out is not sent again (TRL's 5 retries would back off 2 + 4 + ... = 62 s)
        assert time.monotonic() - start < 5
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (/proc/PID/stat: state, ppid, pgrp after the command name)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if entry.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":  # a zombie holds nothing
            pids.append(int(entry))
    return pids


def crash(proc) -> None:
    """Kills a server's whole process group at once (SIGKILL: a crash, no shutdown) and then removes the /dev/shm
    files its processes had mapped or open (vLLM's message queues and semaphores, which a killed server cannot give
    back), so that what is left in /dev/shm afterwards is the trainer's own doing."""
    shm = set()
    for pid in _group(proc.pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                shm.update(line.split(None, 5)[5].strip() for line in f if " /dev/shm/" in line)
            shm.update(t for t in (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
                       if t.startswith("/dev/shm/"))
        except OSError:
            continue
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in shm:
        try:
            os.unlink(path.removesuffix(" (deleted)"))
        except OSError:
            pass


def train_until_the_server_dies(tmp_path, assets, url, kill, argv=()):
    """Trains against `url` until checkpoint-2 is written, then `kill()`s the server; the run's return code and log
    (it must have stopped by itself within 300 s), after checking that every checkpoint it left is whole."""
    from amm_trl.checkpoints import checkpoint_problem

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "amm_trl.cli", "train", "--config",
                             recipe(tmp_path, assets, url, max_steps=200), *argv], cwd=str(tmp_path),
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        kill()
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    checkpoints = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert len(checkpoints) >= 2 and all(checkpoint_problem(str(p)) is None for p in checkpoints), checkpoints
    return proc.returncode, log


def test_a_server_that_dies_under_two_zero3_ranks_stops_both_and_loses_no_checkpoint(assets, teacher_server, tmp_path):
    """Each rank asks the server itself: when it dies, a rank's request fails, the launcher stops the other rank (no
    rank is left waiting in a ZeRO-3 collective) and the run exits naming the server. The server's crash is its
    relay's SIGKILL (`tests/relay.py`), so the module's server lives on for the last test."""
    port = free_port()
    relay = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "relay.py"),
                              teacher_server["url"], str(port)], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        from amm_trl.rollouts import wait_for_health

        assert wait_for_health(url, 30) is None
        start = time.monotonic()
        rc, log = train_until_the_server_dies(
            tmp_path, assets, url, lambda: os.killpg(relay.pid, signal.SIGKILL),
            argv=("--accelerate_config", "zero3_cpu", "--num_processes", "2"))
    finally:
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
        relay.wait()
    assert rc != 0
    assert f"The teacher server at {url} stopped answering" in log and "resume with --resume_from_checkpoint" in log, \
        log[-4000:]
    assert time.monotonic() - start < 240  # the run stopped; no rank hung in a collective
    assert teacher_server["proc"].poll() is None


def test_a_server_that_dies_mid_run_stops_training_and_loses_no_checkpoint(assets, teacher_server, tmp_path):
    """Kills the module's server: the last test of this file."""
    url, server = teacher_server["url"], teacher_server["proc"]
    try:
        rc, log = train_until_the_server_dies(tmp_path, assets, url, lambda: crash(server))
    finally:
        stop_server(server)
    assert rc != 0
    assert f"The teacher server at {url} stopped answering" in log and "resume with --resume_from_checkpoint" in log, \
        log[-4000:]
