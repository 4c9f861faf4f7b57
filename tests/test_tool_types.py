"""Every member of OpenAI's `Tool` union is accepted: functions inside a `namespace` are offered and their
calls carry the namespace; tool types with no backend here are served around (header, not offered), and
forcing one is a 400. The tools are those Codex CLI sends with every turn."""

from __future__ import annotations

import json
import re
from typing import Any

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
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "tool_search"},
]
BASE = {"input": "Hello", "temperature": 0, "max_output_tokens": 16}


def _sent_back_as_through_the_chain(
    http: httpx.Client, tools: list[dict], call: dict, result: dict, previous_id: str
) -> dict:
    """Sends a call and its result back as input, and the result alone through `previous_response_id`:
    both must render the same prompt. Returns the first response."""
    explicit = {**BASE, "tools": tools, "input": [{"role": "user", "content": "Hello"}, call, result]}
    chained = {**BASE, "tools": tools, "input": [result], "previous_response_id": previous_id}
    sent_back, through_chain = http.post("/v1/responses", json=explicit), http.post("/v1/responses", json=chained)
    assert sent_back.status_code == 200 and through_chain.status_code == 200, sent_back.text
    assert sent_back.json()["usage"]["input_tokens"] == through_chain.json()["usage"]["input_tokens"]
    return sent_back.json()


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
    expected = "web_search, file_search, code_interpreter, tool_search"
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
    sent_back = _sent_back_as_through_the_chain(http, [SHELL, AGENTS], call, result, events[-1]["response"]["id"])
    without_namespace = {**call, "namespace": None}
    other_input = [{"role": "user", "content": "Hello"}, without_namespace, result]
    other = http.post("/v1/responses", json={**BASE, "tools": [SHELL, AGENTS], "input": other_input})
    assert other.json()["usage"]["input_tokens"] < sent_back["usage"]["input_tokens"]


def test_plain_function_calls_have_no_namespace_key(http: httpx.Client) -> None:
    body = {**BASE, "max_output_tokens": 60, "tools": [SHELL, AGENTS], "tool_choice": "required"}
    call = http.post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "exec_command"}})
    assert "namespace" not in call.json()["output"][0]


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "web_search_preview"},
        {"type": "file_search"},
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


PICK = {
    "type": "custom",
    "name": "pick_city",
    "description": "Name a city.",
    "format": {"type": "grammar", "syntax": "regex", "definition": "(Paris|Rome|Oslo) in [0-9]{4}"},
}
PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit a file.",
    "format": {
        "type": "grammar",
        "syntax": "lark",
        "definition": 'start: "*** Begin Patch\\n" LINE+ "*** End Patch"\nLINE: /[+-][a-z ]{1,20}\\n/',
    },
}


def test_a_forced_custom_tool_streams_input_its_grammar_allows(http: httpx.Client, schema: OpenResponsesSchema) -> None:
    body = {
        **BASE,
        "max_output_tokens": 40,
        "tools": [SHELL, PICK],
        "tool_choice": {"type": "custom", "name": "pick_city"},
    }
    events, _ = stream_events(http, body)
    for event in events:
        schema.event(event)
    final = events[-1]["response"]
    assert final["status"] == "completed"
    [call] = final["output"]
    assert call["type"] == "custom_tool_call" and call["id"].startswith("ctc_") and call["name"] == "pick_city"
    assert re.fullmatch(PICK["format"]["definition"], call["input"])
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert len(deltas) > 1 and "".join(deltas) == done["input"] == call["input"]
    assert final["tools"][1] == PICK and final["tool_choice"] == {"type": "custom", "name": "pick_city"}
    # Its output goes back as a custom_tool_call_output, with the call or through a chain: the same prompt.
    result = {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "done"}
    sent_back = _sent_back_as_through_the_chain(http, [PICK], call, result, final["id"])
    items = http.get(f"/v1/responses/{sent_back['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert [item["type"] for item in items] == ["message", "custom_tool_call", "custom_tool_call_output"]


def test_a_lark_grammar_shapes_a_namespaced_custom_call(http: httpx.Client) -> None:
    tools = [{"type": "namespace", "name": "files", "description": "File tools.", "tools": [PATCH]}]
    body = {**BASE, "max_output_tokens": 60, "tools": tools, "tool_choice": {"type": "custom", "name": "apply_patch"}}
    body["logit_bias"] = {"2": -100}  # the grammar ends the patch; the model may not stop inside it
    data = http.post("/v1/responses", json=body).json()
    [call] = data["output"]
    assert (call["type"], call["namespace"], call["name"]) == ("custom_tool_call", "files", "apply_patch")
    if data["status"] == "completed":
        assert re.fullmatch(r"\*\*\* Begin Patch\n([+-][a-z ]{1,20}\n)+\*\*\* End Patch", call["input"])
    else:  # out of tokens inside the patch: what was written is a prefix the grammar allows
        assert call["input"].startswith("*** Begin Patch\n")


def test_custom_tool_errors(http: httpx.Client) -> None:
    bad_grammar = {**PICK, "format": {"type": "grammar", "syntax": "lark", "definition": "start: ((("}}
    cases = [
        (
            {"tools": [bad_grammar], "tool_choice": {"type": "custom", "name": "pick_city"}},
            "tools[0].format.definition",
        ),
        ({"tools": [PICK], "tool_choice": {"type": "custom", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [SHELL], "tool_choice": {"type": "custom", "name": "exec_command"}}, "tool_choice.name"),
    ]
    for extra, param in cases:
        response = http.post("/v1/responses", json={**BASE, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("tool", "choice", "item_type", "prefix"),
    [
        ({"type": "shell"}, {"type": "shell"}, "shell_call", "sh_"),
        ({"type": "apply_patch"}, {"type": "apply_patch"}, "apply_patch_call", "apc_"),
        ({"type": "local_shell"}, "required", "local_shell_call", "lsh_"),
    ],
)
def test_client_executed_tools_become_their_call_items(
    http: httpx.Client, schema: OpenResponsesSchema, tool: dict, choice: Any, item_type: str, prefix: str
) -> None:
    body = {**BASE, "max_output_tokens": 60, "tools": [tool], "tool_choice": choice}
    events, _ = stream_events(http, body)
    for event in events:
        schema.event(event)
    final = events[-1]["response"]
    [call] = final["output"]
    assert call["type"] == item_type and call["id"].startswith(prefix) and call["call_id"].startswith("call_")
    if item_type == "shell_call":
        assert isinstance(call["action"]["commands"], list)
    elif item_type == "apply_patch_call":
        assert call["operation"]["type"] in ("create_file", "update_file", "delete_file")
    else:
        assert call["action"]["type"] == "exec" and isinstance(call["action"]["command"], list)
    # The client runs it and sends the result back: with the call, or through the chain, the same prompt.
    outputs = {
        "shell_call": {
            "type": "shell_call_output",
            "call_id": call["call_id"],
            "output": [{"stdout": "hi\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}],
        },
        "apply_patch_call": {"type": "apply_patch_call_output", "call_id": call["call_id"], "status": "completed"},
        "local_shell_call": {"type": "local_shell_call_output", "id": call["call_id"], "output": "hi"},
    }
    result = outputs[item_type]
    _sent_back_as_through_the_chain(http, [tool], call, result, final["id"])
