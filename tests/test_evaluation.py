"""`amm-trl eval`: scores against hand-computed values, pluggable scorer, end to end on the tiny model."""

import json
import math

import pytest

from amm_trl.cli import main
from amm_trl.evaluation import corpus_bleu, exact_match, reference_text, score


def length_ratio(prediction, reference, row):  # a pluggable scorer used below
    return len(prediction.split()) / max(1, len(reference.split()))


def test_rouge_l_and_exact_match_hand_computed():
    preds = ["the cat sat on the mat", "Paris", "w1 w2"]
    refs = ["the cat is on the mat", "  paris ", "w3"]
    per_example, summary = score(preds, refs, [{}] * 3, ["rougeL", "exact_match"])
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = 5/6
    assert per_example[0]["rougeL"] == pytest.approx(100 * 5 / 6)
    assert per_example[1]["rougeL"] == pytest.approx(100.0) and per_example[2]["rougeL"] == 0.0
    assert [e["exact_match"] for e in per_example] == [0.0, 1.0, 0.0]
    assert summary["rougeL"] == pytest.approx((100 * 5 / 6 + 100) / 3)
    assert summary["exact_match"] == pytest.approx(1 / 3) and summary["num_examples"] == 3


def test_bleu_hand_computed():
    # n-gram precisions 5/6, 3/5, 1/4 and 0/3 -> sacrebleu's exp smoothing 1/(2*3); brevity penalty 1.
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(expected, rel=1e-6)


def test_pluggable_scorer_and_unknown_metric():
    per_example, summary = score(["a b", "a"], ["a b c d", "a"], [{}, {}], [], scorer=length_ratio)
    assert [e["score"] for e in per_example] == [0.5, 1.0] and summary["score"] == 0.75
    with pytest.raises(ValueError, match="unknown \\['rouge2'\\]"):
        score(["a"], ["a"], [{}], ["rouge2"])


def test_reference_text_reads_chat_messages():
    assert reference_text([{"role": "assistant", "content": "w1 w2"}]) == "w1 w2"
    assert reference_text("x") == "x" and exact_match(" A  b ", "a b") == 1.0


def test_eval_command_end_to_end(tmp_path, tiny):
    out = tmp_path / "eval"
    args = ["eval", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"], "--output_dir",
            str(out), "--max_new_tokens", "4", "--max_samples", "5", "--batch_size", "2",
            "--scorer", "tests.test_evaluation:length_ratio"]
    main(args)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 5 and summary["num_examples"] == 5 and summary["backend"] == "hf"
    assert set(rows[0]) >= {"prompt", "reference", "prediction", "rougeL", "exact_match", "score"}
    assert summary["rougeL"] == pytest.approx(sum(r["rougeL"] for r in rows) / 5)
    main(args)  # greedy: the same predictions again
    again = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]


def test_eval_refuses_missing_reference_column(tmp_path, tiny):
    with pytest.raises(ValueError, match="no 'answer' column"):
        main(["eval", "--model_name_or_path", tiny["teacher"], "--dataset_name", tiny["data"],
              "--output_dir", str(tmp_path), "--reference_column", "answer"])


def test_a_metric_whose_package_is_missing_fails_before_any_generation(tmp_path, tiny, monkeypatch):
    """`amm-trl eval --metrics bleu` without sacrebleu stops before loading the model or generating, naming the
    package, instead of after all generation with nothing written."""
    import importlib.util

    import amm_trl.generation as generation
    from amm_trl.evaluation import main as eval_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else
                        find_spec(name, *a))
    monkeypatch.setattr(generation, "generate_token_ids", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(ImportError, match=r"--metrics bleu needs the package 'sacrebleu': `pip install sacrebleu`"):
        eval_main(["--model_name_or_path", tiny["student"], "--dataset_name", tiny["data"], "--output_dir",
                   str(tmp_path / "eval"), "--metrics", "rougeL,bleu", "--reference_column", "completion"])
    assert not (tmp_path / "eval").exists()
