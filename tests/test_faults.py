"""Upstream faults, client disconnects and controller failures, end to end over loopback HTTP.

``thinkbrake serve --upstream`` runs as a real process in front of the fault-injecting fake upstream
(``tests/support/fake_upstream.py``); clients are the real ``openai`` SDK. Each fault must reach the client as
an OpenAI-shaped error (an HTTP error before the first byte, or one error event then ``data: [DONE]``
mid-stream) within a bounded time, and the server must go on serving.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, RequestRecord, closed_port_url
from tests.support.servers import thinkbrake_process, thinkbrake_thread

MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "How fast does Alice walk?"}]
#: every fault must reach the client within this many seconds. The stall time-out is 1 s and a fault takes about
#: 1.5 s to arrive on a 2-core machine; the stalls last 30 s: 15 s tells "bounded" from "hung" on a machine three
#: times slower under load, and on a faster one
PROMPT = 15.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def thinkbrake(upstream: FakeUpstream) -> Iterator[str]:
    """thinkbrake with a 1 s upstream time-out, so a stalled upstream fails fast."""
    with thinkbrake_process(upstream.url, "--request-timeout", "1") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(thinkbrake: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinkbrake}/v1", api_key="unused", max_retries=0, timeout=20)


def assert_error_shape(body: Any) -> dict[str, Any]:
    error = body["error"] if isinstance(body, dict) and "error" in body else body
    assert isinstance(error, dict), body
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error or "code" in error
    return error


def assert_still_serving(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, extra_body={"thinkbrake": {"policy": "off"}}
    )
    assert response.choices[0].message.reasoning_content  # type: ignore[attr-defined]


def raw_stream(base_url: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    """POST a streaming request with plain httpx; returns the status and the SSE data payloads."""
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, **body}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload, timeout=20) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.text]
        return 200, [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("fault", ["status:500", "status:503", "stall:30@0"])
def test_fault_before_first_token_is_an_http_error(client: openai.OpenAI, fault: str, stream: bool) -> None:
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        result = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=stream, extra_body={"fake_fault": fault}
        )
        if stream:
            list(result)  # type: ignore[arg-type]
    assert time.monotonic() - began < PROMPT
    assert 500 <= raised.value.status_code < 600
    assert_error_shape(raised.value.body)
    assert_still_serving(client)


@pytest.mark.parametrize("fault", ["malformed@5", "drop@5", "stall:30@5", "error@5"])
def test_fault_mid_stream_is_one_error_event_then_done(
    upstream: FakeUpstream, thinkbrake: str, client: openai.OpenAI, fault: str
) -> None:
    began = time.monotonic()
    status, events = raw_stream(thinkbrake, {"fake_fault": fault, "fake_trace": 0, "thinkbrake": {"policy": "off"}})
    assert time.monotonic() - began < PROMPT
    assert status == 200
    assert events[-1] == "[DONE]"
    errors = [json.loads(event) for event in events[:-1] if '"error"' in event]
    assert len(errors) == 1 and "error" in errors[0], events[-3:]
    assert_error_shape(errors[0])
    assert json.loads(events[-2]) == errors[0]  # the error is the last event before [DONE]
    reasoning = "".join(json.loads(event)["choices"][0]["delta"].get("reasoning", "") for event in events[1:-2])
    assert reasoning == "".join(upstream.vocabulary.pieces(upstream.traces[0].thinking)[:5])  # all before the fault

    with pytest.raises(openai.APIError) as raised:  # the SDK surfaces the error event as an exception
        for _ in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body={"fake_fault": fault}
        ):
            pass
    assert raised.value.message
    assert_still_serving(client)


@pytest.mark.parametrize("fault", ["malformed@5", "drop@5", "stall:30@5"])
def test_fault_mid_generation_without_streaming(client: openai.OpenAI, fault: str) -> None:
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"fake_fault": fault})
    assert time.monotonic() - began < PROMPT
    assert raised.value.status_code == 502
    assert_error_shape(raised.value.body)


def test_stalled_request_does_not_hold_up_others(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    failures: list[BaseException] = []

    def stalled() -> None:
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"fake_fault": "stall:30@3"})
        except openai.APIStatusError as error:
            failures.append(error)

    began = time.monotonic()
    thread = threading.Thread(target=stalled)
    thread.start()
    # the stalled request is under way (its upstream sent its 3 tokens and went quiet): it fails 1 s from now
    assert upstream.wait_for(
        lambda _: any(r.started >= began and r.tokens_sent >= 3 for r in upstream.generation_requests())
    )
    assert_still_serving(client)
    # answered while the other request is still stalled (about 0.1 s of the stalled one's 1 s time-out)
    assert thread.is_alive() and not failures
    thread.join(PROMPT)
    assert len(failures) == 1


def test_connection_refused_then_recovery() -> None:
    """The upstream goes away (its port refuses connections), then comes back on the same port."""
    first = FakeUpstream().start()
    port = first.port
    with thinkbrake_process(first.url, "--request-timeout", "5") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        assert_still_serving(client)
        first.stop()
        for stream in (False, True):
            began = time.monotonic()
            with pytest.raises(openai.APIStatusError) as raised:
                result = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
                if stream:
                    list(result)  # type: ignore[arg-type]
            assert time.monotonic() - began < PROMPT
            assert raised.value.status_code == 503  # nothing reached the upstream: unavailable, not a bad answer
            error = assert_error_shape(raised.value.body)
            assert error["code"] == "upstream_unavailable" and "is unreachable" in error["message"]
        with FakeUpstream(port=port):
            assert_still_serving(client)


def test_upstream_refusing_from_the_start_is_unready_not_hung() -> None:
    with thinkbrake_process(closed_port_url(), wait=False) as (url, _):
        deadline = time.monotonic() + 120  # a deadline, not a wait: a slow, loaded machine may need it
        while True:  # the process is up once /health answers at all
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.status_code == 503
        assert assert_error_shape(health.json())["code"] == "upstream_unavailable"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert raised.value.status_code == 503
        assert assert_error_shape(raised.value.body)["code"] == "upstream_unavailable"


def test_sse_lines_are_the_same_however_the_bytes_are_split() -> None:
    from server.upstream import SSELineDecoder

    stream = b'data: {"a": "x\\ny"}\r\n\r\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    whole = SSELineDecoder().decode(stream)
    assert whole == [b'data: {"a": "x\\ny"}', b"", b'data: {"b": 2}', b"", b"data: [DONE]", b""]
    for size in range(1, 9):
        decoder = SSELineDecoder()
        pieces = [stream[start : start + size] for start in range(0, len(stream), size)]
        assert [line for piece in pieces for line in decoder.decode(piece)] == whole


# -- client disconnects ---------------------------------------------------------------------------------------


def last_generation(upstream: FakeUpstream, after: float) -> RequestRecord:
    records = [r for r in upstream.generation_requests() if r.started >= after]
    assert records, "the request never reached the upstream"
    return records[-1]


@pytest.mark.parametrize("fault", [None, "stall:30@10"], ids=["streaming", "stalled"])
def test_client_disconnect_aborts_upstream_within_a_second(
    upstream: FakeUpstream, client: openai.OpenAI, fault: str | None
) -> None:
    """Measured at the upstream: the time from the client closing its stream to the upstream seeing it close."""
    began = time.monotonic()
    # 20 tokens/s: the 150-token limit below is 7.5 s of generation, far more than a loaded client takes to read
    # 8 chunks and close
    extra = {"fake_token_rate": 20, "fake_trace": 3, "thinkbrake": {"policy": "off"}}
    if fault:
        extra["fake_fault"] = fault
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_body=extra)
    for index, _ in enumerate(stream):
        if index >= 8:
            break
    if fault:
        time.sleep(0.3)  # now the upstream sends nothing
    stream.close()
    closed = time.monotonic()
    record = last_generation(upstream, began)
    assert upstream.wait_for(lambda _: record.aborted_at is not None), record.outcome
    assert record.aborted_at is not None and record.aborted_at - closed < 1.0
    assert record.tokens_sent < 150  # it did not run to its end


def test_client_disconnect_before_first_token_aborts_upstream(upstream: FakeUpstream, thinkbrake: str) -> None:
    from tests.support.serving import post_then_disconnect

    began = time.monotonic()
    body = {"model": MODEL, "messages": MESSAGES, "fake_fault": "stall:30@0"}
    # the client goes away once the request reached the upstream (not after a fixed time, which a slow machine
    # could spend before forwarding it)
    post_then_disconnect(
        thinkbrake,
        "/v1/chat/completions",
        body,
        lambda: any(r.started >= began for r in upstream.generation_requests()),
    )
    closed = time.monotonic()
    record = last_generation(upstream, began)
    assert upstream.wait_for(lambda _: record.aborted_at is not None), record.outcome
    assert record.aborted_at is not None and record.aborted_at - closed < 1.0


def test_many_disconnects_leave_no_upstream_connection_behind(upstream: FakeUpstream, thinkbrake: str) -> None:
    """More disconnects than the upstream connection pool holds; every upstream request is closed."""
    began = time.monotonic()
    # 20 tokens/s: a generation lasts 10+ s, far longer than a disconnect takes to arrive even on a loaded machine
    # (at 200/s a stream of a slow client could run to its end first and be counted "complete")
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "fake_token_rate": 20, "fake_trace": 3,
            "thinkbrake": {"policy": "off"}}  # fmt: skip

    async def disconnect_many() -> None:
        async with httpx.AsyncClient(base_url=thinkbrake, timeout=60) as session:

            async def one() -> None:
                async with session.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data:") and '"reasoning"' in line:
                            break

            for _ in range(6):
                await asyncio.gather(*(one() for _ in range(25)))

    import asyncio

    asyncio.run(disconnect_many())
    records = [r for r in upstream.generation_requests() if r.started >= began]
    assert len(records) == 150
    assert upstream.wait_for(lambda _: all(r.outcome == "aborted" for r in records)), {r.outcome for r in records}
    client = openai.OpenAI(base_url=f"{thinkbrake}/v1", api_key="unused", max_retries=0, timeout=60)
    assert_still_serving(client)


# -- the controller never raises into the stream ----------------------------------------------------------------


def test_controller_error_degrades_to_pass_through_and_is_counted(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import CollectorRegistry

    from controller.detector import SolutionDetector
    from server.app import build_app
    from server.metrics import Metrics
    from server.settings import Settings
    from server.upstream import UpstreamBackend

    def broken(self: SolutionDetector, text: str, tokens: int) -> list[Any]:
        raise RuntimeError("detector bug")

    monkeypatch.setattr(SolutionDetector, "feed", broken)
    settings = Settings(upstream=upstream.url)
    registry = CollectorRegistry()
    app = build_app(settings, UpstreamBackend(settings), Metrics(registry=registry))
    with thinkbrake_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        reasoning, content, final = "", "", None
        for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body={"fake_trace": 0}
        ):
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
                final = choice.model_extra.get("thinkbrake") or final  # type: ignore[union-attr]
        direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="unused").chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"fake_trace": 0}
        )
        assert reasoning == direct.choices[0].message.reasoning  # type: ignore[attr-defined]
        assert content == direct.choices[0].message.content  # pass-through: not stopped
        assert final is not None and final["stopped"] is False and "detector bug" in final["error"]
        metrics = httpx.get(f"{url}/metrics", timeout=60).text
    errors = [line for line in metrics.splitlines() if line.startswith("thinkbrake_controller_errors_total{")]
    assert errors and float(errors[0].rsplit(" ", 1)[1]) == 1.0, errors
