"""The model runs off the event loop: the server answers while it generates, and disconnects stop work."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import RunningServer, long_job, wait_for


def test_health_answers_fast_during_a_long_generation(server: RunningServer) -> None:
    worker = server.state.default_model.worker
    done_probing = threading.Event()

    def generate() -> None:  # streams until the probes are done, then hangs up (which stops the generation)
        with (
            httpx.Client(base_url=server.base_url, timeout=60) as client,
            client.stream("POST", "/v1/responses", json=long_job(server, stream=True)) as response,
        ):
            for _ in response.iter_lines():
                if done_probing.is_set():
                    return

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    assert wait_for(lambda: worker.num_running == 1)
    latencies = []
    with httpx.Client(base_url=server.base_url) as probe:
        for _ in range(30):
            started = time.perf_counter()
            assert probe.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    assert worker.num_running == 1, "the generation should still be running while we probed"
    done_probing.set()
    thread.join(60)
    assert wait_for(lambda: worker.num_running == 0, timeout=10)
    assert max(latencies) < 0.05, latencies


def test_client_disconnect_stops_generation(server: RunningServer) -> None:
    worker = server.state.default_model.worker
    body = long_job(server, stream=True)
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as client,
        client.stream("POST", "/v1/responses", json=body) as response,
    ):
        deltas = 0
        for line in response.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                deltas += 1
                if deltas == 3:
                    break
        assert worker.num_running == 1
    # The connection is closed: the worker drops the sequence at its next step.
    assert wait_for(lambda: worker.num_running == 0, timeout=10)


def test_non_streaming_client_that_gives_up_stops_generation(server: RunningServer) -> None:
    worker = server.state.default_model.worker
    body = long_job(server)
    with httpx.Client(base_url=server.base_url, timeout=1.0) as client:
        try:
            client.post("/v1/responses", json=body)
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("the request should have outlived the client's timeout")
    assert wait_for(lambda: worker.num_running == 0, timeout=10)
