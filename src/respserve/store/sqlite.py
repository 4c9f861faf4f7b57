"""The embedded store: one SQLite file in WAL mode, its schema versioned by `PRAGMA user_version`."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from respserve.store.base import Item, ItemPage, Order, ResponseStore, StoredConversation, StoredImage

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
]

_INPUT, _OUTPUT = 0, 1


class SqliteResponseStore(ResponseStore):
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
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in script.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target}")
                    self._db.execute("COMMIT")
                except Exception:
                    self._db.execute("ROLLBACK")
                    raise

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ---- responses --------------------------------------------------------------------------------------
    def save_response(self, resource: dict[str, Any], input_items: list[Item] | None, owner: str | None) -> None:
        response_id = resource["id"]
        with self._transaction() as db:
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
                self._replace_items(db, response_id, _INPUT, input_items)
            self._replace_items(db, response_id, _OUTPUT, resource.get("output") or [])

    @staticmethod
    def _replace_items(db: sqlite3.Connection, response_id: str, kind: int, items: list[Item]) -> None:
        db.execute("DELETE FROM response_items WHERE response_id = ? AND kind = ?", (response_id, kind))
        db.executemany(
            "INSERT INTO response_items (response_id, kind, position, item_id, item) VALUES (?, ?, ?, ?, ?)",
            [(response_id, kind, index, item.get("id", ""), json.dumps(item)) for index, item in enumerate(items)],
        )

    def get_response(self, response_id: str, owner: str | None) -> dict[str, Any] | None:
        rows = self._query("SELECT resource FROM responses WHERE id = ? AND owner IS ?", (response_id, owner))
        return json.loads(rows[0][0]) if rows else None

    def delete_response(self, response_id: str, owner: str | None) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)).rowcount
            if deleted:
                db.execute("DELETE FROM images WHERE response_id = ?", (response_id,))
            return deleted > 0

    def list_input_items(
        self, response_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if not self._query("SELECT 1 FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)):
            return None
        rows = self._query(
            "SELECT position, item_id, item FROM response_items WHERE response_id = ? AND kind = ? ORDER BY position",
            (response_id, _INPUT),
        )
        return _page([(position, item_id, item) for position, item_id, item in rows], limit, order, after)

    def chain_items(self, response_id: str, owner: str | None) -> list[Item] | None:
        # One recursive query walks the whole chain, however long it is.
        rows = self._query(
            """
            WITH RECURSIVE chain (id, previous, depth) AS (
                SELECT id, previous_response_id, 0 FROM responses WHERE id = ? AND owner IS ?
                UNION ALL
                SELECT r.id, r.previous_response_id, chain.depth + 1
                FROM responses r JOIN chain ON r.id = chain.previous
                WHERE r.owner IS ?
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
        with self._transaction() as db:
            return db.execute(
                "UPDATE responses SET status = 'failed', resource = json_set(resource, '$.status', 'failed',"
                " '$.error', json_object('code', 'server_error', 'message', ?))"
                " WHERE status IN ('queued', 'in_progress')",
                (message,),
            ).rowcount

    # ---- stream events ---------------------------------------------------------------------------------
    def append_events(self, response_id: str, events: list[tuple[int, str]]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO response_events (response_id, sequence_number, event) VALUES (?, ?, ?)",
                [(response_id, number, event) for number, event in events],
            )

    def events_after(self, response_id: str, sequence_number: int) -> list[tuple[int, str]]:
        return self._query(
            "SELECT sequence_number, event FROM response_events"
            " WHERE response_id = ? AND sequence_number > ? ORDER BY sequence_number",
            (response_id, sequence_number),
        )

    # ---- conversations ---------------------------------------------------------------------------------
    def create_conversation(self, conversation: StoredConversation, items: list[Item], owner: str | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, owner, created_at, metadata) VALUES (?, ?, ?, ?)",
                (conversation.id, owner, conversation.created_at, json.dumps(conversation.metadata)),
            )
            self._insert_conversation_items(db, conversation.id, items)

    @staticmethod
    def _insert_conversation_items(db: sqlite3.Connection, conversation_id: str, items: list[Item]) -> None:
        db.executemany(
            "INSERT INTO conversation_items (conversation_id, item_id, item) VALUES (?, ?, ?)",
            [(conversation_id, item["id"], json.dumps(item)) for item in items],
        )

    def get_conversation(self, conversation_id: str, owner: str | None) -> StoredConversation | None:
        rows = self._query(
            "SELECT id, created_at, metadata FROM conversations WHERE id = ? AND owner IS ?", (conversation_id, owner)
        )
        if not rows:
            return None
        return StoredConversation(id=rows[0][0], created_at=rows[0][1], metadata=json.loads(rows[0][2]))

    def update_conversation(
        self, conversation_id: str, metadata: dict[str, str], owner: str | None
    ) -> StoredConversation | None:
        with self._transaction() as db:
            db.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ? AND owner IS ?",
                (json.dumps(metadata), conversation_id, owner),
            )
        return self.get_conversation(conversation_id, owner)

    def delete_conversation(self, conversation_id: str, owner: str | None) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM conversations WHERE id = ? AND owner IS ?", (conversation_id, owner))
            return deleted.rowcount > 0

    def add_conversation_items(self, conversation_id: str, items: list[Item], owner: str | None) -> bool:
        with self._transaction() as db:
            found = db.execute(
                "SELECT 1 FROM conversations WHERE id = ? AND owner IS ?", (conversation_id, owner)
            ).fetchone()
            if not found:
                return False
            self._insert_conversation_items(db, conversation_id, items)
            return True

    def list_conversation_items(
        self, conversation_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None:
        if self.get_conversation(conversation_id, owner) is None:
            return None
        rows = self._query(
            "SELECT position, item_id, item FROM conversation_items WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        )
        return _page(rows, limit, order, after)

    def all_conversation_items(self, conversation_id: str, owner: str | None) -> list[Item] | None:
        page = self.list_conversation_items(conversation_id, owner, limit=-1, order="asc", after=None)
        return None if page is None else page.items

    def get_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> Item | None:
        rows = self._query(
            "SELECT i.item FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id"
            " WHERE i.conversation_id = ? AND i.item_id = ? AND c.owner IS ?",
            (conversation_id, item_id, owner),
        )
        return json.loads(rows[0][0]) if rows else None

    def delete_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> bool:
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM conversation_items WHERE conversation_id = ? AND item_id = ? AND conversation_id IN"
                " (SELECT id FROM conversations WHERE owner IS ?)",
                (conversation_id, item_id, owner),
            )
            return deleted.rowcount > 0

    def save_image(self, image: StoredImage, owner: str | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO images (id, response_id, owner, media_type, data) VALUES (?, ?, ?, ?, ?)",
                (image.id, image.response_id, owner, image.media_type, image.data),
            )

    def get_image(self, image_id: str, owner: str | None) -> StoredImage | None:
        rows = self._query(
            "SELECT id, response_id, media_type, data FROM images WHERE id = ? AND owner IS ?", (image_id, owner)
        )
        return StoredImage(*rows[0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """`with store._transaction() as db:` holds the lock and commits, or rolls back on error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _page(rows: list[tuple[Any, ...]], limit: int, order: Order, after: str | None) -> ItemPage:
    """Rows are (position, item_id, item JSON) in ascending position; `after` is an item id."""
    ordered = rows if order == "asc" else list(reversed(rows))
    if after is not None:
        ids = [row[1] for row in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    selected = ordered if limit < 0 else ordered[:limit]
    return ItemPage(items=[json.loads(row[2]) for row in selected], has_more=len(selected) < len(ordered))
