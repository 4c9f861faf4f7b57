"""Codex CLI, the client people most often point at a self-hosted Responses server, run for real.

Codex sends ~10k tokens of instructions, function tools, a `namespace` tool and `web_search` every turn.
A turn needs a model whose context holds that, so the test builds one: a tiny random Qwen3 with a long
context whose reply is the end token at once on any CPU (below), since Codex fails a turn that ends
`incomplete` and the words of a random model are no test's business.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, free_port, scripted_model, serving, start_server, stop_server

from respserve.config import load_settings

CODEX_VERSION = "0.169.0"


@pytest.fixture(scope="module")
def codex() -> Path:
    """The pinned Codex CLI from the npm registry, installed once into the cache dir."""
    if shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("npm is needed for the Codex CLI tests")
        pytest.skip("npm is not installed")
    cache = Path(os.environ.get("RESPSERVE_CACHE", Path.home() / ".cache" / "respserve"))
    prefix = cache / "npm" / f"codex-{CODEX_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "codex"
    if not binary.exists():
        command = [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(prefix),
            f"@openai/codex@{CODEX_VERSION}",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
    return binary


@pytest.fixture(scope="module")
def ending_model(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose first token, after the generation prompt's last ("\n"), is always the end token."""
    return scripted_model(server, tmp_path_factory.mktemp("ending-model"), {"\n": ""})


CALL = '<tool_call>{"name": "exec_command", "arguments": {"cmd": "echo respserve-ok"}}</tool_call>'
# ChatML that knows tools (so tool turns reach it as such), whose generation prompt after a tool result
# ends with a token of its own.
TOOL_TEMPLATE = (
    "{# tools are offered natively #}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if messages[-1]['role'] == 'tool' %}<answered>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def calling_model(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that, asked anything, calls Codex's `exec_command` once (the whole call is one added token),
    and after the tool result (the template then ends with `<answered>`) ends its turn."""
    script = {"\n": CALL, CALL: "", "<answered>": ""}
    folder = tmp_path_factory.mktemp("calling-model")
    return scripted_model(server, folder, script, TOOL_TEMPLATE, added=(CALL, "<answered>"))


@pytest.fixture(scope="module")
def codex_server(ending_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("codex-data")
    settings = load_settings(port=free_port(), model=str(ending_model), data_dir=str(data_dir))
    yield from serving(settings)


def run_codex(codex: Path, server: RunningServer, home: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    """`codex exec --json` with a config.toml whose provider is this server (wire_api = responses)."""
    (home / "codex").mkdir(parents=True, exist_ok=True)
    (home / "codex" / "config.toml").write_text(
        f'model = "{server.model}"\nmodel_provider = "respserve"\n\n'
        "[model_providers.respserve]\n"
        'name = "respserve"\n'
        f'base_url = "{server.base_url}/v1"\n'
        'wire_api = "responses"\n'
    )
    (home / "work").mkdir(exist_ok=True)
    env = {**os.environ, "CODEX_HOME": str(home / "codex"), "OPENAI_API_KEY": "unused"}
    return subprocess.run(
        [str(codex), "exec", "--json", "--skip-git-repo-check", prompt],
        cwd=home / "work",
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _posts(server: RunningServer, status: int) -> float:
    """How many `POST /v1/responses` the server answered with `status`, from its own metrics."""
    metrics = httpx.get(f"{server.base_url}/metrics").text
    pattern = rf'^respserve:http_requests_total{{method="POST",route="/v1/responses",status="{status}"}} (\S+)$'
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_codex_completes_a_turn(codex: Path, codex_server: RunningServer, tmp_path: Path) -> None:
    before = _posts(codex_server, 200)
    result = run_codex(codex, codex_server, tmp_path, "Say hello.")
    events = _events(result.stdout)
    types = [event["type"] for event in events]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "turn.completed" in types and "turn.failed" not in types and "error" not in types, types
    assert _posts(codex_server, 200) == before + 1  # one streamed turn, nothing refused or retried


def test_codex_with_a_small_context_gets_one_clear_error(codex: Path, server: RunningServer, tmp_path: Path) -> None:
    # SmolLM2's 8,192 tokens cannot hold Codex's instructions: one 400 context_length_exceeded, no retries.
    before = _posts(server, 400)
    result = run_codex(codex, server, tmp_path, "Say hello.")
    assert result.returncode != 0
    assert "context window" in result.stdout + result.stderr
    assert _posts(server, 400) == before + 1


def test_codex_runs_the_command_the_model_calls_and_sends_its_output_back(
    codex: Path, calling_model: Path, tmp_path: Path
) -> None:
    settings = load_settings(port=free_port(), model=str(calling_model), data_dir=str(tmp_path / "data"))
    uv_server, thread, running = start_server(settings)
    try:
        before = _posts(running, 200)
        result = run_codex(codex, running, tmp_path, "Check the setup.")
        events = _events(result.stdout)
        assert result.returncode == 0, result.stdout + result.stderr
        commands = [
            event["item"]
            for event in events
            if event["type"] == "item.completed" and event["item"]["type"] == "command_execution"
        ]
        assert commands and "echo respserve-ok" in commands[0]["command"], events
        assert [event["type"] for event in events if event["type"].startswith("turn.")] == [
            "turn.started",
            "turn.completed",
        ]
        # The call, then the request carrying its function_call_output, which the model answered.
        assert _posts(running, 200) == before + 2
    finally:
        stop_server(uv_server, thread)
