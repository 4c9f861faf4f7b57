"""The store's logic, written once in the SQL both backends speak (SQLite and PostgreSQL).

A backend (`sqlite.py`, `postgres.py`) owns the connection(s), the schema and its migrations, and
translates placeholders; everything a request can do to the store is here. Items, resources and events
are kept as JSON text; `owner` (the API key's owner, or NULL without keys) is compared with
`IS NOT DISTINCT FROM`, so NULL matches NULL.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from respserve.store.base import Channel, Item, ItemPage, Order, ResponseStore, StoredConversation, StoredImage
from respserve.store.sql_files import SqlFiles

_INPUT, _OUTPUT = 0, 1
Row = tuple[Any, ...]


class Cursor(Protocol):
    """What a transaction hands out: DB-API's `execute`/`executemany`, with `?` placeholders."""

    rowcount: int

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> Any: ...

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...


class SqlBackend(ABC):
    shared = False  # other processes use the same database

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Cursor]:
        """A cursor inside one transaction: committed on leaving, rolled back on an exception."""

    @abstractmethod
    def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        """Queues a notification for the other processes, sent when `cursor`'s transaction commits."""

    @abstractmethod
    def listen(self, callback: Callable[[Channel, str], None]) -> None:
        """Starts delivering other processes' notifications to `callback`."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.transaction() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    @abstractmethod
    def close(self) -> None: ...


class SqlResponseStore(SqlFiles, ResponseStore):
    def __init__(self, backend: SqlBackend) -> None:
        self._db = backend
        self.shared = backend.shared

    # ---- responses --------------------------------------------------------------------------------------
    def save_response(self, resource: dict[str, Any], input_items: list[Item] | None, owner: str | None) -> None:
        response_id = resource["id"]
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO responses (id, owner, previous_response_id, status, created_at, resource)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = excluded.status, resource = excluded.resource",
                (
                    response_id,
                    owner,
                    resource.get("previous_response_id"),
                    resource["status"],
                    resource["created_at"],
                    json.dumps(resource),
                ),
            )
            if input_items is not None:
                _replace_items(db, response_id, _INPUT, input_items)
            _replace_items(db, response_id, _OUTPUT, resource.get("output") or [])

    def get_response(self, response_id: str, owner: str | None) -> dict[str, Any] | None:
        rows = self._db.query(
            "SELECT resource FROM responses WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (response_id, owner)
        )
        return json.loads(rows[0][0]) if rows else None

    def delete_response(self, response_id: str, owner: str | None) -> bool:
        with self._db.transaction() as db:
            db.execute("DELETE FROM responses WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (response_id, owner))
            deleted = db.rowcount
            if deleted:
                db.execute("DELETE FROM images WHERE response_id = ?", (response_id,))
            return deleted > 0

    def list_input_items(
        self, response_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if self.get_response(response_id, owner) is None:
            return None
        rows = self._db.query(
            "SELECT position, item_id, item FROM response_items WHERE response_id = ? AND kind = ? ORDER BY position",
            (response_id, _INPUT),
        )
        return _page(rows, limit, order, after)

    def chain_items(self, response_id: str, owner: str | None) -> list[Item] | None:
        # One recursive query walks the whole chain, however long it is.
        rows = self._db.query(
            """
            WITH RECURSIVE chain (id, previous, depth) AS (
                SELECT id, previous_response_id, 0 FROM responses
                WHERE id = ? AND owner IS NOT DISTINCT FROM ?
                UNION ALL
                SELECT r.id, r.previous_response_id, chain.depth + 1
                FROM responses r JOIN chain ON r.id = chain.previous
                WHERE r.owner IS NOT DISTINCT FROM ?
            )
            SELECT chain.depth, i.item FROM chain LEFT JOIN response_items i ON i.response_id = chain.id
            ORDER BY chain.depth DESC, i.kind, i.position
            """,
            (response_id, owner, owner),
        )
        if not rows:
            return None
        return [json.loads(item) for _, item in rows if item is not None]

    def fail_unfinished(self, message: str) -> int:
        return self._fail_where("", (), message)

    def renew_leases(self, replica: str, response_ids: list[str], expires_at: int) -> None:
        if not response_ids:
            return
        marks = ", ".join("?" for _ in response_ids)
        with self._db.transaction() as db:
            db.execute(
                f"UPDATE responses SET replica = ?, lease_expires = ? WHERE id IN ({marks})"
                " AND status IN ('queued', 'in_progress')",
                (replica, expires_at, *response_ids),
            )

    def fail_expired(self, now: int, unleased_before: int, message: str) -> int:
        where = " AND (lease_expires < ? OR (lease_expires IS NULL AND created_at < ?))"
        return self._fail_where(where, (now, unleased_before), message)

    def _fail_where(self, condition: str, params: tuple[Any, ...], message: str) -> int:
        with self._db.transaction() as db:
            db.execute(
                "SELECT id, resource FROM responses WHERE status IN ('queued', 'in_progress')" + condition, params
            )
            unfinished = db.fetchall()
            for response_id, text in unfinished:
                resource = {**json.loads(text), "status": "failed"}
                resource["error"] = {"code": "server_error", "message": message}
                db.execute(
                    "UPDATE responses SET status = 'failed', resource = ? WHERE id = ?",
                    (json.dumps(resource), response_id),
                )
            return len(unfinished)

    # ---- stream events ---------------------------------------------------------------------------------
    def append_events(self, response_id: str, events: list[tuple[int, str]]) -> None:
        with self._db.transaction() as db:
            db.executemany(
                "INSERT INTO response_events (response_id, sequence_number, event) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [(response_id, number, event) for number, event in events],
            )
            self._db.notify_in(db, "events", response_id)  # delivered with the commit

    def notify(self, channel: Channel, response_id: str) -> None:
        with self._db.transaction() as db:
            self._db.notify_in(db, channel, response_id)

    def listen(self, callback: Callable[[Channel, str], None]) -> None:
        self._db.listen(callback)

    def events_after(self, response_id: str, sequence_number: int) -> list[tuple[int, str]]:
        rows = self._db.query(
            "SELECT sequence_number, event FROM response_events"
            " WHERE response_id = ? AND sequence_number > ? ORDER BY sequence_number",
            (response_id, sequence_number),
        )
        return [(number, event) for number, event in rows]

    # ---- conversations ---------------------------------------------------------------------------------
    def create_conversation(self, conversation: StoredConversation, items: list[Item], owner: str | None) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)",
                (conversation.id, owner, conversation.created_at, json.dumps(conversation.metadata)),
            )
            _insert_conversation_items(db, conversation.id, items)

    def get_conversation(self, conversation_id: str, owner: str | None) -> StoredConversation | None:
        rows = self._db.query(
            "SELECT id, created_at, metadata FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
            (conversation_id, owner),
        )
        if not rows:
            return None
        return StoredConversation(id=rows[0][0], created_at=rows[0][1], metadata=json.loads(rows[0][2]))

    def update_conversation(
        self, conversation_id: str, metadata: dict[str, str], owner: str | None
    ) -> StoredConversation | None:
        with self._db.transaction() as db:
            db.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
                (json.dumps(metadata), conversation_id, owner),
            )
        return self.get_conversation(conversation_id, owner)

    def delete_conversation(self, conversation_id: str, owner: str | None) -> bool:
        with self._db.transaction() as db:
            db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (conversation_id, owner)
            )
            return db.rowcount > 0

    def add_conversation_items(self, conversation_id: str, items: list[Item], owner: str | None) -> bool:
        with self._db.transaction() as db:
            db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (conversation_id, owner)
            )
            if db.fetchone() is None:
                return False
            _insert_conversation_items(db, conversation_id, items)
            return True

    def list_conversation_items(
        self, conversation_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if self.get_conversation(conversation_id, owner) is None:
            return None
        rows = self._db.query(
            "SELECT position, item_id, item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        )
        return _page(rows, limit, order, after)

    def all_conversation_items(self, conversation_id: str, owner: str | None) -> list[Item] | None:
        page = self.list_conversation_items(conversation_id, owner, limit=-1, order="asc", after=None)
        return None if page is None else page.items

    def get_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> Item | None:
        rows = self._db.query(
            "SELECT i.item FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id"
            " WHERE i.conversation_id = ? AND i.item_id = ? AND c.owner IS NOT DISTINCT FROM ?",
            (conversation_id, item_id, owner),
        )
        return json.loads(rows[0][0]) if rows else None

    def delete_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> bool:
        with self._db.transaction() as db:
            db.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ? AND conversation_id IN"
                " (SELECT id FROM conversations WHERE owner IS NOT DISTINCT FROM ?)",
                (conversation_id, item_id, owner),
            )
            return db.rowcount > 0

    # ---- images --------------------------------------------------------------------------------------------
    def save_image(self, image: StoredImage, owner: str | None) -> None:
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO images (id, response_id, owner, media_type, data) VALUES (?, ?, ?, ?, ?)",
                (image.id, image.response_id, owner, image.media_type, image.data),
            )

    def get_image(self, image_id: str, owner: str | None) -> StoredImage | None:
        rows = self._db.query(
            "SELECT id, response_id, media_type, data FROM images WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
            (image_id, owner),
        )
        if not rows:
            return None
        image_id, response_id, media_type, data = rows[0]
        return StoredImage(id=image_id, response_id=response_id, media_type=media_type, data=bytes(data))

    def close(self) -> None:
        self._db.close()


def _replace_items(db: Cursor, response_id: str, kind: int, items: list[Item]) -> None:
    db.execute("DELETE FROM response_items WHERE response_id = ? AND kind = ?", (response_id, kind))
    if items:
        db.executemany(
            "INSERT INTO response_items (response_id, kind, position, item_id, item) VALUES (?, ?, ?, ?, ?)",
            [(response_id, kind, index, item.get("id", ""), json.dumps(item)) for index, item in enumerate(items)],
        )


def _insert_conversation_items(db: Cursor, conversation_id: str, items: list[Item]) -> None:
    if items:
        db.executemany(
            "INSERT INTO conversation_items (conversation_id, item_id, item) VALUES (?, ?, ?)",
            [(conversation_id, item["id"], json.dumps(item)) for item in items],
        )


def _page(rows: list[Row], limit: int, order: Order, after: str | None) -> ItemPage:
    """Rows are (position, item_id, item JSON) in ascending position; `after` is an item id."""
    ordered = rows if order == "asc" else list(reversed(rows))
    if after is not None:
        ids = [row[1] for row in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    selected = ordered if limit < 0 else ordered[:limit]
    return ItemPage(items=[json.loads(row[2]) for row in selected], has_more=len(selected) < len(ordered))


def split_statements(script: str) -> Iterator[str]:
    """A migration script's statements (no `;` inside a statement in ours)."""
    return (statement for statement in script.split(";") if statement.strip())
