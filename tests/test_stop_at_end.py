"""A decision completed only by the text that closes the thinking is not a stop, however that text is split.

The thinking ends on a confirming sentence. If the model then closes its thinking (``"\\n</think>\\n\\n"``), the
newline that completes the sentence belongs to the model's own end of thinking: the controller must not stop
(no decision, ever). If the model goes on thinking instead, the stop is made, at the same sentence, whatever
the split; the delta that showed the model goes on lies past the stop point.
"""

from __future__ import annotations

import pytest

from controller.delimiters import Delimiters
from controller.policies import parse_policy
from controller.session import ThinkingController
from controller.verify import AnswerComparer
from tests.splits import every_single_split, per_character, random_splits

IMPLICIT = Delimiters(implicit_start=True)
EXPLICIT = Delimiters(implicit_start=False)
COMPARER = AnswerComparer()

THINKING = (
    "Kylar wants 16 glasses. Every second glass costs 60% of $5, so $3.\n\n"
    "So 8 glasses at $5 and 8 glasses at $3: 40 + 24 = 64.\n\n"
    "So the answer is 64.\n\n"
    "Wait, let me double-check. 8 * 5 = 40 and 8 * 3 = 24, and 40 + 24 = 64.\n\n"
    "**Final Answer**: Kylar needs to pay \\boxed{64} dollars."
)
CLOSINGS = ["\n</think>\n\nKylar pays **$64**.", "\n\n</think>\n\n64", "\n</think>", "</think>\n\n64"]
GOING_ON = "\nHmm, but maybe I should also check the discount once more."


def run(deltas: list[str], delimiters: Delimiters = IMPLICIT) -> tuple[ThinkingController, list[bool]]:
    controller = ThinkingController(parse_policy({"policy": "fcs_reflection"}), delimiters, COMPARER)
    past_stop: list[bool] = []
    for delta in deltas:
        update = controller.feed(delta, 1)
        if update.decision is not None:
            past_stop.append(update.past_stop)
            return controller, past_stop
    controller.finish()
    return controller, past_stop


def splits(text: str) -> list[list[str]]:
    return [*every_single_split(text), per_character(text), *(random_splits(text, seed, 40) for seed in range(20))]


@pytest.mark.parametrize("closing", CLOSINGS)
def test_no_stop_when_the_model_closes_its_thinking(closing: str) -> None:
    for deltas in splits(THINKING + closing):
        controller, _ = run(deltas)
        assert controller.decision is None, deltas
        assert controller.pending is None
    controller, _ = run(["<think>", *per_character(THINKING + closing)], EXPLICIT)
    assert controller.decision is None


def test_no_stop_when_the_stream_ends_right_after_the_confirmation() -> None:
    for deltas in splits(THINKING + "\n\n"):
        controller, _ = run(deltas)
        assert controller.decision is None


def test_the_same_stop_for_every_split_when_the_model_goes_on() -> None:
    text = THINKING + GOING_ON
    decisions = set()
    for deltas in splits(text):
        controller, past_stop = run(deltas)
        decision = controller.decision
        assert decision is not None, deltas
        decisions.add((decision.reason, decision.key, decision.offset))
        assert controller.kept_tokens is not None and controller.kept_tokens <= controller.fed_tokens
        # the kept text holds the confirmation; a stop confirmed by a later delta keeps nothing past it
        kept = "".join(deltas[: controller.kept_tokens])
        assert kept.startswith(THINKING)
        assert past_stop == [controller.kept_tokens < controller.fed_tokens]
        if past_stop[0]:
            assert kept.rstrip() == THINKING
    assert decisions == {("confirmed", "64", len(THINKING))}


def test_a_pending_stop_is_made_once_text_shows_the_model_goes_on() -> None:
    controller = ThinkingController(parse_policy({"policy": "fcs_reflection"}), IMPLICIT, COMPARER)
    for delta in [THINKING, "\n", "\n", "<"]:  # whitespace and the start of a tag: still maybe the end of thinking
        update = controller.feed(delta, 1)
        assert update.decision is None
    assert controller.pending is not None
    update = controller.feed("br>", 1)  # "<br>" is not the end tag: the model goes on thinking
    assert update.decision is not None and update.past_stop and update.decision.key == "64"
    assert update.decision.tokens == 5 and controller.kept_tokens == 4


def test_thinking_tokens_do_not_depend_on_how_tokens_are_grouped_into_deltas() -> None:
    """A backend that lags merges tokens into one delta; one that closes the thinking says (``through_end``) how
    many of its tokens come through the end tag, so the tokens after it are answer tokens, as one at a time."""
    tokens = [*THINKING.split(" "), "\n", "</think>", "\n\n", "Kylar ", "pays ", "$64."]
    tokens = [token + " " for token in tokens[:-7]] + tokens[-7:]  # (the words keep their spaces)
    end = tokens.index("</think>")
    one_at_a_time, _ = run(tokens)
    assert one_at_a_time.thinking_tokens == end + 1 and one_at_a_time.answer_tokens == len(tokens) - end - 1
    for first in range(end - 3, end + 1):
        for last in range(end + 1, len(tokens) + 1):
            controller = ThinkingController(parse_policy({"policy": "fcs_reflection"}), IMPLICIT, COMPARER)
            for token in tokens[:first]:
                controller.feed(token, 1)
            merged = tokens[first:last]
            controller.feed("".join(merged), len(merged), through_end=end + 1 - first)
            for token in tokens[last:]:
                controller.feed(token, 1)
            controller.finish()
            assert (controller.thinking_tokens, controller.answer_tokens) == (
                one_at_a_time.thinking_tokens,
                one_at_a_time.answer_tokens,
            ), (first, last)
            assert controller.decision is None
