"""A request's `instructions` and `input` items, flattened into the chat turns the template renders."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from respserve.api import client_tools
from respserve.api.errors import InvalidRequestError
from respserve.api.image_inputs import ImageLimits, prompt_image
from respserve.engine.generation import ChatMessage, PromptImage, ToolCallTurn
from respserve.protocol.content import InputFile, InputImage, InputText, OutputText, Refusal
from respserve.protocol.items import (
    ClientToolCallInput,
    ClientToolOutputInput,
    CustomToolCallInput,
    CustomToolCallOutputInput,
    FunctionCallInput,
    FunctionCallOutputInput,
    ImageGenerationCall,
    InputItem,
    McpApprovalRequestInput,
    McpApprovalResponseInput,
    McpCallInput,
    McpListToolsInput,
    ReasoningInput,
)
from respserve.protocol.request import CreateResponseRequest
from respserve.protocol.tools import qualified_name

# Earlier thoughts (chat templates drop them), generated images (a text model cannot read them), and MCP
# bookkeeping (tool listings, approval requests and answers; the calls themselves are rendered).
_LEFT_OUT = (ReasoningInput, ImageGenerationCall, McpListToolsInput, McpApprovalRequestInput, McpApprovalResponseInput)

# Open chat templates know `system`, not OpenAI's `developer`: both carry the same authority.
_TEMPLATE_ROLES = {"developer": "system"}


def build_chat_messages(
    request: CreateResponseRequest, context: list[InputItem], model: str, images: ImageLimits | None
) -> list[ChatMessage]:
    """Instructions first, then the earlier items (`previous_response_id` or `conversation`), then `input`.
    `images`: None for a text-only model (an image is a 400), else the bounds its images are decoded within
    (image parts are data URLs by now: image_inputs.read_input_images). CPU work: off the event loop."""
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append(ChatMessage(role="system", content=request.instructions))
    for item in context:
        for message in _messages(item, "input", model, images):
            _append(messages, message)
    if isinstance(request.input, str):
        messages.append(ChatMessage(role="user", content=request.input))
    else:
        for index, item in enumerate(request.input):
            for message in _messages(item, f"input[{index}]", model, images):
                _append(messages, message)
    if not any(message.role != "system" for message in messages):
        raise InvalidRequestError("'input' must hold at least one user or assistant message.", param="input")
    return messages


def _append(messages: list[ChatMessage], message: ChatMessage) -> None:
    """Adds a turn; a function call joins the assistant turn before it (one turn, several calls)."""
    previous = messages[-1] if messages else None
    if message.tool_calls and previous is not None and previous.role == "assistant":
        messages[-1] = replace(previous, tool_calls=previous.tool_calls + message.tool_calls)
    else:
        messages.append(message)


def _messages(item: InputItem, param: str, model: str, images: ImageLimits | None) -> list[ChatMessage]:
    if isinstance(item, _LEFT_OUT):
        return []
    if isinstance(item, McpCallInput):  # a call the server ran: the call, then what it returned
        name = qualified_name(item.server_label, item.name)
        call = ToolCallTurn(call_id=item.id or item.name, name=name, arguments=item.arguments)
        result = item.output if item.output is not None else f"Error: {item.error}"
        return [
            ChatMessage(role="assistant", content="", tool_calls=(call,)),
            ChatMessage(role="tool", content=result, tool_call_id=call.call_id),
        ]
    return [_message(item, param, model, images)]


def _message(item: InputItem, param: str, model: str, images: ImageLimits | None) -> ChatMessage:
    if isinstance(item, FunctionCallInput | CustomToolCallInput):
        # A custom tool is offered as a function of one string, `input`: its call is rendered so too.
        arguments = item.arguments if isinstance(item, FunctionCallInput) else json.dumps({"input": item.input})
        call = ToolCallTurn(call_id=item.call_id, name=qualified_name(item.namespace, item.name), arguments=arguments)
        return ChatMessage(role="assistant", content="", tool_calls=(call,))
    if isinstance(item, ClientToolCallInput):
        name, arguments = client_tools.call_arguments(item)
        call = ToolCallTurn(call_id=item.call_id, name=name, arguments=arguments)
        return ChatMessage(role="assistant", content="", tool_calls=(call,))
    if isinstance(item, ClientToolOutputInput):
        return ChatMessage(
            role="tool", content=client_tools.output_text(item), tool_call_id=client_tools.output_call_id(item)
        )
    if isinstance(item, FunctionCallOutputInput | CustomToolCallOutputInput):
        if isinstance(item.output, str):
            return ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id)
        text, pictures = _parts(item.output, f"{param}.output", model, images)
        return ChatMessage(role="tool", content=text, tool_call_id=item.call_id, images=pictures)
    role = _TEMPLATE_ROLES.get(item.role, item.role)
    if isinstance(item.content, str):
        return ChatMessage(role=role, content=item.content)
    text, pictures = _parts(item.content, f"{param}.content", model, images)
    return ChatMessage(role=role, content=text, images=pictures)


def _parts(
    content: list[Any], param: str, model: str, images: ImageLimits | None
) -> tuple[str, tuple[PromptImage, ...]]:
    """The parts' text, and their pictures when the model reads images."""
    texts = []
    pictures: list[PromptImage] = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        if isinstance(part, InputText | OutputText):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            texts.append(part.refusal)
        elif isinstance(part, InputImage):
            if images is not None:
                pictures.append(prompt_image(part, part_param, images))
            else:
                raise InvalidRequestError(
                    f"The model '{model}' is a text-only model and does not accept 'input_image' content.",
                    param=part_param,
                    code="unsupported_content",
                )
        elif isinstance(part, InputFile):
            raise InvalidRequestError(
                "'input_file' content is not supported by this server.",
                param=part_param,
                code="unsupported_content",
            )
    return "\n".join(texts), tuple(pictures)
