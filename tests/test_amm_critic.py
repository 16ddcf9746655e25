"""AMM's critic options: informed prior, unbounded L2-regularized critic, likelihood anchor, separate clipping."""

import pytest
import torch

from amm_trl import objectives as O
from tests.test_trainer import CHUNKS, check_chunks, fixed_batch, make_trainer


def logits(seed, n=5, v=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 2


def test_informed_critic_starts_as_soft_sign_of_the_best_response():
    z_s, z_t = logits(0), logits(1)
    prior = O.informed_prior(z_s, z_t, 0.5)
    log_ratio = torch.log_softmax(z_t, -1) - torch.log_softmax(z_s, -1)
    torch.testing.assert_close(prior, 0.5 * log_ratio)
    q = O.critic_values(torch.zeros_like(z_s), 2.0, prior)
    torch.testing.assert_close(q, 2.0 * torch.tanh(0.5 * log_ratio))
    p_gap = torch.softmax(z_t, -1) - torch.softmax(z_s, -1)
    assert torch.equal(torch.sign(q), torch.sign(p_gap))  # same sign as the sup-critic c * sign(p_T - p_S)
    # the gap it measures is a positive share of the supremum 2c TV
    gap, sup = O.amm_moment_gap(z_s, z_t, q), 2 * 2.0 * O.total_variation(z_s, z_t)  # 2c TV, c = 2
    assert torch.all(gap > 0) and torch.all(gap <= sup + 1e-12)


def test_unbounded_informed_critic_gives_the_student_alpha_times_the_reverse_kl_gradient():
    z_s, z_t = logits(2).requires_grad_(), logits(3)
    q = O.critic_values(torch.zeros_like(z_s), None, O.informed_prior(z_s, z_t, 0.3))
    (g_amm,) = torch.autograd.grad(O.amm_adversarial_gap(z_s, z_t, q).sum(), z_s)
    (g_rkl,) = torch.autograd.grad(O.reverse_kl(z_s, z_t).sum(), z_s)
    torch.testing.assert_close(g_amm, 0.3 * g_rkl)


def test_l2_critic_best_response_and_value():
    z_s, z_t = logits(4), logits(5)
    lam = 0.7
    best = (torch.softmax(z_t, -1) - torch.softmax(z_s, -1)) / lam
    q = best.clone().requires_grad_()
    value = O.amm_adversarial_gap(z_s, z_t, q, l2=lam)
    torch.testing.assert_close(value, O.amm_moment_gap(z_s, z_t, best))  # the penalty changes no value
    (g,) = torch.autograd.grad(value.sum(), q)  # the head minimizes -(gap - penalty): zero gradient at its optimum
    torch.testing.assert_close(g, torch.zeros_like(g))
    (g_away,) = torch.autograd.grad(O.amm_adversarial_gap(z_s, z_t, 2 * best.requires_grad_(), l2=lam).sum(), best)
    assert g_away.abs().max() > 1e-3
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        O.amm_adversarial_gap(z_s, z_t, q, l2=-1.0)


@pytest.mark.parametrize("weight", ["uniform", "student", "mixture"])
def test_a_weighted_penalty_sets_the_best_response_and_the_divergence_it_plays(weight):
    """Against w(a) f(a)^2 the head's best response is (p_T - p_S) / (lambda w), and its regularized gap there is
    sum (p_T - p_S)^2 / (2 lambda w): the squared L2 distance, Pearson's chi^2(p_T || p_S) or the triangular
    discrimination. The student's gradient depends on f alone, never on the weight."""
    z_s, z_t, lam = logits(6), logits(7), 0.7
    p_s, p_t = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    w = {"uniform": torch.ones_like(p_s), "student": p_s, "mixture": (p_t + p_s) / 2}[weight]
    best = ((p_t - p_s) / (lam * w)).requires_grad_()
    value = O.amm_adversarial_gap(z_s, z_t, best, l2=lam, l2_weight=weight)
    (g,) = torch.autograd.grad(value.sum(), best)
    torch.testing.assert_close(g, torch.zeros_like(g))  # the head's optimum
    (g_away,) = torch.autograd.grad(O.amm_adversarial_gap(z_s, z_t, 1.5 * best, l2=lam, l2_weight=weight).sum(), best)
    assert g_away.abs().max() > 1e-3
    played = ((p_t - p_s) * best).sum(-1) - 0.5 * lam * (w * best * best).sum(-1)  # h - r at the optimum
    named = {"uniform": ((p_t - p_s) ** 2).sum(-1) / (2 * lam),
             "student": ((p_t / p_s) ** 2 * p_s).sum(-1).sub(1) / (2 * lam),  # chi^2 = sum p_T^2 / p_S - 1
             "mixture": ((p_t - p_s) ** 2 / (p_t + p_s)).sum(-1) / lam}[weight]
    torch.testing.assert_close(played.detach(), named)
    z = z_s.clone().requires_grad_()
    (g_student,) = torch.autograd.grad(O.amm_adversarial_gap(z, z_t, best.detach(), l2=lam, l2_weight=weight).sum(), z)
    (g_plain,) = torch.autograd.grad(O.amm_moment_gap(z, z_t, best.detach()).sum(), z)
    torch.testing.assert_close(g_student, g_plain)
    if weight == "student":  # at its best response the student descends forward KL / lambda, state by state
        z = z_s.clone().requires_grad_()
        (g_fkl,) = torch.autograd.grad(O.forward_kl(z, z_t).sum(), z)
        torch.testing.assert_close(g_student, g_fkl / lam)
    if weight == "mixture":
        assert best.abs().max() <= 2 / lam
    with pytest.raises(ValueError,
                       match=r"l2_weight must be one of \('uniform', 'student', 'mixture'\), got 'pearson'"):
        O.amm_adversarial_gap(z_s, z_t, best, l2=lam, l2_weight="pearson")


@CHUNKS
def test_the_penalty_weight_reaches_the_heads_only_and_is_the_same_in_loss_chunks(tiny, tiny_dataset, tmp_path, chunk):
    """`q_head_l2_weight: student` in the trainer: the student's gradient equals the uniform penalty's (same critic
    values), the heads' differs, and chunks of 3 give the one-chunk gradients."""
    made = {}
    for name, weight, size in (("uniform", "uniform", None), ("student", "student", None),
                               ("chunked", "student", chunk)):
        made[name] = make_trainer(tiny, tiny_dataset, tmp_path / name, amm_beta=0.5, q_head_l2_weight=weight,
                                  loss_chunk_tokens=size)
    torch.manual_seed(0)
    for p in made["uniform"].q_heads.parameters():  # a non-trivial critic
        p.data.normal_(0, 0.5)
    for trainer in (made["student"], made["chunked"]):
        trainer.model.load_state_dict(made["uniform"].model.state_dict())
    inputs = fixed_batch(made["uniform"], tiny_dataset)
    check_chunks(made["chunked"], inputs, chunk)
    got = {}
    for name, trainer in made.items():
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        got[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    heads = [n for n in got["uniform"] if "amm_q_heads" in n]
    assert heads and got["uniform"].keys() == got["student"].keys() == got["chunked"].keys()
    for n, g in got["uniform"].items():
        if n not in heads:
            torch.testing.assert_close(got["student"][n], g, rtol=1e-5, atol=1e-8)
    assert any((got["student"][n] - got["uniform"][n]).abs().max() > 1e-4 for n in heads)
    for n, g in got["student"].items():
        torch.testing.assert_close(got["chunked"][n], g, rtol=1e-4, atol=1e-7)


def test_critic_values_validates_shapes_and_bound():
    with pytest.raises(ValueError, match="bound must be > 0 or None"):
        O.critic_values(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"prior \(2, 4\) must have the shape of scores \(2, 3\)"):
        O.critic_values(torch.zeros(2, 3), 1.0, torch.zeros(2, 4))


@pytest.mark.parametrize("fields,message", [
    ({"q_bound": None, "q_head_l2": 0.0},
     r"AMMConfig.q_bound=None is invalid: an unbounded critic needs q_head_l2 > 0"),
    ({"q_prior_alpha": -1.0}, r"AMMConfig.q_prior_alpha=-1.0 is invalid: it must be >= 0"),
    ({"q_head_max_grad_norm": 0.0}, r"AMMConfig.q_head_max_grad_norm=0.0 is invalid: use a positive norm or null"),
    ({"amm_anchor": "kl"}, r"AMMConfig.amm_anchor='kl' is invalid: choose one of \['fkl', 'ce'\]"),
    ({"q_head_l2_weight": "pearson"},
     r"AMMConfig.q_head_l2_weight='pearson' is invalid: choose one of \['uniform', 'student', 'mixture'\]"),
    ({"objective": "pbkd", "q_bound": 1.0}, r"AMMConfig.q_prior_alpha=1.0 is invalid: with a bounded critic"),
])
def test_invalid_critic_fields_are_named(tmp_path, fields, message):
    from tests.test_trainer import make_config

    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **fields)


def test_defaults_are_the_informed_unbounded_critic_with_an_anchor_on_teacher_data(tmp_path):
    from tests.test_trainer import make_config

    args = make_config(tmp_path, off_policy_source="auto")
    assert (args.q_prior_alpha, args.q_bound, args.q_head_l2, args.amm_anchor_weight) == (1.0, None, 1.0, 0.5)
    assert args.off_policy_source == "teacher"  # `auto` for amm
    assert make_config(tmp_path, objective="fkl", off_policy_source="auto").off_policy_source == "dataset"


@CHUNKS
def test_anchor_adds_its_weight_times_the_forward_kl_of_the_off_policy_tokens(tiny, tiny_dataset, tmp_path, chunk):
    plain = make_trainer(tiny, tiny_dataset, tmp_path / "a", amm_beta=0.25, amm_anchor_weight=0.0,
                         loss_chunk_tokens=chunk)
    anchored = make_trainer(tiny, tiny_dataset, tmp_path / "b", amm_beta=0.25, amm_anchor_weight=0.5,
                            loss_chunk_tokens=chunk)
    anchored.model.load_state_dict(plain.model.state_dict())
    inputs = fixed_batch(plain, tiny_dataset)
    check_chunks(plain, inputs, chunk)
    anchored.model.train()
    losses = [t.compute_loss(t.model, inputs).item() for t in (plain, anchored)]
    # naive forward KL of the off-policy tokens, averaged as the loss reduces (num_off_items tokens)
    ids = torch.cat([inputs["prompt_ids"], inputs["off_completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["off_completion_mask"]], 1)
    width, valid = inputs["off_completion_ids"].size(1), inputs["off_completion_mask"].bool()
    with torch.no_grad():
        z_s = plain.model(input_ids=ids, attention_mask=att).logits[:, -width - 1:-1][valid]
        z_t = plain.teacher_model(input_ids=ids, attention_mask=att).logits[:, -width - 1:-1][valid]
    fkl = O.forward_kl(z_s, z_t).sum() / inputs["num_off_items"]
    assert losses[1] - losses[0] == pytest.approx(0.5 * fkl.item(), rel=1e-4)
    assert anchored._metrics["train"]["anchor/off"][-1] == pytest.approx(O.forward_kl(z_s, z_t).mean().item(),
                                                                          rel=1e-4)
    assert "anchor/off" not in plain._metrics["train"]


def test_heads_are_clipped_apart_from_the_student(tiny, tiny_dataset, tmp_path):
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, q_head_max_grad_norm=1e-3, max_grad_norm=1e6)
    for p in trainer.q_heads.parameters():
        p.data.normal_(0, 0.5)
    inputs = fixed_batch(trainer, tiny_dataset)
    trainer.compute_loss(trainer.model, inputs).backward()
    heads = list(trainer.q_heads.parameters())
    student = [p for n, p in trainer.model.named_parameters() if "amm_q_heads" not in n and p.grad is not None]
    student_before = torch.nn.utils.get_total_norm([p.grad for p in student])
    assert torch.nn.utils.get_total_norm([p.grad for p in heads]) > 1e-2
    returned = trainer._clip_grad_norm(trainer.model)
    assert float(returned) == pytest.approx(float(student_before), rel=1e-5)  # the student's norm, unclipped
    assert float(torch.nn.utils.get_total_norm([p.grad for p in heads])) == pytest.approx(1e-3, rel=1e-3)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in student])) == pytest.approx(float(student_before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_token_the_teacher_rules_out_gives_a_finite_prior_of_the_right_sign(dtype):
    """Teacher logit -inf (probability 0): the prior is alpha * (log tiny - log p_S), finite and negative, not -inf
    or the dtype's most negative number; elsewhere it is unchanged, and the unbounded critic's losses and the
    student's gradient stay finite."""
    z_s, z_t = logits(6).to(dtype).requires_grad_(), logits(7).to(dtype)
    z_t[0, 2] = z_t[3, 5] = float("-inf")
    prior = O.informed_prior(z_s, z_t, 1.0)
    log_ps = torch.log_softmax(z_s.detach(), -1)
    tiny = torch.finfo(dtype).tiny
    assert torch.isfinite(prior).all()
    torch.testing.assert_close(prior[0, 2], torch.log(torch.tensor(tiny, dtype=dtype)) - log_ps[0, 2])
    assert prior[0, 2] < -80 and prior[3, 5] < -80
    finite = torch.isfinite(z_t)
    torch.testing.assert_close(prior[finite], (torch.log_softmax(z_t, -1) - log_ps)[finite])
    q = O.critic_values(torch.zeros_like(z_s), None, prior)
    loss = O.amm_adversarial_gap(z_s, z_t, q, l2=1.0).sum()
    (grad,) = torch.autograd.grad(loss, z_s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_the_critic_can_have_its_own_learning_rate(tiny, tiny_dataset, tmp_path):
    """`q_head_learning_rate` replaces learning_rate * q_head_lr_multiplier for the heads' group (the student keeps
    its own), and follows the student's schedule; a non-positive one is refused by name."""
    trainer = make_trainer(tiny, tiny_dataset, tmp_path, learning_rate=1e-5, q_head_learning_rate=3e-3,
                           lr_scheduler_type="linear", max_steps=4)
    trainer.train()
    head_ids = {id(p) for p in trainer.q_heads.parameters()}
    (heads,) = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} == head_ids]
    student = [g for g in trainer.optimizer.param_groups if g is not heads]
    assert heads["initial_lr"] == 3e-3 and all(g["initial_lr"] == 1e-5 for g in student)
    assert heads["lr"] == pytest.approx(0.0) and student[0]["lr"] == pytest.approx(0.0)  # linear decay to 0 at the end
    with pytest.raises(ValueError, match=r"AMMConfig.q_head_learning_rate=0.0 is invalid: use a positive learning "
                                         r"rate, or null for learning_rate \* q_head_lr_multiplier\."):
        make_trainer(tiny, tiny_dataset, tmp_path, q_head_learning_rate=0.0)


@CHUNKS
def test_amm_on_rollouts_alone_with_a_zero_critic_gives_the_student_reverse_kls_gradient(tiny, tiny_dataset, tmp_path,
                                                                                        chunk):
    """`amm_beta: 0` (`amm_rollouts` in bench/tier_a/tier_a_algo.yaml): every sequence a rollout, no anchor. At the
    critic's zero init (f = the prior log p_T / p_S) the student's gradient is reverse KL's on the same batch, so what
    that variant adds over `rkl` is the learned residual alone; the heads get a gradient of their own."""
    amm = make_trainer(tiny, tiny_dataset, tmp_path / "amm", loss_chunk_tokens=chunk, objective="amm", amm_beta=0.0)
    rkl = make_trainer(tiny, tiny_dataset, tmp_path / "rkl", loss_chunk_tokens=chunk, objective="rkl")
    inputs = fixed_batch(amm, tiny_dataset)
    assert "off_completion_ids" not in inputs
    check_chunks(amm, inputs, chunk)
    grads = {}
    for name, trainer in (("amm", amm), ("rkl", rkl)):
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                       if p.grad is not None and "amm_q_heads" not in n}
    assert grads["amm"].keys() == grads["rkl"].keys() and any(g.abs().sum() > 0 for g in grads["rkl"].values())
    for n, g in grads["rkl"].items():
        torch.testing.assert_close(grads["amm"][n], g, rtol=1e-4, atol=1e-7)
    assert any(p.grad.abs().sum() > 0 for p in amm.q_heads.parameters())


@CHUNKS
@pytest.mark.parametrize("objective", ["amm", "pbkd"])  # PbKD's reward pass reads the head too
def test_a_head_reading_both_models_is_the_sum_of_a_student_head_and_a_teacher_head(tiny, tiny_dataset, tmp_path,
                                                                                    chunk, objective):
    """`q_head_features: both`: the linear head reads [h_S, h_T], so g = W_S h_S + W_T h_T + b. With W_T = 0 it is the
    student-features head W_S, with W_S = 0 the teacher-features head W_T: same loss, same student gradient, and the
    head's gradient on each half is that head's own (so both halves are read, in this order), in chunks of 3 too."""
    made = {features: make_trainer(tiny, tiny_dataset, tmp_path / features, q_head_features=features,
                                   loss_chunk_tokens=chunk, objective=objective)
            for features in ("both", "student", "teacher")}
    width_s, width_t = made["student"].q_heads.on.weight.shape[1], made["teacher"].q_heads.on.weight.shape[1]
    assert width_s != width_t and made["both"].q_heads.on.weight.shape[1] == width_s + width_t
    inputs = fixed_batch(made["both"], tiny_dataset)
    check_chunks(made["both"], inputs, chunk)

    def loss_and_grads(trainer):
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    for single, (lo, hi) in (("student", (0, width_s)), ("teacher", (width_s, width_s + width_t))):
        for kind in ("on", "off"):
            head, both = made[single].q_heads.head(kind), made["both"].q_heads.head(kind)
            head.weight.data.normal_(0, 0.5)
            head.bias.data.normal_(0, 0.5)
            both.weight.data.zero_()
            both.weight.data[:, lo:hi] = head.weight.data
            both.bias.data.copy_(head.bias.data)
        loss_both, grads_both = loss_and_grads(made["both"])
        loss_single, grads_single = loss_and_grads(made[single])
        torch.testing.assert_close(loss_both, loss_single, rtol=1e-5, atol=1e-7)
        assert grads_both.keys() == grads_single.keys()
        for n, g in grads_single.items():
            if "amm_q_heads" in n and n.endswith(".weight"):
                torch.testing.assert_close(grads_both[n][:, lo:hi], g, rtol=1e-4, atol=1e-7)
                other = torch.cat([grads_both[n][:, :lo], grads_both[n][:, hi:]], dim=1)
                assert other.abs().sum() > 0  # the other model's features reach the head too
            else:
                torch.testing.assert_close(grads_both[n], g, rtol=1e-4, atol=1e-7)
    assert not torch.isclose(loss_both, loss_and_grads(made["student"])[0])  # the heads differ: so do the losses
