"""Upstream HTTP helpers: the session's environment proxy (read once when the session opens, used for every request)
and the parse of one SSE event."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from server.upstream import load_event
from server.upstream_http import UpstreamSession, env_proxy

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def clear_proxy_environment(monkeypatch) -> None:
    """No proxy variable set, in either case, whatever the machine running the tests has."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def start_proxy(seen: list[bytes]) -> asyncio.Server:
    """A forward proxy that answers every request itself: it records the request line and sends ``{"ok": 1}``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,
        )
        await reader.readexactly(length)
        seen.append(head.split(b"\r\n", 1)[0])
        body = b'{"ok": 1}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_requests_go_through_the_environment_proxy_read_when_the_session_opens(monkeypatch) -> None:
    seen: list[bytes] = []
    proxy = await start_proxy(seen)
    port = proxy.sockets[0].getsockname()[1]
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    session = UpstreamSession("http://upstream.invalid:8000", {}, 10.0, 5.0, 4, ssl.create_default_context())
    try:
        for _ in range(2):
            response = await session.post("/v1/completions", {"prompt": "x"}, {})
            await response.aread()
            assert response.json() == {"ok": 1}
            await response.aclose()
        monkeypatch.delenv("HTTP_PROXY")  # read once: the open session keeps its proxy
        response = await session.post("/v1/completions", {"prompt": "x"}, {})
        await response.aread()
        await response.aclose()
    finally:
        await session.aclose()
        proxy.close()
    assert seen == [b"POST http://upstream.invalid:8000/v1/completions HTTP/1.1"] * 3


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, None),
        ({"HTTP_PROXY": "http://proxy.local:3128"}, "http://proxy.local:3128"),
        ({"HTTP_PROXY": "http://proxy.local:3128", "NO_PROXY": "upstream.local"}, None),
        ({"HTTPS_PROXY": "http://proxy.local:3128"}, None),  # the upstream here is http://
    ],
)
def test_env_proxy_follows_the_environment(monkeypatch, environment: dict[str, str], expected: str | None) -> None:
    clear_proxy_environment(monkeypatch)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    proxy, _ = env_proxy("http://upstream.local:8000")
    assert (str(proxy) if proxy is not None else None) == expected


def test_an_sse_event_parses_as_json_would_parse_it() -> None:
    import json

    event = b'{"id":"c","choices":[{"index":0,"delta":{"reasoning":" caf\xc3\xa9 \\u2028"},"token_ids":[279]}]}'
    assert load_event(event) == json.loads(event)
    for odd in (b'{"logprob": NaN}', b'{"x": -Infinity}'):
        assert repr(load_event(odd)) == repr(json.loads(odd))  # orjson refuses these; json reads them
    for bad in (b"not json", b'{"a": 1', b""):
        with pytest.raises(ValueError):
            load_event(bad)
