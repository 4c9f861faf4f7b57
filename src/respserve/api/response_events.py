"""What every converter shares: the resource as created, sequence numbers, and the lifecycle events that
open and close a response's stream. The text converter (converter.py) and the image converters
(image_converter.py) fill in the output items between."""

from __future__ import annotations

import time

from respserve.engine.generation import GenerationOutput, GenerationStatus
from respserve.protocol.events import (
    ErrorEvent,
    ErrorEventPayload,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    StreamEvent,
)
from respserve.protocol.ids import new_id
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.response import ConversationRef, ResponseError, ResponseResource, ResponseStatus
from respserve.protocol.text_format import TextConfig


def initial_resource(request: CreateResponseRequest, model: str) -> ResponseResource:
    """The resource as created: status `in_progress`, no output, the request's parameters echoed."""
    return ResponseResource(
        id=new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        model=model,
        previous_response_id=request.previous_response_id,
        conversation=ConversationRef(id=request.conversation_id) if request.conversation_id else None,
        instructions=request.instructions,
        tools=request.tools or [],
        tool_choice=request.tool_choice or "auto",
        truncation=request.truncation or "disabled",
        parallel_tool_calls=True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        text=request.text or TextConfig(),
        top_p=1.0 if request.top_p is None else request.top_p,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        top_logprobs=request.top_logprobs or 0,
        temperature=1.0 if request.temperature is None else request.temperature,
        reasoning=request.reasoning,
        max_output_tokens=request.max_output_tokens,
        max_tool_calls=request.max_tool_calls,
        store=request.store,
        background=request.background,
        service_tier=request.service_tier or "default",
        metadata=request.metadata or {},
        safety_identifier=request.safety_identifier,
        prompt_cache_key=request.prompt_cache_key,
        user=request.user,
        seed=request.seed,
        logit_bias=request.logit_bias,
        stop=request.stop,
    )


FINAL_STATUS: dict[GenerationStatus, ResponseStatus] = {
    GenerationStatus.END_OF_SEQUENCE: "completed",
    GenerationStatus.MAXIMUM_LENGTH: "incomplete",
    GenerationStatus.CANCELLED: "cancelled",
    GenerationStatus.FAILED: "failed",
}


class ResponseEvents:
    """Numbers the events of one response and emits those that start and end it."""

    def __init__(self, resource: ResponseResource) -> None:
        self.resource = resource
        self._sequence_number = 0

    def start(self) -> list[StreamEvent]:
        """The events before any output: created (queued, for background), then in progress."""
        created = self._event(ResponseCreatedEvent(response=self._snapshot()))
        self.resource.status = "in_progress"
        return [created, self._event(ResponseInProgressEvent(response=self._snapshot()))]

    def on_output(self, output: GenerationOutput) -> list[StreamEvent]:
        raise NotImplementedError

    def _end(self, status: ResponseStatus, error: str | None) -> list[StreamEvent]:
        """Sets the final status; returns the error event (if failed) and the terminal event."""
        resource = self.resource
        resource.status = status
        events: list[StreamEvent] = []
        if status in ("completed", "incomplete"):
            resource.completed_at = int(time.time())
        if status == "failed":
            resource.error = ResponseError(code="server_error", message=error or "generation failed")
            payload = ErrorEventPayload(type="server_error", code="server_error", message=resource.error.message)
            events.append(
                self._event(ErrorEvent(code=payload.code, message=payload.message, param=None, error=payload))
            )
        terminal = {
            "completed": ResponseCompletedEvent,
            "incomplete": ResponseIncompleteEvent,
            "failed": ResponseFailedEvent,
        }.get(status)
        if terminal is not None:
            events.append(self._event(terminal(response=self._snapshot())))
        return events

    def _snapshot(self) -> ResponseResource:
        return self.resource.model_copy(deep=True)

    def _event(self, event: StreamEvent) -> StreamEvent:
        event.sequence_number = self._sequence_number
        self._sequence_number += 1
        return event
