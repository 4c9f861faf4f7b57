"""The embedded backend: one SQLite file in WAL mode, its schema versioned by `PRAGMA user_version`."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from respserve.store.base import Channel
from respserve.store.sql_store import Cursor, SqlBackend, SqlResponseStore, split_statements

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
        # One connection shared by the threads that call in, serialised by a lock: SQLite writes are
        # serialised anyway, and this keeps transactions simple.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as cursor:
            version = cursor.execute("PRAGMA user_version").fetchone()[0]
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in split_statements(script):
                    cursor.execute(statement)
                cursor.execute(f"PRAGMA user_version = {target}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    # One process owns the file: there is no other replica to tell anything.
    def notify_in(self, cursor: Cursor, channel: Channel, response_id: str) -> None:
        return None

    def listen(self, callback: Callable[[Channel, str], None]) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_sqlite_store(path: Path) -> SqlResponseStore:
    return SqlResponseStore(SqliteBackend(path))
