"""``build_app``: the FastAPI application around one backend.

The backend starts in the lifespan context, in the background so ``GET /health`` can answer 503 while the
model loads, and is always shut down when the app stops. Every error leaves in the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` (``type`` ``invalid_request_error`` or ``server_error``,
``code`` a string); all handlers are registered in :func:`_add_error_handlers`. With ``--record`` each generation
request is drawn for recording as it comes in (:func:`server.recording.sampled`); the recorder's writer runs from
start to shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from controller.policies import PolicyError
from server.backend import Backend, BackendError
from server.disconnect import unless_disconnected
from server.errors import ModelNotFound, error_response, not_serving
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, now
from server.recording import Recorder, sampled
from server.routes import Service
from server.security import install as install_security
from server.settings import Settings

log = logging.getLogger(__name__)
#: seconds a client told 429/503 (loading, busy) should wait before trying again
RETRY_AFTER_S = 1


def build_app(
    settings: Settings,
    backend: Backend,
    metrics: Metrics | None = None,
    on_startup_failure: Callable[[BaseException], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The server app. ``on_startup_failure`` is called if the backend cannot start (the CLI exits then);
    ``on_ready`` once it has started (``/health`` answers 200 from then on)."""
    service = Service(settings, backend, metrics or Metrics(registry=None))
    recorder = Recorder(settings, backend, service.metrics) if settings.record else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await backend.start()
            except asyncio.CancelledError:
                raise
            except BaseException as error:  # noqa: BLE001 - reported, and the server stays unready
                if on_startup_failure is None:  # else the caller reports it (the CLI: one line on exit)
                    log.error("backend failed to start: %s", error)
                app.state.startup_error = error
                if on_startup_failure is not None:
                    on_startup_failure(error)
            else:
                service.warm_up()
                if on_ready is not None:
                    on_ready()

        app.state.startup_error = None
        if recorder is not None:
            recorder.start()
        task = asyncio.create_task(start())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if recorder is not None:
                await recorder.close()
            await backend.shutdown()
            service.close()

    app = FastAPI(title="thinkbrake", lifespan=lifespan)
    app.state.service = service
    app.state.recorder = recorder
    _add_error_handlers(app)
    install_security(app, settings)

    @app.post("/v1/chat/completions", dependencies=[Depends(json_content_type)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        with sampled(recorder):
            return await unless_disconnected(request, service.chat(body))

    @app.post("/v1/completions", dependencies=[Depends(json_content_type)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        with sampled(recorder):
            return await unless_disconnected(request, service.completions(body))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        if not backend.ready:  # no model to list yet: say why, as the generation endpoints do
            raise not_serving(backend) or BackendError("the model is still loading", 503)
        card = {"id": backend.model_name, "object": "model", "created": now(), "owned_by": "thinkbrake"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        error = app.state.startup_error
        if error is not None:
            return error_response(503, f"backend failed to start: {error}")
        problem = not_serving(backend)
        if problem is None:
            return Response(status_code=200)
        return error_response(problem.status_code, problem.message, code=problem.code)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return app


class UnsupportedMediaType(Exception):
    """A request body sent with a content type other than JSON."""


async def json_content_type(request: Request) -> None:
    """Only ``application/json`` bodies, as vLLM's OpenAI server takes them (any other content type, or none, is a
    400 before the body is read as a request; ``curl -d`` without a ``Content-Type`` header sends a form). A
    coroutine, so FastAPI runs it on the event loop rather than in a worker thread."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(given)


def _param(location: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) or None


def validation_error_response(errors: list[Any]) -> JSONResponse:
    """A 400 for the first validation error: ``param`` names the request field (dotted path), or is None when
    the body as a whole is wrong (not JSON, empty, not an object); the message then says so plainly."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":  # loc is ("body", character position): not a field
        reason = (first.get("ctx") or {}).get("error") or "JSON decode error"
        where = f" at character {location[1]}" if len(location) > 1 else ""
        return error_response(400, f"The request body is not valid JSON: {reason}{where}.", code="invalid_json")
    param = _param(location)
    if param is None:
        return error_response(400, f"The request body must be a JSON object ({first.get('msg')}).")
    got = f", got {first['input']!r}" if first.get("type") == "literal_error" and "input" in first else ""
    return error_response(400, f"{param}: {first.get('msg')}{got}", param=param)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error_response(list(error.errors()))

    @app.exception_handler(UnsupportedMediaType)
    async def unsupported_media_type(_: Request, error: UnsupportedMediaType) -> JSONResponse:
        given = f"'{error}'" if str(error) else "none"
        message = (
            f"Unsupported Media Type: Only 'application/json' is allowed (the request's Content-Type is {given}); "
            "send the JSON body with the header 'Content-Type: application/json'."
        )
        return error_response(400, message, code="unsupported_media_type")

    @app.exception_handler(PolicyError)
    async def policy_error(_: Request, error: PolicyError) -> JSONResponse:
        return error_response(400, str(error), param=error.field)

    @app.exception_handler(ModelNotFound)
    async def model_not_found(_: Request, error: ModelNotFound) -> JSONResponse:
        return error_response(404, str(error), param="model", code="model_not_found")

    @app.exception_handler(BackendError)
    async def backend_error(_: Request, error: BackendError) -> JSONResponse:
        response = error_response(error.status_code, error.message, error.param, error.code)
        if error.status_code in (429, 503):  # busy or still loading: the client may come back
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return error_response(500, f"{type(error).__name__}: {error}")
