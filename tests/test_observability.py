"""Operators' view: Prometheus metrics, request ids, and one log line per request."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import RunningServer


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_and_latencies(http, server: RunningServer) -> None:
    before = http.get("/metrics").text
    tokens_before = _sample(before, "respserve:generation_tokens_total")
    body = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16}).json()
    http.post("/v1/responses", json={"input": "Hi", "temperature": 7})  # a 400
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert _sample(text, "respserve:generation_tokens_total") - tokens_before == body["usage"]["output_tokens"]
    assert _sample(text, "respserve:time_to_first_token_seconds_count") >= 1
    assert _sample(text, "respserve:inter_token_latency_seconds_count") >= 1
    assert _sample(text, "respserve:e2e_request_latency_seconds_count") >= 1
    assert 'respserve:http_requests_total{method="POST",route="/v1/responses",status="400"}' in text
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_tokens", "gpu_memory_bytes"):
        _sample(text, f"respserve:{gauge}")
    # The pool's size, from which scripts/bench.py checks its bytes per token: the model's keys and values.
    config = server.state.default_model.worker.pipeline.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    slots = _sample(text, "respserve:kv_cache_capacity_tokens")
    assert slots > 0 and _sample(text, "respserve:kv_cache_bytes") == slots * per_token


def test_request_ids_and_log_lines(http, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="respserve.requests"):
        given = http.get("/v1/models", headers={"X-Request-ID": "trace-42"})
        made = http.get("/v1/models")
    assert given.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"].startswith("req_")
    lines = [record.getMessage() for record in caplog.records if record.name == "respserve.requests"]
    assert any("request_id=trace-42" in line and "status=200" in line for line in lines)


def test_json_request_log(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    from respserve.api.request_log import RequestLogMiddleware

    line = RequestLogMiddleware(app=server.app, metrics=server.state.metrics, json_logs=True)
    with caplog.at_level(logging.INFO, logger="respserve.requests"):
        line._log("id-1", {"method": "GET", "path": "/v1/models"}, "/v1/models", 200, 0.0123)
    record = json.loads(caplog.records[-1].getMessage())
    assert record == {
        "request_id": "id-1",
        "method": "GET",
        "path": "/v1/models",
        "route": "/v1/models",
        "status": 200,
        "duration_ms": 12.3,
    }
