"""RMSNorm layers computed by one call of respserve's CPU kernel (kernels/rms_norm.cpp).

transformers' RMSNorm is eight tensor ops; on a small CPU each costs more to dispatch than to compute for
a decode step's few rows, and a Llama-shaped model runs two a layer (Qwen3 four). `fuse_rms_norms`
replaces every norm that computes what the kernel computes: a module named *RMSNorm with a 1-d `weight`
and an epsilon, checked at load against its own forward on a probe input, scaling by `weight` (Llama,
Qwen, Mistral, SmolLM) or by `1 + weight` (Gemma). Any other norm keeps its own forward.
"""

from __future__ import annotations

import torch
from torch import nn

_EPSILON_NAMES = ("variance_epsilon", "eps", "epsilon")


class FusedRMSNorm(nn.Module):
    """Stands where a transformers RMSNorm stood, with its weight and epsilon."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.respserve.rms_norm(x, self.weight, self.eps, self.offset)


def fuse_rms_norms(model: nn.Module) -> int:
    """Replaces the RMSNorms of `model` that the kernel computes alike; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        fused = _fused(module)
        if fused is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fused)
        replaced += 1
    return replaced


def _fused(module: nn.Module) -> FusedRMSNorm | None:
    weight = getattr(module, "weight", None)
    eps = next(
        (getattr(module, name) for name in _EPSILON_NAMES if isinstance(getattr(module, name, None), float)), None
    )
    if not type(module).__name__.endswith("RMSNorm") or eps is None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.float32:
        return None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=generator) * 3
    with torch.inference_mode():
        expected = module(probe)
        for offset in (0.0, 1.0):
            candidate = FusedRMSNorm(weight.detach(), eps, offset)
            if torch.allclose(candidate(probe), expected, rtol=1e-5, atol=1e-6):
                return candidate
    return None
