"""The shared backend: PostgreSQL through psycopg 3 and its connection pool, for replicas that share state.

The schema is versioned in `respserve_schema`; each start applies the migrations it lacks, under an
advisory lock, so replicas starting together migrate once. The store's SQL (sql_store.py) is written with
`?` placeholders; this backend hands psycopg `%s` ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import Cursor
from psycopg_pool import ConnectionPool

from respserve.store.base import Channel
from respserve.store.sql_store import Row, SqlBackend, SqlResponseStore, split_statements

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


class _QmarkCursor:
    """A psycopg cursor that takes the store's `?` placeholders."""

    def __init__(self, cursor: Cursor[Row]) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _QmarkCursor:
        self._cursor.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
        return self

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> _QmarkCursor:
        self._cursor.executemany(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
        return self

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()


class PostgresBackend(SqlBackend):
    shared = True  # the point of it: several replicas

    def __init__(self, url: str, max_connections: int = 8) -> None:
        self._url = url
        self._listener: psycopg.Connection[Any] | None = None
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True)
        self._pool.wait(timeout=30)
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            cursor.execute("CREATE TABLE IF NOT EXISTS respserve_schema (version INTEGER NOT NULL)")
            row = cursor.execute("SELECT max(version) FROM respserve_schema").fetchone()
            version = row[0] if row and row[0] is not None else 0
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in split_statements(script):
                    cursor.execute(statement)
                cursor.execute("INSERT INTO respserve_schema (version) VALUES (?)", (target,))

    def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        cursor.execute("SELECT pg_notify(?, ?)", (_CHANNELS[channel], response_id))

    def listen(self, callback: Callable[[Channel, str], None]) -> None:
        """One connection of its own, in autocommit, LISTENing on a thread of its own."""
        connection = psycopg.connect(self._url, autocommit=True)
        for name in _CHANNELS.values():
            connection.execute(f"LISTEN {name}")
        self._listener = connection
        channels = {name: channel for channel, name in _CHANNELS.items()}

        def deliver() -> None:
            try:
                for note in connection.notifies():
                    callback(channels[note.channel], note.payload)
            except psycopg.Error:
                pass  # the connection was closed: the store is closing

        threading.Thread(target=deliver, name="respserve-listen", daemon=True).start()

    @contextmanager
    def transaction(self) -> Iterator[_QmarkCursor]:
        with self._pool.connection() as connection, connection.transaction(), connection.cursor() as cursor:
            yield _QmarkCursor(cursor)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._pool.close()


def open_postgres_store(url: str) -> SqlResponseStore:
    return SqlResponseStore(PostgresBackend(url))
