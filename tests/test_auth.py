"""API keys: /v1 needs a valid key; what one key stores, another key cannot see or touch."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import RunningServer, free_port, long_job, sdk_client, sdk_kwargs, serving

from respserve.config import load_settings

KEYS = ["key-alice", "key-bob"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("keyed")
    settings = load_settings(port=free_port(), api_keys=KEYS, data_dir=str(data_dir), protect_metrics=True)
    yield from serving(settings)


def _client(server: RunningServer, key: str) -> openai.OpenAI:
    return sdk_client(server, key)


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESPSERVE_API_KEYS", "a, b,c")
    assert load_settings().api_keys == ["a", "b", "c"]


def test_v1_needs_a_valid_key_and_health_does_not(keyed_server: RunningServer) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as http:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/responses"), ("GET", "/v1/responses/resp_x")]:
            missing = http.request(method, path, json={"input": "hi"})
            assert missing.status_code == 401, path
            assert missing.json()["error"]["type"] == "authentication_error"
            wrong = http.request(method, path, json={"input": "hi"}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 401  # protect_metrics is on here
        assert http.get("/metrics", headers={"Authorization": "Bearer key-bob"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(keyed_server, "nope").models.list()
    assert _client(keyed_server, "key-alice").models.list().data


def test_stored_objects_belong_to_their_key(keyed_server: RunningServer, server: RunningServer) -> None:
    alice, bob = _client(keyed_server, "key-alice"), _client(keyed_server, "key-bob")
    model = keyed_server.model
    response = alice.responses.create(model=model, input="Hi", max_output_tokens=16)
    conversation = alice.conversations.create(items=[{"role": "user", "content": "secret"}])
    background = alice.responses.create(model=model, background=True, **sdk_kwargs(long_job(server)))

    assert alice.responses.retrieve(response.id).id == response.id
    for attempt in (
        lambda: bob.responses.retrieve(response.id),
        lambda: bob.responses.delete(response.id),
        lambda: bob.responses.input_items.list(response.id),
        lambda: bob.responses.cancel(background.id),
        lambda: bob.responses.create(model=model, input="x", previous_response_id=response.id),
        lambda: bob.conversations.retrieve(conversation.id),
        lambda: bob.conversations.items.list(conversation.id),
        lambda: bob.conversations.delete(conversation.id),
        lambda: bob.responses.create(model=model, input="x", conversation=conversation.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    # Nothing of Alice's was touched by Bob's attempts.
    assert alice.responses.retrieve(response.id).output_text == response.output_text
    assert alice.conversations.items.list(conversation.id).data[0].content[0].text == "secret"
    assert alice.responses.cancel(background.id).status == "cancelled"
