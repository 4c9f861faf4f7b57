"""Bad input: a 4xx in the OpenAI envelope naming the offending field, never a 500 or FastAPI's 422."""

from __future__ import annotations

import openai
import pytest
from conftest import RunningServer


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
