"""Tests for amm_trl.objectives against independent references (plain-python float64 sums, hand numbers)."""

import math

import pytest
import torch

from amm_trl import objectives as O

V = 7
N = 5


# ----------------------------------------------------------------------------------------------------------
# independent references: plain python floats, explicit loops
# ----------------------------------------------------------------------------------------------------------
def _probs(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _kl_ref(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _rows(x):
    return [[float(v) for v in r] for r in x.tolist()]


def _ref(fn, s, t, *args):
    return torch.tensor([fn(_probs(rs), _probs(rt), *args) for rs, rt in zip(_rows(s), _rows(t))], dtype=torch.float64)


def ref_fkl(ps, pt):
    return _kl_ref(pt, ps)


def ref_rkl(ps, pt):
    return _kl_ref(ps, pt)


def ref_jsd(ps, pt, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * _kl_ref(pt, m) + (1 - beta) * _kl_ref(ps, m)


def ref_tv(ps, pt):
    return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))


def ref_skl(ps, pt, alpha):
    return _kl_ref(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])


def ref_srkl(ps, pt, alpha):
    return _kl_ref(ps, [(1 - alpha) * a + alpha * b for a, b in zip(pt, ps)])


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = 2.0 * torch.randn(N, V, generator=g, dtype=torch.float64)
    t = 2.0 * torch.randn(N, V, generator=g, dtype=torch.float64)
    q = torch.randn(N, V, generator=g, dtype=torch.float64)
    return s, t, q


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# divergences vs references
# ----------------------------------------------------------------------------------------------------------
def test_forward_reverse_kl_vs_reference(logits):
    s, t, _ = logits
    close(O.forward_kl(s, t), _ref(ref_fkl, s, t))
    close(O.reverse_kl(s, t), _ref(ref_rkl, s, t))
    assert O.forward_kl(s, t).shape == (N,)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_vs_reference(logits, beta):
    s, t, _ = logits
    close(O.generalized_jsd(s, t, beta), _ref(ref_jsd, s, t, beta))


def test_generalized_jsd_endpoints_are_trl_convention(logits):
    s, t, _ = logits
    close(O.generalized_jsd(s, t, 0.0), _ref(ref_fkl, s, t))
    close(O.generalized_jsd(s, t, 1.0), _ref(ref_rkl, s, t))


def test_generalized_jsd_limits(logits):
    s, t, _ = logits
    fkl, rkl = _ref(ref_fkl, s, t), _ref(ref_rkl, s, t)
    for b in (1e-3, 1e-5):
        close(O.generalized_jsd(s, t, b) / b, fkl, rtol=50 * b, atol=0)
        close(O.generalized_jsd(s, t, 1 - b) / b, rkl, rtol=50 * b, atol=0)
    # the error actually shrinks with beta (a limit, not a coincidence)
    e3 = (O.generalized_jsd(s, t, 1e-3) / 1e-3 - fkl).abs().max()
    e5 = (O.generalized_jsd(s, t, 1e-5) / 1e-5 - fkl).abs().max()
    assert e5 < e3 / 50


def test_total_variation_vs_reference_symmetric_bounded(logits):
    s, t, _ = logits
    tv = O.total_variation(s, t)
    close(tv, _ref(ref_tv, s, t))
    close(tv, O.total_variation(t, s))
    assert ((tv >= 0) & (tv <= 1)).all()
    # near-disjoint distributions approach 1
    a = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 50.0, 0.0]], dtype=torch.float64)
    assert 0.999 < O.total_variation(a, b).item() <= 1.0


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_skew_kls_vs_reference(logits, alpha):
    s, t, _ = logits
    close(O.skew_forward_kl(s, t, alpha), _ref(ref_skl, s, t, alpha))
    close(O.skew_reverse_kl(s, t, alpha), _ref(ref_srkl, s, t, alpha))


def test_skew_kl_alpha_endpoints(logits):
    s, t, _ = logits
    close(O.skew_forward_kl(s, t, 0.0), _ref(ref_fkl, s, t))
    close(O.skew_reverse_kl(s, t, 0.0), _ref(ref_rkl, s, t))
    close(O.skew_forward_kl(s, t, 1.0), torch.zeros(N, dtype=torch.float64))
    close(O.skew_reverse_kl(s, t, 1.0), torch.zeros(N, dtype=torch.float64))
    # near 0 it is continuous (the log-space mixture matches the special case)
    close(O.skew_forward_kl(s, t, 1e-9), _ref(ref_fkl, s, t), rtol=1e-6, atol=1e-9)


def test_all_divergences_zero_for_equal_distributions(logits):
    s, _, q = logits
    t = s + 3.0  # same softmax, different logits
    z = torch.zeros(N, dtype=torch.float64)
    for val in (
        O.forward_kl(s, t),
        O.reverse_kl(s, t),
        O.generalized_jsd(s, t, 0.0),
        O.generalized_jsd(s, t, 0.3),
        O.generalized_jsd(s, t, 1.0),
        O.total_variation(s, t),
        O.skew_forward_kl(s, t, 0.1),
        O.skew_reverse_kl(s, t, 0.1),
        O.amm_moment_gap(s, t, q),
        O.amm_moment_gap(s, t, 100.0 * q),
        O.amm_adversarial_gap(s, t, q),
    ):
        close(val, z, atol=1e-12, rtol=0)


def test_divergences_nonnegative(logits):
    s, t, _ = logits
    for val in (
        O.forward_kl(s, t),
        O.reverse_kl(s, t),
        O.generalized_jsd(s, t, 0.5),
        O.skew_forward_kl(s, t, 0.1),
        O.skew_reverse_kl(s, t, 0.1),
    ):
        assert (val > 0).all()


def test_masked_vocab_entries_no_nan(logits):
    s, t, _ = logits
    s, t = s.clone(), t.clone()
    s[:, 0] = -float("inf")
    t[:, 0] = -float("inf")
    s.requires_grad_(True)
    t.requires_grad_(True)
    total = (
        O.forward_kl(s, t)
        + O.reverse_kl(s, t)
        + O.generalized_jsd(s, t, 0.5)
        + O.skew_forward_kl(s, t, 0.1)
        + O.skew_reverse_kl(s, t, 0.1)
        + O.total_variation(s, t)
    ).sum()
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    close(O.forward_kl(s, t).detach(), O.forward_kl(s[:, 1:], t[:, 1:]).detach())


def test_dtypes_no_downcast(logits):
    s, t, q = logits
    assert O.forward_kl(s, t).dtype == torch.float64
    assert O.forward_kl(s.float(), t.float()).dtype == torch.float32
    assert O.forward_kl(s.bfloat16(), t.bfloat16()).dtype == torch.float32  # upcast, not computed in bf16
    assert O.amm_moment_gap(s.float(), t.float(), q).dtype == torch.float64
    close(O.forward_kl(s.float(), t.float()).double(), O.forward_kl(s, t), rtol=1e-5, atol=1e-6)


def test_argument_validation(logits):
    s, t, q = logits
    with pytest.raises(ValueError, match="beta"):
        O.generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        O.skew_forward_kl(s, t, -0.1)
    with pytest.raises(ValueError, match="alpha"):
        O.skew_reverse_kl(s, t, 2.0)
    with pytest.raises(ValueError, match="mix"):
        O.teacher_mix_weights(s[:, 0], t[:, 0], mix=1.2)
    with pytest.raises(ValueError, match="bound"):
        O.critic_values(q, 0.0)
    with pytest.raises(ValueError, match="clip_eps"):
        O.ppo_clipped_loss(s[:, 0], s[:, 0], s[:, 0], clip_eps=0.0)
    with pytest.raises(ValueError, match="shape"):
        O.forward_kl(s, t[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        O.amm_moment_gap(s, t, q[:, :-1])


@pytest.mark.parametrize(
    "fn",
    [
        O.forward_kl,
        O.reverse_kl,
        O.total_variation,
        lambda s, t: O.generalized_jsd(s, t, 0.3),
        lambda s, t: O.skew_forward_kl(s, t, 0.1),
        lambda s, t: O.skew_reverse_kl(s, t, 0.1),
    ],
    ids=["fkl", "rkl", "tv", "jsd", "skl", "srkl"],
)
def test_gradcheck_divergences(logits, fn):
    s, t, _ = logits
    s = s[:3].clone().requires_grad_(True)
    t = t[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (s, t))


def test_gradcheck_amm_moment_gap(logits):
    s, t, q = (x[:3].clone().requires_grad_(True) for x in logits)
    assert torch.autograd.gradcheck(O.amm_moment_gap, (s, t, q))


# ----------------------------------------------------------------------------------------------------------
# token log-probs, cross-entropy, Q bound
# ----------------------------------------------------------------------------------------------------------
def test_token_log_probs_and_cross_entropy(logits):
    s, _, _ = logits
    y = torch.tensor([0, 6, 3, 3, 1])
    ref = torch.tensor([math.log(_probs(r)[int(i)]) for r, i in zip(_rows(s), y)], dtype=torch.float64)
    close(O.token_log_probs(s, y), ref)
    close(O.cross_entropy(s, y), -ref)
    close(O.cross_entropy(s, y), torch.nn.functional.cross_entropy(s, y, reduction="none"))
    # works with a (B, T, V) layout too
    close(O.token_log_probs(s.view(1, N, V), y.view(1, N)), ref.view(1, N))


def test_critic_values_bounded_by_tanh():
    raw = torch.tensor([-100.0, -1.0, 0.0, 0.5, 100.0], dtype=torch.float64)
    q = O.critic_values(raw, 2.5)
    close(q, torch.tensor([-2.5, 2.5 * math.tanh(-1.0), 0.0, 2.5 * math.tanh(0.5), 2.5], dtype=torch.float64))
    assert (q.abs() <= 2.5).all()


# ----------------------------------------------------------------------------------------------------------
# AMM
# ----------------------------------------------------------------------------------------------------------
def test_amm_gap_vs_reference_and_sup_is_2c_tv(logits):
    s, t, q = logits
    ref = torch.tensor(
        [
            sum((a - b) * c for a, b, c in zip(_probs(rt), _probs(rs), rq))
            for rs, rt, rq in zip(_rows(s), _rows(t), _rows(q))
        ],
        dtype=torch.float64,
    )
    close(O.amm_moment_gap(s, t, q), ref)
    c = 0.7
    q_star = c * torch.sign(torch.softmax(t, -1) - torch.softmax(s, -1))
    close(O.amm_moment_gap(s, t, q_star), 2 * c * _ref(ref_tv, s, t))
    close(O.amm_adversarial_gap(s, t, q_star), 2 * c * _ref(ref_tv, s, t))
    # q_star is the sup over |q| <= c: any bounded q gives a smaller gap
    assert (O.amm_moment_gap(s, t, O.critic_values(q, c)) <= O.amm_moment_gap(s, t, q_star) + 1e-12).all()


def _grads(fn, s, t, q):
    s, t, q = (x.clone().requires_grad_(True) for x in (s, t, q))
    val = fn(s, t, q)
    val.sum().backward()
    return val.detach(), s.grad, t.grad, q.grad


def test_amm_adversarial_gap_gradients(logits):
    s, t, q = logits
    v_m, gs_m, gt_m, gq_m = _grads(O.amm_moment_gap, s, t, q)
    v_a, gs_a, gt_a, gq_a = _grads(O.amm_adversarial_gap, s, t, q)
    close(v_a, v_m)
    close(gs_a, gs_m)  # student descends the gap
    close(gq_a, -gq_m)  # head ascends the gap
    assert gt_m is not None and gt_m.abs().sum() > 0
    assert gt_a is None  # teacher never gets a gradient
    assert gq_m.abs().sum() > 0


def test_amm_adversarial_gap_min_max_steps(logits):
    s, t, q = logits
    lr = 1e-2
    _, gs, _, gq = _grads(O.amm_adversarial_gap, s, t, q)
    gap0 = O.amm_moment_gap(s, t, q).sum()
    # descending the returned value on q (the head) increases the gap ...
    assert O.amm_moment_gap(s, t, q - lr * gq).sum() > gap0
    # ... and on the student logits decreases it
    assert O.amm_moment_gap(s - lr * gs, t, q).sum() < gap0


# ----------------------------------------------------------------------------------------------------------
# policy-gradient pieces
# ----------------------------------------------------------------------------------------------------------
REWARDS = torch.tensor([[1.0, -2.0, 0.5, 3.0, 1.0], [2.0, 1.0, 4.0, 9.0, 9.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float64)


def test_reward_to_go_hand_computed():
    # gamma = 1
    close(
        O.reward_to_go(REWARDS, MASK, gamma=1.0, include_current=True),
        torch.tensor([[3.5, 2.5, 4.5, 4.0, 1.0], [7.0, 5.0, 4.0, 0.0, 0.0]], dtype=torch.float64),
    )
    close(
        O.reward_to_go(REWARDS, MASK, gamma=1.0, include_current=False),
        torch.tensor([[2.5, 4.5, 4.0, 1.0, 0.0], [5.0, 4.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
    )
    # gamma = 0.95: G4 = 1, G3 = 3 + .95, G2 = .5 + .95 * 3.95, ...
    close(
        O.reward_to_go(REWARDS, MASK, gamma=0.95, include_current=True),
        torch.tensor([[2.93788125, 2.039875, 4.2525, 3.95, 1.0], [6.56, 4.8, 4.0, 0.0, 0.0]], dtype=torch.float64),
    )
    close(
        O.reward_to_go(REWARDS, MASK, gamma=0.95, include_current=False),
        torch.tensor([[2.039875, 4.2525, 3.95, 1.0, 0.0], [4.8, 4.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
    )


def test_reward_to_go_padding_is_ignored():
    # garbage rewards at padded positions change nothing; the padded row equals the unpadded 3-token row
    other = REWARDS.clone()
    other[1, 3:] = -1e6
    for inc in (True, False):
        a = O.reward_to_go(REWARDS, MASK, 0.95, inc)
        close(a, O.reward_to_go(other, MASK, 0.95, inc))
        close(a[1, :3], O.reward_to_go(REWARDS[1:, :3], MASK[1:, :3], 0.95, inc)[0])


def test_length_normalize_hand_computed():
    g_inc = O.reward_to_go(REWARDS, MASK, gamma=0.95, include_current=True)
    close(
        O.length_normalize(g_inc, MASK, include_current=True),
        torch.tensor(
            [[0.58757625, 0.50996875, 1.4175, 1.975, 1.0], [6.56 / 3, 2.4, 4.0, 0.0, 0.0]], dtype=torch.float64
        ),
    )
    g_exc = O.reward_to_go(REWARDS, MASK, gamma=0.95, include_current=False)
    # counts k > t: [4, 3, 2, 1, 0 -> 1] and [2, 1, 0 -> 1, -, -]
    close(
        O.length_normalize(g_exc, MASK, include_current=False),
        torch.tensor([[0.50996875, 1.4175, 1.975, 1.0, 0.0], [2.4, 4.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
    )
    # garbage at masked positions of the input is zeroed
    junk = g_inc.clone()
    junk[1, 3:] = 123.0
    assert (O.length_normalize(junk, MASK)[1, 3:] == 0).all()


def test_whiten():
    g = torch.Generator().manual_seed(1)
    v = 3.0 + 5.0 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    v[mask == 0] = 1e4  # padded garbage must not leak into the statistics
    w = O.whiten(v, mask)
    valid = w[mask == 1]
    close(valid.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    close(valid.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[mask == 0] == 0).all()
    ws = O.whiten(v, mask, shift_mean=False)
    vv = v[mask == 1]
    close(ws[mask == 1].mean(), vv.mean())
    close(ws[mask == 1].std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def _ppo_grad(ratio, adv, eps=0.2):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, dtype=torch.float64)
    a = torch.tensor([adv], dtype=torch.float64)
    loss, clipped = O.ppo_clipped_loss(logp, old, a, clip_eps=eps)
    loss.sum().backward()
    return loss.item(), bool(clipped.item()), logp.grad.item()


def test_ppo_clipped_loss_values():
    eps = 0.2
    for ratio in (0.5, 0.9, 1.0, 1.1, 1.5):
        for adv in (-2.0, 0.7):
            loss, _, _ = _ppo_grad(ratio, adv, eps)
            expected = -min(ratio * adv, min(max(ratio, 1 - eps), 1 + eps) * adv)
            assert loss == pytest.approx(expected, rel=1e-12)


def test_ppo_clipping_engages_exactly_at_bounds():
    eps, d = 0.2, 1e-6
    hi, lo = 1 + eps, 1 - eps
    # A > 0: the upper bound matters
    _, c, g = _ppo_grad(hi * (1 - d), 1.0)
    assert not c and g == pytest.approx(-hi * (1 - d), rel=1e-9)  # d(-r A)/dlogp = -r A
    _, c, g = _ppo_grad(hi * (1 + d), 1.0)
    assert c and g == 0.0
    _, c, g = _ppo_grad(0.5, 1.0)  # below the lower bound with A > 0: min picks the unclipped branch
    assert not c and g != 0.0
    # A < 0: the lower bound matters
    _, c, g = _ppo_grad(lo * (1 + d), -1.0)
    assert not c and g == pytest.approx(lo * (1 + d), rel=1e-9)
    _, c, g = _ppo_grad(lo * (1 - d), -1.0)
    assert c and g == 0.0
    _, c, g = _ppo_grad(1.5, -1.0)  # above the upper bound with A < 0: unclipped, still pushed down
    assert not c and g != 0.0


def test_teacher_mix_weights(logits):
    s, t, _ = logits
    y = torch.tensor([0, 6, 3, 3, 1])
    ls, lt = O.token_log_probs(s, y), O.token_log_probs(t, y)
    ps = torch.tensor([_probs(r)[int(i)] for r, i in zip(_rows(s), y)], dtype=torch.float64)
    pt = torch.tensor([_probs(r)[int(i)] for r, i in zip(_rows(t), y)], dtype=torch.float64)
    close(O.teacher_mix_weights(ls, lt, mix=0.2), ps / (0.2 * pt + 0.8 * ps))
    close(O.teacher_mix_weights(ls, lt, mix=0.0), torch.ones(N, dtype=torch.float64))
    # stable for very unlikely tokens (log space)
    w = O.teacher_mix_weights(torch.tensor([-800.0]), torch.tensor([-1.0]), mix=0.2)
    assert torch.isfinite(w).all() and w.item() >= 0.0
    w = O.teacher_mix_weights(torch.tensor([-1.0]), torch.tensor([-800.0]), mix=0.2)
    assert w.item() == pytest.approx(1 / 0.8)


def test_bradley_terry_loss():
    rc = torch.tensor([2.0, -1.0, 0.0, 500.0, -500.0], dtype=torch.float64)
    rr = torch.tensor([1.0, 1.0, 0.0, -500.0, 500.0], dtype=torch.float64)
    ref = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0)), math.log(2.0), 0.0, 1000.0]
    ref = torch.tensor(ref, dtype=torch.float64)
    close(O.bradley_terry_loss(rc, rr), ref)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_divergences_match_trls_chunked_kernel(beta):
    """FKL (beta 0), RKL (beta 1) and GKD's JSD as our per-token functions equal TRL's chunked divergence kernel on
    the same hidden states and heads (logit scale, softcap and temperature included), in value and gradient. Ours
    stay separate because TRL's kernel takes no per-token weights (amm_beta, vLLM importance weights) and projects
    the whole `lm_head` (no shared-vocabulary rows of a padded one)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from amm_trl.projection import project, scale_logits

    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    w_s = torch.randn(16, 8, requires_grad=True)
    w_t = torch.randn(16, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scale, softcap, temperature = 1.5, 20.0, 0.7
    trl_loss, _, _ = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, student_logit_scale=scale,
                                              teacher_logit_scale=scale, student_final_logit_softcapping=softcap,
                                              teacher_final_logit_softcapping=softcap, temperature=temperature)
    trl_grad, = torch.autograd.grad(trl_loss, w_s)
    valid = mask.bool()
    z_s = scale_logits(project(h_s[valid], w_s, None, 16), (scale, softcap), temperature)
    z_t = scale_logits(project(h_t[valid], w_t, None, 16), (scale, softcap), temperature)
    ours = O.generalized_jsd(z_s, z_t, beta).mean()
    if beta in (0.0, 1.0):
        torch.testing.assert_close((O.forward_kl if beta == 0.0 else O.reverse_kl)(z_s, z_t).mean(), ours)
    our_grad, = torch.autograd.grad(ours, w_s)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-4, atol=1e-6)


def test_every_registered_objective_speaks_the_small_interface(tmp_path):
    """The interface has at most ten public members, and every objective declares a term for each data kind its data
    can bring (TRL's own loss aside), names its terms, and builds from a default config without a trainer."""
    from amm_trl import AMMConfig
    from amm_trl.objectives.base import Objective, Term

    base = Objective(None)
    assert len([n for n in dir(base) if not n.startswith("_")]) <= 10, [n for n in dir(base) if not n.startswith("_")]
    assert set(O.OBJECTIVES) >= {"sft", "seqkd", "fkl", "rkl", "tvd", "jsd", "gkd", "imitkd", "distillm",
                                 "distillm2", "minillm", "pbkd", "amm"}
    for name, cls in O.OBJECTIVES.items():
        args = AMMConfig(output_dir=str(tmp_path), objective=name, use_cpu=True, report_to="none",
                         off_policy_source="dataset", eval_strategy="steps" if name == "distillm" else "no",
                         eval_steps=10)
        objective = args.objective_unit
        assert type(objective) is cls and objective.name == name and objective.info.description
        if objective.info.trl_loss:
            assert objective.terms() == {} and objective.data.rollouts
            continue
        if objective.adversary is not None:  # the terms read the heads' parameters by name
            continue
        kinds = {kind for kind, brings in (("on", objective.data.rollouts), ("off", objective.data.off_policy))
                 if brings}
        terms = objective.terms()
        assert kinds <= set(terms), (name, kinds, set(terms))
        assert all(isinstance(t, Term) and t.name and callable(t.loss) for ts in terms.values() for t in ts), name
