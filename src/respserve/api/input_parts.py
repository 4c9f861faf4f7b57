"""Rewriting some of an input item's content parts: those in a message's `content` or a tool output's
`output`, each named by its own param (`input[2].content[1]`), the rest left as they are."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from respserve.protocol.items import InputItem

PartT = TypeVar("PartT")


async def replace_parts(
    item: InputItem, kind: type[PartT], read: Callable[[PartT, str], Awaitable[Any]], param: str
) -> InputItem:
    """`item` with each part of type `kind` replaced by `await read(part, its param)`; `item` itself when it
    holds none."""
    update: dict[str, Any] = {}
    for field in ("content", "output"):
        parts = getattr(item, field, None)
        if isinstance(parts, list) and any(isinstance(part, kind) for part in parts):
            update[field] = [
                await read(part, f"{param}.{field}[{index}]") if isinstance(part, kind) else part
                for index, part in enumerate(parts)
            ]
    return item.model_copy(update=update) if update else item
