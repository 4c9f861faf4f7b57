"""Output parsers: the model's text stream split into message text and function calls.

A parser takes text deltas and returns segments: message text that is safe to show, and the start,
argument deltas and end of each function call. Tool-call markup is held back, never shown as text.
Which parser a request gets depends on its tools and `tool_choice`; which markup, on the model
(`tool_parser` setting: `hermes` is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen and
Hermes models write it and as respserve's fallback tool prompt asks; `json` is a bare JSON object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from respserve.engine.stop_strings import partial_match_length


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class CallStart:
    name: str


@dataclass(frozen=True)
class CallArguments:
    delta: str


@dataclass(frozen=True)
class CallEnd:
    pass


@dataclass(frozen=True)
class ReasoningSegment:
    text: str


Segment = TextSegment | CallStart | CallArguments | CallEnd | ReasoningSegment


class OutputParser:
    """Plain text: everything is message text."""

    @property
    def in_reasoning(self) -> bool:
        return False

    def feed(self, text: str) -> list[Segment]:
        return [TextSegment(text)] if text else []

    def finish(self) -> list[Segment]:
        return []


def _call_segments(call: Any) -> list[Segment] | None:
    """A parsed `{"name": ..., "arguments": {...}}` object as call segments; None if it is not one."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return [CallStart(call["name"]), CallArguments(json.dumps(arguments)), CallEnd()]


class HermesToolParser(OutputParser):
    """`<tool_call>{...}</tool_call>` blocks anywhere in the text; the rest is message text."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False

    def feed(self, text: str) -> list[Segment]:
        self._buffer += text
        segments: list[Segment] = []
        while True:
            if self._inside:
                end = self._buffer.find(self.CLOSE)
                if end < 0:
                    return segments
                block, self._buffer = self._buffer[:end], self._buffer[end + len(self.CLOSE) :]
                self._inside = False
                segments.extend(self._block(block))
                continue
            start = self._buffer.find(self.OPEN)
            if start >= 0:
                shown, self._buffer = self._buffer[:start], self._buffer[start + len(self.OPEN) :]
                self._inside = True
            else:
                # Hold back a tail that may still become the opening tag.
                keep = partial_match_length(self._buffer, (self.OPEN,))
                shown, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            if shown:
                segments.append(TextSegment(shown))
            if not self._inside:
                return segments

    def finish(self) -> list[Segment]:
        rest, self._buffer = self._buffer, ""
        if self._inside:  # an unterminated block: a call if it parses, else text
            self._inside = False
            return self._block(rest, closed=False)
        return [TextSegment(rest)] if rest else []

    def _block(self, block: str, closed: bool = True) -> list[Segment]:
        try:
            segments = _call_segments(json.loads(block))
        except json.JSONDecodeError:
            segments = None
        if segments is not None:
            return segments
        return [TextSegment(f"{self.OPEN}{block}{self.CLOSE if closed else ''}")]


class JsonToolParser(OutputParser):
    """A reply that is a bare JSON object `{"name", "arguments"}` (or a list of them) is a call."""

    def __init__(self) -> None:
        self._mode: str | None = None  # None until the first visible character: "json" or "text"
        self._buffer = ""

    def feed(self, text: str) -> list[Segment]:
        if self._mode is None:
            self._buffer += text
            stripped = self._buffer.lstrip()
            if not stripped:
                return []
            self._mode = "json" if stripped[0] in "{[" else "text"
            if self._mode == "json":
                return []
            text, self._buffer = self._buffer, ""
        if self._mode == "json":
            self._buffer += text
            return []
        return [TextSegment(text)] if text else []

    def finish(self) -> list[Segment]:
        if self._mode != "json":
            return [TextSegment(self._buffer)] if self._buffer else []
        try:
            parsed = json.loads(self._buffer)
        except json.JSONDecodeError:
            return [TextSegment(self._buffer)]
        segments: list[Segment] = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            call_segments = _call_segments(call)
            if call_segments is None:
                return [TextSegment(self._buffer)]
            segments.extend(call_segments)
        return segments


class ForcedArgumentsParser(OutputParser):
    """Output constrained to one named function's arguments: every delta is an arguments delta."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, text: str) -> list[Segment]:
        segments: list[Segment] = []
        if not self._started:
            self._started = True
            segments.append(CallStart(self._name))
        if text:
            segments.append(CallArguments(text))
        return segments

    def finish(self) -> list[Segment]:
        start: list[Segment] = [] if self._started else [CallStart(self._name)]
        return [*start, CallEnd()]


class ReasoningParser(OutputParser):
    """`<think>...</think>` at the start of the reply is reasoning; what follows goes to `inner`.

    `starts_inside` is for templates that open `<think>` in the generation prompt (DeepSeek-R1 distills,
    Qwen3 variants): then the reply begins inside the thoughts and only closes them.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, inner: OutputParser, starts_inside: bool) -> None:
        self._inner = inner
        self._state = "inside" if starts_inside else "start"  # then "answer"
        self._buffer = ""
        self._answer_started = False

    @property
    def in_reasoning(self) -> bool:
        return self._state == "inside"

    def feed(self, text: str) -> list[Segment]:
        self._buffer += text
        segments: list[Segment] = []
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(self.OPEN):
                    self._buffer, self._state = stripped[len(self.OPEN) :], "inside"
                elif not stripped or self.OPEN.startswith(stripped):
                    return segments  # may still become the opening tag
                else:
                    self._state = "answer"
            elif self._state == "inside":
                end = self._buffer.find(self.CLOSE)
                if end >= 0:
                    thought, self._buffer = self._buffer[:end], self._buffer[end + len(self.CLOSE) :]
                    self._state = "answer"
                else:
                    keep = partial_match_length(self._buffer, (self.CLOSE,))
                    thought = self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                if thought:
                    segments.append(ReasoningSegment(thought))
                if self._state == "inside":
                    return segments
            else:
                return segments + self._answer(self._take())

    def finish(self) -> list[Segment]:
        rest = self._take()
        if self._state == "inside":
            return ([ReasoningSegment(rest)] if rest else []) + self._inner.finish()
        return self._answer(rest) + self._inner.finish()

    def _take(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    def _answer(self, text: str) -> list[Segment]:
        if not self._answer_started:
            text = text.lstrip()  # the blank line between thoughts and answer
            self._answer_started = bool(text)
        return self._inner.feed(text) if text else []
