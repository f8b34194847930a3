"""Feeding one choice's controller and turning what it routes into events for the client.

Invariants: every delta fed is timed into ``thinkbrake_controller_seconds`` (with its token count); every update
becomes exactly one :class:`ChoiceEvent` (sections for chat, the raw text for completions); ``first_token_at`` is
the time of the first event that carries anything.
"""

from __future__ import annotations

import time

from controller.session import ThinkingController, Update
from server.events import ChoiceEvent
from server.metrics import Metrics


class Emitter:
    """One choice's feeds and events. ``raw_text``: completions (raw text, tags included) instead of sections."""

    def __init__(self, index: int, raw_text: bool, metrics: Metrics, model: str, policy: str) -> None:
        self.index = index
        self.raw_text = raw_text
        self.first_token_at: float | None = None
        self._metrics = metrics
        self._model = model
        self._policy = policy

    def feed(self, controller: ThinkingController, text: str, tokens: int, through_end: int | None = None) -> Update:
        began = time.perf_counter()
        update = controller.feed(text, tokens, through_end)
        self._metrics.observe_controller(time.perf_counter() - began, tokens, self._model, self._policy)
        return update

    def event(self, update: Update, raw: str) -> ChoiceEvent:
        if self.raw_text:
            event = ChoiceEvent(self.index, text=raw)
        else:
            event = ChoiceEvent(self.index, reasoning=update.reasoning, content=update.content)
        if self.first_token_at is None and not event.empty:
            self.first_token_at = time.perf_counter()
        return event
