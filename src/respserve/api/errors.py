"""Typed API errors and the handlers that render every error in the OpenAI envelope."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from respserve.protocol.errors import ErrorDetail, ErrorEnvelope

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.error_type, param=self.param, code=self.code)


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"


class RequestTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"


class GatewayTimeoutError(APIError):
    status_code = 504
    error_type = "timeout_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"


def error_response(status_code: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorEnvelope(error=detail).model_dump(), status_code=status_code, headers=headers)


def param_from_location(location: Sequence[int | str], body: Any, missing: bool = False) -> str | None:
    """('body', 'input', 'list[...]', 3, 'message:input', 'content') -> 'input[3].content'.

    Pydantic puts the names of union members into error locations; walking the request body along the
    location tells those apart from real keys. A missing field is the one key not in the body.
    """
    parts = list(location[1:] if location and location[0] == "body" else location)
    param, node = "", body
    for position, part in enumerate(parts):
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            param, node = f"{param}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            param, node = f"{param}.{part}" if param else part, node[part]
        elif missing and position == len(parts) - 1 and isinstance(part, str):
            param = f"{param}.{part}" if param else part
    return param or None


def _validation_detail(errors: Sequence[dict[str, Any]], body: Any) -> ErrorDetail:
    def param_of(error: dict[str, Any]) -> str | None:
        return param_from_location(error.get("loc", ()), body, missing=error.get("type") == "missing")

    # A union that matched no member reports one error per member: the deepest is the useful one.
    error = max(errors, key=lambda item: len(param_of(item) or ""))
    param = param_of(error)
    if error.get("type") == "json_invalid":
        return ErrorDetail(
            message=f"We could not parse the JSON body of your request: {error.get('msg')}",
            type="invalid_request_error",
            param=None,
            code="invalid_json",
        )
    if error.get("type") == "missing" and param:
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {error.get('msg')}" if param else str(error.get("msg"))
        code = "invalid_value"
    return ErrorDetail(message=message, type="invalid_request_error", param=param, code=code)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.detail(), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_detail(exc.errors(), exc.body))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = _STATUS_TYPES.get(exc.status_code, "server_error")
        detail = ErrorDetail(message=str(exc.detail), type=error_type, param=None, code=None)
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        detail = ErrorDetail(message="The server had an error while processing your request.", type="server_error")
        return error_response(500, detail)
