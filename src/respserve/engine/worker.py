"""The pipeline worker: a thread that owns the model and the device, away from the event loop.

It batches continuously: each step first admits waiting requests (one left-padded prefill for the group,
whose cache rows then join the running batch), then advances every running sequence by one token in a
single forward pass. A sequence that finishes leaves the batch at once, its output already handed to the
event loop; a cancelled one (its client went away) leaves at the next step and its KV rows are freed.

Why a scheduler of our own over a left-padded cache (kv_cache.py) rather than transformers' continuous
batching: per-request sampling, grammars and logprobs stay ours, and it measured faster here. SmolLM2 on the
2-core CPU, float32, streaming through the server against `transformers serve --continuous-batching`
(scripts/bench.py, 2026-11-23): 17.2 vs 14.7 output tokens/s at 1 stream, 50.2 vs 43.9 at 8, 122.3 vs 89.4
at 32; with the weights prepacked for oneDNN (packed_linear.py), x1.15-1.36 at 1 stream, x1.46-1.64 at 8
and x1.61-1.94 at 32 over two runs; with the prefix cache too (prefix_cache.py), x1.20, x1.83 and x2.38,
TTFT p50 0.28-0.69x.

A thread, not a process: torch releases the GIL inside its kernels, so the event loop keeps answering
while a step runs (/health p99 9-15 ms with 32 streams in that benchmark), and outputs need no
serialisation.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from respserve.engine.generation import GenerationOutput, GenerationRequest, GenerationStatus
from respserve.engine.kv_cache import BatchKVCache, empty_batch
from respserve.engine.sampler import Sample, Sampler
from respserve.engine.sequence import Sequence
from respserve.engine.text_pipeline import TextPipeline
from respserve.engine.worker_thread import WorkerThread

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLimits:
    max_running: int = 64  # sequences decoded together
    max_queued: int = 256  # requests waiting for a slot
    max_prefill_tokens: int = 4096  # padded prompt tokens in one prefill pass (at least one prompt)


class PipelineWorker(WorkerThread[GenerationRequest]):
    def __init__(self, pipeline: TextPipeline, limits: WorkerLimits | None = None) -> None:
        self.limits = limits or WorkerLimits()
        super().__init__("respserve-worker", self.limits.max_queued)
        self.pipeline = pipeline
        self._sampler = Sampler(pipeline.grammars)
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[Sequence] = []
        self._batch: BatchKVCache = empty_batch(pipeline.num_layers, pipeline.device)
        self.restarts = 0

    # ---- event-loop side -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_cache_tokens(self) -> int:
        return self._batch.batch_size * self._batch.length

    @property
    def gpu_memory_bytes(self) -> int:
        device = self.pipeline.device
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    # ---- worker-thread side ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception as exc:  # a bug past the per-request guards: start over, keep serving
                logger.exception("the worker crashed; failing its in-flight requests and restarting")
                self._restart(exc)

    def _step(self) -> None:
        self._receive(block=not self._running and not self._waiting)
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode_step()

    def _restart(self, exc: Exception) -> None:
        """Fails every request in flight (running or waiting) and resets the batch. Built from request ids
        alone: whatever broke may have broken the sequences too."""
        failed = [sequence.request_id for sequence in self._running] + [r.request_id for r in self._waiting]
        for request_id in failed:
            self._emit(GenerationOutput(request_id, final_status=GenerationStatus.FAILED, error=str(exc)))
        self._queue.left(len(self._waiting))
        self._running, self._waiting = [], deque()
        self._batch = empty_batch(self.pipeline.num_layers, self.pipeline.device)
        self.restarts += 1

    def _receive(self, block: bool) -> None:
        self._waiting.extend(self._queue.receive(block))

    def _admit(self) -> None:
        """Prefills as many waiting requests as fit, as one group, and joins them to the running batch."""
        group: list[GenerationRequest] = []
        longest = 0
        while self._waiting and len(self._running) + len(group) < self.limits.max_running:
            longest_if_added = max(longest, len(self._waiting[0].prompt_token_ids))
            if group and longest_if_added * (len(group) + 1) > self.limits.max_prefill_tokens:
                break
            group.append(self._waiting.popleft())
            longest = longest_if_added
        if not group:
            return
        self._queue.left(len(group))
        pipeline = self.pipeline
        try:
            sequences = [
                Sequence(request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts)
                for request in group
            ]
            logits, group_batch = pipeline.prefill(sequences)
            sample = self._sampler.sample(logits, [sequence.sampling_row for sequence in sequences])
        except Exception as exc:  # a bad group must not take the worker down
            logger.exception("prefill failed for %d requests", len(group))
            for request in group:
                self._emit(GenerationOutput(request.request_id, final_status=GenerationStatus.FAILED, error=str(exc)))
            return
        self._advance(sequences, sample)
        kept = [row for row, sequence in enumerate(sequences) if not sequence.status.is_done]
        if kept:
            group_batch.keep_rows(kept)
            self._batch.extend(group_batch)
            self._running.extend(sequences[row] for row in kept)

    def _decode_step(self) -> None:
        try:
            logits = self.pipeline.decode(self._batch, self._running)
            sample = self._sampler.sample(logits, [sequence.sampling_row for sequence in self._running])
        except Exception as exc:
            logger.exception("decode step failed for %d sequences", len(self._running))
            for sequence in self._running:
                self._fail(sequence, exc)
            self._keep(lambda sequence: False)
            return
        self._advance(self._running, sample)
        self._keep(lambda sequence: not sequence.status.is_done)

    def _advance(self, sequences: list[Sequence], sample: Sample) -> None:
        for sequence, token, logprobs in zip(sequences, sample.tokens, sample.logprobs, strict=True):
            try:
                output = sequence.append(token, self.pipeline.eos_token_ids, logprobs)
            except Exception as exc:  # this request fails; the rest of the batch goes on
                logger.exception("request %s failed", sequence.request_id)
                self._fail(sequence, exc)
                continue
            self._emit(output)

    def _drop_cancelled(self) -> None:
        cancelled = self._queue.channels.take_cancelled()
        if not cancelled:
            return
        waiting = [request for request in self._waiting if request.request_id not in cancelled]
        self._queue.left(len(self._waiting) - len(waiting))
        self._waiting = deque(waiting)
        for sequence in self._running:
            if sequence.request_id in cancelled:
                sequence.status = GenerationStatus.CANCELLED
                self._emit(sequence.output())
        self._keep(lambda sequence: not sequence.status.is_done)

    def _keep(self, predicate: Callable[[Sequence], bool]) -> None:
        """Keeps the running sequences that satisfy `predicate`; the others' KV rows are freed."""
        rows = [row for row, sequence in enumerate(self._running) if predicate(sequence)]
        if len(rows) == len(self._running):
            return
        self._batch.keep_rows(rows)
        self._running = [self._running[row] for row in rows]

    def _fail(self, sequence: Sequence, exc: Exception) -> None:
        sequence.status = GenerationStatus.FAILED
        self._emit(sequence.output(error=f"{type(exc).__name__}: {exc}"))

    def _emit(self, output: GenerationOutput) -> None:
        self._queue.channels.emit(output)
