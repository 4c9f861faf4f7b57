"""The running batch's KV cache: one left-padded tensor per layer, grown in place, with its padding mask.

Sequences join (after a prefill) by padding both sides on the left to a common length and stacking on
the batch dimension; they leave by selecting the remaining rows. Each layer keeps spare capacity along
the sequence axis, so a decode step writes one column instead of copying the whole cache (transformers'
DynamicLayer concatenates, which at batch 32 x 300 tokens copied ~220 MB per step for SmolLM2).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_CAPACITY = 64


class GrowableKVLayer(DynamicLayer):
    """A DynamicLayer whose `keys`/`values` are views into buffers with room to grow."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, length, needed)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        capacity = max(_MIN_CAPACITY, needed * 2)
        batch, heads, _, key_dim = key_states.shape
        value_dim = value_states.shape[-1]
        keys = key_states.new_empty(batch, heads, capacity, key_dim)
        values = value_states.new_empty(batch, heads, capacity, value_dim)
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sets new contents (after a merge, a row selection or a trim); buffers are rebuilt on next update."""
        self.keys, self.values = keys, values
        self._key_buffer = self._value_buffer = None
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True


def new_cache(num_layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [GrowableKVLayer() for _ in range(num_layers)]
    return cache


class BatchKVCache:
    """The cache of every running sequence, row i belonging to the i-th running sequence."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [B, T] long: 1 for a real token, 0 for left padding

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def layers(self) -> list[GrowableKVLayer]:
        return self.cache.layers  # type: ignore[return-value]

    def extend(self, other: BatchKVCache) -> None:
        """Appends `other`'s rows, left-padding whichever side is shorter."""
        if self.batch_size == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        length = max(self.length, other.length)
        for mine, theirs in zip(self.layers(), other.layers(), strict=True):
            mine.replace(
                torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)]),
                torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)]),
            )
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(other.mask, length)])

    def keep_rows(self, rows: list[int]) -> None:
        """Keeps only `rows` (in that order), then drops padding columns no remaining row needs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.layers():
            if layer.is_initialized and layer.keys.numel():
                layer.replace(
                    layer.keys.index_select(0, index)[..., start:, :],
                    layer.values.index_select(0, index)[..., start:, :],
                )

    def append_step(self) -> torch.Tensor:
        """The mask for a decode step: every row attends to its cache plus the token fed now."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch_size, 1)], dim=1)
        return self.mask


def empty_batch(num_layers: int, device: torch.device) -> BatchKVCache:
    return BatchKVCache(new_cache(num_layers), torch.zeros(0, 0, dtype=torch.long, device=device))


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pads dim -2 of a KV tensor [B, H, T, D], or dim -1 of a mask [B, T], with zeros on the left."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = length - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
