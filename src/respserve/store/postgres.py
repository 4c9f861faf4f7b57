"""The shared backend: PostgreSQL through psycopg 3's asyncio connections and their pool, for replicas that
share state.

The schema is versioned in `respserve_schema`; each start applies the migrations it lacks, under an
advisory lock, so replicas starting together migrate once. The store's SQL (sql_store.py) is written with
`?` placeholders; this backend hands psycopg `%s` ones. Other replicas' notifications arrive on a
connection of their own, read by a task on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg_pool import AsyncConnectionPool

from respserve.store.base import Channel
from respserve.store.sql_store import Cursor, Row, SqlBackend, SqlResponseStore, Transaction, split_statements

# Each entry migrates the schema from version i to i + 1; append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT,
        previous_response_id TEXT,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        resource TEXT NOT NULL
    );
    CREATE INDEX responses_unfinished ON responses (status) WHERE status IN ('queued', 'in_progress');
    CREATE TABLE response_items (
        response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
        kind SMALLINT NOT NULL,  -- 0: input, 1: output
        position INTEGER NOT NULL,
        item_id TEXT NOT NULL,
        item TEXT NOT NULL,
        PRIMARY KEY (response_id, kind, position)
    );
    CREATE TABLE response_events (
        response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
        sequence_number INTEGER NOT NULL,
        event TEXT NOT NULL,
        PRIMARY KEY (response_id, sequence_number)
    );
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT,
        created_at BIGINT NOT NULL,
        metadata TEXT NOT NULL
    );
    CREATE TABLE conversation_items (
        position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        item_id TEXT NOT NULL,
        item TEXT NOT NULL
    );
    CREATE INDEX conversation_items_by_conversation ON conversation_items (conversation_id, position);
    CREATE UNIQUE INDEX conversation_items_by_id ON conversation_items (conversation_id, item_id);
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        response_id TEXT NOT NULL,  -- no foreign key: an unstored response's images are kept too
        owner TEXT,
        media_type TEXT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE INDEX images_by_response ON images (response_id);
    """,
    """
    ALTER TABLE responses ADD COLUMN replica TEXT;  -- the replica running it, while it runs
    ALTER TABLE responses ADD COLUMN lease_expires BIGINT;
    """,
    """
    CREATE TABLE files (
        position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- upload order, which lists follow
        id TEXT NOT NULL UNIQUE,
        owner TEXT,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        media_type TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        data BYTEA NOT NULL
    );
    CREATE INDEX files_by_owner ON files (owner, position);
    """,
]
_MIGRATION_LOCK = 0x7265737073  # any constant shared by every replica ("resps")
_CHANNELS: dict[Channel, str] = {"events": "respserve_events", "cancel": "respserve_cancel"}
T = TypeVar("T")


class _QmarkCursor:
    """A psycopg async cursor that takes the store's `?` placeholders."""

    def __init__(self, cursor: AsyncCursor[Row]) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._cursor.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        await self._cursor.executemany(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    async def fetchone(self) -> Row | None:
        return await self._cursor.fetchone()

    async def fetchall(self) -> list[Row]:
        return await self._cursor.fetchall()


class PostgresBackend(SqlBackend):
    shared = True  # the point of it: several replicas

    def __init__(self, url: str, max_connections: int = 8) -> None:
        self._url = url
        # Opened in `open`, on the event loop whose tasks will use it: an asyncio pool's workers belong there.
        self._pool: AsyncConnectionPool[AsyncConnection[Row]] = AsyncConnectionPool(
            url, min_size=1, max_size=max_connections, open=False
        )
        self._listener: AsyncConnection[Row] | None = None
        self._listening: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=30)  # a PostgreSQL still starting gets 30 s
        await self.atomically(self._migrate)

    async def _migrate(self, cursor: Cursor) -> None:
        await cursor.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        await cursor.execute("CREATE TABLE IF NOT EXISTS respserve_schema (version INTEGER NOT NULL)")
        await cursor.execute("SELECT max(version) FROM respserve_schema")
        row = await cursor.fetchone()
        version = row[0] if row and row[0] is not None else 0
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in split_statements(script):
                await cursor.execute(statement)
            await cursor.execute("INSERT INTO respserve_schema (version) VALUES (?)", (target,))

    async def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        await cursor.execute("SELECT pg_notify(?, ?)", (_CHANNELS[channel], response_id))

    async def listen(self, callback: Callable[[Channel, str], None]) -> None:
        """One connection of its own, in autocommit, LISTENing; a task delivers what it hears."""
        connection = await AsyncConnection.connect(self._url, autocommit=True)
        for name in _CHANNELS.values():
            await connection.execute(f"LISTEN {name}")
        self._listener = connection
        channels = {name: channel for channel, name in _CHANNELS.items()}

        async def deliver() -> None:
            try:
                async with contextlib.aclosing(connection.notifies()) as notes:
                    async for note in notes:
                        callback(channels[note.channel], note.payload)
            except psycopg.Error:
                pass  # the connection was lost or closed: the store is closing

        self._listening = asyncio.create_task(deliver(), name="respserve-listen")

    async def atomically(self, work: Transaction[T]) -> T:
        connection = await self._pool.getconn()
        # Once a connection is out, shielded from a cancelled anyio scope (a stream whose client left), which
        # would cancel the commit or rollback and the connection's return to the pool too: the transaction
        # ends, the connection goes back, and the cancellation lands at the caller's next await.
        with anyio.CancelScope(shield=True):
            try:
                async with connection.transaction(), connection.cursor() as cursor:
                    return await work(_QmarkCursor(cursor))
            finally:
                await self._pool.putconn(connection)

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
        if self._listener is not None:
            await self._listener.close()
        await self._pool.close()


def open_postgres_store(url: str) -> SqlResponseStore:
    return SqlResponseStore(PostgresBackend(url))
