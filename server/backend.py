"""The small interface both backends (embedded vLLM engine, OpenAI-compatible upstream) implement.

A backend turns one prompt into one :class:`Generation`: an async iterator of :class:`Chunk` (raw generated
text, thinking tags included, with its token ids) that can be aborted at any moment. The server runs one
generation per choice, so every choice can be stopped on its own.

Invariants: ``Generation.prompt_token_ids`` is known once the first chunk has arrived (None if the backend
cannot tell); the concatenation of chunk texts is the model's raw output; ``abort`` is idempotent and makes
the backend stop decoding; after it the iterator ends.

Answer probes (:mod:`controller.probes`) are optional: a backend that can run them is a :class:`ProbingBackend`
(it has a ``probe`` method besides the rest); one that cannot (or a generation whose token ids are unknown) makes the server run
the text-only fallback.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from controller.delimiters import Delimiters
from controller.probes import ProbeSpec
from server.vocabulary import REJECTED

T = TypeVar("T")


class BackendError(Exception):
    """A backend failure reported to the client in the OpenAI error shape: the error's ``type`` follows
    ``status_code``; ``code`` (a string) and ``param`` (a request field) are None where the status says it all."""

    def __init__(self, message: str, status_code: int = 502, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param


@dataclass(frozen=True)
class ChatPrompt:
    """OpenAI chat messages, rendered by the backend with the model's chat template."""

    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextPrompt:
    """A raw completion prompt (text or token ids), used as is."""

    text: str | None = None
    token_ids: list[int] | None = None


Prompt = ChatPrompt | TextPrompt


@dataclass(frozen=True)
class Sampling:
    """Sampling options of one generation. ``options`` are OpenAI/vLLM request fields passed through
    (temperature, top_p, stop, seed, ...); ``extra_args`` is vLLM's ``SamplingParams.extra_args``
    (HTTP: ``vllm_xargs``)."""

    max_tokens: int | None
    options: dict[str, Any] = field(default_factory=dict)
    extra_args: dict[str, Any] | None = None


@dataclass
class Chunk:
    """New output of one generation: raw text, its token ids and, at the end, the finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


def tokens_through(end_ids: list[int], before: list[int], token_ids: list[int]) -> int | None:
    """How many of ``token_ids`` come up to and including the first occurrence of ``end_ids`` that ends among
    them (``before``: the ids generated earlier, for a delimiter split across chunks); None when it does not
    occur. Looks only at ``token_ids`` and the ``len(end_ids) - 1`` ids before them."""
    tail = before[max(0, len(before) - len(end_ids) + 1) :] if len(end_ids) > 1 else []
    ids = tail + token_ids
    size = len(end_ids)
    for start in range(len(ids) - size + 1):
        if ids[start : start + size] == end_ids and start + size > len(tail):
            return start + size - len(tail)
    return None


#: key the server adds to a probe request's ``extra_args`` (HTTP: ``vllm_xargs``) next to the request's own, so
#: logits processors can tell a probe from the main decode (value: the probe's id within its choice)
#: the side requests of a choice (its answer probes, the continuation after a stop, recording probes) are sent
#: with the choice's request id plus ``-`` and one of these words (and a number for probes): a backend can tell
#: which choice a request belongs to (:func:`choice_of`) and send it where that choice's prefix is cached
SIDE_REQUESTS = ("answer", "probe", "record")
_SIDE = re.compile(r"-(?:answer|probe\d+|record\d+)$")


def side_request(choice_id: str, kind: str, number: int | None = None) -> str:
    """The id of one of a choice's side requests (``kind`` in :data:`SIDE_REQUESTS`)."""
    assert kind in SIDE_REQUESTS
    return f"{choice_id}-{kind}{'' if number is None else number}"


def choice_of(request_id: str) -> str:
    """The id of the choice a request belongs to: itself, or the choice whose side request it is."""
    return _SIDE.sub("", request_id)


class ChoiceMemory(Generic[T]):
    """A value per choice (keyed by :func:`choice_of` of any of its request ids), kept for the choice's side
    requests. Invariant: at most ``size`` choices are remembered, the least recently set forgotten first (a
    choice's side requests come within its lifetime, far shorter than ``size`` newer choices take to arrive)."""

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._values: OrderedDict[str, T] = OrderedDict()

    def get(self, request_id: str) -> T | None:
        return self._values.get(choice_of(request_id))

    def set(self, request_id: str, value: T) -> None:
        choice = choice_of(request_id)
        self._values[choice] = value
        self._values.move_to_end(choice)
        if len(self._values) > self._size:
            self._values.popitem(last=False)


PROBE_MARKER = "thinkbrake_probe"


def probe_extra_args(extra_args: dict[str, Any] | None, probe_id: int) -> dict[str, Any]:
    """The ``extra_args`` of a probe: the request's own plus :data:`PROBE_MARKER`."""
    return {**(extra_args or {}), PROBE_MARKER: probe_id}


@dataclass(frozen=True)
class ProbeOutput:
    """What one answer probe decoded: the text after the suffix, the sampled tokens' log-probabilities (one per
    decoded token when the backend returns them), the decoded and prompt token counts, and how many prompt
    tokens the prefix cache served (None when the backend does not say)."""

    text: str
    logprobs: list[float]
    tokens: int
    prompt_tokens: int
    cached_tokens: int | None = None


class ProbeRejected(BackendError):
    """The backend refused a probe request (e.g. an upstream that takes no token-id prompts): the choice falls
    back to text-only; ``reason`` is the fallback's (:data:`server.vocabulary.PROBE_FALLBACK_REASONS`)."""

    reason: str = REJECTED


class Generation(Protocol):
    """One running request on a backend."""

    prompt_token_ids: list[int] | None

    def __aiter__(self) -> AsyncGenerator[Chunk, None]: ...

    async def abort(self) -> None: ...


class Backend(Protocol):
    """What the HTTP layer needs from a model backend."""

    model_name: str
    delimiters: Delimiters
    #: the text that closes thinking when the server stops it (e.g. ``"\\n</think>\\n\\n"``)
    think_end_text: str

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model or connect to the upstream; raise with a clear message on failure."""

    async def shutdown(self) -> None: ...

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> Generation:
        """Start one generation (lazily: it begins when iterated)."""
        ...

    def continue_tokens(self, token_ids: list[int], sampling: Sampling, request_id: str) -> Generation:
        """Continue from a token-id prompt (prompt + generated + end-of-thinking ids): reuses the prefix cache."""
        ...

    async def encode(self, text: str) -> list[int] | None:
        """Token ids of ``text`` without special tokens (None if the backend cannot tokenize)."""
        ...

    async def prompt_tail(self, prompt: TextPrompt) -> str:
        """The last characters of a raw prompt as text (to see whether it leaves the model inside thinking)."""
        ...


@runtime_checkable
class ProbingBackend(Backend, Protocol):
    """A backend that can run answer probes (``isinstance(backend, ProbingBackend)`` tells)."""

    async def probe(
        self, token_ids: list[int], spec: ProbeSpec, extra_args: dict[str, Any] | None, request_id: str
    ) -> ProbeOutput:
        """Decode ``spec`` greedily on ``token_ids`` (prompt ids + generated ids so far) + the ids of
        ``spec.suffix``: at most ``spec.max_tokens`` tokens, with the sampled tokens' log-probabilities.
        ``extra_args`` go to the engine as is (the caller adds :data:`PROBE_MARKER`).
        Raises :class:`ProbeRejected` when the backend refuses such a request, :class:`BackendError` on other
        failures. Cancelling the call aborts the probe on the backend."""
        ...
