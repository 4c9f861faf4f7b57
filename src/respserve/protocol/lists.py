"""Paginated lists of items (`object: "list"`), as input items and conversation items are returned."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, items: list[dict[str, Any]], has_more: bool) -> ItemList:
        return cls(
            data=items,
            first_id=items[0].get("id") if items else None,
            last_id=items[-1].get("id") if items else None,
            has_more=has_more,
        )
