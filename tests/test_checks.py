"""Every bad input is named at the door, with the fix: datasets, model paths, the teacher's tokenizer, prompts past
the context, divergence (non-finite loss, gradient norm, weights), iterable datasets."""

import json
import math
import os
import re

import pytest
import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file

from amm_trl import AMMConfig, AMMTrainer
from amm_trl.checkpoints import checkpoint_problem, resolve_resume
from amm_trl.checks import check_model_path
from amm_trl.cli import main
from amm_trl.data import load_prompt_dataset
from amm_trl.guards import NonFiniteTrainingError
from tests.test_cli import tiny_recipe


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2,
                  per_device_train_batch_size=4, max_completion_length=6, report_to="none", logging_steps=1,
                  save_strategy="no", learning_rate=1e-3, gradient_checkpointing=False,
                  model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": "float32"}, seed=3)
    kwargs.update(overrides)
    return AMMConfig(**kwargs)


recipe = tiny_recipe  # the CLI tests' tiny recipe file


# ------------------------------------------------------------------------------------------------------ datasets
def test_empty_dataset_file_is_named(tmp_path, tiny):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"dataset_name='.*empty.jsonl' has no rows: the file is empty\. Write one "
                                         r"JSON object per line"):
        main(["train", "--config", recipe(tmp_path, tiny, dataset_name=str(empty))])
    with pytest.raises(ValueError, match=r"dataset_name='.*empty.jsonl' has no rows"):
        main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", str(empty),
              "--output_file", str(tmp_path / "g.jsonl")])
    with pytest.raises(ValueError, match="train_dataset has no rows"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                   train_dataset=Dataset.from_dict({"prompt": [], "completion": []}))


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny):
    rows = [json.dumps({"prompt": "w1 w2", "completion": "w3"})] * 5
    rows[3] = '{"prompt": "w1 w2", "completion": "w3"'  # the closing brace is lost
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"dataset_name='.*bad.jsonl': line 4 is not valid JSON \(Expecting ',' "
                                         r"delimiter, column 39\): "
                                         r"'\{\"prompt\": \"w1 w2\", \"completion\": \"w3\"'\. "
                                         r"Each line must be one JSON object"):
        main(["train", "--config", recipe(tmp_path, tiny, dataset_name=str(bad))])
    rows[3] = "[1, 2]"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl': line 4 is a JSON list, not an object"):
        load_prompt_dataset(str(bad))


def test_iterable_dataset_without_declared_columns_trains(tiny, tiny_dataset, tmp_path):
    rows = [tiny_dataset[i] for i in range(len(tiny_dataset))]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None  # TRL accepts it; the column check reads its first row
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                         train_dataset=stream)
    trainer.train()
    assert trainer.state.global_step == 2 and all(math.isfinite(h["loss"]) for h in trainer.state.log_history
                                                  if "loss" in h)
    no_prompt = IterableDataset.from_generator(lambda: iter([{"instruction": "w1"}]))
    with pytest.raises(ValueError, match=r"train_dataset has columns \['instruction'\] but no 'prompt' column"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                   train_dataset=no_prompt)
    with pytest.raises(ValueError, match="train_dataset has no rows"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                   train_dataset=IterableDataset.from_generator(lambda: iter([])))


# ---------------------------------------------------------------------------------------------------- model paths
def test_missing_model_path_names_the_field(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"model_name_or_path='does/not/exist' is neither a local folder \(no such "
                                         r"path\) nor a hub model id of the form 'name' or 'namespace/name'"):
        main(["train", "--config", recipe(tmp_path, tiny), "--model_name_or_path", "does/not/exist"])
    with pytest.raises(ValueError, match=r"teacher_model_name_or_path='someone/teacher-7b' is neither a local folder "
                                         r"\(no such path\) nor reachable offline: HF_HUB_OFFLINE is set"):
        main(["train", "--config", recipe(tmp_path, tiny), "--teacher_model_name_or_path", "someone/teacher-7b"])
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match=r"model_name_or_path='.*empty_folder' is a folder without config.json"):
        main(["generate", "--model_name_or_path", str(tmp_path / "empty_folder"), "--dataset_name", tiny["data"],
              "--output_file", str(tmp_path / "g.jsonl")])
    check_model_path("model_name_or_path", tiny["student"])  # a saved model passes


# ------------------------------------------------------------------------------------------------------ tokenizers
def _assets_with_teacher_tokenizer(root, tokenizer, vocab_size):
    from tests.tiny import build_model, build_tokenizer

    student, teacher = root / "student", root / "teacher"
    build_model(64).save_pretrained(student)
    build_tokenizer().save_pretrained(student)
    build_model(vocab_size, hidden=48, layers=1, seed=1).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return str(student), str(teacher)


def test_teacher_with_extra_tokens_is_refused_with_both_names(tmp_path, tiny_dataset):
    from tests.tiny import build_tokenizer

    student, teacher = _assets_with_teacher_tokenizer(tmp_path, build_tokenizer(vocab_extra=40), 104)
    with pytest.raises(ValueError, match=rf"The teacher's tokenizer \('{teacher}', 104 tokens\) is not the student's "
                                         rf"\('{student}', 64 tokens\): the teacher has 40 tokens the student lacks "
                                         r"\(e.g. \['x0', 'x1', 'x2'\]\)\. Distillation compares .* id by id"):
        AMMTrainer(model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=tiny_dataset)


def test_different_tokenizer_of_the_same_size_is_refused(tmp_path, tiny_dataset):
    from tests.tiny import build_tokenizer

    student, teacher = _assets_with_teacher_tokenizer(tmp_path, build_tokenizer(reverse_words=True), 64)
    with pytest.raises(ValueError, match=r"\(.*teacher', 64 tokens\) is not the student's \(.*student', 64 tokens\): "
                                         r"58 of the 64 ids both have map to different tokens \(e.g. id 6: 'user' for "
                                         r"the student, 'w54' for the teacher\)"):
        AMMTrainer(model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=tiny_dataset)


def test_same_tokenizer_with_padded_teacher_vocabulary_passes(tmp_path, tiny_dataset):
    from tests.tiny import build_tokenizer

    student, teacher = _assets_with_teacher_tokenizer(tmp_path, build_tokenizer(), 80)  # 64 rows used of 80
    trainer = AMMTrainer(model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=tiny_dataset)
    assert trainer.vocab_size == 64


# --------------------------------------------------------------------------------------------------- prompt length
def _long_prompt_rows(tiny_dataset, n_long=3):
    rows = [dict(tiny_dataset[i]) for i in range(8)]
    for row in rows[:n_long]:
        row["prompt"] = " ".join(f"w{i % 50}" for i in range(600))  # 600 tokens; max_position_embeddings is 256
    return Dataset.from_list(rows)


def test_prompts_past_the_context_are_refused(tiny, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"3 of 8 prompts of train_dataset are longer than 250 tokens \(the models' "
                                         r"context of 256 tokens \(max_position_embeddings\) minus "
                                         r"max_completion_length=6\); the longest has 600\..*Set max_prompt_length"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                   train_dataset=_long_prompt_rows(tiny_dataset))
    with pytest.raises(ValueError, match=r"AMMConfig.max_prompt_length=251 plus max_completion_length=6 exceeds the "
                                         r"models' context of 256 tokens .* set max_prompt_length <= 250"):
        AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path, max_prompt_length=251),
                   train_dataset=_long_prompt_rows(tiny_dataset))


def test_prompts_past_vllms_engine_limit_are_refused(tiny, tiny_dataset, tmp_path):
    """vLLM's `vllm_max_model_length` (shorter than the models' context) is the limit when rollouts come from vLLM:
    prompts that pass the models' 256 tokens but not the engine's 100 are refused at the start, not inside vLLM."""
    rows = [dict(tiny_dataset[i]) for i in range(8)]
    rows[2]["prompt"] = " ".join(f"w{i % 50}" for i in range(120))
    data = Dataset.from_list(rows)
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                         train_dataset=data)  # the models' context (256) holds 120 + 6 tokens
    trainer.args.use_vllm, trainer.args.vllm_max_model_length = True, 100
    with pytest.raises(ValueError, match=r"1 of 8 prompts of train_dataset are longer than 94 tokens \(vLLM's limit "
                                         r"of 100 tokens \(vllm_max_model_length\) minus max_completion_length=6\); "
                                         r"the longest has 120\. Nothing can run past that limit"):
        trainer.check_prompt_lengths({"train_dataset": data})


def test_prompts_are_cut_to_max_prompt_length_with_a_count(tiny, tiny_dataset, tmp_path):
    data = _long_prompt_rows(tiny_dataset)
    with pytest.warns(UserWarning, match=r"3 of 8 prompts of train_dataset are longer than max_prompt_length=32 "
                                         r"tokens \(longest 600\) and are cut from the left to 32 tokens"):
        trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"],
                             args=config(tmp_path, max_prompt_length=32, max_steps=1), train_dataset=data)
    ids = trainer._tokenize_prompts([data[0]["prompt"], data[5]["prompt"]])[0]
    full = trainer._tokenizer(text=[data[0]["prompt"]])["input_ids"][0]
    assert ids[0] == full[-32:] and len(ids[1]) < 32  # the long one keeps its end; the short one is untouched
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# ------------------------------------------------------------------------------------------------------ divergence
def test_divergence_in_sampling_stops_at_its_step_and_keeps_the_last_checkpoint(tiny, tiny_dataset, tmp_path):
    """`--learning_rate 1e12` (AMM, default critic and anchor): loss and gradient norm stay finite, but after step 1
    the weights (~1e13) overflow the logits, and step 2's rollouts would crash inside HF sampling."""
    with pytest.raises(NonFiniteTrainingError, match=r"Training diverged at step 2: the student's next-token "
                                                     r"probabilities became inf/nan while it sampled rollouts .* "
                                                     r"Stopped before saving anything of this step: the newest "
                                                     r"complete checkpoint, .*checkpoint-1, is unaffected and "
                                                     r"resumable\. Likely causes: a learning rate too high "
                                                     r".*learning rates "):
        main(["train", "--config", recipe(tmp_path, tiny, max_steps=4, save_strategy="steps", save_steps=1),
              "--learning_rate", "1e12"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()  # no final save
    assert resolve_resume("latest", str(out)) == str(out / "checkpoint-1")
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-1" / "model.safetensors")).values())
    fresh = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path / "fresh"),
                       train_dataset=tiny_dataset)
    fresh._load_from_checkpoint(str(out / "checkpoint-1"))  # loads: student and heads
    assert torch.equal(fresh.q_heads.on.weight.detach(),
                       load_file(str(out / "checkpoint-1" / "amm_q_heads.safetensors"))["on.weight"])


def test_nan_gradient_norm_stops_before_the_optimizer_step(tiny, tiny_dataset, tmp_path):
    """fkl with lr 1e12: the gradient norm of step 2 is NaN; without the guard the NaN step is applied, logged as
    loss 0 (`logging_nan_inf_filter`) and saved."""
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], train_dataset=tiny_dataset,
                         args=config(tmp_path, objective="fkl", learning_rate=1e12, max_steps=4,
                                     save_strategy="steps", save_steps=1))
    with pytest.raises(NonFiniteTrainingError, match=r"Training diverged at step 2: loss nan \(per process\), "
                                                     r"gradient norm nan \(before clipping\)\. Stopped before saving "
                                                     r"anything of this step: the newest complete checkpoint, "
                                                     r".*checkpoint-1, is unaffected"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN step was not applied
    out = tmp_path / "out"
    assert checkpoint_problem(str(out / "checkpoint-1")) is None and not (out / "checkpoint-2").exists()


def test_non_finite_weights_are_never_saved(tiny, tiny_dataset, tmp_path):
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], train_dataset=tiny_dataset,
                         args=config(tmp_path, objective="fkl", save_strategy="steps", save_steps=1))
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 3] = float("inf")
    trainer.state.global_step = 5
    with pytest.raises(NonFiniteTrainingError, match=r"the weights after step 5 are not finite, so checkpoint-5 is "
                                                     r"not written"):
        trainer._save_checkpoint(trainer.model, None)
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "checkpoint-5"))


# ----------------------------------------------------------------------------- refused at the door, CLI level
@pytest.mark.parametrize("field, value, message", [
    ("per_device_train_batch_size", 0, r"AMMConfig.per_device_train_batch_size=0 is invalid: it must be a whole "
                                       r"number >= 1\."),
    ("max_steps", -5, r"AMMConfig.max_steps=-5 is invalid: give a positive number of optimizer steps, or -1 \(the "
                      r"default\) to train num_train_epochs epochs\."),
])
def test_bad_run_sizes_are_refused_before_anything_is_written(tmp_path, tiny, field, value, message):
    with pytest.raises(ValueError, match=message):
        main(["train", "--config", recipe(tmp_path, tiny, **{field: value})])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty", ["", "   ", None, []], ids=["empty", "blank", "null", "no_messages"])
def test_a_row_without_a_prompt_is_named(tmp_path, tiny, empty):
    rows = [{"prompt": f"w{i} w{i + 1}", "completion": "w3"} for i in range(8)]
    rows[5]["prompt"] = empty
    if empty == []:
        rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} if i != 5 else r for i, r in
                enumerate(rows)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = re.escape(repr(empty))
    with pytest.raises(ValueError, match=rf"dataset_name row 5 \(0-based\) has an empty prompt \({shown}\): every "
                                         r"row needs a prompt to generate from\. Remove such rows"):
        main(["train", "--config", recipe(tmp_path, tiny, dataset_name=str(data))])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_file_that_is_not_utf8_names_the_line_and_the_byte(tmp_path, tiny):
    data = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"prompt": "w1 w2", "completion": "w3"}).encode()] * 4
    lines[2] = '{"prompt": "caf\u00e9 w2", "completion": "w3"}'.encode("latin-1")
    data.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"dataset_name='.*latin1.jsonl': line 3 is not UTF-8 \(byte 0xe9 at column "
                                         r"16\)\. Save the file as UTF-8, e\.g\. `iconv -f latin1 -t utf-8 "):
        main(["train", "--config", recipe(tmp_path, tiny, dataset_name=str(data))])


def test_an_objective_that_needs_a_teacher_names_the_recipe_field(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"teacher_model_name_or_path: objective 'fkl' reads the teacher's "
                                         r"distribution; set teacher_model_name_or_path in the recipe or pass "
                                         r"--teacher_model_name_or_path PATH\."):
        main(["train", "--config", recipe(tmp_path, tiny, objective="fkl", teacher_model_name_or_path=None)])
    with pytest.raises(ValueError, match=r"teacher_model is required for objective 'fkl': pass "
                                         r"AMMTrainer\(teacher_model=\.\.\.\) \(in a recipe or on the command line: "
                                         r"teacher_model_name_or_path\)"):
        AMMTrainer(model=tiny["student"], args=config(tmp_path, objective="fkl"), train_dataset=Dataset.from_dict(
            {"prompt": ["w1 w2"], "completion": ["w3"]}))


def test_generation_never_picks_a_padded_embedding_row(tmp_path):
    """A model whose embedding is padded past its tokenizer (Qwen2.5's case), with the padded rows made the most
    likely: greedy generation (the summary, `amm-trl generate`, `amm-trl eval`) still only emits real tokens."""
    from amm_trl.generation import generate_token_ids
    from tests.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok) + 32)
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = model.lm_head.weight[:len(tok)].abs().max() * 50
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    prompts = [tok("w1 w2 w3")["input_ids"], tok("w4")["input_ids"]]
    unpadded = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=4, do_sample=False)
    assert (unpadded[0, len(prompts[1]):] >= len(tok)).all()  # without the limit: padded rows only
    ids = generate_token_ids(str(tmp_path / "padded"), prompts, max_new_tokens=8, dtype="float32", progress=False)
    assert all(len(row) > 0 and max(row) < len(tok) for row in ids), ids


def test_resuming_onto_another_models_checkpoint_names_the_folder_and_both_shapes(tmp_path, tiny):
    from tests.tiny import build_model, build_tokenizer

    main(["train", "--config", recipe(tmp_path, tiny, save_strategy="steps", save_steps=2)])
    other = tmp_path / "wider"
    build_model(len(build_tokenizer()), hidden=64).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    state = (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text()
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*out/checkpoint-2 was written by a different "
                                         r"model: lm_head\.weight is \(64, 32\) in .*model\.safetensors but "
                                         r"\(64, 64\) in this run's model\. Resume from a checkpoint of this model"):
        main(["train", "--config", recipe(tmp_path, tiny, model_name_or_path=str(other)), "--resume_from_checkpoint",
              "latest"])
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text() == state


def test_a_vllm_share_too_small_for_the_students_weights_is_refused_with_the_numbers(tiny, monkeypatch):
    """Colocated vLLM on a 40 GB GPU (its properties stood in for on this CPU machine): a share that cannot hold the
    student's weights is refused before any model loads, with the share, the weights and the minimum."""
    from types import SimpleNamespace

    from amm_trl.rollouts import check_vllm_memory

    weights = sum(os.path.getsize(os.path.join(tiny["student"], n)) for n in os.listdir(tiny["student"])
                  if n.endswith(".safetensors"))
    gpu = SimpleNamespace(total_memory=40 * 2**30, name="NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpu)
    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=1,
                           vllm_gpu_memory_utilization=0.02)
    with pytest.raises(ValueError, match=rf"AMMConfig.vllm_gpu_memory_utilization=0.02 gives vLLM 0.8 GiB of this "
                                         rf"GPU's 40.0 GiB \(NVIDIA A100-SXM4-40GB\), but the student's weights take "
                                         rf"{weights / 2**30:.1f} GiB per engine rank .* set "
                                         rf"vllm_gpu_memory_utilization >= 0.05 \(the GPU recipes use 0.15 on 80 GB"):
        check_vllm_memory(args, tiny["student"])
    check_vllm_memory(SimpleNamespace(**{**vars(args), "vllm_gpu_memory_utilization": 0.05}), tiny["student"])


@pytest.mark.parametrize("push_heads", [False, True])
def test_push_to_hub_leaves_out_the_lock_and_unless_asked_the_q_heads(tiny, tiny_dataset, tmp_path, monkeypatch,
                                                                       push_heads):
    """The upload of output_dir (hub calls recorded, nothing leaves the machine) skips the run's lock file and the
    Q-heads file unless `hub_push_q_heads`; the Trainer's own patterns stay."""
    import transformers.trainer as hf_trainer

    calls = []

    class Recorder:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: Recorder())
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], train_dataset=tiny_dataset,
                         args=config(tmp_path, max_steps=1, hub_push_q_heads=push_heads))
    trainer.train()
    trainer.hub_model_id = "someone/student"
    trainer.push_to_hub()
    (call,) = calls
    assert call["folder_path"] == str(tmp_path / "out") and (tmp_path / "out" / "amm_q_heads.safetensors").exists()
    assert {"_*", "checkpoint-*", ".amm-trl.lock"} <= set(call["ignore_patterns"])
    assert ("amm_q_heads.safetensors" in call["ignore_patterns"]) is not push_heads
    assert isinstance(hf_trainer.hf_api(), Recorder)  # transformers' function is restored after the push


def test_a_failed_training_gives_sigterm_back(tiny, tiny_dataset, tmp_path, monkeypatch):
    """The preemption handler lives only while `train()` runs: after a run that raised, SIGTERM has its previous
    handler again (a swallowed SIGTERM would make the process unkillable by slurm's first signal)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    trainer = AMMTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=config(tmp_path),
                         train_dataset=tiny_dataset)

    def broken_step(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) == trainer.preemption._on_signal  # installed while training
        raise RuntimeError("step failed")

    monkeypatch.setattr(trainer, "training_step", broken_step)
    with pytest.raises(RuntimeError, match="step failed"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) == before
