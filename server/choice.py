"""One choice of one request: backend stream -> controller -> events, and what happens at a stop.

:meth:`ChoiceRunner.run` yields :class:`ChoiceEvent` objects as text becomes certain and a final event with
the :class:`ChoiceResult`. At a stop decision the backend request is aborted *before* anything else happens
(no more thinking is decoded); then, per ``finalize``: ``model`` continues from the token ids (prompt +
generated + end-of-thinking ids) so the backend reuses its prefix cache; ``answer`` writes a short final
answer from the detected one; ``none`` ends with the thinking only. The client sees one stream.

Answer probes (policies whose ``uses_probes`` is true): each probe the controller asks for runs as its own
backend request beside the main decode (:mod:`server.probing`); its answer goes to the controller as soon as it
arrives (between two chunks of the main stream), and a stop it decides is handled like any other. A backend
that cannot probe (no ``probe`` method, no token ids) gets a text-only controller (``probes=False``); the
fallback is reported in ``thinkbrake.probes.fallback`` and in ``thinkbrake_probe_fallbacks_total``.

Invariants: the backend generation is aborted on every exit that is not its natural end (stop, error,
client disconnect = cancellation); no probe outlives its choice; exactly one metrics record is written per
choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from controller.answers import AnswerComparer, last_boxed
from controller.delimiters import Delimiters
from controller.detector import ANSWER
from controller.policies import OffConfig, PolicyRuntime, StopDecision
from controller.probes import ProbeRequest, ProbeResult
from controller.session import ThinkingController, Update
from server.backend import Backend, BackendError, Chunk, Generation, Prompt, Sampling, tokens_through
from server.events import ChoiceEvent, ChoiceResult
from server.metrics import Metrics, RequestRecord
from server.probing import NO_PROBE_METHOD, NO_TOKEN_IDS, ChoiceProbes, Interleave
from server.protocol import RequestControl

log = logging.getLogger(__name__)
#: at a stop decided by a probe, how long to wait for the main stream's chunk already on its way (one engine
#: step): its tokens were decoded, so they are counted and forwarded like the rest
DRAIN_SECONDS = 1.0


def error_outcome(error: BaseException) -> str:
    """The metrics outcome of a choice that ended with ``error``: ``client_error`` when the client is at fault (the
    backend refused the request as bad, a 4xx; or the client went away, which cancels the choice), else
    ``server_error`` (a backend failure, a 5xx, a bug)."""
    if isinstance(error, BackendError):
        return "client_error" if 400 <= error.status_code < 500 else "server_error"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "client_error"
    return "server_error"


def keep_detecting(controller: ThinkingController, update: Update, tokens: int, comparer: AnswerComparer) -> None:
    """Shadow mode, once a would-be stop is recorded: the controller reads on to the natural end as with policy
    ``off``, so ``solutions`` and every count are those of the whole thinking.

    A controller stops detecting at a decision, and the delta that commits a held decision (``past_stop``: it
    only showed that the model goes on) is not detected at all, since it lies past the stop. So here the decision
    is cleared, that delta's thinking goes to the detector, and the policy becomes ``off`` (no new decision).
    An answer probe already on its way may still decide: the caller ignores it and calls this again."""
    controller.decision = None
    controller.kept_tokens = None
    controller.policy = PolicyRuntime(OffConfig(), comparer.equal)
    if update.past_stop and update.reasoning:
        for event in controller.detector.feed(update.reasoning, tokens):
            controller.policy.observe(event)


@dataclass
class RunContext:
    """Shared, read-only things a runner needs (one per server)."""

    backend: Backend
    metrics: Metrics
    comparer: AnswerComparer
    model_name: str
    #: token ids of each end-of-thinking delimiter, as the backend encodes it (shared by the server's requests)
    end_ids: dict[str, list[int]] = field(default_factory=dict)


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
    _probes: ChoiceProbes | None = None
    _controller: ThinkingController | None = None
    #: what a probing controller was fed, until its first probe answers (to replay it if probing fails)
    _fed: list[tuple[str, int, int | None]] | None = None
    _end_ids_asked: bool = False

    @property
    def probes(self) -> ChoiceProbes:
        if self._probes is None:
            context = self.context
            self._probes = ChoiceProbes(
                context.backend, context.metrics, context.model_name, self.control.policy.name,
                self.request_id, self.sampling.extra_args,
            )  # fmt: skip
        return self._probes

    @property
    def controller(self) -> ThinkingController:
        """The choice's controller; text-only when the policy probes but the backend cannot."""
        if self._controller is None:
            fallback = None if hasattr(self.context.backend, "probe") else NO_PROBE_METHOD
            self._controller = self._new_controller(fallback)
        return self._controller

    def _new_controller(self, fallback: str | None) -> ThinkingController:
        policy = self.control.policy
        if policy.uses_probes and fallback is not None:
            self.probes.stats.fallback = fallback
        self._fed = [] if policy.uses_probes and fallback is None else None
        return ThinkingController(
            policy, self.delimiters, self.context.comparer, probes=fallback is None, question=self.question
        )

    def _go_text_only(self) -> StopDecision | None:
        """Probing failed mid-choice (a probe was rejected, token ids went missing): continue with a text-only
        controller fed everything so far (once). Returns the stop it decides on that text, if any."""
        fed, self._fed = self._fed or [], None
        controller = self._controller = self._new_controller(self.probes.stats.fallback)
        decision = None
        for text, tokens, through_end in fed:
            decision = decision or controller.feed(text, tokens, through_end).decision
        return decision

    async def run(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Yield the choice's events; the last one carries the result."""
        result = ChoiceResult("stop", self.control.policy.name, self.control.shadow)
        try:
            async with aclosing(self._generate(result)) as events:
                async for event in events:
                    yield event
        except BaseException as error:
            self._record(self.controller, result, error_outcome(error))
            raise
        self._finish_result(self.controller, result)
        self._record(self.controller, result, self._outcome(result))
        yield ChoiceEvent(self.index, result=result)

    async def _generate(self, result: ChoiceResult) -> AsyncGenerator[ChoiceEvent, None]:
        generation = self.context.backend.generate(self.prompt, self.sampling, self.request_id)
        generated: list[int] = []
        decision: StopDecision | None = None
        finished = False
        stream = generation.__aiter__()
        probes = self.probes
        merged = Interleave(stream, probes)
        try:
            async with aclosing(merged.items()) as items:
                async for item in items:
                    if isinstance(item, ProbeResult):
                        text, update = "", self.controller.probe_result(item)
                    else:
                        self._check_token_ids(generation, item, not generated)
                        through_end = await self._through_end(item, generated)
                        update = self._feed(self.controller, item.text, len(item.token_ids), through_end)
                        text = item.text
                        generated += item.token_ids
                        self._log_fed(item, through_end)
                    if self._fed is not None and probes.stats.fallback is not None:
                        update.decision = update.decision or self._go_text_only()
                    if update.decision is not None and self.control.shadow:
                        result.shadow_decision = result.shadow_decision or update.decision
                        tokens = len(item.token_ids) if isinstance(item, Chunk) else 0
                        keep_detecting(self.controller, update, tokens, self.context.comparer)
                    elif update.decision is not None and not (isinstance(item, Chunk) and item.finish_reason):
                        decision = update.decision  # (a decision on the stream's last chunk saves nothing)
                        late = await merged.drain(DRAIN_SECONDS)  # a probe decided while a chunk was on its way
                        if late is not None:
                            through_end = await self._through_end(late, generated)
                            generated += late.token_ids
                            late_update = self._feed(self.controller, late.text, len(late.token_ids), through_end)
                            self._merge(update, late_update)
                            text += late.text
                            self.controller.kept_tokens = self.controller.fed_tokens  # shown, so kept
                        await generation.abort()  # at once: no more thinking is decoded
                        if update.past_stop:  # this delta only showed the model goes on: it is past the stop point
                            update, text = Update(decision=decision, events=update.events, past_stop=True), ""
                    yield self._event(update, text)
                    if decision is not None:
                        break
                    if result.shadow_decision is None:  # past a would-be stop, probes could change nothing
                        self._launch(update.probes, generation, generated)
                    if isinstance(item, Chunk) and item.finish_reason is not None:
                        result.finish_reason = item.finish_reason
                        finished = True
        finally:
            await merged.stop()
            await probes.cancel()
            if not finished:
                await generation.abort()
            await stream.aclose()
        result.prompt_tokens = len(generation.prompt_token_ids or [])
        result.generated_tokens = len(generated)
        controller = self.controller
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
        kept = generated if controller.kept_tokens is None else generated[: controller.kept_tokens]
        token_ids = generation.prompt_token_ids + kept + end_ids
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

    def _check_token_ids(self, generation: Generation, chunk: Chunk, first: bool) -> None:
        """Before feeding a chunk: a probing controller on a generation without token ids goes text-only (at the
        first chunk, by a fresh text-only controller; later, by sending no more probes)."""
        stats = self.probes.stats
        if stats.fallback is not None or not self.control.policy.uses_probes:
            return
        if generation.prompt_token_ids is not None and all(token >= 0 for token in chunk.token_ids):
            return
        if first:
            self._controller = self._new_controller(NO_TOKEN_IDS)
        else:
            stats.fallback = NO_TOKEN_IDS  # the loop replays the text into a text-only controller

    @staticmethod
    def _merge(update: Update, late: Update) -> None:
        update.reasoning += late.reasoning
        update.content += late.content
        update.events += late.events

    def _log_fed(self, chunk: Chunk, through_end: int | None) -> None:
        if self._fed is not None:
            if self.probes.stats.answered:
                self._fed = None  # probing works here: no replay will be needed
            else:
                self._fed.append((chunk.text, len(chunk.token_ids), through_end))

    async def _through_end(self, chunk: Chunk, generated: list[int]) -> int | None:
        """How many of a multi-token chunk's tokens come up to and including the end-of-thinking delimiter's ids,
        while the thinking is open and the chunk may close it (the backend merges tokens into one chunk when the
        reader lags, so the tokens after the end tag can arrive with it); None when unknown or not there."""
        end = self.delimiters.end
        if len(chunk.token_ids) < 2 or self.controller.thinking_done or not end or end[-1] not in chunk.text:
            return None
        end_ids = await self._delimiter_ids(end)
        return None if end_ids is None else tokens_through(end_ids, generated, chunk.token_ids)

    async def _delimiter_ids(self, end: str) -> list[int] | None:
        shared = self.context.end_ids
        if end not in shared and not self._end_ids_asked:
            self._end_ids_asked = True  # once per choice: a backend that cannot encode is not asked again
            try:
                encoded = await self.context.backend.encode(end)
            except Exception:  # noqa: BLE001 - without the ids the whole chunk counts as thinking, as before
                log.debug("encoding the end-of-thinking delimiter failed", exc_info=True)
                encoded = None
            if encoded:
                shared[end] = list(encoded)
        return shared.get(end)

    def _launch(self, requests: list[ProbeRequest], generation: Generation, generated: list[int]) -> None:
        probes = self.probes
        if not requests or probes.stats.fallback is not None or generation.prompt_token_ids is None:
            return
        for request in requests:
            probes.launch(request, generation.prompt_token_ids, generated)

    def _feed(self, controller: ThinkingController, text: str, tokens: int, through_end: int | None = None) -> Update:
        began = time.perf_counter()
        update = controller.feed(text, tokens, through_end)
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
        stats = self.probes.stats
        if self.control.policy.uses_probes or stats.sent:
            result.probes = stats.info()
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
                    probe_tokens=self.probes.stats.tokens,
                    probe_fallback=self.probes.stats.fallback,
                )
            )
        except Exception:  # noqa: BLE001 - metrics must never break a response
            log.exception("recording request metrics failed")
