"""Uploaded files in the SQL both backends speak: the `files` table, written once as sql_store.py is.

Kept apart from sql_store.py only for size; `SqlResponseStore` takes these methods in. A file's row holds
its bytes; listing reads every column but those. Rows are ordered by `position` (insertion order), which
`after` cursors follow. An expired file (`expires_at` passed) reads as absent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from respserve.store.base import FilePage, Order, StoredFile

if TYPE_CHECKING:
    from respserve.store.sql_store import SqlBackend

_RECORD = "id, filename, purpose, media_type, bytes, created_at, expires_at"
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


class SqlFiles:
    _db: SqlBackend

    async def save_file(self, file: StoredFile, data: bytes, owner: str | None) -> None:
        await self._db.write(
            f"INSERT INTO files ({_RECORD}, owner, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*_values(file), owner, data),
        )

    async def get_file(self, file_id: str, owner: str | None) -> StoredFile | None:
        rows = await self._db.query(
            f"SELECT {_RECORD} FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ? AND {_LIVE}",
            (file_id, owner, _now()),
        )
        return _record(rows[0]) if rows else None

    async def read_file(self, file_id: str, owner: str | None) -> tuple[StoredFile, bytes] | None:
        rows = await self._db.query(
            f"SELECT {_RECORD}, data FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ? AND {_LIVE}",
            (file_id, owner, _now()),
        )
        return (_record(rows[0][:-1]), bytes(rows[0][-1])) if rows else None

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, order: Order, after: str | None
    ) -> FilePage:
        sql = f"SELECT {_RECORD} FROM files WHERE owner IS NOT DISTINCT FROM ? AND {_LIVE}"
        params: list[Any] = [owner, _now()]
        if purpose is not None:
            sql += " AND purpose = ?"
            params.append(purpose)
        if after is not None:  # an unknown cursor matches nothing: an empty page
            sql += f" AND position {'>' if order == 'asc' else '<'}"
            sql += " (SELECT position FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?)"
            params += [after, owner]
        sql += f" ORDER BY position {'ASC' if order == 'asc' else 'DESC'} LIMIT ?"
        rows = await self._db.query(sql, (*params, limit + 1))
        return FilePage(files=[_record(row) for row in rows[:limit]], has_more=len(rows) > limit)

    async def delete_file(self, file_id: str, owner: str | None) -> bool:
        deleted = await self._db.write(
            "DELETE FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (file_id, owner)
        )
        return deleted > 0


def _values(file: StoredFile) -> tuple[Any, ...]:
    return (file.id, file.filename, file.purpose, file.media_type, file.bytes, file.created_at, file.expires_at)


def _record(row: tuple[Any, ...]) -> StoredFile:
    file_id, filename, purpose, media_type, size, created_at, expires_at = row
    return StoredFile(
        id=file_id,
        filename=filename,
        purpose=purpose,
        media_type=media_type,
        bytes=size,
        created_at=created_at,
        expires_at=expires_at,
    )


def _now() -> int:
    return int(time.time())
