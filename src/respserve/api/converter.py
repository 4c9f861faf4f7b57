"""The converter: a worker's `GenerationOutput`s become a Response resource and its stream of events.

One converter serves one response. The streaming and the plain JSON paths feed it the same outputs; the
first forwards the events it returns, the second only reads `resource` at the end.
"""

from __future__ import annotations

import time

from respserve.engine.generation import GenerationOutput, GenerationStatus, TokenLogprob
from respserve.protocol.content import LogProb, OutputText, TopLogProb
from respserve.protocol.events import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ErrorEvent,
    ErrorEventPayload,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    StreamEvent,
)
from respserve.protocol.ids import new_id
from respserve.protocol.items import OutputMessage
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.response import (
    ConversationRef,
    IncompleteDetails,
    ResponseError,
    ResponseResource,
    ResponseStatus,
    Usage,
)
from respserve.protocol.text_format import TextConfig


def _wire_logprob(logprob: TokenLogprob) -> LogProb:
    return LogProb(
        token=logprob.token,
        logprob=logprob.logprob,
        bytes=logprob.bytes,
        top_logprobs=[TopLogProb(token=top.token, logprob=top.logprob, bytes=top.bytes) for top in logprob.top],
    )


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
        stop=request.stop,
    )


_FINAL_STATUS: dict[GenerationStatus, ResponseStatus] = {
    GenerationStatus.END_OF_SEQUENCE: "completed",
    GenerationStatus.MAXIMUM_LENGTH: "incomplete",
    GenerationStatus.CANCELLED: "cancelled",
    GenerationStatus.FAILED: "failed",
}


class ResponseConverter:
    def __init__(self, resource: ResponseResource) -> None:
        self.resource = resource
        self._message = OutputMessage(id=new_id("msg"), status="in_progress", content=[])
        self._text: list[str] = []
        self._logprobs: list[LogProb] = []
        self._pending_logprobs: list[LogProb] = []  # tokens whose text is still held back
        self._sequence_number = 0

    def start(self) -> list[StreamEvent]:
        """The events before the first token: created, in progress, the message and its empty text part."""
        created = self._event(ResponseCreatedEvent(response=self._snapshot()))  # queued, for background
        self.resource.status = "in_progress"
        return [
            created,
            self._event(ResponseInProgressEvent(response=self._snapshot())),
            self._event(OutputItemAddedEvent(output_index=0, item=self._message.model_copy(deep=True))),
            self._event(
                ContentPartAddedEvent(
                    item_id=self._message.id, output_index=0, content_index=0, part=OutputText(text="")
                )
            ),
        ]

    def on_output(self, output: GenerationOutput) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self._pending_logprobs.extend(_wire_logprob(logprob) for logprob in output.logprobs)
        if output.text:
            self._text.append(output.text)
            logprobs, self._pending_logprobs = self._pending_logprobs, []
            self._logprobs.extend(logprobs)
            delta = OutputTextDeltaEvent(
                item_id=self._message.id, output_index=0, content_index=0, delta=output.text, logprobs=logprobs
            )
            events.append(self._event(delta))
        if output.final_status.is_done:
            events.extend(self._finish(output))
        return events

    def _finish(self, output: GenerationOutput) -> list[StreamEvent]:
        status = _FINAL_STATUS[output.final_status]
        text = "".join(self._text)
        part = OutputText(text=text, logprobs=self._logprobs)
        self._message.status = "completed" if status == "completed" else "incomplete"
        self._message.content = [part]
        resource = self.resource
        resource.status = status
        resource.output = [self._message]
        resource.usage = Usage(
            input_tokens=output.prompt_tokens,
            output_tokens=output.output_tokens,
            total_tokens=output.prompt_tokens + output.output_tokens,
        )
        if status in ("completed", "incomplete"):
            resource.completed_at = int(time.time())
        if status == "incomplete":
            resource.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        if status == "failed":
            resource.error = ResponseError(code="server_error", message=output.error or "generation failed")

        message_id = self._message.id
        events: list[StreamEvent] = [
            self._event(
                OutputTextDoneEvent(
                    item_id=message_id, output_index=0, content_index=0, text=text, logprobs=self._logprobs
                )
            ),
            self._event(ContentPartDoneEvent(item_id=message_id, output_index=0, content_index=0, part=part)),
            self._event(OutputItemDoneEvent(output_index=0, item=self._message.model_copy(deep=True))),
        ]
        if status == "failed":
            message = resource.error.message if resource.error else "generation failed"
            payload = ErrorEventPayload(type="server_error", code="server_error", message=message)
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
