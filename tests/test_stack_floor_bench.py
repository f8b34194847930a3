"""``benchmarks/stack_floor.py``: each bare proxy variant forwards every character the upstream streams, so the CPU
per token it reports is for the whole stream (a variant that dropped events would look cheaper than it is)."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from tests.support.fixtures import REPO_ROOT, free_port, server_process, wait_healthy
from tests.support.servers import fake_upstream_process

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import proxy_overhead  # noqa: E402
import stack_floor  # noqa: E402


def streamed_chars(port: int, traces: list[int]) -> list[int]:
    """Characters of text a client receives for each of ``traces`` (one streamed request each, in turn)."""

    async def run() -> list[int]:
        client = proxy_overhead.Client("127.0.0.1", port)
        counts = []
        try:
            for trace in traces:
                sample = proxy_overhead.Sample()
                body = {**proxy_overhead.request_body("off", "fake-reasoner", 4096), "fake_trace": trace}
                await client.stream(json.dumps(body).encode(), sample, [True])
                counts.append(sample.chars)
        finally:
            client.close()
        return counts

    return asyncio.run(asyncio.wait_for(run(), timeout=120))


@pytest.mark.parametrize("variant", stack_floor.VARIANTS)
def test_a_floor_variant_forwards_the_whole_stream(variant: str) -> None:
    traces = [0, 1, 2]
    with fake_upstream_process("--no-record") as upstream:
        direct = streamed_chars(int(upstream.rsplit(":", 1)[1]), traces)
        port = free_port()
        command = [
            sys.executable, str(REPO_ROOT / "benchmarks" / "stack_floor.py"), "--serve", variant, "--upstream", upstream,
            "--port", str(port),
        ]  # fmt: skip
        with server_process(command, {}) as process:
            wait_healthy(f"http://127.0.0.1:{port}", process=process, name=variant)
            through = streamed_chars(port, traces)
    assert min(direct) > 100
    assert through == direct
