"""Conversation items: what a request's `input` holds and what a response's `output` holds."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from respserve.protocol.content import AssistantContent, InputContent, OutputText, WireModel

MessageStatus = Literal["in_progress", "completed", "incomplete"]


class InputMessage(WireModel):
    """A user, system or developer message; `type` may be omitted (the SDK's EasyInputMessage)."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer"]
    content: str | list[InputContent]
    status: MessageStatus | None = None


class AssistantInputMessage(WireModel):
    """An earlier assistant turn sent back as input."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["assistant"]
    content: str | list[AssistantContent]
    status: MessageStatus | None = None


def _item_tag(value: Any) -> str | None:
    """Messages are told apart by role, other items by type; a missing type means a message."""
    get = value.get if isinstance(value, dict) else lambda key, default=None: getattr(value, key, default)
    item_type = get("type", "message")
    if item_type == "message":
        return "message:assistant" if get("role") == "assistant" else "message:input"
    return item_type


InputItem = Annotated[
    Annotated[InputMessage, Tag("message:input")] | Annotated[AssistantInputMessage, Tag("message:assistant")],
    Discriminator(_item_tag, custom_error_type="invalid_item", custom_error_message="unsupported input item"),
]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: MessageStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


OutputItem = OutputMessage
