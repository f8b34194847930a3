"""Answer equality as the stop policies use it: a callable ``equal(first, second) -> bool``.

Canonical keys (:func:`controller.answers.canonical`) decide most pairs at once (:func:`key_verdict`); the rest need
Math-Verify, which runs in worker processes (:mod:`controller.verify`) and may take a while. Two equalities are
made from the same :class:`Verdicts`:

- a synchronous one (offline evaluation, tests): :class:`controller.verify.AnswerComparer` runs Math-Verify when
  the keys do not decide and records the verdict;
- one that never blocks (the server): :meth:`Verdicts.equal_now` answers from the keys and the recorded verdicts
  and raises :class:`ComparisonPending` for any other pair. The caller compares that pair elsewhere (off its event
  loop), records the verdict, and asks again.

Invariants: a policy step that raises :class:`ComparisonPending` has changed nothing (every comparison of a step
comes before its first change of state), so asking again after the verdict is recorded gives exactly what a
synchronous equality would have given at that point. A recorded verdict never changes. :class:`Verdicts` is
safe to share between threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from controller.answers import canonical, is_numeric_key

Equal = Callable[[str, str], bool]


class ComparisonPending(Exception):
    """Raised by an equality that cannot tell ``first`` and ``second`` apart without running Math-Verify."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first, second)
        self.first = first
        self.second = second


def key_verdict(key_a: str, key_b: str) -> bool | None:
    """What two canonical keys tell: True when they are the same, False when either is empty or both are plain
    numbers (different numbers), None when only Math-Verify can tell."""
    if key_a == key_b:
        return True
    if not key_a or not key_b:
        return False
    if is_numeric_key(key_a) and is_numeric_key(key_b):
        return False
    return None


class Verdicts:
    """The answer pairs whose equality is known without running anything: by their keys, or recorded."""

    def __init__(self) -> None:
        self._recorded: dict[tuple[str, str], bool] = {}  # unordered pair of canonical keys -> verdict
        self._lock = threading.Lock()

    def known(self, first: str, second: str) -> bool | None:
        """Whether ``first`` and ``second`` are the same answer, when the keys or a recorded verdict tell; else None."""
        key_a, key_b = canonical(first), canonical(second)
        verdict = key_verdict(key_a, key_b)
        if verdict is not None:
            return verdict
        with self._lock:
            return self._recorded.get((key_a, key_b) if key_a <= key_b else (key_b, key_a))

    def record(self, first: str, second: str, verdict: bool) -> bool:
        """Record the verdict of a pair the keys do not decide; the verdict that stands (the first recorded)."""
        key_a, key_b = canonical(first), canonical(second)
        with self._lock:
            return self._recorded.setdefault((key_a, key_b) if key_a <= key_b else (key_b, key_a), verdict)

    def equal_now(self, first: str, second: str) -> bool:
        """The equality that never blocks: the known verdict, else :class:`ComparisonPending`."""
        verdict = self.known(first, second)
        if verdict is None:
            raise ComparisonPending(first, second)
        return verdict
