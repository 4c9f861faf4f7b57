"""API keys: who is calling, and so whose stored objects a request may see.

Without configured keys every caller is the same anonymous owner. With keys, `/v1` routes need
`Authorization: Bearer <key>`; stored responses, conversations and background jobs belong to the key
that made them (kept as a hash, never the key itself), and another key is told they do not exist.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from respserve.api.errors import APIError
from respserve.api.state import get_state


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(request: Request) -> str | None:
    keys = get_state(request).settings.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(key.strip(), known) for known in keys):
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
    return owner_of(key.strip())


Owner = Annotated[str | None, Depends(authenticate)]
