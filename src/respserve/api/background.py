"""Background responses: jobs that run apart from any HTTP connection, and the streams that follow them.

With a shared store (PostgreSQL) a job may run on another replica: its follower here reads the events that
replica records and wakes on the store's notifications (LISTEN/NOTIFY) rather than polling, and a cancel
here is sent to that replica the same way; it stops the generation at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from respserve.api.response_runner import ResponseRunner
from respserve.store.base import Channel, ResponseStore

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FOLLOW_POLL_S = 1.0  # a follower's wake-up at the latest, should a notification be lost
_REMOTE_CANCEL_S = 10.0


class BackgroundJobs:
    def __init__(self, store: ResponseStore) -> None:
        self._store = store
        self._runners: dict[str, ResponseRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._versions: dict[str, int] = {}
        self._remote: dict[str, asyncio.Event] = {}  # jobs of other replicas that someone here follows

    async def connect(self) -> None:
        """Hears the other replicas through a shared store: new events of their jobs, cancels of ours."""
        if self._store.shared:
            await self._store.listen(self._heard)

    def _heard(self, channel: Channel, response_id: str) -> None:  # on the event loop
        if channel == "cancel":
            if response_id in self._tasks:
                asyncio.ensure_future(self.cancel(response_id))
        elif response_id in self._remote:
            self._remote[response_id].set()

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

    async def cancel(self, response_id: str, owner: str | None = None) -> bool:
        """Cancels a queued or running job, here or (shared store) on another replica; False when none runs."""
        task = self._tasks.get(response_id)
        if task is None:
            return await self._cancel_elsewhere(response_id, owner)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def _cancel_elsewhere(self, response_id: str, owner: str | None) -> bool:
        if not self._store.shared or not await self._running_elsewhere(response_id, owner):
            return False
        await self._store.notify("cancel", response_id)
        deadline = asyncio.get_running_loop().time() + _REMOTE_CANCEL_S
        while asyncio.get_running_loop().time() < deadline:  # until the replica running it has recorded it
            if not await self._running_elsewhere(response_id, owner):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _running_elsewhere(self, response_id: str, owner: str | None) -> bool:
        resource = await self._store.get_response(response_id, owner)
        return resource is not None and resource["status"] in ("queued", "in_progress")

    async def shutdown(self) -> None:
        """Stops every job; each is recorded as failed, since it did not finish."""
        for runner in list(self._runners.values()):
            runner.interrupted_status = "failed"
        for response_id in list(self._tasks):
            await self.cancel(response_id)

    async def follow(self, response_id: str, starting_after: int, owner: str | None) -> AsyncIterator[str]:
        """Recorded events after `starting_after`, then the live ones, until the response ends."""
        last = starting_after
        while True:
            version = self._versions.get(response_id)
            local = self.is_running(response_id)
            wake = None if local or not self._store.shared else self._remote.setdefault(response_id, asyncio.Event())
            if wake is not None:
                wake.clear()  # before reading: a notification from now on is not missed
            running = local or (wake is not None and await self._running_elsewhere(response_id, owner))
            for number, event in await self._store.events_after(response_id, last):
                last = number
                yield event
                if json.loads(event)["type"] in TERMINAL_EVENTS:
                    return
            if not running:
                return
            if wake is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), _FOLLOW_POLL_S)
                continue
            condition = self._changed.get(response_id)
            if condition is None or self._versions.get(response_id) != version:
                continue
            async with condition:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(condition.wait(), _FOLLOW_POLL_S)
