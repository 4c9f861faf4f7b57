"""Streaming events of `POST /v1/responses` with `stream: true`, one model per `type`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from respserve.protocol.content import LogProb, OutputContent
from respserve.protocol.items import OutputItem
from respserve.protocol.response import ResponseResource

_LINE_BREAKS_ESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class StreamEvent(BaseModel):
    type: str
    sequence_number: int = 0

    def to_wire_json(self) -> str:
        # JSON allows these raw, but line readers built on str.splitlines() (httpx.iter_lines, for one)
        # would cut an SSE line at them: escape them.
        return self.model_dump_json(by_alias=True).translate(_LINE_BREAKS_ESCAPED)


class ResponseCreatedEvent(StreamEvent):
    type: Literal["response.created"] = "response.created"
    response: ResponseResource


class ResponseInProgressEvent(StreamEvent):
    type: Literal["response.in_progress"] = "response.in_progress"
    response: ResponseResource


class ResponseCompletedEvent(StreamEvent):
    type: Literal["response.completed"] = "response.completed"
    response: ResponseResource


class ResponseIncompleteEvent(StreamEvent):
    type: Literal["response.incomplete"] = "response.incomplete"
    response: ResponseResource


class ResponseFailedEvent(StreamEvent):
    type: Literal["response.failed"] = "response.failed"
    response: ResponseResource


class OutputItemAddedEvent(StreamEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int
    item: OutputItem


class OutputItemDoneEvent(StreamEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int
    item: OutputItem


class ContentPartAddedEvent(StreamEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    item_id: str
    output_index: int
    content_index: int
    part: OutputContent


class ContentPartDoneEvent(StreamEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    item_id: str
    output_index: int
    content_index: int
    part: OutputContent


class OutputTextDeltaEvent(StreamEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[LogProb] = Field(default_factory=list)


class OutputTextDoneEvent(StreamEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[LogProb] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(StreamEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(StreamEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class CustomToolCallInputDeltaEvent(StreamEvent):
    type: Literal["response.custom_tool_call_input.delta"] = "response.custom_tool_call_input.delta"
    item_id: str
    output_index: int
    delta: str


class CustomToolCallInputDoneEvent(StreamEvent):
    type: Literal["response.custom_tool_call_input.done"] = "response.custom_tool_call_input.done"
    item_id: str
    output_index: int
    input: str


class McpListToolsInProgressEvent(StreamEvent):
    type: Literal["response.mcp_list_tools.in_progress"] = "response.mcp_list_tools.in_progress"
    item_id: str
    output_index: int


class McpListToolsCompletedEvent(StreamEvent):
    type: Literal["response.mcp_list_tools.completed"] = "response.mcp_list_tools.completed"
    item_id: str
    output_index: int


class McpListToolsFailedEvent(StreamEvent):
    type: Literal["response.mcp_list_tools.failed"] = "response.mcp_list_tools.failed"
    item_id: str
    output_index: int


class McpCallInProgressEvent(StreamEvent):
    type: Literal["response.mcp_call.in_progress"] = "response.mcp_call.in_progress"
    item_id: str
    output_index: int


class McpCallArgumentsDeltaEvent(StreamEvent):
    type: Literal["response.mcp_call_arguments.delta"] = "response.mcp_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class McpCallArgumentsDoneEvent(StreamEvent):
    type: Literal["response.mcp_call_arguments.done"] = "response.mcp_call_arguments.done"
    item_id: str
    output_index: int
    arguments: str


class McpCallCompletedEvent(StreamEvent):
    type: Literal["response.mcp_call.completed"] = "response.mcp_call.completed"
    item_id: str
    output_index: int


class McpCallFailedEvent(StreamEvent):
    type: Literal["response.mcp_call.failed"] = "response.mcp_call.failed"
    item_id: str
    output_index: int


class ReasoningTextDeltaEvent(StreamEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningTextDoneEvent(StreamEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class OutputImagePartialEvent(StreamEvent):
    """A preview of image `content_index` of an image model's message, decoded from intermediate latents.
    Not in Open Responses or OpenAI (which streams previews only for its image tool); named after the tool's
    `partial_image` event, with the same fields."""

    type: Literal["response.output_image.partial_image"] = "response.output_image.partial_image"
    item_id: str
    output_index: int
    content_index: int
    partial_image_index: int
    partial_image_b64: str
    output_format: str


class ImageGenerationCallInProgressEvent(StreamEvent):
    type: Literal["response.image_generation_call.in_progress"] = "response.image_generation_call.in_progress"
    item_id: str
    output_index: int


class ImageGenerationCallGeneratingEvent(StreamEvent):
    type: Literal["response.image_generation_call.generating"] = "response.image_generation_call.generating"
    item_id: str
    output_index: int


class ImageGenerationCallPartialImageEvent(StreamEvent):
    type: Literal["response.image_generation_call.partial_image"] = "response.image_generation_call.partial_image"
    item_id: str
    output_index: int
    partial_image_index: int
    partial_image_b64: str


class ImageGenerationCallCompletedEvent(StreamEvent):
    type: Literal["response.image_generation_call.completed"] = "response.image_generation_call.completed"
    item_id: str
    output_index: int


class ErrorEventPayload(BaseModel):
    type: str
    code: str | None
    message: str
    param: str | None = None


class ErrorEvent(StreamEvent):
    """Open Responses nests the error in `error`; the OpenAI SDK reads `code`/`message`/`param` at the top."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None
    error: ErrorEventPayload
