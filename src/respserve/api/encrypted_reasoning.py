"""Reasoning that travels through a stateless client: `include: ["reasoning.encrypted_content"]` seals a
reasoning item's text into `encrypted_content`; sent back as input, the blob is opened again.

Fernet (AES-128-CBC with an HMAC-SHA256 tag, from `cryptography`) authenticates the blob, so a tampered
one, or one sealed by a server with another key, is refused. The key comes from `--secret-key` (any string,
hashed to a key), or is generated once into the data dir, so blobs survive restarts; replicas that share
blobs must share the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from respserve.api.errors import InvalidRequestError
from respserve.protocol.items import ReasoningInput
from respserve.protocol.request import CreateResponseRequest

INCLUDE = "reasoning.encrypted_content"
_KEY_FILE = "reasoning.key"


class InvalidReasoningBlob(ValueError):
    pass


class ReasoningSealer:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_settings(cls, secret: str | None, data_dir: Path) -> ReasoningSealer:
        if secret:
            return cls(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))
        path = data_dir / _KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(json.dumps({"text": text}).encode()).decode()

    def open(self, blob: str) -> str:
        try:
            return json.loads(self._fernet.decrypt(blob.encode()))["text"]
        except (InvalidToken, ValueError, KeyError, TypeError) as exc:
            raise InvalidReasoningBlob("not a reasoning blob this server sealed, or it was altered") from exc


def open_reasoning_items(body: CreateResponseRequest, sealer: ReasoningSealer) -> None:
    """Opens every sealed reasoning item of the request's input, restoring its text as `content`, so it is
    stored and chained like reasoning the server kept itself. A blob that does not open is a 400."""
    for index, item in enumerate(body.input if isinstance(body.input, list) else []):
        if not isinstance(item, ReasoningInput) or item.encrypted_content is None:
            continue
        try:
            text = sealer.open(item.encrypted_content)
        except InvalidReasoningBlob as exc:
            raise InvalidRequestError(
                f"The reasoning item's encrypted_content could not be opened: {exc}.",
                param=f"input[{index}].encrypted_content",
                code="invalid_encrypted_content",
            ) from exc
        item.content = [{"type": "reasoning_text", "text": text}]
