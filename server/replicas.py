"""Several upstream replicas of one model behind one backend (``serve --upstream A --upstream B ...``).

A choice's main request goes to the serving replica with the fewest requests in flight (ties in turn); its answer
probes and its continuation after a stop go to the same replica, the one whose prefix cache holds the choice's
prompt and thinking (:func:`server.backend.choice_of` ties a side request to its choice). A probe is never sent
elsewhere: on another replica it would prefill the whole prefix again, which costs more than the probe saves.

Health: each replica is an :class:`server.upstream.UpstreamBackend` with its own health (reached at start, marked
unreachable when a connection fails, watched until it lists its models again). A replica serves new requests only
while its health is ``ok``. A request whose connection fails before anything was sent (nothing reached the
replica) is sent to the next serving replica at once, so a replica that went down costs no client an error once
it is known; a stream that breaks mid-way ends in an error for its client (the tokens sent cannot be taken back).
A probe whose replica is gone makes the choice go on text-only (:class:`ReplicaLost`).

Invariants: the backend is ready once one replica listed its models, and serves while one is ``ok``; in-flight
counts go up when a request starts and down when it ends, however it ends; a choice's pin never moves while its
replica serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from controller.probes import ProbeSpec
from server.backend import BackendError, ChoiceMemory, ProbeRejected, TextPrompt
from server.settings import Settings
from server.upstream import UpstreamBackend
from server.upstream_health import UNAVAILABLE_CODE
from server.vocabulary import REPLICA_LOST

if TYPE_CHECKING:
    from server.backend import Chunk, ProbeOutput, Prompt, Sampling

log = logging.getLogger(__name__)


class ReplicaLost(ProbeRejected):
    """The replica holding a choice's prefix cannot be reached: the choice goes on text-only."""

    reason = REPLICA_LOST


class Replicas:
    """The backend over several :class:`UpstreamBackend` replicas (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replicas = [UpstreamBackend(settings, url) for url in settings.upstream]
        first = self.replicas[0]
        self.delimiters = first.delimiters
        self.think_end_text = first.think_end_text
        self.model_name = settings.served_model_name or ""
        self.in_flight = [0] * len(self.replicas)
        self._turn = itertools.count()
        self._pins: ChoiceMemory[int] = ChoiceMemory()
        self._starts: list[asyncio.Task[None]] = []
        self._first_ready = asyncio.Event()

    @property
    def description(self) -> str:
        return "upstream replicas " + ", ".join(replica.health.url for replica in self.replicas)

    @property
    def ready(self) -> bool:
        return any(replica.ready for replica in self.replicas)

    def serving(self) -> list[int]:
        """Indices of the replicas that take new requests: started and last seen answering."""
        return [i for i, replica in enumerate(self.replicas) if replica.ready and replica.health.ok]

    def unavailable(self) -> BackendError | None:
        """None while a replica serves; otherwise a 503 naming each replica's state."""
        if self.serving():
            return None
        reasons = "; ".join(replica.health.reason for replica in self.replicas)
        return BackendError(f"no upstream replica is serving: {reasons}", 503, UNAVAILABLE_CODE)

    async def start(self) -> None:
        """Start every replica; return once the first is ready (the others join as they come)."""
        self._starts = [asyncio.create_task(self._start(i)) for i in range(len(self.replicas))]
        await self._first_ready.wait()

    async def _start(self, index: int) -> None:
        replica = self.replicas[index]
        await replica.start()
        first = not self._first_ready.is_set()
        if first:
            self.model_name = self.model_name or replica.model_name
            self._first_ready.set()
        elif replica.upstream_model != self.replicas[self._first_index()].upstream_model:
            log.warning(
                "replica %s serves model %s, another serves %s: replicas should serve one model",
                replica.health.url, replica.upstream_model, self.replicas[self._first_index()].upstream_model,
            )  # fmt: skip

    def _first_index(self) -> int:
        return next(i for i, replica in enumerate(self.replicas) if replica.ready)

    async def shutdown(self) -> None:
        for task in self._starts:
            task.cancel()
        await asyncio.gather(*self._starts, return_exceptions=True)
        await asyncio.gather(*(replica.shutdown() for replica in self.replicas))

    def pick(self, exclude: frozenset[int] = frozenset()) -> int | None:
        """The serving replica (not in ``exclude``) with the fewest requests in flight, ties taken in turn."""
        candidates = [i for i in self.serving() if i not in exclude]
        if not candidates:
            return None
        fewest = min(self.in_flight[i] for i in candidates)
        tied = [i for i in candidates if self.in_flight[i] == fewest]
        return tied[next(self._turn) % len(tied)]

    def pinned(self, request_id: str) -> int | None:
        """The replica of the choice ``request_id`` belongs to, if it has one."""
        return self._pins.get(request_id)

    def pin(self, request_id: str, index: int) -> None:
        self._pins.set(request_id, index)

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> ReplicaGeneration:
        return ReplicaGeneration(self, prompt, sampling, request_id)

    def continue_tokens(self, token_ids: list[int], sampling: Sampling, request_id: str) -> ReplicaGeneration:
        return ReplicaGeneration(self, TextPrompt(token_ids=list(token_ids)), sampling, request_id)

    def _any(self) -> UpstreamBackend:
        serving = self.serving()
        return self.replicas[serving[0] if serving else self._first_index()]

    async def encode(self, text: str) -> list[int] | None:
        return await self._any().encode(text)

    async def prompt_tail(self, prompt: TextPrompt) -> str:
        return await self._any().prompt_tail(prompt)

    async def probe(
        self, token_ids: list[int], spec: ProbeSpec, extra_args: dict[str, Any] | None, request_id: str
    ) -> ProbeOutput:
        """The probe on the choice's replica; :class:`ReplicaLost` if that replica is not serving or cannot be
        reached (never another replica: see the module docstring)."""
        index = self.pinned(request_id)
        if index is None:  # a probe before its choice's request was placed: place the choice now
            index = self.pick()
            if index is None:
                raise ReplicaLost("no upstream replica is serving")
            self.pin(request_id, index)
        replica = self.replicas[index]
        if not replica.health.ok:
            raise ReplicaLost(f"the replica holding this choice's prefix is not serving: {replica.health.reason}")
        self.in_flight[index] += 1
        try:
            return await replica.probe(token_ids, spec, extra_args, request_id)
        except BackendError as error:
            if error.code == UNAVAILABLE_CODE:
                raise ReplicaLost(error.message) from error
            raise
        finally:
            self.in_flight[index] -= 1


class ReplicaGeneration:
    """One generation on a replica: the choice's pinned one (a continuation) or the least busy (a new choice).

    If the connection fails before any chunk came (nothing reached the replica), the next serving replica is
    tried, each at most once; the choice is pinned to the replica that answers."""

    def __init__(self, replicas: Replicas, prompt: Prompt, sampling: Sampling, request_id: str) -> None:
        self._replicas = replicas
        self._prompt = prompt
        self._sampling = sampling
        self._request_id = request_id
        self._inner: Any = None
        self._aborted = False

    @property
    def prompt_token_ids(self) -> list[int] | None:
        return None if self._inner is None else self._inner.prompt_token_ids

    @property
    def num_cached_tokens(self) -> int | None:
        return None if self._inner is None else self._inner.num_cached_tokens

    def _first(self) -> int | None:
        pinned = self._replicas.pinned(self._request_id)
        if pinned is not None and self._replicas.replicas[pinned].health.ok:
            return pinned
        return self._replicas.pick()

    async def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        replicas = self._replicas
        tried: set[int] = set()
        index = self._first()
        while not self._aborted:
            if index is None:
                raise replicas.unavailable() or BackendError("no upstream replica is serving", 503, UNAVAILABLE_CODE)
            replicas.pin(self._request_id, index)
            tried.add(index)
            replica = replicas.replicas[index]
            self._inner = replica.generate(self._prompt, self._sampling, self._request_id)
            started = False
            replicas.in_flight[index] += 1
            try:
                async with contextlib.aclosing(self._inner.__aiter__()) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
                return
            except BackendError as error:
                if started or self._aborted or error.code != UNAVAILABLE_CODE:
                    raise
                log.warning("replica %s could not be reached; trying another: %s", replica.health.url, error.message)
            finally:
                replicas.in_flight[index] -= 1
            index = replicas.pick(exclude=frozenset(tried))

    async def abort(self) -> None:
        self._aborted = True
        if self._inner is not None:
            await self._inner.abort()


def upstream_backend(settings: Settings) -> tuple[Any, str]:
    """The backend for ``--upstream`` (one :class:`UpstreamBackend`, or :class:`Replicas` for several) and what it
    is, in words, for the log."""
    if len(settings.upstream) == 1:
        backend = UpstreamBackend(settings)
        return backend, f"upstream {backend.health.url}"
    replicas = Replicas(settings)
    return replicas, replicas.description
