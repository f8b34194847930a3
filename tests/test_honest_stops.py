"""No response field and no metric claims a saving the backend did not realize.

``thinkbrake serve --upstream`` (a real process) in front of the fake upstream (real HTTP/SSE on loopback). Its
first trace ends on a confirming sentence and the model closes its thinking right after it, so the newline that
completes the confirmation is the model's own end of thinking: the request must run untouched to its natural end,
be reported ``stopped: false`` and count as natural in every metric, in normal and in shadow mode, whether the
end tag comes as raw text or as the empty delta of a reasoning parser, and however the upstream's events are
merged into reads. Its second trace goes on thinking after the confirmation: that one is stopped, and the text
past the stop point is neither forwarded nor part of the continuation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_upstream import THINK_END, FakeUpstream, Trace
from tests.support.servers import thinkbrake_process

CONFIRMED = (
    "Kylar wants 16 glasses. Every second glass costs 60% of $5, so $3.\n\n"
    "So 8 glasses at $5 and 8 glasses at $3: 40 + 24 = 64.\n\n"
    "So the answer is 64.\n\n"
    "Wait, let me double-check. 8 * 5 = 40 and 8 * 3 = 24, and 40 + 24 = 64.\n\n"
    "**Final Answer**: Kylar needs to pay \\boxed{64} dollars.\n"
)
GOES_ON = "Hmm, but maybe I should check the discount once more. 60% of 5 is 3, yes.\n" * 20
ANSWER = "\n\nKylar needs to pay $\\boxed{64}$ dollars."
TRACES = [Trace(CONFIRMED, ANSWER), Trace(CONFIRMED + GOES_ON, ANSWER)]
MODEL = "fake-reasoner"
#: counters (and histogram counts) that may only move when a request is really stopped early
STOP_SERIES = [
    ("thinkbrake_requests_total", {"outcome": "stopped"}),
    ("thinkbrake_early_stops_total", {}),
    ("thinkbrake_tokens_saved_estimated_total", {}),
    ("thinkbrake_stop_position_tokens_count", {}),
]
#: ... and those that may only move when a shadow request would have been stopped
SHADOW_STOP_SERIES = [
    ("thinkbrake_shadow_would_stop_total", {}),
    ("thinkbrake_shadow_would_stop_thinking_tokens_total", {}),
    ("thinkbrake_tokens_saved_measured_total", {}),
    ("thinkbrake_shadow_compared_total", {}),
]


@pytest.fixture(scope="module", params=["reasoning", "content"], ids=["parser", "raw"])
def upstream(request: pytest.FixtureRequest) -> Iterator[FakeUpstream]:
    with FakeUpstream(TRACES, reasoning_field=request.param) as server:
        yield server


@pytest.fixture(scope="module")
def thinkbrake(upstream: FakeUpstream) -> Iterator[str]:
    with thinkbrake_process(upstream.url) as (url, _):
        yield url


def metric(base_url: str, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def snapshot(base_url: str) -> dict[str, float]:
    series = [*STOP_SERIES, *SHADOW_STOP_SERIES, ("thinkbrake_requests_total", {"outcome": "natural"})]
    series += [("thinkbrake_shadow_requests_total", {})]
    return {f"{name}{labels}": metric(base_url, name, labels) for name, labels in series}


def chat(base_url: str, trace: int, stream: bool, rate: float, **thinkbrake: Any) -> dict[str, Any]:
    """One request; returns the message (reasoning and content as the client got them) and ``thinkbrake``."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "How much does Kylar pay for 16 glasses?"}],
        "stream": stream,
        "fake_trace": trace,
        "fake_token_rate": rate,
        "thinkbrake": {"policy": "fcs_reflection", **thinkbrake},
    }
    if not stream:
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        data = response.json()
        message = data["choices"][0]["message"]
        return {"reasoning": message["reasoning_content"], "content": message["content"], "info": data["thinkbrake"]}
    reasoning, content, info = "", "", None
    import json

    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            info = chunk.get("thinkbrake") or info
            for choice in chunk["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
    return {"reasoning": reasoning, "content": content, "info": info}


@pytest.mark.parametrize("rate", [0.0, 400.0], ids=["merged-reads", "one-event-per-read"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("shadow", [False, True], ids=["act", "shadow"])
def test_a_model_that_closes_its_thinking_after_a_confirmation_is_not_stopped(
    thinkbrake: str, upstream: FakeUpstream, stream: bool, rate: float, shadow: bool
) -> None:
    before = snapshot(thinkbrake)
    requests_before = len(upstream.requests)
    result = chat(thinkbrake, 0, stream, rate, shadow=shadow)
    after = snapshot(thinkbrake)

    info = result["info"]
    assert info["stopped"] is False and info["reason"] is None and info["answer"] is None
    assert "stop_position_tokens" not in info
    assert result["reasoning"] == CONFIRMED  # untouched: no end text of ours, nothing cut
    assert result["content"] == ANSWER
    if shadow:
        assert info["shadow"]["would_stop"] is False and info["shadow"]["stop_tokens"] is None
    # the upstream request ran to its end; no continuation was sent
    sent = [record for record in upstream.requests[requests_before:] if record.path != "/tokenize"]
    assert [(record.path, record.outcome) for record in sent] == [("/v1/chat/completions", "complete")]

    changed = {key: after[key] - before[key] for key in after}
    assert changed["thinkbrake_requests_total{'outcome': 'natural'}"] == 1
    for name, labels in STOP_SERIES + SHADOW_STOP_SERIES:
        assert changed[f"{name}{labels}"] == 0, name
    assert changed["thinkbrake_shadow_requests_total{}"] == (1 if shadow else 0)


@pytest.mark.parametrize("rate", [0.0, 400.0], ids=["merged-reads", "one-event-per-read"])
def test_a_model_that_goes_on_is_stopped_and_nothing_past_the_stop_is_kept(
    thinkbrake: str, upstream: FakeUpstream, rate: float
) -> None:
    before = snapshot(thinkbrake)
    requests_before = len(upstream.requests)
    result = chat(thinkbrake, 1, True, rate)
    after = snapshot(thinkbrake)

    info = result["info"]
    assert info["stopped"] is True and info["reason"] == "confirmed" and info["answer"] == "64"
    assert result["reasoning"].startswith(CONFIRMED)
    assert result["content"] == "\n\n" + ANSWER  # the blank line of our end of thinking, then the model's answer
    sent = [record for record in upstream.requests[requests_before:] if record.path != "/tokenize"]
    assert [record.path for record in sent] == ["/v1/chat/completions", "/v1/completions"]
    if rate:  # (unthrottled, the fake may have written its whole trace before the abort reaches it)
        assert sent[0].outcome == "aborted"
    # the continuation is prompt + the thinking up to the stop point + the end of thinking
    continued = upstream.vocabulary.decode(sent[1].body["prompt"])
    thinking = continued[continued.index("Kylar wants") : continued.index(THINK_END)]
    assert result["reasoning"] == thinking  # what the client saw is exactly what the engine continues from
    if rate:  # one event per read: the stop lands on the first token after the confirmation ("\nHmm,")
        assert thinking == CONFIRMED + "Hmm,\n"
    assert (
        after["thinkbrake_requests_total{'outcome': 'stopped'}"]
        - before["thinkbrake_requests_total{'outcome': 'stopped'}"]
        == 1
    )
    assert after["thinkbrake_early_stops_total{}"] - before["thinkbrake_early_stops_total{}"] == 1
    assert after["thinkbrake_tokens_saved_estimated_total{}"] > before["thinkbrake_tokens_saved_estimated_total{}"]


def test_thinking_tokens_are_counted_as_the_engine_counts_them(thinkbrake: str, upstream: FakeUpstream) -> None:
    """Every thinking token and the end-of-thinking token are thinking; the tokens after it are the answer's,
    whether the end tag arrives as text or is swallowed by a reasoning parser (an empty delta)."""
    result = chat(thinkbrake, 0, False, 0.0, policy="off")
    info = result["info"]
    assert info["thinking_tokens"] == len(upstream.vocabulary.pieces(CONFIRMED)) + 1
    assert info["answer_tokens"] == len(upstream.vocabulary.pieces(ANSWER))
