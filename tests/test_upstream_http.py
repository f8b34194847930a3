"""Upstream HTTP helpers: the session's environment proxy (read once when the session opens, used for every request),
the JSON of a request body and the parse of one SSE event."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from server.upstream import load_event
from server.upstream_http import UpstreamSession, env_proxy, json_bytes

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def clear_proxy_environment(monkeypatch) -> None:
    """No proxy variable set, in either case, whatever the machine running the tests has."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def start_proxy(seen: list[bytes], requests: list[tuple[bytes, bytes]] | None = None) -> asyncio.Server:
    """A forward proxy that answers every request itself: it records the request line (and in ``requests`` the head
    and the body) and sends ``{"ok": 1}``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            0,
        )
        body = await reader.readexactly(length)
        seen.append(head.split(b"\r\n", 1)[0])
        if requests is not None:
            requests.append((head, body))
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


async def test_a_body_reaches_the_upstream_as_the_json_of_its_value(monkeypatch) -> None:
    seen: list[bytes] = []
    requests: list[tuple[bytes, bytes]] = []
    server = await start_proxy(seen, requests)
    port = server.sockets[0].getsockname()[1]
    clear_proxy_environment(monkeypatch)
    session = UpstreamSession(f"http://127.0.0.1:{port}", {}, 10.0, 5.0, 4, ssl.create_default_context())
    bodies = [
        {"prompt": list(range(151_000, 152_500)), "max_tokens": 20, "temperature": 0, "text": "café \u2028 😀"},
        {"vllm_xargs": {"seed": 2**70}},  # past 64 bits: orjson refuses it, json writes it
    ]
    try:
        for body in bodies:
            response = await session.post("/v1/completions", body, {"X-Session": "s1"})
            await response.aread()
            await response.aclose()
    finally:
        await session.aclose()
        server.close()
    for (head, sent), body in zip(requests, bodies, strict=True):
        assert json.loads(sent) == body
        lines = head.lower().split(b"\r\n")
        assert b"content-type: application/json" in lines and b"x-session: s1" in lines
    assert json_bytes({1: "x"}) == b'{"1": "x"}'  # a key that is not a string: written by json, as aiohttp did


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
    event = b'{"id":"c","choices":[{"index":0,"delta":{"reasoning":" caf\xc3\xa9 \\u2028"},"token_ids":[279]}]}'
    assert load_event(event) == json.loads(event)
    for odd in (b'{"logprob": NaN}', b'{"x": -Infinity}'):
        assert repr(load_event(odd)) == repr(json.loads(odd))  # orjson refuses these; json reads them
    for bad in (b"not json", b'{"a": 1', b""):
        with pytest.raises(ValueError):
            load_event(bad)
