"""Two replicas on one PostgreSQL store: each serves what the other stored, and when one is killed
(`kill -9`) the survivor fails its unfinished responses within about one lease, never a live one's."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from pathlib import Path

import httpx
from conftest import RunningServer, free_port, long_job, spawn_server, start_server, stop_server, wait_for

from respserve.config import load_settings
from respserve.store import open_store

LEASE_S = 2.0


def test_a_killed_replicas_jobs_fail_on_the_survivor_and_nothing_stored_is_lost(
    tmp_path: Path, server: RunningServer, postgres_url: str
) -> None:
    port = free_port()
    flags = ("--store", postgres_url, "--lease-seconds", str(LEASE_S))
    doomed = spawn_server(port, tmp_path / "a", *flags)
    settings = load_settings(port=free_port(), data_dir=str(tmp_path / "b"), store=postgres_url, lease_s=LEASE_S)
    uv_server, thread, survivor = start_server(settings)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as a,
            httpx.Client(base_url=survivor.base_url, timeout=120) as b,
        ):
            done = a.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16}).json()
            conversation = a.post("/v1/conversations", json={"items": [{"role": "user", "content": "x"}]}).json()
            job = a.post("/v1/responses", json=long_job(server, background=True)).json()
            status = lambda: b.get(f"/v1/responses/{job['id']}").json()["status"]  # noqa: E731
            assert wait_for(lambda: status() == "in_progress")  # seen through the other replica
            beats = survivor.state.leases.beats
            assert wait_for(lambda: survivor.state.leases.beats >= beats + 3)  # sweeps that found the job...
            assert status() == "in_progress"  # ...leased by a live replica, and left it alone

            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait(30)
            killed_at = time.monotonic()
            assert wait_for(lambda: status() == "failed", timeout=30)
            assert time.monotonic() - killed_at < 3 * LEASE_S + 2
            failed = b.get(f"/v1/responses/{job['id']}").json()
            assert failed["error"]["code"] == "server_error" and "replica" in failed["error"]["message"]
            # What the dead replica completed or stored is all there.
            assert b.get(f"/v1/responses/{done['id']}").json() == done
            assert b.get(f"/v1/conversations/{conversation['id']}").status_code == 200
            follow_up = {"input": "And?", "previous_response_id": done["id"], "max_output_tokens": 16}
            chained = b.post("/v1/responses", json=follow_up)
            assert chained.status_code == 200 and chained.json()["status"] in ("completed", "incomplete")
    finally:
        if doomed.poll() is None:
            doomed.kill()
        stop_server(uv_server, thread)


def test_a_job_on_one_replica_is_followed_live_and_cancelled_through_the_other(
    tmp_path: Path, server: RunningServer, postgres_url: str
) -> None:
    replicas = [
        start_server(load_settings(port=free_port(), data_dir=str(tmp_path / name), store=postgres_url))
        for name in "ab"
    ]
    (_, _, a), (_, _, b) = replicas[0], replicas[1]
    try:
        body = long_job(server, background=True, stream=True)
        with (
            httpx.Client(base_url=a.base_url, timeout=60) as client,
            client.stream("POST", "/v1/responses", json=body) as started,
        ):
            first = json.loads(next(line for line in started.iter_lines() if line.startswith("data: {"))[6:])
        job = first["response"]["id"]  # the client left; the job runs on in A
        worker = a.state.default_model.worker
        assert wait_for(lambda: worker.num_running == 1)

        live: list[dict] = []
        arrivals: list[float] = []
        with httpx.Client(base_url=b.base_url, timeout=60) as client:
            stored_then = asyncio.run(_recorded_events(postgres_url, job))
            params = {"stream": "true", "starting_after": 0}
            with client.stream("GET", f"/v1/responses/{job}", params=params) as follow:
                for line in follow.iter_lines():
                    if line.startswith("data: {"):
                        live.append(json.loads(line[6:]))
                        arrivals.append(time.monotonic())
                        if len(live) == stored_then + 20:
                            break  # events recorded after B began to follow, so they came live
            numbers = [event["sequence_number"] for event in live]
            assert numbers == list(range(1, len(live) + 1))
            # Woken by A's notifications, one decode step apart, not by the 1 s fallback poll.
            followed = arrivals[stored_then:]
            gaps = [later - earlier for earlier, later in itertools.pairwise(followed)]
            assert max(gaps) < 0.6, gaps

            cancelled = client.post(f"/v1/responses/{job}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
        assert wait_for(lambda: worker.num_running == 0, timeout=5)  # A stopped generating
    finally:
        for uv_server, thread, _ in replicas:
            stop_server(uv_server, thread)


async def _recorded_events(store_url: str, response_id: str) -> int:
    """How many events the store holds for a response, read as a third replica would (A's store belongs to
    A's event loop, in its server thread)."""
    store = open_store(Path("unused"), store_url)
    await store.open()
    try:
        return len(await store.events_after(response_id, -1))
    finally:
        await store.close()
