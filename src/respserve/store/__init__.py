"""State that outlives a request: stored responses, their items and events, conversations, images, files.

Everything outside this package talks to `ResponseStore`, obtained from `open_store`. The logic is written
once (sql_store.py; sql_conversations.py and sql_files.py for conversations and files) over two backends:
SQLite, embedded (the default), and PostgreSQL, which several replicas share.
"""

from __future__ import annotations

from pathlib import Path

from respserve.store.base import ResponseStore


def open_store(data_dir: Path, url: str | None = None) -> ResponseStore:
    """PostgreSQL when `url` is a `postgresql://` URL, else one SQLite file in the data directory."""
    if url and url.startswith(("postgresql://", "postgres://")):
        from respserve.store.postgres import open_postgres_store

        return open_postgres_store(url)
    from respserve.store.sqlite import open_sqlite_store

    return open_sqlite_store(data_dir / "respserve.db")
