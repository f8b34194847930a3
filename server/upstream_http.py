"""The requests thinkbrake makes to the upstream per token and per probe: streamed generations (a choice's main
request and its continuation) and answer probes, over aiohttp.

Every token of every stream passes through here, so the reader's cost per chunk is thinkbrake's cost per token:
aiohttp parses HTTP in C and reads a chunk for a fraction of the CPU httpx spends, and sends a probe for a tenth
of it (``benchmarks/stream_reader.py``). The rarer requests (model list, tokenizer) stay on httpx, in
:mod:`server.upstream`.

Failures are raised as httpx's exception types (:func:`as_httpx`): ``ConnectError`` / ``ConnectTimeout`` when
nothing reached the upstream, ``ReadTimeout`` when it stayed silent for ``read_timeout`` seconds,
``RemoteProtocolError`` / ``ReadError`` for a broken stream, so the upstream module and its health keep one
vocabulary whichever library made the request.

Invariants: a connect that fails is retried twice (the first at once, then after half a second), since it sent
nothing; a response is closed (its connection dropped, which makes vLLM abort the request) unless it was read to
its end, when its connection goes back to the pool; redirects are not followed; environment proxies are honoured,
as httpx does: read once, when the session opens (aiohttp's ``trust_env`` would read them, and ``~/.netrc``, in a
worker thread on every request).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
import httpx
import orjson
from aiohttp.helpers import BasicAuth, get_env_proxy_for_url
from yarl import URL

#: the headers of a JSON body
JSON_HEADERS = {"Content-Type": "application/json"}
#: seconds an idle connection is kept for the next request (under the 5 s of uvicorn, which vLLM's server runs on)
KEEPALIVE_SECONDS = 4.0
#: waits before the second and third attempt of a connect that failed
CONNECT_RETRY_DELAYS = (0.0, 0.5)


def as_httpx(error: BaseException) -> httpx.HTTPError:
    """The httpx exception that says what ``error`` (from aiohttp) says."""
    text = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text)
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text)
    if isinstance(error, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(text)
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(text)
    if isinstance(error, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(text)
    return httpx.ReadError(f"{type(error).__name__}: {text}")


class UpstreamResponse:
    """One response: its status and headers at once, the body as it comes (:meth:`aiter_bytes`) or whole
    (:meth:`aread`, then :attr:`text` and :meth:`json`, as httpx's response has them)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = response.headers
        self._body = b""

    async def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes, at most one HTTP chunk at a time, as httpx gives them (vLLM sends each SSE event as a
        chunk of its own, so the controller sees one event per delta even when several wait in the buffer)."""
        try:
            async for data, _ in self._response.content.iter_chunks():
                yield data
        except (TimeoutError, aiohttp.ClientError) as error:
            raise as_httpx(error) from error

    async def aread(self) -> bytes:
        try:
            self._body = await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise as_httpx(error) from error
        return self._body

    @property
    def text(self) -> str:
        return self._body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self._body)

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end, else drop it (the upstream sees the
        disconnect and stops)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class UpstreamSession:
    """The aiohttp session of one upstream (streams and probes): made on first use (it belongs to the running
    event loop)."""

    def __init__(
        self, base_url: str, headers: dict[str, str], read_timeout: float, connect_timeout: float,
        max_connections: int, tls: ssl.SSLContext,
    ) -> None:  # fmt: skip
        self._base_url = base_url
        self._headers = headers
        # connect: the wait for a free connection as well (httpx's pool time-out); sock_read: any silence
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=read_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._proxy: tuple[URL | None, BasicAuth | None] = (None, None)

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # an idle connection is given up before uvicorn's (vLLM's server) 5 s keep-alive closes it from its side
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=self._tls, keepalive_timeout=KEEPALIVE_SECONDS
            )
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout)
            self._proxy = env_proxy(self._base_url)
        return self._session

    def url(self, path: str) -> str:
        return self._base_url.rstrip("/") + path

    async def post(self, path: str, body: dict[str, Any], headers: Mapping[str, str]) -> UpstreamResponse:
        """POST ``body`` as JSON; the response once its headers came (see the module docstring for failures)."""
        session = self._open_session()
        data, headers = json_bytes(body), {**headers, **JSON_HEADERS}  # (once: a connect may be retried)
        delays = iter(CONNECT_RETRY_DELAYS)
        while True:
            try:
                response = await session.post(
                    self.url(path), data=data, headers=headers, allow_redirects=False,
                    proxy=self._proxy[0], proxy_auth=self._proxy[1],
                )  # fmt: skip
                return UpstreamResponse(response)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                delay = next(delays, None)
                if delay is None:
                    raise as_httpx(error) from error
                await asyncio.sleep(delay)
            except (TimeoutError, aiohttp.ClientError) as error:
                raise as_httpx(error) from error

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def json_bytes(body: dict[str, Any]) -> bytes:
    """A request body as JSON, by orjson (a probe's prompt of 1,500 token ids in 4 us, where ``json`` takes 62); what
    orjson refuses (a key that is not a string, an integer past 64 bits) is written by ``json``. One difference: a
    float that is not finite, which JSON cannot hold, is written ``null`` (``json`` writes ``NaN``)."""
    try:
        return orjson.dumps(body)
    except TypeError:  # (orjson.JSONEncodeError is one)
        return json.dumps(body).encode()


def env_proxy(base_url: str) -> tuple[URL | None, BasicAuth | None]:
    """The proxy (and its credentials) the environment sets for ``base_url`` (``HTTP_PROXY`` / ``HTTPS_PROXY``,
    unless ``NO_PROXY`` names its host), or ``(None, None)``."""
    try:
        return get_env_proxy_for_url(URL(base_url))
    except LookupError:
        return None, None
