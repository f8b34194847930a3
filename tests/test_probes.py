"""Answer probes in the controller: the "wait" trigger, the probe API, the probe_fcs rule, the fallback, replay."""

from __future__ import annotations

import pytest

from controller.delimiters import Delimiters
from controller.offline.replay import HOLDOUT, TUNE, RecordedProbes, run_controller, split_of
from controller.policies import PolicyError, ProbeFcsConfig, parse_policy
from controller.probe_policy import plain_answer
from controller.probes import SOLUTION, WAIT, ProbeRequest, ProbeResult, WaitScanner
from controller.session import ThinkingController
from controller.verify import AnswerComparer
from tests.splits import every_single_split, random_splits

IMPLICIT = Delimiters(implicit_start=True)
COMPARER = AnswerComparer()
TEXT = "So x is 12.\n\nWait, let me check: 3*4 = 12. But wait, is it? Yes.\n\nWait. Await waiting. wait"


def wait_offsets(text: str) -> list[int]:
    return [index for index in range(len(text)) if text[index : index + 4].lower() == "wait"
            and (index == 0 or not text[index - 1].isalpha())
            and (index + 4 == len(text) or not text[index + 4].isalpha())]  # fmt: skip


def scan(pieces: list[str]) -> list[tuple[int, int]]:
    scanner, found, tokens = WaitScanner(), [], 0
    for piece in pieces:
        found += scanner.feed(piece, tokens)
        tokens += 1
    return found + scanner.flush(tokens)


def test_wait_scanner_finds_whole_words_at_the_same_offsets_for_every_split() -> None:
    expected = wait_offsets(TEXT)
    assert len(expected) == 4  # "Wait," "wait," "Wait." and the final "wait"; not "Await" or "waiting"
    for pieces in every_single_split(TEXT):
        assert [offset for _, offset in scan(pieces)] == expected
    for seed in range(20):
        assert [offset for _, offset in scan(random_splits(TEXT, seed))] == expected
    per_char = scan(list(TEXT))
    assert [tokens for tokens, _ in per_char] == expected  # one token per character: the tokens before the "w"


def test_wait_scanner_reports_what_its_pattern_matches_with_the_tokens_before_each_trigger() -> None:
    """The scanner skips the pattern for deltas that cannot hold a match; what it reports must not change. The text
    has the cases a quick check could miss: the pattern's case-insensitive "i" also matches dotted and dotless i."""
    from controller.probes import _WAIT_WORD

    text = "Way to go. WAİT, waıt: WAIT!\nwa it. Wait? toWait wait"
    for pieces in [*every_single_split(text), *(random_splits(text, seed) for seed in range(30)), list(text)]:
        starts = [sum(len(piece) for piece in pieces[:index]) for index in range(len(pieces) + 1)]
        expected = [
            (max(index for index, start in enumerate(starts) if start <= match.start()), match.start())
            for match in _WAIT_WORD.finditer(text)
        ]
        assert len(expected) == 5
        assert scan(pieces) == expected, pieces


def controller(config: dict[str, object], probes: bool = True) -> ThinkingController:
    return ThinkingController(parse_policy(config), IMPLICIT, COMPARER, probes=probes)


def feed_text(control: ThinkingController, text: str) -> list:
    requests = []
    for char in text:
        update = control.feed(char, 1)
        requests += update.probes
    return requests


def settle(control: ThinkingController, result: ProbeResult) -> object:
    """The decision a probe result leads to once the model goes on thinking (a stop decided while the thinking
    ends in whitespace is held until the next text shows the model is not closing its thinking)."""
    decision = control.probe_result(result).decision
    if decision is None and control.pending is not None:
        decision = control.feed("H", 1).decision
    return decision


SOLVE = "Three times four is 12. So the answer is 12.\n\n"
CHECK = "Wait, let me double-check: 3 times 4 is 12.\n\nSo the answer is 12.\n\n"


CONSECUTIVE_ONLY = {"policy": "probe_fcs", "sure_confidence": 1.0, "agree_confidence": 1.0}


def test_probe_fcs_asks_at_each_wait_and_stops_when_two_confident_probes_agree() -> None:
    control = controller(CONSECUTIVE_ONLY)
    assert control.config.uses_probes
    requests = feed_text(control, SOLVE + CHECK)
    assert [r.trigger for r in requests] == [WAIT] and requests[0].offset == len(SOLVE)
    assert requests[0].tokens == len(SOLVE)  # prefix = the tokens before "Wait"
    assert control.decision is None  # the text alone never stops probe_fcs
    assert control.probe_result(ProbeResult(requests[0].id, "12", 0.9995, 5)).decision is None
    more = feed_text(control, CHECK)
    assert len(more) == 1 and control.probes_sent == 2
    assert control.probe_result(ProbeResult(99, "12", 1.0, 5)).decision is None  # unknown id: ignored
    held = control.probe_result(ProbeResult(more[0].id, "12", 0.92, 4))
    # the thinking so far ends in whitespace, which may begin the end of thinking: held until the model goes on
    assert held.decision is None and control.pending is not None
    update = control.feed("H", 1)
    decision = update.decision
    assert decision is not None and decision.answer == "12" and decision.reason == "probe_confirmed"
    assert update.past_stop and control.kept_tokens == len(SOLVE + CHECK + CHECK)  # applies where it arrived
    assert control.probe_tokens == 9 and control.decision is decision
    assert control.probe_result(ProbeResult(more[0].id, "12", 0.92, 4)).decision is None  # repeated: ignored


def test_probe_fcs_ignores_low_confidence_disagreement_and_bad_forms() -> None:
    control = controller(CONSECUTIVE_ONLY)
    first = feed_text(control, SOLVE + CHECK)
    assert control.probe_result(ProbeResult(first[0].id, "12", 0.5, 5)).decision is None  # not confident
    second = feed_text(control, CHECK)
    assert control.probe_result(ProbeResult(second[0].id, "12", 0.9999, 5)).decision is None
    third = feed_text(control, CHECK)
    assert control.probe_result(ProbeResult(third[0].id, "13", 0.9999, 5)).decision is None  # disagrees
    fourth = feed_text(control, CHECK)
    assert control.probe_result(ProbeResult(fourth[0].id, "x = 13", 0.9999, 5)).decision is None  # not final
    fifth = feed_text(control, CHECK)
    assert control.probe_result(ProbeResult(fifth[0].id, "13", 0.95, 5)).decision is None  # after a bad form
    sixth = feed_text(control, CHECK)
    assert control.probe_result(ProbeResult(sixth[0].id, "13", 0.95, 5)).decision is None  # neither >= 0.999
    assert not plain_answer("x = 13") and not plain_answer("?") and plain_answer("\\frac{1}{2}")
    assert control.decision is None and control.pending is None


def test_the_default_rule_stops_on_one_sure_probe_the_text_or_a_second_probe_confirms() -> None:
    config = parse_policy({"policy": "probe_fcs"})
    assert isinstance(config, ProbeFcsConfig)
    assert (config.confidence, config.confirm_confidence) == (0.9, 0.999)
    assert (config.sure_confidence, config.text_window, config.agree_confidence) == (0.999, 3, 0.999)
    written = controller({"policy": "probe_fcs"})
    requests = feed_text(written, SOLVE + CHECK)
    assert written.probe_result(ProbeResult(requests[0].id, "12", 0.9995, 5)).decision is None  # held: "\n\n"
    decision = written.feed("H", 1).decision  # the model goes on thinking: the held stop is made
    assert decision is not None and decision.reason == "probe_sure"
    unwritten = controller({"policy": "probe_fcs"})
    requests = feed_text(unwritten, "Let me think about 3 times 4.\n\n" + CHECK)
    assert unwritten.probe_result(ProbeResult(requests[0].id, "12", 0.9985, 5)).decision is None
    assert feed_text(unwritten, "\n\n") == []  # below 0.999: no second probe
    assert unwritten.probe_result(ProbeResult(feed_text(unwritten, CHECK)[0].id, "12", 0.9995, 5)).decision is None
    assert unwritten.pending is not None and unwritten.feed("H", 1).decision  # held until the model goes on
    assert unwritten.decision is not None and unwritten.decision.reason == "probe_confirmed"


def test_a_probe_stop_reports_the_solutions_the_thinking_closed_not_the_probes_asked() -> None:
    control = controller({"policy": "probe_fcs"})
    feed_text(control, "Let me think about 3 times 4.\n\n")
    for _ in range(3):  # reflections without an answer: a probe each, no solution
        requests = feed_text(control, "Wait, let me think about 3 times 4 again.\n\n")
        assert control.probe_result(ProbeResult(requests[0].id, "?", 0.2, 5)).decision is None
    requests = feed_text(control, SOLVE + CHECK)
    assert settle(control, ProbeResult(requests[0].id, "12", 0.9995, 5)) is not None
    assert control.decision is not None and control.decision.reason == "probe_sure"
    assert control.probes_sent == 4 and control.solutions == 1 and control.decision.solutions == 1


def test_a_counted_probe_stops_once_two_solutions_of_the_thinking_reached_its_answer() -> None:
    def run(config: dict[str, object], answers: list[tuple[str, float]]) -> object:
        control = controller({"policy": "probe_fcs", "sure_confidence": 1.0, "agree_confidence": 1.0, **config})
        texts = [SOLVE + CHECK] + [CHECK] * (len(answers) - 1)
        decision = None
        for text, (answer, confidence) in zip(texts, answers, strict=True):
            (request,) = feed_text(control, text)
            assert decision is None
            decision = settle(control, ProbeResult(request.id, answer, confidence, 5))
        return decision

    # the first probe sees no closed solution, the second one (SOLVE), the third two (SOLVE and a CHECK)
    assert run({}, [("12", 0.95), ("12", 0.95)]) is None
    stop = run({}, [("12", 0.95), ("12", 0.95), ("12", 0.95)])
    assert stop is not None and stop.reason == "probe_solutions" and stop.answer == "12"
    assert run({}, [("12", 0.95), ("12", 0.95), ("12", 0.5)]) is None  # not counted: below `confidence`
    assert run({}, [("12", 0.95), ("12", 0.95), ("13", 0.95)]) is None  # the solutions reached another answer
    assert run({"solution_agree": 0}, [("12", 0.95)] * 3) is None
    assert run({"solution_agree": 3}, [("12", 0.95)] * 3) is None
    stop = run({"solution_agree": 3}, [("12", 0.95)] * 4)
    assert stop is not None and stop.reason == "probe_solutions"
    with pytest.raises(PolicyError, match="solution_agree"):
        parse_policy({"policy": "probe_fcs", "solution_agree": -1})


def test_one_sure_probe_stops_when_the_thinking_wrote_the_same_answer() -> None:
    control = controller({"policy": "probe_fcs", "sure_confidence": 0.999})
    requests = feed_text(control, SOLVE + CHECK)
    assert control.probe_result(ProbeResult(requests[0].id, "12", 0.9995, 5)).decision is None  # held: "\n\n"
    decision = control.feed("H", 1).decision  # the model goes on thinking: the held stop is made
    assert decision is not None and decision.reason == "probe_sure" and decision.answer == "12"
    other = controller({"policy": "probe_fcs", "sure_confidence": 0.999, "agree_confidence": 1.0})
    requests = feed_text(other, SOLVE + CHECK)
    assert settle(other, ProbeResult(requests[0].id, "7", 0.9999, 5)) is None  # text never said 7


def test_the_text_window_only_counts_recent_answers_written_before_the_probe() -> None:
    other_first = "Two plus two is 4. So the answer is 4.\n\n" + SOLVE
    narrow = controller({"policy": "probe_fcs", "sure_confidence": 0.99, "text_window": 1})
    requests = feed_text(narrow, other_first + CHECK)
    assert settle(narrow, ProbeResult(requests[0].id, "4", 0.9999, 5)) is None  # not the latest
    wide = controller({"policy": "probe_fcs", "sure_confidence": 0.99, "text_window": 3})
    requests = feed_text(wide, other_first + CHECK)
    decision = settle(wide, ProbeResult(requests[0].id, "4", 0.9999, 5))
    assert decision is not None and decision.reason == "probe_sure"  # type: ignore[attr-defined]
    late = controller({"policy": "probe_fcs", "sure_confidence": 0.99})
    requests = feed_text(late, SOLVE + CHECK)
    feed_text(late, "So the answer is 7.\n\n")  # written after the probe's prefix: not what the probe saw
    assert settle(late, ProbeResult(requests[0].id, "7", 0.9999, 5)) is None


def test_a_confident_probe_is_checked_by_a_second_probe_on_the_same_prefix() -> None:
    def ask(answer: str, confidence: float) -> tuple[ThinkingController, list]:
        control = controller({"policy": "probe_fcs", "agree_confidence": 0.99, "sure_confidence": 1.0})
        first = feed_text(control, "Let me think about 3 times 4.\n\n" + CHECK)
        assert control.probe_result(ProbeResult(first[0].id, answer, confidence, 5)).decision is None
        return control, first

    control, first = ask("12", 0.995)
    second = feed_text(control, "x")  # the check goes out with the next delta
    assert [(r.trigger, r.tokens, r.offset) for r in second] == [(SOLUTION, first[0].tokens, first[0].offset)]
    assert control.probes_sent == 2
    decision = control.probe_result(ProbeResult(second[0].id, "12", 1.0, 6)).decision
    assert decision is not None and decision.reason == "probe_agreed" and decision.answer == "12"
    assert control.probe_tokens == 11

    for answer, confidence in [("13", 1.0), ("12", 0.0)]:  # disagrees / the dense probe hesitated
        control, _ = ask("12", 0.995)
        check = feed_text(control, "x")
        assert control.probe_result(ProbeResult(check[0].id, answer, confidence, 6)).decision is None
        assert control.decision is None and control.pending is None

    control, _ = ask("12", 0.98)  # below agree_confidence: no second probe
    assert feed_text(control, "x") == []
    capped = controller({"policy": "probe_fcs", "agree_confidence": 0.99, "max_probes": 1})
    first = feed_text(capped, SOLVE + CHECK)
    capped.probe_result(ProbeResult(first[0].id, "5", 0.995, 5))
    assert feed_text(capped, "x") == [] and capped.probes_sent == 1  # the cap counts the second probe too


def test_max_probes_caps_the_requests() -> None:
    control = controller({"policy": "probe_fcs", "max_probes": 2})
    assert len(feed_text(control, SOLVE + CHECK * 4)) == 2
    assert control.probes_sent == 2


def test_without_probes_probe_fcs_runs_text_only_fcs_reflection() -> None:
    control = controller({"policy": "probe_fcs"}, probes=False)
    assert control.probe_fallback is not None
    requests = feed_text(control, SOLVE + CHECK + "H")  # "H": the model goes on after the confirming sentence
    assert requests == [] and control.probes_sent == 0
    assert control.decision is not None and control.decision.reason == "confirmed"
    assert controller({"policy": "fcs_reflection"}).probe_fallback is None


def test_float_arguments_parse_and_are_checked() -> None:
    config = parse_policy({"policy": "probe_fcs", "confidence": "0.9", "max_probes": 4})
    assert isinstance(config, ProbeFcsConfig) and config.confidence == 0.9 and config.max_probes == 4
    for data, field in [({"confidence": 2}, "confidence"), ({"confidence": "x"}, "confidence"),
                        ({"max_probes": -1}, "max_probes"), ({"sure_confidence": True}, "sure_confidence")]:  # fmt: skip
        with pytest.raises(PolicyError) as error:
            parse_policy({"policy": "probe_fcs", **data})
        assert error.value.field == field


def test_replay_answers_from_the_recording_with_latency() -> None:
    text = SOLVE + CHECK + CHECK + "More text that goes on and on. " * 10
    first, second = text.index("Wait"), text.index("Wait", text.index("Wait") + 1)
    trace = {
        "id": "math500/7/m/seed1",
        "probes": [[10, 10, "3", True, 4]],
        "wait_probes": [[first, first, "12", 0.9991, 5], [second, second, "12", 0.98, 6]],
    }
    probes = RecordedProbes(trace)
    control, probe_tokens = run_controller(parse_policy(CONSECUTIVE_ONLY), list(text), COMPARER, probes)
    decision = control.decision
    assert decision is not None and decision.answer == "12"
    asked_at = second + len("Wait,")  # the trigger is certain once the character after the word arrives
    assert decision.tokens == asked_at + 6 + 1 and probe_tokens == 11 and probes.missing == 0
    silent, _ = run_controller(parse_policy({"policy": "probe_fcs"}), list(text), COMPARER, None)
    assert silent.probe_fallback is not None


def test_split_keeps_every_model_and_seed_of_a_problem_together() -> None:
    sides = {split_of({"id": f"math500/{q}/{m}/seed{s}"}) for q in [3] for m in ["a", "b"] for s in [1, 2]}
    assert len(sides) == 1
    halves = [split_of({"id": f"math500/{q}/a/seed1"}) for q in range(400)]
    assert 150 < halves.count(TUNE) < 250 and halves.count(HOLDOUT) == 400 - halves.count(TUNE)


def test_replay_answers_the_second_probe_from_the_dense_recording() -> None:
    text = "Let me think about 3 times 4.\n\n" + CHECK + "More text that goes on and on. " * 10
    wait = text.index("Wait")
    trace = {
        "id": "math500/7/m/seed1",
        "probes": [[5, 5, "3", True, 4], [wait - 2, wait - 2, "12", True, 6], [wait + 9, wait + 9, "99", True, 6]],
        "wait_probes": [[wait, wait, "12", 0.9995, 5]],
    }
    config = parse_policy({"policy": "probe_fcs", "sure_confidence": 1.0})
    control, probe_tokens = run_controller(config, list(text), COMPARER, RecordedProbes(trace))
    decision = control.decision
    assert decision is not None and decision.reason == "probe_agreed" and decision.answer == "12"
    asked_at = wait + len("Wait,")
    assert decision.tokens == asked_at + 5 + 1 + 1 + 6 + 1  # the check goes out one token after the answer
    assert probe_tokens == 11 and control.probes_sent == 2


# settle probes, made visible on short text: from token 100 on, one per "Wait" at least 60 tokens apart
SETTLE = {
    "policy": "probe_fcs",
    "confidence": 1.0,  # wait probes never count here: only the settle rule can stop
    "sure_confidence": 1.0,
    "agree_confidence": 1.0,
    "settle_tokens": 100,
    "settle_spacing": 60,
    "settle_agree": 3,
    "settle_text_window": 2,
    "max_settle_probes": 4,
}


def settle_requests(control: ThinkingController, text: str) -> list[ProbeRequest]:
    return [request for request in feed_text(control, text) if request.trigger == SOLUTION]


def test_long_thinking_stops_when_settle_probes_agree_on_what_the_thinking_wrote() -> None:
    control = controller(SETTLE)
    assert settle_requests(control, SOLVE + CHECK) == []  # before settle_tokens: wait probes only
    asked = []
    for _ in range(3):
        new = settle_requests(control, CHECK)
        assert len(new) == 1 and new[0].tokens >= 100
        asked += new
    assert [b.tokens - a.tokens for a, b in zip(asked, asked[1:], strict=False)] == [len(CHECK)] * 2  # >= 60 apart
    assert settle(control, ProbeResult(asked[0].id, "12", 1.0, 3)) is None
    assert settle(control, ProbeResult(asked[1].id, "12", 1.0, 3)) is None
    decision = settle(control, ProbeResult(asked[2].id, "12", 1.0, 3))
    assert decision is not None and (decision.reason, decision.answer) == ("probe_settled", "12")


def test_settle_probes_need_agreement_certainty_the_written_answer_and_a_cap() -> None:
    for answers in (
        [("12", 1.0), ("12", 0.0), ("12", 1.0)],  # one hesitated
        [("12", 1.0), ("13", 1.0), ("12", 1.0)],  # one disagrees
        [("13", 1.0), ("13", 1.0), ("13", 1.0)],  # agree, but the thinking wrote 12
    ):
        control = controller(SETTLE)
        feed_text(control, SOLVE + CHECK)
        asked = [settle_requests(control, CHECK)[0] for _ in range(3)]
        for request, (answer, confidence) in zip(asked, answers, strict=True):
            assert settle(control, ProbeResult(request.id, answer, confidence, 3)) is None
    capped = controller({**SETTLE, "max_settle_probes": 2})
    assert len(settle_requests(capped, SOLVE + CHECK * 6)) == 2
    off = controller({**SETTLE, "settle_agree": 0})
    assert settle_requests(off, SOLVE + CHECK * 6) == []
    with pytest.raises(PolicyError):
        parse_policy({"policy": "probe_fcs", "settle_agree": 1})
