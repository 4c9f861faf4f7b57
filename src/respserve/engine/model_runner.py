"""One forward pass over a scheduled step: every chunk's tokens as one flat row, KV into the paged pool.

The model is transformers' own; only its attention is ours (paged_attention.py), selected by name, and
its cache is the pool (kv_cache.py). Logits are computed only for the chunks that sample.

A step in which some chunk covers image placeholders (a vision-language prompt, vision.py) runs on input
embeddings instead of ids: the tokens' embeddings, with the image rows overwritten by the features the
vision encoder made at admission. Steps without images take the ids path unchanged.

Gemma 3's image tokens attend to each other both ways: a step carries, per sequence, the spans of such
images its chunk overlaps (`image_spans`, plain positions), which the paged attention reads.

Qwen3-VL's deepstack adds more image features (one set per deepstack vision layer) to the hidden states
after its first decoder layers, at the image rows: such a step also carries those rows' deepstack features
and passes them, with a mask of the image rows, to the language model (`visual_pos_masks`,
`deepstack_visual_embeds`). transformers' Qwen3-VL wrapper makes these two itself from pixel values and
takes neither from a caller, so that step calls the language model and the output head directly, which is
what the wrapper does.

An M-RoPE model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) reads three positions per token. When some sequence of the step has
them (an image prompt, vision.py's `RopePositions`), the step passes [3, 1, tokens] positions, the other
sequences' tokens at their index in all three; otherwise [1, tokens], which such a model spreads to all
three itself, as any other model takes it.

On CUDA a pure decode step goes through `graphs` (cuda_graphs.py): padded to a static shape and replayed as
a captured graph. Every other step, and every step without it, runs as described above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from respserve.engine.cuda_graphs import DecodeGraphs
from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.paged_attention import ATTENTION_NAME, DecodeAttention, build_step_layout
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
    deepstack_features: list[torch.Tensor] | None = None  # Qwen3-VL: [n, hidden] per layer, rows as image_rows
    # Per sequence, the image spans attended both ways (Gemma 3) that its chunk overlaps; None when none does
    image_spans: list[list[tuple[int, int]]] | None = None

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
        rows, features, deepstack = _image_rows(chunks)
        mrope = _mrope_positions(chunks)
        both_ways = _both_ways(chunks)
        return cls(
            input_ids, positions, tables, spans, sampled_rows, rows, features, mrope, deepstack, image_spans=both_ways
        )


class ModelRunner:
    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        device: torch.device,
        peers: StepSender | None = None,
        graphs: DecodeGraphs | None = None,
        decode_attention: DecodeAttention = "gather",
    ) -> None:
        self.model = model
        self.decode_attention = decode_attention  # how decode rows attend (paged_attention.py)
        self.cache = cache
        self.device = device
        self.peers = peers  # tensor-parallel processes that run every step beside this one
        self.graphs = graphs  # pure decode steps at static shapes (CUDA graphs)
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
        if self.graphs is not None and (logits := self.graphs.run(step)) is not None:
            return logits
        layout = build_step_layout(
            step.block_tables, step.spans, self.cache.block_size, self.device, step.image_spans, self.decode_attention
        )
        input_ids = torch.tensor([step.input_ids], device=self.device)
        tokens: dict[str, Any] = {"input_ids": input_ids}
        if step.image_rows is not None and step.image_features is not None:
            rows = step.image_rows.to(self.device)
            embeds = self.model.get_input_embeddings()(input_ids)
            embeds[0, rows] = step.image_features.to(embeds.dtype)
            tokens = {"inputs_embeds": embeds}
            if step.deepstack_features:
                mask = torch.zeros_like(input_ids, dtype=torch.bool)
                mask[0, rows] = True  # rows ascend, so the mask's order is the features' order
                tokens["visual_pos_masks"] = mask
                tokens["deepstack_visual_embeds"] = [layer.to(self.device) for layer in step.deepstack_features]
        if step.mrope_positions is None:
            positions = torch.tensor([step.positions], device=self.device)
        else:  # (temporal, height, width) x batch 1 x tokens
            positions = step.mrope_positions[:, None, :].to(self.device)
        kept = torch.tensor(step.sampled_rows, dtype=torch.long, device=self.device)
        common = {"position_ids": positions, "cache": self.cache, "use_cache": True, "paged_step": layout}
        if "deepstack_visual_embeds" in tokens:  # see the module's docstring
            hidden = self.model.get_decoder()(**tokens, **common).last_hidden_state
            return self.model.get_output_embeddings()(hidden[0, kept])
        return self.model(**tokens, **common, logits_to_keep=kept).logits[0]


def _image_rows(
    chunks: list[Chunk],
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor] | None]:
    """The flat rows of the step that hold image placeholders, their features, and their deepstack features
    per layer (Qwen3-VL; else None); all None if no row holds one."""
    rows: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    deepstack: list[tuple[torch.Tensor, ...]] = []
    flat = 0
    for chunk in chunks:
        images = chunk.sequence.images
        if images is not None:
            offsets, chunk_features, chunk_deepstack = images.rows(chunk.start, chunk.end)
            rows.append(offsets + flat)
            features.append(chunk_features)
            deepstack.append(chunk_deepstack)
        flat += chunk.end - chunk.start
    if not rows or not sum(len(offsets) for offsets in rows):
        return None, None, None
    # One model per engine: every image sequence has the same deepstack layers (none, or all of them).
    layers = [torch.cat(layer) for layer in zip(*deepstack, strict=True)]
    return torch.cat(rows), torch.cat(features), layers or None


def _both_ways(chunks: list[Chunk]) -> list[list[tuple[int, int]]] | None:
    """Per chunk, the spans of its sequence's images attended both ways that it overlaps; None if none does."""
    overlaps = [
        [(first, last) for first, last in chunk.sequence.image_spans if first < chunk.end and last > chunk.start]
        for chunk in chunks
    ]
    return overlaps if any(overlaps) else None


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
