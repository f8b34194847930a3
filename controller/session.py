"""One controller per choice of a request: splitter + detector + policy.

The server feeds every generated text delta with its token count and forwards what comes out. The
controller never raises into the stream: an internal error switches the request to pass-through and is
recorded in ``error`` (the server counts it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from controller.answers import AnswerComparer
from controller.delimiters import Delimiters
from controller.detector import Event, SolutionDetector
from controller.policies import PolicyConfig, PolicyRuntime, StopDecision
from controller.question import read_question
from controller.splitter import ANSWER, THINKING, ThinkingSplitter

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What one delta produced: text to forward per section, and a stop decision if one was just made."""

    reasoning: str = ""
    content: str = ""
    decision: StopDecision | None = None
    events: list[Event] = field(default_factory=list)


class ThinkingController:
    """Routes deltas to reasoning/content and decides when thinking should stop.

    Invariants: thinking tokens are counted for every delta that starts inside thinking (the end tag's token
    included); ``decision`` is set at most once and, once set, the controller only routes text.
    """

    def __init__(
        self, config: PolicyConfig, delimiters: Delimiters, comparer: AnswerComparer, question: str | None = None
    ) -> None:
        """``question``: the request's question (last user message, or a completion's prompt), if known; the
        detector then only takes answers of the form it asks for (see :mod:`controller.question`)."""
        self.config = config
        self.splitter = ThinkingSplitter(delimiters)
        self.detector = SolutionDetector(question=read_question(question) if question else None)
        self.policy = PolicyRuntime(config, comparer.equal)
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self.decision: StopDecision | None = None
        self.error: str | None = None
        self.detection_seconds = 0.0

    @property
    def solutions(self) -> int:
        return self.detector.solutions

    @property
    def thinking_done(self) -> bool:
        return self.splitter.saw_end

    def feed(self, delta: str, tokens: int) -> Update:
        """Route one delta and run detection on its thinking part."""
        if self.splitter.state == ANSWER:
            self.answer_tokens += tokens
        else:
            self.thinking_tokens += tokens
        update = Update()
        thinking = ""
        for piece in self.splitter.feed(delta):
            if piece.kind == THINKING:
                update.reasoning += piece.text
                thinking += piece.text
            else:
                update.content += piece.text
        if self.decision is None and self.error is None and self.splitter.saw_start:
            self._detect(thinking, tokens if thinking or not self.splitter.saw_end else 0, update)
        return update

    def finish(self) -> Update:
        """End of stream: release held-back text and close detection."""
        update = Update()
        for piece in self.splitter.flush():
            if piece.kind == THINKING:
                update.reasoning += piece.text
            else:
                update.content += piece.text
        if self.decision is None and self.error is None:
            try:
                update.events = self.detector.flush()
                for event in update.events:
                    self.policy.observe(event)
            except Exception as error:  # noqa: BLE001 - detection must never break the stream
                self._fail(error)
        return update

    def _detect(self, thinking: str, tokens: int, update: Update) -> None:
        try:
            update.events = self.detector.feed(thinking, tokens)
            for event in update.events:
                self.policy.observe(event)
            if self.splitter.saw_end:
                return  # the model closed thinking on its own: nothing to stop
            decision = self.policy.advance(self.detector.tokens, self.detector.offset)
        except Exception as error:  # noqa: BLE001 - detection must never break the stream
            self._fail(error)
            return
        if decision is not None:
            self.decision = update.decision = decision

    def _fail(self, error: Exception) -> None:
        log.exception("thinking detection failed; this request continues without early stopping")
        self.error = f"{type(error).__name__}: {error}"
