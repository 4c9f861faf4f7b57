"""`GET /health`: 200 only while every model is loaded and its worker is alive."""

from __future__ import annotations

from fastapi import APIRouter

from respserve.api.errors import ServiceUnavailableError
from respserve.api.state import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    if not state.models or not all(served.worker.alive for served in state.models.values()):
        raise ServiceUnavailableError("The model worker is not running.", code="worker_unavailable")
    return {"status": "ok"}
