"""What the serving stack costs per token before thinkbrake does anything: its layers, one at a time, in one run.

Each variant is a bare streaming proxy (its own process) between the same clients and the same fake upstream as
``benchmarks/proxy_overhead.py``: it forwards ``POST /v1/chat/completions`` upstream and, for every piece of the
upstream's body, parses its SSE events with orjson and writes them back re-framed as OpenAI chunks. No controller,
no probes, no metrics. The variants add the libraries thinkbrake is built on, one layer at a time:

- ``callbacks``: raw asyncio protocols on both sides (uvloop, httptools, orjson): each upstream read is parsed and
  written to the client in the read's own callback. No task runs per token. What a hand-written Python proxy costs.
- ``asgi-raw``: uvicorn (httptools, uvloop) with a bare ASGI app; the app's task reads the upstream through a raw
  protocol and ``await send(...)`` per read.
- ``asgi-aiohttp``: the same, reading the upstream with aiohttp (as ``server/upstream_http.py`` does).
- ``starlette-aiohttp``: a Starlette ``StreamingResponse`` over an async generator reading aiohttp: the skeleton
  thinkbrake's streaming endpoints stand on.

Then thinkbrake itself (``thinkbrake serve --upstream``) with ``policy=off`` and with its default policy (probes
answered from the recorded probe traces, as ``proxy_overhead.py --probe-traces`` does). The table gives each
one's CPU per forwarded token: the gap between a line and the one above it is what that layer costs.

    python benchmarks/stack_floor.py                                  # paced 50 tokens/s, C = 256
    python benchmarks/stack_floor.py --token-rate 0 --concurrency 64  # unpaced: capacity
    python benchmarks/stack_floor.py --token-rate 0 --concurrency 64 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httptools  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from server.fan_in import Mailbox  # noqa: E402

VARIANTS = ("callbacks", "asgi-raw", "asgi-aiohttp", "starlette-aiohttp")
THINKBRAKE = ("off", "default")
CHAT_PATH = "/v1/chat/completions"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


def reframe(events: list[bytes]) -> bytes:
    """The client's SSE bytes for upstream events: each one parsed and rewritten as a chat chunk (text fields only,
    ``token_ids`` dropped), as any re-framing proxy must."""
    out = []
    for event in events:
        if not event.startswith(b"data: {"):
            if event.startswith(b"data:"):
                out.append(event + b"\n\n")
            continue
        choice = (orjson.loads(event[6:]).get("choices") or [{}])[0]
        delta = {key: value for key, value in (choice.get("delta") or {}).items() if key != "token_ids"}
        chunk = {
            "id": "chatcmpl-floor", "object": "chat.completion.chunk", "created": 0, "model": "floor",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": choice.get("finish_reason")}],
        }  # fmt: skip
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return b"".join(out)


def upstream_request(body: bytes) -> bytes:
    return (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def upstream_body(body: bytes) -> bytes:
    request = orjson.loads(body)
    request.pop("thinkbrake", None)
    return orjson.dumps(request)


class UpstreamReader(asyncio.Protocol):
    """One upstream response, read in callbacks: ``on_events`` gets the complete SSE events of each body piece,
    ``on_end`` is called once at the end of the response."""

    def __init__(self, on_events: Callable[[list[bytes]], None], on_end: Callable[[], None]) -> None:
        self.on_events, self._on_end = on_events, on_end
        self.ended = False
        self.parser = httptools.HttpResponseParser(self)
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        *events, self.pending = (self.pending + body).split(b"\n\n")
        if events:
            self.on_events(events)

    def on_end(self) -> None:
        if not self.ended:
            self.ended = True
            self._on_end()

    def on_message_complete(self) -> None:
        self.on_end()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_end()


async def open_upstream(
    host: str, port: int, body: bytes, on_events: Callable[[list[bytes]], None], on_end: Callable[[], None]
) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(lambda: UpstreamReader(on_events, on_end), host, port)
    transport.write(upstream_request(body))


class CallbackProxy(asyncio.Protocol):
    """``callbacks``: a client connection; each upstream read is re-framed and written in its own callback."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.parser.get_method() != b"POST":
            self.transport.write(OK_HEAD)
            return
        self.transport.write(SSE_HEAD)
        asyncio.get_running_loop().create_task(
            open_upstream(self.host, self.port, upstream_body(b"".join(self.body)), self.forward, self.finish)
        )

    def forward(self, events: list[bytes]) -> None:
        payload = reframe(events)
        if payload and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"0\r\n\r\n")


async def raw_reads(host: str, port: int, body: bytes) -> AsyncIterator[bytes]:
    reads = Mailbox()  # thinkbrake's own hand-off between a loop callback and a task
    await open_upstream(host, port, body, reads.put, lambda: reads.put(None))
    while True:
        for events in await reads.take_all():
            if events is None:
                return
            yield reframe(events)


_session: Any = None


async def aiohttp_reads(url: str, body: bytes) -> AsyncIterator[bytes]:
    import aiohttp

    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    headers = {"Content-Type": "application/json"}
    async with _session.post(url + CHAT_PATH, data=body, headers=headers) as response:
        pending = b""
        async for data, _ in response.content.iter_chunks():
            *events, pending = (pending + data).split(b"\n\n")
            if events:
                yield reframe(events)


def asgi_app(variant: str, upstream: str) -> Callable[..., Any]:
    """``asgi-raw`` and ``asgi-aiohttp``: a bare ASGI app."""
    host, port = upstream.removeprefix("http://").split(":")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = upstream_body(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        reads = raw_reads(host, int(port), body) if variant == "asgi-raw" else aiohttp_reads(upstream, body)
        async for payload in reads:
            await send({"type": "http.response.body", "body": payload, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def starlette_app(upstream: str) -> Any:
    """``starlette-aiohttp``: a Starlette route returning a ``StreamingResponse``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> StreamingResponse:
        body = upstream_body(await request.body())
        return StreamingResponse(aiohttp_reads(upstream, body), media_type="text/event-stream")

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route(CHAT_PATH, chat, methods=["POST"]), Route("/health", health)])


def app() -> Any:
    """The ASGI app of the variant named by the environment (uvicorn's factory, so worker processes build it)."""
    variant, upstream = os.environ["STACK_FLOOR_VARIANT"], os.environ["STACK_FLOOR_UPSTREAM"]
    return starlette_app(upstream) if variant == "starlette-aiohttp" else asgi_app(variant, upstream)


def serve(variant: str, upstream: str, port: int, workers: int) -> None:
    import uvloop

    if variant == "callbacks":  # one process: the raw variant has no worker model
        host, upstream_port = upstream.removeprefix("http://").split(":")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: CallbackProxy(host, int(upstream_port)), "127.0.0.1", port, backlog=4096
            )
            await server.serve_forever()

        uvloop.run(main())
        return
    import uvicorn

    os.environ["STACK_FLOOR_VARIANT"], os.environ["STACK_FLOOR_UPSTREAM"] = variant, upstream
    uvicorn.run(
        "stack_floor:app", factory=True, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        log_level="warning", backlog=4096, workers=workers if workers > 1 else None, app_dir=str(ROOT / "benchmarks"),
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=256, help="concurrent streaming clients (default 256)")
    parser.add_argument("--token-rate", type=float, default=50.0, help="upstream tokens/s per stream; 0 = unpaced")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per phase (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase (default 3)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request (default 256)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes of the uvicorn variants and thinkbrake"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS + THINKBRAKE), help="phases to run, in order (default: all)"
    )
    parser.add_argument("--logs", default="/tmp/thinkbrake-bench", help="folder for the servers' logs")
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant's server
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.upstream, args.port, args.workers)
        return 0
    import proxy_overhead as bench

    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    options = bench.parse_args(
        ["--token-rate", str(args.token_rate), "--duration", str(args.duration), "--warmup", str(args.warmup)]
    )
    upstream_port = bench.free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    upstream_command = [
        sys.executable, "-m", "tests.support.fake_upstream", "--port", str(upstream_port), "--no-record",
        "--token-rate", str(args.token_rate), "--traces", str(bench.DEFAULT_PROBE_TRACES), "--limit", "64", "--spread",
    ]  # fmt: skip
    phases = [name for name in args.variants.split(",") if name]
    unknown = set(phases) - set(VARIANTS + THINKBRAKE)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))} (known: {', '.join(VARIANTS + THINKBRAKE)})")
    rate = f"{args.token_rate:g} tokens/s per stream" if args.token_rate else "unpaced"
    bench.progress(f"upstream {rate}; C = {args.concurrency}; phases: direct, {', '.join(phases)}")
    rows = []
    with ExitStack() as stack:
        fake = stack.enter_context(
            bench.process(upstream_command, f"{upstream}/health", "fake upstream", logs / "up.log")
        )
        direct_body = bench.request_body("off", "fake-reasoner", args.max_tokens)
        rows.append(
            bench.measure("direct", ("127.0.0.1", upstream_port), args.concurrency, direct_body, options,
                          psutil.Process(fake.pid), None)
        )  # fmt: skip
        chars_per_token = rows[0].chars_per_token
        thinkbrake: tuple[int, psutil.Process] | None = None  # started once, for its phases
        for phase in phases:
            bench.progress(f"{phase} ...")
            body = bench.request_body("default" if phase == "default" else "off", "fake-reasoner", args.max_tokens)
            if phase in VARIANTS:
                port = bench.free_port()
                command = [
                    sys.executable, __file__, "--serve", phase, "--upstream", upstream, "--port", str(port),
                    "--workers", str(args.workers),
                ]  # fmt: skip
                with bench.process(command, f"http://127.0.0.1:{port}/health", phase, logs / f"{phase}.log") as server:
                    watched = psutil.Process(server.pid)
                    row = bench.measure(
                        phase, ("127.0.0.1", port), args.concurrency, body, options, watched, chars_per_token
                    )
            else:
                if thinkbrake is None:
                    port = bench.free_port()
                    command = [
                        sys.executable, "-m", "server.cli", "serve", "--upstream", upstream, "--port", str(port),
                        "--log-level", "warning", "--workers", str(args.workers),
                    ]  # fmt: skip
                    ready = f"http://127.0.0.1:{port}/health"
                    server = stack.enter_context(bench.process(command, ready, "thinkbrake", logs / "tb.log"))
                    thinkbrake = port, psutil.Process(server.pid)
                port, watched = thinkbrake
                row = bench.measure(
                    phase, ("127.0.0.1", port), args.concurrency, body, options, watched, chars_per_token
                )
            rows.append(row)
            bench.progress(f"{phase}: {row.cpu_ms_per_1k_tokens or 0:.1f} us per token, ratio "
                           f"{row.tokens_per_second / rows[0].tokens_per_second:.3f}")  # fmt: skip
    print(bench.table(args.concurrency, rows, cpu_label="CPU % (direct: the upstream's)"))
    print(
        f"\n{psutil.cpu_count()} logical CPUs; upstream {rate}; {args.workers} worker(s) for the uvicorn variants and "
        f"thinkbrake (callbacks: one process); max_tokens {args.max_tokens}; {args.duration:g} s measured per phase."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
