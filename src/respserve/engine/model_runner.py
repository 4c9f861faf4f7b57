"""One forward pass over a scheduled step: every chunk's tokens as one flat row, KV into the paged pool.

The model is transformers' own; only its attention is ours (paged_attention.py), selected by name, and
its cache is the pool (kv_cache.py). Logits are computed only for the chunks that sample.
"""

from __future__ import annotations

from typing import Any

import torch

from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.paged_attention import ATTENTION_NAME, build_step_layout
from respserve.engine.scheduler import Chunk


class ModelRunner:
    def __init__(self, model: Any, cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Computes the chunks' KV; returns logits [sampling chunks, vocab], in chunk order."""
        input_ids: list[int] = []
        positions: list[int] = []
        sampled_rows: list[int] = []
        for chunk in chunks:
            input_ids.extend(chunk.sequence.token_ids[chunk.start : chunk.end])
            positions.extend(range(chunk.start, chunk.end))
            if chunk.samples:
                sampled_rows.append(len(input_ids) - 1)
        layout = build_step_layout(
            [chunk.sequence.block_table for chunk in chunks],
            [(chunk.start, chunk.end) for chunk in chunks],
            self.cache.block_size,
            self.device,
        )
        out = self.model(
            input_ids=torch.tensor([input_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=torch.tensor(sampled_rows, dtype=torch.long, device=self.device),
            paged_step=layout,
        )
        return out.logits[0]
