"""Incremental solution detector.

Consumes thinking deltas (text plus the number of tokens they carry) and emits :class:`Event` objects as soon
as the sentence that causes them is complete:

- ``reflection``: a sentence opens a check, a doubt or another approach.
- ``answer``: a sentence reaches an answer (explicit or implicit), with its normalized key.
- ``solution``: the first answer after a boundary completes a solution (the span from the boundary to that
  answer). Later answers before the next reflection revise that solution's answer (``answer`` events with
  the same ``solution`` index). A reflection after an answered solution sets a new boundary.

Complexity: text is cut into sentences at ``.``/``!``/``?`` followed by whitespace, or at a newline. Each
delta is searched for boundaries only in its own text plus one held character, and each completed sentence
(at most ``max_sentence_chars``) is classified once, so work per delta is O(len(delta) + bounded window).
Offsets are character offsets into the thinking text and do not depend on how the text was split; token
positions are the token counts fed up to the delta in which the event became certain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controller import sentences

REFLECTION = "reflection"
ANSWER = "answer"
SOLUTION = "solution"

_BOUNDARY = re.compile(r"\n|[.!?](?=\s)")
_MAX_LEAD_IN_MERGES = 4


@dataclass(frozen=True)
class Event:
    """Something the detector saw.

    ``offset``: character offset (in the thinking text) where the causing sentence ends.
    ``tokens``: thinking tokens fed when the event was emitted (the stop position if a policy acts on it).
    ``solution``: index of the solution an answer belongs to (0-based), or of the last one for reflections.
    ``start_offset``/``start_tokens``: for ``solution`` events, where the solution's span began.
    """

    kind: str
    offset: int
    tokens: int
    solution: int = -1
    answer: str | None = None
    key: str | None = None
    explicit: bool = False
    start_offset: int = 0
    start_tokens: int = 0


class SolutionDetector:
    """Turns a stream of thinking deltas into events; see the module docstring for the invariants."""

    def __init__(self, max_sentence_chars: int = 2000) -> None:
        self.max_sentence_chars = max_sentence_chars
        self.tokens = 0
        self.offset = 0  # characters consumed into completed sentences
        self.solutions = 0  # completed solutions so far
        self._buffer = ""  # the sentence being written
        self._lead_in = ""  # an announcing sentence waiting for its value
        self._lead_in_merges = 0
        self._answered = False  # the current span already has an answer
        self._boundary_offset = 0
        self._boundary_tokens = 0

    def feed(self, text: str, tokens: int = 0) -> list[Event]:
        """Consume one thinking delta carrying ``tokens`` tokens; return the events it completes."""
        self.tokens += tokens
        if not text:
            return []
        position = max(0, len(self._buffer) - 1)
        self._buffer += text
        buffer = self._buffer
        events: list[Event] = []
        cut = 0
        while True:
            match = _BOUNDARY.search(buffer, position)
            limit = cut + self.max_sentence_chars
            if match is not None and match.end() <= limit:
                end = match.end()
            elif len(buffer) - cut > self.max_sentence_chars:
                end = limit  # no boundary inside a full window: cut there (same place for any split)
            else:
                break
            self._sentence(buffer[cut:end], events)
            cut = position = end
        if cut:
            self._buffer = buffer[cut:]
        return events

    def flush(self) -> list[Event]:
        """End of thinking: classify what is left."""
        events: list[Event] = []
        if self._buffer:
            self._sentence(self._buffer, events)
            self._buffer = ""
        if self._lead_in:
            lead_in, self._lead_in = self._lead_in, ""
            self._classify(lead_in, events)
        return events

    def _sentence(self, raw: str, events: list[Event]) -> None:
        self.offset += len(raw)
        stripped = raw.strip()
        if not stripped:
            return
        if self._lead_in:
            stripped = self._lead_in + "\n" + stripped
            self._lead_in = ""
            self._lead_in_merges += 1
        else:
            self._lead_in_merges = 0
        if (
            self._lead_in_merges < _MAX_LEAD_IN_MERGES
            and len(stripped) < self.max_sentence_chars
            and sentences.is_lead_in(stripped)
        ):
            self._lead_in = stripped
            return
        self._classify(stripped, events)

    def _classify(self, sentence: str, events: list[Event]) -> None:
        if sentences.is_reflection(sentence):
            if self._answered:
                self._answered = False
                self._boundary_offset = self.offset - len(sentence)
                self._boundary_tokens = self.tokens
            events.append(Event(REFLECTION, self.offset, self.tokens, solution=self.solutions - 1))
        found = sentences.find_answer(sentence)
        if found is None:
            return
        if not self._answered:
            self._answered = True
            self.solutions += 1
            events.append(
                Event(
                    SOLUTION,
                    self.offset,
                    self.tokens,
                    solution=self.solutions - 1,
                    answer=found.text,
                    key=found.key,
                    explicit=found.explicit,
                    start_offset=max(0, self._boundary_offset),
                    start_tokens=self._boundary_tokens,
                )
            )
        events.append(
            Event(
                ANSWER,
                self.offset,
                self.tokens,
                solution=self.solutions - 1,
                answer=found.text,
                key=found.key,
                explicit=found.explicit,
            )
        )
