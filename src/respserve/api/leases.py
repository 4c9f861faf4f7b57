"""Leases on the responses this process is running, so that replicas sharing a store can tell a response
whose replica died (`kill -9`, a lost host) from one still being generated.

Every stored response this process runs is leased to it (`replica`, `lease_expires` in the store) and the
lease is renewed every third of `--lease-seconds`. On the same beat each process marks failed the
unfinished responses whose lease ran out: whichever replica survives does it, within about one lease.
A SQLite store belongs to one process, so at its start every unfinished response is failed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from respserve.protocol.ids import new_id
from respserve.store.base import ResponseStore

logger = logging.getLogger(__name__)
EXPIRED_MESSAGE = "The replica running this response stopped before it finished."


class LeaseKeeper:
    def __init__(self, store: ResponseStore, lease_s: float) -> None:
        self.replica = new_id("replica")
        self._store = store
        self._lease_s = lease_s
        self._running: set[str] = set()
        self.beats = 0  # renew-and-sweep rounds done
        self._task: asyncio.Task[None] | None = None

    def hold(self, response_id: str) -> None:
        self._running.add(response_id)

    def release(self, response_id: str) -> None:
        self._running.discard(response_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception:  # a store hiccup must not end the renewals
                logger.exception("renewing leases failed")
            await asyncio.sleep(self._lease_s / 3)

    async def beat(self) -> None:
        """Renews this process's leases, then fails the responses whose replica stopped renewing."""
        now = int(time.time())
        await self._store.renew_leases(self.replica, sorted(self._running), now + int(self._lease_s) + 1)
        # Never leased (saved, then the replica died before its first renewal): failed once a lease has passed.
        failed = await self._store.fail_expired(now, now - int(self._lease_s) - 1, EXPIRED_MESSAGE)
        if failed:
            logger.warning("marked %d responses of stopped replicas as failed", failed)
        self.beats += 1
