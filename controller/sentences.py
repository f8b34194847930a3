"""Classify one sentence of thinking: does it start a reflection, does it reach an answer?

Pure functions of one sentence (bounded length), used by :mod:`controller.detector`. The rules describe how
reasoning models (R1, QwQ, Qwen3, Sky-T1) talk in general, not one trace: a reflection opens a sentence
("Wait", "Hmm", "Alternatively", "Let me verify" ...); an *explicit* answer is ``\\boxed{..}``, "the answer
is X" or a "Final Answer" heading; an *implicit* answer is a conclusion sentence ("So ...", "Therefore ...",
"Thus ...") whose last mathematical value is the result. Questions, conditionals ("If x = 5 ...") and negated
values ("not 5") are never answers; numbers that label things ("step 2", "case 1", list numbering, "March 3")
are skipped. A sentence is first read with :func:`controller.answers.math_text`, so Unicode math (``16√3``,
``3840⁄289``, ``2π``) is one value. Operands ("180° minus 74°", "2 cos(π/9)", "= 24 ≡ 4"), inequalities
("a² + 2a >= 0"), values given up ("x = 326/35 is extraneous") and digit lists are not results. A found answer
carries what it was assigned to (``subject``: "N" in "N = 5694") and whether it was an approximation, for
:mod:`controller.question` to judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controller.answers import canonical, last_boxed, math_text

_REFLECTION = re.compile(
    r"^(?:[-*>#]+\s*)?(?:\*\*)?(?:"
    r"wait\b|but,? wait\b|oh,? wait\b|no,? wait\b|hmm+\b|hold on\b|but hold on\b|alternatively\b|"
    r"actually,? (?:no|wait|i|let|that|this|maybe|hold)\b|on second thought\b|oops\b|"
    r"but let me\b|but let's\b|let me (?:just )?(?:double[- ]?check|check|verify|confirm|re-?check|re-?examine|"
    r"re-?calculate|recompute|re-?evaluate|reconsider|re-?verify|make sure|see if|try (?:another|a different)|"
    r"think again|think about (?:it|this) (?:again|differently)|go back|look back|cross-?check|confirm)\b|"
    r"let's (?:double[- ]?check|check|verify|confirm|re-?examine|re-?check|see if|make sure|cross-?check)\b|"
    r"to (?:double[- ]?check|verify|confirm|check|be sure|make sure)\b|double[- ]check(?:ing)?\b|"
    r"is there (?:another|a different|any other|a simpler|a better)\b|another (?:way|approach|method)\b|"
    r"maybe i (?:made a mistake|should (?:double[- ]?check|check|verify))\b|"
    r"i (?:should|need to|want to|will|'ll) (?:double[- ]?check|check|verify|confirm)\b|"
    r"just to (?:be (?:sure|safe|thorough|certain)|confirm|double[- ]?check|verify|check)\b|"
    r"i think i made a mistake\b|that can't be right\b|that doesn't seem right\b"
    r")",
    re.IGNORECASE,
)

_REJECTION = re.compile(
    r"^(?:[-*>#]+\s*)?(?:\*\*)?(?:(?:wait|hmm+|but|oh|actually)[,.!]?\s+)*(?:"
    r"no\b|nope\b|not quite\b|that(?:'s| is| was)? (?:not|wrong|incorrect|impossible)\b|"
    r"that (?:can't|cannot|doesn't|does not|isn't|won't) (?:be|seem|make|add|match|work|right)|"
    r"this (?:contradicts|can't|cannot|doesn't|does not|isn't)\b|that contradicts\b|"
    r"i (?:think i )?(?:made|must have made) (?:a |an )?(?:mistake|error)\b|oops\b|i messed up\b|"
    r"(?:there's|there is) (?:a|an) (?:mistake|error|problem|contradiction)\b|something(?:'s| is) wrong\b"
    r")",
    re.IGNORECASE,
)

_CONCLUSION = re.compile(
    r"^(?:[-*>]+\s*)?(?:\*\*)?(?:and\s+|so,?\s+)?(?:"
    r"so\b|therefore\b|thus\b|hence\b|consequently\b|that means\b|this means\b|which means\b|"
    r"this gives\b|that gives\b|then\b|finally\b|in conclusion\b|in summary\b|overall\b|"
    r"putting it (?:all )?together\b|the (?:final )?(?:answer|result)\b|my (?:final )?answer\b|"
    r"i (?:think|believe|conclude|get|got|found)\b|this confirms\b|it (?:seems|looks like) (?:that )?the answer\b|"
    r"yes\b|that's\b|which is\b|giving\b|we get\b|we have\b|i get\b"
    r")",
    re.IGNORECASE,
)

_NOT_A_CLAIM = re.compile(
    r"^(?:[-*>]+\s*)?(?:\*\*)?(?:so,?\s+)?(?:if|suppose|assume|assuming|let|maybe|perhaps|what if|is|are|does|do|could|"
    r"should|can|would|might|when|whether|unless|how|why|what|for example|e\.g\.)\b",
    re.IGNORECASE,
)

_EXPLICIT_PHRASE = re.compile(
    r"(?:final answer|the answer|my answer|answer)\s*(?:is|should be|would be|must be|will be|=|:)\s*",
    re.IGNORECASE,
)
_FINAL_HEADING = re.compile(r"^[#*\s]*final answer[*:\s]*$", re.IGNORECASE)

_MATH_SPAN = re.compile(r"\\\((.+?)\\\)|\\\[(.+?)\\\]|\$\$(.+?)\$\$|\$(.+?)\$")
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?)"
_ATOM = r"(?:(?:\\sqrt(?:\[\d\])?\{[^{}]{1,30}\}|\\pi\b)(?:\^\{?\d{1,2}\}?)?|\\frac\{\d+\}\{\d+\})"
_POWER = r"(?:\^(?:\{-?\d{1,3}\}|-?\d{1,3}(?!\d)))"
_TERM = rf"(?:\d+ \d{{1,3}}/\d{{1,3}}(?![\d/])|{_NUM}{_POWER}?(?:\s?{_ATOM})*|{_ATOM}+)"
# a number, possibly with a root, pi or a fraction attached (16\sqrt{3}, 2\pi, 3840/289, \sqrt{3}/3, 137\frac{1}{2})
_BARE_NUMBER = re.compile(rf"(?<![\w^_.\\{{])-?{_TERM}(?:\s?/\s?{_TERM})?(?:\^\\circ)?(?![\w^.]\w|[\w^])")
_LABEL_BEFORE = re.compile(
    r"(?:step|case|part|option|method|approach|line|equation|eq\.|problem|question|page|figure|fig\.|table|"
    r"item|round|stage|condition|rule|lemma|example|solution|attempt|try|#|"
    r"january|february|march|april|may|june|july|august|september|october|november|december|"
    r"jan\.?|feb\.?|mar\.?|apr\.?|jun\.?|jul\.?|aug\.?|sep\.?|sept\.?|oct\.?|nov\.?|dec\.?)\s*$",
    re.IGNORECASE,
)
_NEGATION_BEFORE = re.compile(
    r"(?:\bnot|\bisn't|\baren't|\bcannot be|\bcan't be|\bwasn't|\bnever|\\neq|\\ne|≠|\bneq|\binstead of|\brather than|"
    r"\bother than|\bexcept)\s*(?:equal to\s*|be\s*)?(?:\\\(|\$)?\s*$",
    re.IGNORECASE,
)
_ANNOUNCING_END = re.compile(r"(?:\bis|\bare|\bbe|\bequals|=|\bget|\bgives?|\bobtain|\bresult)\s*:$", re.IGNORECASE)
_OPERATOR_AFTER = re.compile(
    r"\s*(?:[-+*/×÷^]|\\times|\\cdot|\\div)\s*(?:[\w(\\]|(?:\$|\\\)|\\\])?\s*$)|\(|\\left\(|"
    r",?\s+(?:minus|plus|times|divided by|multiplied by)\b|"
    r"\s*\\?(?:cos|sin|tan|cot|sec|csc|log|ln|exp)\b|(?:\$|\\\()\\|\}|\s*(?:≡|\\equiv\b|=(?!>))"
)  # an operand, not a result: "180 minus 74", "2 cos(π/9)", "9$\sqrt{2}$", "sum_{k=1}", a factor "11(1 + √5)"
_TRAILING_OPERATOR = re.compile(r"(?:[-+*/×÷^_=<>≤≥−]|\\(?:times|cdot|div|pm|mp|le|ge|leq|geq)|\\[,;: ]?)\s*$")
_CUT_AT_OPERATOR = re.compile(r"(?:[-+*/=×÷−]|\\times|\\cdot|\\div)\s*(?:\$|\\\()?$")
_APPROXIMATE_BEFORE = re.compile(
    r"(?:≈|\\approx|\bapproximately|\babout|\broughly|\baround|\bnearly|\balmost|\bapprox\.?)\s*(?:\\\(|\$)?\s*$", re.I
)
_INEQUALITY_BEFORE = re.compile(r"(?:[<>!]=?|\\[lg]eq?\b|\\neq?\b)\s*(?:\\\(|\$)?\s*$")
_DISCARDED_AFTER = re.compile(
    r"\s*(?:\$|\\\))?\s*(?:is|was|are|were|seems|must be)\s+(?:an?\s+)?(?:extraneous|invalid|wrong|incorrect|impossible|"
    r"rejected|inconsistent|contradictory|not (?:a |the )?(?:valid|correct|right|possible|allowed|consistent|solution|answer))\b",
    re.IGNORECASE,
)  # "x = 326/35 is extraneous", "n = 4 is wrong": a value given up
_CHOICE_VALUE = re.compile(
    r"(?:\b(?:option|choice|answer)\s*(?:is\s*|would be\s*|must be\s*)?:?\s*|\b(?:is|be)\s+)"
    r"(?:\\textbf\{)?\(?([A-J])\)?\}?(?![\w'’])"
)  # "option B", "the correct choice is (C)", "the answer is B) 42"
_LETTER_HEAD = re.compile(r"(?:\\textbf\{)?\(?([A-J])\)\}?(?=\s|$|[.,;])|([A-J])(?=\s*(?:$|[.,;]))")
_LHS_CUT = re.compile(
    r".*(?:[=,;:]|=>|⇒|\\implies|\\Rightarrow|\b(?:so|then|thus|therefore|hence|that|is|are|get|gives|and|where|with|plus|minus|for|at|when|if|set)\b)",
    re.IGNORECASE | re.DOTALL,
)
_UNITS_TAIL = re.compile(r"\s+[a-zA-Z]+\.?$")
_TRAILER = re.compile(r"(?:\s*\\[)\]]|\s*\$+)?(?:\s*[A-Za-z][\w'’-]*){0,6}\s*[.!]?\s*(?:\*\*)?\s*")
_SIMPLE_VALUE = re.compile(
    r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\\[dt]?frac\{(?:[^{}]|\{[^{}]*\})+\}\{(?:[^{}]|\{[^{}]*\})+\}|\\sqrt\{?[^{}]+\}?|\\pi|\d+/\d+|"
    r"\(\s*[-\d.,\s\\a-z{}]+\)|\[[^\[\]]+[\])]|\\infty)"
    r"(?:[\\a-z{}\d^._+-/]|\\sqrt\{[^{}]+\}|\\pi|\^\{?[\d\\a-z]+\}?|\\circ|\^\\circ)*"
)
_RESULT_CUE = re.compile(
    r"(?:=|≈|≡|\\equiv|\\approx|\bis|\bare|\bwas|\bwere|\bhas|\bhave|\bequals?|\bbe|\bgives?|\bgiving|\bget|\bgot|\bobtain(?:ed)?|"
    r"\byields?|\bmakes?|\bcomes? (?:out )?to|\btotal of|\bsum (?:is|of)|:)\s*"
    r"(?:(?:exactly|about|approximately|just|only|also|still|indeed|then|now|therefore|equal to|a total of)\s+)*"
    r"(?:\\\(|\\\[|\$)?\s*$",
    re.IGNORECASE,
)
_LIST_AFTER = re.compile(
    r"\s*(?:,\s*(?:and\s+)?[-+]?\d|or\s+(?:[a-z]\s*=\s*)?[-+]?\d|and\s+[-+]?\d)|\s+\d+\s+\d+(?:\s|$)"
)
_INDEXED_BEFORE = re.compile(r"(?:\b[a-zA-Z]_\{?\w+\}?|\b[a-zA-Z]\(\w+\))\s*(?:=|is|equals)\s*$")
_CONDITION_AFTER = re.compile(
    r"[^.,;]{0,24}?\b(?:when|whenever|if|unless|only|provided|assuming|in (?:the )?case|for (?:a|an|the|each|every|all|some|any))\b",
    re.IGNORECASE,
)
_CODE_HINT = re.compile(
    r"`|\b(?:python|javascript|typescript|java|rust|golang|c\+\+|sql|code|coding|bug|traceback|exception|"
    r"stack trace|compiler?|runtime|docstring|api|slice|slicing|array|loop|index|indices|return value|returns|"
    r"unit tests?|off-by-one|null|none|boolean|dict|hashable|iterator)\b",
    re.IGNORECASE,
)
_LIST_NUMBER = re.compile(r"^\s*\d+[.)]\s")
_NUMBERED_ITEM_START = re.compile(r"^\s*(?:[-*]\s*)?\d+[.)]\s+")


@dataclass(frozen=True)
class Found:
    """An answer found in one sentence."""

    text: str
    key: str
    explicit: bool
    subject: str | None = None  # what the value was assigned to ("N" in "N = 5694", "2L + \\pi W"), if anything
    approximate: bool = False  # reached as an approximation ("≈ 13.288", "about 28 degrees")


def is_reflection(sentence: str) -> bool:
    """Whether the sentence opens a reflection (a check, a doubt or another approach)."""
    return _REFLECTION.match(sentence.lstrip()) is not None


def is_rejection(sentence: str) -> bool:
    """Whether a reflection rejects what came before ("Wait, no", "That can't be right", "I made a mistake")."""
    return _REJECTION.match(sentence.lstrip()) is not None


def is_lead_in(sentence: str) -> bool:
    """A sentence that announces a value on the following line(s): "So the answer is:", "**Final Answer**", or
    one cut at an operator ("t =", "3 +")."""
    stripped = sentence.strip()
    if _FINAL_HEADING.match(stripped):
        return True
    if stripped.endswith(":") and (
        _EXPLICIT_PHRASE.search(stripped) or (_CONCLUSION.match(stripped) and _ANNOUNCING_END.search(stripped))
    ):
        return True
    if _CUT_AT_OPERATOR.search(stripped):
        return True  # "t =", "So the total is 3 +": the expression goes on on the next line
    return stripped.count("\\[") > stripped.count("\\]")


def has_code_hint(sentence: str) -> bool:
    """Whether a sentence talks about code (implicit numeric conclusions there are indices, not answers)."""
    return _CODE_HINT.search(sentence) is not None


def find_answer(sentence: str, implicit: bool = True, tuples: bool = False, choices: bool = False) -> Found | None:
    """The answer a sentence reaches, or None. ``sentence`` is one complete sentence (or a lead-in + block).

    ``tuples``: a conclusion may also end on a tuple or an interval ("So the solution is (0, 9) ∪ (9, 36).");
    only when the question asks for one (otherwise a point or a range on the way is not the answer).
    ``choices``: the question is multiple choice, so a conclusion may end on an option letter ("So the correct
    option is (B).")."""
    text = math_text(sentence.strip())
    if not text or text.endswith("?"):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return _found(boxed, explicit=True)
    if _NOT_A_CLAIM.match(text):
        return None
    phrases = list(_EXPLICIT_PHRASE.finditer(text))
    phrase = phrases[-1] if phrases else None
    if phrase is not None and not _negated(text, phrase.start()):
        value = _value_after(text[phrase.end() :])
        if value is not None:
            return _found(value, explicit=True)
    if _FINAL_HEADING.match(text.split("\n", 1)[0]):
        value = _last_value(text)
        return _found(value, explicit=True) if value is not None else None
    if not implicit or not _CONCLUSION.match(_NUMBERED_ITEM_START.sub("", text)):
        return None
    if choices:
        letters = list(_CHOICE_VALUE.finditer(text))
        if letters:
            return _found(letters[-1].group(1), explicit=False)
    value = _last_value(text, tuples)
    return _found(value, explicit=False) if value is not None else None


def is_cut(value: str) -> bool:
    """Whether a value stops mid-expression: at a trailing operator (``3 +``, ``30.00 -``, ``2 \\cdot``) or with a
    bracket left open (``(3, 4``, ``\\frac{1}{``). An interval's mixed brackets (``[1, 3)``) are balanced."""
    text = value.strip().rstrip(".").strip()
    if _TRAILING_OPERATOR.search(text):
        return True
    opened = text.count("(") + text.count("[")
    return opened != text.count(")") + text.count("]") or text.count("{") != text.count("}")


def _found(value: str | tuple[str, str | None, bool], explicit: bool) -> Found | None:
    text, subject, approximate = value if isinstance(value, tuple) else (value, None, False)
    if is_cut(text):
        return None
    key = canonical(text)
    if not key or len(key) > 80:
        return None
    return Found(text.strip(), key, explicit, subject, approximate)


def _negated(text: str, index: int) -> bool:
    return _NEGATION_BEFORE.search(text[max(0, index - 24) : index]) is not None


def _value_after(rest: str) -> str | tuple[str, str | None, bool] | None:
    """The value right after "the answer is": a math span, or the words up to a clause break."""
    rest = rest.strip()
    if not rest:
        return None
    span = _MATH_SPAN.match(rest)
    if span:
        return _rhs(next(group for group in span.groups() if group is not None))
    number = _BARE_NUMBER.match(rest)
    if number and not _OPERATOR_AFTER.match(rest, number.end()) and not _LIST_AFTER.match(rest, number.end()):
        return number.group(0)
    letter = _LETTER_HEAD.match(rest)
    if letter:
        return letter.group(1) or letter.group(2)  # "B) 42", "(C).", "B."
    bracketed = _bracketed(rest)
    if bracketed is not None:
        return bracketed
    head = re.split(r",\s|;|\s(?:because|since|which|as|but|so|and then|when|if)\s|\s\(", rest, maxsplit=1)[0]
    head = head.rstrip(".").strip()
    subject = None
    if "=" in head and not re.search(r"[<>]|\\[lg]e", head):
        left, head = (side.strip() for side in head.rsplit("=", 1))  # "1 + 115 = 116": the result
        subject = _lhs(left)
    if not head or len(head) > 60 or re.search(r"(?<!\\)\b[a-zA-Z]{3,}\b", _UNITS_TAIL.sub("", head)):
        return _last_value(rest)
    if not any(ch.isdigit() for ch in head) and not re.fullmatch(r"\(?[A-J]\)?", head) and "\\" not in head:
        return _last_value(rest)
    return head, subject, False


def _bracketed(rest: str) -> str | None:
    """A whole tuple, vector or interval at the start of ``rest`` ("(6, 31, -1)", "[-2; -14; -7]", "(0, 9) ∪ (9, 36)")."""
    if not rest or rest[0] not in "([":
        return None
    depth = 0
    for index, char in enumerate(rest[:120]):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                end = index + 1
                union = re.match(r"\s*(?:\\cup|U|union|or|and)\s*[(\[]", rest[end:])
                if union:
                    tail = _bracketed(rest[end + union.end() - 1 :])
                    if tail is not None:
                        return rest[:end] + " \\cup " + tail
                body = rest[:end]
                if re.search(r"[,;]", body) and any(ch.isdigit() for ch in body):
                    return body
                return None
    return None


def _rhs(math: str) -> str | None:
    """Right-hand side of the last relation in a math span, or the span itself; None if it is a bare symbol."""
    value = re.split(r"=|\\approx|\\equiv|≈", math)[-1].strip().rstrip(".,").strip()
    if not value or re.fullmatch(r"[A-Za-z]|\\[a-zA-Z]+", value):
        return None
    if (
        not any(ch.isdigit() for ch in value)
        and "\\frac" not in value
        and "\\sqrt" not in value
        and "\\pi" not in value
    ):
        return None
    return value


def _last_value(text: str, tuples: bool = False) -> tuple[str, str | None, bool] | None:
    """The last result value of a sentence: a value right after a result cue ("=", "is", "are", "equals",
    "gives" ...), either a math span's right-hand side or a bare number, skipping labels and operands."""
    candidates: list[tuple[int, int, str, str | None, bool]] = []
    spans: list[tuple[int, int]] = []
    for match in _MATH_SPAN.finditer(text):
        spans.append(match.span())
        body = next(group for group in match.groups() if group is not None)
        value = _rhs(body)
        if value is not None and ("=" in body or "\\approx" in body or _cued(text, match.start())):
            sides = re.split(r"=|\\approx|≈", body)
            subject = _lhs(sides[-2]) if len(sides) > 1 else _lhs_before(text, match.start())
            approximate = bool(re.search(r"(?:\\approx|≈)[^=]*$", body)) or _approximate(text, match.start())
            if not (len(sides) > 1 and _INEQUALITY_BEFORE.search(sides[-2])):
                candidates.append((match.end(), match.start(), value, subject, approximate))
    for match in _BARE_NUMBER.finditer(text):
        if any(start <= match.start() < end for start, end in spans):
            continue
        if match.start() == 0 and _LIST_NUMBER.match(text):
            continue
        if _LABEL_BEFORE.search(text[max(0, match.start() - 12) : match.start()]):
            continue
        if _OPERATOR_AFTER.match(text, match.end()) or not _cued(text, match.start()):
            continue
        if _LIST_AFTER.match(text, match.end()) or _INDEXED_BEFORE.search(
            text[max(0, match.start() - 24) : match.start()]
        ):
            continue  # one item of a list ("11, 10, 9"), one of alternatives ("0 or 5"), or an indexed quantity
        start = match.start()
        candidates.append((match.end(), start, match.group(0), _lhs_before(text, start), _approximate(text, start)))
    if tuples:
        for match in re.finditer(r"[(\[]", text):
            if any(start < match.start() < end for start, end in spans) or not _cued(text, match.start()):
                continue
            bracketed = _bracketed(text[match.start() :])
            if bracketed is not None:
                candidates.append((match.start() + len(bracketed), match.start(), bracketed, None, False))
    if not candidates:
        return None
    _end, start, value, subject, approximate = max(candidates)
    if _negated(text, start) or not (_SIMPLE_VALUE.fullmatch(value.replace(" ", "")) or value[0] in "(["):
        return None
    if _CONDITION_AFTER.match(text, _end):
        return None  # "is 0 when the input is empty", "is 0 only for one element": a case, not a result
    if _DISCARDED_AFTER.match(text, _end):
        return None
    return value, subject, approximate


_FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "gcd", "lcm"}


def _lhs(side: str) -> str | None:
    """What stands on the left of ``=``: the last clause before it ("N", "2L+\\piW", "1+115"), compact."""
    cut = _LHS_CUT.match(side)
    tokens = (side[cut.end() :] if cut else side).split()
    while len(tokens) > 1 and re.fullmatch(r"[A-Za-z]{2,}[,.]?", tokens[0]) and tokens[0] not in _FUNCTIONS:
        tokens.pop(0)  # words before the math: "only k", "the value x"
    name = re.sub(r"\$|\\\(|\\\)", "", "".join(tokens)).strip(".")
    return name if 0 < len(name) <= 40 else None


def _lhs_before(text: str, index: int) -> str | None:
    """The left side when the value at ``index`` follows ``=`` in plain text."""
    before = text[max(0, index - 60) : index]
    match = re.search(r"=\s*(?:\\\(|\$)?\s*$", before)
    if match is None or (match.start() > 0 and before[match.start() - 1] in "<>!"):
        return None
    return _lhs(before[: match.start()])


def _approximate(text: str, index: int) -> bool:
    return _APPROXIMATE_BEFORE.search(text[max(0, index - 24) : index]) is not None


def _cued(text: str, index: int) -> bool:
    """Whether the value at ``index`` follows a result cue (an inequality is not one: "a^2 + 2a >= 0")."""
    before = text[max(0, index - 40) : index]
    return _RESULT_CUE.search(before) is not None and _INEQUALITY_BEFORE.search(before) is None
