"""Continuous batching: concurrent requests share decode steps yet each gets exactly its own answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import RunningServer, assert_same_greedy_tokens, free_port, long_job, never_ends, serving, wait_for

from respserve.config import load_settings
from respserve.engine.sequence import Sequence


def _text(body: dict) -> str:
    return body["output"][0]["content"][0]["text"]


async def _post_all(base_url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        responses = await asyncio.gather(*(client.post("/v1/responses", json=body) for body in bodies))
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    return [response.json() for response in responses]


def test_sixteen_concurrent_greedy_requests_match_their_solo_answers(http, server: RunningServer) -> None:
    bodies = [
        {
            "input": f"Tell me one fact about the number {n}.",
            "temperature": 0,
            "max_output_tokens": 24,
            "logit_bias": never_ends(server),
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
        }
        for n in range(16)
    ]
    alone = [http.post("/v1/responses", json=body).json() for body in bodies]
    together = asyncio.run(_post_all(server.base_url, bodies))
    for mine, theirs in zip(together, alone, strict=True):
        assert_same_greedy_tokens(mine, theirs)


def test_seeded_sampling_is_reproducible_inside_a_batch(http, server: RunningServer) -> None:
    seeded = {"input": "Invent a name for a cat.", "temperature": 1.0, "seed": 2024, "max_output_tokens": 24}
    alone = _text(http.post("/v1/responses", json=seeded).json())
    others = [{"input": f"Count to {n}.", "temperature": 1.0, "max_output_tokens": 32} for n in range(7)]
    results = asyncio.run(_post_all(server.base_url, [*others[:3], seeded, *others[3:]]))
    assert _text(results[3]) == alone


def test_a_request_that_raises_fails_alone(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: the real worker, with one request's token handling made to raise mid-generation.
    original = Sequence.append

    def append(self: Sequence, token_id: int, eos: frozenset[int], logprobs=None):  # noqa: ANN001
        if len(self.output_ids) == 3 and "POISON" in server.state.default_model.worker.pipeline.tokenizer.decode(
            self.prompt_token_ids
        ):
            raise RuntimeError("injected failure")
        return original(self, token_id, eos, logprobs)

    monkeypatch.setattr(Sequence, "append", append)
    bodies = [{"input": f"Say something about {word}.", "temperature": 0, "max_output_tokens": 16} for word in "abc"]
    bodies.insert(1, {"input": "POISON", "temperature": 0, "max_output_tokens": 16})
    results = asyncio.run(_post_all(server.base_url, bodies))
    assert results[1]["status"] == "failed"
    assert results[1]["error"]["code"] == "server_error"
    assert "injected failure" in results[1]["error"]["message"]
    assert all(result["status"] in ("completed", "incomplete") for i, result in enumerate(results) if i != 1)
    monkeypatch.undo()
    assert http_ok(server)


def http_ok(server: RunningServer) -> bool:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        response = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16})
    return response.status_code == 200 and response.json()["status"] in ("completed", "incomplete")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second server with one running slot and one queue place, to reach the bounds quickly."""
    data_dir = tmp_path_factory.mktemp("small")
    settings = load_settings(port=free_port(), max_running=1, max_queued=1, data_dir=str(data_dir))
    yield from serving(settings)


def test_queue_bound_gives_429_and_disconnects_free_slots(small_server: RunningServer, server: RunningServer) -> None:
    long = long_job(server, stream=True)
    worker = small_server.state.default_model.worker
    stop = threading.Event()

    def hold_stream() -> None:
        with (
            httpx.Client(base_url=small_server.base_url, timeout=60) as client,
            client.stream("POST", "/v1/responses", json=long) as response,
        ):
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold_stream, daemon=True) for _ in range(2)]
    holders[0].start()
    assert wait_for(lambda: worker.num_running == 1)
    holders[1].start()
    assert wait_for(lambda: worker.num_queued == 1)

    with httpx.Client(base_url=small_server.base_url, timeout=60) as client:
        refused = client.post("/v1/responses", json={"input": "hi"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["type"] == "rate_limit_error"

        stop.set()  # both clients hang up: the running one leaves the batch, the queued one the queue
        for holder in holders:
            holder.join(30)
        assert wait_for(lambda: worker.num_running == 0 and worker.num_queued == 0)
        done = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 16})
        assert done.status_code == 200


def test_a_crashed_worker_fails_its_requests_and_serves_on(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the batch bookkeeping itself raises once, past every per-request guard.
    worker = server.state.default_model.worker
    original = worker.scheduler.computed
    crashed = threading.Event()

    def computed(chunks):  # noqa: ANN001, ANN202
        if not crashed.is_set() and worker.num_running >= 2:
            crashed.set()
            raise RuntimeError("worker crash")
        return original(chunks)

    monkeypatch.setattr(worker.scheduler, "computed", computed)
    restarts = worker.restarts
    bodies = [long_job(server, max_output_tokens=64, input=f"Count to {n}.") for n in (10, 20)]
    results = asyncio.run(_post_all(server.base_url, bodies))
    assert crashed.is_set() and worker.restarts == restarts + 1
    assert [result["status"] for result in results] == ["failed", "failed"]
    assert all(result["error"]["code"] == "server_error" for result in results)
    monkeypatch.undo()
    assert worker.alive and http_ok(server)
