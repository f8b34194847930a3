"""``serve --affinity-header NAME``: a choice's upstream request, its answer probes and its continuation after a
stop carry one value of their own, so a router hashing on the header sends them all to one replica.

A real ``thinkbrake serve --upstream`` process in front of the fake upstream (which records each request's
headers), the real ``openai`` client.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import openai
import pytest

from server.backend import choice_of, side_request
from tests.support.fake_upstream import FakeUpstream, RequestRecord
from tests.support.servers import thinkbrake_process

HEADER = "X-Thinkbrake-Session"
MODEL = "fake-reasoner"
QUESTION = [{"role": "user", "content": "What is the sum of the first ten positive integers?"}]
#: paced, so the default rule's probes go out while the thinking streams: the written trace's first "Wait" comes
#: about a second before its end at 100 tokens/s, time enough for a probe to leave even on a loaded machine
PACED = {"fake_token_rate": 100}


def ask(client: openai.OpenAI, n: int, **extra: Any) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, n=n, extra_body=extra)


def kind(record: RequestRecord) -> str:
    if record.path == "/v1/chat/completions":
        return "main"
    return "continuation" if record.body.get("stream") else "probe"


def upstream_traffic(upstream: FakeUpstream) -> list[RequestRecord]:
    return [r for r in list(upstream.requests) if r.path in ("/v1/chat/completions", "/v1/completions")]


def test_a_choices_requests_share_one_value_and_choices_differ() -> None:
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url, "--affinity-header", HEADER) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        ask(client, 2, fake_trace=2, thinkbrake={"policy": "fcs_reflection"})  # both choices stop: continuations
        ask(client, 1, fake_trace=0, **PACED)  # the default probe_fcs: answer probes
        traffic = upstream_traffic(upstream)
    by_value: dict[str, list[str]] = defaultdict(list)
    for record in traffic:
        assert HEADER.lower() in record.headers, (record.path, record.headers)
        by_value[record.headers[HEADER.lower()]].append(kind(record))
    assert len(by_value) == 3, by_value  # one value per choice: 2 + 1
    kinds = sorted(sorted(kinds) for kinds in by_value.values())
    for kinds_of_choice in kinds:
        assert kinds_of_choice.count("main") == 1, kinds  # each value: exactly one choice's main request
    assert sum(k.count("continuation") for k in kinds) >= 2 and sum(k.count("probe") for k in kinds) >= 1, kinds


def test_no_header_without_the_setting() -> None:
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        ask(client, 1, fake_trace=2, thinkbrake={"policy": "fcs_reflection"})
        traffic = upstream_traffic(upstream)
    assert traffic and all(HEADER.lower() not in record.headers for record in traffic)


def test_a_routers_session_token_is_echoed_on_the_choices_side_requests() -> None:
    """llm-d's session affinity: the router sets ``x-session-token`` on a response and routes a request that sends
    it back to the same replica. Each choice's probes and continuation send back the token of its own response."""
    echo = "x-session-token"
    with (
        FakeUpstream(session_header=echo) as upstream,
        thinkbrake_process(upstream.url, "--affinity-echo-header", echo, "--affinity-header", HEADER) as (url, _),
    ):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        ask(client, 2, fake_trace=2, thinkbrake={"policy": "fcs_reflection"})  # both choices stop: continuations
        ask(client, 1, fake_trace=0, **PACED)  # answer probes
        traffic = upstream_traffic(upstream)
    tokens: dict[str, set[str | None]] = defaultdict(set)
    side = 0
    for record in traffic:
        choice = record.headers[HEADER.lower()]
        if kind(record) == "main":
            assert echo not in record.headers  # the first request of a choice has no token yet
        else:
            side += 1
            tokens[choice].add(record.headers.get(echo))
    assert side >= 3 and len(tokens) == 3, tokens
    assert all(len(values) == 1 and None not in values for values in tokens.values()), tokens  # one token each
    assert len({value for values in tokens.values() for value in values}) == 3  # and the choices' tokens differ


@pytest.mark.parametrize("kind_and_number", [("answer", None), ("probe", 3), ("record", 12)])
def test_side_requests_name_their_choice(kind_and_number: tuple[str, int | None]) -> None:
    kind_name, number = kind_and_number
    assert choice_of(side_request("tb-1f2e-0", kind_name, number)) == "tb-1f2e-0"
    assert choice_of("tb-1f2e-1") == "tb-1f2e-1"
