"""Linear layers with their weights prepared once for decoding on the CPU.

`F.linear` repacks the weight on every call, which for the skinny matmuls of decoding (a few rows against
a large weight) costs as much as the product itself. Packing once at load time halves the time of a
decode step's matmuls. Measured on the 2-core CPU (SmolLM2-135M, float32, one [8 x 576] @ [576 x 1536]
product): 0.32 ms with `F.linear`, 0.17-0.20 ms packed; the lm_head [8 x 576] @ [576 x 49152]: 27.9 vs 9.6 ms.

A float32 linear whose weights bfloat16 holds exactly (a bf16 checkpoint served at float32, as the
embedded SmolLM2 is) keeps them as bfloat16 instead, multiplied in float32 by our kernel
(kernels/bf16_linear.cpp): the same products from half the bytes, and decoding waits on memory.

bfloat16 weights (`--dtype bfloat16`) are packed for oneDNN too where it computes them with AVX-512
(2026-11-29, AVX-512 EPYC, [32 x 576] @ [576 x 3072]: 176 us with `F.linear`, 141 us packed, float32
packed 257 us).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from respserve.engine.fused_projections import fuse_projections

_BLOCK = 16  # output columns of a packed bf16 block (bf16_linear.cpp)
_TILE_K = 32  # values of k in a row of an AMX tile (amx_linear.h): K is padded to a multiple
# Within a block, the order that the kernel's interleave with zeros turns into columns 0-15.
_BLOCK_ORDER = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


class PackedLinear(nn.Module):
    """The weight prepacked for oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class Bf16Linear(nn.Module):
    """float32 in and out, the weight kept as bfloat16 in the blocks of the kernel's path on this CPU."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        amx = torch.ops.respserve.kernel_isa() == "amx"
        self.packed_weight = pack_amx_tiles(weight) if amx else pack_bf16_blocks(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.respserve.bf16_linear(x, self.packed_weight, self.out_features, self.bias)


def pack_bf16_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), K, 16] bfloat16, N padded with zero rows, each block's columns in the
    kernel's order."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.to(torch.bfloat16), (0, 0, 0, -out_features % _BLOCK))
    blocks = padded.view(-1, _BLOCK, in_features)[:, _BLOCK_ORDER, :]
    return blocks.transpose(1, 2).contiguous()


def pack_amx_tiles(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), Kp / 2, 32] bfloat16 for the AMX path: K padded with zeros to Kp, a multiple
    of 32; in each block of 16 columns, row i holds k = 2i and 2i + 1 of each column side by side, the
    layout a tile multiply reads its second operand in."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.to(torch.bfloat16), (0, -in_features % _TILE_K, 0, -out_features % _BLOCK))
    pairs = padded.view(-1, _BLOCK, padded.shape[1] // 2, 2)  # [blocks, column, pair, 2]
    return pairs.transpose(1, 2).reshape(pairs.shape[0], pairs.shape[2], 2 * _BLOCK).contiguous()


def holds_exactly_in_bf16(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and torch.equal(weight, weight.to(torch.bfloat16).to(torch.float32))


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


def native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 matmuls with AVX-512 here (on AVX2-only CPUs they are emulated)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepared_linear(linear: nn.Linear, bf16_kernel: bool) -> nn.Module:
    """`linear` as a Bf16Linear where its weights allow and the kernel is loaded (cpu_kernels.py), else as
    a PackedLinear."""
    if bf16_kernel and holds_exactly_in_bf16(linear.weight.detach()):
        return Bf16Linear(linear)
    return PackedLinear(linear)


def pack_linears(model: nn.Module, bf16_kernel: bool = False) -> int:
    """Replaces every nn.Linear of `model` (inference only from then on) by a `prepared_linear`, siblings
    of one input fused (fused_projections.py); returns how many linears are replaced."""
    fuse_projections(model, lambda linear: prepared_linear(linear, bf16_kernel))
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, prepared_linear(module, bf16_kernel))
    return len(targets)
