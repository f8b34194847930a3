"""Answer extraction and canonical keys.

``canonical`` maps an answer string to a key so that ``2``, ``2.0``, ``\\frac{4}{2}``, ``4/2`` and
``\\boxed{2}`` share one key; equal keys mean equal answers. Pairs whose keys differ and are not both plain numbers
are for Math-Verify (:mod:`controller.equality` says how a policy compares them, :mod:`controller.verify` runs
Math-Verify); :func:`as_latex` is the text it reads. Everything here is pure string work, bounded by the length of
its input.

:func:`math_text` rewrites the Unicode math models write in plain text (``6√2``, ``3840⁄289``, ``2π``, ``−3``,
``x²``, ``90°``) as the LaTeX Math-Verify reads, so an answer is extracted and compared whole. Mixed numbers
(``137\\frac{1}{2}``) and column vectors (``\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}``, ``[1; 2]``) get keys of
their own (``275/2``, ``(1,2)``). :func:`plain_digits` reads thousands separators as digits (``3,840/289`` is
``3840/289``) outside brackets, so a tuple or an interval (``(3, 840)``, ``(3,840)``) stays a pair: keys and
Math-Verify inputs both see the number as written.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

_BOXED_OPENERS = ("\\boxed{", "\\fbox{", "\\boxed {")


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` in ``text`` (balanced braces); unterminated ones are skipped."""
    found: list[str] = []
    start = 0
    while True:
        hits = [(text.find(opener, start), opener) for opener in _BOXED_OPENERS]
        hits = [(index, opener) for index, opener in hits if index >= 0]
        if not hits:
            return found
        index, opener = min(hits)
        body_start = index + len(opener)
        depth = 1
        position = body_start
        while position < len(text) and depth:
            char = text[position]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            position += 1
        if depth:
            return found
        found.append(text[body_start : position - 1].strip())
        start = position


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` content of ``text``, or None."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUBSCRIPTS = str.maketrans("₀₁₂₃₄₅₆₇₈₉", "0123456789")
_PLAIN = {
    "−": "-", "–": "-", "×": "\\times", "·": "\\cdot", "⋅": "\\cdot", "÷": "\\div", "⁄": "/", "∕": "/",
    "π": "\\pi", "°": "^\\circ", "∞": "\\infty", "∪": "\\cup", "≤": "\\le", "≥": "\\ge", "≠": "\\ne",
    "≈": "\\approx", "θ": "\\theta", "√": "\\sqrt", "∛": "\\sqrt[3]", "∜": "\\sqrt[4]",
}  # fmt: skip
_UNICODE = re.compile("|".join(map(re.escape, _PLAIN)) + "|[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+|[₀₁₂₃₄₅₆₇₈₉]+")
_ROOT_ARGUMENT = re.compile(
    r"(\\sqrt(?:\[\d\])?)\s*(?:\(([^()]*(?:\([^()]*\)[^()]*)*)\)|(\d+(?:\.\d+)?|[a-zA-Z]\b|\\pi\b))"
)
_GLUED_COMMAND = re.compile(r"(\\(?:times|cdot|div|pi|infty|cup|le|ge|ne|approx|theta))(?=[A-Za-z])")
_PLAIN_WORDS = re.compile(r"(?<![A-Za-z\\])(?:pi|infinity)(?![A-Za-z])")
_ASCII_MATH = re.compile(r"sqrt|cbrt|(?<![A-Za-z\\])(?:pi|infinity)(?![A-Za-z])")
_ASCII_ROOT = re.compile(r"(?<![\\a-zA-Z])(sqrt|cbrt)\s*(?=[({\d])")


def math_text(text: str) -> str:
    """``text`` with Unicode math and ASCII ``sqrt(..)`` spelled as LaTeX: ``6√2`` -> ``6\\sqrt{2}``,
    ``3840⁄289`` -> ``3840/289``, ``x²`` -> ``x^{2}``, ``−3`` -> ``-3``, ``2π`` -> ``2\\pi``. Length-bounded work."""
    if text.isascii() and not _ASCII_MATH.search(text):
        return text

    def plain(match: re.Match[str]) -> str:
        found = match.group(0)
        if found in _PLAIN:
            return _PLAIN[found]
        if found[0] in "₀₁₂₃₄₅₆₇₈₉":
            return "_{" + found.translate(_SUBSCRIPTS) + "}"
        return "^{" + found.translate(_SUPERSCRIPTS) + "}"

    text = _UNICODE.sub(plain, text)
    text = _PLAIN_WORDS.sub(lambda m: "\\pi" if m.group(0) == "pi" else "\\infty", text)
    text = _GLUED_COMMAND.sub(r"\1 ", text)  # "\\piW" -> "\\pi W": a command never swallows the next letter
    text = _ASCII_ROOT.sub(lambda m: "\\sqrt" if m.group(1) == "sqrt" else "\\sqrt[3]", text)
    return _ROOT_ARGUMENT.sub(lambda m: f"{m.group(1)}{{{(m.group(2) or m.group(3)).strip()}}}", text)


_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d]|,\d|\.\d*,)")
_OPEN = "(["
_CLOSE = ")]"


def plain_digits(text: str) -> str:
    """``text`` with thousands separators dropped from numbers written with them (``3,840`` -> ``3840``,
    ``20,000/\\pi`` -> ``20000/\\pi``, ``1,000,000`` -> ``1000000``), except inside parentheses or brackets,
    where a comma separates the items of a tuple, a vector or an interval (``(3,840)`` stays a pair).
    Only groups of exactly three digits after each comma are read as one number. Linear in ``len(text)``."""
    if "," not in text:
        return text
    depth = 0
    depths: list[int] = []
    for char in text:
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        depths.append(depth)
    return _GROUPED.sub(lambda m: m.group(0).replace(",", "") if depths[m.start()] == 0 else m.group(0), text)


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"\s*(?:\\[,;!]\s*)*(?:units?|square\s+units|sq\.?\s*units|miles?|mph|km|kilometers?|meters?|cm|mm|inches|inch|"
    r"feet|foot|ft|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|dollars?|cents?|"
    r"degrees?|people|students?|ways|pounds?|kg|grams?|g|liters?|cups?|apples?|marbles?|points?|"
    r"numbers?|integers?|times|percent|pages?|books?|boxes|eggs?|cookies?)\b\.?\s*$",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")
_FRACTION = re.compile(r"^([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{([-+]?\d+)\}$")
_SIMPLE_FRACTION = re.compile(r"^([-+]?\d+)\s*/\s*(\d+)$")
_CHOICE = re.compile(r"^\(?([A-J])\)?$")
_POWER = re.compile(r"^([-+]?)(\d{1,6})\^(?:\{([-+]?\d{1,2})\}|([-+]?\d))$")
_MIXED = re.compile(r"^([-+]?)(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}|\s+(\d+)/(\d+))$")
_VECTOR = re.compile(
    r"^\\begin\{[pb]matrix\}(.*)\\end\{[pb]matrix\}$|^\[([^\[\];]*;[^\[\]]*)\]$|^\[([^\[\],]*(?:,[^\[\],]*){2,})\]$",
    re.DOTALL,
)


def _strip_wrappers(answer: str) -> str:
    text = math_text(answer.strip())
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    for _ in range(3):
        text = text.strip().rstrip(".").strip()
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
                text = text[len(left) : len(text) - len(right)].strip()
    text = _TEXT_WRAPPERS.sub(r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "").replace("\\%", "").replace("%", "")
    text = re.sub(r"(?<!\\)\\[$!,]", "", text)
    text = re.sub(r"(?<!\\)\\ ", " ", text)
    text = re.sub(r"^[a-zA-Z]\s*=\s*(?=[-+\d\\(])", "", text)  # "x = 5" -> "5"
    text = _UNIT_WORDS.sub("", text)
    return plain_digits(text.strip().rstrip(".").strip())


def _as_fraction(text: str) -> Fraction | None:
    match = _MIXED.match(text.strip())
    if match:
        numerator, denominator = int(match.group(3) or match.group(5)), int(match.group(4) or match.group(6))
        if not 0 < numerator < denominator:
            return None
        value = int(match.group(2)) + Fraction(numerator, denominator)
        return -value if match.group(1) == "-" else value
    compact = text.replace(" ", "")
    power = _POWER.match(compact)
    exponent = int(power.group(3) or power.group(4)) if power else 0
    if power and (int(power.group(2)) or exponent > 0):
        value = Fraction(int(power.group(2))) ** exponent
        return -value if power.group(1) == "-" else value  # -2^2 is -(2^2)
    if _NUMBER.match(compact) and any(ch.isdigit() for ch in compact):
        return Fraction(compact.replace(",", ""))
    match = _FRACTION.match(compact)
    if match and int(match.group(3)) != 0:
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return -value if match.group(1) == "-" else value
    match = _SIMPLE_FRACTION.match(compact)
    if match and int(match.group(2)) != 0:
        return Fraction(int(match.group(1)), int(match.group(2)))
    return None


def _vector(text: str) -> str | None:
    """``(a,b,c)`` for a column vector written as a pmatrix or as ``[a; b; c]``."""
    match = _VECTOR.match(text.strip())
    if not match:
        return None
    body = next(group for group in match.groups() if group is not None)
    parts = [part.strip() for part in re.split(r"\\\\|;|,", body) if part.strip()]
    if len(parts) < 2 or any("&" in part for part in parts):
        return None
    return "(" + ",".join(canonical(part) for part in parts) + ")"


@lru_cache(maxsize=4096)
def canonical(answer: str) -> str:
    """A normalized key: numbers as reduced fractions, choices as a capital letter, else compact LaTeX."""
    text = _strip_wrappers(answer)
    value = _as_fraction(text)
    if value is not None:
        return str(value)
    choice = _CHOICE.match(text)
    if choice:
        return choice.group(1)
    vector = _vector(text)
    if vector is not None:
        return vector
    return re.sub(r"\s+", "", text)


def is_numeric_key(key: str) -> bool:
    """True when a canonical key is a plain rational number."""
    return bool(re.fullmatch(r"-?\d+(?:/\d+)?", key))


def as_latex(answer: str) -> str:
    """The answer as the LaTeX Math-Verify reads: its wrappers stripped (as for its key), in ``$...$``."""
    text = _strip_wrappers(answer)
    return f"${text}$"
