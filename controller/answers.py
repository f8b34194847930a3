"""Answer extraction and equivalence.

``canonical`` maps an answer string to a key so that ``2``, ``2.0``, ``\\frac{4}{2}``, ``4/2`` and
``\\boxed{2}`` share one key; equal keys mean equal answers. When keys differ and either side is not a plain
number, :class:`AnswerComparer` asks Math-Verify in a worker process under a time bound (Math-Verify's own
``signal.alarm`` timeout only works on the main thread, so it is switched off). The bound is CPU time by default
(the worker's own CPU seconds, so a verdict does not depend on how loaded the machine is), or wall-clock time
where latency is what matters (the server); a comparison that outlives a wall-clock bound is stopped by killing
its worker process, which a pebble process pool replaces.

:func:`math_text` rewrites the Unicode math models write in plain text (``6√2``, ``3840⁄289``, ``2π``, ``−3``,
``x²``, ``90°``) as the LaTeX Math-Verify reads, so an answer is extracted and compared whole. Mixed numbers
(``137\\frac{1}{2}``) and column vectors (``\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}``, ``[1; 2]``) get keys of
their own (``275/2``, ``(1,2)``). :func:`plain_digits` reads thousands separators as digits (``3,840/289`` is
``3840/289``) outside brackets, so a tuple or an interval (``(3, 840)``, ``(3,840)``) stays a pair: keys and
Math-Verify inputs both see the number as written.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal

log = logging.getLogger(__name__)
#: how long a caller waits, beyond the bound, for a worker process to come up (spawn + Math-Verify import)
WORKER_START_SECONDS = 60.0
#: with a CPU-time bound, the wall-clock time after which a comparison is stopped anyway (by killing its worker),
#: as a multiple of the bound: only a comparison stuck where no signal reaches it (inside one long C call) gets
#: there; a machine that gives the worker a thirtieth of a core still finishes a comparison within its bound
CPU_BOUND_WALL_FACTOR = 30.0
Clock = Literal["cpu", "wall"]

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


class AnswerComparer:
    """Decides answer equivalence: canonical keys first, Math-Verify (time-bounded, in a worker process) second.

    One comparer may be shared by many controllers and threads; verdicts are cached by key pair, a pair whose
    comparison timed out included (it counts as "not equal" and is never compared again). Math-Verify runs in
    worker processes (spawned on first use, Math-Verify imported there once).

    ``clock="cpu"`` (the default): a comparison that has used ``timeout_seconds`` of its worker's CPU time is
    interrupted there (``ITIMER_PROF``); the worker lives on. The verdicts are then the same on an idle and on a
    loaded machine, which offline evaluation needs (its figures must not depend on the load). A comparison still
    running ``CPU_BOUND_WALL_FACTOR`` times the bound in wall-clock time is stopped as below.
    ``clock="wall"``: a comparison still running ``timeout_seconds`` after a worker took it is stopped by killing
    that worker (its CPU is freed at once), and a fresh one replaces it: a bound on latency, for a server.
    :meth:`close` stops the workers; after it, comparisons use the keys only.
    """

    def __init__(
        self, timeout_seconds: float = 2.0, verify: Callable[[str, str], bool] | None = None, clock: Clock = "cpu"
    ) -> None:
        """``verify`` is the comparison the workers run (Math-Verify by default); it must be a module-level
        function, which the worker processes import by name."""
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', not {clock!r}")
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self._verify = verify or _math_verify_equal
        self._cache: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._pool: Any = None
        self._closed = False
        self.timeouts = 0

    def warm_up(self) -> None:
        """Start the worker process now (it imports Math-Verify and sympy, a second or two), not at the first
        comparison."""
        pool = self._worker_pool()
        if pool is not None:
            pool.schedule(_math_verify_equal, args=("1", "1"))  # the pool starts its worker with its first task

    def close(self) -> None:
        """Stop the worker process (idempotent). Later comparisons fall back to "not equal" beyond the keys."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.stop()
            pool.join(timeout=5)

    def equal(self, first: str, second: str) -> bool:
        """Whether two answers are the same mathematical object."""
        key_a, key_b = canonical(first), canonical(second)
        if key_a == key_b:
            return True
        if not key_a or not key_b:
            return False
        if is_numeric_key(key_a) and is_numeric_key(key_b):
            return False
        pair = (key_a, key_b) if key_a <= key_b else (key_b, key_a)
        with self._lock:
            if pair in self._cache:
                return self._cache[pair]
        result = self._verify_bounded(first, second)
        with self._lock:
            self._cache[pair] = result
        return result

    def _worker_pool(self) -> Any:
        with self._lock:
            if self._pool is None and not self._closed:
                from pebble import ProcessPool

                # spawn, not fork: the server process runs threads (event loop, engine) that fork would copy mid-state
                context = multiprocessing.get_context("spawn")
                # two workers: while a killed one is replaced (a second or more), the other takes the next pair
                self._pool = ProcessPool(max_workers=2, initializer=_import_math_verify, context=context)
                # a process that exits without close() (a replay worker) stops the workers first: multiprocessing
                # joins a process's live children at its exit, and these would otherwise wait for tasks forever
                multiprocessing.util.Finalize(self, _stop_pool, args=(self._pool,), exitpriority=10)
            return self._pool

    def _verify_bounded(self, first: str, second: str) -> bool:
        pool = self._worker_pool()
        if pool is None:
            return False
        task: Callable[..., bool | None]
        args: tuple[Any, ...]
        if self.clock == "cpu":
            task, args = _cpu_bounded, (self._verify, first, second, self.timeout_seconds)
            wall = self.timeout_seconds * CPU_BOUND_WALL_FACTOR
        else:
            task, args, wall = self._verify, (first, second), self.timeout_seconds
        try:
            # a wall-clock bound runs from the moment a worker takes the task; waiting for a worker that is starting
            # up (after a kill) is not part of it, so the verdict does not depend on when the comparison is asked
            future = pool.schedule(task, args=args, timeout=wall)
            verdict = future.result(timeout=wall + WORKER_START_SECONDS)
        except FutureTimeout:
            future.cancel()  # the caller's own limit (no worker came up): stop the task wherever it is
            stopped = f"{wall:.1f} s"
        except Exception as error:  # noqa: BLE001 - a crashed or closed worker means "not shown equal"
            log.warning("answer comparison failed (%s: %s); counted as not equal", type(error).__name__, error)
            return False
        else:
            if verdict is not None:
                return bool(verdict)
            stopped = f"{self.timeout_seconds:.1f} CPU s"
        self.timeouts += 1
        log.warning("answer comparison stopped after %s: %.80r vs %.80r", stopped, first, second)
        return False


class _OutOfCpuTime(Exception):
    """Raised in a worker whose comparison used up its CPU-time bound."""


def _out_of_cpu_time(signum: int, frame: Any) -> None:
    raise _OutOfCpuTime


def _cpu_bounded(verify: Callable[[str, str], bool], first: str, second: str, seconds: float) -> bool | None:
    """``verify(first, second)`` in a worker, interrupted once it has used ``seconds`` of this process's CPU time
    (``ITIMER_PROF`` counts CPU time, not the time other processes take); None when it was. Runs on the worker's
    main thread, where signal handlers run."""
    previous = signal.signal(signal.SIGPROF, _out_of_cpu_time)
    try:
        signal.setitimer(signal.ITIMER_PROF, seconds)
        try:
            return verify(first, second)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _OutOfCpuTime:
        return None
    finally:
        signal.signal(signal.SIGPROF, previous)


def _stop_pool(pool: Any) -> None:
    pool.stop()
    pool.join(timeout=5)


def _import_math_verify() -> None:
    """Worker initializer: import Math-Verify (and sympy) and run one comparison (its parser builds lazily), so
    that the first real comparison's clock starts on a warm worker."""
    _math_verify_equal("\\frac{1}{2}", "0.5")


def _as_latex(answer: str) -> str:
    text = _strip_wrappers(answer)
    return f"${text}$"


def _math_verify_equal(first: str, second: str) -> bool:
    """Math-Verify equivalence with its signal-based timeouts disabled (we bound time ourselves)."""
    import logging

    from math_verify import parse, verify  # heavy import (sympy), only when needed

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its signal timeout

    gold = parse(_as_latex(first), parsing_timeout=None)
    target = parse(_as_latex(second), parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))
