"""One forward pass over a scheduled step: every chunk's tokens as one flat row, KV into the paged pool.

The model is transformers' own; only its attention is ours (paged_attention.py), selected by name, and
its cache is the pool (kv_cache.py). Logits are computed only for the chunks that sample.

A step in which some chunk covers image placeholders (a vision-language prompt, vision.py) runs on input
embeddings instead of ids: the tokens' embeddings, with the image rows overwritten by the features the
vision encoder made at admission. Steps without images take the ids path unchanged.

An M-RoPE model (Qwen2-VL, Qwen2.5-VL) reads three positions per token. When some sequence of the step has
them (an image prompt, vision.py's `RopePositions`), the step passes [3, 1, tokens] positions, the other
sequences' tokens at their index in all three; otherwise [1, tokens], which such a model spreads to all
three itself, as any other model takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.paged_attention import ATTENTION_NAME, build_step_layout
from respserve.engine.scheduler import Chunk


@dataclass(frozen=True)
class StepInputs:
    """A step as plain data: all a process needs to run it (tensor-parallel peers receive it)."""

    input_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]
    spans: list[tuple[int, int]]  # each sequence's positions [start, end) computed in this step
    sampled_rows: list[int]  # flat indices whose logits are wanted
    image_rows: torch.Tensor | None = None  # [n] flat indices whose embeddings are image features
    image_features: torch.Tensor | None = None  # [n, hidden]
    mrope_positions: torch.Tensor | None = None  # [3, tokens] when some sequence has M-RoPE positions

    @classmethod
    def of(cls, chunks: list[Chunk]) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        sampled_rows: list[int] = []
        for chunk in chunks:
            input_ids.extend(chunk.sequence.token_ids[chunk.start : chunk.end])
            positions.extend(range(chunk.start, chunk.end))
            if chunk.samples:
                sampled_rows.append(len(input_ids) - 1)
        tables = [chunk.sequence.block_table for chunk in chunks]
        spans = [(chunk.start, chunk.end) for chunk in chunks]
        rows, features = _image_rows(chunks)
        return cls(input_ids, positions, tables, spans, sampled_rows, rows, features, _mrope_positions(chunks))


class ModelRunner:
    def __init__(self, model: Any, cache: PagedKVCache, device: torch.device, peers: StepSender | None = None) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.peers = peers  # tensor-parallel processes that run every step beside this one
        # A vision-language model's vision tower keeps its own attention: it runs outside the paged steps.
        model.set_attn_implementation({"text_config": ATTENTION_NAME} if model.config.sub_configs else ATTENTION_NAME)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Computes the chunks' KV; returns logits [sampling chunks, vocab], in chunk order."""
        step = StepInputs.of(chunks)
        if self.peers is not None:
            self.peers.send(step)
        return self.forward(step)

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        layout = build_step_layout(step.block_tables, step.spans, self.cache.block_size, self.device)
        input_ids = torch.tensor([step.input_ids], device=self.device)
        tokens: dict[str, torch.Tensor] = {"input_ids": input_ids}
        if step.image_rows is not None and step.image_features is not None:
            embeds = self.model.get_input_embeddings()(input_ids)
            embeds[0, step.image_rows.to(self.device)] = step.image_features.to(embeds.dtype)
            tokens = {"inputs_embeds": embeds}
        if step.mrope_positions is None:
            positions = torch.tensor([step.positions], device=self.device)
        else:  # (temporal, height, width) x batch 1 x tokens
            positions = step.mrope_positions[:, None, :].to(self.device)
        out = self.model(
            **tokens,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=torch.tensor(step.sampled_rows, dtype=torch.long, device=self.device),
            paged_step=layout,
        )
        return out.logits[0]


def _image_rows(chunks: list[Chunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The flat rows of the step that hold image placeholders, and their features; (None, None) if none."""
    rows: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    flat = 0
    for chunk in chunks:
        images = chunk.sequence.images
        if images is not None:
            offsets, chunk_features = images.rows(chunk.start, chunk.end)
            rows.append(offsets + flat)
            features.append(chunk_features)
        flat += chunk.end - chunk.start
    if not rows or not sum(len(offsets) for offsets in rows):
        return None, None
    return torch.cat(rows), torch.cat(features)


def _mrope_positions(chunks: list[Chunk]) -> torch.Tensor | None:
    """[3, tokens] when some chunk's sequence has M-RoPE positions, else None (the step's plain positions)."""
    if all(chunk.sequence.rope_positions is None for chunk in chunks):
        return None
    spans: list[torch.Tensor] = []
    for chunk in chunks:
        rope = chunk.sequence.rope_positions
        if rope is None:  # a text prompt, or a model without M-RoPE: text tokens sit at their index
            spans.append(torch.arange(chunk.start, chunk.end).expand(3, -1))
        else:
            spans.append(rope.span(chunk.start, chunk.end))
    return torch.cat(spans, dim=1)


class StepSender(Protocol):
    def send(self, step: StepInputs) -> None: ...
