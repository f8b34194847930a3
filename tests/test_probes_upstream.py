"""Answer probes through ``thinkbrake serve --upstream``: token-id ``/v1/completions`` probes with ``logprobs``,
a stop decided by them, and the text-only fallback for upstreams that cannot take probes.

The upstream is the fake of ``tests/support/fake_upstream.py`` (real HTTP over loopback, vLLM's protocol),
streaming at a fixed token rate so probes answer while the thinking goes on; the proxy is the real CLI.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai

from tests.support.fake_upstream import FakeUpstream, Trace
from tests.support.servers import thinkbrake_process
from tests.support.serving import metric

QUESTION = "What is 6 * 7?"
SOLVE = "Six times seven: 6 * 7 = 42. So the answer is 42.\n\n"
CONFIRM = "Wait, let me check it another way: 7 * 6 = 42. Yes, so the answer is 42.\n\n"
RECHECK = "Wait, maybe I should check once more."
TAIL = " Let me add it up again: 6 + 6 + 6 + 6 + 6 + 6 + 6 = 42." * 30
TRACE = Trace(SOLVE + CONFIRM + RECHECK + TAIL, "The answer is $\\boxed{42}$.")
SUFFIX = "\n**Final Answer**\n\\boxed"
TOKEN_RATE = 60.0  # about 0.4 s between two "Wait"s: a probe answers before the next one, even on a busy machine


@contextlib.contextmanager
def proxied(**upstream_options: Any) -> Iterator[tuple[FakeUpstream, str, openai.OpenAI]]:
    with FakeUpstream([TRACE], token_rate=TOKEN_RATE, **upstream_options) as upstream:
        with thinkbrake_process(upstream.url) as (url, _):
            yield upstream, url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def ask(client: openai.OpenAI, **thinkbrake: Any) -> Any:
    return client.chat.completions.create(
        model="fake-reasoner",
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"thinkbrake": {"policy": "probe_fcs", **thinkbrake}},
    )


def test_probes_decide_the_stop() -> None:
    with proxied() as (upstream, url, client):
        response = ask(client, agree_confidence=1)  # the consecutive-probe rule alone (no second probe)
        probes = upstream.probe_requests()
        fallbacks = metric(url, "thinkbrake_probe_fallbacks_total")
        sent, probe_tokens = metric(url, "thinkbrake_probes_total"), metric(url, "thinkbrake_probe_tokens_total")
        latencies = metric(url, "thinkbrake_probe_latency_seconds_count")
    info = response.model_extra["thinkbrake"]
    reasoning = response.choices[0].message.model_extra["reasoning_content"]

    # two probes (at the two "Wait"s) answered 42 with confidence 0.99: the second confirms the first
    assert info["stopped"] and info["reason"] == "probe_confirmed" and info["answer"] == "42"
    assert reasoning.startswith(SOLVE + CONFIRM + "Wait") and TAIL[:40] not in reasoning
    assert info["probes"]["sent"] == len(probes) == 2 and info["probes"]["answered"] == 2
    assert info["probes"]["fallback"] is None and info["probes"]["tokens"] == 2  # "{42}" is one fake token
    assert (sent, probe_tokens, latencies, fallbacks) == (2, 2, 2, 0)
    # probes are not billed as completion tokens: usage is what the main request generated
    assert response.usage.completion_tokens == info["thinking_tokens"] + info["answer_tokens"]

    # the first probe: prompt ids + the thinking up to the first "Wait" + the suffix ids, greedy, with logprobs
    first = probes[0].body
    assert upstream.vocabulary.decode(first["prompt"]) == QUESTION + SOLVE.rstrip("\n") + SUFFIX
    assert (first["max_tokens"], first["temperature"], first["logprobs"], first["stream"]) == (20, 0, 1, False)
    assert first["vllm_xargs"] == {"thinkbrake_probe": 0}


def test_an_upstream_without_token_ids_runs_text_only() -> None:
    with proxied(token_ids=False) as (upstream, url, client):
        response = ask(client)
        fallbacks = metric(url, "thinkbrake_probe_fallbacks_total")
        probes = upstream.probe_requests()
    info = response.model_extra["thinkbrake"]
    assert info["stopped"] and info["reason"] == "confirmed" and info["answer"] == "42"  # fcs_reflection's rule
    assert "token ids" in info["probes"]["fallback"] and info["probes"]["sent"] == 0
    assert probes == [] and fallbacks == 1


def test_an_upstream_that_rejects_token_id_prompts_falls_back_mid_request() -> None:
    with proxied(token_prompts=False) as (upstream, url, client):
        response = ask(client, finalize="answer")  # its continuation would be a token-id prompt too
        fallbacks = metric(url, "thinkbrake_probe_fallbacks_total")
        errors = metric(url, "thinkbrake_probe_errors_total")
        probes = upstream.probe_requests()
    info = response.model_extra["thinkbrake"]
    # the first probe was refused; the text so far went to a text-only controller, which stopped on the text
    assert len(probes) == 1 and probes[0].outcome == "error"
    assert info["probes"]["fallback"] == "the backend rejected a token-id probe request"
    assert (info["probes"]["sent"], info["probes"]["failed"]) == (1, 1)
    assert info["stopped"] and info["reason"] == "confirmed" and info["answer"] == "42"
    assert (fallbacks, errors) == (1, 1)


RECHECKS = "".join(f"Wait, check {n}: 6 * 7 = 42, so the answer is 42.\n\n" for n in range(1, 6))
SETTLE_TRACE = Trace(SOLVE + RECHECKS + TAIL, "The answer is $\\boxed{42}$.")


def test_long_thinking_settles_on_three_agreeing_dense_probes() -> None:
    """``probe_settled`` through the proxy, made visible early: settle probes from token 10, at "Wait"s at least
    8 tokens apart; the wait probes alone can never stop (confidence 1.0 required)."""
    settle_config = {"confidence": 1.0, "sure_confidence": 1.0, "agree_confidence": 1.0, "settle_tokens": 10,
                     "settle_spacing": 8, "settle_agree": 3, "settle_text_window": 2}  # fmt: skip
    with FakeUpstream([SETTLE_TRACE], token_rate=TOKEN_RATE) as upstream:
        with thinkbrake_process(upstream.url) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            response = ask(client, **settle_config)
            probes = upstream.probe_requests()
            with urllib.request.urlopen(f"{url}/metrics", timeout=60) as page:
                exposition = page.read().decode()
    info = response.model_extra["thinkbrake"]
    reasoning = response.choices[0].message.model_extra["reasoning_content"]
    assert info["stopped"] and info["reason"] == "probe_settled" and info["answer"] == "42"
    assert TAIL[:40] not in reasoning
    stops = [line for line in exposition.splitlines() if line.startswith("thinkbrake_early_stops_total{")]
    assert [line.rsplit(" ", 1)[1] for line in stops if 'reason="probe_settled"' in line] == ["1.0"]
    dense = [p.body for p in probes if upstream.vocabulary.decode(p.body["prompt"]).endswith("\\boxed{")]
    # one per "Wait" (each recheck is more than 8 tokens long); the third agreeing one stops (a fourth may have
    # been asked at the next "Wait" before the third answered)
    assert 3 <= len(dense) <= 4
    assert all(body["max_tokens"] == 32 for body in dense)
