"""``serve --upstream A --upstream B``: requests balanced over replicas (fewest in flight), each choice's probes and
continuation pinned to its replica, a replica that goes down left out and put back when it answers again.

Real ``thinkbrake serve`` processes in front of fake upstreams (which record each request with its headers; one
runs as a process of its own so it can be killed), the real ``openai`` client; and the :class:`Replicas` backend in
process for what a client cannot see (a probe whose replica is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from controller.probes import WAIT, probe_spec
from server.backend import Sampling, TextPrompt, side_request
from server.replicas import ReplicaLost, Replicas
from server.settings import Settings
from server.vocabulary import REPLICA_LOST
from tests.support.fake_upstream import FakeUpstream, RequestRecord
from tests.support.fixtures import REPO_ROOT, free_port
from tests.support.servers import thinkbrake_process

HEADER = "X-Thinkbrake-Choice"
MODEL = "fake-reasoner"
QUESTION = [{"role": "user", "content": "What is the sum of the first ten positive integers?"}]


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, n: int = 1, **extra: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=QUESTION, n=n, extra_body=extra)


def mains(upstream: FakeUpstream) -> list[RequestRecord]:
    return [r for r in upstream.generation_requests() if r.path == "/v1/chat/completions"]


def test_requests_spread_and_each_choice_stays_on_its_replica() -> None:
    with (
        FakeUpstream(token_rate=50) as first,
        FakeUpstream(token_rate=50) as second,
        thinkbrake_process(first.url, "--upstream", second.url, "--affinity-header", HEADER) as (url, _),
    ):
        client = client_of(url)
        threads = [
            threading.Thread(target=ask, args=(client, 2), kwargs={"fake_trace": 2, "thinkbrake": {"policy": "fcs_reflection"}}),
            threading.Thread(target=ask, args=(client, 1), kwargs={"fake_trace": 0}),  # the default rule: probes
            threading.Thread(target=ask, args=(client, 1), kwargs={"fake_trace": 0}),
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        where: dict[str, set[int]] = {}
        kinds: dict[str, int] = {"probe": 0, "continuation": 0}
        for index, upstream in enumerate((first, second)):
            for record in upstream.requests:
                if record.path not in ("/v1/chat/completions", "/v1/completions"):
                    continue
                where.setdefault(record.headers[HEADER.lower()], set()).add(index)
                if record.path == "/v1/completions":
                    kinds["continuation" if record.body.get("stream") else "probe"] += 1
        # four choices, each of them served by one replica only: main request, probes and continuation
        assert len(where) == 4 and all(len(replicas) == 1 for replicas in where.values()), where
        assert kinds["probe"] >= 1 and kinds["continuation"] >= 2, kinds
        # four choices at once: the fewest in flight spreads them, two on each
        assert (len(mains(first)), len(mains(second))) == (2, 2)


@contextlib.contextmanager
def two_replicas() -> Iterator[tuple[FakeUpstream, FakeUpstream, str]]:
    """Two fake upstreams and a thinkbrake in front of both; yields (first, second, thinkbrake's URL)."""
    with (
        FakeUpstream() as first,
        FakeUpstream() as second,
        thinkbrake_process(first.url, "--upstream", second.url) as (url, _),
    ):
        yield first, second, url


def test_sequential_requests_take_the_replicas_in_turn() -> None:
    with two_replicas() as (first, second, url):
        client = client_of(url)
        for _ in range(4):
            ask(client, thinkbrake={"policy": "off"}, max_tokens=5)
        assert (len(mains(first)), len(mains(second))) == (2, 2)


def test_a_replica_that_goes_down_is_left_out_then_put_back() -> None:
    with two_replicas() as (first, second, url):
        client = client_of(url)
        port = first.port
        first.stop()
        for _ in range(4):  # no client sees the dead replica: the failed connection is retried on the other
            response = ask(client, thinkbrake={"policy": "off"}, max_tokens=5)
            assert response.choices[0].message.reasoning_content  # type: ignore[attr-defined]
        assert len(mains(second)) == 4
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # one replica serves
        with FakeUpstream(port=port) as back:  # the replica answers again on its address
            deadline = time.monotonic() + 120  # a guard: it is back within the watch's 5 s back-off
            while not mains(back) and time.monotonic() < deadline:
                ask(client, thinkbrake={"policy": "off"}, max_tokens=5)
                time.sleep(0.2)
            assert mains(back), "the replica was not put back"


@contextlib.contextmanager
def upstream_process(*flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The fake upstream in a process of its own (so it can be killed mid-stream); yields (URL, process)."""
    port = free_port()
    command = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, env={"PYTHONPATH": str(REPO_ROOT)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url, process
    finally:
        process.kill()
        process.wait(30)


def stream_events(url: str, events: list[dict[str, Any] | str], **extra: Any) -> None:
    """A streamed chat request; appends each SSE data payload as it arrives (parsed, or the string ``[DONE]``)."""
    payload = {"model": MODEL, "messages": QUESTION, "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))


def test_a_replica_killed_mid_stream_is_an_error_event_and_new_requests_go_to_the_live_one() -> None:
    with (
        upstream_process("--token-rate", "50") as (doomed, process),
        FakeUpstream(token_rate=50) as live,
        thinkbrake_process(doomed, "--upstream", live.url) as (url, _),
    ):
        streams: list[list[dict[str, Any] | str]] = [[], []]
        body = {"fake_trace": 0, "thinkbrake": {"policy": "off"}}
        threads = [threading.Thread(target=stream_events, args=(url, events), kwargs=body) for events in streams]
        for thread in threads:
            thread.start()
        assert live.wait_for(mains)  # one stream on each replica (the fewest in flight)
        deadline = time.monotonic() + 120
        while not all(len(events) > 3 for events in streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        assert len(mains(live)) == 1
        errors = [events for events in streams if any(isinstance(e, dict) and "error" in e for e in events)]
        assert len(errors) == 1, [events[-2:] for events in streams]  # the stream on the killed replica
        failed = errors[0]
        assert failed[-1] == "[DONE]" and isinstance(failed[-2], dict) and failed[-2]["error"]["message"], failed[-2:]
        survived = next(events for events in streams if events is not failed)
        assert survived[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in survived)
        client = client_of(url)
        for _ in range(3):  # new requests: all on the live replica, none fails
            assert ask(client, thinkbrake={"policy": "off"}, max_tokens=5).choices[0].finish_reason
        assert len(mains(live)) == 4


def test_a_probe_whose_replica_is_gone_makes_the_choice_go_text_only() -> None:
    async def scenario(pinned: FakeUpstream, other: FakeUpstream) -> None:
        replicas = Replicas(Settings(upstream=[pinned.url, other.url]))
        await replicas.start()
        try:
            while len(replicas.serving()) < 2:
                await asyncio.sleep(0.05)
            replicas.in_flight[1] += 1  # so the choice lands on the first replica
            generation = replicas.generate(TextPrompt(text="Q"), Sampling(max_tokens=3), "choice-7")
            chunks = [chunk async for chunk in generation]
            replicas.in_flight[1] -= 1
            assert chunks and len(mains_of(pinned)) == 1 and generation.prompt_token_ids
            spec = probe_spec(WAIT)
            output = await replicas.probe(generation.prompt_token_ids, spec, None, side_request("choice-7", "probe", 1))
            assert output.text and len(pinned.probe_requests()) == 1  # on the choice's replica
            await asyncio.to_thread(pinned.stop)
            with pytest.raises(ReplicaLost) as lost:
                await replicas.probe(generation.prompt_token_ids, spec, None, side_request("choice-7", "probe", 2))
            assert lost.value.reason == REPLICA_LOST
            assert other.probe_requests() == []  # never sent to a replica without the prefix
            assert replicas.serving() == [1]  # the lost replica is out
        finally:
            await replicas.shutdown()

    def mains_of(upstream: FakeUpstream) -> list[RequestRecord]:
        return upstream.generation_requests()

    with FakeUpstream() as pinned, FakeUpstream() as other:
        asyncio.run(scenario(pinned, other))


def test_one_upstream_is_given_once() -> None:
    with pytest.raises(ValueError, match="given twice"):
        Settings(upstream=["http://127.0.0.1:9/", "http://127.0.0.1:9"])
    assert Settings(upstream="http://a/,http://b").upstream == ["http://a", "http://b"]
