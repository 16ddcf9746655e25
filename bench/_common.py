"""Shared helpers of the bench scripts: offline models and data, timing, memory, run metadata, JSON output.

Nothing here downloads anything: the tokenizer is a word-level one built with `tokenizers` (token `w<i>` = one word),
the models are random-init Llama configurations saved with `save_pretrained`. Random weights decide nothing about
quality, but shapes decide memory and speed, which is all the benchmarks measure. Completions are forced to their
full length (`min_new_tokens` / `min_tokens`) so that every engine and trainer sees the same token counts.
"""

import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time

from amm_trl.procs import die_with_parent, die_with_parent_term, free_port  # noqa: F401 (C.free_port, ...)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: bos 1, eos 2, pad 3
VOCAB = 32000  # OpenLLaMA's vocabulary size (and that of the pair behind TRL's reference figures)
TINY_VOCAB = 512

# name -> (hidden, layers, heads, intermediate)
SHAPES = {
    # the pair TRL's reference figures in docs/benchmarks.md were measured on, so that they compare directly
    "bench_student": (2048, 16, 16, 5632),  # 0.95B
    "bench_teacher": (2560, 24, 20, 6912),  # 2.07B
    # OpenLLaMA-3B / 7B (config.json of openlm-research/open_llama_{3b,7b}_v2)
    "openllama_3b": (3200, 26, 32, 8640),  # 3.43B
    "openllama_7b": (4096, 32, 32, 11008),  # 6.74B
    # CPU smoke shapes (head_dim 32: vLLM's CPU attention supports 32, 64, ...)
    "tiny_student": (64, 2, 2, 128),
    "tiny_teacher": (96, 3, 3, 192),
}

# vLLM 0.26 imports FlashInfer for its sampler unless told not to; the slim GPU build ships without FlashInfer.
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# vLLM's CPU build (ignored on GPUs): 1 GiB of KV cache; its default asks for most of the machine's memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------------ models and data
def llama_config(shape, vocab=VOCAB, max_positions=2048):
    from transformers import LlamaConfig

    hidden, layers, heads, inter = SHAPES[shape] if isinstance(shape, str) else shape
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)


def count_params(shape, vocab=VOCAB) -> dict:
    """Exact parameter counts of a shape without allocating it (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(shape, vocab))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "embedding": embed, "lm_head": head, "non_embedding": total - embed - head,
            "largest_layer": largest}


def build_tokenizer(path, vocab=VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(SPECIALS)}
    for i in range(vocab - len(SPECIALS)):
        words[f"w{i}"] = len(words)
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", truncation_side="left")
    fast.save_pretrained(path)
    return fast


def build_models(out_dir, shapes: dict, vocab=VOCAB, device=None, dtype="bfloat16", seed=0) -> dict:
    """Writes out_dir/<name> (a `from_pretrained` folder with the tokenizer) for each name -> shape, random init.

    A folder that holds a `.complete` marker with the same shape, vocab and dtype is reused (the GPU machine keeps
    /tmp between runs while it stays up). Returns name -> path and the build seconds."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok_dir = os.path.join(out_dir, "tokenizer")
    paths, seconds = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        path = os.path.join(out_dir, name)
        spec = {"shape": list(SHAPES[shape]) if isinstance(shape, str) else list(shape), "vocab": vocab,
                "dtype": dtype}
        marker = os.path.join(path, ".complete")
        paths[name] = path
        if os.path.exists(marker):
            with open(marker) as f:
                if json.load(f) == spec:
                    continue
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            build_tokenizer(tok_dir, vocab)
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        torch.manual_seed(seed + i)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(llama_config(shape, vocab), dtype=getattr(torch, dtype))
        model.generation_config.pad_token_id = 3
        model.save_pretrained(path)
        for f in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, f), path)
        n = sum(p.numel() for p in model.parameters())
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        seconds[name] = round(time.perf_counter() - start, 1)
        with open(marker, "w") as f:
            json.dump(spec, f)
        print(f"[models] {path}: {n / 1e9:.3f}B params, built and saved in {seconds[name]}s", flush=True)
    return {"paths": paths, "build_s": seconds}


def words(rng, n, vocab):
    return " ".join(f"w{rng.randrange(vocab - len(SPECIALS))}" for _ in range(n))


def make_dataset(n_rows, prompt_words, completion_words, vocab=VOCAB, seed=0):
    """`prompt` (and `completion`, AMM's off-policy column) of random words: one token per word, no BOS added."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [words(rng, prompt_words, vocab) for _ in range(n_rows)]}
    if completion_words:
        rows["completion"] = [words(rng, completion_words, vocab) for _ in range(n_rows)]
    return Dataset.from_dict(rows)


# ------------------------------------------------------------------------------------------ distributed / deepspeed
def torchrun_cmd(script, argv, nproc=1):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), script, *argv]


def reexec_under_torchrun_if_needed(script, argv):
    """DeepSpeed in one process: re-run this script under `torchrun --nproc_per_node 1` unless already launched."""
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return
    sys.stdout.flush()
    os.execv(sys.executable, torchrun_cmd(script, argv))


def zero3_config(cpu=False, offload_optimizer="none"):
    """The DeepSpeed dict for `TrainingArguments.deepspeed` (no `train_batch_size`, see docs/launching.md)."""
    zero = {"stage": 3, "overlap_comm": not cpu, "contiguous_gradients": True, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            # tiny CPU models: partition every parameter, as the CPU tests do
            "stage3_param_persistence_threshold": 0 if cpu else "auto"}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero,
            "bf16": {"enabled": False} if cpu else {"enabled": "auto"}}


# ------------------------------------------------------------------------------------------------ timing / memory
def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer_callback():
    """A `TrainerCallback` timing each optimizer step (device-synchronized) and sampling memory at its end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self._t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            cuda_sync()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            cuda_sync()
            self.steps.append(time.perf_counter() - self._t)

    return StepTimer()


def time_method(obj, name, sink: list):
    """Wraps `obj.name` (an instance attribute shadowing the class method) to append its synchronized duration."""
    original = getattr(obj, name)

    def timed(*args, **kwargs):
        cuda_sync()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            cuda_sync()
            sink.append(time.perf_counter() - start)

    setattr(obj, name, timed)
    return original


def instrument_rollouts(trainer, rollout_s: list, sync_s: list, tokens: list):
    """Times each rollout batch (TRL's `_generate_and_score_completions`, vLLM weight sync included) and the sync
    alone, and records the batch's token counts (prompt, rollout and off-policy tokens, sequences)."""
    original = trainer._generate_and_score_completions

    def generate_and_count(inputs):
        cuda_sync()
        t = time.perf_counter()
        out = original(inputs)
        cuda_sync()
        rollout_s.append(time.perf_counter() - t)
        count = {k: int(out[k].sum()) for k in ("prompt_mask", "completion_mask", "off_completion_mask") if k in out}
        count["sequences"] = int(out["prompt_ids"].size(0))
        tokens.append(count)
        return out

    trainer._generate_and_score_completions = generate_and_count
    if getattr(trainer, "vllm_generation", None) is not None:
        time_method(trainer.vllm_generation, "sync_weights", sync_s)


class DeviceMemoryMonitor:
    """Polls the device's used memory (NVML, else cudaMemGetInfo) in a thread: the peak includes vLLM's pool,
    NCCL buffers and the CUDA context, which `torch.cuda.max_memory_allocated` does not see."""

    def __init__(self, interval=0.02):
        self.interval, self.peak, self.source = interval, 0, None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        import torch

        if not torch.cuda.is_available():
            return self
        read = None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                index = int(visible.split(",")[index])
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used  # noqa: E731
            self.source = "nvml"
        except Exception:
            def read():
                free, total = torch.cuda.mem_get_info()
                return total - free

            self.source = "cudaMemGetInfo"
        self._read = read

        def loop():
            while not self._stop.is_set():
                try:
                    self.peak = max(self.peak, self._read())
                except Exception:
                    pass
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def peak_gib(self):
        return round(self.peak / 2**30, 2) if self.source else None


def torch_memory() -> dict:
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "device_total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def steady(values, skip=1):
    """Median of the values after the first `skip` (warm-up: first vLLM sync, compile, allocator growth)."""
    rest = values[skip:] or values
    return statistics.median(rest) if rest else None


# --------------------------------------------------------------------------------------------------- metadata
def _version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_digest() -> str:
    """sha256 over amm_trl/ and bench/ sources: identifies the code even where the checkout has no .git."""
    h = hashlib.sha256()
    for sub in ("amm_trl", "bench"):
        base = os.path.join(ROOT, sub)
        for dirpath, dirnames, filenames in sorted(os.walk(base)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith((".py", ".yaml", ".sh")):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(os.path.relpath(os.path.join(dirpath, name), ROOT).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def run_info() -> dict:
    import torch

    commit = os.environ.get("AMM_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except Exception:
            commit = None
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "git_commit": commit, "source_digest": source_digest(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {n: _version(n) for n in ("transformers", "trl", "accelerate", "deepspeed", "peft", "vllm",
                                               "datasets")},
    }
    if not torch.cuda.is_available():
        info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return info


def emit(result: dict, json_path=None):
    """Prints the one `RESULT {...}` line and writes the same object to `json_path` (atomically)."""
    line = json.dumps(result, default=str)
    print("RESULT " + line, flush=True)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, json_path)


def log_tail(text, n=60):
    return "\n".join(text.strip().splitlines()[-n:])
