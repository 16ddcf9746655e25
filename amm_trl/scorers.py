"""Task scorers for `amm-trl eval --scorer module:function`, each `function(prediction, reference, row) -> float`.

`gsm_symbolic`: accuracy on the `gsm-symbolic-eval` asset (reasoning-gym's GSM8K-derived problems):

    amm-trl eval --model_name_or_path outputs/qwen_gsm_amm --dataset_name <path of asset gsm-symbolic-eval> \\
        --output_dir outputs/qwen_gsm_amm/eval --metrics exact_match --scorer amm_trl.scorers:gsm_symbolic
"""

from __future__ import annotations

import functools
import json
import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_number(text: str) -> str | None:
    """The first number in ``text`` in a canonical form: thousands commas and ``$`` removed, trailing decimal zeros
    and a trailing ``.`` dropped (``"$1,234.50."`` -> ``"1234.5"``, ``"36.0"`` -> ``"36"``). None without a number."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.replace("$", ""))
    match = _NUMBER.search(text)
    if match is None:
        return None
    number = match.group(0)
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a GSM-style solution, normalized (``normalize_number``): the number after the last
    ``####`` (on that line); else in the last ``\\boxed{...}`` (the format instruct models such as Qwen2.5 use even
    when asked for ``####``); else after the last "answer is"; else the last number in the text. None if none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return normalize_number(tail.splitlines()[0]) if tail else None
    boxed = _BOXED.findall(text)
    if boxed and normalize_number(boxed[-1]) is not None:
        return normalize_number(boxed[-1])
    found = list(_ANSWER_IS.finditer(text))
    if found:
        answer = normalize_number(text[found[-1].end():])
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d)", "", text.replace("$", "")))
    return normalize_number(numbers[-1]) if numbers else None


@functools.lru_cache(maxsize=1)
def _score_answer():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("amm_trl.scorers:gsm_symbolic needs reasoning-gym: pip install 'amm-trl[bench]'") from e
    return reasoning_gym.get_score_answer_fn("gsm_symbolic")


def gsm_symbolic(prediction: str, reference: str, row: dict) -> float:
    """Accuracy scorer for reasoning-gym ``gsm_symbolic`` rows: 1.0 if the final answer is right, else 0.0.

    The final answer is extracted with ``extract_final_answer`` (after the last ``####``, else ``\\boxed{}``, else
    after "answer is", else the last number) and normalized (commas, ``$``, trailing ``.0`` / ``.``), then scored by
    reasoning-gym's own ``score_answer`` against the entry stored in ``row["entry"]`` (JSON, as the ``gsm-symbolic-*``
    assets write it). Without an ``entry`` column the row's ``answer``, or else the reference's own final answer, is
    the oracle.

    reasoning-gym gives 0.01 for a wrong number (and 0.0 for none); this scorer maps every score below 1 to 0.0, so
    the mean over a dataset (``summary.json`` "score") is the accuracy. Signs are compared here, because
    reasoning-gym's number pattern (``\\b-?\\d+``) drops a leading minus sign ("-1" would score as "1"); one
    template can produce a negative answer (an age of -1: eval row 2 of ``gsm-symbolic-eval``).
    """
    answer = extract_final_answer(prediction)
    if answer is None:
        return 0.0
    if row and row.get("entry"):
        entry = json.loads(row["entry"]) if isinstance(row["entry"], str) else dict(row["entry"])
    else:
        oracle = row.get("answer") if row else None
        entry = {"answer": str(oracle) if oracle is not None else extract_final_answer(reference)}
    if entry.get("answer") is None:
        return 0.0
    oracle = str(entry["answer"]).strip()
    if answer.startswith("-") != oracle.startswith("-"):
        return 0.0
    entry = {**entry, "answer": oracle.lstrip("-")}
    return 1.0 if _score_answer()(answer.lstrip("-"), entry) >= 1.0 else 0.0
