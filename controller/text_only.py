"""The text-only fallback of a probing controller (see :mod:`controller.session`): probing failed before any probe
answered, so the text-only rule takes over as if it had run from the start, on what was fed so far.

Invariant: ``_seen`` (every ``feed`` call's arguments, in order) is a list only while the controller probes and no
probe has answered (:meth:`TextOnlyFallback.keep_probing` drops it); None otherwise.
"""

from __future__ import annotations

from functools import partial

from controller.transcript import Transcript
from controller.update import Update
from controller.waiting import Waiting


class TextOnlyFallback:
    """The part of :class:`controller.session.ThinkingController` that feeds again what it was fed."""

    _seen: list[tuple[str, int, int | None]] | None
    _waiting: Waiting[Update]
    transcript: Transcript

    def _start(self, probes: bool) -> None:
        raise NotImplementedError

    def feed(self, delta: str, tokens: int, through_end: int | None = None) -> Update:
        raise NotImplementedError

    def go_text_only(self) -> Update:
        """Probing failed: run text-only from the start (see the module docstring); the update carries the stop that
        decides on what was fed so far, if any (no text). Does nothing without probes or after :meth:`keep_probing`."""
        seen, mark = self._seen, self.transcript.mark()
        update = Update()
        if seen is None:
            return update
        self._start(probes=False)
        self._feed_again(seen, 0, mark, update)
        return update

    def _feed_again(
        self, seen: list[tuple[str, int, int | None]], start: int, mark: tuple[int, str | None], update: Update
    ) -> None:
        """Feed ``seen[start:]`` again; the first decision goes to ``update``."""
        for index in range(start, len(seen)):
            fed = self.feed(*seen[index])
            update.decision = update.decision or fed.decision
            if fed.compare is not None:  # this delta waits: the deltas after it wait too
                self._waiting.then(partial(self._feed_again, seen, index + 1, mark))
                update.compare = fed.compare
                return
        self.transcript.rewind(mark)

    def keep_probing(self) -> None:
        """A probe answered: what was kept for :meth:`go_text_only` is dropped."""
        self._seen = None
