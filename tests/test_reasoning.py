"""Reasoning models: `<think>` blocks become a `reasoning` item, streamed as reasoning_text events, and
counted as reasoning tokens. End to end with a tiny random-weight Qwen3 built here from a config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    OpenResponsesSchema,
    RunningServer,
    ban,
    free_port,
    serving,
    stream_events,
    tiny_qwen3,
)
from cryptography.fernet import Fernet
from transformers import AutoTokenizer

from respserve.api.converter import ResponseConverter
from respserve.api.encrypted_reasoning import InvalidReasoningBlob, ReasoningSealer
from respserve.api.output_parsers import OutputParser, ReasoningParser, ReasoningSegment, TextSegment
from respserve.api.response_events import initial_resource
from respserve.config import load_settings
from respserve.engine.detokenizer import IncrementalDetokenizer
from respserve.engine.generation import GenerationOutput, GenerationStatus
from respserve.protocol.request import CreateResponseRequest

# ChatML whose generation prompt opens the thoughts, as DeepSeek-R1 distills and Qwen3 variants do.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
REPLY = "<think>Two plus two is four.</think>\n\nThe answer is 4."


@pytest.fixture(scope="module")
def thinking_model(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = AutoTokenizer.from_pretrained(server.state.default_model.worker.pipeline.tokenizer.name_or_path)
    tokenizer.add_tokens(["<think>", "</think>"])  # plain added tokens, as in Qwen3: decoded, not skipped
    tokenizer.chat_template = THINKING_TEMPLATE
    tiny_qwen3(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def thinking_server(thinking_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = load_settings(
        port=free_port(), model=str(thinking_model), data_dir=str(tmp_path_factory.mktemp("thinking-data"))
    )
    yield from serving(settings)


def _token_outputs(tokenizer, text: str) -> list[GenerationOutput]:
    """The reply as the worker would hand it over: one output per token, through the real detokenizer."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=[])
    outputs = [GenerationOutput("r", text=detokenizer.push(token), output_tokens=n + 1) for n, token in enumerate(ids)]
    outputs[-1].text += detokenizer.flush()
    outputs[-1].final_status = GenerationStatus.END_OF_SEQUENCE
    return outputs


@pytest.mark.parametrize("starts_inside", [False, True])
def test_parser_on_a_token_stream(thinking_model: Path, starts_inside: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    reply = REPLY.removeprefix("<think>") if starts_inside else REPLY
    parser = ReasoningParser(OutputParser(), starts_inside=starts_inside)
    segments = [segment for output in _token_outputs(tokenizer, reply) for segment in parser.feed(output.text)]
    segments += parser.finish()
    assert "".join(s.text for s in segments if isinstance(s, ReasoningSegment)) == "Two plus two is four."
    assert "".join(s.text for s in segments if isinstance(s, TextSegment)) == "The answer is 4."


def test_converter_builds_a_reasoning_item(thinking_model: Path, schema: OpenResponsesSchema) -> None:
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    converter = ResponseConverter(
        initial_resource(CreateResponseRequest(input="2+2?"), "tiny"), ReasoningParser(OutputParser(), False)
    )
    events = converter.start()
    for output in _token_outputs(tokenizer, REPLY):
        events += converter.on_output(output)
    wire = [event.model_dump(mode="json") for event in events]
    for event in wire:
        schema.event(event)
    resource = converter.resource
    assert [item.type for item in resource.output] == ["reasoning", "message"]
    assert resource.output[0].id.startswith("rs_")
    assert resource.output[0].content[0].text == "Two plus two is four."
    assert resource.output[1].content[0].text == "The answer is 4."
    thought_tokens = len(tokenizer.encode("<think>Two plus two is four.</think>", add_special_tokens=False))
    assert resource.usage is not None
    assert abs(resource.usage.output_tokens_details.reasoning_tokens - thought_tokens) <= 1
    types = [event["type"] for event in wire]
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")


def test_tiny_qwen3_streams_reasoning_end_to_end(
    thinking_model: Path, thinking_server: RunningServer, schema: OpenResponsesSchema
) -> None:
    # Random weights pick tokens near ties, differently on each CPU: ending or closing the thoughts is banned,
    # so all 24 tokens are reasoning everywhere.
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    never_closes = ban([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")])
    with httpx.Client(base_url=thinking_server.base_url, timeout=120) as http:
        body = {"input": "What is 2+2?", "max_output_tokens": 24, "temperature": 0, "reasoning": {"effort": "low"}}
        body["logit_bias"] = never_closes
        events, _ = stream_events(http, body)
        for event in events:
            schema.event(event)
        final = events[-1]["response"]
        assert final["reasoning"]["effort"] == "low"
        first_item = final["output"][0]
        assert first_item["type"] == "reasoning"
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        assert deltas and first_item["content"][0]["text"] == deltas
        assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 24
        stored = http.get(f"/v1/responses/{final['id']}").json()
        schema.response(stored)


def test_encrypted_reasoning_round_trips_through_a_stateless_client(
    thinking_model: Path, thinking_server: RunningServer, schema: OpenResponsesSchema
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    never_closes = ban([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")])
    first_turn = [{"role": "user", "content": "What is 2+2?"}]
    body = {
        "input": first_turn,
        "max_output_tokens": 16,
        "temperature": 0,
        "logit_bias": never_closes,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"summary": "auto"},
    }
    with httpx.Client(base_url=thinking_server.base_url, timeout=120) as http:
        stateless = http.post("/v1/responses", json={**body, "store": False}).json()
        schema.response(stateless)
        reasoning = stateless["output"][0]  # then an empty incomplete message: the thoughts never closed
        assert reasoning["type"] == "reasoning"
        text = reasoning["content"][0]["text"]
        assert isinstance(reasoning["encrypted_content"], str) and text not in reasoning["encrypted_content"]
        assert reasoning["summary"] == [{"type": "summary_text", "text": text}]
        # Sent back as Codex does (the blob, no readable content), the next turn sees what a stored chain sees.
        sent_back = {"type": "reasoning", "id": reasoning["id"], "summary": [], "encrypted_content": None}
        sent_back["encrypted_content"] = reasoning["encrypted_content"]
        next_turn = {"role": "user", "content": "And 3+3?"}
        stateless_input = [*first_turn, sent_back, *stateless["output"][1:], next_turn]
        stateless_next = http.post("/v1/responses", json={**body, "store": False, "input": stateless_input})
        assert stateless_next.status_code == 200, stateless_next.text
        stored = http.post("/v1/responses", json=body).json()
        chain = {**body, "input": [next_turn], "previous_response_id": stored["id"]}
        chained = http.post("/v1/responses", json=chain)
        assert stateless_next.json()["usage"]["input_tokens"] == chained.json()["usage"]["input_tokens"]
        kept = http.post("/v1/responses", json={**body, "input": stateless_input}).json()
        listed = http.get(f"/v1/responses/{kept['id']}/input_items", params={"order": "asc"}).json()["data"]
        assert listed[1]["content"] == [{"type": "reasoning_text", "text": text}]  # opened, then stored

        foreign = ReasoningSealer(Fernet.generate_key()).seal(text)
        blob = reasoning["encrypted_content"]
        tampered = blob[:40] + ("B" if blob[40] == "A" else "A") + blob[41:]
        for blob in (foreign, tampered, "not a blob"):
            bad = {**body, "store": False, "input": [*first_turn, {**sent_back, "encrypted_content": blob}]}
            refused = http.post("/v1/responses", json=bad)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == "input[1].encrypted_content"


def test_the_reasoning_key_persists_in_the_data_dir_or_comes_from_the_secret(tmp_path: Path) -> None:
    blob = ReasoningSealer.from_settings(None, tmp_path).seal("thoughts")
    assert ReasoningSealer.from_settings(None, tmp_path).open(blob) == "thoughts"  # after a restart
    assert oct((tmp_path / "reasoning.key").stat().st_mode & 0o777) == "0o600"
    shared = ReasoningSealer.from_settings("s3cret", tmp_path / "a").seal("thoughts")
    assert ReasoningSealer.from_settings("s3cret", tmp_path / "b").open(shared) == "thoughts"  # replicas
    with pytest.raises(InvalidReasoningBlob):
        ReasoningSealer.from_settings("other", tmp_path / "c").open(shared)
