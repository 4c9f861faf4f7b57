"""The pipeline worker: a thread that owns the model and the device, away from the event loop.

Requests come in through a thread-safe inbox; each step admits new requests (prefill), then advances
every running sequence by one token, and hands each request's `GenerationOutput` back to the event loop
that asked for it. A request whose consumer goes away is cancelled and leaves at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from respserve.engine.generation import GenerationOutput, GenerationRequest, GenerationStatus
from respserve.engine.sampler import Sampler
from respserve.engine.sequence import Sequence
from respserve.engine.text_pipeline import TextPipeline

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5


@dataclass
class _Channel:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[GenerationOutput]


class PipelineWorker:
    def __init__(self, pipeline: TextPipeline) -> None:
        self.pipeline = pipeline
        self._sampler = Sampler(pipeline.device)
        self._inbox: queue.SimpleQueue[GenerationRequest] = queue.SimpleQueue()
        self._channels: dict[str, _Channel] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._running: list[Sequence] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="respserve-worker", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Submits a request and yields its outputs; leaving early cancels it inside the worker."""
        channel = _Channel(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._channels[request.request_id] = channel
        self._inbox.put(request)
        finished = False
        try:
            while not finished:
                output = await channel.outputs.get()
                finished = output.final_status.is_done
                yield output
        finally:
            with self._lock:
                self._channels.pop(request.request_id, None)
                if not finished:
                    self._cancelled.add(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    # ---- worker-thread side ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._admit(block=not self._running)
            self._drop_cancelled()
            if self._running:
                self._decode_step()

    def _admit(self, block: bool) -> None:
        try:
            request = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._prefill(request)
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _prefill(self, request: GenerationRequest) -> None:
        sequence = Sequence(request, self.pipeline.tokenizer, self.pipeline.vocab_size)
        try:
            logits = self.pipeline.prefill(sequence)
            token = int(self._sampler.sample(logits, [sequence.sampling_row])[0])
        except Exception as exc:  # one bad request must not take the worker down
            logger.exception("prefill failed for %s", request.request_id)
            self._fail(sequence, exc)
            return
        self._emit(sequence.append(token, self.pipeline.eos_token_ids))
        if not sequence.status.is_done:
            self._running.append(sequence)

    def _decode_step(self) -> None:
        batch = list(self._running)
        try:
            logits = self.pipeline.decode(batch)
            tokens = self._sampler.sample(logits, [sequence.sampling_row for sequence in batch]).tolist()
        except Exception as exc:
            logger.exception("decode step failed for %d sequences", len(batch))
            for sequence in batch:
                self._fail(sequence, exc)
            self._running = []
            return
        for sequence, token in zip(batch, tokens, strict=True):
            self._emit(sequence.append(token, self.pipeline.eos_token_ids))
        self._running = [sequence for sequence in batch if not sequence.status.is_done]

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
        kept = []
        for sequence in self._running:
            if sequence.request_id in cancelled:
                sequence.status = GenerationStatus.CANCELLED
                sequence.cache = None  # frees its KV memory now
                self._emit(sequence.output())
            else:
                kept.append(sequence)
        self._running = kept

    def _fail(self, sequence: Sequence, exc: Exception) -> None:
        sequence.status = GenerationStatus.FAILED
        sequence.cache = None
        self._emit(sequence.output(error=f"{type(exc).__name__}: {exc}"))

    def _emit(self, output: GenerationOutput) -> None:
        with self._lock:
            channel = self._channels.get(output.request_id)
        if channel is None:
            return
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            channel.loop.call_soon_threadsafe(channel.outputs.put_nowait, output)
