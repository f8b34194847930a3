"""server/probing.py: probes run beside the main stream, their answers arrive between chunks, nothing outlives
the choice; and the upstream's probe response parsing. (End to end: tests/test_serve_probes.py.)"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controller.probes import WAIT, ProbeRequest, ProbeResult, ProbeSpec, probe_spec
from server.backend import PROBE_MARKER, BackendError, Chunk, ProbeOutput, ProbeRejected
from server.metrics import Metrics
from server.probing import ChoiceProbes, Interleave
from server.replicas import ReplicaLost
from server.upstream import probe_output
from server.vocabulary import REJECTED, REPLICA_LOST

CHUNK_SECONDS = 0.02


class ProbeBackend:
    """Answers a probe after ``delay`` seconds with ``text`` (each token's log-probability ``logprob``), or
    raises ``error``; records every call and whether it was cancelled."""

    def __init__(
        self, delay: float = 0.0, text: str = "{42}", error: Exception | None = None, cached: int | None = 128
    ) -> None:
        self.delay, self.text, self.error, self.cached = delay, text, error, cached
        self.calls: list[tuple[list[int], ProbeSpec, dict[str, Any] | None, str]] = []
        self.cancelled = 0

    async def probe(self, token_ids: list[int], spec: ProbeSpec, extra_args: Any, request_id: str) -> ProbeOutput:
        self.calls.append((token_ids, spec, extra_args, request_id))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return ProbeOutput(self.text, [math.log(0.9)] * 3, 3, len(token_ids) + 5, self.cached)


async def main_stream(count: int) -> AsyncGenerator[Chunk, None]:
    for index in range(count):
        await asyncio.sleep(CHUNK_SECONDS)
        yield Chunk(f"t{index} ", [100 + index], "stop" if index == count - 1 else None)


def make_probes(backend: ProbeBackend, registry: CollectorRegistry | None = None) -> ChoiceProbes:
    metrics = Metrics(registry=registry or CollectorRegistry())
    return ChoiceProbes(backend, metrics, "m", "probe_fcs", "tb-1-0", {"script": [1, 2]})


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"model": "m", "policy": "probe_fcs", **labels})
    return 0.0 if value is None else value


def test_a_probe_answers_between_chunks_while_the_main_stream_goes_on() -> None:
    async def scenario() -> list[Any]:
        backend = ProbeBackend(delay=6 * CHUNK_SECONDS)
        probes = make_probes(backend)
        merged = Interleave(main_stream(20).__aiter__(), probes)
        order: list[Any] = []
        generated: list[int] = []
        async for item in merged.items():
            order.append(item)
            if isinstance(item, Chunk):
                generated += item.token_ids
                if len(generated) == 2:
                    probes.launch(ProbeRequest(0, 1, 3, WAIT), [7, 8], generated)
        await merged.stop()
        assert backend.calls[0][0] == [7, 8, 100]  # prompt ids + generated[:tokens]
        assert backend.calls[0][2] == {"script": [1, 2], PROBE_MARKER: 0}
        assert backend.calls[0][3] == "tb-1-0-probe0"
        return order

    order = asyncio.run(scenario())
    position = next(i for i, item in enumerate(order) if isinstance(item, ProbeResult))
    # the main stream kept flowing while the probe ran, and the answer came long before the stream ended
    assert 2 <= position - 2 < 18, position
    assert sum(isinstance(item, Chunk) for item in order) == 20
    result = order[position]
    assert result.answer == "42" and result.confidence == pytest.approx(0.9) and result.out_tokens == 3


def test_a_probe_that_ends_while_a_read_is_pending_is_taken_without_waiting_for_the_read() -> None:
    """The main stream's next chunk is held back until the second probe's answer was seen. That probe ends while
    the consumer is busy with the first answer: nothing waits then, so nothing is woken by it, and it must still
    be taken before the loop sleeps on the pending read (or this deadlocks)."""

    async def scenario() -> list[Any]:
        release = asyncio.Event()

        async def held_stream() -> AsyncGenerator[Chunk, None]:
            yield Chunk("a ", [1], None)
            await release.wait()
            yield Chunk("b ", [2], "stop")

        probes = make_probes(ProbeBackend(delay=0.01))
        merged = Interleave(held_stream().__aiter__(), probes)
        order: list[Any] = []
        async with aclosing(merged.items()) as items:
            async for item in items:
                order.append(item)
                if isinstance(item, Chunk) and item.text == "a ":
                    probes.launch(ProbeRequest(0, 1, 0, WAIT), [7], [1])
                elif isinstance(item, ProbeResult) and item.id == 0:
                    probes.launch(ProbeRequest(1, 1, 0, WAIT), [7], [1])
                    await asyncio.sleep(0.2)  # the probe ends while nobody reads
                elif isinstance(item, ProbeResult) and item.id == 1:
                    release.set()
        return order

    order = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert [item.id if isinstance(item, ProbeResult) else item.text for item in order] == ["a ", 0, 1, "b "]


def test_probe_metrics_and_stats() -> None:
    registry = CollectorRegistry()

    async def scenario() -> ChoiceProbes:
        probes = make_probes(ProbeBackend(), registry)
        probes.launch(ProbeRequest(0, 0, 0, WAIT), [1], [])
        probes.launch(ProbeRequest(1, 0, 0, WAIT), [1], [])
        while probes.running:
            await asyncio.sleep(0.001)
            probes.take()
        return probes

    stats = asyncio.run(scenario()).stats
    assert (stats.sent, stats.answered, stats.tokens, stats.cached_tokens) == (2, 2, 6, 256)
    assert sample(registry, "thinkbrake_probes_total") == 2
    assert sample(registry, "thinkbrake_probe_tokens_total") == 6
    assert sample(registry, "thinkbrake_probe_cached_tokens_total") == 256
    assert sample(registry, "thinkbrake_probe_latency_seconds_count") == 2


@pytest.mark.parametrize(("cached", "missed"), [(96, 0), (60, 0), (40, 1), (0, 1), (None, 0)])
def test_a_probe_served_under_half_from_the_cache_missed_it(cached: int | None, missed: int) -> None:
    async def scenario() -> ChoiceProbes:
        probes = make_probes(ProbeBackend(cached=cached))
        probes.launch(ProbeRequest(0, 95, 0, WAIT), [1] * 5, [2] * 95)  # a prompt of 100 + 5 suffix tokens
        await asyncio.gather(*probes.tasks)
        return probes

    stats = asyncio.run(scenario()).stats
    assert (stats.answered, stats.missed_cache) == (1, missed)
    assert stats.info()["missed_cache"] == missed


def test_the_probe_cache_hit_ratio_counts_only_probes_that_report_it() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    metrics.observe_probe("m", "probe_fcs", 0.1, 3, 300, prompt_tokens=1000)  # 30% of its prompt from the cache
    metrics.observe_probe("m", "probe_fcs", 0.1, 3, 0, prompt_tokens=500)  # a miss
    metrics.observe_probe("m", "probe_fcs", 0.1, 3, None, prompt_tokens=800)  # not reported: in neither side
    cached = sample(registry, "thinkbrake_probe_cached_tokens_total")
    reported = sample(registry, "thinkbrake_probe_reported_prompt_tokens_total")
    assert (cached, reported) == (300, 1500)


@pytest.mark.parametrize(
    ("error", "fallback"),
    [
        (BackendError("boom"), None),
        (ProbeRejected("no token ids here", 400), REJECTED),
        (ReplicaLost("the replica holding this choice's prefix is not serving"), REPLICA_LOST),
        (RuntimeError("x"), None),
    ],
)
def test_a_failed_probe_is_an_answer_without_answer(error: Exception, fallback: str | None) -> None:
    registry = CollectorRegistry()

    async def scenario() -> tuple[list[ProbeResult], ChoiceProbes]:
        probes = make_probes(ProbeBackend(error=error), registry)
        probes.launch(ProbeRequest(3, 0, 0, WAIT), [1], [])
        await asyncio.gather(*probes.tasks)
        return probes.take(), probes

    results, probes = asyncio.run(scenario())
    assert results == [ProbeResult(3, None, 0.0, 0)]
    assert probes.stats.failed == 1 and probes.stats.fallback == fallback
    assert sample(registry, "thinkbrake_probe_errors_total") == 1


def test_cancel_leaves_no_probe_running_and_stop_ends_a_pending_read() -> None:
    async def scenario() -> ProbeBackend:
        backend = ProbeBackend(delay=60)
        probes = make_probes(backend)
        stream = main_stream(1000).__aiter__()
        merged = Interleave(stream, probes)
        items = merged.items()
        await anext(items)
        probes.launch(ProbeRequest(0, 1, 0, WAIT), [1], [100])
        probes.launch(ProbeRequest(1, 1, 0, WAIT), [1], [100])
        await anext(items)  # read while probes run: the next read is pending in a task when we stop
        await merged.stop()
        await probes.cancel()
        await items.aclose()
        await stream.aclose()  # would raise "already running" if a read were still in flight
        assert not probes.running
        return backend

    backend = asyncio.run(scenario())
    assert backend.cancelled == 2


def test_upstream_probe_response_parsing() -> None:
    data = {
        "choices": [
            {"index": 0, "text": "{42}", "logprobs": {"tokens": ["{", "42", "}"], "token_logprobs": [-0.1, -0.2, -0.3]}}
        ],
        "usage": {"prompt_tokens": 300, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 256}},
    }
    assert probe_output(data, 1) == ProbeOutput("{42}", [-0.1, -0.2, -0.3], 3, 300, 256)
    bare = {"choices": [{"text": "{7}"}]}  # a server that returns no log-probabilities or usage
    assert probe_output(bare, 12) == ProbeOutput("{7}", [], 0, 12, None)


def test_probe_spec_is_the_recorded_wait_probe() -> None:
    spec = probe_spec(WAIT, "tiny-r1")
    assert spec.suffix == "\n**Final Answer**\n\\boxed" and spec.max_tokens == 20
