"""Forces vLLM's packed CPU weight layout in every Python process started with this folder on PYTHONPATH.

On CPUs with AVX-512 BF16 (and for fp32 wherever vLLM's oneDNN kernels load), vLLM's CPU build hands each linear
layer's weight to a kernel that keeps a packed copy, and replaces `layer.weight` by an empty parameter without a
`weight_loader` (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`).
Elsewhere (bf16 on AVX2-only CPUs) the weight stays where it is. This makes every CPU machine run the packed
layout: the weight moves into a private copy that the layer's `cpu_linear` reads, and the parameter is emptied the
same way, so weight syncs and weight checks meet what they meet on an AVX-512 BF16 machine.

Python imports `sitecustomize` at start-up; the patch is applied when vLLM's module is first imported (an import
hook), so processes that never import vLLM (torchrun's launcher) pay nothing.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "vllm.model_executor.layers.utils"


def force_packed(utils) -> None:
    import torch

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2 or not remove_weight:
            return original(layer, remove_weight)
        packed = layer.weight.detach().clone()
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=packed.dtype, device=packed.device),
                                          requires_grad=False)

    dispatch.forced_packed = True
    utils.dispatch_cpu_unquantized_gemm = dispatch


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            force_packed(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchOnImport())
