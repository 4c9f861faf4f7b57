"""Decode rows' attention read from the paged pool in place, through torch's flex attention.

Gathering a step's KV for SDPA (paged_attention.py) copies it: read, written, read again. Flex attention
reads the pool where it lies: a layer's pool is one long key sequence [1, kv_heads, slots, head_dim] that
every row shares, and each row's block mask lists the pool blocks it reads (its block table, from the
first block its window reaches), at the pool's block size. `mask_mod` cuts only the ends: slots of its last
block past its length, and under a sliding window slots of its first block before the window.

On CUDA every listed block is "partial" (mask_mod evaluated), none "full": with full blocks torch's
Triton decoding template splits the whole pool's length, not a row's blocks, among its split-KV programs,
so one program per KV head would read a row's whole context; with partial blocks only, a row's blocks are
split among them (up to 2 x SMs / (rows x KV heads)), which is what keeps a few long rows from idling the
GPU. This follows from the template's source; it is not measured. The CPU lists full blocks (see
`decode_block_mask`).

A masked slot still enters the weighted sum with weight 0, and 0 x NaN is NaN: the slots a partial block
has not written yet must hold numbers, so a pool read this way is zeroed when it is made (kv_cache.py).

The kernel is compiled (inductor: Triton on CUDA, C++ on the CPU) once per row count, static shapes only
(inductor's CPU flex template fails to build with a symbolic batch): rows are padded to a power of two
(padding rows read one slot of the zero block), so at most log2(max running) + 1 compiles per kind of
layer, all of them before any CUDA graph is captured over them (its warm-up runs compile). Dynamo also
compiles anew for another query layout (so the query is made contiguous), grad mode (so the start-time
check runs in inference mode, as steps do) or, on the CPU, thread count (cpu_threads.py switches it).

`flex_decode_works` runs it once on the device against gather + SDPA at start; the worker uses it only
if it compiles and agrees, so a torch or driver on which it fails costs a warning, not the server.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from respserve.engine.block_manager import NULL_BLOCK

logger = logging.getLogger(__name__)

# Compiles: one per padded row count (<= 9 up to 256 rows), per dtype and kind of layer.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled() -> Any:
    return torch.compile(flex_attention, dynamic=False)


def padded_rows(rows: int) -> int:
    """The row count a step's decode rows are padded to: the next power of two."""
    return 1 << (rows - 1).bit_length()


def decode_block_mask(
    tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    num_blocks: int,
    window: int | None,
    full_blocks: bool | None = None,
) -> BlockMask:
    """The block mask of rows whose tables are `tables` [rows, width] (NULL past a table's end) and whose
    contexts are `lengths` [rows] tokens, over a pool of `num_blocks` blocks. Tensor ops only, on the
    tables' device: a CUDA graph captures it with the step.

    `full_blocks` (default: on the CPU): a row's blocks between its first and last are listed as full, the
    two ends as partial; else all as partial (CUDA, see the module's docstring). Inductor's CPU template
    does not build without full blocks, and with a row's blocks all partial it takes ~100x longer as soon
    as rows differ in length (measured: 0.5 s against 5 ms for 64 rows over 65,536 blocks)."""
    if full_blocks is None:
        full_blocks = tables.device.type == "cpu"
    rows, width = tables.shape
    device = tables.device
    low = (lengths - window).clamp(min=0) if window else torch.zeros_like(lengths)
    first, last = low // block_size, (lengths - 1) // block_size  # logical blocks

    def table_at(logical: torch.Tensor) -> torch.Tensor:
        return tables.gather(1, logical.clamp(max=width - 1)).to(torch.int32)

    def listing(logical: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` [rows] blocks of each table from the logical ones `logical` [rows, n] onwards, as
        from_kv_blocks takes them. inductor's CPU flex wants as many index columns as the pool has blocks."""
        indices = torch.zeros(rows, num_blocks, dtype=torch.int32, device=device)
        listed = min(logical.shape[1], num_blocks)
        indices[:, :listed] = table_at(logical[:, :listed])
        return count.to(torch.int32)[:, None, None], indices[:, None, None]

    if full_blocks:
        ends = listing(torch.stack([first, last], dim=1), 1 + (first != last).to(torch.int32))
        inner = listing(first[:, None] + 1 + torch.arange(width, device=device), (last - first - 1).clamp(min=0))
    else:
        ends, inner = listing(first[:, None] + torch.arange(width, device=device), last - first + 1), (None, None)
    first_block, last_block = table_at(first[:, None])[:, 0], table_at(last[:, None])[:, 0]
    starts, stops = low - first * block_size, lengths - last * block_size  # kept offsets in those two blocks

    def mask_mod(row: torch.Tensor, head: torch.Tensor, query: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        block, offset = slot // block_size, slot % block_size
        before_end = (block != last_block[row]) | (offset < stops[row])
        in_window = (block != first_block[row]) | (offset >= starts[row])
        return before_end & in_window

    return BlockMask.from_kv_blocks(
        *ends,
        *inner,
        BLOCK_SIZE=(1, block_size),
        mask_mod=mask_mod,
        seq_lengths=(1, num_blocks * block_size),
        compute_q_blocks=False,  # only the forward runs
    )


def pad_rows(tables: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tables` and `lengths` with padding rows up to `padded_rows`: the zero block, one slot."""
    rows = tables.shape[0]
    extra = padded_rows(rows) - rows
    if not extra:
        return tables, lengths
    tables = torch.cat([tables, tables.new_full((extra, tables.shape[1]), NULL_BLOCK)])
    return tables, torch.cat([lengths, lengths.new_ones(extra)])


def flex_decode_attention(
    queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask, scale: float | None
) -> torch.Tensor:
    """queries [rows, heads, head_dim]; key/value: a layer's pool [slots, kv_heads, head_dim]; `mask` from
    `decode_block_mask` over padded rows. Returns [rows, heads, head_dim]."""
    rows = queries.shape[0]
    padded = mask.kv_num_blocks.shape[0]
    # Contiguous whatever the caller's layout: dynamo guards on strides, and each layout would compile anew.
    query = F.pad(queries, (0, 0, 0, 0, 0, padded - rows)).contiguous()[:, :, None, :]
    keys, values = key.permute(1, 0, 2)[None], value.permute(1, 0, 2)[None]  # one sequence every row reads
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = _compiled()(query, keys, values, block_mask=mask, scale=scale, enable_gqa=True)
    return out[:rows, :, 0, :]


def flex_decode_works(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether flex decoding compiles on `device` and agrees with gather + SDPA on a small random pool."""
    block_size, num_blocks = 16, 8
    generator = torch.Generator().manual_seed(0)
    # Values `dtype` holds exactly, so the reference differs from flex by arithmetic alone.
    pool = [
        torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator).to(dtype).float()
        for _ in range(2)
    ]
    queries = torch.randn(3, heads, head_dim, generator=generator).to(dtype).float()
    tables = torch.tensor([[3, 1, 0], [5, 0, 0], [2, 6, 4]])
    lengths = torch.tensor([20, 16, 40])
    expected = []
    for row, (table, length) in enumerate(zip(tables, lengths, strict=True)):
        slots = (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:length]
        keys, values = (part[slots].transpose(0, 1)[None] for part in pool)
        attended = F.scaled_dot_product_attention(queries[row][None, :, None], keys, values, enable_gqa=True)
        expected.append(attended[0, :, 0])
    try:
        with torch.inference_mode():  # as steps run (model_runner.py): grad mode is part of what compiles
            padded_tables, padded_lengths = pad_rows(tables.to(device), lengths.to(device))
            mask = decode_block_mask(padded_tables, padded_lengths, block_size, num_blocks, None)
            key, value = (part.to(device, dtype) for part in pool)
            queries = queries.to(device, dtype)
            got = flex_decode_attention(queries, key, value, mask, head_dim**-0.5).float().cpu()
    except Exception:  # noqa: BLE001 - any failure means: gather for SDPA instead
        logger.warning("flex attention does not run here; decode rows are gathered for SDPA", exc_info=True)
        return False
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2  # 1e-3: TF32 matmuls, if a user turned them on
    error = (got - torch.stack(expected)).abs().max().item()
    if not error <= tolerance:
        logger.warning("flex attention differs from SDPA by %.3g here; decode rows are gathered for SDPA", error)
        return False
    return True
