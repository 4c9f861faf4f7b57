"""Fuzzing with schemathesis: requests generated from the app's own OpenAPI document, for every route.
Whatever they hold, the server answers without a 5xx, and every error is the OpenAI envelope."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from conftest import RunningServer, free_port, serving
from hypothesis import HealthCheck, given, settings

from respserve.config import load_settings


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Short generations: the fuzzer sends thousands of valid requests too.
    data_dir = str(tmp_path_factory.mktemp("fuzz"))
    settings = load_settings(port=free_port(), data_dir=data_dir, max_output_tokens=16, request_timeout_s=20)
    yield from serving(settings)


def test_every_route_survives_generated_requests(fuzz_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every route of the API is in the document

    seen: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        # Derandomized: CI sees the same cases every run; widen max_examples locally to explore.
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def survives(case) -> None:  # noqa: ANN001
            response = case.call(timeout=60)
            outcome = f"{case.method} {response.status_code}"
            seen[outcome] = seen.get(outcome, 0) + 1
            where = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, f"{where}: {response.text[:300]}"
                assert set(body["error"]) == {"message", "type", "param", "code"}

        survives()
    assert seen.get("POST 200"), seen  # valid requests were generated too, not only rejected ones
