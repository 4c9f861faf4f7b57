"""A request's `instructions` and `input` items, flattened into the chat turns the template renders."""

from __future__ import annotations

from respserve.api.errors import InvalidRequestError
from respserve.engine.generation import ChatMessage
from respserve.protocol.content import InputFile, InputImage, InputText, OutputText, Refusal
from respserve.protocol.items import AssistantInputMessage, InputItem, InputMessage
from respserve.protocol.request import CreateResponseRequest

# Open chat templates know `system`, not OpenAI's `developer`: both carry the same authority.
_TEMPLATE_ROLES = {"developer": "system"}


def build_chat_messages(
    request: CreateResponseRequest, context: list[InputItem], model: str, accepts_images: bool
) -> list[ChatMessage]:
    """Instructions first, then the earlier items (`previous_response_id` or `conversation`), then `input`."""
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append(ChatMessage(role="system", content=request.instructions))
    for item in context:
        messages.append(_message(item, "input", model, accepts_images))
    if isinstance(request.input, str):
        messages.append(ChatMessage(role="user", content=request.input))
    else:
        for index, item in enumerate(request.input):
            messages.append(_message(item, f"input[{index}]", model, accepts_images))
    if not any(message.role != "system" for message in messages):
        raise InvalidRequestError("'input' must hold at least one user or assistant message.", param="input")
    return messages


def _message(item: InputMessage | AssistantInputMessage, param: str, model: str, accepts_images: bool) -> ChatMessage:
    role = _TEMPLATE_ROLES.get(item.role, item.role)
    if isinstance(item.content, str):
        return ChatMessage(role=role, content=item.content)
    texts = []
    for index, part in enumerate(item.content):
        part_param = f"{param}.content[{index}]"
        if isinstance(part, InputText | OutputText):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            texts.append(part.refusal)
        elif isinstance(part, InputImage):
            if not accepts_images:
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
    return ChatMessage(role=role, content="\n".join(texts))
