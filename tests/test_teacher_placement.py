"""Where the teacher runs (`teacher_placement`): the settings refused before any model loads, the offline top-k cache
end to end (`amm-trl generate --teacher_top_k` -> train with no teacher model -> resume bit-identically), and the
cache's bad inputs. The served teacher against a real vLLM server is in `test_vllm_server.py` (marker `vllm`)."""

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from amm_trl.cli import main
from amm_trl.config import AMMConfig
from tests.test_checkpoints import assert_same_weights, train_one_thread

BASE = dict(output_dir="/tmp/amm-placement", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_placement="server"), r"teacher_server_base_url=None is invalid: teacher_placement 'server' needs"),
    (dict(objective="jsd", teacher_placement="server", teacher_server_base_url="http://t:8000"),
     r"objective='jsd' is invalid: it runs TRL's loss, which calls a teacher model .* use 'gkd' with lmbda 1.0"),
    (dict(teacher_placement="server", teacher_server_base_url="http://t:8000", teacher_server_output="hidden_states"),
     r"teacher_model_name_or_path=None is invalid: teacher_server_output 'hidden_states' reads the teacher's output"),
    (dict(objective="minillm", teacher_placement="server", teacher_server_base_url="http://t:8000"),
     r"minillm_teacher_mix=0.2 is invalid: teacher-mixed sampling needs the teacher's full next-token distribution"),
    (dict(objective="amm", q_head_features="teacher", teacher_placement="server",
          teacher_server_base_url="http://t:8000"), r"q_head_features='teacher' is invalid: .* no teacher hidden"),
    (dict(objective="amm", q_head_features="both", teacher_placement="server",
          teacher_server_base_url="http://t:8000"), r"q_head_features='both' is invalid: .* no teacher hidden"),
    (dict(objective="fkl", teacher_placement="cache", temperature=0.7),
     r"temperature=0.7 is invalid: .* log-probs are at temperature 1"),
    (dict(objective="rkl", teacher_placement="cache"), r"teacher_placement='cache' is invalid: objective 'rkl' trains "
                                                       r"on rollouts only"),
    (dict(objective="amm", teacher_placement="cache"), r"teacher_server_base_url=None is invalid: objective 'amm' "
                                                       r"also trains on student rollouts"),
    (dict(objective="fkl", teacher_placement="cache", off_policy_source="teacher"),
     r"off_policy_source='teacher' is invalid: with teacher_placement 'cache'"),
    (dict(teacher_top_k=0), r"teacher_top_k=0 is invalid"),
    (dict(objective="fkl", teacher_placement="cache", teacher_server_output="hidden_states"),
     r"teacher_server_output='hidden_states' is invalid: it applies to teacher_placement 'server' only"),
    (dict(objective="amm", teacher_placement="server", teacher_server_base_url="http://t:8000",
          teacher_server_output="hidden_states", teacher_model_name_or_path="/t", off_policy_source="teacher"),
     r"off_policy_source='teacher' is invalid: a pooling server .* cannot generate"),
])
def test_settings_a_teacher_elsewhere_cannot_run_are_refused_by_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        AMMConfig(**BASE, **overrides)


def test_hidden_states_from_a_server_allow_what_top_k_cannot():
    """With the teacher's hidden states (its output layer applied here) the distribution is exact: teacher features
    for the critic and any temperature are allowed."""
    args = AMMConfig(**BASE, objective="amm", teacher_placement="server", teacher_server_base_url="http://t:8000",
                     teacher_server_output="hidden_states", teacher_model_name_or_path="/models/teacher",
                     q_head_features="teacher", temperature=0.7)
    assert args.teacher_server_output == "hidden_states"


@pytest.mark.parametrize("tied", [False, True])
def test_the_output_layer_alone_is_read_from_the_checkpoint(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from amm_trl.teacher import load_output_layer
    from tests.tiny import build_model

    model = build_model(64, hidden=32, seed=7)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(tmp_path / "m")
    head, config = load_output_layer(str(tmp_path / "m"), torch.float32)
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "m").get_output_embeddings().weight
    assert config.hidden_size == 32 and head.weight.shape == (64, 32) and not head.weight.requires_grad
    assert torch.equal(head.weight, want)


def test_a_cache_reads_its_own_completions_by_default():
    assert AMMConfig(**BASE, objective="fkl", teacher_placement="cache").off_policy_source == "dataset"
    assert AMMConfig(**BASE, objective="amm", teacher_placement="server", teacher_server_base_url="http://t:8000",
                     teacher_server_output="hidden_states", teacher_model_name_or_path="/t",
                     ).off_policy_source == "dataset"  # a pooling server cannot generate the teacher's answers
    assert AMMConfig(**BASE, objective="fkl").off_policy_source == "dataset"


def generate_cache(tmp_path, tiny, k, name="cache.parquet", codec="float16"):
    out = tmp_path / name
    main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"], "--output_file",
          str(out), "--max_new_tokens", "6", "--temperature", "1.0", "--teacher_top_k", str(k), "--batch_size", "8",
          "--teacher_top_k_codec", codec])
    return out


def test_generate_writes_a_whole_top_k_cache_with_the_teachers_log_probs(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    out = generate_cache(tmp_path, tiny, k=5)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.parquet"]  # no temporary file left
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 32
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    for row in rows[:3]:
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), -1)
        n = len(row["prompt_ids"])
        at = log_probs[n - 1:n - 1 + len(row["completion_ids"])]
        values, top = at.topk(5, -1)
        assert row["teacher_topk_ids"] == top.tolist()
        torch.testing.assert_close(torch.tensor(row["teacher_topk_logprobs"]), values, rtol=2e-3, atol=2e-3)  # fp16
        taken = at.gather(-1, torch.tensor(row["completion_ids"])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(row["teacher_token_logprob"]), taken, rtol=1e-6, atol=1e-6)


def test_log8_stores_sorted_id_gaps_in_byte_planes_and_log_probs_in_16ths_of_a_nat_below_the_top():
    from amm_trl.cache import decode_log8, encode_log8

    encoded = encode_log8([[3, 300, 1]], [[-0.1, -2.0, -40.0]])
    # ids sorted 1, 3, 300: gaps 1, 2, 297 = 41 + 256; codes round(16 * (top - lp)), capped at 255
    assert encoded["id_gaps"].tolist() == [[1, 2, 41, 0, 0, 1]] and encoded["codes"].tolist() == [[255, 0, 30]]
    assert encoded["logmass"][0] == pytest.approx(math.log(math.exp(-0.1) + math.exp(-2.0) + math.exp(-40.0)))
    ids, log_probs = decode_log8(**encoded)
    assert ids.tolist() == [[3, 300, 1]]  # rank order again
    shift = encoded["logmass"][0] - math.log(1 + math.exp(-30 / 16) + math.exp(-255 / 16))
    np.testing.assert_allclose(log_probs[0], [shift, shift - 30 / 16, shift - 255 / 16], rtol=0, atol=1e-6)


@pytest.mark.parametrize("vocab, k, planes", [(64, 64, 1), (49152, 128, 2), (151936, 20, 3)])
def test_log8_keeps_each_log_prob_within_a_32nd_of_a_nat_up_to_one_shift_and_the_covered_mass(vocab, k, planes):
    """float64 top-k of random distributions (the tiny models', SmolLM2's and Qwen2.5's vocabulary sizes; in the
    last, the top-k among ids >= 2^16, so the first gap needs a third byte)."""
    from amm_trl.cache import decode_log8, encode_log8

    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(12, vocab)) * 4
    logits[:, :2 ** 16] -= 40.0 if planes == 3 else 0.0
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-log_probs, axis=1)[:, :k]
    values = np.take_along_axis(log_probs, ids, 1)
    encoded = encode_log8(ids, values)
    assert encoded["id_gaps"].shape == (12, planes * k) and encoded["codes"].shape == (12, k)
    got_ids, got = decode_log8(**encoded)
    assert (np.diff(got, axis=1) <= 0).all()  # rank order
    for t in range(12):
        exact = dict(zip(ids[t].tolist(), values[t].tolist()))
        assert sorted(exact) == sorted(got_ids[t].tolist())
        error = np.array([lp - exact[i] for i, lp in zip(got_ids[t].tolist(), got[t].tolist())
                          if exact[i] > values[t].max() - 255 / 16])
        assert error.max() - error.min() <= 1 / 16 + 1e-5  # each within 1/32 of (exact + one shift)
        assert np.logaddexp.reduce(got[t].astype(np.float64)) == pytest.approx(np.logaddexp.reduce(values[t]),
                                                                               abs=1e-5)


def test_a_log8_cache_reads_back_within_its_bound_and_trains_like_the_float16_one(tmp_path, tiny):
    """The same seed gives the same completions in both codecs; the teacher's log-probs read back from log8 are
    within its bound of the float16 ones, and 2 fkl steps on each give losses within 2%."""
    from amm_trl.cache import top_k_of

    exact = pq.read_table(generate_cache(tmp_path, tiny, k=64, name="f16.parquet")).to_pylist()
    compact = pq.read_table(generate_cache(tmp_path, tiny, k=64, name="log8.parquet", codec="log8")).to_pylist()
    assert "teacher_topk_logprobs" not in compact[0] and len(compact) == len(exact) == 32
    for a, b in zip(exact, compact):
        assert a["completion_ids"] == b["completion_ids"]
        read = top_k_of(b)
        assert read["token_log_prob"] == a["teacher_token_logprob"]
        for ids_a, lp_a, ids_b, lp_b in zip(a["teacher_topk_ids"], a["teacher_topk_logprobs"], read["ids"],
                                            read["log_probs"]):
            by_id = dict(zip(ids_b, lp_b))
            error = np.array([by_id[i] - lp for i, lp in zip(ids_a, lp_a)])
            assert error.max() - error.min() <= 1 / 16 + 4e-3  # + float16's own rounding
    losses = {}
    for name in ("f16", "log8"):
        train_one_thread(["--config", cache_recipe(tmp_path, tiny, tmp_path / f"{name}.parquet", out=name,
                                                   max_steps=2, save_steps=2)])
        state = json.loads((tmp_path / name / "checkpoint-2" / "trainer_state.json").read_text())
        losses[name] = [h["loss"] for h in state["log_history"] if "loss" in h]
        assert all(h["teacher_mass/off"] == pytest.approx(1.0, abs=2e-3)
                   for h in state["log_history"] if "loss" in h)
    np.testing.assert_allclose(losses["log8"], losses["f16"], rtol=0.02)


def test_generate_refuses_an_unknown_codec_before_loading(tmp_path, tiny, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"], "--output_file",
              str(tmp_path / "c.parquet"), "--teacher_top_k", "4", "--teacher_top_k_codec", "int4"])
    err = capsys.readouterr().err
    assert "--teacher_top_k_codec" in err and "invalid choice: 'int4'" in err and "log8" in err, err
    assert not (tmp_path / "c.parquet").exists()


def test_generate_refuses_a_cache_that_is_not_parquet_before_loading(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"--teacher_top_k 4 --output_file .*a top-k cache is written as parquet"):
        main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"], "--output_file",
              str(tmp_path / "c.jsonl"), "--teacher_top_k", "4"])


def cache_recipe(tmp_path, tiny, data, out="out", **extra):
    lines = {"model_name_or_path": tiny["student"], "dataset_name": str(data), "dtype": "float32",
             "output_dir": str(tmp_path / out), "max_steps": 4, "per_device_train_batch_size": 4,
             "max_completion_length": 6, "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
             "report_to": "none", "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "seed": 5,
             "learning_rate": 0.01, "objective": "fkl", "teacher_placement": "cache", "teacher_top_k": 64, **extra}
    path = tmp_path / f"{out}.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in lines.items()) + "\n")
    return str(path)


def test_training_from_the_cache_needs_no_teacher_model_and_resumes_bit_identically(tmp_path, tiny):
    data = generate_cache(tmp_path, tiny, k=64)  # the tiny vocabulary: the cache holds the whole distribution
    train_one_thread(["--config", cache_recipe(tmp_path, tiny, data)])
    out = tmp_path / "out"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4] and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["teacher_mass/off"] == pytest.approx(1.0, abs=2e-3) for h in logs)  # k = V, fp16 log-probs
    initial = load_file(os.path.join(tiny["student"], "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert any(not (final[k] == v).all() for k, v in initial.items())

    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    os.system(f"cp -r {out / 'checkpoint-2'} {resumed}/")
    train_one_thread(["--config", cache_recipe(tmp_path, tiny, data, out="resumed"), "--resume_from_checkpoint",
                      "latest"])
    assert_same_weights(load_file(str(resumed / "model.safetensors")), final)


def test_a_dataset_without_the_cache_columns_is_refused_before_models_load(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"teacher_placement 'cache': the training dataset has no column\(s\) "
                                         r"\['prompt_ids', .*amm-trl generate --teacher_top_k K"):
        main(["train", "--config", cache_recipe(tmp_path, tiny, tiny["data"])])


def test_an_eval_dict_and_an_iterable_dataset_are_checked_for_the_cache_columns():
    from datasets import Dataset

    from amm_trl.teacher import check_cached_dataset

    good = Dataset.from_dict({name: [[1]] for name in ("prompt", "completion", "prompt_ids", "completion_ids",
                                                       "teacher_topk_ids", "teacher_topk_logprobs",
                                                       "teacher_token_logprob")})
    check_cached_dataset({"a": good, "b": good.to_iterable_dataset()}, "completion")
    compact = Dataset.from_dict({name: [[1]] for name in ("prompt", "completion", "prompt_ids", "completion_ids",
                                                          "teacher_topk_id_gaps", "teacher_topk_codes",
                                                          "teacher_topk_logmass", "teacher_token_logprob")})
    check_cached_dataset(compact, "completion")  # the log8 codec's columns
    with pytest.raises(ValueError, match=r"no column\(s\) \['teacher_topk_logmass'\]"):
        check_cached_dataset(compact.remove_columns("teacher_topk_logmass"), "completion")
    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt_ids', 'completion_ids'"):
        check_cached_dataset({"a": good, "b": Dataset.from_dict({"prompt": ["x"]}).to_iterable_dataset()},
                             "completion")


def test_a_cache_rendered_with_another_prompt_is_refused_naming_the_row(tmp_path, tiny):
    data = generate_cache(tmp_path, tiny, k=8)
    with pytest.raises(ValueError, match=r"the cached prompt_ids of the row with prompt 'w\d+.*differ from the prompt "
                                         r"this trainer renders .*raise max_prompt_length"):
        main(["train", "--config", cache_recipe(tmp_path, tiny, data, max_prompt_length=2)])



def test_the_server_timeouts_must_be_positive():
    for name in ("teacher_server_timeout", "teacher_server_request_timeout"):
        with pytest.raises(ValueError, match=rf"{name}=0 is invalid: give a number of seconds > 0"):
            AMMConfig(**BASE, **{name: 0})


def _thinking_copy(tmp_path, tiny):
    """The tiny student and teacher with a chat template that reads a template variable (as Qwen3's reads
    `enable_thinking`): with `enable_thinking: false` the generation prompt gains a word."""
    import shutil

    from transformers import AutoTokenizer

    from tests.tiny import CHAT_TEMPLATE

    template = CHAT_TEMPLATE.replace("<|im_start|> assistant {% endif %}", "<|im_start|> assistant {% if "
                                     "enable_thinking is defined and not enable_thinking %}w7 {% endif %}{% endif %}")
    paths = {}
    for name in ("student", "teacher"):
        paths[name] = str(tmp_path / name)
        shutil.copytree(tiny[name], paths[name])
        tokenizer = AutoTokenizer.from_pretrained(paths[name])
        tokenizer.chat_template = template
        tokenizer.save_pretrained(paths[name])
    return {**tiny, **paths}


def test_generate_renders_prompts_with_the_trainers_chat_template_kwargs(tmp_path, tiny):
    from transformers import AutoTokenizer

    from amm_trl.data import load_prompt_dataset
    from amm_trl.generation import render_prompts

    thinking = _thinking_copy(tmp_path, tiny)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"w{i} w{i + 1}"}]}) + "\n"
                            for i in range(8)))
    out = tmp_path / "cache.parquet"
    main(["generate", "--model_name_or_path", thinking["teacher"], "--dataset_name", str(data), "--output_file",
          str(out), "--max_new_tokens", "4", "--teacher_top_k", "8", "--batch_size", "8",
          "--chat_template_kwargs", '{"enable_thinking": false}'])
    rows = pq.read_table(out).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(thinking["teacher"])
    prompts = load_prompt_dataset(str(data))["prompt"]
    rendered = render_prompts(tokenizer, prompts, {"enable_thinking": False})
    assert [r["prompt_ids"] for r in rows] == rendered
    assert all(r[-1] == tokenizer.convert_tokens_to_ids("w7") for r in rendered)
    assert rendered != render_prompts(tokenizer, prompts)  # the variable changes the prompt
    # the trainer renders the same prompts only when it is given the same variables
    recipe = cache_recipe(tmp_path, thinking, out, max_steps=1, save_strategy="no", teacher_top_k=8,
                          chat_template_kwargs={"enable_thinking": False})
    train_one_thread(["--config", recipe])
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="the cached prompt_ids of the row with prompt"):
        train_one_thread(["--config", cache_recipe(tmp_path, thinking, out, out="out2", max_steps=1,
                                                   save_strategy="no", teacher_top_k=8)])


@pytest.mark.parametrize("text, message", [("{enable_thinking: false}", "is not valid JSON"),
                                           ("[1]", "must be a JSON object")])
def test_generate_refuses_chat_template_kwargs_that_are_not_a_json_object_before_loading(tmp_path, tiny, text,
                                                                                           message):
    with pytest.raises(ValueError, match=rf"--chat_template_kwargs .*{message}"):  # the dataset does not exist
        main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", str(tmp_path / "none.jsonl"),
              "--output_file", str(tmp_path / "o.jsonl"), "--chat_template_kwargs", text])
