"""``probe_fcs``: the first solution plus one confirming reflection, each solution's answer read by a probe.

At every reflection point the model opens with "Wait" (the DEER trigger, seen by
:class:`controller.probes.WaitScanner`) the policy asks the model what its answer is now (a probe on the prefix
that ends just before the "Wait"). A probe answer *counts* when its confidence (from the probe's token
log-probabilities) reaches ``confidence`` and its form is a plain final answer (see :func:`plain_answer`).
A counted answer is a solution's answer; the policy stops on it once one reflection confirms it, where the
confirmation is any one of (checked in this order):

- ``probe_confident``: the probe reaches ``alone_confidence`` (< 1): it stops on its own (the DEER rule);

- ``probe_confirmed``: the previous probe counted too, gave the same answer, and one of the two reaches
  ``confirm_confidence`` (the solution, then the reflection that confirms it);
- ``probe_sure``: the probe reaches ``sure_confidence`` (< 1) and the thinking itself wrote the same answer
  among the text detector's last ``text_window`` answers before the probe's prefix ends ("so the answer is
  X", then "Wait", and the model says X);
- ``probe_solutions``: at least ``solution_agree`` of the solutions the text detector closed before the
  probe's prefix ends reached the same answer (the first solution and a reflection that confirms it, the
  answer read by the model);
- ``probe_agreed``: the probe reaches ``agree_confidence`` (< 1), so a second probe of the other family
  (the dense suffix, ``probe_spec(SOLUTION)``) is asked on the same prefix; it stops when that one answers
  the same without hesitating (confidence 1).

An unreliable probe breaks the chain. The stop answer is the probe's answer.

Long thinking (``probe_settled``): from ``settle_tokens`` thinking tokens on, a "Wait" at least
``settle_spacing`` tokens after the previous such probe also gets a dense probe; when ``settle_agree`` of these
in a row give the same answer without hesitating, and the thinking wrote that answer among its last
``settle_text_window`` answers, the model has settled: it stops there. (Traces that think that long mostly
re-check a settled answer or loop to the token cap.)

Probe schedule: a wait probe is asked at a "Wait" at least ``probe_spacing`` tokens after the previous wait
probe. Back-off: after ``backoff`` answered wait probes in a row that did not count (no confident plain
answer), the spacing becomes ``max(probe_spacing, backoff_tokens)`` and doubles with each further such probe;
a counted probe resets it. A model (or a backend) whose probes never carry confidence is then probed about
``backoff + log2(thinking tokens / backoff_tokens)`` times per request instead of at every "Wait".

Invariants:
- at most ``max_probes`` probes (wait probes and their second probes) are asked per request, never before
  ``min_probe_tokens`` tokens, plus at most ``max_settle_probes`` settle probes; a second probe goes out with
  the next delta after the probe it checks answered;
- a decision is taken only when a probe result arrives (it applies there) or at ``max_thinking_tokens``;
  ``min_thinking_tokens`` delays a due stop; once made, a decision never changes;
- results with an unknown or repeated id are ignored;
- a result's comparisons come before any change of state (see :mod:`controller.equality`).
"""

from __future__ import annotations

import dataclasses
import re

from controller.detector import ANSWER, Event
from controller.detector import SOLUTION as SOLUTION_CLOSED
from controller.equality import Equal
from controller.policies import ProbeFcsConfig, StopDecision
from controller.probes import SOLUTION, WAIT, ProbeRequest, ProbeResult
from controller.stop_reasons import (
    MAX_THINKING_TOKENS,
    PROBE_AGREED,
    PROBE_CONFIDENT,
    PROBE_CONFIRMED,
    PROBE_SETTLED,
    PROBE_SOLUTIONS,
    PROBE_SURE,
)

_TEXT_KEPT = 32  # text answers and solutions remembered (a probe looks at those before its position)
_PLAIN = re.compile(r"^[\s\S]{1,60}$")
_NOT_FINAL = re.compile(r"\?|\.\.\.|\\ldots|\\dots|=|\\approx|[a-zA-Z]\s*=|^\s*$")


def plain_answer(answer: str | None) -> bool:
    """A probe answer that reads as a final answer: short, no question mark, no ellipsis, no equation."""
    if answer is None or not _PLAIN.match(answer):
        return False
    return _NOT_FINAL.search(answer) is None


class ProbeRuntime:
    """Per-request state of ``probe_fcs``; the session feeds it events, triggers and probe results."""

    def __init__(self, config: ProbeFcsConfig, equal: Equal) -> None:
        self.config = config
        self._equal = equal
        self._next_id = 0
        self._pending: dict[int, ProbeRequest] = {}
        self._requests: list[ProbeRequest] = []
        self._previous: ProbeResult | None = None  # the last answered probe, in order of asking
        self._last_asked = -1
        self._text_answers: list[tuple[int, str]] = []  # (tokens, answer) the text detector read (recent ones)
        self._solution_answers: list[tuple[int, str]] = []  # (tokens where it closed, answer) of recent solutions
        self._checks: dict[int, str] = {}  # id of a second (dense) probe -> the wait probe answer it checks
        self._last_text: tuple[str, str] | None = None
        self._due: StopDecision | None = None
        self.decision: StopDecision | None = None
        self.asked = 0
        self.solutions = 0  # solutions the text detector closed so far (a stop reports this count)
        self._settle: set[int] = set()  # ids of settle probes in flight
        self._settle_answers: list[str | None] = []  # answers of the settle probes, in order of asking
        self._settle_asked = 0
        self._last_settle = -(10**9)
        self._last_wait = -(10**9)  # tokens of the last wait probe asked
        self._misses = 0  # answered wait probes in a row that did not count (the back-off counter)

    def observe(self, event: Event) -> None:
        """Text detector events: count the solutions, remember the answers the thinking and its solutions reached."""
        if event.kind == SOLUTION_CLOSED:
            self.solutions += 1
            if event.answer is not None:
                self._solution_answers.append((event.tokens, event.answer))
                del self._solution_answers[:-_TEXT_KEPT]
        if event.kind == ANSWER and event.answer is not None and event.key is not None:
            self._last_text = (event.answer, event.key)
            self._text_answers.append((event.tokens, event.answer))
            del self._text_answers[:-_TEXT_KEPT]

    def trigger(self, kind: str, tokens: int, offset: int) -> None:
        """A trigger at ``tokens``/``offset`` (before the trigger word): ask a probe if the cap allows."""
        if self.decision is not None or self._due is not None or kind != WAIT:
            return
        if tokens < self.config.min_probe_tokens or tokens <= 0:
            return
        if tokens - self._last_wait >= self.spacing() and self._ask(tokens, offset, WAIT) is not None:
            self._last_wait = tokens
        config = self.config
        if (
            config.settle_agree
            and tokens >= config.settle_tokens
            and tokens - self._last_settle >= config.settle_spacing
            and self._settle_asked < config.max_settle_probes
        ):
            self._last_settle = tokens
            self._settle_asked += 1
            self._settle.add(self._request(tokens, offset, SOLUTION).id)

    def spacing(self) -> int:
        """Tokens that must separate the next wait probe from the previous one (the schedule and its back-off)."""
        config = self.config
        if config.backoff and self._misses >= config.backoff:
            doublings: int = min(self._misses - config.backoff, 30)
            return max(config.probe_spacing, config.backoff_tokens) << doublings
        return config.probe_spacing

    def _ask(self, tokens: int, offset: int, trigger: str) -> ProbeRequest | None:
        """A probe under the ``max_probes`` cap (None when the cap is reached)."""
        if self.asked >= self.config.max_probes:
            return None
        self.asked += 1
        return self._request(tokens, offset, trigger)

    def _request(self, tokens: int, offset: int, trigger: str) -> ProbeRequest:
        request = ProbeRequest(self._next_id, tokens, offset, trigger)
        self._next_id += 1
        self._pending[request.id] = request
        self._requests.append(request)
        return request

    @property
    def queued(self) -> bool:
        """Probes asked and not yet taken (they go out with the next delta)."""
        return bool(self._requests)

    def take_requests(self) -> list[ProbeRequest]:
        requests, self._requests = self._requests, []
        return requests

    def result(self, result: ProbeResult, tokens: int, offset: int) -> bool:
        """Take one probe result (arriving at ``tokens``); True if it was expected. Its comparisons come before any
        change of state: an equality that raises :class:`controller.equality.ComparisonPending` leaves the runtime
        as it was, and the same result is taken again once the verdict is known."""
        request = self._pending.get(result.id)
        if request is None:
            return False
        if self.decision is None and self._due is None:
            if request.id in self._settle:
                self._settled(request, result, tokens, offset)
            elif request.trigger == SOLUTION:
                self._checked(request, result, tokens, offset)
            elif request.id >= self._last_asked:  # else an older probe answered after a newer one, which speaks
                self._answered(request, result, tokens, offset)
        del self._pending[request.id]
        return True

    def _checked(self, request: ProbeRequest, result: ProbeResult, tokens: int, offset: int) -> None:
        """A second (dense) probe answered: it stops when it gives the answer of the wait probe it checks, sure."""
        checked = self._checks.get(request.id)
        if checked is not None and result.answer is not None and result.confidence >= 1.0:
            if self._equal(checked, result.answer):
                self._due = StopDecision(PROBE_AGREED, checked, checked, tokens, offset, self.solutions)
        self._checks.pop(request.id, None)

    def _answered(self, request: ProbeRequest, result: ProbeResult, tokens: int, offset: int) -> None:
        """The newest wait probe answered."""
        config = self.config
        missed = not plain_answer(result.answer) or result.confidence < config.confidence
        reason = None if missed else self._reason(request, result)
        self._last_asked = request.id
        self._previous = result
        if missed:
            self._misses += 1
            return
        self._misses = 0
        assert result.answer is not None
        if reason is None and config.agree_confidence < 1.0 and result.confidence >= config.agree_confidence:
            check = self._ask(request.tokens, request.offset, SOLUTION)  # the dense probe on the same prefix
            if check is not None:
                self._checks[check.id] = result.answer
        if reason is not None:
            self._due = StopDecision(reason, result.answer, result.answer, tokens, offset, self.solutions)

    def _reason(self, request: ProbeRequest, result: ProbeResult) -> str | None:
        """Why a counted wait probe's answer stops, if it does (reads the state, changes nothing)."""
        config = self.config
        answer = result.answer
        assert answer is not None
        previous = self._previous
        if config.alone_confidence < 1.0 and result.confidence >= config.alone_confidence:
            return PROBE_CONFIDENT
        if (
            previous is not None
            and previous.answer is not None
            and plain_answer(previous.answer)
            and previous.confidence >= config.confidence
            and max(previous.confidence, result.confidence) >= config.confirm_confidence
            and self._equal(previous.answer, answer)
        ):
            return PROBE_CONFIRMED
        if config.sure_confidence < 1.0 and result.confidence >= config.sure_confidence:
            if self._wrote(answer, request.tokens, config.text_window):
                return PROBE_SURE
        if config.solution_agree:
            reached = [text for at, text in self._solution_answers if at <= request.tokens]
            if sum(1 for text in reached if self._equal(text, answer)) >= config.solution_agree:
                return PROBE_SOLUTIONS
        return None

    def _wrote(self, answer: str, tokens: int, window: int) -> bool:
        """Whether the thinking wrote ``answer`` among the text detector's last ``window`` answers reached by
        token ``tokens`` (never, with ``window`` 0)."""
        written = [text for at, text in self._text_answers if at <= tokens][-window:] if window else []
        return any(self._equal(text, answer) for text in written)

    def _settled(self, request: ProbeRequest, result: ProbeResult, tokens: int, offset: int) -> None:
        """A settle probe answered (results of these arrive in order of asking: they are asked far apart)."""
        config = self.config
        answer = result.answer
        if answer is None or result.confidence < 1.0 or not plain_answer(answer):
            answer = None
        elif config.settle_text_window and not self._wrote(answer, request.tokens, config.settle_text_window):
            answer = None
        recent = [*self._settle_answers, answer][-config.settle_agree :]
        due = None
        if answer is not None and len(recent) == config.settle_agree:
            if all(other is not None and self._equal(other, answer) for other in recent):
                due = StopDecision(PROBE_SETTLED, answer, answer, tokens, offset, self.solutions)
        self._settle.discard(request.id)
        self._settle_answers.append(answer)
        self._due = due

    def advance(self, tokens: int, offset: int) -> StopDecision | None:
        if self.decision is not None:
            return self.decision
        config = self.config
        if self._due is not None and tokens >= config.min_thinking_tokens:
            self.decision = dataclasses.replace(self._due, tokens=tokens)
        elif config.max_thinking_tokens is not None and tokens >= config.max_thinking_tokens:
            answer = self._previous.answer if self._previous and self._previous.answer else None
            if answer is None and self._last_text:
                answer = self._last_text[0]
            self.decision = StopDecision(MAX_THINKING_TOKENS, answer, answer, tokens, offset, self.solutions)
        return self.decision
