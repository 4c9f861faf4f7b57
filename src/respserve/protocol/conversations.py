"""Conversation objects and the bodies of the `/v1/conversations` routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from respserve.protocol.content import WireModel
from respserve.protocol.items import InputItem
from respserve.protocol.request import Metadata, check_metadata


class Conversation(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


class CreateConversationRequest(WireModel):
    items: list[InputItem] | None = Field(default=None, max_length=20)
    metadata: Metadata | None = None

    _check_metadata = check_metadata


class UpdateConversationRequest(WireModel):
    metadata: Metadata

    _check_metadata = check_metadata


class AddConversationItemsRequest(WireModel):
    items: list[InputItem] = Field(min_length=1, max_length=20)
