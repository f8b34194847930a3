"""Answer extraction and equivalence, on snippets in the styles of R1, QwQ, Qwen3 and Sky-T1 traces."""

from __future__ import annotations

import pytest

from controller.answers import canonical, find_boxed, last_boxed
from controller.sentences import find_answer, is_cut, is_reflection, is_rejection
from controller.verify import AnswerComparer

# (snippet, expected key or None, explicit?)
EXTRACTION = [
    # R1-distill style (written for these tests)
    ("So the answer is 5.", "5", True),
    ("Therefore, the final answer is \\(\\boxed{\\dfrac{3}{4}}\\).", "3/4", True),
    ("So, 2 + 3 = 5.", "5", False),
    ("Therefore, Natalia sold 72 clips altogether in April and May.", None, None),
    ("So, she sold a total of 72 clips.", "72", False),
    ("So the speed must be 6 mph.", "6", False),
    ("Thus, the probability is \\( \\frac{1}{6} \\).", "1/6", False),
    ("Hence the answer is (C).", "C", True),
    ("**Final Answer**\n\\[ \\boxed{27} \\]", "27", True),
    # Qwen3 style (written for these tests)
    ("So the total cost is $1,250.", "1250", False),
    ("Therefore, x = \\( \\frac{\\sqrt{3}}{2} \\).", "\\frac{\\sqrt{3}}{2}", False),
    ("So the solution set is \\([1, 3)\\).", "[1,3)", False),
    ("So the answer should be 2.0.", "2", True),
    # QwQ / Sky-T1 style (paraphrased from the dev traces' phrasing)
    ("So, final answer is 27 miles from city A.", "27", True),
    (
        "So, there are 8 possible values for k, which means there are 8 positive perfect squares less than 2023.",
        "8",
        False,
    ),
    ("Therefore, the area of the rectangle is 48 square units.", "48", False),
    # traps: labels, list numbering, dates, conditionals, questions, negation, lists, operands, indexed steps
    ("So, in step 2, we simplify the fraction.", None, None),
    ("2. So we move on to case 3.", None, None),
    ("So the meeting is on March 3.", None, None),
    ("If x = 5, then the sum is 12.", None, None),
    ("So is the answer 12?", None, None),
    ("So the answer is not 5.", None, None),
    ("So, the value is not 5.", None, None),
    ("Therefore, the elements are a = 11, 10, 9, 8.", None, None),
    ("So, 18t = 45 - 12t.", None, None),
    ("So, d_2 = 2.", None, None),
    ("Let me compute 3 + 4 = 7.", None, None),
    ("Maybe the answer is 12.", None, None),
    ("The function returns 0 when the list is empty.", None, None),
    # numbers with thousands separators (the first three from Sky-T1 dev traces, amc23/34 and aime24/13)
    ("So, r = 137,088 / 3570", "192/5", False),
    ("So, r = 68,544 / 1785", "192/5", False),
    ("Then, 162,500 / 100 = 1625.", "1625", False),
    ("So the answer is \\(\\frac{3,840}{289}\\).", "3840/289", True),
    ("Thus the area is 20,000/\\pi.", "20000/\\pi", False),
    ("So the answer is (3, 840).", "(3,840)", True),
    # cut at an operator or an open bracket: the expression goes on (the first from a Sky-T1 dev trace, amc23/31)
    ("Thus, x1 +", None, None),
    ("So the answer is 3 +", None, None),
    ("Therefore, the total is 30.00 -", None, None),
    ("So x = \\( 2\\sqrt{3} + \\)", None, None),
    ("The answer is (3, 4", None, None),
    ("So the answer is \\(\\frac{1}{2} \\cdot\\)", None, None),
    # a factor is not the result (R1-distill dev trace math500/352: the perimeter is 11(1 + √5), not 11)
    ("So, perimeter is 11(1 + sqrt(5))", None, None),
    ("So the answer is 11(1 + \\sqrt{5}).", "11(1+\\sqrt{5})", True),
    ("So the answer is 29 (since 29 is prime).", "29", True),
]


@pytest.mark.parametrize("snippet,key,explicit", EXTRACTION)
def test_extraction_table(snippet: str, key: str | None, explicit: bool | None) -> None:
    found = find_answer(snippet)
    if key is None:
        assert found is None, found
    else:
        assert found is not None, snippet
        assert (found.key, found.explicit) == (key, explicit)


@pytest.mark.parametrize(
    "sentence,reflection,rejection",
    [
        ("Wait, let me double-check that.", True, False),
        ("But let me double-check the arithmetic.", True, False),
        ("Alternatively, I could use the relative speed.", True, False),
        ("Let me verify this with another method.", True, False),
        ("Hmm, that seems too easy.", True, False),
        ("Wait, no, that's wrong.", True, True),
        ("That can't be right.", True, True),
        ("I think I made a mistake in the second step.", True, True),
        ("So, the answer is 5.", False, False),
        ("Waiting times are exponential.", False, False),
        ("Nobody knows.", False, False),
    ],
)
def test_reflections_and_rejections(sentence: str, reflection: bool, rejection: bool) -> None:
    assert is_reflection(sentence) == reflection
    assert is_rejection(sentence) == rejection


@pytest.mark.parametrize(
    "a", ["2", "2.0", "\\frac{4}{2}", "\\boxed{2}", "$2$", "\\(2\\)", "4/2", "2 units", "\\dfrac{4}{2}"]
)
def test_one_answer_many_spellings(a: str) -> None:
    assert canonical(a) == "2"
    assert AnswerComparer().equal(a, "2")


def test_choices_and_thousands() -> None:
    assert canonical("(C)") == canonical("\\textbf{(C)}") == "C"
    assert canonical("1,000") == "1000"


@pytest.mark.parametrize(
    "written,plain",
    [
        ("3,840/289", "3840/289"),
        ("\\frac{3,840}{289}", "3840/289"),
        ("20,000/\\pi", "20000/\\pi"),
        ("1,000,000", "1000000"),
        ("-2,500", "-2500"),
        ("137,088 / 3570", "192/5"),
        ("(3, 840)", "(3,840)"),  # a pair, not a number
        ("(3,840)", "(3,840)"),
        ("[1,000, 2)", "[1,000,2)"),  # an interval's bounds stay apart
        ("1,234,5", "1,234,5"),  # not groups of three: a list
    ],
)
def test_thousands_separators_are_digits_outside_brackets(written: str, plain: str) -> None:
    assert canonical(written) == plain


def test_thousands_separators_reach_math_verify_as_digits() -> None:
    comparer = AnswerComparer(timeout_seconds=30)  # cold sympy import
    assert comparer.equal("20,000/\\pi", "\\frac{20000}{\\pi}")
    assert comparer.equal("\\frac{3,840}{289}", "\\frac{3840}{289}")
    assert comparer.equal("2,000\\sqrt{2}", "2000\\sqrt{2}")
    assert not comparer.equal("(3, 840)", "3840")


@pytest.mark.parametrize(
    "value,cut",
    [("3 +", True), ("30.00 -", True), ("2 \\cdot", True), ("(3, 4", True), ("\\frac{1}{", True), ("x =", True),
     ("3 + 4", False), ("[1, 3)", False), ("(0, 9) \\cup (9, 36)", False), ("-3", False), ("\\frac{1}{2}", False)],
)  # fmt: skip
def test_cut_values(value: str, cut: bool) -> None:
    assert is_cut(value) is cut


def test_math_verify_equivalence_beyond_keys() -> None:
    comparer = AnswerComparer(timeout_seconds=30)  # equivalence only (the bound is tested below); cold sympy import
    assert canonical("\\frac{\\sqrt{3}}{2}") == canonical("\\frac{\\sqrt3}{2}")  # same key: no Math-Verify needed
    assert comparer.equal("\\sqrt{8}", "2\\sqrt{2}")
    assert comparer.equal("0.5", "\\frac12")
    assert not comparer.equal("[1, 3)", "[1, 3]")
    assert not comparer.equal("5", "6")
    assert not comparer.equal("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}")


def test_math_verify_runs_off_the_main_thread_with_a_bound() -> None:
    import threading

    comparer = AnswerComparer(timeout_seconds=5)
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(comparer.equal("\\sqrt{8}", "2\\sqrt{2}")))
    thread.start()
    thread.join(30)
    assert result == [True]


def test_boxed_extraction() -> None:
    assert find_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == ["\\frac{1}{2}", "x^{2}"]
    assert last_boxed("no box") is None
    assert find_boxed("\\boxed{unterminated") == []
