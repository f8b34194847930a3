"""One controller per choice of a request: splitter + detector + policy.

The server feeds every generated text delta with its token count and forwards what comes out. The
controller never raises into the stream: an internal error switches the request to pass-through and is
recorded in ``error`` (the server counts it).

Answer probes (policies with ``config.uses_probes``): ``Update.probes`` lists the probes to send now; the
caller answers each with :meth:`ThinkingController.probe_result` whenever its result arrives (or never). A
controller built with ``probes=False`` (the backend cannot probe) runs the policy's text-only fallback and
says why in ``probe_fallback``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from controller.answers import AnswerComparer
from controller.delimiters import Delimiters
from controller.detector import Event, SolutionDetector
from controller.policies import PolicyConfig, PolicyRuntime, ProbeFcsConfig, StopDecision
from controller.probe_policy import ProbeRuntime
from controller.probes import WAIT, ProbeRequest, ProbeResult, WaitScanner
from controller.splitter import ANSWER, THINKING, ThinkingSplitter

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What one delta produced: text to forward per section, and a stop decision if one was just made."""

    reasoning: str = ""
    content: str = ""
    decision: StopDecision | None = None
    events: list[Event] = field(default_factory=list)
    probes: list[ProbeRequest] = field(default_factory=list)


class ThinkingController:
    """Routes deltas to reasoning/content and decides when thinking should stop.

    Invariants: thinking tokens are counted for every delta that starts inside thinking (the end tag's token
    included); ``decision`` is set at most once and, once set, the controller only routes text.
    """

    def __init__(
        self, config: PolicyConfig, delimiters: Delimiters, comparer: AnswerComparer, probes: bool = True
    ) -> None:
        self.config = config
        self.splitter = ThinkingSplitter(delimiters)
        self.detector = SolutionDetector()
        self.probe_fallback: str | None = None
        self.probes_sent = 0
        self.probe_tokens = 0
        self._probe_policy: ProbeRuntime | None = None
        self._waits: WaitScanner | None = None
        if isinstance(config, ProbeFcsConfig) and probes:
            self._probe_policy = ProbeRuntime(config, comparer.equal)
            self._waits = WaitScanner()
            self.policy: PolicyRuntime | ProbeRuntime = self._probe_policy
        elif isinstance(config, ProbeFcsConfig):
            self.probe_fallback = "no answer probes here: text-only fcs_reflection"
            self.policy = PolicyRuntime(config.fallback(), comparer.equal)
        else:
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

    def probe_result(self, result: ProbeResult) -> Update:
        """Take the answer of one probe; a stop it decides applies at the current position. Never raises."""
        update = Update()
        probe_policy = self._probe_policy
        if probe_policy is None or self.error is not None:
            return update
        try:
            if not probe_policy.result(result, self.detector.tokens, self.detector.offset):
                return update  # unknown or repeated id
            self.probe_tokens += max(0, int(result.out_tokens))
            if self.decision is None and not self.splitter.saw_end:
                decision = probe_policy.advance(self.detector.tokens, self.detector.offset)
                if decision is not None:
                    self.decision = update.decision = decision
        except Exception as error:  # noqa: BLE001 - a bad probe result must never break the stream
            self._fail(error)
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
            before = self.detector.tokens
            update.events = self.detector.feed(thinking, tokens)
            for event in update.events:
                self.policy.observe(event)
            if self._probe_policy is not None and self._waits is not None and not self.splitter.saw_end:
                for trigger_tokens, offset in self._waits.feed(thinking, before):
                    self._probe_policy.trigger(WAIT, trigger_tokens, offset)
                update.probes = self._probe_policy.take_requests()
                self.probes_sent += len(update.probes)
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
