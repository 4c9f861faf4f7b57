"""Configured limits, each answered in the OpenAI envelope: body size, output cap, request timeout."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, free_port, long_job, serving, wait_for

from respserve.config import load_settings


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = load_settings(
        port=free_port(),
        data_dir=str(tmp_path_factory.mktemp("limited")),
        max_body_bytes=4096,
        max_output_tokens=20,
    )
    yield from serving(settings)


def test_large_bodies_get_413(limited_server: RunningServer) -> None:
    with httpx.Client(base_url=limited_server.base_url, timeout=60) as http:
        big = http.post("/v1/responses", json={"input": "x" * 5000})
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
            yield b'{"input": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        chunked = http.post("/v1/responses", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16}).status_code == 200


def test_output_tokens_are_capped(limited_server: RunningServer, server: RunningServer) -> None:
    with httpx.Client(base_url=limited_server.base_url, timeout=60) as http:
        body = http.post("/v1/responses", json=long_job(server, max_output_tokens=500)).json()
    assert body["status"] == "incomplete" and body["usage"]["output_tokens"] == 20


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # 0.3 s is far less than 20 tokens take on any CPU here (~1 s).
    settings = load_settings(
        port=free_port(), data_dir=str(tmp_path_factory.mktemp("impatient")), request_timeout_s=0.3
    )
    yield from serving(settings)


def test_slow_requests_time_out_and_free_their_slot(impatient_server: RunningServer, server: RunningServer) -> None:
    worker = impatient_server.state.default_model.worker
    with httpx.Client(base_url=impatient_server.base_url, timeout=60) as http:
        slow = http.post("/v1/responses", json=long_job(server, max_output_tokens=200))
    assert slow.status_code == 504
    assert slow.json()["error"] == {
        "message": "The response took longer than 0.3 s and was stopped.",
        "type": "timeout_error",
        "param": None,
        "code": "timeout",
    }
    assert wait_for(lambda: worker.num_running == 0, timeout=10)
