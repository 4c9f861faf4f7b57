"""The store's logic, written once in the SQL both backends speak (SQLite and PostgreSQL).

A backend (`sqlite.py`, `postgres.py`) owns the connection(s), the schema and its migrations, and
translates placeholders; everything a request can do to the store is here. Each write is a transaction
written as a coroutine over a `Cursor`, which the backend runs its own way (`atomically`): PostgreSQL on a
pooled asyncio connection, SQLite whole on its thread. Items, resources and events are kept as JSON text;
`owner` (the API key's owner, or NULL without keys) is compared with `IS NOT DISTINCT FROM`, so NULL
matches NULL.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from respserve.store.base import Channel, Item, ItemPage, Order, ResponseStore, StoredImage
from respserve.store.sql_conversations import SqlConversations, item_page
from respserve.store.sql_files import SqlFiles

_INPUT, _OUTPUT = 0, 1
Row = tuple[Any, ...]
T = TypeVar("T")


class Cursor(Protocol):
    """DB-API's `execute`/`executemany`/`fetch*`, awaited, with `?` placeholders; each backend adapts its
    driver's cursor to it. A transaction awaits nothing but these (and `notify_in`)."""

    @property
    def rowcount(self) -> int: ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...

    async def fetchone(self) -> Row | None: ...

    async def fetchall(self) -> list[Row]: ...


Transaction = Callable[[Cursor], Coroutine[Any, Any, T]]


class SqlBackend(ABC):
    shared = False  # other processes use the same database

    @abstractmethod
    async def open(self) -> None:
        """Connects and applies the migrations the schema lacks."""

    @abstractmethod
    async def atomically(self, work: Transaction[T]) -> T:
        """Runs `work` in one transaction: committed when it returns, rolled back when it raises. Once
        begun it runs to its end, even for a caller cancelled meanwhile (as a call on a thread did)."""

    @abstractmethod
    async def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        """Queues a notification for the other processes, sent when `cursor`'s transaction commits."""

    @abstractmethod
    async def listen(self, callback: Callable[[Channel, str], None]) -> None:
        """Starts delivering other processes' notifications to `callback`, on the event loop."""

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async def read(cursor: Cursor) -> list[Row]:
            await cursor.execute(sql, params)
            return await cursor.fetchall()

        return await self.atomically(read)

    async def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement that returns no rows, in a transaction of its own; how many rows it changed."""

        async def change(cursor: Cursor) -> int:
            await cursor.execute(sql, params)
            return cursor.rowcount

        return await self.atomically(change)

    @abstractmethod
    async def close(self) -> None: ...


class SqlResponseStore(SqlConversations, SqlFiles, ResponseStore):
    def __init__(self, backend: SqlBackend) -> None:
        self._db = backend
        self.shared = backend.shared

    async def open(self) -> None:
        await self._db.open()

    # ---- responses --------------------------------------------------------------------------------------
    async def save_response(self, resource: dict[str, Any], input_items: list[Item] | None, owner: str | None) -> None:
        response_id = resource["id"]

        async def save(db: Cursor) -> None:
            await db.execute(
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
                await _replace_items(db, response_id, _INPUT, input_items)
            await _replace_items(db, response_id, _OUTPUT, resource.get("output") or [])

        await self._db.atomically(save)

    async def get_response(self, response_id: str, owner: str | None) -> dict[str, Any] | None:
        rows = await self._db.query(
            "SELECT resource FROM responses WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (response_id, owner)
        )
        return json.loads(rows[0][0]) if rows else None

    async def delete_response(self, response_id: str, owner: str | None) -> bool:
        async def delete(db: Cursor) -> bool:
            await db.execute(
                "DELETE FROM responses WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (response_id, owner)
            )
            if db.rowcount == 0:
                return False
            await db.execute("DELETE FROM images WHERE response_id = ?", (response_id,))
            return True

        return await self._db.atomically(delete)

    async def list_input_items(
        self, response_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if await self.get_response(response_id, owner) is None:
            return None
        rows = await self._db.query(
            "SELECT position, item_id, item FROM response_items WHERE response_id = ? AND kind = ? ORDER BY position",
            (response_id, _INPUT),
        )
        return item_page(rows, limit, order, after)

    async def chain_items(self, response_id: str, owner: str | None) -> list[Item] | None:
        # One recursive query walks the whole chain, however long it is.
        rows = await self._db.query(
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

    async def fail_unfinished(self, message: str) -> int:
        return await self._fail_where("", (), message)

    async def renew_leases(self, replica: str, response_ids: list[str], expires_at: int) -> None:
        if not response_ids:
            return
        marks = ", ".join("?" for _ in response_ids)
        await self._db.write(
            f"UPDATE responses SET replica = ?, lease_expires = ? WHERE id IN ({marks})"
            " AND status IN ('queued', 'in_progress')",
            (replica, expires_at, *response_ids),
        )

    async def fail_expired(self, now: int, unleased_before: int, message: str) -> int:
        where = " AND (lease_expires < ? OR (lease_expires IS NULL AND created_at < ?))"
        return await self._fail_where(where, (now, unleased_before), message)

    async def _fail_where(self, condition: str, params: tuple[Any, ...], message: str) -> int:
        async def fail(db: Cursor) -> int:
            await db.execute(
                "SELECT id, resource FROM responses WHERE status IN ('queued', 'in_progress')" + condition, params
            )
            unfinished = await db.fetchall()
            for response_id, text in unfinished:
                resource = {**json.loads(text), "status": "failed"}
                resource["error"] = {"code": "server_error", "message": message}
                await db.execute(
                    "UPDATE responses SET status = 'failed', resource = ? WHERE id = ?",
                    (json.dumps(resource), response_id),
                )
            return len(unfinished)

        return await self._db.atomically(fail)

    # ---- stream events ---------------------------------------------------------------------------------
    async def append_events(self, response_id: str, events: list[tuple[int, str]]) -> None:
        async def append(db: Cursor) -> None:
            await db.executemany(
                "INSERT INTO response_events (response_id, sequence_number, event) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [(response_id, number, event) for number, event in events],
            )
            await self._db.notify_in(db, "events", response_id)  # delivered with the commit

        await self._db.atomically(append)

    async def notify(self, channel: Channel, response_id: str) -> None:
        async def send(db: Cursor) -> None:
            await self._db.notify_in(db, channel, response_id)

        await self._db.atomically(send)

    async def listen(self, callback: Callable[[Channel, str], None]) -> None:
        await self._db.listen(callback)

    async def events_after(self, response_id: str, sequence_number: int) -> list[tuple[int, str]]:
        rows = await self._db.query(
            "SELECT sequence_number, event FROM response_events"
            " WHERE response_id = ? AND sequence_number > ? ORDER BY sequence_number",
            (response_id, sequence_number),
        )
        return [(number, event) for number, event in rows]

    # ---- images --------------------------------------------------------------------------------------------
    async def save_image(self, image: StoredImage, owner: str | None) -> None:
        await self._db.write(
            "INSERT INTO images (id, response_id, owner, media_type, data) VALUES (?, ?, ?, ?, ?)",
            (image.id, image.response_id, owner, image.media_type, image.data),
        )

    async def get_image(self, image_id: str, owner: str | None) -> StoredImage | None:
        rows = await self._db.query(
            "SELECT id, response_id, media_type, data FROM images WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
            (image_id, owner),
        )
        if not rows:
            return None
        image_id, response_id, media_type, data = rows[0]
        return StoredImage(id=image_id, response_id=response_id, media_type=media_type, data=bytes(data))

    async def close(self) -> None:
        await self._db.close()


async def _replace_items(db: Cursor, response_id: str, kind: int, items: list[Item]) -> None:
    await db.execute("DELETE FROM response_items WHERE response_id = ? AND kind = ?", (response_id, kind))
    if items:
        await db.executemany(
            "INSERT INTO response_items (response_id, kind, position, item_id, item) VALUES (?, ?, ?, ?, ?)",
            [(response_id, kind, index, item.get("id", ""), json.dumps(item)) for index, item in enumerate(items)],
        )


def split_statements(script: str) -> Iterator[str]:
    """A migration script's statements (no `;` inside a statement in ours)."""
    return (statement for statement in script.split(";") if statement.strip())
