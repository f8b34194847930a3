"""Answer extraction on real sentences of the dev traces (R1-distill, Qwen3, Sky-T1), one behaviour class at a time.

Every sentence is checked by itself (``find_answer``) and inside a stream, fed whole, per token (the Qwen2.5
tokenizer, as replay streams) and per character: the detector must report the same answer key every way.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from controller.answers import canonical, math_text
from controller.detector import ANSWER, SolutionDetector
from controller.question import read_question
from controller.sentences import find_answer
from controller.verify import AnswerComparer
from tests.splits import per_character

SHARED = Path(__file__).resolve().parents[2] / "shared"

# (class, sentence as written in a trace, expected key or None)
SENTENCES = [
    ("unicode root", "Therefore, the side length is 16√3.", "16\\sqrt{3}"),
    ("unicode root", "So, the area is 15√3.", "15\\sqrt{3}"),
    ("unicode root", "So, the distance is 2√5.", "2\\sqrt{5}"),
    ("unicode root", "So the perimeter is 6√(2).", "6\\sqrt{2}"),
    ("cube root", "So the answer is 5∛2.", "5\\sqrt[3]{2}"),
    ("fraction slash", "So, the area is 3840⁄289.", "3840/289"),
    ("pi", "So the sum is 8π.", "8\\pi"),
    ("pi", "Therefore, the maximum value is 5π²/4.", "5\\pi^{2}/4"),
    ("minus sign", "So, m = −3.", "-3"),
    ("degrees", "So, angle AHB is 106°.", "106"),
    ("superscript", "So the coefficient is 2⁵.", "32"),
    ("ascii root", "So, the length is 65sqrt(14)/28.", "65\\sqrt{14}/28"),
    ("latex", "Therefore, the final answer is \\(\\boxed{\\dfrac{3}{4}}\\).", "3/4"),
    ("latex", "Thus, the probability is \\( \\frac{1}{6} \\).", "1/6"),
    ("latex", "So, \\( x = \\frac{326}{35} \\).", "326/35"),
    ("latex", "So the volume is \\(288\\pi\\).", "288\\pi"),
    ("mixed number", "Therefore, I think I can confidently say that the answer is 137 1/2 miles.", "275/2"),
    ("mixed number", "So the answer is \\(137\\frac{1}{2}\\).", "275/2"),
    ("units", "So, she sold a total of 72 clips.", "72"),
    ("units", "Therefore, the area of the rectangle is 48 square units.", "48"),
    ("percent", "So the answer is 40%.", "40"),
    ("money", "So the total cost is $1,250.", "1250"),
    ("vector", "So, yeah, I think I can confidently say that the answer is [-2; -14; -7].", "(-2,-14,-7)"),
    ("tuple", "So, the answer is (6, 31, -1).", "(6,31,-1)"),
    ("result of a sum", "Therefore, the answer should be N=5694.", "5694"),
    ("result of a sum", "So, the answer is 1 + 115 = 116.", "116"),
    ("letter", "So the answer is B) 42.", "B"),
    ("letter", "Hence the answer is (C).", "C"),
    ("letter", "Answer: B", "B"),
    ("letter", "So, the final answer is \\boxed{D}.", "D"),
    # values that are not results
    ("operand", "So, that gives angle AHB as 106°, which is 180° minus 74°.", None),
    ("operand", "So actually, there are three distinct real solutions for w: 2 cos(π/9), 2 cos(5π/9).", None),
    ("operand", "So, 3 times 3 is 9, times $\\sqrt{2}$, so yes, 9$\\sqrt{2}$.", None),
    ("index", "So the sum S = Σ_{k=1}^{100} (-1)^{k+1} * k.", None),
    ("inequality", "So, to have the union be all real numbers, we need a² + 2a >= 0.", None),
    ("discarded", "Therefore, our solution x=326/35 is extraneous.", None),
    ("discarded", "So, n=4 is inconsistent.", None),
    ("list of digits", "So writing the remainders from last to first: 1 1 1 1 1 0 1 0 0 0 0.", None),
    ("relation continues", "So 8^10 ≡ (8^4)^2 * 8^2 ≡ 6 * 4 = 24 ≡ 4 mod 10.", "4"),  # not 24
]


@pytest.mark.parametrize("kind,sentence,key", SENTENCES)
def test_sentence_table(kind: str, sentence: str, key: str | None) -> None:
    found = find_answer(sentence)
    assert (found.key if found else None) == key, (kind, found)


def answer_keys(deltas: list[str], question: str | None = None) -> list[str | None]:
    detector = SolutionDetector(question=read_question(question) if question else None)
    events = [event for delta in deltas for event in detector.feed(delta, 1)] + detector.flush()
    return [event.key for event in events if event.kind == ANSWER]


@functools.cache
def qwen_tokenizer() -> Any:
    from controller.offline.replay import Tokenizers

    return Tokenizers(SHARED / "tokenizers").get("qwen2.5")


def token_split(text: str) -> list[str]:
    from controller.offline.replay import token_deltas

    if not (SHARED / "tokenizers").exists():
        pytest.skip(f"tokenizers not found at {SHARED / 'tokenizers'}")
    return token_deltas(qwen_tokenizer(), text)


@pytest.mark.parametrize("kind,sentence,key", SENTENCES)
def test_sentences_fed_whole_per_token_and_per_character(kind: str, sentence: str, key: str | None) -> None:
    text = "Let me work this out step by step.\n" + sentence + "\nWait, let me double-check that.\n"
    expected = [key] if key is not None else []
    for deltas in ([text], token_split(text), per_character(text)):
        assert answer_keys(deltas) == expected, kind


# the question decides: (question, thinking, answer keys the detector reports)
WITH_QUESTION = [
    (  # MATH500: a fraction is asked; integer steps are not answers, the fraction is
        "What is the greatest possible value of the slope of the line containing points $A$ and $B$? "
        "Express your answer as a common fraction.",
        "So the slope is 3.\nWait, let me redo that.\nTherefore, (3 - 0)/2 = 3/2.\nWait, let me check.\n",
        ["3/2"],
    ),
    (  # AIME: m + n is asked; AP = 100/13 and m = 100 are parts, m + n = 113 is the answer
        "If $AB=5$, $BC=9$, and $AC=10$, $AP$ can be written as the form $\\frac{m}{n}$, where $m$ and $n$ are "
        "relatively prime integers. Find $m + n$.",
        "So AP = 100/13.\nWait, so m = 100.\nSo, m + n = 100 + 13 = 113.\nLet me verify.\n",
        ["113"],
    ),
    (  # multiple choice: the option text and the letter are one answer; another number is not an answer
        "Which is the largest? (A) 12 (B) 42 (C) 7 (D) 9 (E) 30",
        "So the largest value is 42.\nWait, let me check the others.\nSo 6 + 1 = 7.\nSo the answer is (B).\n",
        ["B", "C", "B"],
    ),
    (
        "Which is the largest? (A) 12 (B) 42 (C) 7 (D) 9 (E) 30",
        "So the product is 84.\nHmm.\nSo the correct option is (E).\n",
        ["E"],
    ),
]


@pytest.mark.parametrize("question,thinking,keys", WITH_QUESTION)
def test_the_question_decides_what_is_an_answer(question: str, thinking: str, keys: list[str]) -> None:
    for deltas in ([thinking], token_split(thinking), per_character(thinking)):
        assert answer_keys(deltas, question) == keys


def test_unicode_answers_are_compared_whole_by_math_verify() -> None:
    comparer = AnswerComparer(timeout_seconds=30)  # equivalence only; the bound is tested in test_answers
    assert math_text("6√2") == "6\\sqrt{2}" and math_text("−3") == "-3" and math_text("2π") == "2\\pi"
    assert comparer.equal("16√3", "16\\sqrt{3}") and not comparer.equal("16√3", "16")
    assert comparer.equal("3840⁄289", "\\dfrac{3840}{289}") and not comparer.equal("3840⁄289", "3840")
    assert comparer.equal("2π", "2\\pi") and not comparer.equal("2π", "2")
    assert comparer.equal("√3/2", "\\frac{\\sqrt{3}}{2}")
    assert canonical("137 1/2") == canonical("137 \\frac{1}{2}") == canonical("137.5") == "275/2"
    assert canonical("[-18, -49, 96]") == canonical("\\begin{pmatrix} -18 \\\\ -49 \\\\ 96 \\end{pmatrix}")
    assert canonical("90°") == canonical("90^\\circ") == "90"
