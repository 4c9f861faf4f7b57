"""Query parameters shared by the routes that list items."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query

Limit = Annotated[int, Query(ge=1, le=100)]
FileLimit = Annotated[int, Query(ge=1, le=10_000)]  # OpenAI lists up to 10,000 files a page
Order = Annotated[Literal["asc", "desc"], Query()]
# Accepted for compatibility: stored items already carry all their content.
Include = Annotated[list[str] | None, Query()]
