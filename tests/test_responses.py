"""Creating responses without streaming, as a user of the openai SDK and of plain HTTP sees them."""

from __future__ import annotations

import openai
from conftest import OpenResponsesSchema, RunningServer, prompt_tokens

QUESTION = "What is the capital of France?"


def test_string_input_answers_and_counts_real_tokens(
    client: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    response = client.responses.create(model=server.model, input=QUESTION, temperature=0)
    schema.response(response.model_dump(mode="json", exclude_unset=True))
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output[0].id.startswith("msg_")
    assert "Paris" in response.output_text
    assert response.usage is not None
    assert response.usage.input_tokens == prompt_tokens(server, [{"role": "user", "content": QUESTION}])
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    # The chat template's head (system prompt, user turn) comes from the prefix cache.
    prefix = server.state.default_model.worker.pipeline.prefix
    assert prefix is not None and response.usage.input_tokens_details.cached_tokens == len(prefix)
    assert response.completed_at is not None and response.completed_at >= response.created_at


def test_raw_body_has_every_resource_key_and_echoes_parameters(http, schema: OpenResponsesSchema) -> None:
    body = {
        "input": QUESTION,
        "instructions": "Answer in one sentence.",
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "max_output_tokens": 32,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "metadata": {"team": "search"},
        "user": "user-1",
        "store": False,
        "stop": ["\n\n"],
    }
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    schema.response(data)
    for key, value in body.items():
        if key != "input":
            assert data[key] == value, key
    for nullable in ("previous_response_id", "error", "reasoning", "max_tool_calls", "safety_identifier"):
        assert data[nullable] is None
    assert data["object"] == "response"
    assert data["output"][0]["content"][0]["annotations"] == []
    assert data["output"][0]["content"][0]["logprobs"] == []


def test_item_input_with_system_developer_and_multi_turn(
    client: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    items = [
        {"role": "system", "content": "You are a geography tutor."},
        {"role": "developer", "content": [{"type": "input_text", "text": "Keep answers short."}]},
        {"type": "message", "role": "user", "content": QUESTION},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Paris.", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "And of Italy?"}]},
    ]
    response = client.responses.create(model=server.model, input=items, temperature=0, max_output_tokens=32)
    schema.response(response.model_dump(mode="json", exclude_unset=True))
    # The developer turn is rendered as a system turn: open chat templates know no other.
    rendered = [
        {"role": "system", "content": "You are a geography tutor."},
        {"role": "system", "content": "Keep answers short."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert response.usage is not None
    assert response.usage.input_tokens == prompt_tokens(server, rendered)
    assert "Rome" in response.output_text


def test_instructions_become_the_system_turn(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.responses.create(
        model=server.model,
        instructions="You only answer in French.",
        input="Hello",
        temperature=0,
        max_output_tokens=32,
    )
    assert response.instructions == "You only answer in French."
    assert response.usage is not None
    expected = [
        {"role": "system", "content": "You only answer in French."},
        {"role": "user", "content": "Hello"},
    ]
    assert response.usage.input_tokens == prompt_tokens(server, expected)


def test_max_output_tokens_gives_incomplete(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.responses.create(
        model=server.model, input="Write a long story about a dragon.", max_output_tokens=16, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 16
    assert response.completed_at is not None


def test_temperature_zero_is_deterministic(client: openai.OpenAI, server: RunningServer) -> None:
    texts = {
        client.responses.create(
            model=server.model, input="Name three colors.", temperature=0, max_output_tokens=32
        ).output_text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_seed_makes_sampling_reproducible(http) -> None:
    def sample(seed: int) -> str:
        body = {
            "input": "Tell me a fact about cats.",
            "temperature": 1.0,
            "seed": seed,
            "max_output_tokens": 24,
        }
        response = http.post("/v1/responses", json=body)
        assert response.status_code == 200
        return response.json()["output"][0]["content"][0]["text"]

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_string_cuts_the_answer(client: openai.OpenAI, server: RunningServer) -> None:
    full = client.responses.create(model=server.model, input=QUESTION, temperature=0).output_text
    assert "Paris" in full
    response = client.responses.create(
        model=server.model, input=QUESTION, temperature=0, extra_body={"stop": ["Paris"]}
    )
    assert response.status == "completed"
    assert response.output_text == full[: full.index("Paris")]


def test_penalties_change_sampling(http) -> None:
    # Greedy, this prompt repeats tokens ("1. 1\n2. 2\n..."): a frequency penalty must break the pattern.
    body = {"input": "List the numbers from 1 to 30.", "temperature": 0, "max_output_tokens": 48}
    plain = http.post("/v1/responses", json=body).json()["output"][0]["content"][0]["text"]
    penalised = http.post("/v1/responses", json={**body, "frequency_penalty": 1.5}).json()
    assert plain.startswith("1. 1\n2. 2\n3. 3\n4. 4")
    assert penalised["output"][0]["content"][0]["text"] != plain
    assert penalised["frequency_penalty"] == 1.5


def test_logit_bias_steers_and_bans_tokens(http, server: RunningServer) -> None:
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 16}
    plain = http.post("/v1/responses", json=body).json()["output"][0]["content"][0]["text"]
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = http.post("/v1/responses", json={**body, "logit_bias": {str(first): -100}}).json()
    assert banned["logit_bias"] == {str(first): -100}
    assert tokenizer.encode(banned["output"][0]["content"][0]["text"], add_special_tokens=False)[0] != first
    paris = tokenizer.encode("Paris", add_special_tokens=False)[0]
    forced = http.post("/v1/responses", json={**body, "logit_bias": {str(paris): 100}}).json()
    assert forced["output"][0]["content"][0]["text"].startswith(tokenizer.decode([paris]))
    for bad, param in (({"x": 1}, "logit_bias"), ({"5": 101}, "logit_bias"), ({"999999": 1}, "logit_bias.999999")):
        error = http.post("/v1/responses", json={**body, "logit_bias": bad})
        assert error.status_code == 400 and error.json()["error"]["param"] == param


def test_models_lists_the_served_model(client: openai.OpenAI, server: RunningServer) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [server.model]
    assert models.data[0].object == "model"
    assert client.models.retrieve(server.model).id == server.model
