"""One choice of one request: backend stream -> controller -> events, and what happens at a stop.

:meth:`ChoiceRunner.run` yields :class:`ChoiceEvent` objects as text becomes certain and a final event with
the :class:`ChoiceResult`. At a stop decision the backend request is aborted *before* anything else happens
(no more thinking is decoded); then the answer is written per ``finalize`` (:mod:`server.finalize`). The client
sees one stream.

Answer probes (policies whose ``uses_probes`` is true): each probe the controller asks for runs as its own
backend request beside the main decode (:mod:`server.probing`); its answer goes to the controller as soon as it
arrives (between two chunks of the main stream), and a stop it decides is handled like any other. A backend
that cannot probe (not a :class:`server.backend.ProbingBackend`, or no token ids) gets a text-only controller;
the fallback is reported in ``thinkbrake.probes.fallback`` and in ``thinkbrake_probe_fallbacks_total``.

The runner talks to the backend and drives the controller through its methods; it never sets controller state.

A choice of a request drawn for recording (``serve --record``, :mod:`server.recording`) runs in shadow mode and
tells its :class:`server.recording.ChoiceRecording` what it streamed and what the policy's probes answered.

Invariants: the backend generation is aborted on every exit that is not its natural end (stop, error,
client disconnect = cancellation); no policy probe outlives its choice; exactly one metrics record is written per
choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from controller.delimiters import Delimiters
from controller.policies import StopDecision
from controller.probes import ProbeRequest, ProbeResult
from controller.session import ThinkingController, Update
from server.backend import Backend, BackendError, Chunk, Generation, ProbingBackend, Prompt, Sampling
from server.comparisons import Comparisons
from server.emitter import Emitter
from server.end_ids import EndOfThinking
from server.events import ChoiceEvent, ChoiceResult
from server.finalize import Stopped, finalize
from server.metrics import Metrics
from server.probing import ChoiceProbes, Interleave
from server.protocol import RequestControl
from server.recording import ChoiceRecording, drawn_recorder
from server.records import record_choice
from server.vocabulary import NO_PROBE_METHOD, NO_TOKEN_IDS

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


def outcome_of(result: ChoiceResult) -> str:
    """The metrics outcome of a choice that ended without an error."""
    if result.stopped:
        return "stopped"
    return "length" if result.finish_reason == "length" else "natural"


@dataclass
class RunContext:
    """Shared, read-only things a runner needs (one per server)."""

    backend: Backend
    metrics: Metrics
    comparer: Comparisons
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
    _probes: ChoiceProbes | None = None
    _controller: ThinkingController | None = None
    _recording: ChoiceRecording | None = None

    def __post_init__(self) -> None:
        context = self.context
        recorder = drawn_recorder()
        if recorder is not None:  # a recorded choice runs in shadow mode, to its natural end
            self.control = replace(self.control, shadow=True)
            self._recording = recorder.choice(
                self.request_id, context.model_name, self.control.policy, self.question, self.sampling.extra_args,
                self.sampling.options.get("seed"),
            )  # fmt: skip
        self.emit = Emitter(self.index, self.raw_text, context.metrics, context.model_name, self.control.policy.name)
        self.end = EndOfThinking(context.backend, self.delimiters.end, context.end_ids)

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
        """The choice's controller (made at first use); text-only when the policy probes but the backend cannot."""
        if self._controller is None:
            policy = self.control.policy
            probing = isinstance(self.context.backend, ProbingBackend)
            if policy.uses_probes and not probing:
                self.probes.stats.fallback = NO_PROBE_METHOD
            self._controller = ThinkingController(
                policy, self.delimiters, self.context.comparer.equal, probes=probing, question=self.question
            )
        return self._controller

    async def run(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Yield the choice's events; the last one carries the result."""
        result = ChoiceResult("stop", self.control.policy.name, self.control.shadow, risk=self.control.risk)
        try:
            async with aclosing(self._generate(result)) as events:
                async for event in events:
                    yield event
            await self._finish_result(result)  # (it may wait for a comparison: a cancellation there is recorded)
        except BaseException as error:
            self._record(result, error_outcome(error))
            raise
        self._record(result, outcome_of(result))
        yield ChoiceEvent(self.index, result=result)

    async def _generate(self, result: ChoiceResult) -> AsyncGenerator[ChoiceEvent, None]:
        generation = self.context.backend.generate(self.prompt, self.sampling, self.request_id)
        generated: list[int] = []
        decision: StopDecision | None = None
        finished = False
        stream = generation.__aiter__()
        probes, emit = self.probes, self.emit
        merged = Interleave(stream, probes)
        try:
            async with aclosing(merged.items()) as items:
                async for item in items:
                    if isinstance(item, ProbeResult):
                        text, update = "", self.controller.probe_result(item)
                        if update.compare is not None:  # the controller waits for a comparison (off the loop)
                            await self._compared(update)
                    else:
                        self._check_token_ids(generation, item, not generated)
                        through_end = await self._through_end(item, generated)
                        update = emit.feed(self.controller, item.text, len(item.token_ids), through_end)
                        if update.compare is not None:
                            await self._compared(update)
                        text = item.text
                        generated += item.token_ids
                        if probes.stats.answered:
                            self.controller.keep_probing()
                    if probes.stats.fallback is not None:
                        refed = await self._compared(self.controller.go_text_only())
                        update.decision = update.decision or refed.decision
                    if update.decision is not None and self.control.shadow:
                        result.shadow_decision = result.shadow_decision or update.decision
                        self.controller.keep_detecting(update, len(item.token_ids) if isinstance(item, Chunk) else 0)
                    elif update.decision is not None and not (isinstance(item, Chunk) and item.finish_reason):
                        decision = update.decision  # (a decision on the stream's last chunk saves nothing)
                        late = await merged.drain(DRAIN_SECONDS)  # a probe decided while a chunk was on its way
                        if late is not None:
                            through_end = await self._through_end(late, generated)
                            generated += late.token_ids
                            late_update = emit.feed(self.controller, late.text, len(late.token_ids), through_end)
                            _merge(update, late_update)
                            text += late.text
                            self.controller.keep_fed_tokens()  # shown, so kept
                        await generation.abort()  # at once: no more thinking is decoded
                        if update.past_stop:  # this delta only showed the model goes on: it is past the stop point
                            update, text = Update(decision=decision, events=update.events, past_stop=True), ""
                    yield emit.event(update, text)
                    if decision is not None:
                        break
                    if result.shadow_decision is None:  # past a would-be stop, probes could change nothing
                        self._launch(update.probes, generation, generated)
                    if isinstance(item, Chunk) and item.finish_reason is not None:
                        result.finish_reason = item.finish_reason
                        finished = True
                    if self._recording is not None:
                        thinking_done = self.controller.thinking_done
                        self._recording.step(item, update, generated, generation.prompt_token_ids, thinking_done)
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
            update = controller.finish()
            if self._recording is not None:
                self._recording.step(None, update, generated, None, controller.thinking_done)
            yield emit.event(update, "")
            return
        result.stopped, result.decision = True, decision
        stopped = Stopped(generation, generated, decision)
        backend, control = self.context.backend, self.control
        events = finalize(backend, control, self.sampling, self.request_id, emit, controller, result, stopped)
        async with aclosing(events) as answer:
            async for event in answer:
                yield event

    def _check_token_ids(self, generation: Generation, chunk: Chunk, first: bool) -> None:
        """Before feeding a chunk: a probing controller on a generation without token ids goes text-only (at the
        first chunk, at once; later, in the loop, from everything it was fed, and no more probes are sent)."""
        stats = self.probes.stats
        if stats.fallback is not None or not self.control.policy.uses_probes:
            return
        if generation.prompt_token_ids is not None and min(chunk.token_ids, default=0) >= 0:
            return
        controller = self.controller  # made before the reason is set: a backend that cannot probe says so first
        stats.fallback = NO_TOKEN_IDS
        if first:
            controller.go_text_only()

    async def _through_end(self, chunk: Chunk, generated: list[int]) -> int | None:
        """How many of a multi-token chunk's tokens come up to and including the end-of-thinking delimiter's ids,
        while the thinking is open (see :mod:`server.end_ids`); None when unknown or not there."""
        if len(chunk.token_ids) < 2 or self.controller.thinking_done:
            return None
        return await self.end.through_end(chunk, generated)

    def _launch(self, requests: list[ProbeRequest], generation: Generation, generated: list[int]) -> None:
        probes = self.probes
        if not requests or probes.stats.fallback is not None or generation.prompt_token_ids is None:
            return
        for request in requests:
            probes.launch(request, generation.prompt_token_ids, generated)
        if self._recording is not None:
            self._recording.asked(requests)

    async def _compared(self, update: Update) -> Update:
        """``update`` once each comparison the controller waits for was made off the event loop (this choice waits,
        the loop serves the others) and the controller resumed: what it adds (probes, a decision) joins ``update``.
        A controller with a decision only routes text, so the late chunk fed at a stop never waits."""
        controller, comparer = self.controller, self.context.comparer
        while update.compare is not None:
            await comparer.compare(update.compare.first, update.compare.second)
            more = controller.resume()
            update.compare, update.decision = more.compare, update.decision or more.decision
            update.probes += more.probes
        return update

    async def _finish_result(self, result: ChoiceResult) -> None:
        controller = self.controller
        result.thinking_tokens = controller.thinking_tokens
        result.answer_tokens = controller.answer_tokens
        result.solutions = max(controller.solutions, result.decision.solutions if result.decision else 0)
        result.controller_error = controller.error
        stats = self.probes.stats
        if self.control.policy.uses_probes or stats.sent:
            result.probes = stats.info()
        would = result.shadow_decision
        if would is not None and would.answer is not None:
            final = controller.final_answer()
            result.shadow_agree = None if final is None else await self.context.comparer.compare(would.answer, final)

    def _record(self, result: ChoiceResult, outcome: str) -> None:
        timing = (self.started, self.emit.first_token_at)
        context = self.context
        record_choice(context.metrics, context.model_name, self.controller, result, outcome, timing, self.probes.stats)
        if self._recording is not None:
            self._recording.end(result, outcome)


def _merge(update: Update, late: Update) -> None:
    update.reasoning += late.reasoning
    update.content += late.content
    update.events += late.events
