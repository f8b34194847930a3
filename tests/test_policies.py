"""Stop policies: parsing from plain dicts, and each rule stopping exactly when it should."""

from __future__ import annotations

import pytest

from controller.delimiters import Delimiters
from controller.policies import (
    BudgetConfig,
    ConsistencyConfig,
    FcsReflectionConfig,
    PolicyError,
    ProbeFcsConfig,
    parse_policy,
)
from controller.session import ThinkingController
from controller.verify import AnswerComparer

IMPLICIT = Delimiters(implicit_start=True)
FCS = {"policy": "fcs_reflection"}

FIRST = "So the answer is 12.\n\n"
CHECK_SAME = "Wait, let me double-check. 3 times 4 is 12.\n\nSo the answer is 12.\n\n"
CHECK_OTHER = "Wait, let me double-check. Actually it is 3 times 5.\n\nSo the answer is 15.\n\n"
MORE = "Hmm, let me think about it more.\n\n" + "This is more text about something else entirely. " * 5


def run(config_dict: dict[str, object], text: str, tokens_per_char: int = 1):
    controller = ThinkingController(parse_policy(config_dict), IMPLICIT, AnswerComparer())
    for char in text:
        update = controller.feed(char, tokens_per_char)
        if update.decision:
            return update.decision
    controller.finish()
    return None


def test_parse_defaults_and_overrides() -> None:
    assert parse_policy({}) == ProbeFcsConfig()
    assert parse_policy({"policy": "fcs_reflection"}) == FcsReflectionConfig()
    assert parse_policy({"policy": "consistency", "k": "4"}) == ConsistencyConfig(k=4)
    assert parse_policy({"policy": "budget", "max_thinking_tokens": 100}) == BudgetConfig(max_thinking_tokens=100)
    assert parse_policy({"policy": "off"}).as_dict() == {
        "policy": "off",
        "min_thinking_tokens": 0,
        "max_thinking_tokens": None,
    }


@pytest.mark.parametrize(
    "data,field",
    [
        ({"policy": "nope"}, "policy"),
        ({"policy": "consistency", "k": 1}, "k"),
        ({"policy": "consistency", "k": "x"}, "k"),
        ({"policy": "fcs_reflection", "k2": 3}, "k2"),
        ({"policy": "fcs_reflection", "implicit_k": 1}, "implicit_k"),
        ({"policy": "budget"}, "max_thinking_tokens"),
        ({"min_thinking_tokens": -1}, "min_thinking_tokens"),
        ({"min_thinking_tokens": 10, "max_thinking_tokens": 5}, "max_thinking_tokens"),
        ({"max_thinking_tokens": True}, "max_thinking_tokens"),
    ],
)
def test_bad_arguments_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_policy(data)
    assert error.value.field == field


def test_fcs_reflection_stops_on_the_confirming_solution() -> None:
    decision = run(FCS, FIRST + CHECK_SAME + MORE)
    assert decision is not None
    assert (decision.reason, decision.key, decision.solutions) == ("confirmed", "12", 2)
    assert decision.offset == len(FIRST + CHECK_SAME.rstrip())


# A value reached and checked without ever being called the answer (real shape: a part of what is asked)
IMPLICIT_FIRST = "So f inverse of 6 is -3.\n\n"
IMPLICIT_CHECK = "Wait, let me double-check. 2 times -3 plus 12 is 6.\n\nSo f inverse of 6 is -3.\n\n"
IMPLICIT_AGAIN = "Let me verify once more. 12 minus 6 is 6.\n\nSo f inverse of 6 is -3.\n\n"


def test_fcs_reflection_needs_a_second_check_of_a_value_never_called_the_answer() -> None:
    assert run(FCS, IMPLICIT_FIRST + IMPLICIT_CHECK + MORE) is None
    decision = run(FCS, IMPLICIT_FIRST + IMPLICIT_CHECK + IMPLICIT_AGAIN + MORE)
    assert decision is not None
    assert (decision.reason, decision.key, decision.solutions) == ("confirmed", "-3", 3)
    # implicit_k 2: the old rule, one check of any value is enough
    decision = run({**FCS, "implicit_k": 2}, IMPLICIT_FIRST + IMPLICIT_CHECK + MORE)
    assert decision is not None and (decision.key, decision.solutions) == ("-3", 2)


def test_fcs_reflection_one_explicit_statement_is_enough() -> None:
    explicit_check = "Wait, let me double-check. 2 times -3 plus 12 is 6.\n\nSo the answer is -3.\n\n"
    decision = run(FCS, IMPLICIT_FIRST + explicit_check + MORE)
    assert decision is not None and (decision.key, decision.solutions) == ("-3", 2)


def test_fcs_reflection_keeps_going_when_the_reflection_disagrees() -> None:
    text = FIRST + CHECK_OTHER + "Let me verify once more. 3 times 5 is 15.\n\nSo the answer is 15.\n\n" + MORE
    decision = run(FCS, text)
    assert decision is not None and decision.key == "15" and decision.solutions == 3


def test_fcs_reflection_never_stops_on_one_solution() -> None:
    assert run(FCS, FIRST + MORE) is None


def test_first_answer_stops_at_once() -> None:
    decision = run({"policy": "first_answer"}, FIRST + CHECK_SAME)
    assert decision is not None and decision.reason == "first_answer" and decision.offset == len(FIRST.rstrip())


def test_consistency_needs_k_agreeing_solutions() -> None:
    two = FIRST + CHECK_SAME + MORE
    assert run({"policy": "consistency", "k": 3}, two) is None
    three = FIRST + CHECK_SAME + CHECK_SAME + MORE
    decision = run({"policy": "consistency", "k": 3}, three)
    assert decision is not None and decision.reason == "consistent" and decision.solutions == 3


def test_min_thinking_tokens_defers_the_stop() -> None:
    text = FIRST + CHECK_SAME + MORE
    early = run(FCS, text)
    assert early is not None
    late = run({**FCS, "min_thinking_tokens": early.tokens + 40}, text)
    assert late is not None and late.tokens == early.tokens + 40 and late.key == "12"


def test_max_thinking_tokens_and_budget() -> None:
    decision = run({"policy": "off", "max_thinking_tokens": 30}, FIRST + MORE)
    assert decision is not None and (decision.reason, decision.tokens, decision.key) == (
        "max_thinking_tokens",
        30,
        "12",
    )
    decision = run({"policy": "budget", "max_thinking_tokens": 10}, MORE)
    assert decision is not None and decision.reason == "budget" and decision.answer is None


def test_off_never_stops() -> None:
    assert run({"policy": "off"}, FIRST + CHECK_SAME + CHECK_SAME + MORE) is None


def test_no_stop_once_the_model_closed_thinking() -> None:
    controller = ThinkingController(parse_policy({}), IMPLICIT, AnswerComparer())
    update = controller.feed(FIRST + "</think>\n\n" + CHECK_SAME + MORE, 10)
    assert update.decision is None and controller.thinking_done
    assert "double-check" in update.content


def test_detection_errors_degrade_to_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    controller = ThinkingController(parse_policy({}), IMPLICIT, AnswerComparer())

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(controller.detector, "feed", broken)
    update = controller.feed(FIRST, 3)
    assert update.reasoning == FIRST and update.decision is None
    assert controller.error is not None and "boom" in controller.error
    assert controller.feed(CHECK_SAME, 3).reasoning == CHECK_SAME
