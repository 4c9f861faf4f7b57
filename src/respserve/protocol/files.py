"""The `/v1/files` objects: a file, a page of files, a deletion (OpenAI's `OpenAIFile`, `ListFilesResponse`,
`DeleteFileResponse`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# The purposes this server keeps files for: input to responses (any file) and images.
FilePurpose = Literal["user_data", "vision"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = Field(default=None, exclude_if=lambda value: value is None)  # absent: never
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"  # deprecated by OpenAI, still required


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
