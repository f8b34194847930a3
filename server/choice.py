"""One choice of one request: backend stream -> controller -> events, and what happens at a stop.

:meth:`ChoiceRunner.run` yields :class:`ChoiceEvent` objects as text becomes certain and a final event with
the :class:`ChoiceResult`. At a stop decision the backend request is aborted *before* anything else happens
(no more thinking is decoded); then, per ``finalize``: ``model`` continues from the token ids (prompt +
generated + end-of-thinking ids) so the backend reuses its prefix cache; ``answer`` writes a short final
answer from the detected one; ``none`` ends with the thinking only. The client sees one stream.

Invariants: the backend generation is aborted on every exit that is not its natural end (stop, error,
client disconnect = cancellation); exactly one metrics record is written per choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from controller.answers import AnswerComparer, last_boxed
from controller.delimiters import Delimiters
from controller.detector import ANSWER
from controller.policies import StopDecision
from controller.session import ThinkingController, Update
from server.backend import Backend, Generation, Prompt, Sampling
from server.metrics import Metrics, RequestRecord
from server.protocol import RequestControl

log = logging.getLogger(__name__)


@dataclass
class ChoiceResult:
    """Everything known about a finished choice."""

    finish_reason: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    thinking_tokens: int = 0
    answer_tokens: int = 0
    stopped: bool = False
    decision: StopDecision | None = None
    shadow_decision: StopDecision | None = None
    shadow_agree: bool | None = None
    solutions: int = 0
    continuation_cached_tokens: int | None = None
    controller_error: str | None = None

    def info(self, policy: str, shadow: bool) -> dict[str, Any]:
        """The ``thinkbrake`` object of the response for this choice."""
        decision = self.decision
        data: dict[str, Any] = {
            "stopped": self.stopped,
            "reason": decision.reason if decision else None,
            "answer": decision.answer if decision else None,
            "solutions": self.solutions,
            "thinking_tokens": self.thinking_tokens,
            "answer_tokens": self.answer_tokens,
            "policy": policy,
        }
        if decision is not None:
            data["stop_position_tokens"] = decision.tokens
        if self.continuation_cached_tokens is not None:
            data["continuation_cached_tokens"] = self.continuation_cached_tokens
        if shadow:
            would = self.shadow_decision
            data["shadow"] = {
                "would_stop": would is not None,
                "reason": would.reason if would else None,
                "answer": would.answer if would else None,
                "stop_tokens": would.tokens if would else None,
                "agree": self.shadow_agree,
            }
        if self.controller_error:
            data["error"] = self.controller_error
        return data


@dataclass
class ChoiceEvent:
    """Text for the client (``text`` is raw text for completions), or the end of the choice (``result``)."""

    index: int
    reasoning: str = ""
    content: str = ""
    text: str = ""
    result: ChoiceResult | None = None

    @property
    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.text or self.result)


@dataclass
class RunContext:
    """Shared, read-only things a runner needs (one per server)."""

    backend: Backend
    metrics: Metrics
    comparer: AnswerComparer
    model_name: str


@dataclass
class ChoiceRunner:
    """Runs one choice. ``raw_text``: completions (emit raw text, tags included) instead of chat sections."""

    context: RunContext
    index: int
    request_id: str
    prompt: Prompt
    sampling: Sampling
    control: RequestControl
    delimiters: Delimiters
    raw_text: bool = False
    question: str | None = None  # the request's question (last user message / completion prompt), for detection
    started: float = field(default_factory=time.perf_counter)
    _first_token_at: float | None = None
    _last_answer: str | None = None
    _content: list[str] = field(default_factory=list)

    async def run(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Yield the choice's events; the last one carries the result."""
        controller = ThinkingController(self.control.policy, self.delimiters, self.context.comparer, self.question)
        result = ChoiceResult(finish_reason="stop")
        try:
            async with aclosing(self._generate(controller, result)) as events:
                async for event in events:
                    yield event
        except BaseException:
            self._record(controller, result, "error")
            raise
        self._finish_result(controller, result)
        self._record(controller, result, self._outcome(result))
        yield ChoiceEvent(self.index, result=result)

    async def _generate(
        self, controller: ThinkingController, result: ChoiceResult
    ) -> AsyncGenerator[ChoiceEvent, None]:
        generation = self.context.backend.generate(self.prompt, self.sampling, self.request_id)
        generated: list[int] = []
        decision: StopDecision | None = None
        finished = False
        stream = generation.__aiter__()
        try:
            async for chunk in stream:
                generated += chunk.token_ids
                update = self._feed(controller, chunk.text, len(chunk.token_ids))
                if update.decision is not None and self.control.shadow:
                    result.shadow_decision = update.decision
                elif update.decision is not None:
                    decision = update.decision
                    await generation.abort()  # at once: no more thinking is decoded
                yield self._event(update, chunk.text)
                if decision is not None:
                    break
                if chunk.finish_reason is not None:
                    result.finish_reason = chunk.finish_reason
                    finished = True
        finally:
            if not finished:
                await generation.abort()
            await stream.aclose()
        result.prompt_tokens = len(generation.prompt_token_ids or [])
        result.generated_tokens = len(generated)
        if decision is None:
            yield self._event(controller.finish(), "")
            return
        result.stopped, result.decision = True, decision
        async with aclosing(self._finalize(controller, result, generation, generated, decision)) as events:
            async for event in events:
                yield event

    async def _finalize(
        self,
        controller: ThinkingController,
        result: ChoiceResult,
        generation: Generation,
        generated: list[int],
        decision: StopDecision,
    ) -> AsyncGenerator[ChoiceEvent, None]:
        backend = self.context.backend
        finalize = self.control.finalize
        end_text = backend.think_end_text
        end_ids = await backend.encode(end_text) if finalize == "model" else None
        if finalize == "model" and (end_ids is None or generation.prompt_token_ids is None):
            log.warning("cannot continue from token ids on this backend; finalizing with the detected answer")
            finalize = "answer"
        if finalize == "none":
            yield self._event(controller.finish(), "")
            return
        yield self._event(self._feed(controller, end_text, 0), end_text)
        if finalize == "answer":
            answer = f"**Final Answer**\n\n\\boxed{{{decision.answer}}}" if decision.answer is not None else ""
            yield self._event(self._feed(controller, answer, 0), answer)
            yield self._event(controller.finish(), "")
            return
        assert end_ids is not None and generation.prompt_token_ids is not None
        token_ids = generation.prompt_token_ids + generated + end_ids
        limit = self.control.max_answer_tokens
        if self.sampling.max_tokens is not None:
            limit = max(1, min(limit, self.sampling.max_tokens - len(generated)))
        sampling = Sampling(limit, self.sampling.options, self.sampling.extra_args)
        continuation = backend.continue_tokens(token_ids, sampling, f"{self.request_id}-answer")
        stream = continuation.__aiter__()
        finished = False
        try:
            async for chunk in stream:
                result.generated_tokens += len(chunk.token_ids)
                yield self._event(self._feed(controller, chunk.text, len(chunk.token_ids)), chunk.text)
                if chunk.finish_reason is not None:
                    result.finish_reason = chunk.finish_reason
                    finished = True
        finally:
            if not finished:
                await continuation.abort()
            await stream.aclose()
        result.continuation_cached_tokens = getattr(continuation, "num_cached_tokens", None)
        yield self._event(controller.finish(), "")

    def _feed(self, controller: ThinkingController, text: str, tokens: int) -> Update:
        began = time.perf_counter()
        update = controller.feed(text, tokens)
        self.context.metrics.observe_controller(
            time.perf_counter() - began, tokens, self.context.model_name, self.control.policy.name
        )
        for event in update.events:
            if event.kind == ANSWER and event.answer is not None:
                self._last_answer = event.answer
        return update

    def _event(self, update: Update, raw: str) -> ChoiceEvent:
        event = ChoiceEvent(self.index, reasoning=update.reasoning, content=update.content)
        if self.raw_text:
            event = ChoiceEvent(self.index, text=raw)
        self._content.append(update.content)
        if self._first_token_at is None and not event.empty:
            self._first_token_at = time.perf_counter()
        return event

    def _finish_result(self, controller: ThinkingController, result: ChoiceResult) -> None:
        result.thinking_tokens = controller.thinking_tokens
        result.answer_tokens = controller.answer_tokens
        result.solutions = max(controller.solutions, result.decision.solutions if result.decision else 0)
        result.controller_error = controller.error
        would = result.shadow_decision
        if would is not None and would.answer is not None:
            final = last_boxed("".join(self._content)) or self._last_answer
            result.shadow_agree = None if final is None else self.context.comparer.equal(would.answer, final)

    @staticmethod
    def _outcome(result: ChoiceResult) -> str:
        if result.stopped:
            return "stopped"
        return "length" if result.finish_reason == "length" else "natural"

    def _record(self, controller: ThinkingController, result: ChoiceResult, outcome: str) -> None:
        context, policy = self.context, self.control.policy.name
        if controller.error:
            context.metrics.count_controller_error(context.model_name, policy)
        decision, would = result.decision, result.shadow_decision
        first = self._first_token_at
        try:
            context.metrics.observe_request(
                RequestRecord(
                    model=context.model_name,
                    policy=policy,
                    outcome=outcome,
                    reason=decision.reason if decision else None,
                    prompt_tokens=result.prompt_tokens,
                    thinking_tokens=controller.thinking_tokens,
                    answer_tokens=controller.answer_tokens,
                    solutions=max(controller.solutions, decision.solutions if decision else 0),
                    stop_position_tokens=decision.tokens if decision else None,
                    shadow=self.control.shadow,
                    shadow_would_stop=would is not None,
                    shadow_stop_tokens=would.tokens if would else None,
                    shadow_agree=result.shadow_agree,
                    ttft_seconds=None if first is None else first - self.started,
                    latency_seconds=time.perf_counter() - self.started,
                )
            )
        except Exception:  # noqa: BLE001 - metrics must never break a response
            log.exception("recording request metrics failed")
