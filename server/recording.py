"""Recording real traffic (``thinkbrake serve --record DIR``): sampled choices written as reasoning traces.

A request is drawn for recording with probability ``--record-rate`` (all its choices are recorded). A recorded
choice runs in shadow: the policy decides as usual, nothing is acted on, and the choice runs to its natural end
(the whole thinking and the model's own final answer). Beside the policy's own answer probes it is probed for the
recording only (never fed to its controller): at each of the first :data:`RECORD_WAIT_PROBES` whole-word "Wait"s
the policy did not probe itself (the wait probe, with confidence) and every ``--record-probe-every`` thinking
tokens (the dense probe, read both as ``certain`` and with a mean-probability confidence).

Each recorded choice becomes one JSON line in the ``dev-probes`` trace format (``../shared/data/README.md``), so
``thinkbrake replay`` and ``thinkbrake calibrate`` read the files as they are:

- ``question``: the request's last user message (``/v1/completions``: its text prompt); ``thinking``: the text the
  controller routed as thinking, without the tags; ``final``: what the model wrote after its end of thinking
  (leading whitespace dropped; empty when it never closed it); ``closed``; ``model`` (the served name) and
  ``tokenizer`` (the model's folder or hub id; the proxy: the upstream's model name); ``reference`` is empty (no
  ground truth: the trace's own final answer is the label). ``id`` is ``recorded/<question hash>/<choice id>``,
  so replay's tune/holdout split keeps every recording of one question on one side.
- ``wait_probes``: ``[tokens, offset, answer, confidence, out_tokens, "wait"]``; ``probes``: ``[tokens, offset,
  answer, certain, out_tokens, confidence, trigger]`` with trigger ``dense`` (the recording's schedule) or
  ``solution`` (a dense-suffix probe the policy asked; its confidence is null). Both lists hold every probe that
  answered, the policy's and the recording's. ``tokens`` counts thinking tokens of the recorded thinking (a start
  tag the model wrote itself is not counted), ``offset`` is a character offset into ``thinking``; the readers use
  the first five fields.
- ``recording``: what the server knew: request id, time, policy arguments, the shadow decision (``stop_tokens`` in
  the same token count), finish reason, prompt and thinking tokens, the dense probe spacing.

Invariants:
- recording never blocks a stream and never fails a request: finished traces go to a bounded queue that one
  writer thread empties; a full queue or a failed write drops the trace and counts it
  (``thinkbrake_recording_dropped_traces_total{reason}``), a written one counts in
  ``thinkbrake_recorded_traces_total``;
- files hold whole lines: a failed write is cut back, and a new file (``thinkbrake-<start>-<pid>-<n>.jsonl``, one
  sequence per process) is begun before a line would take the current one past ``--record-max-bytes`` (a line
  larger than that gets a file of its own);
- the recording's probes never reach the controller; they may outlive their choice (the trace is written once
  they answered, or after :data:`PROBE_GRACE_SECONDS`, when the rest are cancelled and left out), never its server;
- work per streamed delta is O(len(delta)), plus the copy of the prefix for each probe launched (as for the
  policy's probes); a choice that ends in an error or a disconnect, or that wrote no thinking, is not recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from controller.policies import PolicyConfig
from controller.probes import (
    DENSE_PROBE,
    WAIT,
    ProbeRequest,
    ProbeResult,
    ProbeSpec,
    WaitScanner,
    probe_spec,
    read_probe,
)
from controller.session import Update
from server.backend import Backend, BackendError, Chunk, ProbeRejected, ProbingBackend, probe_extra_args, side_request
from server.events import ChoiceResult
from server.metrics import ERROR_OUTCOMES, Metrics
from server.settings import Settings
from server.vocabulary import RECORDING_QUEUE_FULL, RECORDING_WRITE_ERROR

log = logging.getLogger(__name__)

#: "Wait"s per choice probed for the recording (the ``dev-probes`` traces hold the first 30)
RECORD_WAIT_PROBES = 30
#: finished traces waiting for the writer at most; one more is dropped
QUEUE_TRACES = 256
#: seconds a finished choice's recording probes may still take before the trace is written without them
PROBE_GRACE_SECONDS = 60.0
#: the ``PROBE_MARKER`` values of recording probes start here (the policy's count from 0)
RECORD_PROBE_IDS = 1_000_000
DATASET = "recorded"
SOURCE = "thinkbrake serve --record"
DENSE = "dense"
#: the dense probe read with a confidence (the mean probability of its answer tokens) besides ``certain``
DENSE_CONFIDENCE = dataclasses.replace(DENSE_PROBE, confidence="mean")

#: the recorder of the request being handled if it was drawn: set by its endpoint (:mod:`server.app`) around the
#: request, read where the request's choice runners are made (:class:`server.choice.ChoiceRunner`)
_drawn: ContextVar[Recorder | None] = ContextVar("thinkbrake_recorder", default=None)


@contextlib.contextmanager
def sampled(recorder: Recorder | None) -> Iterator[None]:
    """Around the handling of one request: the choices made inside record themselves if the request is drawn
    (one draw per request, so all its choices or none)."""
    token = _drawn.set(recorder if recorder is not None and recorder.draw() else None)
    try:
        yield
    finally:
        _drawn.reset(token)


def drawn_recorder() -> Recorder | None:
    """The recorder of the request being handled, when it was drawn for recording (see :func:`sampled`)."""
    return _drawn.get()


class TraceFiles:
    """The writer: a bounded queue of traces, one thread writing them as JSON lines into size-rotated files.

    ``counted(reason, labels)`` is called from the writer thread for every trace written (``reason`` None) and
    from any thread for every trace dropped (a reason of :mod:`server.vocabulary`).
    """

    def __init__(
        self, folder: Path, max_bytes: int, counted: Callable[[str | None, tuple[str, str]], None],
        queue_size: int = QUEUE_TRACES,
    ) -> None:  # fmt: skip
        self.folder = folder
        self.max_bytes = max_bytes
        self._counted = counted
        self._queue: queue.Queue[tuple[dict[str, Any], tuple[str, str]] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="thinkbrake-recorder", daemon=True)
        self._stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._sequence = 0
        self._file: Any = None  # the file being written (None before the first trace and after a failed write)
        self._size = 0
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def put(self, trace: dict[str, Any], labels: tuple[str, str]) -> bool:
        """Queue one trace without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((trace, labels))
        except queue.Full:
            self._counted(RECORDING_QUEUE_FULL, labels)
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread (waits at most ``timeout`` seconds)."""
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                trace, labels = item
                try:
                    self._write((json.dumps(trace, ensure_ascii=False) + "\n").encode("utf-8"))
                except (OSError, ValueError, TypeError) as error:
                    if not self._failing:
                        log.warning("recording: cannot write to %s (traces are dropped until it works): %s",
                                    self.folder, error)  # fmt: skip
                    self._failing = True
                    self._counted(RECORDING_WRITE_ERROR, labels)
                    continue
                if self._failing:
                    log.warning("recording: writing to %s works again", self.folder)
                    self._failing = False
                self._counted(None, labels)
        finally:
            self._close_file()

    def _write(self, line: bytes) -> None:
        if self._file is None or (self._size and self._size + len(line) > self.max_bytes):
            self._open_next()
        start = self._size
        try:
            view = memoryview(line)
            while view:
                view = view[self._file.write(view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), start)  # no partial line left behind
            self._close_file()
            raise
        self._size += len(line)

    def _open_next(self) -> None:
        self._close_file()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        path = self.folder / f"thinkbrake-{self._stamp}-{os.getpid()}-{self._sequence:04d}.jsonl"
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across traces, closed in _close_file
        self._size = self._file.tell()

    def _close_file(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()


class Recorder:
    """One server's recording: the per-request draw, the recordings of choices and the writer."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics, seed: int | None = None) -> None:
        assert settings.record is not None
        self.rate = settings.record_rate
        self.probe_every = settings.record_probe_every
        self.backend = backend
        self.metrics = metrics
        self._model = settings.model
        if settings.model and Path(settings.model).expanduser().is_dir():  # a local folder: where its tokenizer is
            self._model = str(Path(settings.model).expanduser().resolve())
        self.random = random.Random(seed)  # the draws (a test may seed it)
        self.files = TraceFiles(Path(settings.record), settings.record_max_bytes, self._count)
        self._settling: set[asyncio.Task[None]] = set()
        self._open: set[ChoiceRecording] = set()

    def draw(self) -> bool:
        """Whether the next request is recorded (probability ``--record-rate``)."""
        return self.random.random() < self.rate

    def start(self) -> None:
        self.files.start()

    async def close(self) -> None:
        """At shutdown: cancel the probes still out, write the traces waiting for them, stop the writer."""
        for recording in list(self._open):
            recording.cancel_probes()
        await asyncio.gather(*self._settling, return_exceptions=True)
        await asyncio.to_thread(self.files.close)

    def tokenizer(self) -> str:
        """The ``tokenizer`` field: the embedded model's folder or hub id; for a proxy, the upstream's model."""
        upstream = getattr(self.backend, "upstream_model", "")
        return str(upstream or self._model or self.backend.model_name)

    def choice(
        self, request_id: str, model: str, policy: PolicyConfig, question: str | None, extra_args: dict[str, Any] | None,
        seed: Any = None,
    ) -> ChoiceRecording:  # fmt: skip
        """The recording of one choice (it is open until :meth:`settle` wrote it or :meth:`forget` dropped it)."""
        recording = ChoiceRecording(self, request_id, model, policy, question, extra_args, seed)
        self._open.add(recording)
        return recording

    def forget(self, recording: ChoiceRecording) -> None:
        """A recording that will not be written (its probes are cancelled)."""
        recording.cancel_probes()
        self._open.discard(recording)

    def settle(self, recording: ChoiceRecording) -> None:
        """A recorded choice ended: write its trace once its probes answered (in the background)."""
        task = asyncio.ensure_future(self._settle(recording))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, recording: ChoiceRecording) -> None:
        try:
            await recording.probes_done(PROBE_GRACE_SECONDS)
            self.files.put(recording.trace(), recording.labels)
        except Exception:  # noqa: BLE001 - a recording must never disturb the server
            log.exception("recording: a trace could not be made")
        finally:
            self._open.discard(recording)

    def _count(self, reason: str | None, labels: tuple[str, str]) -> None:
        if reason is None:
            self.metrics.count_recorded(*labels)
        else:
            self.metrics.count_recording_dropped(*labels, reason)


class ChoiceRecording:
    """What one recorded choice streamed and what its probes answered; fed by the choice's runner.

    The runner calls :meth:`asked` with the policy probes it launches, :meth:`step` after each chunk, probe
    result and the final flush (in stream order), and :meth:`end` once. Positions ``tokens`` in the calls are the
    runner's (generated tokens, start tag included); the trace counts from the first thinking text (``_lead``).
    """

    def __init__(
        self, recorder: Recorder, request_id: str, model: str, policy: PolicyConfig, question: str | None,
        extra_args: dict[str, Any] | None, seed: Any,
    ) -> None:  # fmt: skip
        self.recorder = recorder
        self.request_id = request_id
        self.model = model
        self.policy = policy
        self.question = question
        self.extra_args = extra_args
        self.seed = seed
        self.labels = (model, policy.name)
        self.started = time.time()
        self._thinking: list[str] = []
        self._final: list[str] = []
        self._chars = 0  # characters of thinking so far
        self._position = 0  # generated tokens so far
        self._lead: int | None = None  # generated tokens before the first thinking text
        self._closed = False
        self._waits = WaitScanner()
        self._waits_seen = 0
        self._wait_offsets: set[int] = set()  # offsets of "Wait"s probed (by the policy or for the recording)
        self._next_dense = recorder.probe_every
        self._probing = isinstance(recorder.backend, ProbingBackend)
        self._asked: dict[int, ProbeRequest] = {}  # the policy's probes, by id
        self._tasks: set[asyncio.Task[None]] = set()
        self._launched = 0
        self.wait_rows: list[list[Any]] = []
        self.dense_rows: list[list[Any]] = []
        self._result: ChoiceResult | None = None

    # -- fed by the runner ----------------------------------------------------------------------------------------
    def asked(self, requests: list[ProbeRequest]) -> None:
        """The policy launched these probes (their answers come through :meth:`step`)."""
        for request in requests:
            self._asked[request.id] = request
            if request.trigger == WAIT:
                self._wait_offsets.add(request.offset)

    def step(
        self, item: Chunk | ProbeResult | None, update: Update, generated: list[int], prompt_ids: list[int] | None,
        thinking_done: bool,
    ) -> None:  # fmt: skip
        """After the runner handled ``item`` (a chunk, a policy probe's answer, or None: the end-of-stream flush)
        and ``update`` came of it; ``generated``: the ids generated so far; ``thinking_done``: the thinking is
        closed now."""
        if isinstance(item, ProbeResult):
            self._answered(item)
            return
        before, self._position = self._position, len(generated)
        waits: list[tuple[int, int]] = []
        if update.reasoning:
            if self._lead is None:
                self._lead = before
            self._thinking.append(update.reasoning)
            waits = self._waits.feed(update.reasoning, before)
            self._chars += len(update.reasoning)
        if update.content and thinking_done:
            self._final.append(update.content)
        self._closed = thinking_done
        if thinking_done or not isinstance(item, Chunk) or not self._can_probe(item, prompt_ids):
            return
        assert prompt_ids is not None
        for tokens, offset in waits:
            self._waits_seen += 1
            if self._waits_seen <= RECORD_WAIT_PROBES and offset not in self._wait_offsets:
                self._wait_offsets.add(offset)
                self._launch(WAIT, tokens, offset, prompt_ids, generated)
        every, lead = self.recorder.probe_every, self._lead
        if every and lead is not None and self._position - lead >= self._next_dense:
            self._next_dense = ((self._position - lead) // every + 1) * every
            self._launch(DENSE, self._position, self._chars, prompt_ids, generated)

    def end(self, result: ChoiceResult, outcome: str) -> None:
        """The choice ended with ``outcome``: an error or a disconnect drops the recording, else it is written."""
        if outcome in ERROR_OUTCOMES or not self._thinking:
            self.recorder.forget(self)
            return
        self._result = result
        self.recorder.settle(self)

    # -- probes ---------------------------------------------------------------------------------------------------
    def _can_probe(self, chunk: Chunk, prompt_ids: list[int] | None) -> bool:
        """Probes need a probing backend and real token ids (an upstream without them sends placeholders)."""
        if self._probing and (prompt_ids is None or any(token < 0 for token in chunk.token_ids)):
            self._probing = False
        return self._probing

    def _answered(self, result: ProbeResult) -> None:
        request = self._asked.pop(result.id, None)
        if request is None or (result.answer is None and not result.out_tokens):
            return  # unknown, or a probe that failed: it says nothing about the model
        tokens = self._trace_tokens(request.tokens)
        if request.trigger == WAIT:
            self.wait_rows.append([tokens, request.offset, result.answer, result.confidence, result.out_tokens, WAIT])
        else:
            certain = result.confidence >= 1.0
            self.dense_rows.append(
                [tokens, request.offset, result.answer, certain, result.out_tokens, None, request.trigger]
            )

    def _launch(self, kind: str, tokens: int, offset: int, prompt_ids: list[int], generated: list[int]) -> None:
        prefix = [*prompt_ids, *generated[:tokens]]
        spec = probe_spec(WAIT, self.model) if kind == WAIT else DENSE_PROBE
        number = self._launched
        self._launched += 1
        task = asyncio.ensure_future(self._probe(kind, tokens, offset, prefix, spec, number))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(
        self, kind: str, tokens: int, offset: int, prefix: list[int], spec: ProbeSpec, number: int
    ) -> None:
        metrics, labels = self.recorder.metrics, self.labels
        backend: Any = self.recorder.backend
        extra = probe_extra_args(self.extra_args, RECORD_PROBE_IDS + number)
        metrics.count_probe(*labels)
        began = time.perf_counter()
        try:
            output = await backend.probe(prefix, spec, extra, side_request(self.request_id, "record", number))
        except ProbeRejected:
            self._probing = False
            metrics.count_probe_error(*labels)
            return
        except BackendError as error:
            log.debug("recording probe failed: %s", error.message)
            metrics.count_probe_error(*labels)
            return
        except Exception:  # noqa: BLE001 - a recording probe must never break anything
            log.exception("recording probe failed")
            metrics.count_probe_error(*labels)
            return
        metrics.observe_probe(
            *labels, time.perf_counter() - began, output.tokens, output.cached_tokens, output.prompt_tokens
        )
        read = read_probe(spec, number, output.text, output.logprobs)
        position = self._trace_tokens(tokens)
        if kind == WAIT:
            self.wait_rows.append([position, offset, read.answer, read.confidence, output.tokens, WAIT])
            return
        confidence = read_probe(DENSE_CONFIDENCE, number, output.text, output.logprobs).confidence
        self.dense_rows.append(
            [position, offset, read.answer, read.confidence >= 1.0, output.tokens, confidence, DENSE]
        )

    def cancel_probes(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def probes_done(self, timeout: float) -> None:
        """Wait for the recording's probes (at most ``timeout`` seconds; the rest are cancelled)."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the trace ------------------------------------------------------------------------------------------------
    def _trace_tokens(self, tokens: int) -> int:
        return max(0, tokens - (self._lead or 0))

    def trace(self) -> dict[str, Any]:
        """The trace line (see the module docstring); call after :meth:`end`."""
        result = self._result
        assert result is not None
        question = self.question or ""
        key = hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]
        would = result.shadow_decision
        shadow = None
        if would is not None:
            shadow = {"reason": would.reason, "answer": would.answer, "stop_tokens": self._trace_tokens(would.tokens),
                      "solutions": would.solutions}  # fmt: skip
        return {
            "id": f"{DATASET}/{key}/{self.request_id}",
            "dataset": DATASET,
            "model": self.model,
            "tokenizer": self.recorder.tokenizer(),
            "question": question,
            "reference": "",
            "thinking": "".join(self._thinking),
            "final": "".join(self._final).lstrip() if self._closed else "",
            "closed": self._closed,
            "level": None,
            "source": SOURCE,
            "seed": self.seed,
            "probes": sorted(self.dense_rows, key=lambda row: (row[0], row[1])),
            "wait_probes": sorted(self.wait_rows, key=lambda row: row[1]),
            "recording": {
                "request_id": self.request_id,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "policy": self.policy.as_dict(),
                "shadow": shadow,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "thinking_tokens": self._trace_tokens(result.thinking_tokens),
                "probe_every": self.recorder.probe_every,
            },
        }
