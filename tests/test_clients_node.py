"""Real JavaScript clients against respserve: openai-node and the Vercel AI SDK (tests/clients/*.mjs).

The pinned npm packages are installed once into the cache dir (keyed by the lock file's hash), so reruns
skip the install. Each script prints one JSON line of what its SDK parsed; the tests assert on protocol
facts only (ids, statuses, events, usage, schema validity), never on the model's free text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import OpenResponsesSchema, RunningServer

CLIENTS = Path(__file__).parent / "clients"


def _install(prefix: Path) -> None:
    """`npm ci` (or `npm install` without a lock) into a fresh folder renamed into place at the end, so an
    interrupted install never leaves a cache that looks complete."""
    staging = prefix.with_name(f"{prefix.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        if (CLIENTS / name).exists():
            shutil.copy(CLIENTS / name, staging / name)
    verb = "ci" if (staging / "package-lock.json").exists() else "install"
    command = ["npm", verb, "--no-audit", "--no-fund", "--loglevel=error"]
    result = subprocess.run(command, cwd=staging, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"npm {verb} failed:\n{result.stderr}"
    try:
        staging.rename(prefix)
    except OSError:  # another run installed the same lock meanwhile
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="module")
def node_scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the scripts and a `node_modules` link into the cache (ESM imports ignore
    NODE_PATH; they resolve from the script's own folder)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the JavaScript client tests")
        pytest.skip("node or npm is not installed")
    lock = CLIENTS / "package-lock.json"
    digest = hashlib.sha256((lock if lock.exists() else CLIENTS / "package.json").read_bytes()).hexdigest()
    cache = Path(os.environ.get("RESPSERVE_CACHE", Path.home() / ".cache" / "respserve"))
    prefix = cache / "npm" / f"clients-{digest[:16]}"
    if not prefix.exists():
        _install(prefix)
    folder = tmp_path_factory.mktemp("node-clients")
    for script in CLIENTS.glob("*.mjs"):
        shutil.copy(script, folder / script.name)
    (folder / "node_modules").symlink_to(prefix / "node_modules", target_is_directory=True)
    return folder


def run_script(folder: Path, name: str, server: RunningServer) -> dict[str, Any]:
    """Runs one client script; its last stdout line is the JSON of facts."""
    result = subprocess.run(
        ["node", name, f"{server.base_url}/v1", server.model],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def openai_node(node_scripts: Path, server: RunningServer) -> dict[str, Any]:
    return run_script(node_scripts, "openai_node.mjs", server)


@pytest.fixture(scope="module")
def ai_sdk(node_scripts: Path, server: RunningServer) -> dict[str, Any]:
    return run_script(node_scripts, "ai_sdk.mjs", server)


def assert_ended(response: dict[str, Any]) -> None:
    """A 16-token reply ends by itself or at the cap; which one depends on the CPU, both are valid."""
    usage = response["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    if response["status"] == "incomplete":
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert usage["output_tokens"] == 16
    else:
        assert response["status"] == "completed"
        assert 0 < usage["output_tokens"] <= 16


def output_text(response: dict[str, Any]) -> str:
    parts = [part for item in response["output"] if item["type"] == "message" for part in item["content"]]
    return "".join(part["text"] for part in parts if part["type"] == "output_text")


def test_openai_node_create_and_retrieve(openai_node: dict[str, Any], schema: OpenResponsesSchema) -> None:
    created = openai_node["created"]
    schema.response(created)
    assert created["id"].startswith("resp_")
    assert [item["type"] for item in created["output"]] == ["message"]
    assert created["output"][0]["id"].startswith("msg_")
    assert_ended(created)
    # The SDK's own `output_text` is built from the output items: it read them as we wrote them.
    assert openai_node["created_output_text"] == output_text(created)
    retrieved = openai_node["retrieved"]
    schema.response(retrieved)
    for key in ("id", "status", "output", "usage", "incomplete_details"):
        assert retrieved[key] == created[key]


def test_openai_node_stream(openai_node: dict[str, Any], schema: OpenResponsesSchema) -> None:
    events = openai_node["events"]
    for event in events:
        schema.event(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    types = [event["type"] for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    final = events[-1]["response"]
    assert types[-1] == f"response.{final['status']}"
    assert_ended(final)
    assert final["id"] == events[0]["response"]["id"] and final["id"].startswith("resp_")
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert {event["item_id"] for event in deltas} == {final["output"][0]["id"]}
    assert "".join(event["delta"] for event in deltas) == output_text(final)


def test_openai_node_previous_response_chain(openai_node: dict[str, Any], schema: OpenResponsesSchema) -> None:
    first, second = openai_node["chain"]
    for response in (first, second):
        schema.response(response)
        assert_ended(response)
    assert second["previous_response_id"] == first["id"]
    # The second prompt holds the whole first turn, then the new question.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]


def assert_usage(usage: dict[str, Any]) -> None:
    """The AI SDK's usage, with the server's own numbers under `raw`."""
    assert usage["inputTokens"] == usage["raw"]["input_tokens"] > 0
    assert usage["outputTokens"] == usage["raw"]["output_tokens"] > 0
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]


def assert_capped_reply(reply: dict[str, Any]) -> None:
    """A 16-token reply: `stop`, or `length` (the SDK's name for `incomplete` / `max_output_tokens`) at
    exactly the cap; which one depends on the CPU."""
    assert reply["responseId"].startswith("resp_")
    assert_usage(reply["usage"])
    if reply["finishReason"] == "length":
        assert reply["usage"]["outputTokens"] == 16
    else:
        assert reply["finishReason"] == "stop"
        assert reply["usage"]["outputTokens"] <= 16


def test_ai_sdk_generate_text(ai_sdk: dict[str, Any]) -> None:
    text = ai_sdk["text"]
    assert_capped_reply(text)
    assert text["providerMetadata"]["openai"]["responseId"] == text["responseId"]


def test_ai_sdk_stream_text(ai_sdk: dict[str, Any]) -> None:
    stream = ai_sdk["stream"]
    assert stream["errors"] == []
    assert_capped_reply(stream)
    assert stream["deltas"] > 0
    assert stream["text"] == stream["finalText"]


def test_ai_sdk_forced_tool_call(ai_sdk: dict[str, Any], http: httpx.Client) -> None:
    forced = ai_sdk["tool"]
    assert forced["invalid"] == []
    assert forced["finishReason"] == "tool-calls"
    [call] = forced["toolCalls"]
    assert call["toolName"] == "get_weather"
    jsonschema.validate(call["input"], forced["schema"])
    assert_usage(forced["usage"])
    # The SDK's call is the server's stored function_call item.
    stored = http.get(f"/v1/responses/{forced['responseId']}").json()
    [item] = stored["output"]
    assert item["type"] == "function_call" and item["status"] == "completed"
    assert item["id"] == call["providerMetadata"]["openai"]["itemId"] and item["id"].startswith("fc_")
    assert item["call_id"] == call["toolCallId"]
    assert json.loads(item["arguments"]) == call["input"]


def test_ai_sdk_generate_object(ai_sdk: dict[str, Any], http: httpx.Client) -> None:
    result = ai_sdk["object"]
    jsonschema.validate(result["object"], result["schema"])
    assert result["finishReason"] == "stop"
    assert_usage(result["usage"])
    stored = http.get(f"/v1/responses/{result['responseId']}").json()
    assert stored["status"] == "completed"
    assert stored["text"]["format"]["type"] == "json_schema"
    assert json.loads(output_text(stored)) == result["object"]
