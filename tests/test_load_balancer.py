"""The test load balancer itself (``tests/support/load_balancer.py``): a real nginx in front of two fake upstreams
(``tests/support/fake_upstream.py``, which record every request) balances round-robin, or by a consistent hash of
a header, and passes a streamed chat completion through unbuffered, event by event, to the real ``openai`` client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.load_balancer import nginx_balancer

MODEL = "fake-reasoner"
HEADER = "X-Session"


@pytest.fixture
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream() as first, FakeUpstream() as second:
        yield first, second


def counts(upstreams: tuple[FakeUpstream, FakeUpstream]) -> list[int]:
    return [len(upstream.requests) for upstream in upstreams]


def test_round_robin_alternates(upstreams: tuple[FakeUpstream, FakeUpstream]) -> None:
    with nginx_balancer([u.url for u in upstreams]) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(6):
            assert client.get("/v1/models").status_code == 200
    assert counts(upstreams) == [3, 3]  # equal weights, one nginx process: strict alternation


def test_hash_header_pins_each_value_to_one_upstream(upstreams: tuple[FakeUpstream, FakeUpstream]) -> None:
    # The hash ring is built from the upstreams' host:port, and the fake upstreams' ports differ from run to run:
    # 32 values make "all on one upstream" astronomically unlikely whatever the ports.
    values = [f"session-{i}" for i in range(32)]
    with nginx_balancer([u.url for u in upstreams], hash_header=HEADER) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(3):  # interleaved rounds: stickiness, not a run of repeats
                for value in values:
                    assert client.get("/v1/models", headers={HEADER: value}).status_code == 200
    seen = [{r.headers[HEADER.lower()] for r in upstream.requests} for upstream in upstreams]
    assert not seen[0] & seen[1], "a value reached both upstreams"
    assert seen[0] | seen[1] == set(values)
    assert seen[0] and seen[1], "every value hashed to one upstream"
    for upstream in upstreams:  # each of its values: all three rounds
        assert len(upstream.requests) == 3 * len({r.headers[HEADER.lower()] for r in upstream.requests})


def test_streamed_chat_passes_event_by_event(upstreams: tuple[FakeUpstream, FakeUpstream]) -> None:
    # paced: 0.4 s of stream, which a proxy holding the response would deliver in one burst. (nginx 1.22 passes
    # this stream on as it comes even with proxy_buffering on; the fixture turns buffering off all the same.)
    rate, tokens = 50, 20
    with nginx_balancer([u.url for u in upstreams]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is 2 + 2?"}],
            stream=True,
            max_tokens=tokens,
            extra_body={"fake_trace": 0, "fake_token_rate": rate},
        )
        arrivals = [time.monotonic() for chunk in stream if chunk.choices]
    assert len(arrivals) >= tokens // 2, arrivals
    assert arrivals[-1] - arrivals[0] >= 0.5 * tokens / rate, "the events arrived in one burst"
    assert sum(counts(upstreams)) == 1
