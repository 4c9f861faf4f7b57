"""MCP tools: respserve lists a server's tools, lets the model call them, runs the calls itself and goes
on, against a real MCP server (the `mcp` package's, streamable HTTP) that the tests start on localhost."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from conftest import (
    OpenResponsesSchema,
    RunningServer,
    ban,
    free_port,
    scripted_model,
    start_server,
    stop_server,
    stream_events,
    tokens_containing,
)
from mcp.server.mcpserver import MCPServer
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from respserve.api.mcp import MAX_GENERATIONS
from respserve.config import load_settings

TOKEN = "s3cret"
Small = Annotated[int, Field(ge=0, le=99)]  # bounded, so the forced call's JSON ends on any CPU


class _NeedsToken:
    """The MCP endpoint answers only requests that carry the bearer token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"authorization", f"Bearer {TOKEN}".encode()) not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"no"})
            return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    calculator = MCPServer("calculator")

    @calculator.tool(description="Add two small numbers.")
    def add(a: Small, b: Small) -> int:
        return a + b

    @calculator.tool(description="Always fails.")
    def explode(reason: Annotated[str, Field(max_length=8)]) -> str:
        raise RuntimeError("the tool blew up")

    port = free_port()
    config = uvicorn.Config(_NeedsToken(calculator.streamable_http_app()), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(10)


def _tool(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "mcp",
        "server_label": "calc",
        "server_url": url,
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        **extra,
    }


def _body(server: RunningServer, tools: list[dict], **extra: Any) -> dict[str, Any]:
    # After the forced first call the model may choose; without "<" it cannot call again, so it answers.
    return {
        "input": "What is 2 plus 3?",
        "tools": tools,
        "temperature": 0,
        "max_output_tokens": 24,
        "logit_bias": ban(tokens_containing(server, "<")),
        **extra,
    }


def test_the_model_calls_an_mcp_tool_and_goes_on_with_its_result(
    http: httpx.Client, server: RunningServer, mcp_url: str, schema: OpenResponsesSchema
) -> None:
    forced = {"type": "mcp", "server_label": "calc", "name": "add"}
    body = _body(server, [_tool(mcp_url, require_approval="never")], tool_choice=forced)
    events, _ = stream_events(http, body)
    for event in events:
        schema.event(event)
    final = events[-1]["response"]
    assert final["status"] in ("completed", "incomplete")
    listing, call, message = final["output"]
    assert listing["type"] == "mcp_list_tools" and listing["server_label"] == "calc" and listing["error"] is None
    assert {tool["name"] for tool in listing["tools"]} == {"add", "explode"}
    assert listing["tools"][0]["input_schema"]["type"] == "object"
    arguments = json.loads(call["arguments"])
    assert (call["type"], call["name"], call["status"]) == ("mcp_call", "add", "completed")
    assert call["output"] == str(arguments["a"] + arguments["b"])  # run by the real server
    assert message["type"] == "message"
    assert "headers" not in final["tools"][0]  # the token is never echoed
    types = [event["type"] for event in events]
    order = [
        "response.mcp_list_tools.completed",
        "response.mcp_call.in_progress",
        "response.mcp_call_arguments.done",
        "response.mcp_call.completed",
        "response.output_text.delta",
    ]
    assert [types.index(name) for name in order] == sorted(types.index(name) for name in order)
    # Two generations, one usage: the second saw the call and its output in its prompt.
    assert final["usage"]["input_tokens"] > 2 * 100


def test_a_failing_tool_and_a_refused_listing_are_reported_not_raised(
    http: httpx.Client, server: RunningServer, mcp_url: str
) -> None:
    forced = {"type": "mcp", "server_label": "calc", "name": "explode"}
    body = _body(server, [_tool(mcp_url, require_approval="never")], tool_choice=forced)
    call = http.post("/v1/responses", json=body).json()["output"][1]
    assert (call["name"], call["status"], call["output"]) == ("explode", "failed", None)
    assert "explode" in call["error"]["message"]  # what the server said went wrong
    no_token = {**_tool(mcp_url), "headers": None}
    response = http.post("/v1/responses", json=_body(server, [no_token]))
    assert response.status_code == 200
    listing = response.json()["output"][0]
    assert listing["type"] == "mcp_list_tools" and listing["tools"] == [] and listing["error"]


def test_approval_is_asked_then_the_approved_call_runs(http: httpx.Client, server: RunningServer, mcp_url: str) -> None:
    tools = [_tool(mcp_url, allowed_tools=["add"])]  # require_approval defaults to always, as at OpenAI
    first = http.post("/v1/responses", json=_body(server, tools, tool_choice="required")).json()
    listing, request = first["output"]
    assert [tool["name"] for tool in listing["tools"]] == ["add"]
    assert request["type"] == "mcp_approval_request" and request["name"] == "add"
    answer = {"type": "mcp_approval_response", "approval_request_id": request["id"], "approve": True}
    second = http.post(
        "/v1/responses", json=_body(server, tools, input=[answer], previous_response_id=first["id"])
    ).json()
    call = second["output"][0]  # the listing is reused from the chain, not repeated
    assert (call["type"], call["approval_request_id"], call["status"]) == ("mcp_call", request["id"], "completed")
    arguments = json.loads(request["arguments"])
    assert call["output"] == str(arguments["a"] + arguments["b"])
    unknown = {**answer, "approval_request_id": "mcpr_nope"}
    refused = http.post("/v1/responses", json=_body(server, tools, input=[unknown], previous_response_id=first["id"]))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[0].approval_request_id"


ADD = '<tool_call>{"name": "calc.add", "arguments": {"a": 2, "b": 3}}</tool_call>'
NATIVE_CHATML = (
    "{# tools are offered natively #}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def always_calling(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A model that calls calc.add after every turn, its result included: only a bound stops it."""
    folder = scripted_model(
        server, tmp_path_factory.mktemp("always-calling"), {"\n": ADD, ADD: ""}, NATIVE_CHATML, added=(ADD,)
    )
    data_dir = tmp_path_factory.mktemp("always-calling-data")
    uv_server, thread, running = start_server(
        load_settings(port=free_port(), model=str(folder), data_dir=str(data_dir))
    )
    yield running
    stop_server(uv_server, thread)


def test_the_loop_stops_at_max_tool_calls_or_at_the_generation_cap(always_calling: RunningServer, mcp_url: str) -> None:
    tools = [_tool(mcp_url, require_approval="never")]
    with httpx.Client(base_url=always_calling.base_url, timeout=120) as http:
        bounded = http.post("/v1/responses", json={"input": "Add.", "tools": tools, "max_tool_calls": 2}).json()
        assert [item["type"] for item in bounded["output"]] == ["mcp_list_tools", "mcp_call", "mcp_call"]
        assert [item["output"] for item in bounded["output"][1:]] == ["5", "5"]
        endless = http.post("/v1/responses", json={"input": "Add.", "tools": tools}).json()
        calls = [item for item in endless["output"] if item["type"] == "mcp_call"]
        assert len(calls) == MAX_GENERATIONS and all(call["status"] == "completed" for call in calls)
        assert endless["status"] == "completed"
