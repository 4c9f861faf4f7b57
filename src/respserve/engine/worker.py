"""The pipeline worker: a thread that owns the model and the device, away from the event loop.

It batches continuously: each step the scheduler picks one token for every decoding sequence and prompt
chunks for the newly arrived (scheduler.py), the model runner computes them in one forward pass over the
paged KV pool (model_runner.py), and the sampler picks the next token of every chunk that reached the end
of its sequence. A sequence that finishes leaves at once, its output already handed to the event loop and
its blocks released (published ones stay cached for later prompts that start the same way); a cancelled
one (its client went away) leaves at the next step.

A thread, not a process: torch releases the GIL inside its kernels, so the event loop keeps answering
while a step runs (/health p99 9-15 ms with 32 streams in scripts/bench.py), and outputs need no
serialisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from respserve.engine.block_manager import BlockManager
from respserve.engine.cpu_threads import CpuThreads
from respserve.engine.cuda_graphs import DecodeGraphs, graphs_apply
from respserve.engine.generation import GenerationOutput, GenerationRequest, GenerationStatus
from respserve.engine.kv_cache import PagedKVCache, kv_budget_bytes, kv_bytes_per_token
from respserve.engine.model_runner import ModelRunner
from respserve.engine.paged_attention import pick_decode_attention
from respserve.engine.sampler import Sample, Sampler
from respserve.engine.scheduler import Chunk, Scheduler
from respserve.engine.sequence import Sequence
from respserve.engine.tensor_parallel import TensorParallelGroup
from respserve.engine.text_pipeline import TextPipeline
from respserve.engine.vision import encode_images, rope_positions
from respserve.engine.worker_thread import WorkerThread

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerLimits:
    max_running: int = 64  # sequences decoded together
    max_queued: int = 256  # requests waiting for a slot
    max_prefill_tokens: int = 512  # prompt tokens prefilled per step, beside the decode tokens
    kv_cache_memory: str = "auto"  # the KV pool's size (kv_cache.kv_budget_bytes)
    block_size: int = 16  # token slots per KV block
    cuda_graphs: bool = True  # on CUDA, decode steps replayed as captured graphs (cuda_graphs.py)
    decode_attention: str = "auto"  # auto, flex or gather (paged_attention.pick_decode_attention)
    # Small steps leave a core free (cpu_threads.py). torch's thread count is the whole process's, so not
    # when image pipelines run in the same process.
    spare_a_core: bool = True


class PipelineWorker(WorkerThread[GenerationRequest]):
    def __init__(
        self, pipeline: TextPipeline, limits: WorkerLimits | None = None, peers: TensorParallelGroup | None = None
    ) -> None:
        self.limits = limits or WorkerLimits()
        super().__init__("respserve-worker", self.limits.max_queued)
        self.pipeline = pipeline
        self._sampler = Sampler(pipeline.grammars)
        config, dtype, size = pipeline.model.config.get_text_config(), pipeline.dtype, self.limits.block_size
        shards = pipeline.tensor_parallel
        block_bytes = kv_bytes_per_token(config, dtype, shards) * size
        num_blocks = kv_budget_bytes(self.limits.kv_cache_memory, pipeline.device) // block_bytes
        graphs = graphs_apply(self.limits.cuda_graphs, pipeline.device, shards)
        attention = pick_decode_attention(
            self.limits.decode_attention, pipeline.device, dtype, pipeline.cpu_kernels, config, shards
        )
        self.kv_cache = PagedKVCache(
            config, num_blocks, size, dtype, pipeline.device, shards, scratch=graphs, zeroed=attention == "flex"
        )
        self._peers = peers
        if peers is not None:
            peers.share_pool_size(num_blocks, size)
        decode_graphs = (
            DecodeGraphs(pipeline.model, self.kv_cache, self.limits.max_running, decode_attention=attention)
            if graphs
            else None
        )
        self._runner = ModelRunner(pipeline.model, self.kv_cache, pipeline.device, peers, decode_graphs, attention)
        self._threads = CpuThreads(pipeline.device, spare_a_core=self.limits.spare_a_core and peers is None)
        self.scheduler = self._new_scheduler()
        # A prompt must leave room in the pool for at least one output token.
        pipeline.context_length = min(pipeline.context_length, (self.kv_cache.managed_blocks - 1) * size - 1)
        logger.info(
            "KV cache: %d blocks of %d tokens, %.2f GiB; decode attention: %s",
            num_blocks,
            size,
            self.kv_cache.num_bytes / 2**30,
            attention,
        )
        self.restarts = 0

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self._threads.restore()  # for whatever runs next in this process (tests serve many times)
        if self._peers is not None:  # after the worker thread, which is the only other user of the group
            self._peers.close()

    def _new_scheduler(self) -> Scheduler:
        blocks = BlockManager(self.kv_cache.managed_blocks, self.kv_cache.block_size)
        return Scheduler(blocks, self.limits.max_running, self.limits.max_prefill_tokens)

    # ---- event-loop side -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def kv_cache_tokens(self) -> int:
        """Token slots held by running sequences."""
        return self.scheduler.blocks.num_used * self.kv_cache.block_size

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
        scheduler = self.scheduler
        idle = not scheduler.running and not scheduler.waiting
        if idle:
            self._threads.idle()
        self._receive(block=idle)
        self._drop_cancelled()
        chunks = scheduler.schedule()
        for sequence in scheduler.too_long:
            self._started([sequence])
            self._fail(sequence, RuntimeError("the KV cache cannot hold this sequence"))
        scheduler.too_long.clear()
        if chunks:
            self._run_step(chunks)

    def _restart(self, exc: Exception) -> None:
        """Fails every request in flight (running or waiting) and resets the pool's bookkeeping. Built from
        request ids alone: whatever broke may have broken the sequences too."""
        scheduler = self.scheduler
        failed = [sequence.request_id for sequence in [*scheduler.running, *scheduler.waiting]]
        for request_id in failed:
            self._emit(GenerationOutput(request_id, final_status=GenerationStatus.FAILED, error=str(exc)))
        self._queue.left(sum(1 for sequence in scheduler.waiting if not sequence.started))
        self.scheduler = self._new_scheduler()
        self.restarts += 1

    def _receive(self, block: bool) -> None:
        """Turns arrivals into sequences (a bad grammar or image fails only its own request) and queues them."""
        pipeline = self.pipeline
        for request in self._queue.receive(block):
            try:
                sequence = Sequence(
                    request, pipeline.tokenizer, pipeline.vocab_size, pipeline.grammars, pipeline.token_texts
                )
                if request.vision is not None:  # once per request; prefill chunks take their rows from it
                    sequence.images = encode_images(pipeline.model, request.vision)
                    sequence.rope_positions = rope_positions(pipeline.model, request.vision, request.prompt_token_ids)
            except Exception as exc:
                logger.exception("request %s could not start", request.request_id)
                self._queue.left(1)
                self._emit(GenerationOutput(request.request_id, final_status=GenerationStatus.FAILED, error=str(exc)))
                continue
            self.scheduler.add(sequence)

    def _run_step(self, chunks: list[Chunk]) -> None:
        self._started(chunk.sequence for chunk in chunks)
        sampling = [chunk.sequence for chunk in chunks if chunk.samples]
        tokens = sum(chunk.end - chunk.start for chunk in chunks)
        self._threads.for_step(tokens)
        started = time.perf_counter()
        try:
            logits = self._runner.run(chunks)
            sample = self._sampler.sample(logits, [sequence.sampling_row for sequence in sampling])
        except Exception as exc:
            logger.exception("a step failed for %d sequences", len(chunks))
            for sequence in {id(chunk.sequence): chunk.sequence for chunk in chunks}.values():
                self._fail(sequence, exc)
            return
        decode_rows = sum(1 for chunk in chunks if chunk.end - chunk.start == 1)
        prefill_tokens = tokens - decode_rows
        self.scheduler.prefill_budget.observe(decode_rows, prefill_tokens, time.perf_counter() - started)
        self.scheduler.computed(chunks)
        self._advance(sampling, sample)

    def _advance(self, sequences: list[Sequence], sample: Sample) -> None:
        for sequence, token, logprobs in zip(sequences, sample.tokens, sample.logprobs, strict=True):
            try:
                output = sequence.append(token, self.pipeline.eos_token_ids, logprobs)
            except Exception as exc:  # this request fails; the rest of the batch goes on
                logger.exception("request %s failed", sequence.request_id)
                self._fail(sequence, exc)
                continue
            self._emit(output)
            if sequence.status.is_done:
                self.scheduler.finish(sequence)

    def _drop_cancelled(self) -> None:
        cancelled = self._queue.channels.take_cancelled()
        if not cancelled:
            return
        scheduler = self.scheduler
        for sequence in [*scheduler.running, *scheduler.waiting]:
            if sequence.request_id in cancelled:
                self._started([sequence])
                sequence.status = GenerationStatus.CANCELLED
                self._emit(sequence.output())
                scheduler.finish(sequence)

    def _started(self, sequences: Iterable[Sequence]) -> None:
        """Sequences that stop counting against `max_queued` (admitted, or ended before it)."""
        count = 0
        for sequence in sequences:
            if not sequence.started:
                sequence.started = True
                count += 1
        if count:
            self._queue.left(count)

    def _fail(self, sequence: Sequence, exc: Exception) -> None:
        sequence.status = GenerationStatus.FAILED
        self._emit(sequence.output(error=f"{type(exc).__name__}: {exc}"))
        self.scheduler.finish(sequence)

    def _emit(self, output: GenerationOutput) -> None:
        self._queue.channels.emit(output)
