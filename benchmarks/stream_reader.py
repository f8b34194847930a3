"""thinkbrake's upstream HTTP per token and per probe: httpx against aiohttp (what ``server/upstream_http.py``
uses), in one run, alternating ``--rounds`` times.

A fake OpenAI-compatible upstream (``tests/support/fake_upstream.py``, its own process) streams the written traces
to C concurrent readers, one SSE event per HTTP chunk, paced at R tokens/s per stream; this process reads them
(httpx ``aiter_bytes``, aiohttp ``iter_chunks``) and prints its own CPU time per read. Then 16 concurrent callers
send 30 answer probes each (a non-streamed ``/v1/completions`` with a 1,500-token prompt, as thinkbrake sends
them) and it prints the CPU per probe. Only the HTTP is measured: no parsing, no controller, no client.

    python benchmarks/stream_reader.py                    # C = 64, 200 tokens/s, 2 rounds
    python benchmarks/stream_reader.py --concurrency 256 --token-rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time
from collections.abc import Awaitable, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from tests.support.servers import fake_upstream_process  # noqa: E402


def body(rate: float) -> dict[str, object]:
    return {
        "model": "fake-reasoner", "messages": [{"role": "user", "content": "q"}], "stream": True,
        "max_tokens": 2000, "fake_token_rate": rate,
    }  # fmt: skip


async def with_httpx(url: str, streams: int, rate: float) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=10)) as client:

        async def one() -> int:
            reads = 0
            async with client.stream("POST", "/v1/chat/completions", json=body(rate)) as response:
                async for _ in response.aiter_bytes():
                    reads += 1
            return reads

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def with_aiohttp(url: str, streams: int, rate: float) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> int:
            reads = 0
            async with session.post(f"{url}/v1/chat/completions", json=body(rate)) as response:
                async for _ in response.content.iter_chunks():
                    reads += 1
            return reads

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


PROBE = {"model": "fake-reasoner", "prompt": list(range(1500)), "max_tokens": 20, "temperature": 0, "logprobs": 1,
         "stream": False}  # fmt: skip
CALLERS, PROBES_EACH = 16, 30


async def probes_httpx(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=10)) as client:

        async def caller() -> None:
            for _ in range(PROBES_EACH):
                (await client.post("/v1/completions", json=PROBE)).json()

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return CALLERS * PROBES_EACH


async def probes_aiohttp(url: str) -> int:
    async with aiohttp.ClientSession() as session:

        async def caller() -> None:
            for _ in range(PROBES_EACH):
                async with session.post(f"{url}/v1/completions", json=PROBE) as response:
                    await response.json()

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return CALLERS * PROBES_EACH


def measure_probes(send: Callable[[str], Awaitable[int]], url: str) -> str:
    began = time.process_time()
    probes = asyncio.run(send(url))  # type: ignore[arg-type]
    cpu = time.process_time() - began
    return f"| {send.__name__.removeprefix('probes_')} | {probes} | {cpu:.2f} | {1e3 * cpu / probes:.2f} |"


def measure(read: Callable[[str, int, float], Awaitable[int]], url: str, streams: int, rate: float) -> str:
    began_cpu, began = time.process_time(), time.monotonic()
    reads = asyncio.run(read(url, streams, rate))  # type: ignore[arg-type]
    cpu = time.process_time() - began_cpu
    return (
        f"| {read.__name__.removeprefix('with_')} | {reads:,} | {cpu:.2f} | {1e6 * cpu / reads:.1f} | "
        f"{time.monotonic() - began:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64, help="streams read at once (default 64)")
    parser.add_argument("--token-rate", type=float, default=200.0, help="tokens/s per stream (default 200)")
    parser.add_argument("--rounds", type=int, default=2, help="httpx-then-aiohttp rounds (default 2)")
    args = parser.parse_args()
    print(f"C = {args.concurrency}, {args.token_rate:g} tokens/s per stream\n")
    print("| library | reads | CPU s | CPU us per read | wall s |\n|---|---|---|---|---|")
    with fake_upstream_process("--no-record") as url:
        for _ in range(args.rounds):
            for read in (with_httpx, with_aiohttp):
                print(measure(read, url, args.concurrency, args.token_rate), flush=True)
        print(
            f"\n{CALLERS} callers x {PROBES_EACH} probes\n\n| library | probes | CPU s | CPU ms per probe |\n|---|---|---|---|"
        )
        for _ in range(args.rounds):
            for send in (probes_httpx, probes_aiohttp):
                print(measure_probes(send, url), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
