"""Pure decode steps at static shapes, replayed as captured CUDA graphs.

On a GPU a decode step of a small model is mostly kernel launches: hundreds of small kernels whose launch
costs more than their work. A CUDA graph records a step's kernels once and replays them with one launch,
but only at fixed shapes and addresses, while an eager decode step's shapes change every step (its rows,
and the longest context its rows gather). So a pure decode step (every chunk one token that samples; no
images, no M-RoPE positions, no both-ways image spans) is padded to a bucket:

- rows to B, the first of 1, 2, 4, 8, then every 16 up to the worker's `max_running`: a decode step's
  matmuls cost about the same for 49 rows as for 64 (they read the weights once either way);
- the gathered context to W blocks, the longest row's blocks rounded up to a power of two. Each batch size
  then has only log2(longest context / block size) + 1 graphs (12 for 32k tokens of 16-token blocks), and
  padding at most doubles the KV the step gathers, never its matmuls. One width per block would mean
  thousands of graphs, a new one every 16 tokens of a long reply.

Each (B, W) owns its inputs at fixed addresses (`_Static`): token ids, positions and write slots [B], the
rows' context lengths [B] and block tables [B, W], as views of one tensor so a step fills them with one
host-to-device copy. The slots each row reads ([B, W * block]) are computed from the tables inside the
graph, so the copy is B x W numbers rather than B x W x 16. The `StepLayout` built on them goes to the
model exactly as an eager step's does: the attention and the pool's update do not know it is a graph.

A padded row (rows..B) has token 0 at position 0, length 1 and a table of NULL blocks, so it reads only the
zero block (which must stay zeros: attention pads with it), and it writes its KV into the scratch block:
the pool's last block, which the block manager never hands out (kv_cache.py), so no sequence's KV is ever
overwritten and the zero block stays zero.

Graphs are captured lazily, on a bucket's first use, with every row padding (so capturing touches no
sequence's KV): two warm-up runs on a side stream (cuBLAS handles, kernel selection), then the capture into
a memory pool all graphs share (their temporaries are the same kind, and only one replays at a time).
With `capture` off, the same static path runs eagerly, which is how the CPU tests check it. A model whose
forward cannot be captured (it syncs with the host) is logged once and runs eagerly from then on.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from respserve.engine.kv_cache import PagedKVCache
from respserve.engine.paged_attention import DecodeAttention, StepLayout, padded_tables, read_slots, slot_of

if TYPE_CHECKING:
    from respserve.engine.model_runner import StepInputs

logger = logging.getLogger(__name__)

_WARMUP_RUNS = 2


def graphs_apply(enabled: bool, device: torch.device, tensor_parallel: int) -> bool:
    """Whether decode steps are captured: on CUDA, when enabled, and not under tensor parallelism (whose
    collectives would need capturing across processes)."""
    return enabled and device.type == "cuda" and tensor_parallel == 1


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 below `max_batch`, and `max_batch` itself."""
    return [*(size for size in (1, 2, 4, 8) if size < max_batch), *range(16, max_batch, 16), max_batch]


def width_bucket(longest: int, block_size: int) -> int:
    """The blocks a step of contexts up to `longest` tokens gathers per row: a power of two."""
    blocks = -(-longest // block_size)
    return 1 << (blocks - 1).bit_length()


def is_pure_decode(step: StepInputs) -> bool:
    """Every chunk is one token that samples, and nothing needs the eager path's extras."""
    extras = (step.image_rows, step.mrope_positions, step.image_spans, step.deepstack_features)
    return (
        all(extra is None for extra in extras)
        and len(step.sampled_rows) == len(step.spans)
        and all(end - start == 1 for start, end in step.spans)
    )


@dataclass
class _Static:
    """One (B, W) bucket's inputs at fixed addresses: a step copies into them, its graph reads them."""

    inputs: torch.Tensor  # [B * (4 + W)]: the five views below, filled by one copy
    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B] where each row writes its KV
    lengths: torch.Tensor  # [B] each row's context, its new token included
    block_tables: torch.Tensor  # [B, W]
    logits: torch.Tensor | None = None  # [B, vocab], the graph's output (the last run's, eagerly)
    graph: Any = None  # torch.cuda.CUDAGraph, once captured

    @classmethod
    def empty(cls, batch: int, width: int, device: torch.device) -> _Static:
        inputs = torch.zeros(batch * (4 + width), dtype=torch.long, device=device)
        input_ids, positions, slots, lengths, tables = inputs.split([batch, batch, batch, batch, batch * width])
        return cls(inputs, input_ids, positions, slots, lengths, tables.view(batch, width))


class DecodeGraphs:
    """Runs pure decode steps through their (B, W) bucket: captured and replayed, or eagerly (`capture` off)."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        max_batch: int,
        capture: bool = True,
        decode_attention: DecodeAttention = "gather",
    ) -> None:
        if cache.scratch_block is None:
            raise ValueError("static decode steps need a pool with a scratch block for their padded rows")
        self.model = model
        self.cache = cache
        self.buckets = batch_buckets(max_batch)
        self.capture = capture
        self.decode_attention = decode_attention
        self.statics: dict[tuple[int, int], _Static] = {}
        self._pool: Any = None  # the graphs' shared memory pool, made at the first capture
        self._failed = False  # a capture failed: every step runs eagerly

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """Logits [rows, vocab] of a pure decode step; None for a step the caller runs eagerly."""
        rows = len(step.spans)
        if self._failed or rows > self.buckets[-1] or not is_pure_decode(step):
            return None
        batch = self.buckets[bisect.bisect_left(self.buckets, rows)]
        width = width_bucket(max(end for _, end in step.spans), self.cache.block_size)
        static = self.statics.get((batch, width))
        if static is None:
            static = self.statics[batch, width] = _Static.empty(batch, width, self.cache.keys[0].device)
        if self.capture and static.graph is None and not self._capture(static):
            return None
        static.inputs.copy_(self._host_inputs(step, batch, width))
        if static.graph is not None:
            static.graph.replay()
        else:
            static.logits = self._forward(static)
        assert static.logits is not None
        return static.logits[:rows].clone()  # the next replay overwrites the graph's output

    def _host_inputs(self, step: StepInputs | None, batch: int, width: int) -> torch.Tensor:
        """The step's rows, then padding rows (all of them when `step` is None), laid out as `_Static.inputs`."""
        size, scratch = self.cache.block_size, self.cache.scratch_block
        assert scratch is not None
        ids, positions, tables = (step.input_ids, step.positions, step.block_tables) if step else ([], [], [])
        pad = range(batch - len(tables))
        slots = [slot_of(table, position, size) for table, position in zip(tables, positions, strict=True)]
        head = [
            *ids,
            *(0 for _ in pad),
            *positions,
            *(0 for _ in pad),
            *slots,
            # Distinct scratch slots while padding < block size; a repeated one leaves only which garbage wins open.
            *(scratch * size + index % size for index in pad),
            *(position + 1 for position in positions),  # a row's context, its new token included
            *(1 for _ in pad),  # a padded row reads one slot: the zero block's first
        ]
        blocks = padded_tables([*tables, *([] for _ in pad)], width)  # a padded row's table: the zero block
        return torch.cat([torch.tensor(head, dtype=torch.long), blocks.view(-1)])

    def _forward(self, static: _Static) -> torch.Tensor:
        """One step over the static inputs: what a graph records and replays."""
        layout = static_layout(static, self.cache.block_size, self.decode_attention)
        ids, positions = static.input_ids[None], static.positions[None]
        common = {"position_ids": positions, "cache": self.cache, "use_cache": True, "paged_step": layout}
        return self.model(input_ids=ids, **common, logits_to_keep=0).logits[0]  # every row samples

    def _capture(self, static: _Static) -> bool:
        """Captures `static`'s graph with every row padding; False (and eager from now on) if it cannot be."""
        batch, width = static.block_tables.shape
        started = time.perf_counter()
        try:
            with torch.cuda.device(static.inputs.device):
                static.inputs.copy_(self._host_inputs(None, batch, width))
                current = torch.cuda.current_stream()
                side = torch.cuda.Stream()
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(_WARMUP_RUNS):
                        self._forward(static)
                current.wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                # thread_local: an image pipeline on another thread may allocate while this one captures
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    static.logits = self._forward(static)
        except Exception:  # a forward that syncs with the host, or out of memory: serving goes on eagerly
            logger.exception("capturing a decode step failed; decode steps run eagerly from now on")
            self._failed = True
            self.statics.clear()
            return False
        static.graph = graph
        logger.info(
            "captured a decode graph: %d rows x %d blocks, %.0f ms", batch, width, 1e3 * (time.perf_counter() - started)
        )
        return True


def static_layout(static: _Static, block_size: int, decode_attention: DecodeAttention = "gather") -> StepLayout:
    """The step layout over the static inputs; the slots each row reads are computed here, on the device,
    as `build_step_layout` computes them on the host: past a row's length, the zero block's first slot."""
    batch, width = static.block_tables.shape
    return StepLayout(
        slot_mapping=static.slot_mapping,
        single_rows=torch.arange(batch, device=static.block_tables.device),
        single_slots=read_slots(static.block_tables, static.lengths, block_size, width * block_size),
        single_lengths=static.lengths,
        single_tables=static.block_tables,
        chunks=[],
        block_size=block_size,
        decode_attention=decode_attention,
    )
