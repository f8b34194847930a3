"""Whether the upstream can be reached, and what thinkbrake says when it cannot.

:class:`UpstreamHealth` keeps the upstream's state and the reason in words, for ``GET /health`` and for the 503 a
client gets while the upstream was never reached. States: ``connecting`` (no attempt finished yet), ``ok``,
``unreachable`` (no connection: refused, unknown host, connect time-out) and ``failing`` (it answers, but not with
a model list).

Invariants: one WARNING is logged per change of state (a new reason within the same state logs nothing), never one
per attempt; the messages name the URL tried, and never the credentials in it (:func:`public_url`) nor the
upstream key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from server.backend import BackendError

log = logging.getLogger(__name__)

CONNECTING, OK, UNREACHABLE, FAILING = "connecting", "ok", "unreachable", "failing"
#: ``error.code`` of the 503 a client gets when the upstream cannot be reached
UNAVAILABLE_CODE = "upstream_unavailable"
#: seconds between attempts to reach the upstream: doubling from the first, then the last for good
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 5.0)

#: connection failures: nothing reached the upstream (as opposed to an upstream that answered badly)
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)


def backoff() -> Iterator[float]:
    """The waits between attempts: :data:`BACKOFF_SECONDS`, then its last value forever."""
    yield from BACKOFF_SECONDS
    while True:
        yield BACKOFF_SECONDS[-1]


def public_url(url: str) -> str:
    """``url`` without user, password, query or fragment: safe to show to clients and in logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def describe(error: BaseException, secret: str | None = None) -> str:
    """``Type: message`` of an HTTP failure, the upstream key cut out."""
    text = " ".join(str(error).split()) or "no detail"
    if secret:
        text = text.replace(secret, "***")
    return f"{type(error).__name__}: {text}"


class UpstreamHealth:
    """The upstream's state as thinkbrake last saw it (see the module docstring)."""

    def __init__(self, url: str, secret: str | None = None) -> None:
        self.url = public_url(url)
        self._secret = secret
        self.state = CONNECTING
        self.reason = f"connecting to the upstream {self.url}"

    @property
    def ok(self) -> bool:
        return self.state == OK

    def unreachable(self, error: BaseException, path: str) -> str:
        """Record a connection failure on ``path``; returns the message for clients."""
        reason = (
            f"the upstream {self.url} is unreachable ({describe(error, self._secret)} on {path}); thinkbrake keeps "
            "retrying and GET /health answers 200 once it is back"
        )
        self._set(UNREACHABLE, reason)
        return reason

    def failing(self, reason: str) -> None:
        """Record an upstream that answers, but not as expected (``reason`` says how)."""
        self._set(FAILING, f"the upstream {self.url} {reason}; thinkbrake keeps retrying")

    def reachable(self) -> None:
        """Record an answer from the upstream."""
        self._set(OK, f"the upstream {self.url} answers")

    def error(self) -> BackendError:
        """The 503 for a client while the upstream is not serving."""
        return BackendError(self.reason, 503, UNAVAILABLE_CODE)

    def _set(self, state: str, reason: str) -> None:
        before, self.state, self.reason = self.state, state, reason
        if state == before:
            return
        if state != OK:
            log.warning("%s", reason)
        elif before != CONNECTING:
            log.warning("the upstream %s is reachable again", self.url)
