"""Error bodies in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, and the errors the
request path raises before a backend is asked.

Invariant: ``type`` follows the HTTP status (``invalid_request_error`` for 4xx, else ``server_error``); ``code``
is always a string.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from server.backend import Backend, BackendError
from server.protocol import ErrorResponse

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


def not_serving(backend: Backend) -> BackendError | None:
    """Why ``backend`` cannot serve now, as a 503, or None. A backend that can tell (the upstream: never reached,
    unreachable, failing) says so through its ``unavailable()``; otherwise a backend is loading until ready."""
    unavailable = getattr(backend, "unavailable", None)
    if unavailable is not None:
        return unavailable()  # type: ignore[no-any-return]
    return None if backend.ready else BackendError("the model is still loading", 503)


def error_body(error: Exception) -> ErrorResponse:
    """The OpenAI error shape for an exception raised while serving a request."""
    if isinstance(error, BackendError):
        return ErrorResponse.of(error.status_code, error.message, error.param, error.code)
    log.exception("request failed", exc_info=error)
    return ErrorResponse.of(500, f"{type(error).__name__}: {error}")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error: ``type`` follows the status, ``code`` is a string (the status's default if None)."""
    return JSONResponse(ErrorResponse.of(status, message, param, code).model_dump(), status_code=status)
