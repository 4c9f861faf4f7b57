"""Durability: what was stored survives a restart, and work a restart interrupted is marked failed."""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, free_port, long_job, spawn_server, start_server, stop_server, wait_for

from respserve.config import load_settings


def _start(data_dir: Path, store: str | None = None):
    return start_server(load_settings(port=free_port(), data_dir=str(data_dir), store=store))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_graceful_restart_keeps_everything_and_fails_unfinished_jobs(
    tmp_path: Path, server: RunningServer, backend: str, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    uv_server, thread, running = _start(tmp_path, store)
    with httpx.Client(base_url=running.base_url, timeout=120) as client:
        created = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16}).json()
        conversation = client.post(
            "/v1/conversations", json={"items": [{"role": "user", "content": "hello"}], "metadata": {"a": "1"}}
        ).json()
        background = client.post("/v1/responses", json=long_job(server, background=True)).json()
        assert background["status"] == "queued"
    stop_server(uv_server, thread)

    uv_server, thread, running = _start(tmp_path, store)
    try:
        with httpx.Client(base_url=running.base_url, timeout=120) as client:
            assert client.get(f"/v1/responses/{created['id']}").json() == created
            assert client.get(f"/v1/conversations/{conversation['id']}").json()["metadata"] == {"a": "1"}
            items = client.get(f"/v1/conversations/{conversation['id']}/items").json()["data"]
            assert [item["content"][0]["text"] for item in items] == ["hello"]
            interrupted = client.get(f"/v1/responses/{background['id']}").json()
            assert interrupted["status"] == "failed"
            assert interrupted["error"]["code"] == "server_error"
            assert "shut down" in interrupted["error"]["message"]
    finally:
        stop_server(uv_server, thread)


def test_killed_server_leaves_no_job_in_progress(tmp_path: Path, server: RunningServer) -> None:
    port = free_port()
    process = spawn_server(port, tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            background = client.post("/v1/responses", json=long_job(server, background=True)).json()
            # Killed mid-generation: 2,000 tokens take minutes, and the job has begun.
            assert wait_for(lambda: client.get(f"/v1/responses/{background['id']}").json()["status"] == "in_progress")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)

    uv_server, thread, running = _start(tmp_path)
    try:
        after = httpx.get(f"{running.base_url}/v1/responses/{background['id']}").json()
        assert after["status"] == "failed"
        assert "restarted" in after["error"]["message"]
    finally:
        stop_server(uv_server, thread)


def test_a_server_freezes_its_startup_heap_while_it_serves(tmp_path: Path) -> None:
    """What a server loads lives as long as it does: frozen, the collector's full passes skip it (one pass
    over it once held the event loop and the worker for 238 ms in a burst of requests); unfrozen at its stop,
    so what it leaves can be collected."""
    uv_server, thread, _ = _start(tmp_path)
    try:
        assert gc.get_freeze_count() > 100_000
    finally:
        stop_server(uv_server, thread)
    assert gc.get_freeze_count() == 0
