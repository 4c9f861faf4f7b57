"""A smoke test of the default model's answers, outside the default selection: greedy float32 text differs
between CPUs (AVX2 vs AVX-512), so these can fail on a machine where the server is right.
Run them with `pytest -m quality`."""

from __future__ import annotations

import openai
import pytest
from conftest import RunningServer

pytestmark = pytest.mark.quality


def _answer(client: openai.OpenAI, server: RunningServer, **kwargs) -> openai.types.responses.Response:
    return client.responses.create(model=server.model, temperature=0, max_output_tokens=64, **kwargs)


def test_knows_the_capital_of_france(client: openai.OpenAI, server: RunningServer) -> None:
    assert "Paris" in _answer(client, server, input="What is the capital of France?").output_text


def test_follows_a_multi_turn_exchange(client: openai.OpenAI, server: RunningServer) -> None:
    items = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert "Rome" in _answer(client, server, input=items).output_text


def test_recalls_a_word_through_a_chain(client: openai.OpenAI, server: RunningServer) -> None:
    first = _answer(client, server, input="Remember this word: pineapple.")
    second = _answer(client, server, input="Tell me a short joke.", previous_response_id=first.id)
    third = _answer(client, server, input="Which word did I ask you to remember?", previous_response_id=second.id)
    assert "pineapple" in third.output_text.lower()
