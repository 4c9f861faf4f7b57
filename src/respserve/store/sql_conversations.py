"""Conversations and their items in the SQL both backends speak, written once as sql_store.py is.

Kept apart from sql_store.py only for size; `SqlResponseStore` takes these methods in. Items keep their
insertion order (`position`), which pages and `after` cursors follow.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from respserve.store.base import Item, ItemPage, Order, StoredConversation

if TYPE_CHECKING:
    from respserve.store.sql_store import Cursor, Row, SqlBackend


class SqlConversations:
    _db: SqlBackend

    async def create_conversation(self, conversation: StoredConversation, items: list[Item], owner: str | None) -> None:
        async def create(db: Cursor) -> None:
            await db.execute(
                "INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)",
                (conversation.id, owner, conversation.created_at, json.dumps(conversation.metadata)),
            )
            await _insert_conversation_items(db, conversation.id, items)

        await self._db.atomically(create)

    async def get_conversation(self, conversation_id: str, owner: str | None) -> StoredConversation | None:
        rows = await self._db.query(
            "SELECT id, created_at, metadata FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
            (conversation_id, owner),
        )
        if not rows:
            return None
        return StoredConversation(id=rows[0][0], created_at=rows[0][1], metadata=json.loads(rows[0][2]))

    async def update_conversation(
        self, conversation_id: str, metadata: dict[str, str], owner: str | None
    ) -> StoredConversation | None:
        await self._db.write(
            "UPDATE conversations SET metadata = ? WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
            (json.dumps(metadata), conversation_id, owner),
        )
        return await self.get_conversation(conversation_id, owner)

    async def delete_conversation(self, conversation_id: str, owner: str | None) -> bool:
        deleted = await self._db.write(
            "DELETE FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (conversation_id, owner)
        )
        return deleted > 0

    async def add_conversation_items(self, conversation_id: str, items: list[Item], owner: str | None) -> bool:
        async def add(db: Cursor) -> bool:
            await db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (conversation_id, owner)
            )
            if await db.fetchone() is None:
                return False
            await _insert_conversation_items(db, conversation_id, items)
            return True

        return await self._db.atomically(add)

    async def list_conversation_items(
        self, conversation_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if await self.get_conversation(conversation_id, owner) is None:
            return None
        rows = await self._db.query(
            "SELECT position, item_id, item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        )
        return item_page(rows, limit, order, after)

    async def all_conversation_items(self, conversation_id: str, owner: str | None) -> list[Item] | None:
        page = await self.list_conversation_items(conversation_id, owner, limit=-1, order="asc", after=None)
        return None if page is None else page.items

    async def get_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> Item | None:
        rows = await self._db.query(
            "SELECT i.item FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id"
            " WHERE i.conversation_id = ? AND i.item_id = ? AND c.owner IS NOT DISTINCT FROM ?",
            (conversation_id, item_id, owner),
        )
        return json.loads(rows[0][0]) if rows else None

    async def delete_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> bool:
        deleted = await self._db.write(
            "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ? AND conversation_id IN"
            " (SELECT id FROM conversations WHERE owner IS NOT DISTINCT FROM ?)",
            (conversation_id, item_id, owner),
        )
        return deleted > 0


async def _insert_conversation_items(db: Cursor, conversation_id: str, items: list[Item]) -> None:
    if items:
        await db.executemany(
            "INSERT INTO conversation_items (conversation_id, item_id, item) VALUES (?, ?, ?)",
            [(conversation_id, item["id"], json.dumps(item)) for item in items],
        )


def item_page(rows: list[Row], limit: int, order: Order, after: str | None) -> ItemPage:
    """Rows are (position, item_id, item JSON) in ascending position; `after` is an item id."""
    ordered = rows if order == "asc" else list(reversed(rows))
    if after is not None:
        ids = [row[1] for row in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    selected = ordered if limit < 0 else ordered[:limit]
    return ItemPage(items=[json.loads(row[2]) for row in selected], has_more=len(selected) < len(ordered))
