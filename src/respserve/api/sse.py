"""SSE frames as the Responses API writes them: `event: <type>\ndata: <json>\n\n`, one write each."""

from __future__ import annotations

from sse_starlette import ServerSentEvent

from respserve.protocol.events import StreamEvent

DONE = ServerSentEvent(data="[DONE]", sep="\n")  # Open Responses ends a stream with it


def frame(data: str, event_type: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, event=event_type, sep="\n")


def event_frame(event: StreamEvent) -> ServerSentEvent:
    return frame(event.to_wire_json(), event.type)
