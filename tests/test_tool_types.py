"""Every member of OpenAI's `Tool` union is accepted: functions inside a `namespace` are offered and their
calls carry the namespace; tool types with no backend here are served around (header, not offered), and
forcing one is a 400. The tools are those Codex CLI sends with every turn."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from conftest import OpenResponsesSchema, RunningServer, stream_events

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
    "additionalProperties": False,
}
SHELL = {"type": "function", "name": "exec_command", "description": "Run a command.", "parameters": CITY}
AGENTS = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Sub-agents.",
    "tools": [
        {"type": "function", "name": "spawn_agent", "description": "Start an agent in a city.", "parameters": CITY},
        {"type": "custom", "name": "notes", "description": "Free-form notes."},
    ],
}
UNSERVED = [
    {"type": "web_search", "external_web_access": False},
    {
        "type": "custom",
        "name": "apply_patch",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
    },
    {"type": "mcp", "server_label": "docs", "server_url": "http://127.0.0.1:1/mcp"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "local_shell"},
    {"type": "shell"},
    {"type": "apply_patch"},
    {"type": "tool_search"},
]
BASE = {"input": "Hello", "temperature": 0, "max_output_tokens": 16}


def test_codex_tool_list_is_served_and_unserved_tools_are_named(
    http: httpx.Client, schema: OpenResponsesSchema
) -> None:
    plain = http.post("/v1/responses", json=BASE).json()
    functions_only = http.post("/v1/responses", json={**BASE, "tools": [SHELL, AGENTS]}).json()
    response = http.post("/v1/responses", json={**BASE, "tools": [SHELL, AGENTS, *UNSERVED]})
    assert response.status_code == 200, response.text
    body = response.json()
    schema.response(body)
    assert [tool["type"] for tool in body["tools"]] == ["function", "namespace", *(t["type"] for t in UNSERVED)]
    assert body["tools"][2] == UNSERVED[0]  # echoed as sent
    expected = "custom, web_search, mcp, file_search, code_interpreter, local_shell, shell, apply_patch, tool_search"
    assert response.headers["x-respserve-unserved-tools"] == expected
    # The functions (the namespaced one too) are in the prompt; the unserved tools add nothing to it.
    assert functions_only["usage"]["input_tokens"] > plain["usage"]["input_tokens"] + 50
    assert body["usage"]["input_tokens"] == functions_only["usage"]["input_tokens"]
    assert "x-respserve-unserved-tools" not in http.post("/v1/responses", json=BASE).headers


def test_a_namespaced_call_carries_its_namespace(http: httpx.Client, schema: OpenResponsesSchema) -> None:
    body = {
        **BASE,
        "max_output_tokens": 60,
        "tools": [SHELL, AGENTS],
        "tool_choice": {"type": "function", "name": "spawn_agent"},
    }
    events, _ = stream_events(http, body)
    for event in events:
        schema.event(event)
    [call] = events[-1]["response"]["output"]
    assert call["type"] == "function_call"
    assert (call["namespace"], call["name"]) == ("multi_agent_v1", "spawn_agent")
    assert events[2]["item"]["namespace"] == "multi_agent_v1"
    jsonschema.validate(json.loads(call["arguments"]), CITY)
    # Sent back, with its output, the call renders under the same qualified name as through a chain.
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "started"}
    explicit = {**BASE, "tools": [SHELL, AGENTS], "input": [{"role": "user", "content": "Hello"}, call, result]}
    chained = {
        **BASE,
        "tools": [SHELL, AGENTS],
        "input": [result],
        "previous_response_id": events[-1]["response"]["id"],
    }
    sent_back = http.post("/v1/responses", json=explicit)
    through_chain = http.post("/v1/responses", json=chained)
    assert sent_back.status_code == 200 and through_chain.status_code == 200, sent_back.text
    assert sent_back.json()["usage"]["input_tokens"] == through_chain.json()["usage"]["input_tokens"]
    without_namespace = {**call, "namespace": None}
    other = http.post("/v1/responses", json={**explicit, "input": [explicit["input"][0], without_namespace, result]})
    assert other.json()["usage"]["input_tokens"] < sent_back.json()["usage"]["input_tokens"]


def test_plain_function_calls_have_no_namespace_key(http: httpx.Client) -> None:
    body = {**BASE, "max_output_tokens": 60, "tools": [SHELL, AGENTS], "tool_choice": "required"}
    call = http.post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "exec_command"}})
    assert "namespace" not in call.json()["output"][0]


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "web_search_preview"},
        {"type": "file_search"},
        {"type": "custom", "name": "apply_patch"},
        {"type": "mcp", "server_label": "docs"},
        {"type": "shell"},
    ],
)
def test_forcing_a_tool_with_no_backend_is_a_400(http: httpx.Client, choice: dict) -> None:
    response = http.post("/v1/responses", json={**BASE, "tools": [SHELL, *UNSERVED], "tool_choice": choice})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice.type" and choice["type"] in error["message"]


def test_openai_sdk_sends_codex_shaped_tools(server: RunningServer, client) -> None:
    response = client.responses.create(
        model=server.model,
        input=[{"type": "message", "role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tools=[SHELL, AGENTS, {"type": "web_search", "external_web_access": False}],  # type: ignore[list-item]
        tool_choice="auto",
        parallel_tool_calls=True,
        store=False,
        include=["reasoning.encrypted_content"],
        reasoning={"summary": "auto"},
        prompt_cache_key="codex-session",
        max_output_tokens=16,
        temperature=0,
    )
    assert response.status in ("completed", "incomplete")
    assert [tool.type for tool in response.tools] == ["function", "namespace", "web_search"]
