"""`amm-trl` CLI: recipes, YAML parsing rules, generate and train end to end (single process, CPU)."""

import json
import os
from importlib import resources

import pytest

from amm_trl.cli import main, parse_train_args, recipe_path
from amm_trl.config import AMMConfig

RECIPES = sorted(p.name for p in (resources.files("amm_trl") / "recipes").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses_into_config_objects(name):
    from trl import ModelConfig

    from amm_trl.cli import TrainScriptArguments

    import torch

    # GPU recipes (bf16) only build on a CPU machine with use_cpu, which changes nothing else that is checked here.
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    script, args, model = parse_train_args(["--config", recipe_path(name), "--output_dir", "/tmp/amm-recipe-test",
                                            *cpu])
    assert isinstance(script, TrainScriptArguments) and isinstance(args, AMMConfig) and isinstance(model, ModelConfig)
    assert model.model_name_or_path and script.dataset_name
    # Every recipe is named after its objective (`<setup>_<objective>.yaml`); the plain quickstart runs AMM.
    assert args.objective == ("amm" if name == "quickstart.yaml" else name[:-len(".yaml")].rsplit("_", 1)[1])


def test_recipes_folder_is_the_packaged_one():
    assert os.path.realpath("recipes") == os.path.realpath(str(resources.files("amm_trl") / "recipes"))
    assert "quickstart.yaml" in RECIPES


def tiny_recipe(tmp_path, tiny, **extra):
    lines = {
        "model_name_or_path": tiny["student"], "teacher_model_name_or_path": tiny["teacher"],
        "dataset_name": tiny["data"], "dtype": "float32", "output_dir": str(tmp_path / "out"), "max_steps": 2,
        "per_device_train_batch_size": 4, "max_completion_length": 6, "use_cpu": True, "bf16": False,
        "gradient_checkpointing": False, "report_to": "none", "save_strategy": "no", "logging_steps": 1,
        "teacher_model_init_kwargs": {"dtype": "float32"}, **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in lines.items()) + "\n")
    return str(path)


def test_unknown_yaml_key_is_rejected_by_name(tmp_path, tiny):
    path = tiny_recipe(tmp_path, tiny, q_head_lr_multiplyer=10)
    with pytest.raises(ValueError, match="Unknown arguments from config file.*q_head_lr_multiplyer"):
        parse_train_args(["--config", path])


def test_command_line_overrides_yaml(tmp_path, tiny):
    path = tiny_recipe(tmp_path, tiny, amm_beta=0.25)
    _, args, _ = parse_train_args(["--config", path, "--amm_beta", "0.75", "--objective", "fkl"])
    assert args.amm_beta == 0.75 and args.objective == "fkl" and args.max_steps == 2


def test_missing_recipe_names_the_packaged_ones():
    with pytest.raises(FileNotFoundError, match="no packaged recipe of that name.*quickstart.yaml"):
        recipe_path("nope")


def test_train_writes_a_plain_student_and_the_heads(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    main(["train", "--config", tiny_recipe(tmp_path, tiny)])
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (out / "amm_q_heads.safetensors").exists()


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, tiny):
    main(["train", "--config", tiny_recipe(tmp_path, tiny, objective="fkl"), "--resume_from_checkpoint", "latest"])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_generate_writes_completions_for_every_prompt(tmp_path, tiny):
    out = tmp_path / "gen" / "teacher.jsonl"
    main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"],
          "--output_file", str(out), "--max_new_tokens", "5", "--max_samples", "6", "--batch_size", "4",
          "--temperature", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["completion"], str) and "prompt" in r for r in rows)
    assert not (tmp_path / "gen" / "teacher.jsonl.tmp").exists()


def test_generated_teacher_data_feeds_seqkd(tmp_path, tiny):
    data = tmp_path / "teacher.jsonl"
    main(["generate", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"],
          "--output_file", str(data), "--max_new_tokens", "5", "--temperature", "0"])
    main(["train", "--config", tiny_recipe(tmp_path, tiny, objective="seqkd", dataset_name=str(data))])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2 and "unknown command 'fly'" in capsys.readouterr().err


def test_train_script_arguments_are_trls_and_refuse_the_fields_train_ignores():
    from trl import ScriptArguments

    from amm_trl.cli import TrainScriptArguments

    script = TrainScriptArguments(dataset_name="data.jsonl", dataset_config="main", max_train_samples=8)
    assert isinstance(script, ScriptArguments) and script.dataset_train_split == "train"
    with pytest.raises(ValueError, match=r"dataset_streaming=True is not supported by `amm-trl train`: datasets are"):
        TrainScriptArguments(dataset_name="data.jsonl", dataset_streaming=True)
    with pytest.raises(ValueError, match="dataset_test_split='validation' is not supported.*eval_dataset_name"):
        TrainScriptArguments(dataset_name="data.jsonl", dataset_test_split="validation")


def test_summary_prints_tv_on_both_kinds_and_rouge_before_and_after(tmp_path, tiny, capsys):
    from amm_trl.evaluation import EvalArguments, evaluate

    main(["train", "--config", tiny_recipe(tmp_path, tiny, max_steps=3, summary_eval_dataset=tiny["data"],
                                           summary_eval_rows=5, summary_eval_max_new_tokens=4)])
    printed = capsys.readouterr().out
    for kind in ("student rollouts", "off-policy answers"):
        assert f"exact TV(teacher, student) on {kind}: " in printed
    line = next(l for l in printed.splitlines() if l.startswith("amm-trl: ROUGE-L"))
    start, end = (float(x) for x in line.rsplit(": start ", 1)[1].split(" -> end "))
    # the same numbers `amm-trl eval` gives for the initial and the saved student on those rows
    for model, value in ((tiny["student"], start), (str(tmp_path / "out"), end)):
        reference = evaluate(EvalArguments(model_name_or_path=model, dataset_name=tiny["data"], max_samples=5,
                                           output_dir=str(tmp_path / "check"), metrics="rougeL", max_new_tokens=4))
        assert value == pytest.approx(reference["rougeL"], abs=0.005)
    assert (tmp_path / "out" / "summary_eval" / "end" / "predictions.jsonl").exists()
    # exact TV on fixed held-out data: start = the initial student on the teacher's greedy answers, as computed here
    line = next(l for l in printed.splitlines()
                if l.startswith("amm-trl: exact TV(teacher, student) on the teacher's greedy answers to the 5 "
                                "held-out"))
    held_out = [float(x) for x in line.split(": start ", 1)[1].split(",")[0].split(" -> end ")]
    prompts, answers = _teacher_greedy(tiny, 5, 4)
    assert held_out == pytest.approx([_tv_loop(tiny["student"], tiny["teacher"], prompts, answers),
                                                       _tv_loop(str(tmp_path / "out"), tiny["teacher"], prompts,
                                                                answers)], abs=1e-4)


def _teacher_greedy(tiny, rows, new_tokens):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    with open(tiny["data"]) as f:
        data = [json.loads(line) for line in f][:rows]
    prompts, answers = [], []
    for row in data:
        ids = tokenizer(row["prompt"])["input_ids"]
        out = teacher.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        ends = {tokenizer.eos_token_id}
        cut = next((k + 1 for k, t in enumerate(out) if t in ends), len(out))
        prompts.append(ids)
        answers.append(out[:cut])
    return prompts, answers


def _tv_loop(student_path, teacher_path, prompts, answers):
    """The reference: one sequence and one position at a time, 1/2 sum |p_T - p_S| over the shared vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(student_path))
    student, teacher = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
                        for p in (student_path, teacher_path))
    values = []
    for p, a in zip(prompts, answers):
        for t in range(len(a)):
            x = torch.tensor([p + a[:t]])
            with torch.no_grad():
                ps, pt = (m(x).logits[0, -1, :vocab].softmax(-1) for m in (student, teacher))
            values.append(0.5 * (ps - pt).abs().sum().item())
    return sum(values) / len(values)


def test_summary_eval_is_off_without_a_dataset_or_rows():
    from types import SimpleNamespace

    from amm_trl.cli import summary_rouge

    for dataset, rows in ((None, 32), ("", 32), ("data.jsonl", 0)):
        script = SimpleNamespace(summary_eval_dataset=dataset, summary_eval_rows=rows, summary_eval_max_new_tokens=8)
        assert summary_rouge(script, "no/model/needed", "/tmp/unused") is None


GPU_RECIPES = [name for name in RECIPES if name.startswith("openllama_7b_3b_")]
DOLLY_TRAIN_ROWS, GPUS = 14511, 8  # README "Data format" (15,011 rows, 500 held out); the recipes' launch line


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_checkpoint_and_evaluate_within_their_documented_run(name):
    """With the documented launch (8 GPUs) and data (dolly's training split), each GPU recipe's run length is the
    one its header states, it saves at least 4 checkpoints and evaluates at least 3 times within it, reads the
    documented eval split, and starts a vLLM engine only if its objective generates rollouts."""
    import math

    text = (resources.files("amm_trl") / "recipes" / name).read_text()
    script, args, _ = parse_train_args(["--config", recipe_path(name), "--output_dir", "/tmp/amm-recipe-test",
                                        "--use_cpu", "true"])
    per_step = GPUS * args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps = math.ceil(DOLLY_TRAIN_ROWS / per_step) * int(args.num_train_epochs)
    assert f"--num_processes {GPUS}" in text and f"= {per_step} rows per optimizer step" in text
    assert f"x {int(args.num_train_epochs)} epochs = {steps} steps" in text
    assert args.save_strategy == "steps" and steps // args.save_steps >= 4, (args.save_steps, steps)
    assert args.eval_strategy == "steps" and steps // args.eval_steps >= 3, (args.eval_steps, steps)
    assert script.eval_dataset_name == "data/dolly_eval.jsonl" and 'split["test"].to_json("data/dolly_eval.jsonl")' \
        in open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    assert args.use_vllm == args.objective_unit.data.rollouts, (args.objective, args.use_vllm)


def test_help_shows_the_configs_defaults_not_the_quickstart_recipes(capsys):
    """`amm-trl train --help` documents AMMConfig's defaults, not the quickstart recipe's values."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    entry = text.split("--per-device-train-batch-size PER_DEVICE_TRAIN_BATCH_SIZE")[1].split("--")[0]
    assert "(default: 8)" in entry and "(default: 4)" not in entry  # AMMConfig's 8, not the quickstart's 4


def test_the_config_docstring_documents_every_field_with_its_actual_default():
    """AMMConfig's docstring (TRL's format: ``name (`type`, *optional*, defaults to `X`)``) has one entry per field
    it adds or overrides, and X is the field's default: a default changed in code but not in the docs fails here."""
    import ast
    import dataclasses
    import re

    from trl import DistillationConfig

    entry = re.compile(r"^ {8}(\w+) \(`[^`]+`[^)\n]*?defaults to `([^`]*)`\)", re.M)
    documented = dict(entry.findall(AMMConfig.__doc__))
    inherited = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    ours = [f for f in dataclasses.fields(AMMConfig) if f.name not in inherited or f.name in documented]
    assert len(ours) > 40 and {f.name for f in ours} == set(documented), set(documented) ^ {f.name for f in ours}
    for f in ours:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = documented[f.name]
        try:
            text_value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            text_value = text
        assert text_value == default, f"{f.name}: the docstring says {text!r}, the field defaults to {default!r}"

def test_version_and_env_print_what_a_bug_report_needs(capsys):
    import importlib.metadata

    import torch

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"amm-trl {importlib.metadata.version('amm-trl')}"
    main(["env"])
    out = capsys.readouterr().out
    for line in (f"- torch: {torch.__version__}", f"- trl: {importlib.metadata.version('trl')}",
                 f"- transformers: {importlib.metadata.version('transformers')}",
                 f"- deepspeed: {importlib.metadata.version('deepspeed')}", "- vllm: ", "- cuda: ", "- cpu: "):
        assert line in out, (line, out)


def test_model_card_names_the_objective_its_paper_and_both_models(tmp_path, tiny):
    main(["train", "--config", tiny_recipe(tmp_path, tiny, save_strategy="steps", save_steps=2)])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "amm-trl (objective `amm`)" in card and "huggingface.co/papers/2406.02959" in card
    assert "Adversarial Moment-Matching Distillation of Large Language Models" in card and "2306.13649" not in card
    assert f"`{tiny['student']}` distilled from `{tiny['teacher']}`" in card and "None" not in card
    fkl = tmp_path / "fkl"
    fkl.mkdir()
    main(["train", "--config", tiny_recipe(fkl, tiny, objective="fkl", save_strategy="steps", save_steps=2)])
    card = (fkl / "out" / "README.md").read_text()
    assert "amm-trl (objective `fkl`)" in card and "huggingface.co/papers" not in card and "@inproceedings" not in card
    gkd = tmp_path / "gkd"
    gkd.mkdir()
    main(["train", "--config", tiny_recipe(gkd, tiny, objective="gkd", save_strategy="steps", save_steps=2)])
    card = (gkd / "out" / "README.md").read_text()  # GKD's paper with its BibTeX, as TRL's own trainer cites it
    assert "huggingface.co/papers/2306.13649" in card and "@inproceedings{agarwal2024on-policy" in card


def test_lora_run_gets_the_same_card_not_peft_s_blank_template(tmp_path, tiny):
    main(["train", "--config", tiny_recipe(tmp_path, tiny, save_strategy="steps", save_steps=2, use_peft=True,
                                           lora_r=4, lora_target_modules=["q_proj", "v_proj"])])
    card = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and "library_name: peft" in card
    assert "amm-trl (objective `amm`)" in card and f"`{tiny['student']}` distilled from `{tiny['teacher']}`" in card
    assert "[More Information Needed]" not in card  # PEFT's blank template


CRITIC_FIELDS = ("q_prior_alpha", "q_bound", "q_head_l2", "amm_anchor_weight", "q_head_lr_multiplier")


@pytest.mark.parametrize("name", [n for n in RECIPES if n == "quickstart.yaml" or
                                  n.endswith(("_amm.yaml", "_pbkd.yaml"))])
def test_amm_recipes_and_readme_use_the_configs_critic(name):
    """The critic the recipes and the README's example run is AMMConfig's default (the measured one), not another."""
    import re

    _, args, _ = parse_train_args(["--config", recipe_path(name), "--output_dir", "/tmp/amm-recipe-test",
                                   "--use_cpu", "true"])
    defaults = {f: AMMConfig.__dataclass_fields__[f].default for f in CRITIC_FIELDS}
    # PbKD keeps the critic rate it was measured with on Tier A (AMM's selections set the default; PbKD's not searched)
    expected = {**defaults, "q_head_lr_multiplier": 5.0} if name.endswith("_pbkd.yaml") else defaults
    assert {f: getattr(args, f) for f in CRITIC_FIELDS} == expected, name
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    example = readme.split("```python", 1)[1].split("```", 1)[0]
    for field_name, value in defaults.items():
        assert re.search(rf"\b{field_name}={value!r}[,)]", example), (field_name, value)
