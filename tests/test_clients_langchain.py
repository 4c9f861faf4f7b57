"""LangChain's ChatOpenAI on the Responses API (`use_responses_api=True`) against respserve.

Assertions are on protocol facts (ids, statuses, usage, what the server stored) and on outputs that
constrained decoding fixes (forced tool calls, structured output), never on the model's free text.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import RunningServer
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class GetWeather(BaseModel):
    """The weather forecast for a city."""

    # Bounded fields: the forced call's JSON closes by itself on any CPU (the server closes the object to
    # other keys, as OpenAI's strict mode does, though LangChain's schema does not say so).
    city: str = Field(max_length=24)
    days: int = Field(ge=1, le=7)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


PERSON_SCHEMA: dict[str, Any] = {
    "title": "Person",
    "description": "A person.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "friends"],
    "additionalProperties": False,
}


def chat(server: RunningServer, max_tokens: int) -> ChatOpenAI:
    return ChatOpenAI(
        model=server.model,
        base_url=f"{server.base_url}/v1",
        api_key="x",
        use_responses_api=True,
        temperature=0,
        max_tokens=max_tokens,
        max_retries=0,
        timeout=300,
    )


def stored(http: httpx.Client, response_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/responses/{response_id}")
    assert response.status_code == 200, response.text
    return response.json()


def assert_text_reply(message: AIMessage, http: httpx.Client) -> None:
    """A 16-token reply, `completed` or cut at the cap (which one depends on the CPU), as the server stored it."""
    assert message.id is not None and message.id.startswith("resp_")
    [block] = message.content
    assert isinstance(block, dict) and block["type"] == "text" and block["id"].startswith("msg_")
    body = stored(http, message.id)
    assert message.response_metadata["status"] == body["status"] in ("completed", "incomplete")
    assert message.text == body["output"][0]["content"][0]["text"]
    usage = message.usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        body["usage"]["input_tokens"],
        body["usage"]["output_tokens"],
    )
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    if body["status"] == "incomplete":
        assert usage["output_tokens"] == 16
    else:
        assert 0 < usage["output_tokens"] <= 16


def test_invoke_and_stream(server: RunningServer, http: httpx.Client) -> None:
    llm = chat(server, max_tokens=16)
    invoked = llm.invoke("Say hello.")
    assert_text_reply(invoked, http)
    chunks = list(llm.stream("Say hello."))
    assert len(chunks) > 1 and all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    # The merged chunks read like the invoked message and hold what the server stored for their response.
    assert_text_reply(merged, http)
    shared = {"incomplete_details"}  # present only on an `incomplete` reply
    assert set(merged.response_metadata) | shared == set(invoked.response_metadata) | shared
    assert merged.usage_metadata is not None and invoked.usage_metadata is not None
    assert merged.usage_metadata["input_tokens"] == invoked.usage_metadata["input_tokens"]


def test_forced_tool_call(server: RunningServer, http: httpx.Client) -> None:
    llm = chat(server, max_tokens=200).bind_tools([GetWeather], tool_choice="GetWeather")
    message = llm.invoke("What is the weather in Paris this week?")
    assert message.invalid_tool_calls == []
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    assert message.id is not None
    body = stored(http, message.id)
    assert body["status"] == "completed"
    [item] = body["output"]
    assert item["type"] == "function_call" and item["id"].startswith("fc_")
    assert item["call_id"] == call["id"]
    assert json.loads(item["arguments"]) == call["args"]


@pytest.mark.parametrize("schema", [Person, PERSON_SCHEMA], ids=["pydantic", "json-schema"])
def test_structured_output(server: RunningServer, http: httpx.Client, schema: type[Person] | dict[str, Any]) -> None:
    llm = chat(server, max_tokens=200).with_structured_output(schema, include_raw=True)
    result = llm.invoke("Describe a person.")
    assert result["parsing_error"] is None
    parsed = result["parsed"]
    if isinstance(schema, dict):
        jsonschema.validate(parsed, schema)
    else:
        assert isinstance(parsed, Person)
    body = stored(http, result["raw"].id)
    assert body["status"] == "completed"
    assert body["text"]["format"]["type"] == "json_schema"
