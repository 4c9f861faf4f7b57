"""Shared fixtures: one real server with the real default model for the whole session."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import jsonschema
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from transformers import AutoTokenizer

from respserve.api.app import create_app
from respserve.api.state import AppState
from respserve.config import Settings, load_settings
from respserve.engine.block_manager import NULL_BLOCK
from respserve.engine.cpu_kernels import load_cpu_kernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# CI sees the same generated cases every run; locally, hypothesis explores anew each time.
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

# OpenMP spin iterations between parallel regions for servers that share cores (libgomp's default, 300,000,
# let two replicas on two cores starve each other: README "Running several replicas").
SHARED_CORES_OPENMP_SPIN = "10000"

# Where servers build and keep respserve's CPU kernels (engine/cpu_kernels.py); the tests load them from there.
KERNEL_DIR = load_settings().cache_dir / "kernels"
needs_kernels = pytest.mark.skipif(not load_cpu_kernels(KERNEL_DIR), reason="the CPU kernels cannot be built here")

SPEC_PATH = Path(
    os.environ.get(
        "RESPSERVE_SPEC",
        Path(__file__).resolve().parents[2] / "shared" / "spec" / "openresponses-openapi.json",
    )
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    app: FastAPI
    base_url: str

    @property
    def state(self) -> AppState:
        return self.app.state.respserve

    @property
    def model(self) -> str:
        return self.state.default_model.name


def start_server(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, RunningServer]:
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300  # the first run converts the GGUF
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, RunningServer(app=app, base_url=f"http://127.0.0.1:{settings.port}")


def prompt_tokens(server: RunningServer, messages: list[dict[str, str]]) -> int:
    """How many tokens the served model's chat template makes of `messages`: what `usage` must count."""
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def ban(token_ids: Iterable[int]) -> dict[str, float]:
    """A `logit_bias` under which none of `token_ids` is ever sampled."""
    return {str(token): -100 for token in token_ids}


def never_ends(server: RunningServer) -> dict[str, float]:
    """A `logit_bias` that bans every token the served model ends on. Greedy float32 text differs between
    CPUs (AVX2 vs AVX-512), so a test that needs a reply to run long forces it: with this bias the reply
    runs to `max_output_tokens` on any machine."""
    return ban(server.state.default_model.worker.pipeline.eos_token_ids)


def tokens_containing(server: RunningServer, characters: str) -> list[int]:
    """Every token of the served model whose text holds one of `characters`."""
    tokenizer = server.state.default_model.worker.pipeline.tokenizer
    return [token for token in range(len(tokenizer)) if any(c in tokenizer.decode([token]) for c in characters)]


def long_job(server: RunningServer, max_output_tokens: int = 2000, **body: Any) -> dict[str, Any]:
    """A request body whose generation surely lasts `max_output_tokens` tokens (about 50 ms each here)."""
    return {
        "input": "Count from one to one thousand.",
        "temperature": 0,
        "max_output_tokens": max_output_tokens,
        "logit_bias": never_ends(server),
        **body,
    }


def sdk_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as keyword arguments of the openai SDK: the fields it does not name go in `extra_body`."""
    extra = {key: body[key] for key in ("logit_bias", "seed", "stop", "top_k") if key in body}
    return {**{key: value for key, value in body.items() if key not in extra}, "extra_body": extra}


def assert_same_greedy_tokens(together: dict[str, Any], alone: dict[str, Any]) -> None:
    """Two greedy answers (with logprobs, top 2) of one prompt computed differently: batched and solo, or
    with and without the CPU kernels. float32 sums in another order round differently, so where two tokens
    were all but tied one run may pick the other: the streams must agree up to such a tie. A row mixed up
    with another's KV, or a wrong kernel, would diverge where the second run saw no tie."""
    ours = together["output"][0]["content"][0]["logprobs"]
    solo = alone["output"][0]["content"][0]["logprobs"]
    assert len(ours) == len(solo)
    for mine, theirs in zip(ours, solo, strict=True):
        if mine["token"] != theirs["token"]:
            runner_up = theirs["top_logprobs"][1]
            assert runner_up["token"] == mine["token"] and theirs["logprob"] - runner_up["logprob"] < 0.05
            return


def fixed_reply(text: str) -> dict[str, Any]:
    """A `text.format` under which constrained decoding can write only the JSON string `text`: a reply of
    known content and length, ending by itself, on any CPU."""
    schema = {"type": "string", "enum": [text]}
    return {"format": {"type": "json_schema", "name": "fixed", "schema": schema, "strict": True}}


def decode_greedily(
    scheduler: Any,
    runner: Any,
    max_new: int,
    check: Callable[[Any, torch.Tensor], None],
    after_step: Callable[[list[Any]], None] | None = None,
    steps: int = 500,
) -> None:
    """The engine's own loop over what `scheduler` holds: each step run by `runner`, then `after_step(chunks)`,
    then every sampled row handed to `check(sequence, logits)` before its argmax is appended; a sequence ends
    at `max_new` output tokens. Ends, within `steps` steps, with nothing running, waiting or refused."""
    for _ in range(steps):
        chunks = scheduler.schedule()
        if not chunks:
            break
        logits = runner.run(chunks)
        scheduler.computed(chunks)
        if after_step is not None:
            after_step(chunks)
        for sequence, row in zip([chunk.sequence for chunk in chunks if chunk.samples], logits, strict=True):
            check(sequence, row)
            token = int(row.argmax())
            sequence.token_ids.append(token)
            sequence.output_ids.append(token)
            if len(sequence.output_ids) == max_new:
                scheduler.finish(sequence)
    assert not scheduler.running and not scheduler.waiting and not scheduler.too_long


class TextTokens:
    """A text sequence as the block manager and `StepInputs.of` read it: its tokens and blocks, no images."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_computed = 0
        self.hash_salt: tuple[int, int] | None = None
        self.images = None
        self.rope_positions = None
        self.image_spans: tuple[tuple[int, int], ...] = ()


STALE = 1e4  # a finished sequence's KV left in a block: a row that read it would be far off


def unwritten(attention: str) -> float:
    """What a test fills a pool's unwritten slots with: NaN garbage, or, in the zeroed pool flex attention
    needs (it weighs masked slots by 0, and 0 x NaN is NaN), a finished sequence's KV."""
    return STALE if attention == "flex" else float("nan")


def decode_step(
    lengths: list[int],
    kv_heads: int,
    block_size: int = 4,
    seed: int = 0,
    garbage: float = float("nan"),
    head_dim: int = 16,
) -> tuple[list[torch.Tensor], list[list[int]], list[tuple[int, int]], int]:
    """A pool (keys, values) with `garbage` in every slot no row has written, block tables in shuffled
    order, and the spans of a step in which each row decodes its last token."""
    torch.manual_seed(seed)
    blocks = 64
    pool = [torch.full((blocks * block_size, kv_heads, head_dim), garbage) for _ in range(2)]
    for tensor in pool:
        tensor[NULL_BLOCK * block_size : (NULL_BLOCK + 1) * block_size] = 0
    free = torch.randperm(blocks - 1)[: sum(-(-n // block_size) for n in lengths)] + 1
    tables, taken = [], 0
    for n in lengths:
        count = -(-n // block_size)
        table = free[taken : taken + count].tolist()
        taken += count
        slots = (torch.tensor(table)[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        for tensor in pool:
            tensor[slots] = torch.randn(n, kv_heads, head_dim)
        tables.append(table)
    spans = [(n - 1, n) for n in lengths]
    return pool, tables, spans, block_size


# The layers of every tiny random text model the tests build (head size 16).
TINY_LAYERS: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_qwen3(tokenizer: Any, **overrides: Any) -> Any:
    """A Qwen3 of a few hundred thousand random weights (seeded) over `tokenizer`: a model whose context,
    layers and template a test chooses, built here rather than fetched."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape: dict[str, Any] = {**TINY_LAYERS, "head_dim": 16, "max_position_embeddings": 1024}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**shape, **overrides},
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def scripted_model(
    server: RunningServer,
    folder: Path,
    next_token: dict[str, str],
    chat_template: str | None = None,
    added: tuple[str, ...] = (),
) -> Path:
    """Saves a tiny 32k-context Qwen3 (SmolLM2's tokenizer, plus `added` tokens) whose next token depends
    on the current one alone, as `next_token` says (texts of single tokens; "" is the end token).

    Its layer adds nothing (zero output projections), so the last position's hidden state is the normed
    embedding of the current token; each scripted token's embedding is a basis vector, and the output row of
    what follows it points along that vector: every scripted step wins by 400 logits, greedy or sampled, on
    any CPU. A model that answers the same on every machine, for clients that need a whole turn."""
    tokenizer = AutoTokenizer.from_pretrained(server.state.default_model.worker.pipeline.tokenizer.name_or_path)
    tokenizer.add_tokens(list(added))
    if chat_template is not None:
        tokenizer.chat_template = chat_template

    def token(text: str) -> int:
        if not text:
            return tokenizer.eos_token_id
        [single] = tokenizer.encode(text, add_special_tokens=False)
        return single

    model = tiny_qwen3(tokenizer, num_hidden_layers=1, max_position_embeddings=32768, tie_word_embeddings=False)
    basis = torch.eye(model.config.hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.normal_(std=0.02)
        model.lm_head.weight[tokenizer.eos_token_id] = 0
        for index, (current, following) in enumerate(next_token.items()):
            model.model.embed_tokens.weight[token(current)] = basis[index]
            model.lm_head.weight[token(following)] += 50 * basis[index]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Polls `condition` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def spawn_server(port: int, data_dir: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`respserve serve` as its own process (to kill or signal it), once it answers /health."""
    command = [sys.executable, "-m", "respserve", "serve", "--port", str(port), "--data-dir", str(data_dir), *flags]
    # Such servers share this machine's cores with each other and with the tests: OpenMP's busy-wait is
    # bounded as README "Running several replicas" advises for replicas on the same cores.
    env = {"GOMP_SPINCOUNT": SHARED_CORES_OPENMP_SPIN, **os.environ}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    # One client for all the polls: httpx.get builds a client (and its TLS context) per call, which cost
    # about a fifth of a core for as long as a server took to start.
    with httpx.Client(timeout=5) as http:

        def healthy() -> bool:
            try:
                return http.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                return False

        started = wait_for(healthy, timeout=120)
    if not started:
        process.kill()
        raise RuntimeError("the server process did not start")
    return process


def serving(settings: Settings) -> Iterator[RunningServer]:
    """A fixture's body: the server for `settings`, yielded, then stopped."""
    uv_server, thread, running = start_server(settings)
    yield running
    stop_server(uv_server, thread)


def stop_server(uv_server: uvicorn.Server, thread: threading.Thread) -> None:
    uv_server.should_exit = True
    thread.join(60)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("data")
    yield from serving(load_settings(port=free_port(), data_dir=str(data_dir)))


POSTGRES_URL = os.environ.get("RESPSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def fresh_schema(admin_url: str, prefix: str = "respserve_test") -> Iterator[str]:
    """A new schema in `admin_url`'s database, dropped afterwards, as a store URL whose search_path is it.
    Raises psycopg.OperationalError when the server cannot be reached."""
    import uuid

    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in admin_url else "?"
        try:
            yield f"{admin_url}{separator}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh schema in the machine's PostgreSQL for this run (dropped after it), as a store URL. In CI a
    missing server fails the tests that need it; elsewhere they skip."""
    import psycopg

    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_schema(POSTGRES_URL))
        except psycopg.OperationalError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is needed at {POSTGRES_URL}: {exc}")
            pytest.skip(f"no PostgreSQL at {POSTGRES_URL}")
        yield url


def sdk_client(server: RunningServer, api_key: str = "test") -> openai.OpenAI:
    """The openai SDK pointed at `server`: no retries, so a failure shows as it happened."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> openai.OpenAI:
    return sdk_client(server)


@pytest.fixture(scope="session")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


class OpenResponsesSchema:
    """Validates bodies and stream events against the Open Responses OpenAPI document."""

    def __init__(self, path: Path) -> None:
        spec = json.loads(path.read_text())
        self._components = spec["components"]
        self._event_schemas: dict[str, str] = {}
        for name, schema in self._components["schemas"].items():
            if name.endswith("StreamingEvent"):
                event_type = schema["properties"]["type"]["enum"][0]
                self._event_schemas[event_type] = name
        self._add_image_extensions(json.loads((path.parent / "openai-openapi.json").read_text()))

    def _add_image_extensions(self, openai_spec: dict[str, Any]) -> None:
        """Images are beyond Open Responses: add Modular MAX's `output_image` part (as docs/RESPONSES_API.md
        gives it), our preview event, and OpenAI's `image_generation` tool, its `tool_choice`, and its
        `image_generation_call` item and events (from OpenAI's spec); and the rest of OpenAI's tool types."""
        schemas = self._components["schemas"]
        schemas["OutputImageContent"] = {
            "type": "object",
            "required": ["type", "format"],
            "properties": {
                "type": {"type": "string", "enum": ["output_image"]},
                "image_data": {"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}]},
                "image_url": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
            },
            "oneOf": [
                {"properties": {"image_data": {"type": "string"}, "image_url": {"type": "null"}}},
                {"properties": {"image_data": {"type": "null"}, "image_url": {"type": "string"}}},
            ],
        }
        image_part = {"$ref": "#/components/schemas/OutputImageContent"}
        schemas["Message"]["properties"]["content"]["items"]["oneOf"].append(image_part)
        for event in ("ResponseContentPartAddedStreamingEvent", "ResponseContentPartDoneStreamingEvent"):
            schemas[event]["properties"]["part"]["oneOf"].append(image_part)
        openai_schemas = openai_spec["components"]["schemas"]

        def take(name: str) -> dict[str, str]:
            """Copies an OpenAI schema (and those it refers to) in; returns a reference to it."""
            if name not in schemas:
                schemas[name] = openai_schemas[name]
                for referred in re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(openai_schemas[name])):
                    take(referred)
            return {"$ref": f"#/components/schemas/{name}"}

        schemas["ItemField"]["oneOf"].append(take("ImageGenToolCall"))
        client_calls = ("LocalShellToolCall", "FunctionShellCall", "ApplyPatchToolCall")
        for item in ("CustomToolCall", "MCPListTools", "MCPToolCall", "MCPApprovalRequest", *client_calls):
            schemas["ItemField"]["oneOf"].append(take(item))
        for choice in ("ToolChoiceMCP", "SpecificFunctionShellParam", "SpecificApplyPatchParam"):
            schemas["ResponseResource"]["properties"]["tool_choice"]["oneOf"].append(take(choice))
        events = ["ResponseCustomToolCallInputDeltaEvent", "ResponseCustomToolCallInputDoneEvent"]
        events += [f"ResponseMCPCall{name}Event" for name in ("InProgress", "Completed", "Failed")]
        events += ["ResponseMCPCallArgumentsDeltaEvent", "ResponseMCPCallArgumentsDoneEvent"]
        events += [f"ResponseMCPListTools{name}Event" for name in ("InProgress", "Completed", "Failed")]
        for name in events:
            take(name)
            self._event_schemas[schemas[name]["properties"]["type"]["enum"][0]] = name
        # Every member of OpenAI's `Tool` union is accepted and echoed (most are not offered to the model).
        openai_tools = [ref["$ref"].rsplit("/", 1)[1] for ref in openai_schemas["Tool"]["oneOf"]]
        schemas["Tool"] = {
            "oneOf": [{"$ref": "#/components/schemas/FunctionTool"}]
            + [take(name) for name in openai_tools if name != "FunctionTool"]
        }
        # OpenAI lists its own models' sizes; a served model has its own ("WIDTHxHEIGHT").
        schemas["ImageGenTool"]["properties"]["size"] = {"type": "string", "pattern": "^(auto|[0-9]+x[0-9]+)$"}
        schemas["ResponseResource"]["properties"]["tool_choice"]["oneOf"].append(take("ToolChoiceTypes"))
        schemas["ResponseResource"]["properties"]["tool_choice"]["oneOf"].append(take("ToolChoiceCustom"))
        for name in ("InProgress", "Generating", "PartialImage", "Completed"):
            take(f"ResponseImageGenCall{name}Event")
            event_type = schemas[f"ResponseImageGenCall{name}Event"]["properties"]["type"]["enum"][0]
            self._event_schemas[event_type] = f"ResponseImageGenCall{name}Event"
        schemas["OutputImagePartialImageEvent"] = {
            "type": "object",
            "required": [
                "type", "sequence_number", "item_id", "output_index", "content_index", "partial_image_index",
                "partial_image_b64", "output_format",
            ],
            "properties": {
                "type": {"type": "string", "enum": ["response.output_image.partial_image"]},
                "sequence_number": {"type": "integer"},
                "item_id": {"type": "string"},
                "output_index": {"type": "integer"},
                "content_index": {"type": "integer"},
                "partial_image_index": {"type": "integer"},
                "partial_image_b64": {"type": "string"},
                "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
            },
        }  # fmt: skip
        self._event_schemas["response.output_image.partial_image"] = "OutputImagePartialImageEvent"

    def _validate(self, instance: Any, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": self._components}
        jsonschema.Draft202012Validator(schema).validate(instance)

    def response(self, body: dict[str, Any]) -> None:
        self._validate(_as_open_responses(body), "ResponseResource")

    def event(self, event: dict[str, Any]) -> None:
        if event["type"] in _OPENAI_EVENT_NAMES:
            event = {**event, "type": _OPENAI_EVENT_NAMES[event["type"]]}
        assert event["type"] in self._event_schemas, f"unknown event type {event['type']}"
        if "response" in event:
            event = {**event, "response": _as_open_responses(event["response"])}
        self._validate(event, self._event_schemas[event["type"]])


# respserve sends reasoning text under the OpenAI SDK's event names; Open Responses names the same events
# (same fields) `response.reasoning.delta/.done`.
_OPENAI_EVENT_NAMES = {
    "response.reasoning_text.delta": "response.reasoning.delta",
    "response.reasoning_text.done": "response.reasoning.done",
}


def _as_open_responses(body: dict[str, Any]) -> dict[str, Any]:
    """The one deliberate difference: Open Responses types an echoed `text.format.schema` as null (a slip
    of its generator); respserve echoes the schema itself, as the OpenAI API does."""
    text_format = (body.get("text") or {}).get("format") or {}
    if text_format.get("type") != "json_schema":
        return body
    assert isinstance(text_format.get("schema"), dict)
    return {**body, "text": {**body["text"], "format": {**text_format, "schema": None}}}


@pytest.fixture(scope="session")
def schema() -> OpenResponsesSchema:
    return OpenResponsesSchema(SPEC_PATH)


@dataclass
class SseFrame:
    event: str | None
    data: str


def parse_sse(text: str) -> list[SseFrame]:
    frames = []
    for block in text.split("\n\n"):
        event, data = None, []
        for line in re.split(r"\r\n|\r|\n", block):  # SSE line ends, not str.splitlines()
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        if data:
            frames.append(SseFrame(event=event, data="\n".join(data)))
    return frames


def stream_events(http: httpx.Client, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[SseFrame]]:
    """Posts a streaming request; returns the decoded events and the raw frames ([DONE] included)."""
    response = http.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    events = [json.loads(frame.data) for frame in frames if frame.data != "[DONE]"]
    return events, frames
