"""Answer comparisons that cannot be made at once (the server's, off its event loop) give the same decisions.

A controller whose equality raises ``ComparisonPending`` waits (the update names the pair), and resumes once the
verdict is known; every decision, probe request and count must then be exactly those of a controller whose
equality answers at once. The equality here (:class:`FirstSight`) makes *every* pair wait the first time it is
asked, so each comparison of every policy step goes through the wait. The server side: a comparison runs off the
event loop, and its verdict is recorded for the equality the controllers get.
"""

from __future__ import annotations

import asyncio
import heapq
from pathlib import Path
from typing import Any

import pytest

from controller.answers import canonical
from controller.delimiters import Delimiters
from controller.equality import ComparisonPending
from controller.offline.replay import (
    HOLDOUT,
    RecordedProbes,
    Tokenizers,
    default_tokenizer_root,
    load_traces,
    split_of,
    token_deltas,
    trace_delimiters,
    trace_stream,
)
from controller.policies import PolicyConfig, parse_policy
from controller.probes import ProbeRequest, ProbeResult
from controller.session import ThinkingController, Update
from server.comparisons import Comparisons
from tests.data.written_traces import MATH_TRACES, NON_MATH
from tests.support.slow_compare import NAP, spin_or_compare

IMPLICIT = Delimiters(implicit_start=True)
TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
TEXT_POLICIES = [
    {"policy": "fcs_reflection"},
    {"policy": "consistency", "k": 3},
    {"policy": "first_answer"},
    {"policy": "probe_fcs"},  # without probes: its text-only fallback
    {"policy": "fcs_reflection", "min_thinking_tokens": 200},
]


def key_equal(first: str, second: str) -> bool:
    return canonical(first) == canonical(second)


class FirstSight:
    """An equality that cannot tell any pair the first time it is asked (as the server's cannot tell a pair only
    Math-Verify decides); :meth:`release` makes the pair known."""

    def __init__(self) -> None:
        self.known: set[tuple[str, str]] = set()
        self.waits = 0

    def __call__(self, first: str, second: str) -> bool:
        if (first, second) not in self.known:
            raise ComparisonPending(first, second)
        return key_equal(first, second)

    def release(self, pending: ComparisonPending) -> None:
        self.known.add((pending.first, pending.second))
        self.waits += 1


def settled(control: ThinkingController, update: Update, equal: Any) -> Update:
    """``update`` with what the controller adds once each comparison it waits for is known (as the server does)."""
    while update.compare is not None:
        assert isinstance(equal, FirstSight)
        with pytest.raises(RuntimeError):
            control.feed("x", 1)  # a waiting controller takes nothing else
        equal.release(update.compare)
        more = control.resume()
        update.compare, update.decision = more.compare, update.decision or more.decision
        update.probes += more.probes
    return update


class Answers:
    """Probe answers for written traces: the trace's answer, confident at every other probe."""

    def __init__(self, answer: str) -> None:
        self.answer_text = answer
        self.missing = 0

    def answer(self, request: ProbeRequest) -> ProbeResult:
        confidence = 0.9995 if request.id % 2 == 0 else 0.95
        return ProbeResult(request.id, self.answer_text, confidence, 5)


def drive(
    config: PolicyConfig,
    deltas: list[str],
    equal: Any,
    probes: Any = None,
    delimiters: Delimiters = IMPLICIT,
    question: str | None = None,
) -> tuple[list[Any], tuple[Any, ...]]:
    """Stream ``deltas`` as :func:`controller.offline.replay.run_controller` does (probe answers arrive
    ``out_tokens + 1`` tokens after their request); every step's decision and probe requests, and the counts."""
    control = ThinkingController(config, delimiters, equal, probes=probes is not None, question=question)
    steps: list[Any] = []
    pending: list[tuple[int, int, ProbeResult]] = []
    for position, delta in enumerate(deltas, 1):
        update = settled(control, control.feed(delta, 1), equal)
        steps.append((position, update.decision, [request.id for request in update.probes]))
        if probes is not None:
            for request in update.probes:
                result = probes.answer(request)
                heapq.heappush(pending, (position + result.out_tokens + 1, request.id, result))
        if update.decision is not None:
            break
        while pending and pending[0][0] <= position:
            answered = settled(control, control.probe_result(heapq.heappop(pending)[2]), equal)
            steps.append((position, answered.decision, [request.id for request in answered.probes]))
            if answered.decision is not None:
                break
        if control.decision is not None:
            break
    else:
        steps.append(("end", control.finish().events))
    counts = (
        control.decision, control.kept_tokens, control.thinking_tokens, control.answer_tokens, control.probe_tokens,
        control.probes_sent, control.solutions, control.error, control.final_answer(),
    )  # fmt: skip
    return steps, counts


@pytest.mark.parametrize("policy", TEXT_POLICIES, ids=lambda policy: str(policy))
def test_text_policies_decide_the_same_when_every_comparison_waits(policy: dict[str, Any]) -> None:
    waited = 0
    for trace in [text for text, _stop, _answer in MATH_TRACES] + NON_MATH:
        deltas = list(trace + "\n</think>\n\nDone.")
        first = FirstSight()
        assert drive(parse_policy(policy), deltas, first) == drive(parse_policy(policy), deltas, key_equal)
        waited += first.waits
    if policy["policy"] == "fcs_reflection":  # (these traces give the others little or nothing to compare)
        assert waited > 0


def test_probe_fcs_decides_the_same_when_every_comparison_waits() -> None:
    waited = 0
    for trace, _stop, answer in MATH_TRACES:
        deltas = list(trace)
        for config in ({"policy": "probe_fcs"}, {"policy": "probe_fcs", "solution_agree": 1, "agree_confidence": 0.99}):
            first = FirstSight()
            deferred = drive(parse_policy(config), deltas, first, Answers(answer))
            assert deferred == drive(parse_policy(config), deltas, key_equal, Answers(answer))
            waited += first.waits
    assert waited > 0


def test_going_text_only_decides_the_same_when_its_comparisons_wait() -> None:
    for trace, _stop, _answer in MATH_TRACES:
        decisions = []
        for equal in (key_equal, FirstSight()):
            control = ThinkingController(parse_policy({"policy": "probe_fcs"}), IMPLICIT, equal)
            for char in trace:
                assert control.feed(char, 1).compare is None  # probe_fcs compares only when probes answer
            update = settled(control, control.go_text_only(), equal)
            decisions.append((update.decision, control.decision, control.kept_tokens, control.final_answer()))
        assert decisions[0] == decisions[1]
        assert decisions[0][0] is not None  # the text-only rule stops these traces


@pytest.mark.replay
@pytest.mark.parametrize(
    ("file", "policy"),
    [("dev-probes.jsonl.gz", {"policy": "probe_fcs"}), ("dev-skyt1.jsonl.gz", {"policy": "fcs_reflection"})],
)
def test_recorded_traces_decide_the_same_when_every_comparison_waits(file: str, policy: dict[str, Any]) -> None:
    path = TRACES / file
    if not path.exists():
        pytest.skip(f"{path} is not here")
    tokenizers = Tokenizers(default_tokenizer_root(path))
    traces = [trace for trace in load_traces([path]) if split_of(trace) == HOLDOUT][:40]
    waited = 0
    for trace in traces:
        deltas = token_deltas(tokenizers.get(trace.get("tokenizer", "")), trace_stream(trace))
        question, delimiters = trace.get("question") or None, trace_delimiters(trace)
        probing = file.startswith("dev-probes")
        first = FirstSight()
        runs = [
            drive(parse_policy(policy), deltas, equal, RecordedProbes(trace) if probing else None, delimiters, question)
            for equal in (key_equal, first)
        ]
        assert runs[0] == runs[1], trace.get("id")
        waited += first.waits
    assert waited > 0


async def test_the_server_compares_off_the_event_loop_and_records_the_verdict() -> None:
    """A comparison that takes seconds (a nap in its worker) leaves the event loop running; once it returns, the
    equality the controllers get answers that pair at once."""
    comparisons = Comparisons(timeout_seconds=60.0, verify=spin_or_compare)
    first, second = f"{NAP}y+1", f"1+y{NAP}"  # different keys: only the worker can tell (equal characters)
    try:
        with pytest.raises(ComparisonPending):
            comparisons.equal(first, second)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        assert await comparisons.compare(first, second) is True
        ticker.cancel()
        assert ticks > 0  # the loop ran while the worker napped
        assert comparisons.equal(first, second) is True
        assert comparisons.equal(second, first) is True
        assert await comparisons.compare("2", "2.0") is True  # keys decide without a worker
    finally:
        comparisons.close()
