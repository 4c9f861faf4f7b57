"""Stored responses, previous_response_id chains, conversations and background jobs, through the SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import (
    OpenResponsesSchema,
    RunningServer,
    free_port,
    long_job,
    never_ends,
    parse_sse,
    prompt_tokens,
    sdk_client,
    sdk_kwargs,
    serving,
    wait_for,
)

from respserve.config import load_settings


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Every test here runs on both stores: SQLite in a data dir, and a fresh schema in PostgreSQL."""
    store = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    data_dir = tmp_path_factory.mktemp(f"store-{request.param}")
    yield from serving(load_settings(port=free_port(), data_dir=str(data_dir), store=store))


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return sdk_client(server)


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def _create(client: openai.OpenAI, server: RunningServer, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_output_tokens", 16)  # the least the API takes: these tests check state, not text
    return client.responses.create(model=server.model, **kwargs)


def _wait_until_done(client: openai.OpenAI, response_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.2)
    raise AssertionError("the background response did not finish")


def test_retrieve_and_delete(client: openai.OpenAI, server: RunningServer, http, schema: OpenResponsesSchema) -> None:
    created = _create(client, server, input="What is the capital of France?", metadata={"k": "v"})
    raw = http.get(f"/v1/responses/{created.id}")
    assert raw.status_code == 200
    schema.response(raw.json())
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.output_text == created.output_text
    assert retrieved.metadata == {"k": "v"} and retrieved.usage == created.usage

    other = _create(client, server, input="Hi")
    deleted = http.delete(f"/v1/responses/{created.id}")
    assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    assert http.delete(f"/v1/responses/{created.id}").status_code == 404
    client.responses.delete(other.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(other.id)


def test_store_false_is_not_retrievable(client: openai.OpenAI, server: RunningServer) -> None:
    created = _create(client, server, input="Hi", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        _create(client, server, input="And now?", previous_response_id=created.id)


def test_input_items_pagination(client: openai.OpenAI, server: RunningServer) -> None:
    items = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "How are you?"},
    ]
    created = _create(client, server, input=items)
    newest_first = client.responses.input_items.list(created.id)
    assert [item.role for item in newest_first.data] == ["user", "assistant", "user", "system"]
    assert all(item.id.startswith("msg_") for item in newest_first.data)
    oldest_first = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.role for item in oldest_first.data] == ["system", "user"]
    assert oldest_first.has_more is True
    rest = client.responses.input_items.list(created.id, order="asc", after=oldest_first.last_id)
    assert [item.role for item in rest.data] == ["assistant", "user"] and rest.has_more is False
    assert rest.data[0].content[0].text == "Hi there!"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_missing")


def test_three_turn_chain_renders_every_earlier_turn(client: openai.OpenAI, server: RunningServer) -> None:
    first = _create(client, server, input="Remember this word: pineapple.")
    second = _create(client, server, input="Tell me a short joke.", previous_response_id=first.id)
    third = _create(client, server, input="Which word did I ask you to remember?", previous_response_id=second.id)
    assert third.previous_response_id == second.id
    # Proven from what the server rendered, not from what the model answered: the prompt holds every turn.
    expected = [
        {"role": "user", "content": "Remember this word: pineapple."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Tell me a short joke."},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Which word did I ask you to remember?"},
    ]
    assert third.usage is not None and third.usage.input_tokens == prompt_tokens(server, expected)
    alone = _create(client, server, input="Which word did I ask you to remember?")
    assert alone.usage is not None and alone.usage.input_tokens == prompt_tokens(server, expected[-1:])


def test_instructions_are_not_carried_over(client: openai.OpenAI, server: RunningServer) -> None:
    first = _create(client, server, input="Hello", instructions="Answer in French.")
    second = _create(client, server, input="Thanks", previous_response_id=first.id, instructions="Be brief.")
    assert second.instructions == "Be brief."
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Thanks"},
    ]
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(server, expected)


def test_chain_errors(client: openai.OpenAI, server: RunningServer, http) -> None:
    missing = http.post("/v1/responses", json={"input": "hi", "previous_response_id": "resp_nope"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "previous_response_id"
    first = _create(client, server, input="Hi")
    conversation = client.conversations.create()
    both = http.post(
        "/v1/responses", json={"input": "hi", "previous_response_id": first.id, "conversation": conversation.id}
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "conversation"
    unknown = http.post("/v1/responses", json={"input": "hi", "conversation": "conv_nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "conversation"
    background_unstored = http.post("/v1/responses", json={"input": "hi", "background": True, "store": False})
    assert background_unstored.status_code == 400 and background_unstored.json()["error"]["param"] == "background"


def test_conversation_lifecycle(client: openai.OpenAI, server: RunningServer) -> None:
    conversation = client.conversations.create(
        metadata={"topic": "fruit"}, items=[{"role": "user", "content": "Remember this word: pineapple."}]
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "fruit"}
    assert client.conversations.retrieve(conversation.id).id == conversation.id
    updated = client.conversations.update(conversation.id, metadata={"topic": "food"})
    assert updated.metadata == {"topic": "food"}

    reply = _create(client, server, input="Which word did I ask you to remember?", conversation=conversation.id)
    assert reply.conversation is not None and reply.conversation.id == conversation.id
    expected = [
        {"role": "user", "content": "Remember this word: pineapple."},
        {"role": "user", "content": "Which word did I ask you to remember?"},
    ]
    assert reply.usage is not None and reply.usage.input_tokens == prompt_tokens(server, expected)
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.role for item in items] == ["user", "user", "assistant"]
    assert items[2].content[0].text == reply.output_text

    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "Thanks!"}]
    )
    added_id = added.data[0].id
    assert client.conversations.items.retrieve(added_id, conversation_id=conversation.id).id == added_id
    client.conversations.items.delete(added_id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(added_id, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 3

    assert client.conversations.delete(conversation.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)


def test_background_poll_and_cancel(client: openai.OpenAI, server: RunningServer, http) -> None:
    queued = _create(
        client,
        server,
        input="Write a haiku about rain.",
        background=True,
        extra_body={"logit_bias": never_ends(server)},
    )
    assert queued.status == "queued" and queued.background is True
    done = _wait_until_done(client, queued.id)
    assert done.status == "incomplete" and done.usage is not None and done.usage.output_tokens == 16

    long = client.responses.create(model=server.model, background=True, **sdk_kwargs(long_job(server)))
    assert wait_for(lambda: client.responses.retrieve(long.id).status == "in_progress")
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    again = http.post(f"/v1/responses/{long.id}/cancel")
    assert again.status_code == 400 and "cancelled" in again.json()["error"]["message"]
    foreground = _create(client, server, input="Hi")
    assert http.post(f"/v1/responses/{foreground.id}/cancel").status_code == 400


def test_background_stream_resumes(server: RunningServer, http, schema: OpenResponsesSchema) -> None:
    body = long_job(server, max_output_tokens=48, background=True, stream=True)
    seen: list[dict] = []
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as client,
        client.stream("POST", "/v1/responses", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[len("data: ") :]))
                if len(seen) == 6:
                    break  # the client goes away; the background response goes on
    response_id = seen[0]["response"]["id"]
    assert seen[0]["response"]["status"] == "queued"
    resumed = http.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": 5})
    frames = parse_sse(resumed.text)
    assert frames[-1].data == "[DONE]"
    rest = [json.loads(frame.data) for frame in frames[:-1]]
    events = seen + rest
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        schema.event(event)
    assert events[-1]["type"] == "response.incomplete"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    stored = http.get(f"/v1/responses/{response_id}").json()
    assert stored["output"][0]["content"][0]["text"] == deltas
    replay = parse_sse(http.get(f"/v1/responses/{response_id}", params={"stream": "true"}).text)
    assert len(replay) == len(events) + 1


def test_a_stream_whose_client_left_is_stored_as_cancelled(server: RunningServer, http) -> None:
    # Its end is written from inside the stream's cancelled scope, where an unshielded await would not run.
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as client,
        client.stream("POST", "/v1/responses", json=long_job(server, stream=True)) as response,
    ):
        first = json.loads(next(line for line in response.iter_lines() if line.startswith("data: {"))[6:])
    response_id = first["response"]["id"]
    assert wait_for(lambda: http.get(f"/v1/responses/{response_id}").json()["status"] == "cancelled", timeout=10)
    worker = server.state.default_model.worker
    assert wait_for(lambda: worker.num_running == 0, timeout=10)


def test_fifty_concurrent_stored_requests(server: RunningServer, http) -> None:
    async def create_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            bodies = [
                {"input": f"Say the number {n}.", "max_output_tokens": 16, "metadata": {"n": str(n)}} for n in range(50)
            ]
            responses = await asyncio.gather(*(client.post("/v1/responses", json=body) for body in bodies))
        assert all(response.status_code == 200 for response in responses)
        return [response.json() for response in responses]

    created = asyncio.run(create_all())
    for n, body in enumerate(created):
        stored = http.get(f"/v1/responses/{body['id']}").json()
        assert stored == body
        assert stored["metadata"] == {"n": str(n)}
