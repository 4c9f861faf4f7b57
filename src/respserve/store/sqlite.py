"""The embedded backend: one SQLite file in WAL mode, its schema versioned by `PRAGMA user_version`.

sqlite3 has no asyncio driver: the connection lives on one thread of the backend's own, and each
transaction runs there whole, in one trip (its coroutine never waits: the cursor it gets answers at once).
One thread is all SQLite needs (it serialises writes, and this process is the file's only user); being the
backend's own, store calls never queue for the executor the rest of the server shares.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from respserve.store.base import Channel
from respserve.store.sql_store import Cursor, Row, SqlBackend, SqlResponseStore, Transaction, split_statements

T = TypeVar("T")

# Each entry migrates the schema from version i to i + 1; append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT,
        previous_response_id TEXT,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        resource TEXT NOT NULL
    );
    CREATE TABLE response_items (
        response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
        kind INTEGER NOT NULL,  -- 0: input, 1: output
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
        created_at INTEGER NOT NULL,
        metadata TEXT NOT NULL
    );
    CREATE TABLE conversation_items (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        item_id TEXT NOT NULL,
        item TEXT NOT NULL
    );
    CREATE INDEX conversation_items_by_conversation ON conversation_items (conversation_id, position);
    CREATE UNIQUE INDEX conversation_items_by_id ON conversation_items (conversation_id, item_id);
    """,
    """
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        response_id TEXT NOT NULL,  -- no foreign key: an unstored response's images are kept too
        owner TEXT,
        media_type TEXT NOT NULL,
        data BLOB NOT NULL
    );
    CREATE INDEX images_by_response ON images (response_id);
    """,
    """
    ALTER TABLE responses ADD COLUMN replica TEXT;  -- the process running it, while it runs
    ALTER TABLE responses ADD COLUMN lease_expires INTEGER;
    """,
    """
    CREATE TABLE files (
        position INTEGER PRIMARY KEY AUTOINCREMENT,  -- upload order, which lists follow
        id TEXT NOT NULL UNIQUE,
        owner TEXT,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        media_type TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        data BLOB NOT NULL
    );
    CREATE INDEX files_by_owner ON files (owner, position);
    """,
]


class SqliteBackend(SqlBackend):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # One thread, so transactions run one after another in the order they were asked for.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="respserve-sqlite")

    async def open(self) -> None:
        await self._run(lambda: self._in_transaction(self._migrate))

    def _migrate(self, cursor: sqlite3.Cursor) -> None:
        version = cursor.execute("PRAGMA user_version").fetchone()[0]
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in split_statements(script):
                cursor.execute(statement)
            cursor.execute(f"PRAGMA user_version = {target}")

    async def atomically(self, work: Transaction[T]) -> T:
        return await self._run(lambda: self._in_transaction(lambda cursor: _run_to_end(work(_ImmediateCursor(cursor)))))

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._run(lambda: self._in_transaction(lambda cursor: cursor.execute(sql, params).fetchall()))

    async def _run(self, work: Callable[[], T]) -> T:
        """Runs `work` on the connection's thread. Shielded: a caller cancelled while it waits (a client
        gone) stops waiting, and what it asked for still runs, whole."""
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._thread, work))

    def _in_transaction(self, work: Callable[[sqlite3.Cursor], T]) -> T:
        """On the thread: `work` inside one transaction."""
        cursor = self._db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            result = work(cursor)
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")
        return result

    # One process owns the file: there is no other replica to tell anything.
    async def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        return None

    async def listen(self, callback: Callable[[Channel, str], None]) -> None:
        return None

    async def close(self) -> None:
        await self._run(self._db.close)
        self._thread.shutdown(wait=False)


class _ImmediateCursor:
    """A sqlite3 cursor behind the store's awaitable `Cursor`: each call does its work and returns without
    waiting, so a transaction's coroutine runs to its end in one `send` on the connection's thread."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(sql, params)

    async def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(sql, params)

    async def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()


def _run_to_end(transaction: Coroutine[Any, Any, T]) -> T:
    """Runs a transaction's coroutine that never waits (it awaits only `_ImmediateCursor`) to its result."""
    try:
        transaction.send(None)
    except StopIteration as finished:
        return finished.value
    transaction.close()
    raise RuntimeError("a SQLite transaction waited on something other than its cursor")


def open_sqlite_store(path: Path) -> SqlResponseStore:
    return SqlResponseStore(SqliteBackend(path))
