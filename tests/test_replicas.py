"""Two replicas on one PostgreSQL store: each serves what the other stored, and when one is killed
(`kill -9`) the survivor fails its unfinished responses within about one lease, never a live one's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from conftest import RunningServer, free_port, long_job, spawn_server, start_server, stop_server, wait_for

from respserve.config import load_settings

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
            chained = b.post("/v1/responses", json={"input": "And?", "previous_response_id": done["id"]})
            assert chained.status_code == 200 and chained.json()["status"] in ("completed", "incomplete")
    finally:
        if doomed.poll() is None:
            doomed.kill()
        stop_server(uv_server, thread)
