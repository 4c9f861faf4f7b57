"""The load of scripts/scale_test.py: respserve replicas as processes, and clients that run
`previous_response_id` chains and background jobs across them while one replica may be killed."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import free_port, spawn_server  # noqa: E402

TERMINAL = {"response.completed", "response.incomplete", "response.failed", "response.cancelled"}
FINISHED = {"completed", "incomplete"}
TURNS = 3
JOB_EVENTS_BEFORE_LEAVING = 3
DEAD_REPLICA_SETTLES_S = 30.0  # the goal: nothing a killed replica ran is in progress this long after


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    alive: bool = True

    def kill(self) -> None:
        """`kill -9`: no shutdown, no lease released; the survivors must notice by themselves."""
        self.alive = False
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_replicas(count: int, data_root: Path, *flags: str) -> list[Replica]:
    """`count` replicas named A, B, ..., each with its own data dir, started side by side."""
    names = [chr(ord("A") + index) for index in range(count)]
    ports = {name: free_port() for name in names}
    with ThreadPoolExecutor(count) as pool:
        futures = {name: pool.submit(spawn_server, ports[name], data_root / name, *flags) for name in names}
    started = {name: future.result() for name, future in futures.items() if future.exception() is None}
    if len(started) < count:
        for process in started.values():
            process.kill()
        raise RuntimeError("a replica did not start")
    return [Replica(name, started[name], f"http://127.0.0.1:{ports[name]}") for name in names]


def end_token() -> int:
    """The served model's end token: a `logit_bias` of +100 on it ends a reply at its first token, −100
    makes it run to `max_output_tokens`, on any CPU (as the tests' `never_ends` does)."""
    from transformers import AutoTokenizer

    from respserve.config import load_settings
    from respserve.engine.model_source import EMBEDDED_MODEL, resolve_model_source

    source = resolve_model_source(EMBEDDED_MODEL, load_settings().cache_dir)
    return AutoTokenizer.from_pretrained(source.path).eos_token_id


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Tally:
    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (replica, HTTP status)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (replica, exception type)
    counts: Counter[str] = field(default_factory=Counter)
    started: set[str] = field(default_factory=set)  # every response id a client saw created
    finished: dict[str, str] = field(default_factory=dict)  # id -> completed / incomplete
    made_by: dict[str, str] = field(default_factory=dict)  # id -> replica
    # GET /v1/responses/{id} under load, while every replica served, and after one was killed.
    store_ms: list[float] = field(default_factory=list)
    store_ms_after_kill: list[float] = field(default_factory=list)


def summary(event: dict[str, Any]) -> dict[str, Any]:
    """What a client keeps of an event: its type, number and response id and status, never model text."""
    response = event.get("response") or {}
    return {
        "type": event["type"],
        "sequence_number": event.get("sequence_number"),
        "id": response.get("id"),
        "status": response.get("status"),
    }


class LoadRun:
    """Clients against `replicas`. With `alternate`, a chain's turns and a job's resume go to the next
    replica each time (shared store); without, each client stays on one (SQLite replicas share nothing)."""

    def __init__(self, replicas: list[Replica], job_tokens: int, job_share: float, alternate: bool) -> None:
        self.replicas = replicas
        self.job_share = job_share
        self.alternate = alternate
        self.tally = Tally()
        self.killed_at = 0.0
        # Filled once A is killed: what it left unfinished, and how much of it was still in progress
        # DEAD_REPLICA_SETTLES_S later (or how soon none was).
        self.dead_left: frozenset[str] = frozenset()
        self.dead_stuck: int | None = None
        self.dead_settled_after_s: float | None = None
        self._http: httpx.AsyncClient | None = None  # the clients' connection pool, while drive() runs
        end = str(end_token())
        self._turn = {"max_output_tokens": 16, "temperature": 0, "logit_bias": {end: 100}, "stream": True}
        self._job = {
            "input": "Count from one to one thousand.",
            "max_output_tokens": job_tokens,
            "temperature": 0,
            "logit_bias": {end: -100},
            "background": True,
            "stream": True,
        }

    def pick(self, index: int) -> Replica:
        """The replica at `index` (round the list), or a live one once it has been killed."""
        replica = self.replicas[index % len(self.replicas)]
        return replica if replica.alive else next(other for other in self.replicas if other.alive)

    def finished_on(self, replica: Replica) -> list[str]:
        return [id_ for id_ in self.tally.finished if self.tally.made_by.get(id_) == replica.name]

    async def drive(self, clients: int, seconds: float, kill_after_s: float | None) -> None:
        size = 2 * clients + 16
        # Idle connections are dropped well before uvicorn's 5 s keep-alive closes them: a request sent on
        # a connection the server is closing at that moment fails with no response (a client-side race).
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as self._http:
            deadline = asyncio.get_running_loop().time() + seconds
            work = [self._client(index, deadline) for index in range(clients)]
            if kill_after_s is not None:
                work.append(self._kill_first(kill_after_s))
            await asyncio.gather(*work)

    async def statuses(self, replica: Replica, ids: set[str]) -> dict[str, str | None]:
        """Each response's stored status as `replica` reads it (None: not found)."""
        gate = asyncio.Semaphore(16)

        async def status(http: httpx.AsyncClient, response_id: str) -> str | None:
            async with gate:
                response = await self._get(http, replica, f"/v1/responses/{response_id}")
            return response.json()["status"] if response is not None and response.status_code == 200 else None

        ordered = list(ids)
        async with httpx.AsyncClient(timeout=60) as http:
            found = await asyncio.gather(*(status(http, id_) for id_ in ordered))
        return dict(zip(ordered, found, strict=True))

    async def idle_latency(self, replica: Replica, ids: list[str], count: int) -> list[float]:
        """GETs of stored responses one after another, with nothing else running: the store's own cost."""
        timings = []
        async with httpx.AsyncClient(timeout=60) as http:
            for response_id in ids[:count]:
                started = time.perf_counter()
                response = await self._get(http, replica, f"/v1/responses/{response_id}")
                if response is not None and response.status_code == 200:
                    timings.append((time.perf_counter() - started) * 1000)
        return timings

    async def settled(self, reader: Replica, ids: set[str], since: float, within_s: float) -> tuple[int, float | None]:
        """Polls `reader` until none of `ids` is queued or in progress, or until `within_s` after `since`;
        returns how many still are, and how long after `since` none was."""
        loop = asyncio.get_running_loop()
        while True:
            statuses = await self.statuses(reader, ids)
            ids = {id_ for id_, status in statuses.items() if status in ("queued", "in_progress")}
            elapsed = loop.time() - since
            if not ids:
                return 0, elapsed
            if elapsed >= within_s:
                return len(ids), None
            await asyncio.sleep(1.0)

    async def _kill_first(self, after_s: float) -> None:
        """Kills replica A, then watches what it left unfinished until the survivors have settled it."""
        await asyncio.sleep(after_s)
        dead = self.replicas[0]
        dead.kill()
        self.killed_at = asyncio.get_running_loop().time()
        made_by = self.tally.made_by
        left = {id_ for id_ in self.tally.started - set(self.tally.finished) if made_by[id_] == dead.name}
        self.dead_left = frozenset(left)
        self.dead_stuck, self.dead_settled_after_s = await self.settled(
            self.pick(0), left, self.killed_at, DEAD_REPLICA_SETTLES_S
        )

    async def _client(self, index: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(index)
        while loop.time() < deadline:
            # A job first: so that even a short run resumes some on the other replica before the kill.
            if rng.random() < self.job_share:
                await self._background_job(index)
            chained = await self._chain(index)
            if not chained:
                await asyncio.sleep(0.2)  # a failing replica is not hammered in a tight loop

    async def _chain(self, home: int) -> bool:
        """Three turns, each continuing the last through `previous_response_id`; after each, the response
        is read back from the next replica (timed: the store latency under load)."""
        self.tally.counts["chains started"] += 1
        previous = None
        for turn in range(TURNS):
            replica = self.pick(home + turn if self.alternate else home)
            body = {**self._turn, "input": f"Turn {turn + 1}."}
            if previous is not None:
                body["previous_response_id"] = previous
            events = await self._events(replica, "POST", "/v1/responses", json=body)
            previous, status = self._record(replica, events)
            if previous is None or status not in FINISHED:
                self.tally.counts["chains cut short"] += 1
                return False
            await self._read_back(self.pick(home + turn + 1 if self.alternate else home), previous)
        self.tally.counts["chains completed"] += 1
        return True

    async def _background_job(self, home: int) -> None:
        """Started on one replica, left after a few events, resumed from the next with `starting_after`."""
        creator = self.pick(home)
        body, leave_after = self._job, JOB_EVENTS_BEFORE_LEAVING
        events = await self._events(creator, "POST", "/v1/responses", json=body, stop_after=leave_after)
        job, status = self._record(creator, events)
        if job is None or status is not None:
            return
        self.tally.counts["background jobs"] += 1
        follower = self.pick(home + 1 if self.alternate else home)
        resumed = await self._resume(follower, job, events[-1]["sequence_number"])
        if resumed and follower is not creator:
            self.tally.counts["job streams resumed on another replica"] += 1
        if not follower.alive and not (resumed and resumed[-1]["type"] in TERMINAL):
            # The follower was killed under us: resume once more, from the last event seen, on a live one.
            last = resumed[-1]["sequence_number"] if resumed else events[-1]["sequence_number"]
            follower = self.pick(home)
            resumed = await self._resume(follower, job, last)
        if resumed and resumed[-1]["type"] in TERMINAL:
            where = "another replica" if follower is not creator else "the replica that made it"
            self.tally.counts[f"jobs followed to their end from {where}"] += 1
        else:
            # Its replica died: the survivors fail it, and its followers end without a terminal event.
            self.tally.counts["jobs whose stream ended early"] += 1

    async def _resume(self, follower: Replica, job: str, last: int) -> list[dict[str, Any]]:
        params = {"stream": "true", "starting_after": last}
        resumed = await self._events(follower, "GET", f"/v1/responses/{job}", params=params)
        numbers = [event["sequence_number"] for event in resumed]
        if numbers != list(range(last + 1, last + 1 + len(numbers))):
            self.tally.counts["resumed streams out of order"] += 1
        self._record(follower, resumed)
        return resumed

    def _record(self, replica: Replica, events: list[dict[str, Any]]) -> tuple[str | None, str | None]:
        """The response id the events name, and its final status if they reached one."""
        response_id = next((event["id"] for event in events if event["id"]), None)
        if response_id is None:
            return None, None
        self.tally.started.add(response_id)
        self.tally.made_by.setdefault(response_id, replica.name)
        final = events[-1] if events[-1]["type"] in TERMINAL else None
        status = final["status"] if final else None
        if status in FINISHED:
            self.tally.finished[response_id] = status
        return response_id, status

    async def _read_back(self, replica: Replica, response_id: str) -> None:
        started = time.perf_counter()
        assert self._http is not None
        response = await self._get(self._http, replica, f"/v1/responses/{response_id}")
        if response is not None and response.status_code == 200:
            timings = self.tally.store_ms_after_kill if self.killed_at else self.tally.store_ms
            timings.append((time.perf_counter() - started) * 1000)

    async def _get(self, http: httpx.AsyncClient, replica: Replica, path: str) -> httpx.Response | None:
        self.tally.requests += 1
        try:
            response = await http.get(f"{replica.base_url}{path}")
        except httpx.HTTPError as exc:
            self.tally.errors[(replica.name, f"{type(exc).__name__} on GET /v1/responses/{{id}}")] += 1
            return None
        self.tally.statuses[(replica.name, response.status_code)] += 1
        return response

    async def _events(
        self, replica: Replica, method: str, path: str, stop_after: int | None = None, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """A stream's events (summarised), up to `stop_after` of them; what came before an error."""
        self.tally.requests += 1
        events: list[dict[str, Any]] = []
        assert self._http is not None
        try:
            async with self._http.stream(method, f"{replica.base_url}{path}", **kwargs) as response:
                self.tally.statuses[(replica.name, response.status_code)] += 1
                if response.status_code != 200:
                    await response.aread()
                    return events
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        events.append(summary(json.loads(line[len("data: ") :])))
                        if len(events) == stop_after:
                            break
        except httpx.HTTPError as exc:
            when = "after its first event" if events else "before any event"
            self.tally.errors[(replica.name, f"{type(exc).__name__} on a {method} stream, {when}")] += 1
        return events
