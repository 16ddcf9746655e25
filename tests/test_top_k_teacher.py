"""A teacher known by its top-k log-probs plus a tail bucket (`teacher_placement: server | cache`).

Pure functions in float64 first: with k = the whole vocabulary the pair is the dense one (every divergence and its
gradient), with small k every divergence is the exact divergence of the bucketed distributions written by hand, the
critic's tail value is the student-weighted mean, and the coverage metrics. Then the trainer: with k = V every
objective's loss and both players' gradients equal the local teacher's path (one chunk and chunks of 3)."""

import math

import pytest
import torch

from amm_trl.objectives.amm import amm_moment_gap, informed_prior
from amm_trl.objectives.divergences import (forward_kl, generalized_jsd, reverse_kl, skew_forward_kl,
                                            skew_reverse_kl)
from amm_trl.objectives.functional import total_variation
from amm_trl.objectives.teachers import DenseTeacher, TopKTeacher, tail_log_prob
from amm_trl.projection import TOP_K_INPUTS
from amm_trl.teacher import pad_top_k
from tests.test_objectives_extra import student_params
from tests.test_trainer import CHUNKS, check_chunks, fixed_batch, grads, make_trainer

DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl, "tvd": total_variation,
               "jsd": lambda s, t: generalized_jsd(s, t, 0.3), "skl": lambda s, t: skew_forward_kl(s, t, 0.1),
               "srkl": lambda s, t: skew_reverse_kl(s, t, 0.1)}


def _logits(n=6, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2)


def top_k_of(teacher_logits, k, target_ids=None):
    """A top-k teacher as a server would give it: the k most likely tokens, sorted, and the taken token's log-prob."""
    log_pt = torch.log_softmax(teacher_logits, -1)
    values, ids = log_pt.topk(k, -1)
    target_ids = torch.zeros(len(ids), dtype=torch.long) if target_ids is None else target_ids
    return TopKTeacher(ids, values, log_pt.gather(-1, target_ids[:, None]).squeeze(-1))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_with_k_equal_to_the_vocabulary_every_divergence_and_gradient_is_the_dense_one(name):
    z_s, z_t = _logits()
    fn = DIVERGENCES[name]
    dense_s = z_s.clone().requires_grad_(True)
    dense = fn(*DenseTeacher(z_t).pair(dense_s))
    sparse_s = z_s.clone().requires_grad_(True)
    sparse = fn(*top_k_of(z_t, z_t.size(-1)).pair(sparse_s))
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-14)
    dense.sum().backward()
    sparse.sum().backward()
    assert torch.isfinite(sparse_s.grad).all()
    torch.testing.assert_close(sparse_s.grad, dense_s.grad, rtol=1e-10, atol=1e-13)


def _bucketed(z_s, z_t, k):
    """(p_S, p_T) on the buckets (the teacher's top-k tokens, then the rest), written from the probabilities."""
    p_s, p_t = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    ids = p_t.topk(k, -1).indices
    top_s, top_t = p_s.gather(-1, ids), p_t.gather(-1, ids)
    return (torch.cat([top_s, 1 - top_s.sum(-1, keepdim=True)], -1),
            torch.cat([top_t, 1 - top_t.sum(-1, keepdim=True)], -1))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_with_small_k_each_divergence_is_the_exact_divergence_of_the_bucketed_distributions(k):
    z_s, z_t = _logits(seed=k)
    p_s, p_t = _bucketed(z_s, z_t, k)
    refs = {"fkl": (p_t * (p_t / p_s).log()).sum(-1), "rkl": (p_s * (p_s / p_t).log()).sum(-1),
            "tvd": 0.5 * (p_s - p_t).abs().sum(-1),
            "skl": (p_t * (p_t / (0.1 * p_t + 0.9 * p_s)).log()).sum(-1),
            "srkl": (p_s * (p_s / (0.9 * p_t + 0.1 * p_s)).log()).sum(-1)}
    m = 0.3 * p_t + 0.7 * p_s
    refs["jsd"] = 0.3 * (p_t * (p_t / m).log()).sum(-1) + 0.7 * (p_s * (p_s / m).log()).sum(-1)
    pair = top_k_of(z_t, k).pair(z_s)
    assert pair[0].shape == (z_s.size(0), k + 1)
    for name, want in refs.items():
        torch.testing.assert_close(DIVERGENCES[name](*pair), want, rtol=1e-10, atol=1e-13, msg=name)
        # a coarse-graining never increases a divergence (data processing), and the full one is larger here
        assert (DIVERGENCES[name](*pair) <= DIVERGENCES[name](z_s, z_t) + 1e-12).all(), name


def _bucketed_with_taken(z_s, z_t, k, taken):
    """(p_S, p_T) on the buckets: the teacher's top-k tokens, the taken token when it is outside them (else an empty
    bucket, probability 0 on both sides), then the rest; written from the probabilities, row by row."""
    p_s, p_t = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    rows_s, rows_t = [], []
    for i in range(len(p_s)):
        ids = p_t[i].topk(k).indices.tolist()
        extra = [] if taken[i].item() in ids else [taken[i].item()]
        rest = [a for a in range(p_s.size(-1)) if a not in ids + extra]
        rows_s.append(torch.stack([*p_s[i, ids], p_s[i, extra].sum(), p_s[i, rest].sum()]))
        rows_t.append(torch.stack([*p_t[i, ids], p_t[i, extra].sum(), p_t[i, rest].sum()]))
    return torch.stack(rows_s), torch.stack(rows_t)


def _divergence_of_probabilities(name, p_s, p_t):
    """The divergences of DIVERGENCES on probability vectors (0 log 0 = 0: an empty bucket adds nothing)."""
    def kl(p, q):
        return torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p)).sum(-1)

    return {"fkl": lambda: kl(p_t, p_s), "rkl": lambda: kl(p_s, p_t), "tvd": lambda: 0.5 * (p_s - p_t).abs().sum(-1),
            "skl": lambda: kl(p_t, 0.1 * p_t + 0.9 * p_s), "srkl": lambda: kl(p_s, 0.9 * p_t + 0.1 * p_s),
            "jsd": lambda: 0.3 * kl(p_t, 0.3 * p_t + 0.7 * p_s) + 0.7 * kl(p_s, 0.3 * p_t + 0.7 * p_s)}[name]()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_the_taken_tokens_own_bucket_gives_the_exact_divergence_on_the_finer_partition(name, k):
    """`taken_ids`: a taken token outside the top-k gets its own bucket (k + 2 buckets), one inside leaves the k + 1
    pair unchanged; each divergence and its student gradient equal the hand-written ones on that partition, lie
    between the k + 1 coarse-graining and the full divergence, and k = V is still the dense pair."""
    z_s, z_t = _logits(n=8, vocab=11, seed=10 + k)
    top = torch.softmax(z_t, -1).topk(k, -1).indices
    taken = torch.tensor([5, 0, 7, 2, 9, 1, 4, 10])
    taken[0] = top[0, 0]  # one row whose taken token is the teacher's most likely: no extra bucket there
    log_pt = torch.log_softmax(z_t, -1)
    values, ids = log_pt.topk(k, -1)
    teacher = TopKTeacher(ids, values, log_pt.gather(-1, taken[:, None]).squeeze(-1), taken_ids=taken)
    fn = DIVERGENCES[name]
    z = z_s.clone().requires_grad_(True)
    got = fn(*teacher.pair(z))
    assert teacher.pair(z_s)[0].shape == (8, k + 2)
    z_ref = z_s.clone().requires_grad_(True)
    want = _divergence_of_probabilities(name, *_bucketed_with_taken(z_ref, z_t, k, taken))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-9, atol=1e-12)
    coarse = fn(*top_k_of(z_t, k).pair(z_s))
    assert got[0].item() == pytest.approx(coarse[0].item(), rel=1e-12, abs=1e-14)  # taken inside: unchanged
    assert (got >= coarse - 1e-12).all() and (got <= fn(z_s, z_t) + 1e-12).all()  # data processing, both ways
    assert (got[1:] > coarse[1:] + 1e-9).any()  # and finer where it has an extra bucket
    full = TopKTeacher(*log_pt.topk(11, -1)[::-1], log_pt.gather(-1, taken[:, None]).squeeze(-1), taken_ids=taken)
    torch.testing.assert_close(fn(*full.pair(z_s)), fn(*DenseTeacher(z_t).pair(z_s)), rtol=1e-12, atol=1e-14)
    # the coverage metrics stay the top-k's
    for key, value in teacher.metrics(z_s).items():
        torch.testing.assert_close(value, top_k_of(z_t, k).metrics(z_s)[key], msg=key)


def test_tail_log_prob_and_empty_slots():
    log_probs = torch.tensor([[math.log(0.5), math.log(0.25), -math.inf], [math.log(0.6), math.log(0.4), -math.inf]],
                             dtype=torch.float64)
    tail = tail_log_prob(log_probs)
    assert tail[0].item() == pytest.approx(math.log(0.25), rel=1e-12) and tail[1].item() == -math.inf
    # an empty slot (a server's padding, id 0) is no bucket: token 0 stays in the student's tail
    z_s = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    teacher = TopKTeacher(torch.tensor([[3, 2, 0]]), torch.log(torch.tensor([[0.5, 0.25, 0.0]], dtype=torch.float64)),
                          torch.tensor([math.log(0.5)], dtype=torch.float64))
    s, t = teacher.pair(z_s)
    torch.testing.assert_close(s.exp(), torch.tensor([[0.4, 0.3, 0.0, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(t.exp(), torch.tensor([[0.5, 0.25, 0.0, 0.25]], dtype=torch.float64))


def test_a_top_k_that_rounds_to_all_the_mass_keeps_reverse_kl_finite():
    """Served or fp16-cached log-probs may sum to >= 1 (a near-certain token served as log-prob 0.0): while the student
    holds tail mass, the teacher's tail keeps the dtype's `tiny`, so reverse KL and its gradient stay finite."""
    z_s = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float32)).requires_grad_(True)
    teacher = TopKTeacher(torch.tensor([[0, 1]]), torch.tensor([[0.0, -20.0]]), torch.tensor([0.0]))
    value = reverse_kl(*teacher.pair(z_s))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(z_s.grad).all()
    floor = math.log(torch.finfo(torch.float32).tiny)  # the tail's 0.3 of the student against tiny
    want = 0.5 * math.log(0.5) + 0.2 * (math.log(0.2) + 20.0) + 0.3 * (math.log(0.3) - floor)
    assert value.item() == pytest.approx(want, rel=1e-4)


def test_the_critic_on_buckets_is_the_student_weighted_tail_mean_and_k_equal_v_is_dense():
    z_s, z_t = _logits(n=4, vocab=9, seed=3)
    values = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    k = 3
    teacher = top_k_of(z_t, k)
    coarse = teacher.coarsen(values, z_s)
    p_s = torch.softmax(z_s, -1)
    tail = torch.ones_like(p_s, dtype=torch.bool).scatter(-1, teacher.ids, False)
    want_tail = (p_s * values * tail).sum(-1) / (p_s * tail).sum(-1)
    torch.testing.assert_close(coarse[:, :k], values.gather(-1, teacher.ids), rtol=0, atol=0)
    torch.testing.assert_close(coarse[:, k], want_tail, rtol=1e-12, atol=1e-14)
    # k = V: the moment gap <p_T - p_S, f> and the informed prior are the dense ones
    full = top_k_of(z_t, 9)
    gap = amm_moment_gap(*full.pair(z_s), full.coarsen(values, z_s))
    torch.testing.assert_close(gap, amm_moment_gap(z_s, z_t, values), rtol=1e-12, atol=1e-13)
    prior = informed_prior(*full.pair(z_s), 1.0)[:, :9]
    torch.testing.assert_close(prior, informed_prior(z_s, z_t, 1.0).gather(-1, full.ids), rtol=1e-12, atol=1e-12)


def test_coverage_metrics():
    z_s = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64))
    teacher = TopKTeacher(torch.tensor([[0, 3]]), torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64)),
                          torch.tensor([0.0], dtype=torch.float64))
    got = {name: value.item() for name, value in teacher.metrics(z_s).items()}
    # teacher mass 0.8; the student holds 0.1 + 0.4 on those tokens; its top-2 is {3, 2}: one of two shared
    assert got == pytest.approx({"teacher_mass": 0.8, "student_mass": 0.5, "overlap_ratio": 0.5}, rel=1e-6)


def test_pad_top_k_masks_ids_outside_the_shared_vocabulary_and_pads():
    out = pad_top_k(ids=[[[4, 1], [2, 9]]], log_probs=[[[-0.1, -3.0], [-0.2, -2.0]]], token_log_prob=[[-0.1, -0.2]],
                    width=3, k=2, vocab=8, device="cpu")
    assert out["teacher_topk_ids"].shape == (1, 3, 2) and out["teacher_token_logprob"].tolist() == [
        pytest.approx([-0.1, -0.2, 0.0])]
    lp = out["teacher_topk_logprobs"]
    assert lp[0, 1, 1].item() == -math.inf  # id 9 is beyond the 8 shared rows: its mass goes to the tail
    assert torch.isneginf(lp[0, 2]).all()  # padding position


# --------------------------------------------------------------------------------------------- the trainer, k = V
OBJECTIVES = {"fkl": {}, "rkl": {}, "tvd": {}, "gkd": {"lmbda": 1.0}, "gkd_off": {"objective": "gkd", "lmbda": 0.0},
              "imitkd": {"lmbda": 0.0}, "distillm": {}, "distillm2": {}, "amm": {}, "pbkd": {},
              "minillm": {"minillm_teacher_mix": 0.0}}


def dense_top_k(trainer, inputs, k=None):
    """The local teacher's top-k (default: the whole vocabulary) at every completion token of each kind, as a server
    would give it: top-k batch keys."""
    teacher, extra = trainer.teacher_model, {}
    for prefix, ids_key, mask_key in (("", "completion_ids", "completion_mask"),
                                      ("off_", "off_completion_ids", "off_completion_mask")):
        if ids_key not in inputs:
            continue
        ids = torch.cat([inputs["prompt_ids"], inputs[ids_key]], 1)
        att = torch.cat([inputs["prompt_mask"], inputs[mask_key]], 1)
        width = inputs[ids_key].size(1)
        with torch.no_grad():
            logits = teacher(input_ids=ids, attention_mask=att).logits[:, -width - 1:-1].float()
        log_pt = torch.log_softmax(logits / trainer.temperature, -1)
        values, top = log_pt.topk(k or log_pt.size(-1), -1)
        token = log_pt.gather(-1, inputs[ids_key][..., None]).squeeze(-1) * inputs[mask_key]
        extra.update({prefix + TOP_K_INPUTS[0]: top, prefix + TOP_K_INPUTS[1]: values,
                      prefix + TOP_K_INPUTS[2]: token})
    return extra


def _batch_and_probe(trainer, tiny_dataset, chunk):
    """A fixed batch (checked to span `chunk`-token loss chunks), with a non-trivial critic, and `probe(batch)` ->
    (loss, gradients of the student and the critic, the step's logged metrics)."""
    torch.manual_seed(0)
    heads = list(trainer.q_heads.parameters()) if trainer.q_heads is not None else []
    for p in heads:  # a non-trivial critic
        p.data.normal_(0, 0.3)
    inputs = fixed_batch(trainer, tiny_dataset)
    check_chunks(trainer, inputs, chunk)
    params = student_params(trainer) + heads

    def probe(batch):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        got = grads(params)
        trainer.model.zero_grad()
        return loss.item(), got, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    return inputs, probe


@CHUNKS
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_with_k_equal_to_the_vocabulary_every_objective_matches_the_local_teacher(tiny, tiny_dataset, tmp_path,
                                                                                 name, chunk):
    overrides = {"objective": name, **OBJECTIVES[name]}
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, loss_chunk_tokens=chunk, **overrides)
    inputs, loss_and_grads = _batch_and_probe(trainer, tiny_dataset, chunk)

    dense_loss, dense_grads, dense_metrics = loss_and_grads(inputs)
    sparse_inputs = {**inputs, **dense_top_k(trainer, inputs)}
    trainer.teacher_model = None  # the loss now reads the top-k keys
    sparse_loss, sparse_grads, sparse_metrics = loss_and_grads(sparse_inputs)
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-5, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in sparse_grads)
    for got, want in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)
    kinds = [kind for kind in ("on", "off") if f"tv/{kind}" in dense_metrics]
    for kind in kinds:
        assert sparse_metrics[f"teacher_mass/{kind}"] == pytest.approx(1.0, abs=1e-5)
        assert sparse_metrics[f"overlap_ratio/{kind}"] == pytest.approx(1.0)
        for metric in ("tv", "logp_teacher"):
            assert sparse_metrics[f"{metric}/{kind}"] == pytest.approx(dense_metrics[f"{metric}/{kind}"], rel=1e-4,
                                                                       abs=1e-6)


@CHUNKS
@pytest.mark.parametrize("taken", [False, True], ids=["k+1", "taken_bucket"])
@pytest.mark.parametrize("name", ["fkl", "rkl", "amm"])
def test_a_local_teachers_top_k_view_is_what_a_server_at_that_k_gives(tiny, tiny_dataset, tmp_path, name, taken,
                                                                       chunk):
    """`teacher_local_top_k: k` on the local teacher: the same loss, gradients and coverage metrics as the top-k keys
    a server returns at k (here built from the same teacher, so no rounding), and not the dense loss; with
    `teacher_top_k_taken_bucket` the same on k + 2 buckets on both paths, and not the k + 1 loss."""
    k = 5
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, loss_chunk_tokens=chunk, objective=name,
                           teacher_local_top_k=k, teacher_top_k_taken_bucket=taken)
    inputs, loss_and_grads = _batch_and_probe(trainer, tiny_dataset, chunk)

    local_loss, local_grads, local_metrics = loss_and_grads(inputs)
    trainer.args.teacher_top_k_taken_bucket = not taken
    other_loss, _, _ = loss_and_grads(inputs)
    trainer.args.teacher_top_k_taken_bucket = taken
    trainer.args.teacher_local_top_k = 0
    dense_loss, _, _ = loss_and_grads(inputs)
    served = {**inputs, **dense_top_k(trainer, inputs, k)}
    trainer.teacher_model = None  # the loss now reads the top-k keys, as from a server
    served_loss, served_grads, served_metrics = loss_and_grads(served)
    assert local_loss == pytest.approx(served_loss, rel=1e-5, abs=1e-7)
    assert abs(local_loss - dense_loss) > 1e-4 * abs(dense_loss)  # k = 5 of 64 tokens is not the full teacher
    assert abs(local_loss - other_loss) > 1e-4 * abs(dense_loss)  # the taken bucket reaches the loss
    for got, want in zip(local_grads, served_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)
    masses = [key for key in local_metrics if key.startswith("teacher_mass/")]
    assert masses and all(local_metrics[key] < 0.999 for key in masses)
    for key in masses + [key.replace("teacher_mass", "tv") for key in masses]:
        assert local_metrics[key] == pytest.approx(served_metrics[key], rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"teacher_local_top_k": -1}, r"teacher_local_top_k=-1 is invalid: use an integer >= 0"),
    ({"teacher_local_top_k": 8, "teacher_placement": "server", "teacher_server_base_url": "http://t:8000"},
     "already gives a top-k teacher: set its k with teacher_top_k"),
    ({"teacher_local_top_k": 8, "objective": "jsd"}, "runs TRL's loss on the full logits"),
    ({"teacher_top_k_taken_bucket": True}, r"teacher_top_k_taken_bucket=True is invalid: the teacher's full "
                                           r"distribution is here, with no top-k to refine: set teacher_local_top_k")])
def test_a_local_top_k_view_where_it_cannot_apply_is_refused_by_field(overrides, message):
    from amm_trl.config import AMMConfig

    with pytest.raises(ValueError, match=message):
        AMMConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, **{"objective": "fkl", **overrides})
