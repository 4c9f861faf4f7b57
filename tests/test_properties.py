"""Property tests (hypothesis) for the pieces every stream goes through: the SSE frames, the incremental
detokenizer, the stop-string matcher and the tool-call parser."""

from __future__ import annotations

import json

import pytest
from conftest import RunningServer, parse_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respserve.api.output_parsers import HermesToolParser, TextSegment
from respserve.api.sse import event_frame
from respserve.engine.detokenizer import IncrementalDetokenizer
from respserve.engine.stop_strings import StopStringMatcher
from respserve.protocol.events import OutputTextDeltaEvent

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@given(delta=TEXT, sequence_number=st.integers(min_value=0, max_value=10**6))
def test_sse_frames_round_trip(delta: str, sequence_number: int) -> None:
    event = OutputTextDeltaEvent(
        item_id="msg_1", output_index=0, content_index=0, delta=delta, sequence_number=sequence_number
    )
    encoded = event_frame(event).encode().decode()
    assert encoded.endswith("\n\n") and encoded.count("\n\n") == 1  # one frame, one write
    assert encoded.splitlines() == encoded.split("\n")[:-1]  # nothing else any line reader splits on
    [frame] = parse_sse(encoded)
    assert frame.event == event.type
    assert json.loads(frame.data) == event.model_dump(mode="json")


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer):
    return server.state.default_model.worker.pipeline.tokenizer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_detokenizer_deltas_are_whole_and_complete(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=tokenizer.encode("Hi"))
    deltas = [detokenizer.push(token) for token in ids] + [detokenizer.flush()]
    whole = tokenizer.decode(ids)
    assert "".join(deltas) == whole
    if "\ufffd" not in whole:  # characters the tokenizer cannot represent decode to U+FFFD anyway
        assert all("\ufffd" not in delta for delta in deltas)


@given(
    text=TEXT,
    stops=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_stop_matcher_cuts_at_the_first_match(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    matcher = StopStringMatcher(tuple(stops))
    out = ""
    for start, end in zip(bounds, bounds[1:], strict=False):
        out += matcher.feed(text[start:end])
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    first = min((text.find(stop) for stop in stops if stop in text), default=-1)
    # Streaming finds the match that completes first, which can only end a prefix earlier.
    if first < 0:
        assert out == text and not matcher.stopped
    else:
        assert matcher.stopped and text.startswith(out) and len(out) <= first


@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_hermes_parser_passes_plain_text_through(text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    parser = HermesToolParser()
    segments = [s for a, b in zip(bounds, bounds[1:], strict=False) for s in parser.feed(text[a:b])]
    segments += parser.finish()
    assert all(isinstance(segment, TextSegment) for segment in segments) or "<tool_call>" in text
    if "<tool_call>" not in text:
        assert "".join(segment.text for segment in segments) == text
