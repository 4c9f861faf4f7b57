"""`/v1/conversations`: conversation objects and their items."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from respserve.api.auth import Owner
from respserve.api.errors import NotFoundError
from respserve.api.input_items import stored_input_items
from respserve.api.pagination import Include, Limit, Order
from respserve.api.state import AppState, StateDep
from respserve.protocol.conversations import (
    AddConversationItemsRequest,
    Conversation,
    ConversationDeleted,
    CreateConversationRequest,
    UpdateConversationRequest,
)
from respserve.protocol.ids import new_id
from respserve.protocol.lists import ItemList
from respserve.store.base import StoredConversation

router = APIRouter()


def _not_found(conversation_id: str) -> NotFoundError:
    return NotFoundError(f"Conversation with id '{conversation_id}' not found.", param="conversation_id")


def _wire(conversation: StoredConversation) -> Conversation:
    return Conversation(id=conversation.id, created_at=conversation.created_at, metadata=conversation.metadata)


async def _conversation(state: AppState, conversation_id: str, owner: str | None) -> StoredConversation:
    conversation = await state.store.get_conversation(conversation_id, owner)
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


@router.post("/v1/conversations")
async def create_conversation(body: CreateConversationRequest, state: StateDep, owner: Owner) -> Conversation:
    conversation = StoredConversation(id=new_id("conv"), created_at=int(time.time()), metadata=body.metadata or {})
    items = stored_input_items(body.items or [])
    await state.store.create_conversation(conversation, items, owner)
    return _wire(conversation)


@router.get("/v1/conversations/{conversation_id}")
async def retrieve_conversation(conversation_id: str, state: StateDep, owner: Owner) -> Conversation:
    return _wire(await _conversation(state, conversation_id, owner))


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str, body: UpdateConversationRequest, state: StateDep, owner: Owner
) -> Conversation:
    conversation = await state.store.update_conversation(conversation_id, body.metadata, owner)
    if conversation is None:
        raise _not_found(conversation_id)
    return _wire(conversation)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, state: StateDep, owner: Owner) -> ConversationDeleted:
    if not await state.store.delete_conversation(conversation_id, owner):
        raise _not_found(conversation_id)
    return ConversationDeleted(id=conversation_id)


@router.post("/v1/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: AddConversationItemsRequest, state: StateDep, owner: Owner) -> ItemList:
    items = stored_input_items(body.items)
    if not await state.store.add_conversation_items(conversation_id, items, owner):
        raise _not_found(conversation_id)
    return ItemList.of(items, has_more=False)


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    state: StateDep,
    owner: Owner,
    limit: Limit = 20,
    order: Order = "desc",
    after: str | None = None,
    include: Include = None,
) -> ItemList:
    page = await state.store.list_conversation_items(conversation_id, owner, limit, order, after)
    if page is None:
        raise _not_found(conversation_id)
    return ItemList.of(page.items, page.has_more)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def retrieve_item(conversation_id: str, item_id: str, state: StateDep, owner: Owner) -> dict[str, Any]:
    await _conversation(state, conversation_id, owner)
    item = await state.store.get_conversation_item(conversation_id, item_id, owner)
    if item is None:
        raise NotFoundError(f"Item with id '{item_id}' not found.", param="item_id")
    return item


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, state: StateDep, owner: Owner) -> Conversation:
    conversation = await _conversation(state, conversation_id, owner)
    if not await state.store.delete_conversation_item(conversation_id, item_id, owner):
        raise NotFoundError(f"Item with id '{item_id}' not found.", param="item_id")
    return _wire(conversation)
