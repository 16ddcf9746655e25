"""Dataset assets: the alpaca demo split and reasoning-gym gsm_symbolic, as TRL conversational jsonl."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Iterable

from .cache import _atomic_file, log
from .sources import Member, PipSource, extract_member, fetch

LLAMAFACTORY_SDIST = PipSource(
    package="llamafactory", version="0.9.5", filename="llamafactory-0.9.5.tar.gz",
    sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True,
)
ALPACA_JSON = Member(
    path="llamafactory-0.9.5/data/alpaca_en_demo.json",
    sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
)

GSM_TRAIN_SIZE, GSM_TRAIN_SEED = 1000, 1
# reasoning-gym builds item i of a seed-s dataset from Random(s + i): an eval seed within [1, 1000] would replay
# the train items' random streams (same numbers whenever the template matches), so the eval seed lies far away.
GSM_EVAL_SIZE, GSM_EVAL_SEED = 200, 20000
GSM_INSTRUCTION = "Reason step by step, and end your answer with a final line of the form `#### <number>`."
ALPACA_N_EVAL = 100
ALPACA_SPLIT_SEED = 1234


def alpaca_to_conversational(row: dict) -> dict:
    """``{instruction, input, output}`` -> TRL conversational prompt-completion."""
    content = row["instruction"]
    if row.get("input"):
        content = f"{content}\n\n{row['input']}"
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": row["output"]}]}


def split_indices(n: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (Python-version independent) split of ``range(n)``: eval = the ``n_eval`` indices with the
    smallest sha256(seed:index). Both lists keep the original order."""
    if not 0 <= n_eval <= n:
        raise ValueError(f"n_eval={n_eval} must be within [0, {n}]")
    ranked = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    eval_set = set(ranked[:n_eval])
    return [i for i in range(n) if i not in eval_set], sorted(eval_set)


def _write_jsonl(rows: Iterable[dict], target: Path) -> None:
    with _atomic_file(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def convert_alpaca_split(json_path, train_out, eval_out, n_eval: int = ALPACA_N_EVAL,
                         seed: int = ALPACA_SPLIT_SEED) -> tuple[int, int]:
    """Converts an alpaca json list to two conversational jsonl files (each written atomically).
    Returns (n_train, n_eval)."""
    with open(json_path, encoding="utf-8") as f:
        rows = json.load(f)
    conv = [alpaca_to_conversational(r) for r in rows]
    train_idx, eval_idx = split_indices(len(conv), n_eval, seed)
    _write_jsonl((conv[i] for i in eval_idx), Path(eval_out))
    _write_jsonl((conv[i] for i in train_idx), Path(train_out))
    return len(train_idx), len(eval_idx)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False


def gsm_to_conversational(entry: dict) -> dict:
    """A reasoning-gym ``gsm_symbolic`` entry -> TRL conversational prompt-completion, plus the plain columns
    ``answer`` (string) and ``entry`` (the whole entry as JSON, for ``amm_trl.scorers:gsm_symbolic``).

    The completion is ``metadata["answer_cot"]`` ending with the line ``#### <answer>``: appended when missing,
    rewritten when it writes the same number another way (50 of seed 1's 1000 end ``#### 36.0`` for answer 36).
    A ``####`` line with a different number is a broken entry: ``ValueError``."""
    answer = str(entry["answer"])
    lines = entry["metadata"]["answer_cot"].rstrip().splitlines()
    last = re.fullmatch(r"####\s*(.*?)\s*", lines[-1]) if lines else None
    if last is None:
        lines.append(f"#### {answer}")
    elif lines[-1] != f"#### {answer}":
        if not _same_number(last.group(1), answer):
            raise ValueError(f"gsm_symbolic entry {entry['metadata'].get('source_index')}: answer_cot ends with "
                             f"{lines[-1]!r} but the answer is {answer!r}")
        lines[-1] = f"#### {answer}"
    return {"prompt": [{"role": "user", "content": f"{entry['question']}\n{GSM_INSTRUCTION}"}],
            "completion": [{"role": "assistant", "content": "\n".join(lines)}],
            "answer": answer,
            "entry": json.dumps(entry, ensure_ascii=False, default=str)}  # variables may hold Fractions


def gsm_symbolic_entries(size: int, seed: int) -> list[dict]:
    """``reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)`` as a list (lazy import)."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("the gsm-symbolic assets need reasoning-gym: pip install 'amm-trl[bench]' "
                          "(reasoning-gym==0.1.25)") from e
    return list(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed))


def convert_gsm_split(train_entries: list[dict], eval_candidates: Iterable[dict], train_out, eval_out,
                      n_eval: int = GSM_EVAL_SIZE) -> tuple[int, int, int]:
    """Writes all ``train_entries`` and the first ``n_eval`` eval candidates whose question appears neither in
    train nor earlier in eval, as conversational jsonl (each file atomically). Returns (n_train, n_eval, skipped)."""
    train = [gsm_to_conversational(e) for e in train_entries]
    seen = {e["question"] for e in train_entries}
    evals, skipped = [], 0
    for entry in eval_candidates:
        if len(evals) == n_eval:
            break
        if entry["question"] in seen:
            skipped += 1
            continue
        seen.add(entry["question"])
        evals.append(gsm_to_conversational(entry))
    if len(evals) < n_eval:
        raise ValueError(f"gsm eval split: only {len(evals)} of {n_eval} candidates are not in train; "
                         "give more candidates")
    _write_jsonl(evals, Path(eval_out))
    _write_jsonl(train, Path(train_out))
    return len(train), len(evals), skipped


def _build_gsm(target: Path) -> None:
    """Both gsm_symbolic files (`target` is one of them; the other lies beside it)."""
    t0 = time.perf_counter()
    train = gsm_symbolic_entries(GSM_TRAIN_SIZE, GSM_TRAIN_SEED)
    # Item i does not depend on the dataset size, so the first GSM_EVAL_SIZE of these are the size-200 dataset;
    # the rest replace any eval question that is also in train.
    candidates = gsm_symbolic_entries(2 * GSM_EVAL_SIZE, GSM_EVAL_SEED)
    n_train, n_eval, skipped = convert_gsm_split(train, candidates, target.with_name("gsm-symbolic-train.jsonl"),
                                                 target.with_name("gsm-symbolic-eval.jsonl"))
    log(f"gsm_symbolic: {n_train} train (seed {GSM_TRAIN_SEED}) / {n_eval} eval (seed {GSM_EVAL_SEED}, {skipped} "
        f"skipped as duplicates of train) in {time.perf_counter() - t0:.1f} s")


def _build_alpaca(target: Path) -> None:
    """Both alpaca demo files (`target` is one of them; the other lies beside it)."""
    archive = fetch(LLAMAFACTORY_SDIST)
    data = target.parent
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-alpaca-", dir=data) as work:
        src = extract_member(archive, ALPACA_JSON, Path(work) / "alpaca_en_demo.json")
        n_train, n_eval = convert_alpaca_split(src, target.with_name("alpaca-demo-train.jsonl"),
                                               target.with_name("alpaca-demo-eval.jsonl"))
    log(f"alpaca demo: {n_train} train / {n_eval} eval rows (seed {ALPACA_SPLIT_SEED})")
