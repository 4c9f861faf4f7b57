"""Background responses: jobs that run apart from any HTTP connection, and the streams that follow them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from respserve.api.response_runner import ResponseRunner
from respserve.store.base import ResponseStore

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FOLLOW_POLL_S = 1.0


class BackgroundJobs:
    def __init__(self, store: ResponseStore) -> None:
        self._store = store
        self._runners: dict[str, ResponseRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._versions: dict[str, int] = {}

    def start(self, runner: ResponseRunner) -> None:
        response_id = runner.response_id
        self._runners[response_id] = runner
        self._changed[response_id] = asyncio.Condition()
        self._versions[response_id] = 0
        self._tasks[response_id] = asyncio.create_task(self._drive(runner))

    def is_running(self, response_id: str) -> bool:
        return response_id in self._tasks

    async def _drive(self, runner: ResponseRunner) -> None:
        response_id = runner.response_id
        try:
            async for _ in runner.events():
                await self._notify(response_id)
        finally:
            self._tasks.pop(response_id, None)
            self._runners.pop(response_id, None)
            await self._notify(response_id)
            self._changed.pop(response_id, None)
            self._versions.pop(response_id, None)

    async def _notify(self, response_id: str) -> None:
        condition = self._changed.get(response_id)
        if condition is None:
            return
        self._versions[response_id] = self._versions.get(response_id, 0) + 1
        async with condition:
            condition.notify_all()

    async def cancel(self, response_id: str) -> bool:
        """Cancels a queued or running job; False when there is none."""
        task = self._tasks.get(response_id)
        if task is None:
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def shutdown(self) -> None:
        """Stops every job; each is recorded as failed, since it did not finish."""
        for runner in list(self._runners.values()):
            runner.interrupted_status = "failed"
        for response_id in list(self._tasks):
            await self.cancel(response_id)

    async def follow(self, response_id: str, starting_after: int) -> AsyncIterator[str]:
        """Recorded events after `starting_after`, then the live ones, until the response ends."""
        last = starting_after
        while True:
            version = self._versions.get(response_id)
            running = self.is_running(response_id)
            for number, event in await asyncio.to_thread(self._store.events_after, response_id, last):
                last = number
                yield event
                if json.loads(event)["type"] in TERMINAL_EVENTS:
                    return
            if not running:
                return
            condition = self._changed.get(response_id)
            if condition is None or self._versions.get(response_id) != version:
                continue
            async with condition:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(condition.wait(), _FOLLOW_POLL_S)
