"""Reading a vLLM model's weights whatever layout its CPU kernels put them in.

vLLM's CPU build may pack a linear layer's weight into its kernel's layout and leave `layer.weight` empty (see
tests/force_packed/sitecustomize.py). The weight is still what the layer computes with: `layer.cpu_linear(I, ...)`
with an identity input returns W^T exactly (each output is one weight times one, the rest zeros), in the layer's
dtype. Unpacked weights are returned as they are.
"""

import os

FORCE_PACKED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "force_packed")  # for PYTHONPATH


def effective_weights(module) -> dict:
    """`{name: tensor}` of `module.named_parameters()`, each packed linear weight recovered from its kernel."""
    import torch

    modules = dict(module.named_modules())
    out = {}
    for name, param in module.named_parameters():
        owner = modules.get(name.rpartition(".")[0])
        if param.numel() == 0 and name.endswith(".weight") and hasattr(owner, "cpu_linear"):
            with torch.no_grad():
                eye = torch.eye(_in_features(owner), dtype=param.dtype, device=param.device)
                param = owner.cpu_linear(eye, param, None).t().contiguous()
        out[name] = param
    return out


def packed_linear_count(module) -> int:
    """How many linear layers hold their weight only in a packed kernel copy."""
    return sum(1 for m in module.modules() if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None
               and m.weight.numel() == 0)


def _in_features(layer) -> int:
    for attr in ("input_size_per_partition", "input_size", "in_features"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise AttributeError(f"{type(layer).__name__} has no input size to rebuild its packed weight from")
