"""The KV pool: per layer, one key and one value tensor of `num_blocks * block_size` token slots.

Sequences own blocks of slots (block_manager.py); nothing here knows which. Each layer's attention hands
its new keys and values to `update`, which writes them into the slots the step assigned (StepLayout's
`slot_mapping`) and returns the whole pool for that layer, which the paged attention function reads through
the step's block tables. Nothing is padded and nothing is copied when sequences join or leave the batch.

A slot holds [kv_heads, head_dim]: the pool is [slots, kv_heads, head_dim], the same bytes as
[num_blocks, block_size, kv_heads, head_dim], the layout paged-attention kernels take.

With CUDA graphs (cuda_graphs.py) the pool's last block is scratch: a graph's padded rows write their KV
there. It is carved out of the pool rather than added to it, so the pool stays within `--kv-cache-memory`,
and the block manager is given `managed_blocks` (the others), so it never hands it out, publishes it or
counts it; its ids and bookkeeping stay those of a pool one block smaller.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from respserve.config import parse_memory_size
from respserve.engine.block_manager import NULL_BLOCK


def kv_bytes_per_token(config: Any, dtype: torch.dtype, shards: int = 1) -> int:
    """2 (key and value) x layers x kv heads x head dim x the dtype's size (one rank's share of the heads)."""
    layers, kv_heads, head_dim = kv_shape(config, shards)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def kv_shape(config: Any, shards: int = 1) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers text config; with tensor parallelism over `shards`
    ranks, each holds kv heads / shards of them."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if kv_heads % shards:
        raise ValueError(f"{kv_heads} KV heads cannot be split over {shards} tensor-parallel ranks")
    return int(config.num_hidden_layers), kv_heads // shards, head_dim


class PagedKVCache:
    """The pool, shaped as transformers' attention layers expect a cache to behave (`update`)."""

    def __init__(
        self,
        config: Any,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        shards: int = 1,
        scratch: bool = False,
        zeroed: bool = False,
    ) -> None:
        layers, kv_heads, head_dim = kv_shape(config, shards)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks - 1 if scratch else None
        slots = num_blocks * block_size
        # torch.empty: memory is only touched (and counted in RSS) as blocks are first used. `zeroed` for an
        # attention that weighs unwritten slots by 0 (flex_decode.py), which NaN garbage would poison.
        make = torch.zeros if zeroed else torch.empty
        self.keys = [make(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [make(slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        null = slice(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size)
        for pool in (*self.keys, *self.values):
            pool[null].zero_()

    @property
    def managed_blocks(self) -> int:
        """Blocks 0 .. managed_blocks - 1 are the block manager's; the scratch block, if any, follows."""
        return self.num_blocks if self.scratch_block is None else self.scratch_block

    @property
    def num_bytes(self) -> int:
        return sum(pool.numel() * pool.element_size() for pool in (*self.keys, *self.values))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: Any = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's keys/values [1, kv_heads, tokens, head_dim]; returns the layer's pool."""
        step = (kwargs or {})["paged_step"]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(0, step.slot_mapping, key_states[0].transpose(0, 1).to(keys.dtype))
        values.index_copy_(0, step.slot_mapping, value_states[0].transpose(0, 1).to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Positions are always passed explicitly; transformers asks only when they are not.
        return 0


# On the CPU, "auto" reserves this much address space; pages are only touched as blocks are first used.
_CPU_AUTO_BYTES = 2 * 2**30
_CUDA_AUTO_FRACTION = 0.85


def kv_budget_bytes(setting: str, device: torch.device) -> int:
    """Bytes for the pool from `--kv-cache-memory`: "auto", a byte count ("4GiB", "500MB", "1000000"),
    or a fraction (0 < x <= 1) of the device's free memory (GPU) or of the machine's available memory."""
    size = parse_memory_size(setting)
    if size is None:
        return _free_bytes(device, _CUDA_AUTO_FRACTION) if device.type == "cuda" else _CPU_AUTO_BYTES
    return _free_bytes(device, size) if isinstance(size, float) else size


def _free_bytes(device: torch.device, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"a fraction of free memory must be in (0, 1], not {fraction}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * fraction)
