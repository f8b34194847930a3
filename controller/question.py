"""What a question asks for: the form of its answer, the combination it wants, its multiple-choice options.

Pure functions of the question text (the request's last user message, or a completion's prompt), read once
per request. :func:`read_question` returns a :class:`Question`; :meth:`Question.admits` says whether an answer
*can* be the requested one. It only rejects what the question rules out in so many words, so a question it
cannot read admits everything:

- an integer is required by "how many" / "the number of" (unless another form is asked for), by "the
  remainder", by "what integer" / "the least positive integer", and by a combination of letters declared
  integers ("where m and n are relatively prime positive integers ... Find m + n");
- a probability (the question's final ask) is a number in [0, 1];
- "simplest radical form" needs a root, "in terms of pi" needs pi, "interval notation" an interval,
  "ordered pair" / "in the form (r, theta)" a tuple, 'Enter "odd", "even", or "neither"' one of those words;
- a combination (m + n, Q + R, a + b + m) is never answered by one of its parts ("m = -3", "N = 5694");
- multiple choice ((A)-(E) or A)-J)): an answer is a letter of the options or an option's text (which is
  that option's letter); anything else is not the answer.

An evaluation harness's instruction lines ("Please reason step by step, and put your final answer within
\\boxed{}.", "... e.g., Answer: \\boxed{45}", "The last line of your response should be of the following format:
'Answer: $LETTER'") are not part of the question: :func:`split_instructions` sets them apart, the ask, the
options and the given numbers are read without them, and the sample answers they quote (``45``, ``C``) are the
question's ``examples``. A sentence of the thinking that quotes the instructions (:func:`quotes_instructions`)
never answers with an example value, and an example value answers only once the thinking has reached it in its
own working (:func:`derives`), outside a box and outside a quote.

Invariant: :meth:`Question.admits` never raises and is True for every answer when ``question`` is empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.answers import canonical, find_boxed, is_numeric_key, math_text

_ASK_START = re.compile(
    r"(?:^|(?<=[.?!:;\]$]))\s*(?=(?:find|what|which|compute|calculate|determine|evaluate|how|express|enter|"
    r"give|simplify|solve|for how|in how)\b)",
    re.IGNORECASE,
)
_MEASURE = (
    r"(?:more |fewer |less )?(?:square |cubic )?(?:gallons?|miles?|dollars?|cents?|hours?|minutes?|seconds?|days?|"
    r"weeks?|months?|years?|inches|feet|foot|yards?|meters?|centimeters?|kilometers?|cups?|pounds?|ounces?|"
    r"liters?|units?|degrees?|times|percent)\b"
)
_COUNT = re.compile(rf"\bhow many (?!{_MEASURE})|\bthe number of (?!{_MEASURE})", re.IGNORECASE)
_OTHER_FORM = re.compile(
    r"\bdecimal\b|\bfraction\b|\bmixed number\b|\bnearest\b|\bin terms of\b|\bpercent\b|\bradical\b|"
    r"\bscientific notation\b|\bexpress(?:ed)? (?:your answer )?(?:as|in)\b|\binterval notation\b|\bas a decimal\b|%",
    re.IGNORECASE,
)
_INTEGER_ASK = re.compile(
    r"\bremainder\b(?=.*\b(?:divided by|modulo|mod)\s*\$?\s*\d)|\bwhat (?:positive |negative |nonnegative |odd |even )*integer\b|"
    r"\b(?:least|smallest|largest|greatest) (?:possible )?(?:positive |negative |odd |even )*integer\b|"
    r"\bsum of (?:the |its )?digits\b|\bunits digit\b",
    re.IGNORECASE,
)
_PROBABILITY = re.compile(r"\b(?:what|find|compute|determine) (?:is )?the probability\b", re.IGNORECASE)
_RADICAL = re.compile(r"simplest radical form", re.IGNORECASE)
_IN_TERMS_OF_PI = re.compile(r"in terms of \$?\\?\(?\s*\\pi|in terms of π", re.IGNORECASE)
_INTERVAL = re.compile(r"interval notation|\b(?:find|what is|determine) the range of\b", re.IGNORECASE)
_FRACTION_ASKED = re.compile(
    r"\b(?:as a|in the form of a) (?:common |simplified |reduced )?fraction\b|\bmixed number\b", re.I
)
_DEGREES = re.compile(r"\bin degrees\b|\bdegree measure\b|\bhow many degrees\b", re.IGNORECASE)
_SOLVE_INEQUALITY = re.compile(r"^\s*solve\b[^=]*?(?:<|>|\\le|\\ge|\\leq|\\geq|≤|≥)[^=]*$", re.IGNORECASE | re.DOTALL)
_EXPRESSION = re.compile(
    r"\bequation of\b|\benter the equation\b|\bfind the (?:polynomial|function|equation)\b|\bin terms of \$?\\?\(?\s*[a-z]\b",
    re.IGNORECASE,
)
_APPROXIMATE = re.compile(
    r"\bdecimal\b|\bnearest\b|\bround(?:ed)?\b|\bapproximat|\bestimate|\bsignificant\b|\bpercent", re.IGNORECASE
)
_SOLVE_FOR = re.compile(r"\bsolve for \$?\\?\(?\s*([a-zA-Z])\b", re.IGNORECASE)
_TUPLE = re.compile(
    r"(?:enter|express|give|write|as)\b[^.?]{0,40}\bordered (?:pair|triple|quadruple|tuple)|"
    r"in the form \$*\\?\(?\s*\([^()$]*,[^()$]*\)",
    re.IGNORECASE,
)
_WORDS = re.compile(r"\benter\b[^.]*?((?:[\"“`']+[A-Za-z ]+[\"”`']+,?\s*(?:or\s+)?){2,})", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“`']+([A-Za-z ]+?)[\"”`']+")
_INTEGERS_DECLARED = re.compile(r"\bintegers?\b", re.IGNORECASE)
_MATH_IN_ASK = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)")
_COMBINATION = re.compile(r"\d*\s*[a-zA-Z](?:\^\{?\d\}?)?(?:\s*(?:\+|-|\\cdot|\*)\s*\d*\s*[a-zA-Z](?:\^\{?\d\}?)?)+")
_OPTION_PAREN = re.compile(r"(?:\\textbf\{|\\mathrm\{|\\text\{|(?<![\w(]))\(([A-J])\)\s*\}?")
_OPTION_LINE = re.compile(r"(?:^|\n)\s*\(?([A-J])[).:]\s+", re.MULTILINE)
_WHICH = re.compile(r"\bwhich\b", re.IGNORECASE)
_PROMPT_SENTENCE = re.compile(r"(\n+|(?<=[.!?])[ \t]+(?=[A-Z\\]))")
_BOX = r"(?:\\boxed|\\fbox|\bbox(?:ed)?\b)"
_INSTRUCTION = re.compile(
    rf"\\boxed\s*\{{\s*\}}|\b(?:reason|think|solve|work|answer)\w*\b[^.\n]{{0,40}}\bstep[- ]by[- ]step\b|"
    r"\blast line of your (?:response|answer)\b|\bof the following format\b|\bwithout quotes\b|\$(?:ANSWER|LETTER)\b|"
    r"^\s*answer the following\b|^\s*(?:final )?answer\s*:\s*(?:\\boxed\{|\$)|"
    rf"\b(?:put|place|write|return|give|present|enclose|output|mark)\b[^.\n]{{0,40}}\b(?:answer|response)\b[^\n]{{0,40}}{_BOX}|"
    rf"(?:\be\.g\.|\bfor example\b|\bsuch as\b)[^\n]{{0,40}}(?:{_BOX}|\banswer\s*:)",
    re.IGNORECASE,
)
_EXAMPLE_TAIL = re.compile(r"(?:,\s*)?(?:\be\.g\.|\bfor example\b|\bsuch as\b).*", re.IGNORECASE | re.DOTALL)
_ANSWER_LINE_VALUE = re.compile(
    r"\banswer\s*:\s*(?!\\boxed|\$[A-Z])\(?([^\s,;()'\"]+?)\)?(?=[\s,;.'\"]*(?:$|\s))", re.I
)
_PLACEHOLDER = re.compile(r"\$?[A-Z_]{3,}|\\text\{[^{}]*\}|[A-Za-z ]*answer[A-Za-z ]*|\.\.\.|X|N", re.IGNORECASE)
_QUOTING = re.compile(
    r"\b(?:e\.g\.|for example|for instance|such as|format(?:ted)?|instructions?|instructed|template|example|"
    r"(?:the )?(?:problem|question|prompt|user|they|it) (?:says|said|asks|asked|wants|wanted|instructs|requires|"
    r"specifies|specified|mentions|mentioned|gives|shows|told)|as (?:instructed|shown|required|requested)|"
    r"(?:put|place|write|present|enclose|wrap) (?:the|my|your|it|our) (?:final )?(?:answer|response)?|last line|"
    r"(?:in|inside|within) (?:a |the )?box(?:ed)?\b|like)\b",
    re.IGNORECASE,
)
_MAX_EXAMPLES = 8
_FORM_ASK = re.compile(r"\s*(?:express|enter|give|simplify)\b", re.IGNORECASE)
_QUANTITY = re.compile(
    r"\b(ratio|radius|radii|diameter|side|length|height|width|slope|intercept|discriminant|numerator|denominator|"
    r"term|area|perimeter|circumference|volume|angle|distance|speed|velocity|rate|probability|sum|product|"
    r"difference|quotient|remainder|mean|median|average|coefficient|period|amplitude|determinant|magnitude|norm|"
    r"projection|hypotenuse|altitude|diagonal|inverse|multiplier)(?:s|es)?\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Question:
    """What one question asks for (see the module docstring). Build it with :func:`read_question`."""

    text: str = ""
    integer: bool = False
    nonnegative: bool = False
    probability: bool = False
    radical: bool = False
    pi: bool = False
    interval: bool = False
    tuple_: bool = False
    approximate: bool = False
    fraction: bool = False
    degrees: bool = False
    expression: bool = False
    words: tuple[str, ...] = ()
    target: str | None = None  # the symbol or expression asked for ("x", "m+n", "Q+R", "6x+5")
    combination: bool = False  # the target combines single-letter symbols (m+n, Q+R, a+b+m)
    ask_symbols: frozenset[str] = frozenset()  # single-letter symbols named in the final ask
    options: dict[str, str] = field(default_factory=dict)  # letter -> option text (multiple choice)
    given: frozenset[str] = frozenset()  # keys of the numbers the question itself gives
    examples: tuple[tuple[str, str], ...] = ()  # (text, key) of the sample answers its instructions quote
    quantities: frozenset[str] = frozenset()  # the named quantities its final ask asks for ("area", "term")

    @property
    def multiple_choice(self) -> bool:
        return len(self.options) >= 3

    def choice_key(self, key: str, equal: Callable[[str, str], bool] | None = None) -> str | None:
        """The option letter an answer key stands for: the letter itself, or the option whose text it equals."""
        if not self.multiple_choice:
            return None
        letter = re.fullmatch(r"\(?([A-J])\)?", key)
        if letter and letter.group(1) in self.options:
            return letter.group(1)
        letters = re.findall(r"[A-J]", key)
        if len(letters) > 1 and re.fullmatch(r"(?:\(?[A-J]\)?(?:,|and)?)+", key) and set(letters) <= set(self.options):
            return ",".join(sorted(set(letters)))  # "Enter the letters of the correct options": A, C
        for option, text in self.options.items():
            option_key = canonical(text)
            if option_key and (
                option_key == key or (equal is not None and _comparable(key, option_key) and equal(key, option_key))
            ):
                return option
        return None

    def concludes(self, sentence: str, key: str, explicit: bool) -> bool:
        """Whether an implicit conclusion can answer the question: not a number the question gives ("the
        equation is 3x + 2(1 + x) = 17"); when a combination is asked (m + n), one that names it; when the ask
        names a quantity ("the eighth term"), not one that names only other quantities ("the common ratio")."""
        if explicit or not self.text:
            return True
        if key in self.given:
            return False
        if self.target is not None and self.combination:
            return self.target in re.sub(r"\s|\$|\\\(|\\\)|\\cdot|\*", "", sentence)
        if self.quantities:
            named = _quantities(sentence)
            if named and not named & self.quantities:
                return False  # "So the common ratio is 3/5" where the eighth term is asked: another quantity
        return True

    def admits(self, answer: str, key: str, subject: str | None = None, approximate: bool = False) -> bool:
        """Whether ``answer`` (canonical ``key``) can be what the question asks for. ``subject``: what the value
        was assigned to ("N" in "N = 5694", "2L+\\piW" in "2L + πW = 400"); ``approximate``: reached as an
        approximation ("≈ 13.29"), which answers only a question that asks for a decimal or a rounding."""
        if not self.text:
            return True
        if approximate and not self.approximate:
            return False
        if self.multiple_choice:
            return self.choice_key(key) is not None
        if subject is not None and not self._subject_fits(subject, key):
            return False  # a part of what is asked ("m = 3" for m + n), another named quantity ("k = 8"), an equation
        text = math_text(answer)
        numeric = is_numeric_key(key)
        if self.words:
            lowered = text.lower()
            return any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in self.words)
        if self.integer and not (numeric and "/" not in key):
            return False
        if self.fraction and numeric and "/" not in key:
            return False  # an integer where a fraction or a mixed number is asked for
        if self.degrees and not numeric and re.search(r"\\sqrt|\\pi|\\frac\{[^}]*\\", key):
            return False  # an angle in degrees is a number, not a radical (that is a trigonometric value)
        if self.expression and numeric:
            return False
        if self.target is not None and len(self.target) == 1 and not numeric:
            if re.search(rf"(?<![a-zA-Z\\]){re.escape(self.target)}(?![a-zA-Z])", key):
                return False  # "x = 10^{x/2}": the unknown asked for is still in the answer
        if self.nonnegative and numeric and key.startswith("-"):
            return False
        if self.probability and numeric and not 0 <= _value(key) <= 1:
            return False
        if self.radical and "sqrt" not in text and numeric:
            return False  # a plain rational where a radical is asked for (a rational may still be right: rare)
        if self.pi and "\\pi" not in text and "π" not in text:
            return False
        if self.tuple_ and "," not in text:
            return False
        return not (self.interval and numeric)

    def example_key(self, key: str) -> bool:
        """Whether ``key`` is the key of a sample answer the instructions quote (``45`` of ``\\boxed{45}``)."""
        return any(key == example for _text, example in self.examples)

    def _subject_fits(self, subject: str, key: str) -> bool:
        name = re.sub(r"[{}\s]|\\cdot|\*", "", subject)
        if self.target is not None and name == self.target:
            return True
        if re.fullmatch(r"[A-Za-z](?:_\w+)?", name):
            if self.target is not None:
                return False
            return name not in self.ask_symbols
        letters = re.sub(r"\\[a-zA-Z]+", "", name)
        if not re.search(r"[A-Za-z]", letters):
            return True  # numbers only ("9 + 5 = 14"): a computed result
        if key == "0":
            return False  # "λ^2 - 17λ + 16 = 0", "v · a = 0": an equation set to zero, not a value found
        return (
            not re.search(r"[A-Za-z][^+\-]*[+\-]|[+\-][^+\-]*[A-Za-z]", letters)
            or re.search(r"[=<>]", letters) is not None
        )


def read_question(text: str | None) -> Question:
    """Read what ``text`` asks for. An empty or unreadable question admits every answer."""
    if not text or not text.strip():
        return Question()
    question, instructions = split_instructions(text.strip())
    examples = _examples(instructions)
    options = _options(question)
    if len(options) >= 3:
        return Question(text=question, options=options, examples=examples)
    forms = "\n".join([question, *(_EXAMPLE_TAIL.sub("", line) for line in instructions)])
    ask = _ask(question)
    target, symbols = _target(ask)
    solve_for = _SOLVE_FOR.search(ask)
    if target is None and solve_for is not None:
        target = solve_for.group(1)
    combination = target if target is not None and _COMBINATION.fullmatch(target) and len(target) > 1 else None
    other_form = _OTHER_FORM.search(forms) is not None
    integer = combination is not None and _INTEGERS_DECLARED.search(forms) is not None
    count = _COUNT.search(ask) is not None
    if not other_form and (count or _INTEGER_ASK.search(ask)):
        integer = True
    words: tuple[str, ...] = ()
    found = _WORDS.search(forms)
    if found:
        words = tuple(dict.fromkeys(word.strip().lower() for word in _QUOTED.findall(found.group(1))))
    return Question(
        text=question,
        integer=integer,
        nonnegative=count and not other_form,
        probability=_PROBABILITY.search(ask) is not None and combination is None and "percent" not in ask,
        radical=_RADICAL.search(forms) is not None,
        pi=_IN_TERMS_OF_PI.search(forms) is not None,
        interval=_INTERVAL.search(forms) is not None or _SOLVE_INEQUALITY.search(ask) is not None,
        fraction=_FRACTION_ASKED.search(forms) is not None and combination is None,
        degrees=_DEGREES.search(ask) is not None,
        approximate=_APPROXIMATE.search(forms) is not None,
        expression=_EXPRESSION.search(ask) is not None,
        tuple_=_TUPLE.search(forms) is not None,
        words=words,
        target=target,
        combination=combination is not None,
        ask_symbols=symbols,
        given=_given(question),
        examples=examples,
        quantities=_asked_quantities(question),
    )


def split_instructions(text: str) -> tuple[str, tuple[str, ...]]:
    """``text`` without its instruction sentences, and those sentences (see the module docstring). A sentence is
    an instruction when it tells how to reason or present the answer (a box to fill, "step by step", an answer
    line, "the following format", a sample answer after "e.g."), not what to compute: "Express your answer as a
    common fraction." stays in the question. A text made of instructions only is returned whole."""
    parts = _PROMPT_SENTENCE.split(text)
    kept: list[str] = []
    instructions: list[str] = []
    for index in range(0, len(parts), 2):
        sentence = parts[index]
        if sentence.strip() and _INSTRUCTION.search(sentence):
            instructions.append(sentence.strip())
            continue
        kept.append(sentence)
        if index + 1 < len(parts):
            kept.append(parts[index + 1])
    question = "".join(kept).strip()
    if not instructions or not question:
        return text, ()
    return question, tuple(instructions)


def _examples(instructions: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(text, key) of the sample answers quoted in instruction sentences: filled boxes and "Answer: X" values
    (placeholders such as ``$ANSWER``, ``LETTER`` or ``\\text{answer}`` are not samples)."""
    found: dict[str, str] = {}
    for line in instructions:
        values = [*find_boxed(line), *(match.group(1) for match in _ANSWER_LINE_VALUE.finditer(line))]
        for value in values:
            value = value.strip().strip("$").strip()
            if not value or _PLACEHOLDER.fullmatch(value) or len(value) > 40:
                continue
            key = canonical(value)
            if key and len(found) < _MAX_EXAMPLES:
                found.setdefault(key, math_text(value))
    return tuple((text, key) for key, text in found.items())


def quotes_instructions(sentence: str) -> bool:
    """Whether a sentence of the thinking talks about the prompt's instructions or its sample answer ("the format
    asks for e.g. \\boxed{45}", "so I put it in a box like \\boxed{45}")."""
    return _QUOTING.search(sentence) is not None


def derives(sentence: str, example: str) -> bool:
    """Whether ``sentence`` reaches the sample value ``example`` in the thinking's own working: the value stands
    in it outside every box and after no "answer" phrase, and the sentence does not quote the instructions."""
    if quotes_instructions(sentence):
        return False
    text = math_text(sentence)
    for boxed in find_boxed(text):
        text = text.replace(boxed, " ")
    text = re.sub(r"\banswer\s*(?:is|should be|would be|must be|will be|=|:)\s*\S+", " ", text, flags=re.IGNORECASE)
    escaped = re.escape(example)
    if re.fullmatch(r"[A-J]", example):
        pattern = rf"\({escaped}\)|(?<![\w\\]){escaped}\)|\b(?:option|choice)\s*\(?{escaped}\b"
    else:
        pattern = rf"(?<![\w.\\]){escaped}(?![\w]|\.\d)"
    return re.search(pattern, text) is not None


def _quantities(text: str) -> frozenset[str]:
    """The named quantities a text mentions ("ratio", "area", "term"), singular and lower-case."""
    found = set()
    for match in _QUANTITY.finditer(text):
        word = match.group(1).lower()
        found.add("radius" if word == "radii" else word)
    return frozenset(found)


def _asked_quantities(question: str) -> frozenset[str]:
    """The quantities named by the last sentence that asks for a value ("What is the eighth term ...?"), not by a
    later form instruction ("Express your answer as a common fraction.")."""
    body = re.sub(r"\[asy\].*?\[/asy\]", " ", question, flags=re.DOTALL)
    starts = [match.start() for match in _ASK_START.finditer(body)]
    if not starts:
        return _quantities(body[-300:])
    for start, end in reversed(list(zip(starts, [*starts[1:], len(body)], strict=True))):
        sentence = body[start:end]
        if not _FORM_ASK.match(sentence):
            return _quantities(sentence)
    return frozenset()


def _ask(question: str) -> str:
    """The question's final ask: from the last sentence that starts with an asking word to the end."""
    body = re.sub(r"\[asy\].*?\[/asy\]", " ", question, flags=re.DOTALL)
    starts = [match.start() for match in _ASK_START.finditer(body)]
    return body[starts[-1] :] if starts else body[-300:]


def _target(ask: str) -> tuple[str | None, frozenset[str]]:
    """What the ask names: ``"m+n"`` / ``"x"`` when it ends asking for a symbol or a combination of symbols
    ("Find $m+n$.", "What is $x$?"), and the single-letter symbols its math mentions."""
    maths = [next(group for group in match.groups() if group is not None) for match in _MATH_IN_ASK.finditer(ask)]
    symbols = frozenset(math.strip(" .,?") for math in maths if re.fullmatch(r"\s*[A-Za-z]\s*[.,?]?\s*", math))
    ending = re.search(
        r"(?:find|what is|compute|determine|evaluate|calculate)\s+(?:the value of\s+)?"
        r"(?:\$+([^$]+)\$+|\\\((.+?)\\\)|(\d*[a-zA-Z](?:\s*[+-]\s*\d*[a-zA-Z])+))\s*[.?]?\s*$",
        ask.strip(),
        re.IGNORECASE,
    )
    if ending is None:
        return None, symbols
    target = next(group for group in ending.groups() if group is not None).strip().rstrip(".?,").strip()
    if re.fullmatch(r"[A-Za-z]", target) or _COMBINATION.fullmatch(target):
        return re.sub(r"\s+", "", target), symbols
    if len(target) <= 30 and re.search(r"[A-Za-z]", target) and not re.search(r"[=<>]|\\[a-zA-Z]", target):
        return re.sub(r"\s+|\*|\\cdot", "", target), symbols  # an expression: "6x + 5"
    return None, symbols


def _options(question: str) -> dict[str, str]:
    """Multiple-choice options: ``(A) text (B) text ...`` (AMC/GPQA style) or lines ``A) text``; the letters
    run A, B, C, ... in order and every option has a text."""
    found: dict[str, str] = {}
    question = re.sub(r"\[asy\].*?\[/asy\]", " ", question, flags=re.DOTALL)
    for pattern in (_OPTION_PAREN, _OPTION_LINE):
        matches = list(pattern.finditer(question))
        letters = [match.group(1) for match in matches]
        if len(matches) < 3 or letters != [chr(ord("A") + index) for index in range(len(letters))]:
            continue
        for index, match in enumerate(matches):
            end = matches[index + 1].start() if index + 1 < len(matches) else len(question)
            body = question[match.end() : end].strip()
            body = re.sub(r"^\\[a-z]+\{?\s*|\\qquad|\\quad|\$+$|^\$+", " ", body).strip(" ,;$}")
            found.setdefault(match.group(1), body.split("\n", 1)[0].strip(" ,;$\\"))
        if all(found.values()):
            return found
        found = {}
    return {}


def _given(question: str) -> frozenset[str]:
    """Keys of the numbers written in the question (figures' code left out)."""
    body = re.sub(r"\[asy\].*?\[/asy\]", " ", question, flags=re.DOTALL)
    numbers = re.findall(r"(?<![\w.^_{])-?\d+(?:\.\d+)?(?![\w.])", body)
    return frozenset(canonical(number) for number in numbers)


def _comparable(first: str, second: str) -> bool:
    return not (is_numeric_key(first) and is_numeric_key(second))


def _value(key: str) -> float:
    numerator, _, denominator = key.partition("/")
    return int(numerator) / int(denominator or 1)
