"""`text.format` (JSON object, JSON schema) by constrained decoding, and token logprobs."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import OpenResponsesSchema, RunningServer, ban, stream_events, tokens_containing

# Every value is bounded, so the JSON ends within max_output_tokens whatever the model writes.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 10000},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy"]},
    },
    "required": ["city", "population_millions", "country"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}


def test_json_schema_output_validates(
    client: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    for prompt in ("Give me data about Paris as JSON.", "Tell me about Berlin.", "Write a poem."):
        response = client.responses.create(
            model=server.model, input=prompt, temperature=0, max_output_tokens=100, text={"format": JSON_SCHEMA_FORMAT}
        )
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)
        body = response.model_dump(mode="json", exclude_unset=True, by_alias=True)
        schema.response(body)
        assert body["text"]["format"]["schema"] == CITY_SCHEMA  # echoed under its wire name


def test_json_schema_streams(http, schema: OpenResponsesSchema) -> None:
    body = {"input": "Data about Rome, please.", "temperature": 0.8, "seed": 3, "max_output_tokens": 100}
    events, _ = stream_events(http, {**body, "text": {"format": JSON_SCHEMA_FORMAT}})
    for event in events:
        schema.event(event)
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    jsonschema.validate(json.loads(deltas), CITY_SCHEMA)


def test_json_object_output_parses(client: openai.OpenAI, server: RunningServer) -> None:
    # With every token holding a '"' banned, the one JSON object the grammar leaves is {}: the reply must
    # be exactly that on any CPU, and without the grammar it would be free text.
    response = client.responses.create(
        model=server.model,
        input="List three colors.",
        temperature=0,
        max_output_tokens=100,
        text={"format": {"type": "json_object"}},
        extra_body={"logit_bias": ban(tokens_containing(server, '"'))},
    )
    assert response.status == "completed"
    assert json.loads(response.output_text) == {}


def test_invalid_schema_is_400(http) -> None:
    bad = {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}
    response = http.post("/v1/responses", json={"input": "hi", "text": {"format": bad}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "text.format.schema"


def test_logprobs_in_the_resource_and_the_deltas(http) -> None:
    body = {
        "input": "Say hello in French.",
        "temperature": 0,
        "max_output_tokens": 24,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 3,
    }
    data = http.post("/v1/responses", json=body).json()
    part = data["output"][0]["content"][0]
    logprobs = part["logprobs"]
    assert logprobs and len(logprobs) <= data["usage"]["output_tokens"]
    assert bytes(b for entry in logprobs for b in entry["bytes"]).decode() == part["text"]
    for entry in logprobs:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        values = [top["logprob"] for top in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy picks the most likely

    events, _ = stream_events(http, body)
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == streamed
    # The second request reuses the first one's prompt KV from the prefix cache and computes only the rest,
    # so its float32 sums run in another order: the same tokens, log-probabilities equal to rounding.
    assert [entry["token"] for entry in streamed] == [entry["token"] for entry in logprobs]
    for again, first in zip(streamed, logprobs, strict=True):
        assert abs(again["logprob"] - first["logprob"]) < 1e-3


@pytest.mark.parametrize("extra", [{}, {"top_logprobs": 5}])
def test_no_logprobs_unless_included(http, extra: dict) -> None:
    data = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 16, **extra}).json()
    assert data["output"][0]["content"][0]["logprobs"] == []


def test_top_logprobs_bounds(http) -> None:
    response = http.post("/v1/responses", json={"input": "Hi", "top_logprobs": 21})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"
