"""`amm-trl eval`: generate with a model for a prompt dataset and score the outputs against references.

Scores: ROUGE-L F1 (`rouge-score`, stemmed, x100), corpus BLEU (`sacrebleu`), exact match (whitespace- and
case-normalized), and any scorer you plug in with `--scorer module:function` where
`function(prediction: str, reference: str, row: dict) -> float`. Writes `predictions.jsonl` (one row per example
with every score) and `summary.json` (means, counts, settings) into `--output_dir`, both atomically.
"""

import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or hub id to evaluate."})
    dataset_name: str = field(metadata={"help": "Prompts + references: .jsonl/.json file, saved folder or hub name."})
    output_dir: str = field(metadata={"help": "Where predictions.jsonl and summary.json are written."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    reference_column: str = field(default="completion", metadata={"help": "Column with the reference answer."})
    metrics: str = field(default="rougeL,bleu,exact_match", metadata={"help": "Comma-separated built-in metrics."})
    scorer: str | None = field(default=None, metadata={"help": "Extra scorer `module:function` (pred, ref, row)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length limit."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per `generate` call (HF backend)."})
    use_vllm: bool | None = field(default=None, metadata={"help": "vLLM backend; default: when installed and CUDA."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype for the HF backend."})
    max_samples: int | None = field(default=None, metadata={"help": "Only the first N examples."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def reference_text(value) -> str:
    """Text of a reference: a string, or the content of a list of chat messages (TRL's conversational format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "".join(m.get("content", "") for m in value)
    return str(value)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def load_scorer(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--scorer {spec!r}: use the form module:function")
    return getattr(importlib.import_module(module), name)


METRIC_PACKAGES = {"rougeL": ("rouge_score", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu"), "exact_match": None}


def check_metrics(metrics: list[str]) -> None:
    """Each metric is known and its package importable: checked before any generation, not after it."""
    unknown = [m for m in metrics if m not in METRIC_PACKAGES]
    if unknown:
        raise ValueError(f"--metrics: unknown {unknown}; built-in metrics are {sorted(METRIC_PACKAGES)} (or use "
                         f"--scorer).")
    for metric in metrics:
        if METRIC_PACKAGES[metric] and importlib.util.find_spec(METRIC_PACKAGES[metric][0]) is None:
            raise ImportError(f"--metrics {metric} needs the package {METRIC_PACKAGES[metric][1]!r}: "
                              f"`pip install {METRIC_PACKAGES[metric][1]}` (amm-trl installs it), or drop the metric.")


def score(predictions: list[str], references: list[str], rows: list[dict], metrics: list[str],
          scorer=None) -> tuple[list[dict], dict]:
    """Per-example scores and the summary (means; BLEU at corpus level)."""
    check_metrics(metrics)
    per_example = [{} for _ in predictions]
    summary = {}
    if "rougeL" in metrics:
        for item, value in zip(per_example, rouge_l(predictions, references)):
            item["rougeL"] = value
    if "exact_match" in metrics:
        for item, p, r in zip(per_example, predictions, references):
            item["exact_match"] = exact_match(p, r)
    if scorer is not None:
        for item, p, r, row in zip(per_example, predictions, references, rows):
            item["score"] = float(scorer(p, r, row))
    n = len(predictions)
    for key in ("rougeL", "exact_match", "score"):
        if per_example and key in per_example[0]:
            summary[key] = sum(item[key] for item in per_example) / n
    if "bleu" in metrics:
        summary["bleu"] = corpus_bleu(predictions, references) if n else 0.0
    summary["num_examples"] = n
    return per_example, summary


def _write_atomic(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def evaluate(a: EvalArguments) -> dict:
    import torch
    from transformers import AutoTokenizer

    from .checks import check_model_path
    from .data import load_prompt_dataset
    from .generation import decode_completions, generate_token_ids, render_prompts

    check_model_path("model_name_or_path", a.model_name_or_path)
    dataset = load_prompt_dataset(a.dataset_name, a.dataset_split)
    for column in ("prompt", a.reference_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset_name {a.dataset_name!r} has columns {dataset.column_names}: no {column!r} "
                             f"column (set --reference_column for the answers).")
    if a.max_samples is not None:
        dataset = dataset.select(range(min(a.max_samples, len(dataset))))
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    check_metrics(metrics)
    scorer = load_scorer(a.scorer) if a.scorer else None
    use_vllm = a.use_vllm
    if use_vllm is None:
        use_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None

    tokenizer = AutoTokenizer.from_pretrained(a.model_name_or_path)
    rows = [dict(r) for r in dataset]
    ids = generate_token_ids(a.model_name_or_path, render_prompts(tokenizer, [r["prompt"] for r in rows]),
                             a.max_new_tokens, a.temperature, a.top_p, a.batch_size, use_vllm, a.dtype, a.seed)
    predictions = decode_completions(tokenizer, ids)
    references = [reference_text(r[a.reference_column]) for r in rows]
    per_example, summary = score(predictions, references, rows, metrics, scorer)
    summary.update(model=a.model_name_or_path, dataset=a.dataset_name, backend="vllm" if use_vllm else "hf",
                   settings=asdict(a))

    os.makedirs(a.output_dir, exist_ok=True)
    lines = [json.dumps({"prompt": r["prompt"], "reference": ref, "prediction": p, **s})
             for r, ref, p, s in zip(rows, references, predictions, per_example)]
    _write_atomic(os.path.join(a.output_dir, "predictions.jsonl"), "\n".join(lines) + "\n")
    _write_atomic(os.path.join(a.output_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def answer_batches(prompt_ids: list[list[int]], completions: list[list[int]], batch_size: int):
    """(ids, attention mask, scored) per batch of prompt + completion rows (empty completions skipped), right-padded;
    `scored` marks the positions that predict a completion token (position j predicts token j + 1)."""
    import torch

    for start in range(0, len(prompt_ids), batch_size):
        rows = [(p, c) for p, c in zip(prompt_ids[start:start + batch_size], completions[start:start + batch_size])
                if c]
        if not rows:
            continue
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask, scored = torch.zeros_like(ids), torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
            scored[i, len(p) - 1:len(p) + len(c) - 1] = True
        yield ids, mask, scored


def exact_tv(student_path: str, teacher_path: str, prompt_ids: list[list[int]], completions: list[list[int]],
             batch_size: int = 16) -> float:
    """Mean exact total variation between the teacher's and the student's next-token distributions over the tokens
    of fixed completions: mean over tokens t of 1/2 sum_v |p_T(v | x, y_<t) - p_S(v | x, y_<t)|, on the vocabulary
    rows both models and the tokenizer share, with the trainer's `total_variation` (its `tv/*` metrics), fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .objectives import total_variation

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).to(device).eval()
              for p in (student_path, teacher_path)]
    vocab = min(len(AutoTokenizer.from_pretrained(student_path)),
                *(m.get_output_embeddings().weight.size(0) for m in models))
    total, count = 0.0, 0
    for ids, mask, scored in answer_batches(prompt_ids, completions, batch_size):
        with torch.no_grad():
            logits = [m(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., :vocab].float()
                      [scored.to(device)] for m in models]
        total += total_variation(*logits).sum().item()
        count += int(scored.sum())
    return total / max(count, 1)


def main(argv: list[str] | None = None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    summary = evaluate(args)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k != "settings"}
    print("amm-trl eval: " + json.dumps(shown), flush=True)
    return summary


if __name__ == "__main__":
    main()
