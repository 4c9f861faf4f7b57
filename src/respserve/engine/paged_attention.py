"""Attention over the paged KV pool, registered with transformers' `AttentionInterface`.

A step runs every scheduled token of every sequence as one flat row ([1, tokens]): decode tokens, and
chunks of prompts being prefilled. `StepLayout` says, once per step for all layers, where each token's KV
goes (`slot_mapping`) and which slots each query reads:

- single-query rows (a decode token, or a prompt whose last chunk is one token) are batched into one
  attention call: their slots gathered into [rows, longest, ...] and padded with the zero block, masked;
- multi-query chunks (prefill) are attended one chunk at a time, causally, over all their earlier tokens.

Gemma 3 lets the tokens of one image attend to each other both ways during prefill (transformers builds
that mask from `token_type_ids`): a chunk may carry `image_spans`, positions [first, last) of such images,
and a query inside one also reads every key of its span, later ones of the same chunk included; all else
stays causal, and a sliding-window layer still drops keys older than its window. The scheduler never ends a
chunk inside a span (scheduler.py), so a span's keys are all in the pool by the time its queries need them.
Decode rows never lie in a span, so the single-row path knows nothing of this.

Gathering copies the KV a step reads, on top of reading it, so the single-query rows have three ways
(`decode_attention`): "kernel", respserve's CPU kernel (float32, kernels/paged_attention.cpp), and "flex",
torch's flex attention (flex_decode.py, the default on CUDA), both reading each row's slots in place; and
"gather", the slots gathered and attended by SDPA, which runs anywhere. With "kernel", prompt chunks go
through a kernel of respserve's too (kernels/chunk_attention.cpp) unless they hold image spans; elsewhere
they are gathered for SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from respserve.engine.block_manager import NULL_BLOCK
from respserve.engine.flex_decode import decode_block_mask, flex_decode_attention, flex_decode_works, pad_rows
from respserve.engine.kv_cache import kv_shape

ATTENTION_NAME = "respserve_paged"

DecodeAttention = Literal["gather", "kernel", "flex"]  # how single-query rows attend (see the docstring)


def pick_decode_attention(
    setting: str, device: torch.device, dtype: torch.dtype, cpu_kernel: bool, text_config: Any, shards: int = 1
) -> DecodeAttention:
    """`--decode-attention`: "auto" is respserve's CPU kernel when it is loaded, flex attention on CUDA
    (one process) when it runs there, else gathering; "flex" and "gather" ask for those. A "flex" that does
    not run on this device is an error at start rather than a server that fails its first decode step."""
    if setting == "gather":
        return "gather"
    if setting == "auto" and cpu_kernel:
        return "kernel"
    if setting == "auto" and (device.type != "cuda" or shards > 1):
        return "gather"
    _, kv_heads, head_dim = kv_shape(text_config, shards)
    if flex_decode_works(device, dtype, int(text_config.num_attention_heads) // shards, kv_heads, head_dim):
        return "flex"
    if setting == "flex":
        raise RuntimeError(f"--decode-attention flex was asked for, but flex attention does not run on {device}")
    return "gather"


@dataclass
class PrefillChunk:
    """Queries [start, end) of the flat step attend to `slots` (the sequence's tokens up to `end`)."""

    start: int
    end: int
    slots: torch.Tensor  # [kv_len] long
    first_position: int  # the position of the chunk's first token
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # attended both ways (Gemma 3)
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[queries, kv_len] True where a query may attend; None for plain causal attention from position 0
        (SDPA's fast path). Built once per step for all layers of a kind."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = _chunk_mask(self, sliding_window)
        return self._masks[sliding_window]


@dataclass
class StepLayout:
    slot_mapping: torch.Tensor  # [tokens] where each token's KV is written
    single_rows: torch.Tensor  # [rows] flat indices of single-query rows
    single_slots: torch.Tensor  # [rows, longest] slots each row reads, NULL-padded
    single_lengths: torch.Tensor  # [rows] how many of those are real
    single_tables: torch.Tensor  # [rows, blocks] their block tables, NULL-padded
    chunks: list[PrefillChunk]
    block_size: int
    decode_attention: DecodeAttention = "gather"
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _flex_masks: dict[int | None, Any] = field(default_factory=dict)

    def single_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[rows, 1, 1, longest] True where a row may attend."""
        mask = self._masks.get(sliding_window)
        if mask is None:
            columns = torch.arange(self.single_slots.shape[1], device=self.single_slots.device)
            lengths = self.single_lengths[:, None]
            mask = columns < lengths
            if sliding_window is not None:
                mask &= columns >= lengths - sliding_window
            mask = mask[:, None, None, :]
            self._masks[sliding_window] = mask
        return mask

    def flex_mask(self, sliding_window: int | None, num_blocks: int) -> Any:
        """The rows' flex block mask over a pool of `num_blocks` blocks, rows padded (flex_decode.py)."""
        mask = self._flex_masks.get(sliding_window)
        if mask is None:
            tables, lengths = pad_rows(self.single_tables, self.single_lengths)
            mask = decode_block_mask(tables, lengths, self.block_size, num_blocks, sliding_window)
            self._flex_masks[sliding_window] = mask
        return mask


def build_step_layout(
    block_tables: list[list[int]],
    spans: list[tuple[int, int]],
    block_size: int,
    device: torch.device,
    image_spans: list[list[tuple[int, int]]] | None = None,
    decode_attention: DecodeAttention = "gather",
) -> StepLayout:
    """`spans[i]` = positions [start, end) of sequence i computed this step, its blocks `block_tables[i]`;
    `image_spans[i]`: the spans of sequence i attended both ways that overlap its chunk (None: none at all)."""
    offsets = torch.arange(block_size)
    slot_mapping: list[int] = []
    rows: list[int] = []
    row_tables: list[list[int]] = []
    row_lengths: list[int] = []
    chunks: list[PrefillChunk] = []
    flat = 0
    for index, (table, (start, end)) in enumerate(zip(block_tables, spans, strict=True)):
        both_ways = image_spans[index] if image_spans is not None else []
        if any(last > end for _, last in both_ways):  # its later keys would not be in the pool yet
            raise ValueError(f"a chunk ends at {end}, inside an image attended both ways: {both_ways}")
        if end - start == 1:  # its one slot; the slots it reads are gathered below, with the other rows'
            slot_mapping.append(slot_of(table, start, block_size))
            rows.append(flat)
            row_tables.append(table)
            row_lengths.append(end)
        else:
            slots = (torch.tensor(table)[:, None] * block_size + offsets).reshape(-1)[:end]
            slot_mapping.extend(slots[start:end].tolist())
            chunks.append(PrefillChunk(flat, flat + end - start, slots.to(device), start, list(both_ways)))
        flat += end - start
    longest = max(row_lengths, default=0)
    lengths = torch.tensor(row_lengths, dtype=torch.long)
    tables = padded_tables(row_tables, -(-longest // block_size))
    return StepLayout(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        single_rows=torch.tensor(rows, dtype=torch.long, device=device),
        single_slots=read_slots(tables, lengths, block_size, longest).to(device),
        single_lengths=lengths.to(device),
        single_tables=tables.to(device),
        chunks=chunks,
        block_size=block_size,
        decode_attention=decode_attention,
    )


def slot_of(table: list[int], position: int, block_size: int) -> int:
    """The pool slot of a sequence's token at `position`, through its block table."""
    return table[position // block_size] * block_size + position % block_size


def padded_tables(tables: list[list[int]], width: int) -> torch.Tensor:
    """[rows, width] the tables' first `width` blocks, the zero block past a table's end."""
    padded = torch.full((len(tables), width), NULL_BLOCK, dtype=torch.long)
    for index, table in enumerate(tables):
        padded[index, : len(table[:width])] = torch.tensor(table[:width], dtype=torch.long)
    return padded


def read_slots(tables: torch.Tensor, lengths: torch.Tensor, block_size: int, columns: int) -> torch.Tensor:
    """[rows, columns] the slots each single-query row reads: its blocks' slots up to its length. Past it, its
    last block holds slots never written (uninitialised memory, maybe NaN, which a zero attention weight
    would still turn into NaN): the zero block's first slot is read there instead."""
    offsets = torch.arange(block_size, device=tables.device)
    rows, width = tables.shape
    slots = (tables[:, :, None] * block_size + offsets).reshape(rows, width * block_size)[:, :columns]
    inside = torch.arange(columns, device=tables.device) < lengths[:, None]
    return torch.where(inside, slots, NULL_BLOCK * block_size)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    paged_step: StepLayout | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, head_dim]; key/value: this layer's pool [slots, kv_heads, head_dim].
    Returns [1, tokens, heads, head_dim], as transformers' own attention functions do. `scaling` is the
    model's (Gemma's query_pre_attn_scalar), passed on to SDPA."""
    if paged_step is None:
        raise RuntimeError("paged attention runs only inside the engine's model runner")
    if softcap is not None:  # unreachable for a model `refusal` let through, kept so no other gets it wrong
        raise ValueError("paged attention cannot softcap attention logits")
    step = paged_step
    _, heads, tokens, head_dim = query.shape
    single = _attend_single_rows(query, key, value, step, scaling, sliding_window) if step.single_rows.numel() else None
    if single is not None and single.shape[0] == tokens:  # a pure decode step: the rows are the whole step
        return single.unsqueeze(0), None
    out = query.new_empty(tokens, heads, head_dim)
    if single is not None:
        out[step.single_rows] = single
    for chunk in step.chunks:
        if step.decode_attention == "kernel" and _chunk_kernel_takes(chunk, head_dim):  # reads the pool in place
            queries = query[0, :, chunk.start : chunk.end, :].transpose(0, 1).contiguous()
            kernel = torch.ops.respserve.paged_chunk_attention
            out[chunk.start : chunk.end] = kernel(
                queries, key, value, chunk.slots, chunk.first_position, _scale(scaling, head_dim), sliding_window or 0
            )
            continue
        keys = key.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        values = value.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        queries = query[:, :, chunk.start : chunk.end, :]
        mask = chunk.mask(sliding_window)
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
        )
        out[chunk.start : chunk.end] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _scale(scaling: float | None, head_dim: int) -> float:
    """The softmax scale our kernels take: the model's, else SDPA's default."""
    return head_dim**-0.5 if scaling is None else scaling


def _chunk_kernel_takes(chunk: PrefillChunk, head_dim: int) -> bool:
    """Whether respserve's CPU kernel computes this chunk's attention (kernels/chunk_attention.cpp): plain
    causal attention, with or without a sliding window, at a head size it has vectors for. Image spans
    attended both ways keep SDPA and its mask."""
    return not chunk.image_spans and head_dim % 8 == 0 and head_dim <= 256


def _attend_single_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: StepLayout,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """The single-query rows, in one batched call over their gathered slots: [rows, heads, head_dim]."""
    whole_step = step.single_slots.shape[0] == query.shape[2]  # the rows are the step's tokens, in order
    queries = (query[0] if whole_step else query[0, :, step.single_rows, :]).transpose(0, 1)  # [rows, heads, D]
    if step.decode_attention == "kernel":  # reads the pool in place
        scale, window = _scale(scaling, query.shape[-1]), sliding_window or 0
        kernel = torch.ops.respserve.paged_decode_attention
        return kernel(queries.contiguous(), key, value, step.single_slots, step.single_lengths, scale, window)
    if step.decode_attention == "flex":  # reads the pool in place too
        mask = step.flex_mask(sliding_window, key.shape[0] // step.block_size)
        return flex_decode_attention(queries, key, value, mask, scaling)
    count, longest = step.single_slots.shape
    kv_heads, head_dim = key.shape[1], key.shape[2]
    flat_slots = step.single_slots.reshape(-1)
    keys = key.index_select(0, flat_slots).view(count, longest, kv_heads, head_dim).transpose(1, 2)
    values = value.index_select(0, flat_slots).view(count, longest, kv_heads, head_dim).transpose(1, 2)
    attended = F.scaled_dot_product_attention(
        queries.unsqueeze(2), keys, values, attn_mask=step.single_mask(sliding_window), scale=scaling, enable_gqa=True
    )
    return attended[:, :, 0, :]


def refusal(text_config: Any) -> str | None:
    """Why this attention cannot serve a model with `text_config`, or None: it neither softcaps attention
    logits (Gemma 2) nor attends both ways over the whole text (EmbeddingGemma)."""
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        return "softcaps its attention logits (attn_logit_softcapping), which the engine's paged attention cannot"
    if getattr(text_config, "use_bidirectional_attention", None):
        return "attends both ways over the whole text (use_bidirectional_attention); the engine's attention is causal"
    return None


def _chunk_mask(chunk: PrefillChunk, sliding_window: int | None) -> torch.Tensor | None:
    """None when plain causal attention from position 0 is right (SDPA's fast path)."""
    if chunk.first_position == 0 and sliding_window is None and not chunk.image_spans:
        return None
    device = chunk.slots.device
    query_positions = torch.arange(chunk.first_position, chunk.first_position + chunk.end - chunk.start, device=device)
    key_positions = torch.arange(chunk.slots.shape[0], device=device)
    mask = key_positions[None, :] <= query_positions[:, None]
    for first, last in chunk.image_spans:  # OR: a query inside an image reads all of it, later keys too
        queries_inside = (query_positions >= first) & (query_positions < last)
        keys_inside = (key_positions >= first) & (key_positions < last)
        mask |= queries_inside[:, None] & keys_inside[None, :]
    if sliding_window is not None:  # AND, after the OR: the window bounds image keys too, as in transformers
        mask &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return mask


AttentionInterface.register(ATTENTION_NAME, paged_attention)
