"""The rest of a controller step that waits for an answer comparison (see :mod:`controller.session`, "Comparisons").

A step that cannot make a comparison now stops before it changes anything and leaves the rest of its work here;
:meth:`Waiting.resume` carries it out once the verdict is known. Invariants: at most one step waits at a time; work
chained with :meth:`Waiting.then` runs only after the step that waits has finished (and waits again while that
step does).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Generic, Protocol, TypeVar

from controller.equality import ComparisonPending


class Asks(Protocol):
    """An update that can name the comparison its step waits for."""

    compare: ComparisonPending | None


U = TypeVar("U", bound=Asks)


class Waiting(Generic[U]):
    def __init__(self) -> None:
        self.work: Callable[[U], None] | None = None

    def wait(self, pending: ComparisonPending, update: U, work: Callable[[U], None]) -> None:
        """The step behind ``update`` waits for ``pending``; ``work`` is what is left of it."""
        self.work, update.compare = work, pending

    def then(self, rest: Callable[[U], None]) -> None:
        """After the step that waits now, ``rest``."""
        self.work = partial(self._chain, self.work, rest)

    def resume(self, update: U) -> None:
        """Carry out the work left (into ``update``, which names the next comparison if it waits again)."""
        work, self.work = self.work, None
        if work is not None:
            work(update)

    def _chain(self, first: Callable[[U], None] | None, rest: Callable[[U], None], update: U) -> None:
        if first is not None:
            first(update)
        if update.compare is not None:
            self.then(rest)
            return
        rest(update)
