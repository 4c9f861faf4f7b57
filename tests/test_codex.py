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
import torch
from conftest import RunningServer, free_port, start_server, stop_server, tiny_qwen3
from transformers import AutoTokenizer

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
    """A 1-layer Qwen3 with SmolLM2's tokenizer and a 32k context whose first token is always the end token.

    Its layers add nothing (zero output projections), so the last position's hidden state is the embedding
    of the generation prompt's last token; the end token's output row points along that state, 400 logits
    above every other token: greedy or sampled, on any CPU, the reply ends at once, `completed`.
    """
    folder = tmp_path_factory.mktemp("tiny-long-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(server.state.default_model.worker.pipeline.tokenizer.name_or_path)
    model = tiny_qwen3(tokenizer, num_hidden_layers=1, max_position_embeddings=32768, tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        last = prompt[-1]
        state = model.model.norm(model.model.embed_tokens.weight[last])
        model.lm_head.weight.normal_(std=0.02)
        model.lm_head.weight[tokenizer.eos_token_id] = 50 * state / state.norm()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
    """A model that, asked anything, calls Codex's `exec_command` once, then ends its turn after the result.

    As in `ending_model` each next token depends on the current one alone. The whole call is one added
    token: after a user turn ("\n") the model writes it, after it the end token; after a tool result the
    template ends with `<answered>`, after which comes the end token. Each of the three states is a basis
    vector and each output row a multiple of one, so every step wins by 400 logits, on any CPU.
    """
    folder = tmp_path_factory.mktemp("tiny-calling-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(server.state.default_model.worker.pipeline.tokenizer.name_or_path)
    tokenizer.add_tokens([CALL, "<answered>"])
    tokenizer.chat_template = TOOL_TEMPLATE
    call, answered, newline = tokenizer.convert_tokens_to_ids([CALL, "<answered>"]) + [
        tokenizer.encode("\n", add_special_tokens=False)[0]
    ]
    model = tiny_qwen3(tokenizer, num_hidden_layers=1, max_position_embeddings=32768, tie_word_embeddings=False)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(hidden)
        for index, token in enumerate((newline, call, answered)):
            model.model.embed_tokens.weight[token] = basis[index]  # normed to basis[index] * sqrt(hidden)
        model.lm_head.weight.normal_(std=0.02)
        model.lm_head.weight[call] = 50 * basis[0]
        model.lm_head.weight[tokenizer.eos_token_id] = 50 * (basis[1] + basis[2])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def codex_server(ending_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("codex-data")
    settings = load_settings(port=free_port(), model=str(ending_model), data_dir=str(data_dir))
    uv_server, thread, running = start_server(settings)
    yield running
    stop_server(uv_server, thread)


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
