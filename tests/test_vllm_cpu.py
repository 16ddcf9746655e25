"""The real vLLM engine on CPU (vLLM's CPU build, `bash .ci/vllm_env.sh`): colocated rollouts with 1 and 2 ranks
(torchrun, gloo, vLLM tensor parallel 2) under ZeRO-3, full and LoRA students; the importance-sampling correction
with vLLM's own log-probs; server mode against a `trl vllm-serve` this test starts and stops.

The check of a weight sync: vLLM samples completions of fixed probe prompts and returns each sampled token's
log-prob; the trainer scores the same tokens with its own fp32 forward. Right after a sync the two agree to a tight
tolerance; just before it (the trainer has taken an optimizer step since the last sync) they differ by far more, so
the comparison sees a stale engine. Every sync of the run is checked, plus one after training. The stream each sync
reads is recorded: the student's weights (LoRA merged, HF names), never a Q-head or an adapter tensor.

Each case runs in its own process (`python tests/test_vllm_cpu.py WORKER ...`, under torchrun for ZeRO-3): vLLM
replaces `torch.set_num_threads` and keeps its engine state per process. Models: tests/tiny.py with head_dim 32
(vLLM's CPU attention supports 32, 64, ...), fp32 on both sides.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
THIS = os.path.abspath(__file__)
HEADS = "amm_q_heads"
HEAD_DIM = 32
PROBE_PROMPTS = [[6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24], [30, 31]]
PROBE_TOKENS = 8  # sampled with `ignore_eos` and no `min_tokens`: min_tokens masks the end tokens, which shifts
# vLLM's processed log-probs (renormalized without them) away from the model's
# |log p_vLLM - log p_trainer| per sampled token, both in fp32. Measured: at most 5e-7 right after a sync (and on the
# initial weights); 0.12 - 0.2 on average while the engine still holds the previous step's weights.
AFTER_SYNC_MEAN, AFTER_SYNC_MAX = 1e-5, 1e-4
BEFORE_SYNC_MIN = 3e-2  # mean over the probe tokens when the engine holds the previous step's weights
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's default asks for most of the machine's memory
       "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.vllm


# ------------------------------------------------------------------------------------------------- helpers
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env():
    # DeepSpeed's CPU comm op is compiled per torch build: a cache of this environment's own (`.ci/vllm_env.sh`
    # builds it there) avoids rebuilding it whenever another environment used the shared default cache.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return {**os.environ, **ENV, "TORCH_EXTENSIONS_DIR": extensions,
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_worker(tmp_path, assets, *flags, ranks=1, timeout=400):
    """`python tests/test_vllm_cpu.py train ASSETS OUT FLAGS` under torchrun (`ranks` processes); its JSON report."""
    out = str(tmp_path / "report.json")
    assets = os.path.dirname(assets["data"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), THIS, "train", assets, out, *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"worker {flags} did not finish within {timeout}s:\n{log[-6000:]}")
    assert proc.returncode == 0 and os.path.exists(out), \
        f"worker {flags} failed (rc {proc.returncode}):\n{log[-8000:]}"
    with open(out) as f:
        report = json.load(f)
    print(f"\n[{' '.join(flags)} ranks={ranks}] {time.perf_counter() - start:.0f}s: {json.dumps(report)[:2000]}")
    return report


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.tiny import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("vllm_cpu_assets")), head_dim=HEAD_DIM)


def check_syncs(report, n_syncs):
    """Every sync: vLLM's sampled-token log-probs equal the trainer's after it, and were far from them before it
    whenever the trainer had moved on (every sync but the first, which finds the engine on the initial weights)."""
    syncs = report["syncs"]
    assert len(syncs) == n_syncs, syncs
    for i, s in enumerate(syncs):
        assert s["tokens"] == len(PROBE_PROMPTS) * PROBE_TOKENS
        assert s["after"]["mean"] <= AFTER_SYNC_MEAN and s["after"]["max"] <= AFTER_SYNC_MAX, (i, s)
        if s["trainer_moved"]:
            assert s["before"]["mean"] >= BEFORE_SYNC_MIN, (i, s)
            assert s["before"]["mean"] > 1000 * s["after"]["mean"], (i, s)
    assert sum(s["trainer_moved"] for s in syncs) >= n_syncs - 1


def check_stream(report, lora):
    assert report["streamed_heads"] == [] and report["streamed_adapters"] == []
    assert report["streamed_missing"] == [] and report["streamed_unexpected"] == []
    assert report["heads_total"] > 0
    if lora:  # non-zero adapters from the start: the first sync (merged weights) changes what vLLM computes
        assert report["lora_b_max"] > 0
        assert report["syncs"][0]["before"]["mean"] >= BEFORE_SYNC_MIN, report["syncs"][0]


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ranks", [1, 2], ids=["1rank", "2ranks_tp2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_colocated_sync_under_zero3_makes_vllm_score_like_the_trainer(assets, tmp_path, ranks, lora):
    """Two AMM steps under ZeRO-3 with colocated vLLM (tensor parallel = ranks). TRL syncs before each step's
    rollouts; each of those syncs and one after training is checked (`check_syncs`), the stream too."""
    flags = ["--lora"] if lora else []
    report = run_worker(tmp_path, assets, *flags, ranks=ranks)
    assert report["zero3_active"] and report["partitioned"]
    assert report["world_size"] == ranks and report["vllm_tp_size"] == ranks
    assert report["generation_class"] == "CPUHeadFreeVLLMGeneration"
    # the engine runs vLLM's packed CPU kernels: TRL's in-place `load_weights` could not update it
    assert report["vllm_qkv"]["numel"] == 0 and not report["vllm_qkv"]["has_weight_loader"]
    assert len(report["losses"]) == 2 and all(math.isfinite(x) for x in report["losses"])
    # an engine of its own name, whose shared memory is already unlinked while it runs (the syncs and rollouts
    # below use it): a kill leaves nothing behind, and the next tensor-parallel engine cannot collide with it
    assert report["vllm_dist_ident"].startswith("amm-trl-") and report["shm_while_running"] == [], report
    check_syncs(report, n_syncs=3)
    check_stream(report, lora)


def test_importance_sampling_correction_with_vllm_logprobs(assets, tmp_path):
    """`vllm_importance_sampling_correction` with the log-probs vLLM returns: rollouts come right after a sync, so
    the logged mismatch is small and the ratios are near 1 (with a stale engine they would not be: see the syncs'
    `before` figures, also asserted here)."""
    report = run_worker(tmp_path, assets, "--is-correction", "--no-zero3")
    check_syncs(report, n_syncs=3)
    sampling = report["sampling"]
    for key in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max"):
        assert len(sampling[key]) == 2 and all(0 <= x <= AFTER_SYNC_MAX for x in sampling[key]), sampling
    for key in ("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max"):
        assert len(sampling[key]) == 2 and all(abs(x - 1) < 1e-3 for x in sampling[key]), sampling


@pytest.fixture
def vllm_server(assets, tmp_path):
    """A real `trl vllm-serve` of the student on 127.0.0.1 (fp32, development endpoints on), stopped afterwards."""
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**worker_env(), "VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": ""}
    # `python -m trl.cli.main` is the `trl` command, also where this environment reuses another's trl (no script here)
    cmd = [sys.executable, "-m", "trl.cli.main", "vllm-serve", "--model", assets["student"],
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max_model_len", "128",
           "--enforce_eager", "true"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "log": log_path, "proc": proc}
    finally:
        stop_server(proc)


def stop_server(proc):
    """SIGTERM to a server's process group, SIGKILL after 30 s; then waits for the whole group: the server's other
    processes (its engine core, multiprocessing's resource tracker, which unlinks the server's /dev/shm segments after
    the server exits) outlive the leader for a moment."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


def test_server_mode_trains_and_weights_reach_the_server(assets, tmp_path, vllm_server):
    """Two AMM steps with rollouts from the real server; each sync (safetensors + the server's `reload_weights`)
    is checked like the colocated ones, through the server's `/v1/completions` log-probs."""
    report = run_worker(tmp_path, assets, "--server", vllm_server["url"], "--no-zero3", timeout=500)
    assert report["generation_class"] == "CPUHeadFreeVLLMGeneration"
    assert len(report["losses"]) == 2 and all(math.isfinite(x) for x in report["losses"])
    check_syncs(report, n_syncs=3)
    check_stream(report, lora=False)
    assert vllm_server["proc"].poll() is None, vllm_server["log"].read_text()[-3000:]


def test_unreachable_server_fails_within_timeout_with_vllm_installed(assets, tmp_path):
    """With vLLM importable TRL's own server checks are live; the trainer's bounded probe still answers first,
    within `vllm_server_timeout`, with the message that names the fields and how to start a server."""
    from amm_trl import AMMTrainer
    from tests.test_trainer import make_config

    port, timeout = free_port(), 3
    from datasets import load_dataset

    ds = load_dataset("json", data_files=assets["data"], split="train")
    args = make_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_timeout=timeout,
                       vllm_server_base_url=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        AMMTrainer(model=assets["student"], teacher_model=assets["teacher"], args=args, train_dataset=ds)
    elapsed = time.monotonic() - start
    assert timeout - 0.5 <= elapsed <= timeout + 3, elapsed
    message = str(info.value)
    for text in (f"No vLLM server answered at http://127.0.0.1:{port}",
                 f"vllm_server_base_url='http://127.0.0.1:{port}'", f"vllm_server_timeout={timeout}",
                 f"trl vllm-serve --model {assets['student']} --port {port}"):
        assert text in message, (text, message)


def packed_env():
    """`worker_env()` with vLLM's packed CPU weight layout forced in every process (tests/vllm_layout.py)."""
    from tests.vllm_layout import FORCE_PACKED_DIR

    env = worker_env()
    return {**env, "PYTHONPATH": FORCE_PACKED_DIR + os.pathsep + env["PYTHONPATH"]}


def run_bench(tmp_path, script, *flags, timeout=400, env=None):
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--tiny", "--models-dir",
           str(tmp_path / "models"), "--json", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and out.exists(), \
        f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}"
    return json.loads(out.read_text())


def test_bench_rollout_tiny_runs_vllm_and_hf(tmp_path):
    """The GPU rollout benchmark's code runs end to end against real vLLM (`--tiny`): both engines produce exactly
    the forced token counts and a ratio is reported."""
    result = run_bench(tmp_path, "bench_rollout", "--vllm-eager")
    assert result["vllm"]["engine"] == "vllm" and result["vllm"]["output_lengths"] == [result["new_tokens"]]
    assert result["token_counts_match"] and result["ratio_vllm_over_hf_best"] > 0
    assert result["run"]["versions"]["vllm"].endswith("+cpu")


def test_bench_step_tiny_runs_both_trainers_with_colocated_vllm(tmp_path):
    """`bench_step.py --tiny --use-vllm 1 --trainers trl,amm`: TRL's trainer and AMM's each run their
    3 steps with rollouts from colocated vLLM, and the ratios are computed. Run with vLLM's packed weight layout
    forced (`tests/vllm_layout.py`), as on CPUs with AVX-512 BF16, where TRL's stock sync fails."""
    result = run_bench(tmp_path, "bench_step", "--use-vllm", "1", "--vllm-eager", "1", "--trainers", "trl,amm",
                       env=packed_env())
    assert result["use_vllm"] and set(result["trainers"]) == {"trl", "amm"}
    for name, r in result["trainers"].items():
        assert "error" not in r, (name, r)
        assert r["steps"] == 3 and len(r["loss"]) == 3 and all(math.isfinite(x) for x in r["loss"]), (name, r)
        assert len(r["sync_s"]) == 3 and r["rollout_tokens_per_step"] == 16, (name, r)
        # TRL's in-place sync cannot update vLLM's packed CPU weights: both trainers sync through the CPU sync
        assert r["weight_sync"].startswith("amm_trl.vllm_cpu.CPUWeightSync: vLLM's CPU build packs"), (name, r)
    assert result["ratio_step_amm_over_trl"] > 0


def test_bench_7b3b_tiny_trains_under_zero3_with_colocated_vllm(tmp_path):
    """`bench_7b3b.py --tiny`: the 7B -> 3B script (re-run under torchrun, ZeRO-3 on gloo) trains its 3 AMM steps
    with rollouts from colocated vLLM and computes its FLOPs / MFU fields."""
    result = run_bench(tmp_path, "bench_7b3b", "--vllm-eager", "1")
    assert result["config"]["use_vllm"] == 1 and result["deepspeed_zero3_active"] and result["fits"], result
    assert len(result["loss"]) == 3 and all(math.isfinite(x) for x in result["loss"]), result
    assert len(result["sync_s"]) == 3 and "mfu" in result, sorted(result)


@pytest.fixture(scope="module")
def gpu_test_assets(tmp_path_factory):
    from tests.test_gpu import build_gpu_assets

    return build_gpu_assets(str(tmp_path_factory.mktemp("gpu_test_assets")))


@pytest.mark.parametrize("case", ["sync_full", "sync_lora_zero3", "sync_lora_zero3_packed", "is_correction",
                                  "server_refused"])
def test_gpu_test_workers_pass_their_checks_on_cpu_vllm(gpu_test_assets, tmp_path, monkeypatch, case):
    """tests/test_gpu.py's vLLM workers on CPU against vLLM's CPU build, judged by the GPU tests' own assertions (its
    bf16 head_dim-64 models; vLLM serves them in bf16 and the trainer runs fp32 on CPU), so that a GPU run only
    measures: the colocated sync (parameter by parameter, full student; LoRA under ZeRO-3), the importance-sampling
    metrics and the unreachable-server error. vLLM packs the bf16 weights on CPUs with AVX-512 BF16 and not on
    AVX2-only ones; `sync_lora_zero3_packed` forces the packed layout, so every CPU checks both."""
    from tests import test_gpu

    env = packed_env() if case.endswith("_packed") else worker_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if case == "sync_full":
        test_gpu.check_sync_report(test_gpu.run_worker("train", gpu_test_assets, tmp_path), zero3=False, lora=False)
    elif case.startswith("sync_lora_zero3"):
        report = test_gpu.run_worker("train", gpu_test_assets, tmp_path, "--zero3", "--lora", torchrun=True)
        test_gpu.check_sync_report(report, zero3=True, lora=True)
        if case.endswith("_packed"):  # every linear layer packed: 2 layers x (qkv, o, gate_up, down)
            assert report["vllm_packed_linears"] >= 8, report["vllm_packed_linears"]
    elif case == "is_correction":
        test_gpu.check_is_correction_report(test_gpu.run_worker("train", gpu_test_assets, tmp_path, "--is-correction"))
    else:
        url = f"http://127.0.0.1:{free_port()}"
        report = test_gpu.run_worker("server", gpu_test_assets, tmp_path, url, "5", timeout=180)
        test_gpu.check_server_report(report, url, 5)


# ------------------------------------------------------------------------------------------------- workers
def _gathered(model, zero3, modify=False):
    """All parameters gathered under ZeRO-3 (`modify`: rank 0's in-place changes are kept, on every rank)."""
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0 if modify else None)


def _trainer_logprobs(model, prompts, completions):
    """log p(token) of each completion token under the trainer's model (fp32, temperature 1)."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion, device=device)[:, None])
            out.append(lp[:, 0].tolist())
    return out


def _colocated_probe(gen):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=PROBE_TOKENS, ignore_eos=True, temperature=1.0,
                            logprobs=0, seed=0, detokenize=False)
    outputs = gen.llm.generate([{"prompt_token_ids": p} for p in PROBE_PROMPTS], params, use_tqdm=False)
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs] for o in outputs]
    return completions, logprobs


def _server_probe(gen):
    """`/v1/completions` of the probe prompts (token ids) on the server, with each sampled token's log-prob."""
    import requests

    client = gen.vllm_client
    completions, logprobs = [], []
    for prompt in PROBE_PROMPTS:
        body = {"model": client.model, "prompt": prompt, "max_tokens": PROBE_TOKENS,
                "ignore_eos": True, "temperature": 1.0, "logprobs": 0, "seed": 0, "return_tokens_as_token_ids": True}
        choice = requests.post(f"{client.base_url}/v1/completions", json=body, timeout=120).json()["choices"][0]
        completions.append([int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]])
        logprobs.append(choice["logprobs"]["token_logprobs"])
    return completions, logprobs


def _difference(model, zero3, completions, logprobs):
    import torch

    with _gathered(model, zero3):
        trainer = _trainer_logprobs(model, PROBE_PROMPTS, completions)
    d = torch.tensor([abs(a - b) for t, v in zip(trainer, logprobs) for a, b in zip(t, v)])
    return {"mean": float(d.mean()), "max": float(d.max())}, int(d.numel())


def _train_worker(assets_root, out, zero3, lora, is_correction, server_url, trl_sync=False):
    import functools

    import torch
    import torch.distributed as dist
    import trl.generation.vllm_generation as vg
    from datasets import load_dataset

    # fp32 engine (TRL leaves vLLM's dtype at "auto", which serves fp32 checkpoints in 16 bits), so that both sides
    # run the same fp32 forward; eager: torch.compile of the tiny model would take ~30 s, and weights are under test.
    vg.LLM = functools.partial(vg.LLM, enforce_eager=True, dtype="float32")
    from amm_trl import AMMConfig, AMMTrainer

    if trl_sync:  # negative control: TRL's own (GPU) weight sync on vLLM's CPU platform
        import amm_trl.vllm_cpu

        amm_trl.vllm_cpu.on_vllm_cpu_platform = lambda: False

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = load_dataset("json", data_files=os.path.join(assets_root, "data.jsonl"), split="train")
    deepspeed_cfg = None
    if zero3:
        deepspeed_cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                         "bf16": {"enabled": False}}
    mode = {"vllm_mode": "server", "vllm_server_base_url": server_url, "vllm_server_timeout": 240} if server_url \
        else {"vllm_mode": "colocate", "vllm_tensor_parallel_size": world, "vllm_max_model_length": 128}
    args = AMMConfig(output_dir=os.path.join(os.path.dirname(out), "run"), use_cpu=True, bf16=False,
                     model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": "float32"},
                     per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                     max_completion_length=8, learning_rate=3e-2 if lora else 1e-2, lr_scheduler_type="constant",
                     q_head_warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     use_vllm=True, deepspeed=deepspeed_cfg, vllm_importance_sampling_correction=is_correction,
                     **mode)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    trainer = AMMTrainer(model=os.path.join(assets_root, "student"),
                         teacher_model=os.path.join(assets_root, "teacher"), args=args, train_dataset=ds,
                         peft_config=peft_config)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    gen, model = trainer.vllm_generation, trainer.model
    report = {"world_size": world, "generation_class": type(gen).__name__,
              "zero3_active": bool(trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()),
              "heads_total": len(list(trainer.q_heads.parameters()))}
    if not server_url:
        from vllm.distributed import get_tensor_model_parallel_world_size

        report["vllm_tp_size"] = get_tensor_model_parallel_world_size()
        runner = gen.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        qkv = runner.model.model.layers[0].self_attn.qkv_proj
        # vLLM's CPU backend packs Linear weights into its kernels' layout and empties the parameter (no
        # `weight_loader` left: TRL's in-place `load_weights` cannot reach them)
        report["vllm_qkv"] = {"numel": qkv.weight.numel(), "has_weight_loader": hasattr(qkv.weight, "weight_loader"),
                              "cpu_linear": type(getattr(qkv, "cpu_linear", None)).__name__}
        # the engine's shared-memory group files, while it runs (amm_trl.shm unlinks them once all ranks mapped them)
        report["vllm_dist_ident"] = os.environ.get("VLLM_DIST_IDENT")
        report["shm_while_running"] = sorted(n for n in os.listdir("/dev/shm") if "cpushm" in n or
                                             n.startswith("deepspeed_allreduce_buffer"))
    # A non-trivial adversary (the heads start at zero: the student would not move in step 1) and, with LoRA,
    # non-zero adapters from the start, so that merging them changes the weights vLLM must hold.
    torch.manual_seed(0)
    with _gathered(model, zero3, modify=True):
        for name, p in model.named_parameters():
            if HEADS in name:
                p.data.normal_(0.0, 0.5)
            elif "lora_B" in name:
                p.data.normal_(0.0, 0.05)
    with _gathered(model, zero3):
        report["lora_b_max"] = max([float(p.abs().max()) for n, p in model.named_parameters() if "lora_B" in n],
                                   default=0.0)
        expected = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, _ in
                    model.named_parameters() if HEADS not in n and "lora_" not in n}
    streamed = set()
    original_iter = gen._iter_named_params

    def recording_iter():
        for name, tensor in original_iter():
            streamed.add(name)
            yield name, tensor

    gen._iter_named_params = recording_iter
    probe = _server_probe if server_url else _colocated_probe
    syncs, original_sync = [], gen.sync_weights
    snapshot = {"weights": None}

    def fingerprint():
        with _gathered(model, zero3):
            return sum(float(p.detach().double().sum()) for n, p in model.named_parameters() if HEADS not in n)

    def checked_sync():
        # Probes run on every rank (the engine's tensor-parallel ranks and ZeRO-3 gathers are collective); in server
        # mode only the main process holds the client.
        record = {"trainer_moved": snapshot["weights"] is not None and fingerprint() != snapshot["weights"]}
        if server_url and not trainer.accelerator.is_main_process:
            original_sync()
            fingerprint()
            return
        completions, logprobs = probe(gen)
        record["before"], _ = _difference(model, zero3, completions, logprobs)
        original_sync()
        completions, logprobs = probe(gen)
        record["after"], record["tokens"] = _difference(model, zero3, completions, logprobs)
        snapshot["weights"] = fingerprint()
        syncs.append(record)

    gen.sync_weights = checked_sync
    if zero3:  # LoRA adapters are created after the partitioned load: DeepSpeed partitions them when training starts
        report["partitioned"] = all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0
                                    for n, p in model.named_parameters() if "lora_" not in n)
    trainer.train()
    report["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if is_correction:
        report["sampling"] = {k: [h[k] for h in trainer.state.log_history if k in h] for k in (
            "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/max")}
    gen.sync_weights()  # the last step's update, checked like the others
    report["syncs"] = syncs
    report["streamed_heads"] = sorted(n for n in streamed if HEADS in n)
    report["streamed_adapters"] = sorted(n for n in streamed if "lora_" in n)
    report["streamed_missing"] = sorted(expected - streamed)
    report["streamed_unexpected"] = sorted(streamed - expected)
    if dist.is_initialized():
        dist.barrier()
    return report


def main(argv):
    kind, assets_root, out = argv[:3]
    flags = argv[3:]
    if kind != "train":
        raise SystemExit(f"unknown worker {kind!r}")
    server_url = flags[flags.index("--server") + 1] if "--server" in flags else None
    report = _train_worker(assets_root, out, zero3="--no-zero3" not in flags, lora="--lora" in flags,
                           is_correction="--is-correction" in flags, server_url=server_url,
                           trl_sync="--trl-sync" in flags)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can make interpreter teardown slow


if __name__ == "__main__":
    main(sys.argv[1:])
