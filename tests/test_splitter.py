"""The thinking splitter routes text the same way however the stream is split, and never leaks a tag."""

from __future__ import annotations

import pytest

from controller.delimiters import Delimiters, delimiters_for, infer_delimiters
from controller.splitter import ANSWER, THINKING, ThinkingSplitter
from tests.splits import every_single_split, per_character, random_splits

CASES = [
    # (family, stream, expected thinking, expected answer)
    (
        "think",
        "<think>\nLet me add 2 and 3. So 5.\n</think>\n\nThe answer is 5.",
        "\nLet me add 2 and 3. So 5.\n",
        "\n\nThe answer is 5.",
    ),
    (
        "think-implicit",
        "Okay, 2+3 is 5.\nWait, yes 5.\n</think>\n\n**Final Answer** \\boxed{5}",
        "Okay, 2+3 is 5.\nWait, yes 5.\n",
        "\n\n**Final Answer** \\boxed{5}",
    ),
    (
        "sky-t1",
        "<|begin_of_thought|>\n\nSo x = 2.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>x=2",
        "\n\nSo x = 2.\n\n",
        "\n\n<|begin_of_solution|>x=2",
    ),
    (
        "think",
        "No thinking at all, just an answer < > </ think",
        "",
        "No thinking at all, just an answer < > </ think",
    ),
    (
        "think-implicit",
        "I compare a</b and a<think> tag inside </thin",
        "I compare a</b and a<think> tag inside </thin",
        "",
    ),
    ("think", "<think>a</think>b</think>c", "a", "b</think>c"),
]


def run(splitter: ThinkingSplitter, deltas: list[str]) -> tuple[str, str]:
    thinking, answer = [], []
    pieces = [piece for delta in deltas for piece in splitter.feed(delta)] + splitter.flush()
    for piece in pieces:
        (thinking if piece.kind == THINKING else answer).append(piece.text)
    return "".join(thinking), "".join(answer)


@pytest.mark.parametrize("family,stream,thinking,answer", CASES)
def test_every_split_gives_the_same_sections(family: str, stream: str, thinking: str, answer: str) -> None:
    delimiters = delimiters_for(family)
    splits = [
        *every_single_split(stream),
        per_character(stream),
        *(random_splits(stream, s) for s in range(20)),
    ]
    for deltas in splits:
        assert run(ThinkingSplitter(delimiters), deltas) == (thinking, answer), deltas


def test_a_partial_tag_is_held_back_not_leaked() -> None:
    splitter = ThinkingSplitter(delimiters_for("think-implicit"))
    assert [p.text for p in splitter.feed("So 5.</thi")] == ["So 5."]
    assert splitter.feed("nk>") == []
    assert splitter.in_thinking is False
    pieces = splitter.feed("Answer")
    assert [(p.kind, p.text) for p in pieces] == [(ANSWER, "Answer")]


def test_held_back_text_that_is_not_a_tag_comes_out() -> None:
    splitter = ThinkingSplitter(delimiters_for("think-implicit"))
    assert [p.text for p in splitter.feed("a </th")] == ["a "]
    assert [p.text for p in splitter.feed("ere")] == ["</there"]


def test_infer_delimiters_from_template_and_prompt() -> None:
    assert infer_delimiters("{{ '<think>' }}", "<|im_start|>assistant\n<think>\n") == Delimiters(implicit_start=True)
    assert infer_delimiters("{{ '<think>' }}", "<|im_start|>assistant\n") == Delimiters(implicit_start=False)
    sky = infer_delimiters("<|begin_of_thought|>", "")
    assert sky.start == "<|begin_of_thought|>" and not sky.implicit_start


def test_bad_delimiters_are_rejected() -> None:
    with pytest.raises(ValueError):
        Delimiters("<t>", "<t>")
    with pytest.raises(ValueError, match="unknown thinking delimiter family"):
        delimiters_for("nope")
