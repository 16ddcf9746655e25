"""The chunked engine on its own (`amm_trl.chunked.chunked_token_loss`): named token inputs, parameters and metrics;
the value and every gradient equal the plain full-batch computation in float64 for any chunk size; an empty input
still names its metrics."""

import pytest
import torch

from amm_trl.chunked import chunked_token_loss


def _fn(chunk, params):
    """A per-token loss reading two named inputs and two named parameters, with two named metric columns."""
    logits = chunk["hidden"] @ params["head.weight"].T + params["head.bias"]
    logp = torch.log_softmax(logits, -1)
    values = -(logp.gather(-1, chunk["target"][:, None])[:, 0]) * chunk["scale"]
    return values, {"entropy": -(logp.exp() * logp).sum(-1), "logp": logp.gather(-1, chunk["target"][:, None])[:, 0]}


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_value_metrics_and_gradients_equal_the_full_batch(chunk_size):
    g = torch.Generator().manual_seed(0)
    n, h, v = 11, 5, 9
    inputs = {"hidden": torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
              "target": torch.randint(0, v, (n,), generator=g),
              "scale": torch.rand(n, generator=g, dtype=torch.float64)}
    params = {"head.weight": torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True),
              "head.bias": torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)}
    weights = torch.rand(n, generator=g, dtype=torch.float64)

    total, metrics = chunked_token_loss(_fn, inputs, params, weights, chunk_size)
    got = torch.autograd.grad(total, [inputs["hidden"], *params.values()])
    values, want_metrics = _fn(inputs, params)
    want = (values.float() * weights.float()).sum()  # the engine reduces in fp32
    want_grads = torch.autograd.grad((values * weights).sum(), [inputs["hidden"], *params.values()])

    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert list(metrics) == ["entropy", "logp"] and all(m.shape == (n,) and not m.requires_grad
                                                        for m in metrics.values())
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), want_metrics[name].detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_an_empty_input_still_names_its_metrics():
    params = {"head.weight": torch.randn(4, 3, requires_grad=True), "head.bias": torch.zeros(4, requires_grad=True)}
    inputs = {"hidden": torch.zeros(0, 3), "target": torch.zeros(0, dtype=torch.long), "scale": torch.zeros(0)}
    total, metrics = chunked_token_loss(_fn, inputs, params, torch.zeros(0), 2)
    assert total.item() == 0.0 and {k: tuple(m.shape) for k, m in metrics.items()} == {"entropy": (0,), "logp": (0,)}
