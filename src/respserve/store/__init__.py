"""State that outlives a request: stored responses, their items and events, conversations.

Everything outside this package talks to `ResponseStore`, obtained from `open_store`; only `sqlite.py`
knows the backend.
"""

from __future__ import annotations

from pathlib import Path

from respserve.store.base import ResponseStore


def open_store(data_dir: Path) -> ResponseStore:
    """The embedded default: one SQLite file in the data directory."""
    from respserve.store.sqlite import SqliteResponseStore

    return SqliteResponseStore(data_dir / "respserve.db")
