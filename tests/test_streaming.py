"""`stream: true`: the exact event sequence, SSE framing, and text that survives multi-byte characters."""

from __future__ import annotations

import openai
from conftest import OpenResponsesSchema, RunningServer, fixed_reply, never_ends, stream_events

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING_EVENTS = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def test_event_sequence_framing_and_schema(http, schema: OpenResponsesSchema) -> None:
    # A reply fixed by constrained decoding: it ends by itself, after several deltas, on any CPU.
    body = {"input": "What is the capital of France?", "text": fixed_reply("Paris is the capital of France.")}
    events, frames = stream_events(http, body)
    types = [event["type"] for event in events]
    assert types[:4] == TEXT_EVENTS
    assert types[-4:] == [*CLOSING_EVENTS, "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert frames[-1].data == "[DONE]"
    for frame, event in zip(frames, events, strict=False):
        assert frame.event == event["type"]
    for event in events:
        schema.event(event)
    assert events[0]["response"]["status"] == "in_progress"
    assert events[2]["item"]["content"] == []
    assert events[3]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == deltas == events[-4]["text"]
    assert deltas == '"Paris is the capital of France."'
    assert len(set(types[4:-4])) == 1 and types.count("response.output_text.delta") > 1
    item_id = events[2]["item"]["id"]
    assert all(event["item_id"] == item_id for event in events[3:-2])


def test_incomplete_stream_ends_with_response_incomplete(
    http, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    body = {"input": "Write a poem.", "max_output_tokens": 16, "temperature": 0, "logit_bias": never_ends(server)}
    events, _ = stream_events(http, body)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    for event in events:
        schema.event(event)


def test_utf8_deltas_are_whole_characters(http) -> None:
    # Constrained decoding writes this text; the tokenizer splits each CJK character and emoji into byte
    # tokens, and no delta may carry half a character.
    text = "你好，世界 🌍🚀 — café, naïve, 東京."
    events, _ = stream_events(http, {"input": "Say hello.", "text": fixed_reply(text)})
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == events[-1]["response"]["output"][0]["content"][0]["text"] == f'"{text}"'
    assert sum(len(delta.encode()) > len(delta) for delta in deltas) > 3


def test_sdk_streaming_both_ways(client: openai.OpenAI, server: RunningServer) -> None:
    kwargs = {"model": server.model, "input": "What is the capital of France?", "temperature": 0}
    kwargs["text"] = fixed_reply("Paris.")
    streamed = list(client.responses.create(stream=True, **kwargs))
    assert streamed[-1].type == "response.completed"
    with client.responses.stream(**kwargs) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert final.output_text == streamed[-1].response.output_text
