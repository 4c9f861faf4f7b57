"""`GET /metrics`: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from respserve.api.auth import authenticate
from respserve.api.state import StateDep

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: StateDep) -> Response:
    if state.settings.protect_metrics:
        authenticate(request)  # open by default, like /health: scrapers rarely carry keys
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
