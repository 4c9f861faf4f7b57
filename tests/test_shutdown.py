"""SIGTERM: the server stops taking requests, lets the ones in flight finish, then exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from conftest import free_port, spawn_server


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_server(port, tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        result: dict = {}

        def long_request() -> None:
            body = {"input": "Count from one to fifty.", "max_output_tokens": 48, "temperature": 0}
            result["response"] = httpx.post(f"{base_url}/v1/responses", json=body, timeout=120)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)  # the request is generating
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["status"] in ("completed", "incomplete")
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
