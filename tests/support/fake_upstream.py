"""A fast, fault-injecting OpenAI-compatible upstream on loopback (raw asyncio HTTP/1.1), for tests and benchmarks.

It speaks what ``server/upstream.py`` expects from a vLLM server: streamed chat completions whose thinking is in
``delta.reasoning`` (or ``reasoning_content``, or raw in ``content``), the answer in ``delta.content``, token ids
per chunk and the prompt's ids in the first chunk (vLLM's ``return_token_ids``), usage at the end when asked,
``/v1/completions`` with a token-id prompt (the continuation after a stop, and answer probes: non-streamed, with
``logprobs``), ``/tokenize``, ``/detokenize`` and ``/v1/models``. Text is cut into word pieces, one piece per "token" and one SSE event per token, each written on
its own as vLLM does. Frames are built once per trace, so serving costs a write per token.

Faults, per server (``FakeUpstream(fault=...)``) or per request (a ``fake_fault`` field in the body, which
thinkbrake forwards like any sampling option): ``status:503`` (an HTTP error before streaming), ``malformed@N``
(a broken SSE event after N tokens), ``drop@N`` (connection closed mid-stream), ``stall:S@N`` (no bytes for S
seconds after N tokens, then the stream goes on), ``error@N`` (an OpenAI error event mid-stream),
``echo_auth`` (a 401 whose message quotes the Authorization header it got, like a careless upstream).
A refused connection needs no server: see :func:`closed_port_url`.

Answer probes (a non-streamed ``/v1/completions`` with a token-id prompt and ``logprobs``) are answered like a
model that knows its answer: ``{X}`` where ``\boxed{X}`` is the final answer of the trace whose thinking the
probe's prompt holds (``probe_text`` or, per request, ``vllm_xargs.fake_probe_text``, which thinkbrake copies
from the request into its probes, overrides it), one token per word piece, each with log-probability ``probe_logprob``, after ``probe_delay`` seconds.
Traces with recorded probes (``dev-probes``: ``Trace.probes`` / ``Trace.wait_probes``, see :func:`load_traces`)
are answered as the model answered there instead: see :meth:`FakeUpstream._recorded_answer`. ``GET /fake/stats``
counts the probes answered by where their answer came from (``FakeUpstream.probe_answers``).
``token_ids=False`` plays an upstream that returns no token ids (no ``return_token_ids``, as non-vLLM servers),
``token_prompts=False`` one that rejects token-id prompts with a 400.

Every request is recorded (:class:`RequestRecord`): headers, body, outcome, tokens sent, and when the client
closed the connection (``aborted_at``, ``time.monotonic()``), so a test can check that an abort reached the
upstream. Run it in a thread (``with FakeUpstream() as upstream``) or as a process
(``python -m tests.support.fake_upstream --port 8100``; records at ``GET /fake/requests``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import gzip
import itertools
import json
import math
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.probes import DENSE_PROBE, WAIT_PROBE
from tests.data.written_traces import MATH_TRACES, NON_MATH

THINK_END = "</think>"
PIECE = re.compile(r"\s*\S+|\s+")
SPACE = re.compile(r"\s*")
JSON = b"application/json"
#: the probe suffixes thinkbrake appends (stripped from a probe's prompt to find where its thinking ends)
PROBE_SUFFIXES = (DENSE_PROBE.suffix, WAIT_PROBE.suffix)
#: ``dev-probes`` records the wait probes of the first this many "Wait"s of a trace only
WAIT_PROBES_RECORDED = 30
#: the log-probability of a recorded confidence of 0 (the log of 0 is not a number JSON carries)
MIN_LOGPROB = math.log(1e-9)


@dataclass(frozen=True)
class Trace:
    """One scripted model output: thinking (without tags), then the final answer.

    ``probes`` / ``wait_probes``: the model's own answer probes recorded on this thinking (``dev-probes``, see
    ``../shared/data/README.md``), ``(offset, answer, certain)`` and ``(offset, answer, confidence)`` with
    ``offset`` the character offset into ``thinking`` where the probe's prefix ended, and each probe's decode cost
    ``out_tokens`` last; sorted by offset. Empty for traces without recorded probes.
    """

    thinking: str
    answer: str
    probes: tuple[tuple[int, str, bool, int], ...] = ()
    wait_probes: tuple[tuple[int, str, float, int], ...] = ()


def written_traces() -> list[Trace]:
    """The tests' written traces: three that a stop policy stops, then thinking without answers."""
    math = [Trace(thinking, f"The answer is $\\boxed{{{answer}}}$.") for thinking, _, answer in MATH_TRACES]
    return math + [Trace(text, "Here is my answer.") for text in NON_MATH]


def load_traces(path: str, limit: int | None = None, max_chars: int | None = None, spread: bool = False) -> list[Trace]:
    """Traces from a ``.jsonl(.gz)`` file with ``thinking`` and ``final`` fields (``../shared/data/traces``): the
    first ``limit``, or with ``spread`` ``limit`` spread evenly over the file (every model and dataset of it).
    Recorded probes (``probes``, ``wait_probes`` of ``dev-probes``) are kept, those past ``max_chars`` dropped."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        if spread and limit:
            rows = lines.readlines()
            chosen = [rows[int(index * len(rows) / limit)] for index in range(min(limit, len(rows)))]
        else:
            chosen = list(itertools.islice(lines, limit))
    traces: list[Trace] = []
    for line in chosen:
        row = json.loads(line)
        thinking = row["thinking"][:max_chars] if max_chars else row["thinking"]
        probes = sorted(
            (int(offset), str(answer), bool(certain), int(out))
            for _, offset, answer, certain, out in row.get("probes") or ()
            if offset <= len(thinking)
        )
        waits = sorted(
            (int(offset), str(answer), float(confidence), int(out))
            for _, offset, answer, confidence, out in row.get("wait_probes") or ()
            if offset <= len(thinking)
        )
        traces.append(Trace(thinking, row.get("final") or "Done.", tuple(probes), tuple(waits)))
    return traces


class Vocabulary:
    """Word-piece "tokenizer": each piece of :data:`PIECE` is a token; ids are stable for the process."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {THINK_END: 1}
        self._pieces: list[str] = ["<unk>", THINK_END]
        self._lock = threading.Lock()

    def pieces(self, text: str) -> list[str]:
        out: list[str] = []
        for part in re.split(f"({re.escape(THINK_END)})", text):
            out += [part] if part == THINK_END else PIECE.findall(part)
        return out

    def id_of(self, piece: str) -> int:
        found = self._ids.get(piece)
        if found is None:
            with self._lock:
                found = self._ids.setdefault(piece, len(self._pieces))
                if found == len(self._pieces):
                    self._pieces.append(piece)
        return found

    def encode(self, text: str) -> list[int]:
        return [self.id_of(piece) for piece in self.pieces(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self._pieces[i] if 0 <= i < len(self._pieces) else "" for i in ids)


@dataclass(frozen=True)
class Fault:
    """What goes wrong: ``kind`` in none/status/malformed/drop/stall/error/echo_auth, ``after`` tokens in."""

    kind: str = "none"
    after: int = 0
    status: int = 500
    seconds: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> Fault:
        """``"kind[:value][@after]"``, e.g. ``status:503``, ``drop@10``, ``stall:30@5``, ``malformed``."""
        if not spec or spec == "none":
            return cls()
        head, _, after = spec.partition("@")
        kind, _, value = head.partition(":")
        if kind not in {"status", "malformed", "drop", "stall", "error", "echo_auth"}:
            raise ValueError(f"unknown fault {spec!r}")
        return cls(
            kind=kind,
            after=int(after or 0),
            status=int(value) if kind == "status" and value else 500,
            seconds=float(value) if kind == "stall" and value else 0.0,
        )


@dataclass
class RequestRecord:
    """One request as the upstream saw it. Times are ``time.monotonic()``."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started: float
    finished: float | None = None
    outcome: str = "running"  # complete | aborted | fault | error
    aborted_at: float | None = None
    tokens_sent: int = 0


@dataclass
class _Stream:
    """Per-response streaming state shared with the disconnect watcher."""

    record: RequestRecord
    writer: asyncio.StreamWriter
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return chunked(f"data: {data}\n\n".encode())


class FakeUpstream:
    """The server. ``reasoning_field``: ``reasoning`` (vLLM >= 0.32), ``reasoning_content``, ``both`` or
    ``content`` (no reasoning parser: raw text with ``</think>``). ``token_rate``: tokens per second per stream
    (0: as fast as possible). ``api_key``: required bearer token (None: any)."""

    def __init__(
        self,
        traces: list[Trace] | None = None,
        *,
        fault: str | None = None,
        token_rate: float = 0.0,
        reasoning_field: str = "reasoning",
        model: str = "fake-reasoner",
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        record: bool = True,
        token_ids: bool = True,
        token_prompts: bool = True,
        probe_text: str | None = None,
        probe_logprob: float = -0.0001,
        probe_delay: float = 0.0,
        session_header: str | None = None,
    ) -> None:
        self.traces = traces or written_traces()
        self.fault = Fault.parse(fault)
        self.token_rate = token_rate
        self.reasoning_field = reasoning_field
        self.model = model
        self.api_key = api_key
        self.host, self.port = host, port
        self.record = record
        self.token_ids = token_ids
        self.token_prompts = token_prompts
        self.probe_text = probe_text
        self.probe_logprob = probe_logprob
        self.probe_delay = probe_delay
        #: as llm-d's session affinity: every response carries this header, with the request's own value of it or,
        #: without one, a new value (``session-N``) that the client should send back
        self.session_header = session_header
        self._sessions = 0
        self.probe_answers: collections.Counter[str] = collections.Counter()  # probes answered, by source
        self._recorded: dict[str, list[int]] = {}  # first 40 characters of thinking -> traces with recorded probes
        for index, trace in enumerate(self.traces):
            if trace.probes or trace.wait_probes:
                self._recorded.setdefault(trace.thinking[:40], []).append(index)
        self.requests: list[RequestRecord] = []
        self.connections = 0  # TCP connections accepted so far
        self.vocabulary = Vocabulary()
        self._frames: dict[tuple[int, bool, bool], list[bytes]] = {}
        self._next_trace = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- running ------------------------------------------------------------------------------------------------
    async def start_serving(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> FakeUpstream:
        """Serve on a background thread with its own event loop; returns once listening."""
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start_serving())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=main, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection (idempotent)."""
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def close() -> None:
            server.close()
            for writer in list(self._writers):  # handlers see EOF and end on their own
                writer.transport.abort()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> bool:
        """Poll until ``predicate(self)`` is true (from the test's thread); False on time-out. It returns as soon as
        the predicate holds, so the long default deadline costs nothing when it does; it only spares a slow,
        loaded machine a false failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return bool(predicate(self))

    def generation_requests(self) -> list[RequestRecord]:
        """Streamed generations (main requests and continuations), not probes."""
        return [
            r for r in list(self.requests)
            if r.path in ("/v1/chat/completions", "/v1/completions") and not is_probe(r.body)
        ]  # fmt: skip

    def probe_requests(self) -> list[RequestRecord]:
        return [r for r in list(self.requests) if r.path == "/v1/completions" and is_probe(r.body)]

    # -- HTTP -------------------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                body: Any = None
                if raw:
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw.decode("utf-8", "replace")
                record = RequestRecord(method, path.split("?")[0], headers, body, time.monotonic())
                if self.record:
                    self.requests.append(record)
                keep = await self._route(record, reader, writer)
                record.finished = record.finished or time.monotonic()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _route(self, record: RequestRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        body = record.body if isinstance(record.body, dict) else {}
        fault = Fault.parse(body.get("fake_fault")) if body.get("fake_fault") else self.fault
        auth = record.headers.get("authorization", "")
        if fault.kind == "echo_auth":
            return self._error(writer, record, 401, f"Incorrect API key provided: {auth}")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return self._error(writer, record, 401, "Incorrect API key provided")
        path = record.path
        if path == "/v1/models":
            card = {"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}
            return self._json(writer, record, {"object": "list", "data": [card]})
        if path == "/health":
            return self._json(writer, record, {})
        if path == "/fake/requests":
            return self._json(writer, record, [asdict(r) for r in list(self.requests)])
        if path == "/fake/stats":
            return self._json(writer, record, {"probe_answers": dict(self.probe_answers)})
        if path == "/tokenize":
            ids = self.vocabulary.encode(str(body.get("prompt", "")))
            return self._json(writer, record, {"tokens": ids, "count": len(ids), "max_model_len": 32768})
        if path == "/detokenize":
            return self._json(writer, record, {"prompt": self.vocabulary.decode(list(body.get("tokens", [])))})
        if path in ("/v1/chat/completions", "/v1/completions") and record.method == "POST":
            if not body:
                return self._error(writer, record, 400, "invalid JSON body")
            if fault.kind == "status":
                return self._error(writer, record, fault.status, f"injected HTTP {fault.status}")
            if isinstance(body.get("prompt"), list) and not self.token_prompts:
                return self._error(writer, record, 400, "'prompt' must be a string")
            if is_probe(body):
                return await self._probe(writer, record, body)
            if not body.get("stream"):
                return self._whole(writer, record, body, chat=path.endswith("chat/completions"))
            await self._stream(record, reader, writer, body, fault, chat=path.endswith("chat/completions"))
            return False if record.outcome in ("aborted", "fault") else True
        return self._error(writer, record, 404, f"no route {path}")

    def _json(self, writer: asyncio.StreamWriter, record: RequestRecord, data: Any, status: int = 200) -> bool:
        payload = json.dumps(data).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
        record.outcome, record.finished = ("complete" if status == 200 else "error"), time.monotonic()
        writer.write(head.encode() + self._session_line(record) + b"\r\n" + payload)
        return True

    def _session_line(self, record: RequestRecord) -> bytes:
        """The ``session_header`` line of a response (empty without the option)."""
        if self.session_header is None:
            return b""
        value = record.headers.get(self.session_header.lower())
        if value is None:
            self._sessions += 1
            value = f"session-{self._sessions}"
        return f"{self.session_header}: {value}\r\n".encode()

    def _error(self, writer: asyncio.StreamWriter, record: RequestRecord, status: int, message: str) -> bool:
        error = {"message": message, "type": "BadRequestError" if status < 500 else "InternalServerError",
                 "param": None, "code": status}  # fmt: skip
        return self._json(writer, record, {"error": error}, status)

    async def _probe(self, writer: asyncio.StreamWriter, record: RequestRecord, body: dict[str, Any]) -> bool:
        """A non-streamed token-id completion with ``logprobs``: the probe text, as vLLM shapes it."""
        if self.probe_delay:
            await asyncio.sleep(self.probe_delay)
        xargs = body.get("vllm_xargs") if isinstance(body.get("vllm_xargs"), dict) else {}
        text = xargs.get("fake_probe_text", self.probe_text)
        logprob, decoded, source = self.probe_logprob, None, "probe_text"
        if text is None:
            prompt_text = self.vocabulary.decode(list(body["prompt"]))
            recorded = self._recorded_answer(prompt_text) if self._recorded else None
            if recorded is not None:
                text, logprob, decoded, source = recorded
            else:
                text, source = self._trace_answer(prompt_text), "final_answer"
        self.probe_answers[source] += 1
        pieces = self.vocabulary.pieces(text)[: int(body.get("max_tokens") or 16)]
        offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        logprobs = {"text_offset": offsets, "token_logprobs": [logprob] * len(pieces), "tokens": pieces,
                    "top_logprobs": [{piece: logprob} for piece in pieces]}  # fmt: skip
        prompt = len(body["prompt"])
        completion = len(pieces) if decoded is None else decoded
        choice = {"index": 0, "text": "".join(pieces), "logprobs": logprobs, "finish_reason": "stop"}
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        record.tokens_sent = completion
        return self._json(writer, record, {"id": "cmpl-fake", "object": "text_completion", "created": 0,
                                           "model": self.model, "choices": [choice], "usage": usage})  # fmt: skip

    def _recorded_answer(self, prompt: str) -> tuple[str, float, int, str] | None:
        """What the model answered, in ``dev-probes``, to the probe whose prompt decodes to ``prompt``: ``(text,
        log-probability of each token, tokens the model decoded, source)``, or None when no trace with recorded
        probes holds the prompt's thinking.

        The trace is the one whose thinking the prompt holds longest (several seeds of a problem open alike); the
        probe's position is the character offset where its thinking ends (the prompt minus the suffix), moved past
        any whitespace there (a word piece carries the whitespace before it, so a prefix that ends before
        ``"\n\nWait"`` ends before its whitespace, while the recorded offset is that of the ``W``). A recorded
        offset is model-independent, so the fake's word pieces replay it as well as the model's own tokens did.
        A probe is answered with the recorded probe of its kind at the nearest offset at or before its position:
        the dense suffix (``\boxed{``) with ``probes`` (``answer}``, and a hesitation word when the model
        hesitated), the wait suffix with ``wait_probes`` (``{answer}``, each token's log-probability the log of
        the recorded confidence, so the mean or geometric mean of the probabilities is that confidence). A wait
        probe before the first recorded one, or past the last of a trace whose records stop at the 30th "Wait",
        gets the dense answer at or before it with confidence 0 (what the model would say is known, how sure
        it would be is not); a probe before any record gets an empty answer.
        """
        best: tuple[int, int] | None = None  # (characters of thinking matched, trace index)
        end = len(prompt)
        for suffix in PROBE_SUFFIXES:
            if prompt.endswith(suffix):
                end -= len(suffix)
                break
        for head, indices in self._recorded.items():
            start = prompt.find(head)
            if start < 0:
                continue
            segment = prompt[start:end]
            for index in indices:
                matched = _common_prefix(self.traces[index].thinking, segment)
                if best is None or matched > best[0]:
                    best = (matched, index)
        if best is None:
            return None
        trace = self.traces[best[1]]
        position = SPACE.match(trace.thinking, best[0]).end()  # type: ignore[union-attr] - \s* always matches
        dense = _at_or_before(trace.probes, position)
        if prompt.endswith("{"):  # the dense suffix opened the brace
            if dense is None:
                return "}", MIN_LOGPROB, 1, "no_record"
            _, answer, certain, out_tokens = dense
            return answer + ("}" if certain else "} Wait"), self.probe_logprob, out_tokens, "probes"
        waits = trace.wait_probes
        wait = _at_or_before(waits, position)
        past_records = len(waits) >= WAIT_PROBES_RECORDED and wait is waits[-1] and position > waits[-1][0]
        if wait is not None and not past_records:
            _, answer, confidence, out_tokens = wait
            logprob = math.log(confidence) if confidence > 0 else MIN_LOGPROB
            return "{" + answer + "}", max(MIN_LOGPROB, logprob), out_tokens, "wait_probes"
        if dense is not None:
            return "{" + dense[1] + "}", MIN_LOGPROB, dense[3], "probes_for_wait"
        return "{}", MIN_LOGPROB, 1, "no_record"

    def _trace_answer(self, prompt: str) -> str:
        """``{X}`` for the trace whose thinking so far ends ``prompt`` (before the suffix), ``{}`` if none does;
        ``X}`` when the probe's suffix already opened the brace (the dense ``\\boxed{`` suffix)."""
        opened = prompt.endswith("{")
        for trace in self.traces:
            head = trace.thinking[:40]
            if head and head in prompt:
                boxed = re.search(r"\\boxed\{([^{}]*)\}", trace.answer)
                answer = boxed.group(1) if boxed else ""
                return answer + "}" if opened else "{" + answer + "}"
        return "}" if opened else "{}"

    def _whole(self, writer: asyncio.StreamWriter, record: RequestRecord, body: dict[str, Any], chat: bool) -> bool:
        """A non-streaming response: the whole trace at once (no faults but ``status``)."""
        trace = self.traces[self._pick_trace(body)]
        prompt = len(self._prompt_ids(body, chat))
        completion = len(self.vocabulary.pieces(trace.thinking)) + 1 + len(self.vocabulary.pieces(trace.answer))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if not chat:
            text = f"{trace.thinking}{THINK_END}{trace.answer}"
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop"}
            return self._json(writer, record, {"id": "cmpl-fake", "object": "text_completion", "created": 0,
                                               "model": self.model, "choices": [choice], "usage": usage})  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": trace.answer}
        if self.reasoning_field == "content":
            message["content"] = f"{trace.thinking}{THINK_END}{trace.answer}"
        elif self.reasoning_field == "both":
            message["reasoning"] = message["reasoning_content"] = trace.thinking
        else:
            message[self.reasoning_field] = trace.thinking
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return self._json(writer, record, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                                           "model": self.model, "choices": [choice], "usage": usage})  # fmt: skip

    # -- streaming --------------------------------------------------------------------------------------------
    def _pick_trace(self, body: dict[str, Any]) -> int:
        chosen = body.get("fake_trace")
        if isinstance(chosen, int):
            return chosen % len(self.traces)
        self._next_trace += 1
        return (self._next_trace - 1) % len(self.traces)

    def _frames_of(self, trace_index: int, chat: bool, continuation: bool) -> list[bytes]:
        """Body chunks of one token each (cached): thinking then answer, or only the answer (continuation)."""
        key = (trace_index, chat, continuation)
        frames = self._frames.get(key)
        if frames is None:
            trace = self.traces[trace_index]
            frames = []
            if not continuation:
                frames += [self._token_frame(p, chat, True) for p in self.vocabulary.pieces(trace.thinking)]
                frames.append(self._token_frame(THINK_END, chat, None))
            frames += [self._token_frame(p, chat, False) for p in self.vocabulary.pieces(trace.answer)]
            self._frames[key] = frames
        return frames

    def _token_frame(self, piece: str, chat: bool, thinking: bool | None) -> bytes:
        ids = [self.vocabulary.id_of(piece)] if self.token_ids else None
        if not chat:
            choice = {"index": 0, "text": piece, "token_ids": ids, "finish_reason": None}
            if ids is None:
                del choice["token_ids"]
            return sse({"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": self.model,
                        "choices": [choice]})  # fmt: skip
        delta: dict[str, str] = {}
        if thinking is None:  # the end-of-thinking token: a parser swallows it
            if self.reasoning_field == "content":
                delta["content"] = piece
        elif not thinking or self.reasoning_field == "content":
            delta["content"] = piece
        elif self.reasoning_field == "both":
            delta["reasoning"] = delta["reasoning_content"] = piece
        else:
            delta[self.reasoning_field] = piece
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, "token_ids": ids}
        if ids is None:
            del choice["token_ids"]
        return sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                    "choices": [choice]})  # fmt: skip

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            text = " ".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
            return self.vocabulary.encode(text)[:4096]
        prompt = body.get("prompt", "")
        return list(prompt) if isinstance(prompt, list) else self.vocabulary.encode(str(prompt))

    def _head_frame(self, chat: bool, prompt_ids: list[int] | None) -> bytes:
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                "prompt_token_ids": prompt_ids}  # fmt: skip
        if not chat:
            head = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": self.model,
                    "choices": [{"index": 0, "text": "", "prompt_token_ids": prompt_ids, "finish_reason": None}]}  # fmt: skip
        return sse(head)

    async def _stream(
        self, record: RequestRecord, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        body: dict[str, Any], fault: Fault, chat: bool,
    ) -> None:  # fmt: skip
        prompt_ids = self._prompt_ids(body, chat)
        continuation = not chat and THINK_END in self.vocabulary.decode(prompt_ids[-8:])
        frames = self._frames_of(self._pick_trace(body), chat, continuation)
        limit = body.get("max_tokens")
        length = isinstance(limit, int) and 0 < limit < len(frames)
        frames = frames[:limit] if length else frames
        rate = float(body.get("fake_token_rate", self.token_rate) or 0)
        state = _Stream(record, writer)
        watcher = asyncio.create_task(self._watch(state, reader))
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n%s\r\n"
                % self._session_line(record)
            )
            writer.write(self._head_frame(chat, prompt_ids if self.token_ids else None))
            if not await self._send_tokens(state, frames, fault, rate):
                return
            record.outcome, record.finished = "complete", time.monotonic()
            writer.write(self._tail(body, chat, len(prompt_ids), len(frames), "length" if length else "stop"))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            self._mark_aborted(state)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _send_tokens(self, state: _Stream, frames: list[bytes], fault: Fault, rate: float) -> bool:
        """Write the token frames; False if the stream ended early (client gone or a fault)."""
        writer, record = state.writer, state.record
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = time.monotonic()
        for index, frame in enumerate(frames):
            if fault.kind != "none" and index == fault.after and not await self._inject(state, fault):
                return False
            if state.closed.is_set():
                return False
            writer.write(frame)
            record.tokens_sent += 1
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0 and await self._closed_within(state, delay):
                    return False
            else:
                await asyncio.sleep(0)
        if fault.kind != "none" and fault.after >= len(frames):
            return await self._inject(state, fault)
        return not state.closed.is_set()

    async def _inject(self, state: _Stream, fault: Fault) -> bool:
        """Apply a mid-stream fault; True if the stream goes on afterwards (a stall that was waited out)."""
        writer, record = state.writer, state.record
        if fault.kind == "stall":
            return not await self._closed_within(state, fault.seconds)
        record.outcome, record.finished = "fault", time.monotonic()
        if fault.kind == "malformed":
            writer.write(chunked(b'data: {"id": "chatcmpl-fake", "choices": [{"delta": {"reas\n\n'))
            writer.write(chunked(b"data: not json at all\n\n"))
        elif fault.kind == "error":
            error = {"message": "injected mid-stream error", "type": "InternalServerError", "code": 500}
            writer.write(sse({"error": error}))
            writer.write(sse("[DONE]") + b"0\r\n\r\n")
            return False
        await writer.drain()
        writer.transport.close()  # drop: no terminating chunk, the connection just ends
        return False

    async def _closed_within(self, state: _Stream, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.closed.wait(), seconds)
        return state.closed.is_set()

    async def _watch(self, state: _Stream, reader: asyncio.StreamReader) -> None:
        """The client sends nothing while a response streams, so EOF here means it closed the connection."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self._mark_aborted(state)

    def _mark_aborted(self, state: _Stream) -> None:
        if not state.closed.is_set():
            state.closed.set()
            record = state.record
            if record.outcome == "running":
                record.outcome, record.aborted_at = "aborted", time.monotonic()
                record.finished = record.aborted_at

    def _tail(self, body: dict[str, Any], chat: bool, prompt: int, completion: int, reason: str) -> bytes:
        kind = ("chatcmpl-fake", "chat.completion.chunk") if chat else ("cmpl-fake", "text_completion")
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        choice.update({"delta": {}} if chat else {"text": ""})
        out = sse({"id": kind[0], "object": kind[1], "created": 0, "model": self.model, "choices": [choice]})
        options = body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            out += sse({"id": kind[0], "object": kind[1], "created": 0, "model": self.model, "choices": [],
                        "usage": usage})  # fmt: skip
        return out + sse("[DONE]") + b"0\r\n\r\n"


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (slice comparisons: no Python loop per character)."""
    if a.startswith(b):
        return len(b)
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; they differ within [:high]
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _at_or_before(records: tuple[tuple[Any, ...], ...], position: int) -> tuple[Any, ...] | None:
    """The record (sorted by offset, first) at the largest offset <= ``position``, or None."""
    index = bisect.bisect_right(records, position, key=lambda record: record[0]) - 1
    return records[index] if index >= 0 else None


def is_probe(body: Any) -> bool:
    """Whether a request body is an answer probe: a non-streamed token-id completion with ``logprobs``."""
    return (
        isinstance(body, dict) and isinstance(body.get("prompt"), list)
        and not body.get("stream") and body.get("logprobs") is not None
    )  # fmt: skip


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible upstream (tests/benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--traces", help="a .jsonl(.gz) trace file (default: the tests' written traces)")
    parser.add_argument("--limit", type=int, default=64, help="traces to load from --traces")
    parser.add_argument("--max-chars", type=int, default=None, help="cut each trace's thinking to this length")
    parser.add_argument("--spread", action="store_true", help="take --limit traces spread over the file, not the first")
    parser.add_argument("--probe-delay", type=float, default=0.0, help="seconds before a probe is answered (0: none)")
    parser.add_argument("--token-rate", type=float, default=0.0, help="tokens/s per stream (0: as fast as possible)")
    parser.add_argument("--reasoning-field", default="reasoning")
    parser.add_argument("--fault", default=None)
    parser.add_argument("--no-record", action="store_true", help="keep no request records (long runs)")
    args = parser.parse_args()
    traces = load_traces(args.traces, args.limit, args.max_chars, args.spread) if args.traces else None
    upstream = FakeUpstream(
        traces, fault=args.fault, token_rate=args.token_rate, reasoning_field=args.reasoning_field,
        host=args.host, port=args.port, record=not args.no_record, probe_delay=args.probe_delay,
    )  # fmt: skip

    async def serve() -> None:
        await upstream.start_serving()
        print(f"fake upstream listening on {upstream.url}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(serve())
        except ImportError:
            asyncio.run(serve())


if __name__ == "__main__":
    main()
