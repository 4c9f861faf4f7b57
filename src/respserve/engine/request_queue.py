"""The way into a worker thread and back out, shared by the text and the image worker.

`RequestQueue.submit` (event loop) admits a request under the bound on waiting requests and returns its
`OutputStream`; the worker thread `receive`s arrivals, says how many stopped waiting with `left`, `emit`s
outputs through `channels`, and learns there which streams were closed early (`take_cancelled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from respserve.engine.generation import GenerationOutput

RequestT = TypeVar("RequestT")

# How long an idle worker waits for a request before it looks at its stop flag again.
IDLE_POLL_S = 0.5


class QueueFull(RuntimeError):
    """More requests are waiting than the worker accepts; the caller should retry later."""


@dataclass
class _Channel:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[GenerationOutput]


class OutputStream:
    """A request's outputs, in order, ending with the one whose status is final.

    Closing it before the end (the client went away) cancels the request inside the worker.
    """

    def __init__(self, channels: RequestChannels, request_id: str, channel: _Channel) -> None:
        self._channels = channels
        self._request_id = request_id
        self._channel = channel
        self._finished = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._finished:
            raise StopAsyncIteration
        output = await self._channel.outputs.get()
        if output.final_status.is_done:
            self._finished = True
            self._release()
        return output

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._channels.release(self._request_id, cancel=not self._finished)


class RequestChannels:
    """The open output streams of one worker, keyed by request id; safe to use from both sides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, _Channel] = {}
        self._cancelled: set[str] = set()

    def open(self, request_id: str) -> OutputStream:
        """Called on the event loop, before the request reaches the worker."""
        channel = _Channel(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._channels[request_id] = channel
        return OutputStream(self, request_id, channel)

    def release(self, request_id: str, cancel: bool) -> None:
        with self._lock:
            self._channels.pop(request_id, None)
            if cancel:
                self._cancelled.add(request_id)

    def take_cancelled(self) -> set[str]:
        """The requests whose streams closed early since the last call."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        return cancelled

    def emit(self, output: GenerationOutput) -> None:
        """Called on the worker thread."""
        with self._lock:
            channel = self._channels.get(output.request_id)
        if channel is None:
            return
        # A closed loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            channel.loop.call_soon_threadsafe(channel.outputs.put_nowait, output)


class RequestQueue(Generic[RequestT]):
    """Requests on their way to one worker thread, at most `max_waiting` of them not yet taken up."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.channels = RequestChannels()
        self._arrivals: queue.SimpleQueue[RequestT] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def submit(self, request_id: str, request: RequestT) -> OutputStream:
        """Called on the event loop; raises QueueFull at the bound."""
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
        stream = self.channels.open(request_id)
        self._arrivals.put(request)
        return stream

    def receive(self, block: bool) -> list[RequestT]:
        """Called on the worker thread: every request that arrived, waiting up to IDLE_POLL_S for one if
        `block`."""
        try:
            first = self._arrivals.get(timeout=IDLE_POLL_S) if block else self._arrivals.get_nowait()
        except queue.Empty:
            return []
        arrived = [first]
        while True:
            try:
                arrived.append(self._arrivals.get_nowait())
            except queue.Empty:
                return arrived

    def left(self, count: int) -> None:
        """Called on the worker thread: `count` received requests stopped waiting (started, dropped, failed)."""
        with self._lock:
            self._waiting -= count
