"""One controller per choice of a request: splitter + detector + policy.

The server feeds every generated text delta with its token count and forwards what comes out. The
controller never raises into the stream: an internal error switches the request to pass-through and is
recorded in ``error`` (the server counts it).

Answer probes (policies with ``config.uses_probes``): ``Update.probes`` lists the probes to send now; the
caller answers each with :meth:`ThinkingController.probe_result` whenever its result arrives (or never). A
controller built with ``probes=False`` (the backend cannot probe) runs the policy's text-only fallback and
says why in ``probe_fallback``.

A stop is made only while the model is visibly still thinking. A decision that becomes due on a delta whose
thinking text ends in whitespace (a sentence completed by a newline, say) may have been completed by the text
the model uses to close its thinking (``"\\n</think>\\n\\n"``). It is held *pending* until later thinking text
shows that the model goes on (non-whitespace text; a prefix of the end delimiter is held back by the splitter,
so it does not count), and dropped if the end delimiter arrives or the stream ends first. So however the end
delimiter arrives (in one delta or split across deltas), a model that closes its thinking on its own is never
reported as stopped. The delta that confirms a pending decision lies past the stop point (``Update.past_stop``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from controller.answers import AnswerComparer
from controller.delimiters import Delimiters
from controller.detector import Event, SolutionDetector
from controller.policies import PolicyConfig, PolicyRuntime, ProbeFcsConfig, StopDecision
from controller.probe_policy import ProbeRuntime
from controller.probes import WAIT, ProbeRequest, ProbeResult, WaitScanner
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
    probes: list[ProbeRequest] = field(default_factory=list)
    #: this delta confirmed a pending decision: its text lies past the stop point (a server acting on the stop
    #: does not forward it and continues from the tokens fed before it, ``ThinkingController.kept_tokens``)
    past_stop: bool = False


class ThinkingController:
    """Routes deltas to reasoning/content and decides when thinking should stop.

    Invariants: thinking tokens are the tokens of every delta that starts inside thinking (the end tag's token
    included), except that a delta that closes the thinking and says how many of its tokens come through the
    end tag (``through_end``) counts only those; ``decision`` is set at most once and, once set, the controller only routes text; ``decision`` is
    never set on or after the delta in which the model closes its thinking; ``kept_tokens`` (set with
    ``decision``) is the number of tokens fed up to the stop point.
    """

    def __init__(
        self,
        config: PolicyConfig,
        delimiters: Delimiters,
        comparer: AnswerComparer,
        probes: bool = True,
        question: str | None = None,
    ) -> None:
        """``question``: the request's question (last user message, or a completion's prompt), if known; the
        detector then only takes answers of the form it asks for (see :mod:`controller.question`)."""
        self.config = config
        self.splitter = ThinkingSplitter(delimiters)
        self.detector = SolutionDetector(question=read_question(question) if question else None)
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
        self.pending: StopDecision | None = None
        self.kept_tokens: int | None = None
        self._pending_at = 0
        self._thinking_chars = 0  # thinking characters fed to the detector
        self._visible_end = 0  # ... up to and including the last non-whitespace one
        self.fed_tokens = 0

    @property
    def solutions(self) -> int:
        return self.detector.solutions

    @property
    def thinking_done(self) -> bool:
        return self.splitter.saw_end

    def feed(self, delta: str, tokens: int, through_end: int | None = None) -> Update:
        """Route one delta and run detection on its thinking part.

        ``through_end``: when the caller knows it (from token ids), how many of the delta's ``tokens`` come up to
        and including the end of thinking. It is used only if this delta closes the thinking: the tokens after the
        end tag are then answer tokens, so the counts do not depend on how the backend grouped tokens into deltas.
        """
        fed_before = self.fed_tokens
        self.fed_tokens += tokens
        in_thinking = self.splitter.state != ANSWER
        update = Update()
        thinking = ""
        for piece in self.splitter.feed(delta):
            if piece.kind == THINKING:
                update.reasoning += piece.text
                thinking += piece.text
            else:
                update.content += piece.text
        if not in_thinking:
            self.answer_tokens += tokens
        elif self.splitter.state == ANSWER and through_end is not None and 0 < through_end < tokens:
            self.thinking_tokens += through_end  # this delta closed the thinking: the rest is answer
            self.answer_tokens += tokens - through_end
            tokens = through_end
        else:
            self.thinking_tokens += tokens
        if self.pending is not None:
            self._resolve_pending(thinking, fed_before, update)
        elif self.decision is None and self.error is None and self.splitter.saw_start:
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
            if self.decision is None and self.pending is None and not self.splitter.saw_end:
                decision = probe_policy.advance(self.detector.tokens, self.detector.offset)
                if decision is not None:
                    self._decide(decision, update)
        except Exception as error:  # noqa: BLE001 - a bad probe result must never break the stream
            self._fail(error)
        return update

    def finish(self) -> Update:
        """End of stream: release held-back text and close detection (a pending decision is dropped)."""
        self.pending = None
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
        if thinking.strip():
            self._visible_end = self._thinking_chars + len(thinking.rstrip())
        self._thinking_chars += len(thinking)
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
            self._decide(decision, update)

    def _decide(self, decision: StopDecision, update: Update) -> None:
        """Commit a decision while text after its stop point shows the model goes on; else hold it pending."""
        if self._visible_end > decision.offset:
            self._commit(decision, self.fed_tokens, update)  # text after the stop point: the model goes on
        else:
            self.pending = decision  # the whitespace may begin the end of thinking: wait for the next text
            self._pending_at = self.thinking_tokens

    def _resolve_pending(self, thinking: str, fed_before: int, update: Update) -> None:
        """Commit the pending decision once the model visibly goes on thinking; drop it if thinking ends."""
        pending = self.pending
        assert pending is not None
        if self.splitter.saw_end:
            self.pending = None  # the model closed its thinking on its own: nothing to stop
        elif thinking.strip():
            self.pending = None
            update.past_stop = True
            tokens = pending.tokens + self.thinking_tokens - self._pending_at
            self._commit(dataclasses.replace(pending, tokens=tokens), fed_before, update)

    def _commit(self, decision: StopDecision, kept_tokens: int, update: Update) -> None:
        self.decision = update.decision = decision
        self.kept_tokens = kept_tokens

    def _fail(self, error: Exception) -> None:
        log.exception("thinking detection failed; this request continues without early stopping")
        self.error = f"{type(error).__name__}: {error}"
