"""Incremental solution detector.

Consumes thinking deltas (text plus the number of tokens they carry) and emits :class:`Event` objects as soon
as the sentence that causes them is complete:

- ``reflection``: a sentence opens a check, a doubt or another approach.
- ``answer``: a sentence reaches an answer (explicit or implicit), with its normalized key; ``solution`` is
  the index of the open solution it belongs to.
- ``loop``: the thinking has repeated earlier sentences verbatim, back to back, for ``loop_chars``
  characters: the model is stuck in a loop (reported once per run of repetition).
- ``solution``: a reflection (or the end of thinking) closes the open solution when it has an answer. A
  solution is the span from the previous boundary (reflection) to its *last* answer, so intermediate results
  reached on the way are superseded by the conclusion the model reflects on. The reflection must follow
  the answer within ``max_gap_sentences`` sentences (default 1: the very next sentence); an answer the model
  walks away from without reflecting on it is a step, not a solution. A reflection that rejects the answer
  ("Wait, no", "That can't be right") discards it. ``answer_tokens`` is where
  that last answer was reached; ``tokens`` is where the closing reflection was seen.

With a :class:`~controller.question.Question`, a value whose form cannot be what the question asks for (a
fraction where m + n is asked, ``k = 8`` where the number of k is asked, a number that is no option of a
multiple-choice question) is not an answer: it neither opens nor closes a solution. A multiple-choice
answer's key is its option letter, whether the model wrote the letter or the option's text. A sample answer
quoted by the question's instructions (``45`` of "e.g., Answer: \\boxed{45}") is not an answer in a sentence
that quotes the instructions, nor before the thinking has reached that value in its own working (see
:func:`controller.question.derives`): each sentence is checked once against the few samples.

Complexity: text is cut into sentences at ``.``/``!``/``?`` followed by whitespace, or at a newline. Each
delta is searched for boundaries only in its own text plus one held character, and each completed sentence
(at most ``max_sentence_chars``) is classified once, so work per delta is O(len(delta) + bounded window).
Offsets are character offsets into the thinking text and do not depend on how the text was split; token
positions are the token counts fed up to the delta in which the event became certain.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from controller import sentences
from controller.question import Question, derives, quotes_instructions

REFLECTION = "reflection"
ANSWER = "answer"
SOLUTION = "solution"
LOOP = "loop"

_BOUNDARY = re.compile(r"\n|[.!?](?=\s)")
_MAX_LEAD_IN_MERGES = 4
_MIN_LOOP_SENTENCE = 16
_CODE_CONTEXT_SENTENCES = 3  # implicit answers are ignored in and up to 3 sentences after talk about code
_MAX_REMEMBERED = 200_000


@dataclass(frozen=True)
class Event:
    """Something the detector saw.

    ``offset``: character offset (in the thinking text) where the causing sentence ends.
    ``tokens``: thinking tokens fed when the event was emitted (the stop position if a policy acts on it).
    ``solution``: index of the solution an answer belongs to (0-based), or of the last closed one for
    reflections. ``start_offset``/``start_tokens``: where the solution's span began.
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
    answer_tokens: int = 0


class SolutionDetector:
    """Turns a stream of thinking deltas into events; see the module docstring for the invariants."""

    def __init__(
        self,
        max_sentence_chars: int = 2000,
        max_gap_sentences: int = 1,
        loop_chars: int = 2000,
        question: Question | None = None,
    ) -> None:
        self.question = question
        self._tuples = question is not None and (question.tuple_ or question.interval)
        self._choices = question is not None and question.multiple_choice
        self.loop_chars = loop_chars
        self.repeated_chars = 0
        self._seen: set[int] = set()  # hashes of sentences seen (bounded by _MAX_REMEMBERED)
        self._loop_reported = False
        self.max_gap_sentences = max_gap_sentences
        self.max_sentence_chars = max_sentence_chars
        self.tokens = 0
        self.offset = 0  # characters consumed into completed sentences
        self.solutions = 0  # completed solutions so far
        self._buffer = ""  # the sentence being written
        self._lead_in = ""  # an announcing sentence waiting for its value
        self._lead_in_merges = 0
        self._since_answer = 0
        self._code_countdown = 0
        self._open: Event | None = None  # the last answer of the open (not yet closed) solution
        self._derived: set[str] = set()  # keys of the question's sample answers the thinking reached itself
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
        self._close_solution(events)
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

    def _track_repetition(self, sentence: str, events: list[Event]) -> None:
        """Count how many characters of consecutive sentences repeat earlier ones verbatim.

        Short sentences ("Wait.", "\\[") neither extend nor break a run. Memory is bounded: at most
        ``_MAX_REMEMBERED`` distinct sentences are remembered.
        """
        if len(sentence) < _MIN_LOOP_SENTENCE:
            return
        fingerprint = hash(sentence)
        if fingerprint in self._seen:
            self.repeated_chars += len(sentence)
            if self.repeated_chars >= self.loop_chars > 0 and not self._loop_reported:
                self._loop_reported = True
                events.append(Event(LOOP, self.offset, self.tokens, solution=self.solutions - 1))
        else:
            self.repeated_chars = 0
            self._loop_reported = False
            if len(self._seen) < _MAX_REMEMBERED:
                self._seen.add(fingerprint)

    def _classify(self, sentence: str, events: list[Event]) -> None:
        self._track_repetition(sentence, events)
        self._since_answer += 1
        if self._open is not None and self._since_answer > self.max_gap_sentences:
            self._open = None  # an answer the model moved on from without reflecting on it: a step, not a solution
        if sentences.is_reflection(sentence) or sentences.is_rejection(sentence):
            if sentences.is_rejection(sentence):
                self._open = None  # the model rejects the answer it just reached: no solution
            self._close_solution(events)
            self._boundary_offset = self.offset - len(sentence)
            self._boundary_tokens = self.tokens
            events.append(Event(REFLECTION, self.offset, self.tokens, solution=self.solutions - 1))
        if sentences.has_code_hint(sentence):
            self._code_countdown = _CODE_CONTEXT_SENTENCES
        elif self._code_countdown:
            self._code_countdown -= 1
        if self.question is not None and self.question.examples:
            for text, example in self.question.examples:
                if example not in self._derived and derives(sentence, text):
                    self._derived.add(example)
        found = sentences.find_answer(
            sentence, implicit=not self._code_countdown, tuples=self._tuples, choices=self._choices
        )
        if found is None:
            return
        answer, key = found.text, found.key
        if self.question is not None:
            if self.question.example_key(found.key) and (
                found.key not in self._derived or quotes_instructions(sentence)
            ):
                return  # the prompt's own sample answer, quoted, or not (yet) reached by the thinking
            if not self.question.admits(found.text, found.key, found.subject, found.approximate):
                return
            if not self.question.concludes(sentence, found.key, found.explicit):
                return
            letter = self.question.choice_key(found.key)
            if letter is not None:
                answer = key = letter
        self._open = Event(
            ANSWER,
            self.offset,
            self.tokens,
            solution=self.solutions,
            answer=answer,
            key=key,
            explicit=found.explicit,
            start_offset=self._boundary_offset,
            start_tokens=self._boundary_tokens,
        )
        events.append(self._open)
        self._since_answer = 0

    def _close_solution(self, events: list[Event]) -> None:
        """A reflection (or the end of thinking) closes the open solution: its answer is its last answer."""
        last = self._open
        if last is None:
            return
        self._open = None
        self.solutions += 1
        events.append(
            dataclasses.replace(last, kind=SOLUTION, offset=self.offset, tokens=self.tokens, answer_tokens=last.tokens)
        )
