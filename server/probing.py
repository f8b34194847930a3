"""Answer probes of one choice, run beside its main decode.

The controller asks for probes (``Update.probes``); :class:`ChoiceProbes` sends each as its own backend
request (prompt ids + ``generated_ids[:tokens]`` + the probe suffix, see :mod:`controller.probes`) in a task,
and :class:`Interleave` merges the main stream's chunks with the probes' answers, in arrival order, so the main
decode never waits for a probe and a probe's answer is applied as soon as it arrives.

Invariants: a probe never raises into the choice (a failed probe is answered "no answer" and counted); after
:meth:`ChoiceProbes.cancel` no probe task is left running (cancelling one aborts its backend request);
:class:`Interleave` holds at most one pending read of the main stream, and :meth:`Interleave.drain` or
:meth:`Interleave.stop` ends it before anyone else touches the stream (aborting a generation while a read is in
flight would fail).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from controller.probes import ProbeRequest, ProbeResult, probe_spec, read_probe
from server.backend import BackendError, Chunk, ProbeRejected, probe_extra_args, side_request
from server.metrics import Metrics
from server.vocabulary import FALLBACK_TEXT

log = logging.getLogger(__name__)


def fallback_text(reason: str) -> str:
    """The human-readable form of a fallback reason (the ``thinkbrake.probes.fallback`` field)."""
    return FALLBACK_TEXT.get(reason, reason)


@dataclass
class ProbeStats:
    """What the probes of one choice did (the ``probes`` part of the ``thinkbrake`` object)."""

    sent: int = 0
    answered: int = 0
    failed: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: answered probes whose backend reported its cache and served under half their prompt from it (the probe
    #: reached a replica that did not hold the choice's prefix)
    missed_cache: int = 0
    fallback: str | None = None

    def info(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "missed_cache": self.missed_cache,
            "fallback": None if self.fallback is None else fallback_text(self.fallback),
        }


@dataclass
class ChoiceProbes:
    """The probes of one choice: launch, collect answers, cancel. Labels are for the metrics."""

    backend: Any
    metrics: Metrics
    model: str
    policy: str
    request_id: str
    extra_args: dict[str, Any] | None
    stats: ProbeStats = field(default_factory=ProbeStats)
    _tasks: dict[asyncio.Task[ProbeResult], ProbeRequest] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    @property
    def tasks(self) -> set[asyncio.Task[ProbeResult]]:
        return set(self._tasks)

    def launch(self, request: ProbeRequest, prompt_ids: list[int], generated: list[int]) -> None:
        """Start one probe on ``prompt_ids + generated[:request.tokens]`` (the lists are copied now)."""
        prefix = [*prompt_ids, *generated[: max(0, request.tokens)]]
        task = asyncio.ensure_future(self._run(request, prefix))
        self._tasks[task] = request
        self.stats.sent += 1
        self.metrics.count_probe(self.model, self.policy)

    def take(self) -> list[ProbeResult]:
        """The answers of probes that finished since the last call, in launch order."""
        done = [task for task in self._tasks if task.done()]
        results = []
        for task in done:
            del self._tasks[task]
            if not task.cancelled():
                results.append(task.result())
        return results

    async def cancel(self) -> None:
        """Cancel every running probe and wait until they are gone (their backend requests are aborted)."""
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, request: ProbeRequest, prefix: list[int]) -> ProbeResult:
        spec = probe_spec(request.trigger, self.model)
        probe_id = side_request(self.request_id, "probe", request.id)
        began = time.perf_counter()
        try:
            output = await self.backend.probe(prefix, spec, probe_extra_args(self.extra_args, request.id), probe_id)
        except ProbeRejected as error:
            log.warning("probe %s rejected; this choice continues text-only: %s", probe_id, error.message)
            self.stats.fallback = self.stats.fallback or error.reason
            return self._failed(request)
        except BackendError as error:
            log.warning("probe %s failed: %s", probe_id, error.message)
            return self._failed(request)
        except Exception:  # noqa: BLE001 - a probe must never break the choice
            log.exception("probe %s failed", probe_id)
            return self._failed(request)
        seconds = time.perf_counter() - began
        result = read_probe(spec, request.id, output.text, output.logprobs)
        if result.out_tokens != output.tokens:  # the backend gave fewer log-probabilities than tokens
            result = replace(result, out_tokens=output.tokens)
        stats = self.stats
        stats.answered += 1
        stats.tokens += output.tokens
        stats.prompt_tokens += output.prompt_tokens
        stats.cached_tokens += output.cached_tokens or 0
        if output.cached_tokens is not None and 2 * output.cached_tokens < output.prompt_tokens:
            stats.missed_cache += 1
        self.metrics.observe_probe(
            self.model, self.policy, seconds, output.tokens, output.cached_tokens, output.prompt_tokens
        )
        return result

    def _failed(self, request: ProbeRequest) -> ProbeResult:
        self.stats.failed += 1
        self.metrics.count_probe_error(self.model, self.policy)
        return ProbeResult(request.id, None, 0.0, 0)


_END = object()


async def _next_chunk(stream: AsyncIterator[Chunk]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


class Interleave:
    """The main stream's chunks and the probes' answers, in arrival order (answers first when both are ready).

    While no probe runs, chunks are read directly (no task per chunk); while probes run, the next chunk is read
    in a task and awaited together with them.
    """

    def __init__(self, stream: AsyncIterator[Chunk], probes: ChoiceProbes) -> None:
        self._stream = stream
        self._probes = probes
        self._next: asyncio.Future[Any] | None = None

    async def items(self) -> AsyncGenerator[Chunk | ProbeResult, None]:
        probes = self._probes
        while True:
            for result in probes.take():
                yield result
            if self._next is None and not probes.running:
                try:  # (inline, not _next_chunk: this is the path of nearly every token)
                    chunk = await anext(self._stream)
                except StopAsyncIteration:
                    return
                yield chunk
                continue
            if self._next is None:
                self._next = asyncio.ensure_future(_next_chunk(self._stream))
            await asyncio.wait({self._next, *probes.tasks}, return_when=asyncio.FIRST_COMPLETED)
            if not self._next.done():
                continue
            task, self._next = self._next, None
            for result in probes.take():
                yield result
            chunk = task.result()
            if chunk is _END:
                return
            yield chunk

    async def drain(self, timeout: float) -> Chunk | None:
        """At a stop decided by a probe: wait (at most ``timeout`` seconds) for the pending read of the main
        stream and return its chunk, so the tokens the backend already delivered are counted and shown like
        the rest; None when no read was pending, the stream ended or failed, or the time ran out."""
        task, self._next = self._next, None
        if task is None:
            return None
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        if task.cancelled() or task.exception() is not None:
            return None
        chunk = task.result()
        return None if chunk is _END else chunk

    async def stop(self) -> None:
        """End a pending read of the main stream (cancelling it); call before aborting or closing the stream."""
        task, self._next = self._next, None
        if task is not None:
            task.cancel()  # no effect on a finished read; its chunk or error is dropped with the stream
            await asyncio.gather(task, return_exceptions=True)
