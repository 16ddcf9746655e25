"""Token-chunked losses over the vocabulary, so (tokens, vocab) logits never exist for the whole batch.

`chunked_token_loss(fn, token_inputs, params, weights)` computes sum_i weights[i] * fn(...)[0][i] over tokens
i, running `fn` on `chunk_size` tokens at a time without autograd in the forward, and recomputing each chunk with
autograd in the backward (activation checkpointing by hand). Inputs, parameters and metrics travel by name. `fn`
projects hidden states with the weights in `params` (student/teacher `lm_head`, Q-head), so peak memory is a few
(chunk, vocab) fp32 tensors.

Under DeepSpeed ZeRO-3 the weights in `params` are partitioned and read directly, not through their modules'
forward. Trainable ones (student `lm_head`, Q-heads) must stay gathered until autograd has accumulated their
gradients, which happens after this Function's backward returns: so the loss runs as the forward of `ChunkedLoss`,
a parameter-free submodule of the student with those weights registered as DeepSpeed *external parameters* (the
mechanism DeepSpeed uses for tied embeddings): its pre-forward and pre-backward hooks gather them, its post-backward
hook releases them. Frozen weights (the teacher's `lm_head`, another engine) are gathered inside the Function.
"""

import contextlib
from collections.abc import Callable

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

# (chunk, vocab) fp32 elements per projected tensor; the loss holds a handful of these at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def auto_chunk_size(vocab_size: int, chunk_tokens: int | None = None) -> int:
    return chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


class _ChunkedTokenLoss(torch.autograd.Function):
    """Flat tensors in and out (what autograd needs); `chunked_token_loss` names them."""

    @staticmethod
    def forward(ctx, fn, chunk_size, token_names, param_names, metric_names, weights, *inputs):
        token_inputs, params = inputs[:len(token_names)], inputs[len(token_names):]
        n = weights.shape[0]
        total = torch.zeros((), device=weights.device, dtype=torch.float32)
        metrics = []
        with _gathered(params):
            named_params = dict(zip(param_names, params))
            for start in range(0, max(n, 1), chunk_size):  # an empty input still runs once: the metric names
                end = min(start + chunk_size, n)
                values, chunk_metrics = fn({k: t[start:end] for k, t in zip(token_names, token_inputs)},
                                           named_params)
                total += (values.float() * weights[start:end]).sum()
                columns = [m.detach().float() for m in chunk_metrics.values()]
                metrics.append(torch.stack(columns, dim=1) if columns else values.new_zeros(end - start, 0).float())
        metric_names.extend(chunk_metrics)  # the caller's list: autograd Functions return tensors only
        ctx.fn, ctx.chunk_size, ctx.token_names, ctx.param_names = fn, chunk_size, token_names, param_names
        ctx.save_for_backward(weights, *inputs)
        metrics = torch.cat(metrics)
        ctx.mark_non_differentiable(metrics)
        return total, metrics

    @staticmethod
    def backward(ctx, grad_total, _grad_metrics):
        weights, *inputs = ctx.saved_tensors
        fn, chunk_size, token_names, param_names = ctx.fn, ctx.chunk_size, ctx.token_names, ctx.param_names
        n_tok = len(token_names)
        needs = ctx.needs_input_grad[6:]
        token_inputs, params = inputs[:n_tok], inputs[n_tok:]
        n = weights.shape[0]
        token_grads = [torch.zeros_like(t, dtype=torch.float32) if need else None
                       for t, need in zip(token_inputs, needs[:n_tok])]
        with _gathered(params):
            # Gathered shapes are only known inside the context; accumulate in fp32.
            param_grads = [torch.zeros(p.shape, device=p.device, dtype=torch.float32) if need else None
                           for p, need in zip(params, needs[n_tok:])]
            # Differentiate w.r.t. detached aliases: under ZeRO-3 the real Parameter's gradient edge still carries
            # its partitioned shape, so autograd must not reach it from inside this backward; the summed gradients
            # reach it through this Function's return, like any module's.
            aliases = [p.detach().requires_grad_(need) for p, need in zip(params, needs[n_tok:])]
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                with torch.enable_grad():
                    chunk = [t[start:end].detach().requires_grad_(need) for t, need in zip(token_inputs, needs)]
                    values, _ = fn(dict(zip(token_names, chunk)), dict(zip(param_names, aliases)))
                    objective = (values.float() * weights[start:end]).sum() * grad_total
                    wrt = [x for x, need in zip(chunk + aliases, needs) if need]
                    grads = iter(torch.autograd.grad(objective, wrt, allow_unused=True))
                for i, need in enumerate(needs[:n_tok]):
                    if need:
                        g = next(grads)
                        if g is not None:
                            token_grads[i][start:end] += g.float()
                for i, need in enumerate(needs[n_tok:]):
                    if need:
                        g = next(grads)
                        if g is not None:
                            param_grads[i] += g.float()
            param_grads = [g.to(p.dtype) if g is not None else None for g, p in zip(param_grads, params)]
        token_grads = [g.to(t.dtype) if g is not None else None for g, t in zip(token_grads, token_inputs)]
        return (None, None, None, None, None, None, *token_grads, *param_grads)


class ChunkedLoss(torch.nn.Module):
    """`chunked_token_loss` as a module forward, so DeepSpeed ZeRO-3 gathers the trainable weights it reads for the
    forward and the backward (register them once with `register_trainable_weights`)."""

    def register_trainable_weights(self, params: list):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            import deepspeed

            for p in params:
                if p is not None and hasattr(p, "ds_id"):
                    deepspeed.zero.register_external_parameter(self, p)

    def forward(self, token_inputs: dict[str, torch.Tensor], weights: torch.Tensor, spec: "LossSpec"):
        return chunked_token_loss(spec.fn, token_inputs, spec.params, weights, spec.chunk_size)


class LossSpec:
    """The per-token function and the weights it reads. Deliberately not a sequence: DeepSpeed's module hooks
    rewrap every tensor found in a forward's arguments (tuples/lists/dicts), which would hand `fn` partitioned
    copies instead of the gathered parameters."""

    def __init__(self, fn, params: dict[str, torch.Tensor], chunk_size: int):
        self.fn, self.params, self.chunk_size = fn, dict(params), chunk_size


def _gathered(params):
    # ZeRO-3 partitioned parameters only (a served teacher's output layer is a plain, whole parameter)
    params = [p for p in params if isinstance(p, torch.nn.Parameter) and hasattr(p, "ds_id")]
    return maybe_gather_lm_head_ctx(*params) if params else contextlib.nullcontext()


def chunked_token_loss(
    fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    token_inputs: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    weights: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (sum_i weights[i] * values[i], {metric name: per-token values (n,)}, detached).

    `fn(chunk, params) -> (values (m,), {name: (m,)})` must be a pure function of its arguments; it runs once per
    chunk in the forward and once more, with autograd, in the backward. `token_inputs` are named (n, ...) tensors cut
    along dim 0 into `chunk`; `params` are named weights passed whole (ZeRO-3 parameters are gathered around each
    pass).
    """
    weights = weights.detach().float()
    token_names, param_names, metric_names = list(token_inputs), list(params), []
    # Gathered around `apply` too: autograd records each parameter's gradient edge here, with the parameter's
    # current shape; recorded while ZeRO-3 has it partitioned ([0]), the full-shape gradient would be rejected.
    with _gathered(list(params.values())):
        total, metrics = _ChunkedTokenLoss.apply(fn, chunk_size, token_names, param_names, metric_names, weights,
                                                 *token_inputs.values(), *params.values())
    return total, dict(zip(metric_names, metrics.unbind(1)))
