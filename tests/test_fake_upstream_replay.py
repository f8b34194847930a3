"""The fake upstream replays ``dev-probes``: a probe is answered with the model's recorded probe at that position.

Probe prompts are built as thinkbrake builds them (prompt ids + the generated ids before the trigger + the suffix
ids from ``/tokenize``) and read with thinkbrake's own :func:`controller.probes.read_probe`, so what the policy
sees is the recorded answer and confidence.
"""

from __future__ import annotations

import json
import math
import urllib.request

import pytest

from controller.probes import DENSE_PROBE, WAIT_PROBE, read_probe
from tests.support.dev_traces import DEV_PROBES
from tests.support.fake_upstream import FakeUpstream, Trace, load_traces

PROMPT = "Solve the problem."


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    if not DEV_PROBES.exists():
        pytest.skip(f"dev traces not found at {DEV_PROBES}")
    return load_traces(str(DEV_PROBES), 8, spread=True)


def probe_prompt(upstream: FakeUpstream, trace: Trace, offset: int, suffix: str) -> list[int]:
    """The ids of a probe whose prefix ends before the word piece that holds character ``offset``."""
    vocabulary, end = upstream.vocabulary, 0
    pieces = vocabulary.pieces(trace.thinking)
    kept = []
    for piece in pieces:
        if end + len(piece) > offset:
            break
        kept.append(piece)
        end += len(piece)
    return vocabulary.encode(PROMPT) + vocabulary.encode("".join(kept)) + vocabulary.encode(suffix)


def test_spread_covers_both_models(traces: list[Trace]) -> None:
    assert len(traces) == 8 and all(trace.probes and trace.thinking for trace in traces)
    assert sum(bool(trace.wait_probes) for trace in traces) >= 6
    assert all(list(trace.wait_probes) == sorted(trace.wait_probes) for trace in traces)


def test_wait_probes_answer_the_recorded_answer_and_confidence(traces: list[Trace]) -> None:
    upstream = FakeUpstream(traces)
    checked = 0
    for trace in traces:
        for offset, answer, confidence, out_tokens in trace.wait_probes[:5]:
            prompt = upstream.vocabulary.decode(probe_prompt(upstream, trace, offset, WAIT_PROBE.suffix))
            recorded = upstream._recorded_answer(prompt)
            assert recorded is not None
            text, logprob, tokens, source = recorded
            result = read_probe(WAIT_PROBE, 0, text, [logprob] * len(upstream.vocabulary.pieces(text)))
            assert (result.answer, source, tokens) == (answer.strip(), "wait_probes", out_tokens)
            assert result.confidence == pytest.approx(confidence, abs=1e-6)
            checked += 1
    assert checked >= 20


def test_dense_probes_answer_the_recorded_answer(traces: list[Trace]) -> None:
    upstream = FakeUpstream(traces)
    trace = traces[0]
    for offset, answer, certain, _ in trace.probes[:10]:
        # the dense records' offsets fall anywhere in a word: the fake's prefix ends after the piece that holds it
        ahead = len(upstream.vocabulary.pieces(trace.thinking[: offset + 1]))
        end = sum(len(piece) for piece in upstream.vocabulary.pieces(trace.thinking)[:ahead])
        prompt = upstream.vocabulary.decode(probe_prompt(upstream, trace, end, DENSE_PROBE.suffix))
        recorded = upstream._recorded_answer(prompt)
        assert recorded is not None
        result = read_probe(DENSE_PROBE, 0, recorded[0], [recorded[1]])
        assert result.answer == answer.strip() and result.confidence == (1.0 if certain else 0.0)


def test_before_any_record_and_unknown_thinking(traces: list[Trace]) -> None:
    upstream = FakeUpstream(traces)
    trace = traces[0]
    first = min(trace.probes[0][0], *(record[0] for record in trace.wait_probes[:1]))
    assert first > 100  # the first record is a few dozen tokens in; the thinking's first 40 characters name the trace
    early = upstream.vocabulary.decode(probe_prompt(upstream, trace, 80, WAIT_PROBE.suffix))
    text, logprob, _, source = upstream._recorded_answer(early) or ("", 0.0, 0, "")
    assert (text, source) == ("{}", "no_record") and math.exp(logprob) < 1e-6
    assert upstream._recorded_answer(PROMPT + "Something else entirely." + WAIT_PROBE.suffix) is None


def test_probe_over_http(traces: list[Trace]) -> None:
    trace = next(trace for trace in traces if trace.wait_probes)
    offset, answer, confidence, out_tokens = trace.wait_probes[0]
    with FakeUpstream(traces) as upstream:
        body = {"prompt": probe_prompt(upstream, trace, offset, WAIT_PROBE.suffix), "max_tokens": 20, "logprobs": 1}
        request = urllib.request.Request(
            f"{upstream.url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.loads(response.read())
        with urllib.request.urlopen(f"{upstream.url}/fake/stats", timeout=10) as response:
            stats = json.loads(response.read())
    choice = data["choices"][0]
    result = read_probe(WAIT_PROBE, 0, choice["text"], choice["logprobs"]["token_logprobs"])
    assert result.answer == answer.strip() and result.confidence == pytest.approx(confidence, abs=1e-6)
    assert data["usage"]["completion_tokens"] == out_tokens
    assert stats == {"probe_answers": {"wait_probes": 1}}
