"""What the client was sent, kept for the answer a response ended with (shadow agreement).

Invariant: ``content`` (the content pieces routed, in order; the list object is never replaced) and the last
answer read in the thinking are those of the text the client was sent: a replay
(:meth:`controller.session.ThinkingController.go_text_only`) is rewound.
"""

from __future__ import annotations

from controller.answers import last_boxed
from controller.detector import ANSWER, Event


class Transcript:
    def __init__(self) -> None:
        self.content: list[str] = []
        self._last_answer: str | None = None

    def note_answers(self, events: list[Event]) -> None:
        for event in events:
            if event.kind == ANSWER and event.answer is not None:
                self._last_answer = event.answer

    def mark(self) -> tuple[int, str | None]:
        """A point to :meth:`rewind` to."""
        return len(self.content), self._last_answer

    def rewind(self, mark: tuple[int, str | None]) -> None:
        del self.content[mark[0] :]
        self._last_answer = mark[1]

    def final_answer(self) -> str | None:
        """The last ``\\boxed{}`` of the content, else the last answer read in the thinking (None if neither)."""
        return last_boxed("".join(self.content)) or self._last_answer
