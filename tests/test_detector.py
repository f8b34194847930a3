"""The solution detector and the policies: same events however the stream is split, stops where expected."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from controller.delimiters import Delimiters
from controller.detector import ANSWER, LOOP, REFLECTION, SOLUTION, SolutionDetector
from controller.policies import POLICIES, parse_policy
from controller.session import ThinkingController
from controller.verify import AnswerComparer
from tests.data.written_traces import MATH_TRACES, NON_MATH
from tests.splits import every_single_split, per_character, random_splits

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV_TRACES = SHARED / "data" / "traces" / "dev-skyt1.jsonl.gz"
IMPLICIT = Delimiters(implicit_start=True)
COMPARER = AnswerComparer()
ANSWER_POLICIES = [name for name in POLICIES if name != "budget" and parse_policy({"policy": name}).stops_on_answers]


def signature(deltas: list[str]) -> list[tuple[str, int, int, str | None]]:
    """Events of a split stream, without token counts (which depend on the split)."""
    detector = SolutionDetector()
    events = [event for delta in deltas for event in detector.feed(delta, 1)] + detector.flush()
    return [(event.kind, event.offset, event.solution, event.key) for event in events]


def stop_offset(deltas: list[str], policy: str = "fcs_reflection") -> tuple[int, str | None] | None:
    controller = ThinkingController(parse_policy({"policy": policy}), IMPLICIT, COMPARER)
    for delta in deltas:
        update = controller.feed(delta, 1)
        if update.decision is not None:
            return update.decision.offset, update.decision.key
    controller.finish()
    return None


def load_dev(count: int, seed: int) -> list[dict[str, str]]:
    if not DEV_TRACES.exists():
        pytest.skip(f"dev traces not found at {DEV_TRACES}")
    with gzip.open(DEV_TRACES, "rt") as handle:
        traces = [json.loads(line) for line in handle]
    closed = [trace for trace in traces if trace["closed"] and len(trace["thinking"]) < 12000]
    with_solutions = [trace for trace in closed if any(k == SOLUTION for k, *_ in signature([trace["thinking"]]))]
    return random.Random(seed).sample(with_solutions, count)


def token_split(text: str) -> list[str]:
    from controller.offline.replay import Tokenizers, token_deltas

    return token_deltas(Tokenizers(SHARED / "tokenizers").get("qwen2.5"), text)


@pytest.mark.parametrize("trace,stop_after,answer", MATH_TRACES)
def test_written_traces_stop_after_the_confirming_reflection(trace: str, stop_after: str, answer: str) -> None:
    stop = stop_offset(list(trace))
    assert stop is not None
    offset, key = stop
    expected_end = trace.index(stop_after) + len(stop_after)
    assert key == answer
    # the stop comes right after the confirming sentence: at most the next sentence has been read
    assert expected_end <= offset <= trace.index("\n", expected_end + 1) + 1
    assert stop_offset(list(trace), "first_answer") is not None


@pytest.mark.parametrize("trace,stop_after,answer", MATH_TRACES)
def test_every_single_split_point_gives_the_same_events_and_stop(trace: str, stop_after: str, answer: str) -> None:
    whole = signature([trace])
    whole_stop = stop_offset([trace])
    kinds = {kind for kind, *_ in whole}
    assert {ANSWER, REFLECTION, SOLUTION} <= kinds
    for deltas in every_single_split(trace):
        assert signature(deltas) == whole
    for deltas in (per_character(trace), token_split(trace), *(random_splits(trace, seed) for seed in range(10))):
        assert signature(deltas) == whole
        assert stop_offset(deltas) == stop_offset(per_character(trace))
    assert whole_stop is not None


def test_real_traces_give_the_same_events_and_stops_for_any_split() -> None:
    for trace in load_dev(6, seed=3):
        text = trace["thinking"]
        reference = signature(per_character(text))
        splits = [[text], token_split(text), *(random_splits(text, seed, pieces=200) for seed in range(3))]
        for deltas in splits:
            assert signature(deltas) == reference, trace["id"]
        for policy in ANSWER_POLICIES:
            expected = stop_offset(per_character(text), policy)
            for deltas in splits[1:]:
                assert stop_offset(deltas, policy) == expected, (trace["id"], policy)


@pytest.mark.parametrize("text", NON_MATH)
@pytest.mark.parametrize("policy", ANSWER_POLICIES)
def test_no_false_stops_on_thinking_without_answers(text: str, policy: str) -> None:
    for deltas in ([text], token_split(text)):
        assert stop_offset(deltas, policy) is None


def test_revised_answer_is_not_confirmed_by_the_rejected_one() -> None:
    trace = MATH_TRACES[1][0]
    detector = SolutionDetector()
    events = detector.feed(trace, 1) + detector.flush()
    solutions = [event.key for event in events if event.kind == SOLUTION]
    assert solutions[0] == "2"  # "So he has 7 apples left." was rejected by "Wait, no, ..."
    assert "7" not in solutions


def test_a_loop_is_detected_once_and_stops_answer_policies() -> None:
    looping = (
        "Let me set up the equation again. " + "Alternatively, perhaps I can consider the real part to be zero. " * 120
    )
    detector = SolutionDetector(loop_chars=2000)
    events = detector.feed(looping, 1) + detector.flush()
    assert [event.kind for event in events].count(LOOP) == 1
    assert stop_offset([looping], "fcs_reflection") is not None
    assert stop_offset([looping], "off") is None


def test_work_per_delta_is_bounded_by_the_window() -> None:
    detector = SolutionDetector(max_sentence_chars=500)
    detector.feed("x" * 10_000, 1)
    assert len(detector._buffer) <= 500


# a conclusion cut by a line break at an operator (the first line from a Sky-T1 dev trace, aime24/18)
CUT_AT_OPERATOR = (
    "So, t = 3 (1 - t) ⇒ t = 3 - 3 t ⇒ t + 3 t = 3 ⇒ 4 t = 3 ⇒ t =\n3/4.\n"
    "Wait, let me check: 3(1 - 3/4) = 3/4.\n"
    "So the total is 30.00 -\n12.50 = 17.50.\n"
    "Hmm, that is the change.\n"
)


def test_an_expression_cut_at_an_operator_is_read_with_its_next_line() -> None:
    whole = signature([CUT_AT_OPERATOR])
    assert [key for kind, _, _, key in whole if kind == ANSWER] == ["3/4", "35/2"]
    for deltas in every_single_split(CUT_AT_OPERATOR):
        assert signature(deltas) == whole
