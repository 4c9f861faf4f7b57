"""SIGTERM: the server stops taking requests, lets the ones in flight finish, then exits."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
from conftest import RunningServer, free_port, long_job, spawn_server


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path, server: RunningServer) -> None:
    port = free_port()
    process = spawn_server(port, tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        generating = threading.Event()
        events: list[dict] = []

        def long_request() -> None:
            body = long_job(server, max_output_tokens=48, stream=True)
            with httpx.stream("POST", f"{base_url}/v1/responses", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[len("data: ") :]))
                        if events[-1]["type"] == "response.output_text.delta":
                            generating.set()

        thread = threading.Thread(target=long_request)
        thread.start()
        assert generating.wait(60), "the request never started generating"
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert events[-1]["type"] == "response.incomplete"
        assert events[-1]["response"]["usage"]["output_tokens"] == 48
        # uvicorn re-raises the signal once its graceful shutdown is done.
        assert process.wait(60) in (0, -signal.SIGTERM)
        try:
            httpx.get(f"{base_url}/health", timeout=2)
            raise AssertionError("the server still answers after shutting down")
        except httpx.HTTPError:
            pass
    finally:
        if process.poll() is None:
            process.kill()
