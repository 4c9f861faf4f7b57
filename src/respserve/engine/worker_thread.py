"""What the text and the image worker share: a daemon thread serving a `RequestQueue` until it is stopped."""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar

from respserve.engine.request_queue import OutputStream, RequestQueue


class _Identified(Protocol):
    @property
    def request_id(self) -> str: ...


RequestT = TypeVar("RequestT", bound=_Identified)


class WorkerThread(Generic[RequestT]):
    """Subclasses own a pipeline and implement `_run`, which loops until `_stopping` is set."""

    def __init__(self, name: str, max_queued: int) -> None:
        self._queue: RequestQueue[RequestT] = RequestQueue(max_queued)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def num_queued(self) -> int:
        return self._queue.num_waiting

    def submit(self, request: RequestT) -> OutputStream:
        """Queues a request; its outputs arrive on the returned stream. Raises QueueFull at the bound."""
        return self._queue.submit(request.request_id, request)

    # ---- worker-thread side ----------------------------------------------------------------------------
    def _run(self) -> None:
        raise NotImplementedError
