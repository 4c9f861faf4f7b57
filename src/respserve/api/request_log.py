"""One structured log line per request, its id echoed as `X-Request-ID`, and the request counter.

A plain ASGI middleware, so that a streamed response is timed to its last byte.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from respserve.api.metrics import Metrics

logger = logging.getLogger("respserve.requests")


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, json_logs: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.json_logs = json_logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            self._log(request_id, scope, route, status, time.perf_counter() - started)

    def _log(self, request_id: str, scope: Scope, route: str, status: int, seconds: float) -> None:
        fields: dict[str, Any] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
        }
        if self.json_logs:
            logger.info(json.dumps(fields))
        else:
            logger.info(" ".join(f"{key}={value}" for key, value in fields.items()))
