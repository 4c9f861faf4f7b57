"""Bad input: a 4xx in the OpenAI envelope naming the offending field, never a 500 or FastAPI's 422."""

from __future__ import annotations

import openai
import pytest
from conftest import RunningServer, prompt_tokens


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "temperature": 2.5}, "temperature"),
        ({"input": "hi", "top_p": 0}, "top_p"),
        ({"input": "hi", "max_output_tokens": 4}, "max_output_tokens"),
        ({"input": "hi", "presence_penalty": 3}, "presence_penalty"),
        ({"input": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"input": "hi", "metadata": {"k": 1}}, "metadata.k"),
        ({"input": [{"role": "user", "content": 42}]}, "input[0].content"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "system", "content": "only a system turn"}]}, "input"),
    ],
)
def test_validation_errors_are_400_with_param(http, body: dict, param: str) -> None:
    error = _error(http.post("/v1/responses", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_is_400(http) -> None:
    response = http.post("/v1/responses", content=b'{"input": "hi"', headers={"content-type": "application/json"})
    error = _error(response, 400)
    assert error["code"] == "invalid_json"


def test_unknown_model_is_404(http) -> None:
    error = _error(http.post("/v1/responses", json={"model": "no-such-model", "input": "hi"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_image_input_to_a_text_model_is_400(http, server: RunningServer) -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    body = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "what is this?"}, image]}]}
    error = _error(http.post("/v1/responses", json=body), 400)
    assert error["param"] == "input[0].content[1]"
    assert "text-only" in error["message"] and server.model in error["message"]


def test_prompt_longer_than_the_context_is_400(http) -> None:
    error = _error(http.post("/v1/responses", json={"input": "hello " * 9000}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "input"


def test_unknown_route_and_method_use_the_envelope(http) -> None:
    assert _error(http.get("/v1/nothing-here"), 404)["type"] == "not_found_error"
    _error(http.put("/v1/responses", json={}), 405)


def test_sdk_raises_typed_errors(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=server.model, input="hi", temperature=9)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="missing", input="hi")


def test_streaming_validation_errors_are_plain_json(http) -> None:
    response = http.post("/v1/responses", json={"input": "hi", "stream": True, "temperature": -1})
    assert response.headers["content-type"].startswith("application/json")
    assert _error(response, 400)["param"] == "temperature"


def test_truncation_auto_drops_the_oldest_turns_until_the_input_fits(http, server: RunningServer) -> None:
    # The oldest turn alone overflows SmolLM2's 8,192 tokens; the instructions must survive the cut.
    turns = [
        {"role": "user", "content": "lorem ipsum " * 3000},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
        {"role": "user", "content": "And now?"},
    ]
    body = {"instructions": "Be brief.", "input": turns, "max_output_tokens": 16, "temperature": 0}
    refused = _error(http.post("/v1/responses", json=body), 400)
    assert refused["code"] == "context_length_exceeded"
    response = http.post("/v1/responses", json={**body, "truncation": "auto"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["truncation"] == "auto"
    kept = next(
        turns[start:]
        for start in range(len(turns))
        if prompt_tokens(server, [{"role": "system", "content": "Be brief."}, *turns[start:]])
        < server.state.default_model.worker.pipeline.context_length
    )
    assert kept == turns[1:]
    expected = prompt_tokens(server, [{"role": "system", "content": "Be brief."}, *kept])
    assert data["usage"]["input_tokens"] == expected
    # The last turn alone still too long: truncation cannot help, and says so.
    alone = {"input": "hello " * 9000, "truncation": "auto"}
    assert _error(http.post("/v1/responses", json=alone), 400)["code"] == "context_length_exceeded"


def test_truncation_drops_a_call_with_the_results_that_answer_it() -> None:
    from respserve.api.generation_plan import _without_oldest_turn
    from respserve.engine.generation import ChatMessage, ToolCallTurn

    system = ChatMessage(role="system", content="Be brief.")
    call = ChatMessage(role="assistant", content="", tool_calls=(ToolCallTurn("call_1", "f", "{}"),))
    result = ChatMessage(role="tool", content="42", tool_call_id="call_1")
    question = ChatMessage(role="user", content="And now?")
    assert _without_oldest_turn([system, call, result, question]) == [system, question]
    assert _without_oldest_turn([system, question]) is None
