"""Load and soak: many concurrent streams through ``thinkbrake serve --upstream``, zero errors, bounded memory.

thinkbrake and the fake upstream run as processes of their own; the clients are the real ``openai`` SDK
(``AsyncOpenAI``). A quarter of the requests use the text rule ``fcs_reflection`` on traces it stops (abort + continuation);
the rest are short pass-through streams. RSS is read from the thinkbrake process after a warm-up and at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import psutil
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import fake_upstream_process, thinkbrake_process

CONCURRENCY = 200
WARMUP_REQUESTS = 400
REQUESTS = 2000
#: RSS may grow this much after the warm-up (allocator noise, caches that fill once), not with the request count
RSS_GROWTH_LIMIT_MIB = 40


@pytest.fixture(scope="module")
def thinkbrake() -> Iterator[tuple[str, psutil.Process]]:
    with fake_upstream_process("--no-record") as upstream, thinkbrake_process(upstream) as (url, process):
        yield url, psutil.Process(process.pid)


async def one_request(client: openai.AsyncOpenAI, index: int) -> tuple[str | None, bool]:
    """Stream one request; returns (finish_reason, stopped)."""
    if index % 4 == 0:
        # the text rule stops these at a fixed point (a probing rule's stop depends on when its probes answer)
        extra: dict[str, object] = {"fake_trace": index % 3, "thinkbrake": {"policy": "fcs_reflection"}}
        limit = None
    else:
        extra = {"fake_trace": 3 + index % 2, "thinkbrake": {"policy": "off"}}
        limit = 16
    finish, stopped, text = None, False, 0
    stream = await client.chat.completions.create(
        model="fake-reasoner", messages=[{"role": "user", "content": f"question {index}"}], stream=True,
        max_tokens=limit, extra_body=extra,
    )  # fmt: skip
    async for chunk in stream:
        for choice in chunk.choices:
            text += len(choice.delta.content or "") + len(getattr(choice.delta, "reasoning_content", None) or "")
            finish = choice.finish_reason or finish
            info = (choice.model_extra or {}).get("thinkbrake")
            stopped = stopped or bool(info and info["stopped"])
    assert text > 0
    return finish, stopped


async def run_batch(base_url: str, start: int, count: int) -> list[tuple[str | None, bool]]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(index: int) -> tuple[str | None, bool]:
        async with gate:
            return await one_request(client, index)

    try:
        return await asyncio.gather(*(limited(index) for index in range(start, start + count)))
    finally:
        await client.close()


def test_many_concurrent_streams_zero_errors_bounded_memory(thinkbrake: tuple[str, psutil.Process]) -> None:
    url, process = thinkbrake
    warmup = asyncio.run(run_batch(url, 0, WARMUP_REQUESTS))
    rss_start = process.memory_info().rss
    began = time.monotonic()
    results = asyncio.run(run_batch(url, WARMUP_REQUESTS, REQUESTS - WARMUP_REQUESTS))
    elapsed = time.monotonic() - began
    rss_end = process.memory_info().rss
    results = warmup + results
    assert len(results) == REQUESTS  # gather raised nothing: zero errors
    assert all(finish in ("stop", "length") for finish, _ in results)
    stops = sum(stopped for _, stopped in results)
    assert stops == REQUESTS // 4  # every fcs_reflection request was stopped and finished by a continuation
    growth = (rss_end - rss_start) / 2**20
    print(f"\n{REQUESTS - WARMUP_REQUESTS} requests in {elapsed:.1f} s; RSS {rss_start / 2**20:.0f} -> "
          f"{rss_end / 2**20:.0f} MiB")  # fmt: skip
    assert growth < RSS_GROWTH_LIMIT_MIB, f"RSS grew {growth:.0f} MiB over {REQUESTS - WARMUP_REQUESTS} requests"


def test_upstream_connections_are_kept_alive() -> None:
    """A finished stream hands its connection back to the pool (read to the end, not closed): no TCP
    handshake per request, and no connection churn on the upstream."""
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        before = upstream.connections
        for index in range(20):
            stream = client.chat.completions.create(
                model="fake-reasoner", messages=[{"role": "user", "content": "hi"}], stream=index % 2 == 0,
                max_tokens=8, extra_body={"thinkbrake": {"policy": "off"}},
            )  # fmt: skip
            if index % 2 == 0:
                assert [chunk for chunk in stream]  # type: ignore[union-attr]
        assert len(upstream.generation_requests()) == 20
        assert upstream.connections - before <= 2
