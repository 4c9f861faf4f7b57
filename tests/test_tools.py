"""Function tools: forced calls by constrained decoding, streamed call events, tool turns as input, and a
real agent (the OpenAI Agents SDK) running on respserve."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from conftest import OpenResponsesSchema, RunningServer, ban, stream_events, tokens_containing

from respserve.api.converter import ResponseConverter
from respserve.api.output_parsers import (
    CallArguments,
    CallEnd,
    CallStart,
    HermesToolParser,
    JsonToolParser,
    TextSegment,
)
from respserve.api.response_events import initial_resource
from respserve.engine.generation import GenerationOutput, GenerationStatus
from respserve.protocol.request import CreateResponseRequest

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": CITY, "strict": True},
    {"type": "function", "name": "get_time", "description": "Local time in a city", "parameters": CITY, "strict": True},
]
QUESTION = "What's the weather in Paris?"
ALLOWED_MISSING = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "x"}]}


def _feed(parser, chunks: list[str]) -> list:
    segments = [segment for chunk in chunks for segment in parser.feed(chunk)]
    return segments + parser.finish()


def _text(segments: list) -> str:
    return "".join(segment.text for segment in segments if isinstance(segment, TextSegment))


def test_hermes_parser_hides_markup_split_anywhere() -> None:
    reply = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> Done.'
    for size in (1, 3, 7, len(reply)):
        chunks = [reply[i : i + size] for i in range(0, len(reply), size)]
        segments = _feed(HermesToolParser(), chunks)
        assert _text(segments) == "Let me check.  Done."
        calls = [s for s in segments if not isinstance(s, TextSegment)]
        assert calls == [CallStart("get_weather"), CallArguments('{"city": "Paris"}'), CallEnd()]


def test_hermes_parser_keeps_broken_blocks_and_near_misses_as_text() -> None:
    assert _text(_feed(HermesToolParser(), ["a <tool_call>not json</tool_call> b"])) == (
        "a <tool_call>not json</tool_call> b"
    )
    assert _text(_feed(HermesToolParser(), ["x <tool", "_cal", "l_"])) == "x <tool_call_"


def test_json_parser() -> None:
    call = '  {"name": "get_time", "parameters": {"city": "Oslo"}}'
    assert _feed(JsonToolParser(), [call[:5], call[5:]]) == [
        CallStart("get_time"),
        CallArguments('{"city": "Oslo"}'),
        CallEnd(),
    ]
    assert _text(_feed(JsonToolParser(), ["Hello", " there"])) == "Hello there"
    assert _text(_feed(JsonToolParser(), ['{"a": 1}'])) == '{"a": 1}'


def test_converter_respects_max_tool_calls() -> None:
    request = CreateResponseRequest(input="x")
    converter = ResponseConverter(initial_resource(request, "m"), HermesToolParser(), max_tool_calls=1)
    converter.start()
    two_calls = "".join(
        f'<tool_call>{{"name": "get_time", "arguments": {{"city": "{city}"}}}}</tool_call>' for city in ("A", "B")
    )
    done = GenerationOutput("r", text=two_calls, final_status=GenerationStatus.END_OF_SEQUENCE, output_tokens=9)
    converter.on_output(done)
    items = converter.resource.output
    assert [(item.type, json.loads(item.arguments)) for item in items] == [("function_call", {"city": "A"})]


def test_required_tool_choice_forces_a_valid_call(
    client: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema
) -> None:
    response = client.responses.create(
        model=server.model, input=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_output_tokens=60
    )
    schema.response(response.model_dump(mode="json", exclude_unset=True, by_alias=True))
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name in {"get_weather", "get_time"}
    jsonschema.validate(json.loads(call.arguments), CITY)
    assert [tool.name for tool in response.tools] == ["get_weather", "get_time"]
    assert response.tool_choice == "required"


def test_named_function_streams_its_arguments(http, schema: OpenResponsesSchema) -> None:
    body = {
        "input": QUESTION,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "name": "get_time"},
        "temperature": 0,
        "max_output_tokens": 60,
    }
    events, _ = stream_events(http, body)
    for event in events:
        schema.event(event)
    types = [event["type"] for event in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["name"] == "get_time"
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1  # streamed as generated
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert "".join(deltas) == done["arguments"] and done["name"] == "get_time"
    jsonschema.validate(json.loads(done["arguments"]), CITY)
    assert "response.output_text.delta" not in types


def test_tool_choice_none_and_auto_answer_in_text(client: openai.OpenAI, server: RunningServer) -> None:
    # Whether a model calls a tool on its own is its choice: with no "<" it cannot open a <tool_call>.
    no_markup = {"logit_bias": ban(tokens_containing(server, "<"))}
    plain = client.responses.create(model=server.model, input=QUESTION, temperature=0, max_output_tokens=24)
    for choice in ("none", "auto"):
        response = client.responses.create(
            model=server.model,
            input=QUESTION,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            max_output_tokens=24,
            extra_body=no_markup,
        )
        assert [item.type for item in response.output] == ["message"]
        assert response.usage is not None and plain.usage is not None
        if choice == "auto":  # the functions are described in the prompt
            assert response.usage.input_tokens > plain.usage.input_tokens + 50
        else:
            assert response.usage.input_tokens == plain.usage.input_tokens


def test_tool_turns_as_input_and_through_a_chain(client: openai.OpenAI, server: RunningServer) -> None:
    forced = client.responses.create(
        model=server.model, input=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_output_tokens=60
    )
    call = forced.output[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 C and sunny"}
    explicit = client.responses.create(
        model=server.model,
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True), result],
        tools=TOOLS,
        temperature=0,
        max_output_tokens=32,
    )
    chained = client.responses.create(
        model=server.model,
        input=[result],
        previous_response_id=forced.id,
        tools=TOOLS,
        temperature=0,
        max_output_tokens=32,
    )
    assert explicit.status in ("completed", "incomplete") and chained.status in ("completed", "incomplete")
    assert explicit.usage is not None and chained.usage is not None
    assert explicit.usage.input_tokens == chained.usage.input_tokens
    assert explicit.output_text == chained.output_text
    items = client.responses.input_items.list(explicit.id, order="asc").data
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        (
            {"tools": [{**TOOLS[0], "parameters": {"type": "nonsense"}}], "tool_choice": "required"},
            "tools",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "required",
                    "tools": [{"type": "function", "name": "x"}],
                },
            },
            "tool_choice.tools[0].name",
        ),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ],
)
def test_tool_errors(http, body: dict, param: str) -> None:
    response = http.post("/v1/responses", json={"input": QUESTION, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_allowed_tools_restricts_the_forced_call(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.responses.create(
        model=server.model,
        input=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
        temperature=0,
        max_output_tokens=60,
    )
    assert [(item.type, item.name) for item in response.output] == [("function_call", "get_time")]


def test_an_agent_runs_a_tool_and_answers(server: RunningServer) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls: list[str] = []
    pipeline = server.state.default_model.worker.pipeline

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Return the current weather for a city."""
        calls.append(city)
        return f"It is 22 degrees and sunny in {city}."

    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="test")
    agent = agents.Agent(
        name="weather",
        instructions="You answer questions about the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=server.model, openai_client=client),
        # After the forced call the SDK lets the model choose. What it would say is its own affair, and on
        # some CPU it might call again or run on: the end token, favoured, ends that turn at once. The forced
        # call is unaffected (the grammar allows the end token only once the call is complete).
        model_settings=agents.ModelSettings(
            tool_choice="required",
            temperature=0,
            max_tokens=64,
            extra_body={"logit_bias": {str(token): 100 for token in pipeline.eos_token_ids}},
        ),
    )
    result = asyncio.run(agents.Runner.run(agent, QUESTION, max_turns=4))
    assert calls and calls[0]  # the forced first turn called the tool with a city
    assert isinstance(result.final_output, str)
    assert [item.type for item in result.new_items] == [
        "tool_call_item",
        "tool_call_output_item",
        "message_output_item",
    ]


def test_a_forced_call_is_strict_unless_told_otherwise_and_a_cut_one_is_incomplete(http) -> None:
    # As LangChain sends a plain Pydantic model: no additionalProperties, `strict` omitted.
    open_schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    }
    tool = {"type": "function", "name": "GetWeather", "description": "The forecast.", "parameters": open_schema}
    body = {"input": QUESTION, "tools": [tool], "tool_choice": {"type": "function", "name": "GetWeather"}}
    response = http.post("/v1/responses", json={**body, "temperature": 0, "max_output_tokens": 64}).json()
    assert response["status"] == "completed"
    [call] = response["output"]
    assert call["status"] == "completed" and set(json.loads(call["arguments"])) == {"city", "days"}
    # A city of at least 60 characters cannot fit in 16 tokens: the call is cut, and says so.
    long_city = {
        **open_schema,
        "properties": {**open_schema["properties"], "city": {"type": "string", "minLength": 60}},
    }
    cut_body = {**body, "tools": [{**tool, "parameters": long_city}], "temperature": 0, "max_output_tokens": 16}
    cut = http.post("/v1/responses", json=cut_body).json()
    assert cut["status"] == "incomplete" and cut["output"][0]["status"] == "incomplete"
