"""Creating responses without streaming, as a user of the openai SDK and of plain HTTP sees them."""

from __future__ import annotations

import openai
from conftest import OpenResponsesSchema, RunningServer, ban, never_ends, prompt_tokens

QUESTION = "What is the capital of France?"


def test_string_input_answers_and_counts_real_tokens(
    client: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    response = client.responses.create(model=server.model, input=QUESTION, temperature=0)
    schema.response(response.model_dump(mode="json", exclude_unset=True))
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output[0].id.startswith("msg_")
    assert response.usage is not None
    assert response.usage.input_tokens == prompt_tokens(server, [{"role": "user", "content": QUESTION}])
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    # Whatever came from the prefix cache is whole KV blocks of the prompt, never its last token.
    cached = response.usage.input_tokens_details.cached_tokens
    assert cached % server.state.default_model.worker.kv_cache.block_size == 0
    assert cached < response.usage.input_tokens
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


def test_stop_string_cuts_the_answer(http, server: RunningServer) -> None:
    body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 32, "logit_bias": never_ends(server)}
    full = http.post("/v1/responses", json=body).json()["output"][0]["content"][0]["text"]
    words = full.split()
    stop = words[len(words) // 2]  # a word from the middle of whatever this CPU's greedy answer is
    response = http.post("/v1/responses", json={**body, "stop": [stop]}).json()
    assert response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == full[: full.index(stop)]


def test_penalties_change_sampling(http, server: RunningServer) -> None:
    # A +100 bias makes greedy repeat one token on any CPU; a frequency penalty of 2 per use outweighs
    # that bias after about 50 repeats, so the penalised reply must leave the token before 100.
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    [cat] = tokenizer.encode(" cat", add_special_tokens=False)
    body = {"input": "Hi", "temperature": 0, "max_output_tokens": 100, "logit_bias": {str(cat): 100}}
    plain = http.post("/v1/responses", json=body).json()
    assert plain["output"][0]["content"][0]["text"] == " cat" * 100
    penalised = http.post("/v1/responses", json={**body, "frequency_penalty": 2}).json()
    assert penalised["output"][0]["content"][0]["text"] != " cat" * 100
    assert penalised["output"][0]["content"][0]["text"].startswith(" cat" * 10)
    assert penalised["frequency_penalty"] == 2


def test_logit_bias_steers_and_bans_tokens(http, server: RunningServer) -> None:
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 16, "include": ["message.output_text.logprobs"]}
    plain = http.post("/v1/responses", json=body).json()["output"][0]["content"][0]
    first = plain["logprobs"][0]["token"]
    same_text = [token for token in range(len(tokenizer)) if tokenizer.decode([token]) == first]
    banned = http.post("/v1/responses", json={**body, "logit_bias": ban(same_text)}).json()
    assert banned["logit_bias"] == ban(same_text)
    assert banned["output"][0]["content"][0]["logprobs"][0]["token"] != first
    paris = tokenizer.encode("Paris", add_special_tokens=False)[0]
    forced = http.post("/v1/responses", json={**body, "logit_bias": {str(paris): 100}}).json()
    assert forced["output"][0]["content"][0]["text"] == tokenizer.decode([paris]) * 16
    for bad, param in (({"x": 1}, "logit_bias"), ({"5": 101}, "logit_bias"), ({"999999": 1}, "logit_bias.999999")):
        error = http.post("/v1/responses", json={**body, "logit_bias": bad})
        assert error.status_code == 400 and error.json()["error"]["param"] == param


def test_models_lists_the_served_model(client: openai.OpenAI, server: RunningServer) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [server.model]
    assert models.data[0].object == "model"
    assert client.models.retrieve(server.model).id == server.model
