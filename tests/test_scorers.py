"""Tests for amm_trl.scorers (offline; reasoning-gym generates the entries locally)."""

import json

import pytest

from amm_trl import assets, scorers
from amm_trl.evaluation import load_scorer, score

reasoning_gym = pytest.importorskip("reasoning_gym")


@pytest.fixture(scope="module")
def entries():
    return list(reasoning_gym.create_dataset("gsm_symbolic", size=1000, seed=1))


def _row(entries, pred):
    """The asset row (conversational + answer + entry) of the first entry whose answer satisfies `pred`."""
    return assets.gsm_to_conversational(next(e for e in entries if pred(e["answer"])))


@pytest.mark.parametrize("text, expected", [
    ("#### 42", "42"),
    ("Step 1: 3 + 4 = 7\n#### 42\n", "42"),
    ("first #### 7 then\n#### $1,234.00 dollars", "1234"),
    ("The answer is 1,234.", "1234"),
    ("So the final ANSWER IS: $56.", "56"),
    ("He has 3 apples and buys 12 more, 15 in total.", "15"),
    ("#### 2047.50", "2047.5"),
    ("#### 36.0", "36"),
    ("no number at all", None),
    ("####", None),
    ("#### -5", "-5"),
    ("Total: 3 + 4 = 7. Thus $\\boxed{1,050}$ apples, 2 left.", "1050"),
    ("\\boxed{3} first, then \\boxed{12}", "12"),
    ("\\boxed{x} and finally 9", "9"),
    ("#### 4 beats \\boxed{5}", "4"),
])
def test_extract_final_answer(text, expected):
    assert scorers.extract_final_answer(text) == expected


def test_gsm_symbolic_scores_real_entry(entries):
    row = _row(entries, lambda a: a.isdigit() and 1000 <= int(a) < 10000)
    answer = row["answer"]
    thousands = f"{answer[:-3]},{answer[-3:]}"
    for prediction in (f"#### {answer}", f"Let me think.\n#### {answer}\n", f"The answer is {thousands}.",
                       f"The answer is ${thousands}.00", f"{int(answer) - 1} is wrong, the total is {answer}",
                       f"#### {answer}.0", f"#### {answer}."):
        assert scorers.gsm_symbolic(prediction, "", row) == 1.0, prediction
    for prediction in (f"#### {int(answer) + 1}", f"The answer is {int(answer) * 2}.", "I do not know.", "",
                       f"#### -{answer}", f"#### {answer}\n#### {int(answer) + 1}"):
        assert scorers.gsm_symbolic(prediction, "", row) == 0.0, prediction  # reasoning-gym's 0.01 -> 0.0


def test_gsm_symbolic_decimals(entries):
    row = _row(entries, lambda a: "." in a)
    answer = row["answer"]
    assert float(answer) != int(float(answer))
    assert scorers.gsm_symbolic(f"#### {answer}", "", row) == 1.0
    assert scorers.gsm_symbolic(f"#### {answer}0", "", row) == 1.0
    assert scorers.gsm_symbolic(f"#### {int(float(answer))}", "", row) == 0.0
    assert scorers.gsm_symbolic(f"#### {round(float(answer))}", "", row) == 0.0


def test_gsm_symbolic_fallbacks_without_entry(entries):
    row = _row(entries, str.isdigit)
    reference = row["completion"][0]["content"]
    assert scorers.gsm_symbolic(f"#### {row['answer']}", reference, {"answer": row["answer"]}) == 1.0
    assert scorers.gsm_symbolic(f"#### {row['answer']}", reference, {}) == 1.0  # oracle from the reference
    assert scorers.gsm_symbolic(f"#### {int(row['answer']) + 3}", reference, {}) == 0.0
    assert scorers.gsm_symbolic("#### 1", "", {"entry": {"answer": "1"}}) == 1.0  # an entry already decoded


def test_gsm_symbolic_negative_answers():
    # reasoning-gym alone would read "-1" as 1 (its pattern drops the sign); one template yields an age of -1
    row = {"entry": json.dumps({"answer": "-1", "metadata": {}})}
    assert scorers.gsm_symbolic("84 - 85 = -1\n#### -1", "", row) == 1.0
    assert scorers.gsm_symbolic("#### 1", "", row) == 0.0
    assert scorers.gsm_symbolic("#### -1", "", {"answer": "1"}) == 0.0


def test_every_reference_solution_scores_one_and_mean_is_accuracy(entries):
    rows = [assets.gsm_to_conversational(e) for e in entries]
    references = [r["completion"][0]["content"] for r in rows]
    assert all(scorers.gsm_symbolic(ref, ref, r) == 1.0 for ref, r in zip(references, rows))

    # through `amm-trl eval`'s scoring path: 3 right, 1 wrong, 1 without a number -> 0.6
    fn = load_scorer("amm_trl.scorers:gsm_symbolic")
    preds = references[:3] + [f"#### {int(float(rows[3]['answer'])) + 1}", "no idea"]
    per_example, summary = score(preds, references[:5], rows[:5], metrics=[], scorer=fn)
    assert [p["score"] for p in per_example] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert summary["score"] == pytest.approx(0.6)


def test_row_entry_is_json_with_the_answer(entries):
    row = assets.gsm_to_conversational(entries[0])
    entry = json.loads(row["entry"])
    assert entry["answer"] == row["answer"] == entries[0]["answer"]
    assert entry["question"] == entries[0]["question"]
