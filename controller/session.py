"""One controller per choice of a request: splitter + detector + policy.

The server feeds every generated text delta with its token count and forwards what comes out. The
controller never raises into the stream: an internal error switches the request to pass-through and is
recorded in ``error`` (the server counts it).

Answer probes (policies with ``config.uses_probes``): ``Update.probes`` lists the probes to send now; the
caller answers each with :meth:`ThinkingController.probe_result` whenever its result arrives (or never). A
controller built with ``probes=False`` (the backend cannot probe) runs the policy's text-only fallback and
says why in ``probe_fallback``.

``question`` (of the constructor): the request's question (last user message, or a completion's prompt), if
known; the detector then only takes answers of the form it asks for (see :mod:`controller.question`).

A stop is made only while the model is visibly still thinking. A decision that becomes due on a delta whose
thinking text ends in whitespace (a sentence completed by a newline, say) may have been completed by the text
the model uses to close its thinking (``"\\n</think>\\n\\n"``). It is held *pending* until later thinking text
shows that the model goes on (non-whitespace text; a prefix of the end delimiter is held back by the splitter,
so it does not count), and dropped if the end delimiter arrives or the stream ends first. So however the end
delimiter arrives (in one delta or split across deltas), a model that closes its thinking on its own is never
reported as stopped. The delta that confirms a pending decision lies past the stop point (``Update.past_stop``).

The server changes course through methods, never by setting fields: ``go_text_only`` (probing failed before any
probe answered: the text-only fallback takes over as if it had run from the start, on what was fed so far; its
text was forwarded already, so nothing of it counts twice), ``keep_probing`` (a probe answered: probing works,
``go_text_only`` will not be needed), ``keep_fed_tokens`` (text after the stop point was shown, so a stop keeps
it), ``keep_detecting`` (shadow mode, after a would-be stop); ``final_answer`` gives the answer a response ended
with (the last ``\\boxed{}`` of its content, else the last answer read in the thinking).

Comparisons: the controller compares answers through the equality it is given (``equal``; see
:mod:`controller.equality`). A synchronous one (offline evaluation) answers every pair at once. One that cannot
tell a pair now (the server's, which never blocks) raises :class:`controller.equality.ComparisonPending`; the
controller then stops where it is, before the policy step that asked, and the :class:`Update` names the pair
(``compare``). The caller compares it (off its event loop), records the verdict where the equality reads it and
calls :meth:`ThinkingController.resume`, which carries the step out and gives the rest of the update (probes to
send, a decision; ``compare`` again if the step waits for another pair). Until then the caller calls nothing
else. So the decision applies when the comparison returns, at the very point where a synchronous equality would
have made it: the decisions do not depend on how long a comparison takes. ``go_text_only`` may wait the same way
(on a delta it feeds again). ``finish`` never waits: no decision can follow the end of the stream, so where the
equality cannot tell a pair at once the policy observes no further event.

Shadow mode: a controller stops detecting at a decision, and the delta that commits a held decision
(``past_stop``) is not detected at all, since it lies past the stop. ``keep_detecting`` clears the decision,
sends that delta's thinking to the detector and makes the policy ``off``, so ``solutions`` and every count are
those of the whole thinking, as with policy ``off``. An answer probe already on its way may still decide: the
caller ignores that decision and calls ``keep_detecting`` again.
"""

from __future__ import annotations

import logging
from functools import partial

from controller.delimiters import Delimiters
from controller.detector import Event, SolutionDetector
from controller.equality import ComparisonPending, Equal
from controller.held_stop import HeldStop
from controller.policies import OffConfig, PolicyConfig, PolicyRuntime, StopDecision
from controller.prober import Prober
from controller.probes import ProbeResult
from controller.question import read_question
from controller.runtime import runtime_for
from controller.splitter import ANSWER, THINKING, Piece, ThinkingSplitter
from controller.text_only import TextOnlyFallback
from controller.transcript import Transcript
from controller.update import Update
from controller.waiting import Waiting

log = logging.getLogger(__name__)


class ThinkingController(TextOnlyFallback):
    """Routes deltas to reasoning/content and decides when thinking should stop.

    Invariants: thinking tokens are the tokens of every delta that starts inside thinking (the end tag's token
    included), except that a delta that closes the thinking and says how many of its tokens come through the
    end tag (``through_end``) counts only those; ``decision`` is set at most once and, once set, the controller only routes text; ``decision`` is
    never set on or after the delta in which the model closes its thinking; ``kept_tokens`` (set with
    ``decision``) is the number of tokens fed up to the stop point. While a probing controller has had no
    probe answered, it keeps what it was fed (for :meth:`go_text_only`). While a step waits for a comparison,
    only :meth:`resume` may be called.
    """

    def __init__(
        self, config: PolicyConfig, delimiters: Delimiters, equal: Equal, probes: bool = True,
        question: str | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self._delimiters, self._equal, self._question = delimiters, equal, question
        self.transcript = Transcript()
        self._content = self.transcript.content
        self._start(probes)

    def _start(self, probes: bool) -> None:
        """Fresh state for the whole stream: splitter, detector, policy runtime, counts."""
        self.splitter = ThinkingSplitter(self._delimiters)
        self.detector = SolutionDetector(question=read_question(self._question) if self._question else None)
        self.policy, probe_runtime = runtime_for(self.config, self._equal, probes)
        self._prober = None if probe_runtime is None else Prober(probe_runtime)
        fallback = self.config.uses_probes and self._prober is None
        self.probe_fallback = "no answer probes here: text-only fcs_reflection" if fallback else None
        self._seen: list[tuple[str, int, int | None]] | None = [] if self._prober is not None else None
        self.probes_sent = 0
        self.probe_tokens = 0
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self.decision: StopDecision | None = None
        self.error: str | None = None
        self.detection_seconds = 0.0
        self._held = HeldStop()
        self.kept_tokens: int | None = None
        self._thinking_chars = 0  # thinking characters fed to the detector
        self._visible_end = 0  # ... up to and including the last non-whitespace one
        self.fed_tokens = 0
        self._waiting: Waiting[Update] = Waiting()  # the rest of a step that waits for a comparison

    @property
    def solutions(self) -> int:
        return self.detector.solutions

    @property
    def thinking_done(self) -> bool:
        return self.splitter.saw_end

    @property
    def pending(self) -> StopDecision | None:
        return self._held.pending

    def feed(self, delta: str, tokens: int, through_end: int | None = None) -> Update:
        """Route one delta and run detection on its thinking part.

        ``through_end``: when the caller knows it (from token ids), how many of the delta's ``tokens`` come up to
        and including the end of thinking. It is used only if this delta closes the thinking: the tokens after the
        end tag are then answer tokens, so the counts do not depend on how the backend grouped tokens into deltas.
        """
        if self._waiting.work is not None:
            raise RuntimeError("a delta was fed while a comparison is awaited: resume() first")
        if self._seen is not None:
            self._seen.append((delta, tokens, through_end))
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
                self._content.append(piece.text)
        if not in_thinking:
            self.answer_tokens += tokens
        elif self.splitter.state == ANSWER and through_end is not None and 0 < through_end < tokens:
            self.thinking_tokens += through_end  # this delta closed the thinking: the rest is answer
            self.answer_tokens += tokens - through_end
            tokens = through_end
        else:
            self.thinking_tokens += tokens
        if self._held.pending is not None:
            held = self._held.resolve(thinking, self.splitter.saw_end, self.thinking_tokens)
            if held is not None:  # this delta showed the model goes on: it lies past the stop point
                update.past_stop = True
                self._commit(held, fed_before, update)
        elif self.decision is None and self.error is None and self.splitter.saw_start:
            self._detect(thinking, tokens if thinking or not self.splitter.saw_end else 0, update)
        return update

    def probe_result(self, result: ProbeResult) -> Update:
        """Take the answer of one probe; a stop it decides applies at the current position. Never raises."""
        update = Update()
        self._take_probe(result, update)
        return update

    def _take_probe(self, result: ProbeResult, update: Update) -> None:
        prober = self._prober
        if prober is None or self.error is not None:
            return
        try:
            if not prober.take(result, self.detector.tokens, self.detector.offset):
                return  # unknown or repeated id
            self.probe_tokens += max(0, int(result.out_tokens))
            if self.decision is None and self._held.pending is None and not self.splitter.saw_end:
                decision = prober.runtime.advance(self.detector.tokens, self.detector.offset)
                if decision is not None:
                    self._decide(decision, update)
        except ComparisonPending as pending:  # nothing was taken: the result is taken again on resume()
            self._waiting.wait(pending, update, partial(self._take_probe, result))
        except Exception as error:  # noqa: BLE001 - a bad probe result must never break the stream
            self._fail(error)

    def resume(self) -> Update:
        """The comparison an update asked for is known now: what the step that waited for it adds."""
        update = Update()
        self._waiting.resume(update)
        return update

    def finish(self) -> Update:
        """End of stream: release held-back text and close detection (a pending decision is dropped). It never
        waits for a comparison (see the module docstring)."""
        self._held.pending = None
        update = Update()
        _route(self.splitter.flush(), update, self._content)
        if self.decision is None and self.error is None:
            try:
                update.events = self.detector.flush()
                for event in update.events:
                    self.policy.observe(event)
            except ComparisonPending:
                pass  # nothing could come of the events left (see above)
            except Exception as error:  # noqa: BLE001 - detection must never break the stream
                self._fail(error)
        return update

    def _detect(
        self, thinking: str, tokens: int, update: Update, events: list[Event] | None = None, start: int = 0,
        before: int = 0,
    ) -> None:  # fmt: skip
        """Detection on a delta's thinking, then the policy's part: it observes the events from ``start`` on, the
        probes it asks go out and a due decision is made. An event whose comparison must wait is observed again on
        :meth:`resume`, which comes back here with the delta's ``events`` (detected from thinking token ``before``
        on): the policy changed nothing for it."""
        if events is None:
            if thinking.strip():
                self._visible_end = self._thinking_chars + len(thinking.rstrip())
            self._thinking_chars += len(thinking)
        index = start
        try:
            if events is None:
                before = self.detector.tokens
                events = update.events = self.detector.feed(thinking, tokens)
                if events:
                    self.transcript.note_answers(events)
            if events:
                for index in range(start, len(events)):
                    self.policy.observe(events[index])
            if self._prober is not None and not self.splitter.saw_end:
                update.probes = self._prober.requests(thinking, before)
                self.probes_sent += len(update.probes)
            if self.splitter.saw_end:
                return  # the model closed thinking on its own: nothing to stop
            decision = self.policy.advance(self.detector.tokens, self.detector.offset)
        except ComparisonPending as pending:  # from observe(): probe requests and advance() compare nothing
            rest = partial(self._detect, thinking, tokens, events=events, start=index, before=before)
            self._waiting.wait(pending, update, rest)
            return
        except Exception as error:  # noqa: BLE001 - detection must never break the stream
            self._fail(error)
            return
        if decision is not None:
            self._decide(decision, update)

    def _decide(self, decision: StopDecision, update: Update) -> None:
        """Commit a decision while text after its stop point shows the model goes on; else hold it pending."""
        if self._held.offer(decision, self._visible_end, self.thinking_tokens):
            self._commit(decision, self.fed_tokens, update)

    def _commit(self, decision: StopDecision, kept_tokens: int, update: Update) -> None:
        self.decision = update.decision = decision
        self.kept_tokens = kept_tokens

    def _fail(self, error: Exception) -> None:
        log.exception("thinking detection failed; this request continues without early stopping")
        self.error = f"{type(error).__name__}: {error}"

    def keep_fed_tokens(self) -> None:
        """Every token fed so far was shown to the client (a stop that lands after them keeps them all)."""
        self.kept_tokens = self.fed_tokens

    def keep_detecting(self, update: Update, tokens: int) -> None:
        """Shadow mode, after the would-be stop ``update.decision`` (``tokens``: the delta's token count): read on
        to the natural end as with policy ``off`` (see the module docstring)."""
        self.decision = None
        self.kept_tokens = None
        self.policy = PolicyRuntime(OffConfig(), self._equal)  # off compares nothing
        if update.past_stop and update.reasoning:
            for event in self.detector.feed(update.reasoning, tokens):
                self.policy.observe(event)

    def final_answer(self) -> str | None:
        """The answer the response ended with (None if none was read)."""
        return self.transcript.final_answer()


def _route(pieces: list[Piece], update: Update, content: list[str]) -> str:
    """Add the splitter's pieces to ``update`` (answer text also to ``content``); the thinking text among them."""
    thinking = ""
    for piece in pieces:
        if piece.kind == THINKING:
            update.reasoning += piece.text
            thinking += piece.text
        else:
            update.content += piece.text
            content.append(piece.text)
    return thinking
