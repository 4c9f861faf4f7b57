"""Prefixed object ids, as the OpenAI API shapes them (`resp_`, `msg_`, ...)."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def new_file_id() -> str:
    """OpenAI's file ids take a hyphen (`file-abc123`), unlike its other ids."""
    return f"file-{uuid.uuid4().hex}"
