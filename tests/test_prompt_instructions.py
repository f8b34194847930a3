"""A question with an evaluation harness's instruction line: the instructions are set apart from the question,
and the sample answer they quote is never taken for the model's answer unless the thinking reaches it itself."""

from __future__ import annotations

import dataclasses

import pytest

from controller.delimiters import Delimiters
from controller.detector import ANSWER, SOLUTION, SolutionDetector
from controller.policies import parse_policy
from controller.question import derives, quotes_instructions, read_question, split_instructions
from controller.session import ThinkingController
from controller.verify import AnswerComparer
from tests.splits import every_single_split, per_character
from tests.test_question import AIME_M_PLUS_N, DIVISORS, FRACTION, benchmark_questions

R1_LINE = "Please reason step by step, and put your final answer within \\boxed{}."
EXAMPLE_LINE = "Please reason step by step, and put your final answer within \\boxed{}, e.g., Answer: \\boxed{45}."
CHOICE_LINE = "Put your final answer in the form Answer: \\boxed{C}."
GPQA_LINES = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
)
SKYTHOUGHT_LINE = "Return your final response within \\boxed{}."
CHOICE_QUESTION = (
    "Which of the following is a noble gas?\n\nA) Neon\nB) Iron\nC) Carbon\nD) Sodium"
)  # fmt: skip

# Thinking in the style of R1-distill and Qwen3 traces (written for these tests): the model reads the format line
# of the prompt back, twice, before and after working, while its own answer is 16.
QUOTING_TRACE = (
    "Okay, so I need to find how many positive divisors 196 has.\n"
    "The problem says to put the final answer in a box, e.g., Answer: \\boxed{45}.\n"
    "Wait, that 45 is just the example of the format.\n"
    "First, factor 196. 196 = 4 × 49 = 2^2 × 7^2.\n"
    "So the format should be like \\boxed{45}.\n"
    "Hmm, let me count the divisors: (2 + 1)(2 + 1) = 9.\n"
    "So there are 9 divisors.\n"
    "Wait, let me double-check by listing them: 1, 2, 4, 7, 14, 28, 49, 98, 196.\n"
    "That is 9 divisors, so the answer is \\boxed{9}.\n"
    "But let me make sure I have not missed any.\n"
)
# ... and a trace whose own result happens to be the sample value: it computes 45, so 45 is its answer.
DERIVING_TRACE = (
    "The instructions show \\boxed{45} as an example of the format.\n"
    "Now, the sum 1 + 2 + ... + 9 = 9 × 10 / 2 = 45.\n"
    "So the answer is \\boxed{45}.\n"
    "Wait, let me verify: 1 + 9 = 10, 2 + 8 = 10, 3 + 7 = 10, 4 + 6 = 10, and 5, so 40 + 5 = 45.\n"
    "So the answer is \\boxed{45}.\n"
    "Alternatively, I could pair them differently.\n"
)
# a bare box with nothing derived before it is the format read back, not a result
BARE_BOX_TRACE = (
    "The answer format is:\n\\boxed{45}\n"
    "Wait, let me start the problem.\n"
    "The answer is \\boxed{45}.\n"
    "Hmm, I have not computed anything yet.\n"
)
CHOICE_TRACE = (
    "The required format is Answer: \\boxed{C}.\n"
    "Wait, I still need to decide.\n"
    "Neon is in group 18, so it is a noble gas: the answer is (A), neon.\n"
    "Let me double-check: iron, carbon and sodium are not noble gases.\n"
    "So the answer is \\boxed{A}.\n"
    "Hmm, the format line mentions \\boxed{C}, but that is only the template.\n"
)


def events(text: str, question: str, deltas: list[str] | None = None) -> list[tuple[str, int, str | None]]:
    detector = SolutionDetector(question=read_question(question))
    found = [event for delta in (deltas or [text]) for event in detector.feed(delta, 1)] + detector.flush()
    return [(event.kind, event.offset, event.key) for event in found]


def stop(text: str, question: str) -> str | None:
    controller = ThinkingController(
        parse_policy({"policy": "fcs_reflection"}), Delimiters(implicit_start=True), AnswerComparer(), question=question
    )
    for delta in per_character(text):
        update = controller.feed(delta, 1)
        if update.decision is not None:
            return update.decision.key
    controller.finish()
    return None


@pytest.mark.parametrize("line", [R1_LINE, EXAMPLE_LINE, SKYTHOUGHT_LINE])
def test_instruction_lines_are_set_apart_from_the_question(line: str) -> None:
    for question in (DIVISORS, FRACTION, AIME_M_PLUS_N):
        for prompt in (f"{question}\n{line}", f"{question} {line}", f"{line}\n\n{question}"):
            text, instructions = split_instructions(prompt)
            assert text == question and instructions == (line,)
            with_line, plain = read_question(prompt), read_question(question)
            assert dataclasses.replace(with_line, examples=()) == plain


def test_a_question_without_instructions_is_left_whole() -> None:
    for question in (DIVISORS, FRACTION, "For example, 2 + 3 = 5. What is 4 + 5?", "Express your answer as a decimal."):
        assert split_instructions(question) == (question, ())
        assert read_question(question).examples == ()


def test_harness_lines_over_every_benchmark_question_change_nothing_but_the_examples() -> None:
    """MATH500, AMC23, AIME24, AIME25 and GSM8K questions read the same with an instruction line as without."""
    items = benchmark_questions()
    for line, example in ((R1_LINE, ()), (EXAMPLE_LINE, (("45", "45"),))):
        changed = []
        for question, _answer in items:
            read = read_question(f"{question}\n{line}")
            if dataclasses.replace(read, examples=()) != read_question(question) or read.examples != example:
                changed.append(question[-80:])
        assert changed == []


def test_sample_answers_of_the_instructions() -> None:
    assert read_question(f"{DIVISORS}\n{EXAMPLE_LINE}").examples == (("45", "45"),)
    assert read_question(f"{DIVISORS}\n{R1_LINE}").examples == ()
    assert read_question(f"{GPQA_LINES}\n\n{CHOICE_QUESTION}").examples == ()  # $LETTER is a placeholder
    choice = read_question(f"{GPQA_LINES}\n\n{CHOICE_QUESTION}\n{CHOICE_LINE}")
    assert choice.multiple_choice and choice.options["A"] == "Neon" and choice.examples == (("C", "C"),)
    assert "45" not in read_question(f"{DIVISORS}\n{EXAMPLE_LINE}").given


def test_quoting_and_deriving_sentences() -> None:
    assert quotes_instructions("The problem says to put the final answer in a box, e.g., Answer: \\boxed{45}.")
    assert quotes_instructions("So the format should be like \\boxed{45}.")
    assert not quotes_instructions("So the answer is \\boxed{45}.")
    assert derives("Now, the sum 1 + 2 + ... + 9 = 9 × 10 / 2 = 45.", "45")
    assert not derives("So the answer is \\boxed{45}.", "45")  # stated, not reached
    assert not derives("The answer is 45.", "45")
    assert not derives("The format is e.g. 45 in a box.", "45")
    assert not derives("So 145 = 5 × 29.", "45") and not derives("x = 4.5", "45")
    assert derives("Neon is a noble gas, so option C is wrong and (C) is out.", "C")
    assert not derives("The answer is C.", "C")


@pytest.mark.parametrize("line", [EXAMPLE_LINE, f"{R1_LINE} For example, Answer: \\boxed{{45}}."])
def test_the_prompts_sample_answer_is_not_an_answer(line: str) -> None:
    question = f"{DIVISORS}\n{line}"
    found = events(QUOTING_TRACE, question)
    assert [key for kind, _, key in found if kind == ANSWER] == ["9", "9"]
    assert stop(QUOTING_TRACE, question) == "9"
    # without the instruction line in the question the quoted sample is an answer (and confirmed twice)
    assert "45" in [key for kind, _, key in events(QUOTING_TRACE, DIVISORS) if kind == SOLUTION]


def test_a_sample_value_the_thinking_computes_is_its_answer() -> None:
    question = f"What is the sum of the integers from 1 to 9?\n{EXAMPLE_LINE}"
    assert [key for kind, _, key in events(DERIVING_TRACE, question) if kind == SOLUTION] == ["45", "45"]
    assert stop(DERIVING_TRACE, question) == "45"
    assert [key for kind, _, key in events(BARE_BOX_TRACE, question) if kind == ANSWER] == []
    assert stop(BARE_BOX_TRACE, question) is None


def test_multiple_choice_sample_letter() -> None:
    question = f"{GPQA_LINES}\n\n{CHOICE_QUESTION}\n{CHOICE_LINE}"
    keys = [key for kind, _, key in events(CHOICE_TRACE, question) if kind == ANSWER]
    assert keys == ["A", "A"]
    assert stop(CHOICE_TRACE, question) == "A"


@pytest.mark.parametrize(
    "trace,question",
    [
        (QUOTING_TRACE, f"{DIVISORS}\n{EXAMPLE_LINE}"),
        (DERIVING_TRACE, f"What is the sum of the integers from 1 to 9?\n{EXAMPLE_LINE}"),
        (BARE_BOX_TRACE, f"What is 5 times 9?\n{EXAMPLE_LINE}"),
        (CHOICE_TRACE, f"{GPQA_LINES}\n\n{CHOICE_QUESTION}\n{CHOICE_LINE}"),
    ],
    ids=["quoting", "deriving", "bare-box", "choice"],
)
def test_every_single_split_point_gives_the_same_events(trace: str, question: str) -> None:
    whole = events(trace, question)
    assert any(kind == ANSWER for kind, *_ in whole) or trace is BARE_BOX_TRACE
    for deltas in every_single_split(trace):
        assert events(trace, question, deltas) == whole
    assert events(trace, question, per_character(trace)) == whole
