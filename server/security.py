"""Access control and request limits, as plain ASGI middleware (no per-chunk cost on streamed responses).

- :class:`ApiKeyMiddleware`: with API keys configured, every request needs ``Authorization: Bearer <key>``;
  keys are compared in constant time (SHA-256 digests through :func:`hmac.compare_digest`, every key checked,
  so neither the position of a match nor the key's length shows in the timing). ``/health`` and ``/metrics``
  stay open unless protected (load balancers and Prometheus usually carry no key). A failure is a 401 in the
  OpenAI error shape.
- :class:`BodyLimitMiddleware`: a request body over ``max_body_bytes`` gets 413 in the OpenAI error shape,
  whether it announces its length (refused before reading) or streams it (counted while it arrives).

Neither logs request bodies or keys. The upstream's own key (``--upstream-api-key``) is not handled here: it
lives only in the upstream client's headers and is never read from, or sent to, clients.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: paths that ``--protect-health`` / ``--protect-metrics`` put behind the keys (open by default)
HEALTH_PATHS = frozenset({"/health"})
METRICS_PATHS = frozenset({"/metrics"})


def load_keys(keys: Iterable[str], key_file: str | None = None) -> list[str]:
    """Keys from flags/environment plus a file (one key per line; blank lines and ``#`` comments skipped)."""
    found = [key.strip() for key in keys if key.strip()]
    if key_file:
        for line in pathlib.Path(key_file).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


class KeyChecker:
    """Constant-time membership test of a presented key against the configured ones."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: bytes) -> bool:
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def error_json(message: str, code: str) -> bytes:
    """An OpenAI-shaped client error (``server.protocol.ErrorResponse``), built without pydantic."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


async def send_error(send: Send, status: int, body: bytes, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """Rejects requests without a valid bearer key, except on ``open_paths``."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.checker = KeyChecker(keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.checker or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.checker.accepts(token):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send 'Authorization: Bearer <key>'." if token is None else "Incorrect API key."
        body = error_json(message, "invalid_api_key")
        await send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``; the app never sees more than ``max_bytes`` of a body.

    A declared ``Content-Length`` over the limit is refused before reading (the HTTP server holds the body to
    its declared length). A body without one (chunked) is read here, at most ``max_bytes`` + one message,
    then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(send)
            else:
                await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        message = f"Request body too large: the limit is {self.max_bytes} bytes."
        await send_error(send, 413, error_json(message, "request_too_large"), [(b"connection", b"close")])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install(app: Any, settings: Any) -> None:
    """Add the middleware ``settings`` asks for (outermost first: body limit, then keys)."""
    keys = load_keys(settings.api_keys, settings.api_key_file)
    open_paths: set[str] = set()
    if not settings.protect_health:
        open_paths |= HEALTH_PATHS
    if not settings.protect_metrics:
        open_paths |= METRICS_PATHS
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys, open_paths=open_paths)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
