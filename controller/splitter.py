"""Incremental thinking/answer splitter.

Routes a stream of text deltas into ``thinking`` and ``answer`` pieces. A delimiter split across deltas is
held back (never emitted as text) until it is known to be a delimiter or plain text. Work per delta is
O(len(delta) + len(longest delimiter)): only a held-back tail shorter than a delimiter is re-examined.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.delimiters import Delimiters

THINKING = "thinking"
ANSWER = "answer"


@dataclass(frozen=True)
class Piece:
    """A run of text that belongs to one section (``thinking`` or ``answer``)."""

    kind: str
    text: str


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest proper prefix of ``marker`` that ``text`` ends with."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ThinkingSplitter:
    """Split deltas into thinking and answer text.

    States: ``before`` (not yet in thinking; text before the opening tag is answer text, as vLLM's reasoning
    parsers do for models that may skip thinking), ``thinking``, ``answer``. Only the first opening and the
    first closing tag switch state; later tags are ordinary text of the section they occur in.
    Invariant: concatenating the emitted pieces (plus the delimiters consumed) reproduces the input.
    """

    def __init__(self, delimiters: Delimiters) -> None:
        self.delimiters = delimiters
        self.state = THINKING if delimiters.implicit_start else "before"
        self._held = ""
        self.saw_start = delimiters.implicit_start
        self.saw_end = False

    @property
    def in_thinking(self) -> bool:
        return self.state == THINKING

    def feed(self, delta: str) -> list[Piece]:
        """Consume one delta; return the pieces that are now certain."""
        if not self._held and self.state == THINKING and self.delimiters.end[0] not in delta:
            return [Piece(THINKING, delta)] if delta else []  # fast path: no tag can start in this delta
        pieces: list[Piece] = []
        text = self._held + delta
        self._held = ""
        while text:
            if self.state == ANSWER:
                pieces.append(Piece(ANSWER, text))
                break
            marker = self.delimiters.start if self.state == "before" else self.delimiters.end
            kind = ANSWER if self.state == "before" else THINKING
            index = text.find(marker)
            if index >= 0:
                if index:
                    pieces.append(Piece(kind, text[:index]))
                text = text[index + len(marker) :]
                if self.state == "before":
                    self.state, self.saw_start = THINKING, True
                else:
                    self.state, self.saw_end = ANSWER, True
                continue
            keep = _partial_suffix(text, marker)
            if keep:
                self._held = text[-keep:]
                text = text[:-keep]
            if text:
                pieces.append(Piece(kind, text))
            break
        return _merge(pieces)

    def flush(self) -> list[Piece]:
        """End of stream: a held-back partial tag is plain text after all."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [Piece(THINKING if self.state == THINKING else ANSWER, held)]


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if merged and merged[-1].kind == piece.kind:
            merged[-1] = Piece(piece.kind, merged[-1].text + piece.text)
        else:
            merged.append(piece)
    return merged
