"""`/v1/files`: upload (multipart), retrieve, list, delete, and the bytes of a file (`/content`).

Files belong to the API key that uploaded them, as responses do. They are read when a response's
`input_file` (or, for images, `input_image`) names them; see file_inputs.py.
"""

from __future__ import annotations

import time
from typing import Annotated, get_args
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from respserve.api.auth import Owner
from respserve.api.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from respserve.api.file_contents import media_type
from respserve.api.pagination import FileLimit, Order
from respserve.api.state import StateDep
from respserve.protocol.files import FileDeleted, FileList, FileObject, FilePurpose
from respserve.protocol.ids import new_file_id
from respserve.store.base import StoredFile

router = APIRouter()

_PURPOSES: tuple[str, ...] = get_args(FilePurpose)
# OpenAI's bounds on `expires_after[seconds]`: an hour to thirty days.
_EXPIRY_SECONDS = (3600, 30 * 24 * 3600)


def _wire(file: StoredFile) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=file.created_at,
        expires_at=file.expires_at,
        filename=file.filename,
        purpose=file.purpose,  # type: ignore[arg-type]  # only FilePurpose values are stored
    )


def _not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"File with id '{file_id}' not found.", param="file_id")


@router.post("/v1/files")
async def upload_file(
    state: StateDep,
    owner: Owner,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
    expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> FileObject:
    if purpose not in _PURPOSES:
        raise InvalidRequestError(
            f"Invalid purpose '{purpose}': this server keeps files for {' and '.join(_PURPOSES)}.", param="purpose"
        )
    created_at = int(time.time())
    expires_at = _expires_at(created_at, expires_anchor, expires_seconds)
    cap = state.settings.max_file_bytes
    data = await file.read(cap + 1)
    if len(data) > cap:
        raise RequestTooLargeError(f"The file is larger than {cap} bytes.", param="file", code="file_too_large")
    if not data:
        raise InvalidRequestError("The file is empty.", param="file")
    filename = file.filename or "file"
    kind = media_type(data, filename)
    if purpose == "vision" and not kind.startswith("image/"):
        raise InvalidRequestError(f"A 'vision' file must be an image; this one is {kind}.", param="file")
    stored = StoredFile(new_file_id(), filename, purpose, kind, len(data), created_at, expires_at)
    await state.store.save_file(stored, data, owner)
    return _wire(stored)


def _expires_at(created_at: int, anchor: str | None, seconds: int | None) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError("'expires_after[anchor]' must be 'created_at'.", param="expires_after.anchor")
    low, high = _EXPIRY_SECONDS
    if seconds is None or not low <= seconds <= high:
        raise InvalidRequestError(
            f"'expires_after[seconds]' must be between {low} and {high}.", param="expires_after.seconds"
        )
    return created_at + seconds


@router.get("/v1/files")
async def list_files(
    state: StateDep,
    owner: Owner,
    purpose: Annotated[str | None, Query()] = None,
    limit: FileLimit = 10_000,
    order: Order = "desc",
    after: str | None = None,
) -> FileList:
    page = await state.store.list_files(owner, purpose, limit, order, after)
    files = [_wire(file) for file in page.files]
    return FileList(
        data=files,
        first_id=files[0].id if files else None,
        last_id=files[-1].id if files else None,
        has_more=page.has_more,
    )


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, state: StateDep, owner: Owner) -> FileObject:
    file = await state.store.get_file(file_id, owner)
    if file is None:
        raise _not_found(file_id)
    return _wire(file)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, state: StateDep, owner: Owner) -> FileDeleted:
    if not await state.store.delete_file(file_id, owner):
        raise _not_found(file_id)
    return FileDeleted(id=file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, state: StateDep, owner: Owner) -> Response:
    stored = await state.store.read_file(file_id, owner)
    if stored is None:
        raise _not_found(file_id)
    file, data = stored
    disposition = f"attachment; filename*=UTF-8''{quote(file.filename)}"
    return Response(data, media_type=file.media_type, headers={"Content-Disposition": disposition})
