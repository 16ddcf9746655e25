"""DistiLLM-2 (`objective: distillm2`): its per-token loss against float64 references, the objective on its own, the
trainer's loss and gradients against a naive full-logit reference (one chunk and several), training, and its recipe."""

import math

import pytest
import torch

from amm_trl.cli import parse_train_args, recipe_path
from amm_trl.objectives.base import DenseTeacher, Tokens
from amm_trl.objectives.batch import Step
from amm_trl.objectives.distillm2 import DistiLLM2, distillm2_token_loss
from tests.test_objectives_extra import naive_logits, student_params
from tests.test_trainer import CHUNKS, check_chunks, fixed_batch, grads, loss_and_grads, make_config, make_trainer


def _skew_refs(z_s, z_t, alpha):
    """(SKL, SRKL) per row in float64, written from the probabilities."""
    p_s, p_t = torch.softmax(z_s.double(), -1), torch.softmax(z_t.double(), -1)
    skl = (p_t * (p_t.log() - (alpha * p_t + (1 - alpha) * p_s).log())).sum(-1)
    srkl = (p_s * (p_s.log() - ((1 - alpha) * p_t + alpha * p_s).log())).sum(-1)
    return skl, srkl


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.6])
def test_token_loss_is_skew_kl_on_teacher_and_skew_reverse_kl_on_student_responses(alpha):
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randn(7, 11, generator=g,
                                                                                dtype=torch.float64)
    skl, srkl = _skew_refs(z_s, z_t, alpha)
    torch.testing.assert_close(distillm2_token_loss(z_s, z_t, alpha, teacher_response=True), skl, rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(distillm2_token_loss(z_s, z_t, alpha, teacher_response=False), srkl, rtol=1e-12,
                               atol=1e-14)
    assert distillm2_token_loss(z_t, z_t, alpha, True).abs().max() < 1e-12  # zero at p_S = p_T


def test_the_objective_on_its_own(tmp_path):
    """No trainer: both data kinds every step, the teacher's answers by default, and each kind's term is the
    right divergence of the `Tokens` value it receives."""
    objective = DistiLLM2(make_config(tmp_path, objective="distillm2", skew_alpha=0.3, off_policy_source="auto"))
    assert objective.args.off_policy_source == "teacher" and objective.info.paper["id"] == "2503.07067"
    assert (objective.data.rollouts, objective.data.off_policy, objective.data.reuse) == (True, True, 1)
    assert objective.adversary is None and objective.state is None
    terms = objective.terms()
    assert {kind: [t.name for t in ts] for kind, ts in terms.items()} == {"off": ["distillm2_skl"],
                                                                          "on": ["distillm2_srkl"]}
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g,
                                                                                dtype=torch.float64)
    tokens = Tokens(z_s, DenseTeacher(z_t), torch.zeros(5, dtype=torch.long), torch.zeros(5, 2), None, {}, {},
                    torch.zeros(9, 2), Step(0, 1, 0, True))
    skl, srkl = _skew_refs(z_s, z_t, 0.3)
    for kind, want in (("off", skl), ("on", srkl)):
        (term,) = terms[kind]
        values, metrics = term.loss(tokens)
        assert term.weight == 1.0 and metrics == {}
        torch.testing.assert_close(values, want, rtol=1e-12, atol=1e-14)


@CHUNKS
def test_loss_and_gradient_match_naive_reference(tiny, tiny_dataset, tmp_path, chunk):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="distillm2", skew_alpha=0.2,
                           loss_chunk_tokens=chunk)
    inputs = fixed_batch(trainer, tiny_dataset)
    check_chunks(trainer, inputs, chunk)
    assert "completion_ids" in inputs and "off_completion_ids" in inputs
    params = student_params(trainer)
    loss, got = loss_and_grads(trainer, inputs, params)
    want = 0.0
    for ids, mask, count, which in (("off_completion_ids", "off_completion_mask", "num_off_items", 0),
                                    ("completion_ids", "completion_mask", "num_items_in_batch", 1)):
        z_s, z_t, _, _, _ = naive_logits(trainer, inputs, ids, mask)
        p_s, p_t = torch.softmax(z_s.double(), -1), torch.softmax(z_t.double(), -1)
        if which == 0:
            per_token = (p_t * (p_t.log() - (0.2 * p_t + 0.8 * p_s).log())).sum(-1)
        else:
            per_token = (p_s * (p_s.log() - (0.8 * p_t + 0.2 * p_s).log())).sum(-1)
        want = want + per_token.sum() / inputs[count].double()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    want.float().backward()
    for g, w in zip(got, grads(params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got)


def test_trains_and_logs_both_terms(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, objective="distillm2", max_steps=3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["distillm2_skl/off"] > 0 and h["distillm2_srkl/on"] > 0 for h in logs)


def test_recipe_runs_the_objective_on_the_teachers_answers():
    _, args, _ = parse_train_args(["--config", recipe_path("quickstart_distillm2.yaml"), "--output_dir",
                                   "/tmp/amm-distillm2-recipe"])
    assert (args.objective, args.off_policy_source, args.skew_alpha) == ("distillm2", "teacher", 0.1)
    assert isinstance(args.objective_unit, DistiLLM2) and args.max_steps == 16
