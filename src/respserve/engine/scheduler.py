"""What each step computes: one token for every decoding sequence, plus prompt chunks up to a budget.

Every scheduled piece is a `Chunk` of one sequence's tokens [start, end) whose KV is computed this step; it
samples a token when it reaches the end of what the sequence knows. Decoding sequences come first, so their
pace holds while a long prompt arrives: prompts are prefilled in chunks between decode steps, as many tokens
per step as keep the step short (prefill_budget.py; at most `max_prefill_tokens`). A waiting request is
admitted when the pool can hold its prompt (its cached prefix taken from the pool instead of computed).
When a decoding sequence needs a new block and none is left, the most recently admitted sequence is
preempted: its blocks go back, and it waits at the head of the queue to be recomputed (mostly from the
blocks it published, if they are still cached).

Gemma 3's image tokens attend to each other both ways (`Sequence.image_spans`): a chunk never ends inside
such a span, since the span's first tokens would need keys of its later ones that are not computed yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from respserve.engine.block_manager import BlockManager
from respserve.engine.prefill_budget import PrefillBudget
from respserve.engine.sequence import Sequence


@dataclass(frozen=True)
class Chunk:
    sequence: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == len(self.sequence.token_ids)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, max_prefill_tokens: int) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.prefill_budget = PrefillBudget(max_prefill_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.too_long: list[Sequence] = []  # sequences the whole pool cannot hold; the worker ends them
        self.preemptions = 0

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def schedule(self) -> list[Chunk]:
        chunks = self._decode_chunks()
        budget = self.prefill_budget.tokens(decoding=bool(chunks))
        for sequence in self.running:
            if budget <= 0:
                break
            if _is_prefilling(sequence):
                chunk = self._prefill_chunk(sequence, budget)
                chunks.append(chunk)
                budget -= chunk.end - chunk.start
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            sequence = self.waiting[0]
            if self.blocks.blocks_for(len(sequence.token_ids)) > self.blocks.num_blocks - 1:
                self.too_long.append(self.waiting.popleft())
                continue
            if not self.blocks.allocate(sequence):
                break
            self.waiting.popleft()
            self.running.append(sequence)
            if not sequence.output_ids:  # a first admission, not a preempted sequence's return
                sequence.cached_tokens = sequence.num_computed
            chunk = self._prefill_chunk(sequence, budget)
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        return chunks

    def computed(self, chunks: list[Chunk]) -> None:
        """Records that the step ran: the chunks' KV is in the pool, full blocks are published."""
        for chunk in chunks:
            chunk.sequence.num_computed = chunk.end
            self.blocks.publish(chunk.sequence)

    def finish(self, sequence: Sequence) -> None:
        """Takes a sequence out (finished, cancelled or failed) and frees its blocks."""
        if sequence in self.running:
            self.running.remove(sequence)
            self.blocks.free(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def _decode_chunks(self) -> list[Chunk]:
        decoding = [sequence for sequence in self.running if not _is_prefilling(sequence)]
        for sequence in decoding:
            if sequence in self.running:  # not preempted to make room for an earlier one
                self._make_room(sequence)
        return [Chunk(s, len(s.token_ids) - 1, len(s.token_ids)) for s in decoding if s in self.running]

    def _make_room(self, sequence: Sequence) -> None:
        """Gives `sequence` a slot for its next token, preempting the newest sequences as needed."""
        while not self.blocks.grow(sequence, len(sequence.token_ids)):
            victim = self.running[-1]
            if victim is not sequence:
                self._preempt(victim)
            elif len(self.running) > 1:
                self._preempt(sequence)
                return
            else:  # alone, and the pool still cannot hold it
                self.running.remove(sequence)
                self.blocks.free(sequence)
                self.too_long.append(sequence)
                return

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> Chunk:
        start = sequence.num_computed
        end = min(len(sequence.token_ids), start + budget)
        return Chunk(sequence, start, _whole_images(sequence.image_spans, start, end))

    def _preempt(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.blocks.free(sequence)
        self.waiting.appendleft(sequence)
        self.preemptions += 1


def _whole_images(spans: tuple[tuple[int, int], ...], start: int, end: int) -> int:
    """`end`, moved off the inside of an image attended both ways: back to the image's start when the chunk
    has tokens before it (the step keeps to its budget, which holds the decoding streams' pace; the next chunk
    starts with the image), else on to its end (the chunk starts at or inside the image, which can only be
    computed whole, however far past the budget: a chunk starting inside one is a prefix-cache hit, whose
    blocks were computed with the whole image, see block_manager.py)."""
    for first, last in spans:
        if first < end < last:
            return first if first > start else last
    return end


def _is_prefilling(sequence: Sequence) -> bool:
    return sequence.num_computed < len(sequence.token_ids) - 1
