"""Fast offline simulation of ``probe_fcs`` configurations on traces with recorded answer probes.

Recording a case (slow, once per trace: :func:`record_case`): the trace's stream (:func:`controller.offline.replay.
trace_stream`) is tokenized with its tokenizer and fed one token at a time to a pass-through controller (the
text detector exactly as replay runs it) and a :class:`controller.probes.WaitScanner` fed as
:class:`controller.session.ThinkingController` feeds it. A case keeps, by stream position (1-based, one token
each): the detector's answer/solution/loop events, the "Wait" triggers, the positions where a stop decided
there would be held pending (the text after the last completed sentence is only whitespace) and where such a
pending stop resolves, the position where the model closed its thinking, the recorded probes, and every answer
graded against the reference and against the full trace's own answer.

Simulating a config (fast, :func:`simulate`): the real :class:`controller.probe_policy.ProbeRuntime` is driven
by the case with :func:`controller.offline.replay.run_controller`'s timing: at each position the events and triggers
of that token first, then the probe results due there; a probe asked at position ``p`` answers at
``p + out_tokens + 1`` from the recording (:class:`controller.offline.replay.RecordedProbes`' rules); every probe
asked up to the stop is charged.

Invariant: for a :class:`ProbeFcsConfig` without ``min_thinking_tokens``/``max_thinking_tokens``,
:func:`simulate` gives the stop position, answer, reason, probe count and probe tokens that ``thinkbrake
replay`` gives on the same trace (tests/test_calibrate.py checks it on real traces). Nothing here does I/O except
:func:`build_cases` and :func:`load_or_build`.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import heapq
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.answers import last_boxed
from controller.detector import ANSWER, LOOP, SOLUTION, Event
from controller.offline.parallel import map_with_progress
from controller.offline.replay import EventRecorder, Tokenizers, token_deltas, trace_delimiters, trace_stream
from controller.policies import ProbeFcsConfig
from controller.probe_policy import ProbeRuntime
from controller.probes import WAIT, WAIT_PROBE, ProbeResult, WaitScanner
from controller.verify import AnswerComparer

CASE_VERSION = 1  # raise when what a case records changes: cached cases of another version are rebuilt
DENSE_MAX_TOKENS = 32  # what a missing dense probe is charged (replay's RecordedProbes)


def problem_of(trace_id: str) -> str:
    """The problem a trace answers: ``dataset/question-index`` (its id without model or seed)."""
    return "/".join(str(trace_id).split("/")[:2])


def record_case(trace: dict[str, Any], tokenizers: Tokenizers, comparer: AnswerComparer) -> dict[str, Any]:
    """Everything :func:`simulate` needs about one trace (a JSON-ready dict; see the module docstring)."""
    delimiters = trace_delimiters(trace)
    deltas = token_deltas(tokenizers.get(trace.get("tokenizer", "")), trace_stream(trace))
    recorder = EventRecorder(comparer, delimiters, trace.get("question") or None)
    scanner = WaitScanner()
    events: list[list[Any]] = []  # [position, kind, tokens, offset, answer, key, explicit, answer_tokens]
    triggers: list[list[int]] = []  # [position where certain, tokens before, offset]
    holds: list[int] = []  # positions where a decision would be held pending
    visible: list[int] = []  # positions whose thinking text is not only whitespace
    end = len(deltas) + 1  # first position at which the model had closed its thinking
    for position, delta in enumerate(deltas, 1):
        before = recorder.detector.tokens
        was_open = not recorder.splitter.saw_end
        update = recorder.feed(delta, 1)
        if was_open and recorder.splitter.saw_end:
            end = position
        for event in update.events:
            events.append(_event_row(position, event))
        if recorder.splitter.saw_end:
            continue
        for tokens, offset in scanner.feed(update.reasoning, before):
            triggers.append([position, tokens, offset])
        if update.reasoning.strip():
            visible.append(position)
        if recorder._visible_end <= recorder.detector.offset:
            holds.append(position)
    for event in recorder.finish().events:
        events.append(_event_row(len(deltas) + 1, event))
    resolve = []  # [position held, position where it resolves (-1: the thinking ends first)]
    for held in holds:
        index = bisect.bisect_right(visible, held)
        resolve.append([held, visible[index] if index < len(visible) else -1])
    reference = str(trace["reference"])
    full = last_boxed(trace.get("final") or "") or last_boxed(trace["thinking"])
    wait_probes = [list(p[:5]) for p in trace.get("wait_probes") or []]
    dense = [list(p[:5]) for p in sorted(trace.get("probes") or [], key=lambda p: p[0])]
    answers = {row[4] for row in events if row[4] is not None}
    answers.update(p[2] for p in wait_probes + dense if p[2] is not None)
    if full is not None:
        answers.add(full)
    graded = {answer: comparer.equal(answer, reference) for answer in sorted(answers)}
    agrees = {answer: full is not None and comparer.equal(answer, full) for answer in sorted(answers)}
    recorded = {p[1]: p for p in wait_probes}
    waits = []  # the benchmark's view: [position, tokens, offset, answer, confidence, out_tokens]
    for position, tokens, offset in triggers:
        probe = recorded.get(offset)
        if probe is None:
            waits.append([position, tokens, offset, None, 0.0, WAIT_PROBE.max_tokens])
        else:
            waits.append([position, tokens, offset, probe[2], float(probe[3]), int(probe[4])])
    return {
        "version": CASE_VERSION,
        "id": trace["id"],
        "problem": problem_of(trace["id"]),
        "dataset": trace.get("dataset", "?"),
        "model": trace.get("model", "?"),
        "total": recorder.thinking_tokens,
        "end": end,
        "full": full,
        "full_ok": full is not None and graded.get(full, False),
        "events": events,
        "triggers": triggers,
        "resolve": resolve,
        "wait_probes": wait_probes,
        "dense": dense,
        "graded": graded,
        "agrees": agrees,
        "waits": waits,
        "answers": [[r[2], r[3], r[4], r[5], r[6]] for r in events if r[1] == ANSWER and r[4] is not None],
        "solutions": [[r[2], r[7], r[4], r[5], r[6]] for r in events if r[1] == SOLUTION and r[4]],
        "loops": [r[2] for r in events if r[1] == LOOP],
    }


def _event_row(position: int, event: Event) -> list[Any]:
    return [position, event.kind, event.tokens, event.offset, event.answer, event.key, event.explicit,
            event.answer_tokens]  # fmt: skip


@dataclass
class Case:
    """A recorded case made ready for simulation (``raw`` is the dict :func:`record_case` made)."""

    raw: dict[str, Any]
    events: dict[int, list[Event]] = field(default_factory=dict)
    triggers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    resolve: dict[int, int] = field(default_factory=dict)
    waits: dict[int, list[Any]] = field(default_factory=dict)
    dense_tokens: list[int] = field(default_factory=list)
    static: list[int] = field(default_factory=list)  # positions with events or triggers, in order

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Case:
        case = cls(raw)
        for row in raw["events"]:
            position, kind, tokens, offset, answer, key, explicit, answer_tokens = row
            event = Event(kind, offset, tokens, answer=answer, key=key, explicit=explicit, answer_tokens=answer_tokens)
            case.events.setdefault(position, []).append(event)
        for position, tokens, offset in raw["triggers"]:
            case.triggers.setdefault(position, []).append((tokens, offset))
        case.resolve = {held: at for held, at in raw["resolve"]}
        case.waits = {p[1]: p for p in raw["wait_probes"]}
        case.dense_tokens = [p[0] for p in raw["dense"]]
        case.static = sorted(set(case.events) | set(case.triggers))
        return case

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def model(self) -> str:
        return str(self.raw["model"])

    @property
    def total(self) -> int:
        return int(self.raw["total"])


@dataclass(frozen=True)
class Outcome:
    """What a config did on one case. ``tokens``: thinking tokens at the stop (the total without a stop);
    ``changed``: the answer differs from the full trace's own (as replay's ``agrees`` is false);
    ``correct``: the answer is right."""

    stopped: bool
    tokens: int
    answer: str | None
    reason: str
    probes: int
    probe_tokens: int
    correct: bool
    changed: bool


class Equality:
    """``AnswerComparer.equal`` with a memory (simulations compare the same answers again and again)."""

    def __init__(self, comparer: AnswerComparer | None = None) -> None:
        self._comparer = comparer
        self._known: dict[tuple[str, str], bool] = {}

    def __call__(self, first: str, second: str) -> bool:
        if first == second:
            return True
        key = (first, second)
        if key not in self._known:
            if self._comparer is None:
                self._comparer = AnswerComparer()
            self._known[key] = self._comparer.equal(first, second)
        return self._known[key]


def probe_answer(case: Case, trigger: str, tokens: int, offset: int, request_id: int, confidence: bool) -> ProbeResult:
    """The recorded answer to a probe, as :class:`controller.offline.replay.RecordedProbes` gives it (``confidence``
    False: every wait probe's confidence is taken away, as from a backend without log-probabilities)."""
    if trigger == WAIT:
        found = case.waits.get(offset)
        if found is None:
            return ProbeResult(request_id, None, 0.0, WAIT_PROBE.max_tokens)
        return ProbeResult(request_id, found[2], float(found[3]) if confidence else 0.0, int(found[4]))
    index = bisect.bisect_right(case.dense_tokens, tokens) - 1
    if index < 0:
        return ProbeResult(request_id, None, 0.0, DENSE_MAX_TOKENS)
    _tokens, _offset, answer, certain, out_tokens = case.raw["dense"][index][:5]
    return ProbeResult(request_id, answer, 1.0 if certain else 0.0, int(out_tokens))


def simulate(case: Case, config: ProbeFcsConfig, equal: Callable[[str, str], bool], confidence: bool = True) -> Outcome:
    """Run ``config`` on ``case`` with replay's timing and accounting (see the module docstring)."""
    if config.min_thinking_tokens or config.max_thinking_tokens is not None:
        raise ValueError("simulate takes probe_fcs configs without min/max_thinking_tokens")
    runtime = ProbeRuntime(config, equal)
    end = int(case.raw["end"])
    pending: list[tuple[int, int, ProbeResult]] = []  # (position where it arrives, id, result)
    asked = spent = 0
    statics = iter(case.static)
    next_static = next(statics, None)
    send_at = None  # second probes asked while results arrived go out with the next token

    def send(position: int) -> None:
        nonlocal asked, spent
        for request in runtime.take_requests():
            result = probe_answer(case, request.trigger, request.tokens, request.offset, request.id, confidence)
            heapq.heappush(pending, (position + result.out_tokens + 1, request.id, result))
            asked, spent = asked + 1, spent + result.out_tokens

    while True:
        upcoming = [p for p in (next_static, send_at, pending[0][0] if pending else None) if p is not None]
        if not upcoming:
            break
        position = min(upcoming)
        if position == next_static or position == send_at:
            if position == next_static:
                for event in case.events.get(position, ()):
                    runtime.observe(event)
                for tokens, offset in case.triggers.get(position, ()):
                    runtime.trigger(WAIT, tokens, offset)
                next_static = next(statics, None)
            if position < end:
                send(position)
            send_at = None
        while pending and pending[0][0] <= position:
            result = heapq.heappop(pending)[2]
            runtime.result(result, position, 0)
            if position >= end:
                continue
            decision = runtime.advance(position, 0)
            if decision is None:
                continue
            stop = case.resolve.get(position, position)
            if stop < 0:
                return _natural(case, "dropped", asked, spent)
            answer = decision.answer
            correct = answer is not None and bool(case.raw["graded"].get(answer, False))
            changed = answer is None or not case.raw["agrees"].get(answer, False)
            return Outcome(True, stop, answer, decision.reason, asked, spent, correct, changed)
        if position + 1 < end and runtime.decision is None and send_at is None:
            send_at = position + 1 if runtime.queued else None
    return _natural(case, "natural", asked, spent)


def _natural(case: Case, reason: str, asked: int, spent: int) -> Outcome:
    """No stop: the trace runs to its end (every probe asked is charged)."""
    return Outcome(False, case.total, case.raw["full"], reason, asked, spent, bool(case.raw["full_ok"]), False)


# ------------------------------------------------------------------------------------------ building cases


class _Builder:
    tokenizers: Tokenizers
    comparer: AnswerComparer


_builder = _Builder()


def _init_builder(root: str, override: str | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _builder.tokenizers = Tokenizers(Path(root), Path(override) if override else None)
    _builder.comparer = AnswerComparer()


def _record(trace: dict[str, Any]) -> dict[str, Any]:
    return record_case(trace, _builder.tokenizers, _builder.comparer)


def build_cases(
    traces: Sequence[dict[str, Any]], root: str, override: str | None = None, jobs: int = 1, progress: bool = True
) -> list[dict[str, Any]]:
    """Record every trace (in ``jobs`` processes, a progress bar on stderr); the order is kept."""
    return map_with_progress(_record, traces, jobs, _init_builder, (root, override), "recording traces", progress)


def trace_key(trace: dict[str, Any]) -> str:
    """SHA-256 of one trace's canonical JSON."""
    return hashlib.sha256(json.dumps(trace, sort_keys=True).encode("utf-8")).hexdigest()


def data_hash(traces: Iterable[dict[str, Any]]) -> str:
    """SHA-256 over the traces' canonical JSON, in id order: the same traces give the same hash in any order."""
    digests = sorted((str(t.get("id")), trace_key(t)) for t in traces)
    return hashlib.sha256(json.dumps(digests).encode("utf-8")).hexdigest()


def read_cases(path: str | Path) -> list[dict[str, Any]]:
    """The cases of a cache file written by :func:`load_or_build` (or a plain JSON list of cases)."""
    data = _read_json(Path(path))
    if isinstance(data, dict):
        return list(data["cases"].values())
    return list(data)


def _read_json(path: Path) -> Any:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8"))


def load_or_build(
    traces: Sequence[dict[str, Any]],
    root: str,
    override: str | None,
    jobs: int,
    cache: str | None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Cases for ``traces``, in order: those ``cache`` holds (the same trace, case version and tokenizer
    override) are read from it, the others recorded and added to it. A cache file is gzip JSON
    ``{"cases": {key: case}}``; any subset of cached traces (a split, a limit) is served from it."""
    keys = [f"{CASE_VERSION}:{override or ''}:{trace_key(trace)}" for trace in traces]
    stored: dict[str, Any] = {}
    if cache and Path(cache).exists():
        data = _read_json(Path(cache))
        stored = dict(data.get("cases", {})) if isinstance(data, dict) else {}
    missing = [index for index, key in enumerate(keys) if key not in stored]
    if missing:
        built = build_cases([traces[index] for index in missing], root, override, jobs, progress)
        stored.update((keys[index], case) for index, case in zip(missing, built, strict=True))
        if cache:
            with gzip.open(cache, "wt", encoding="utf-8") as handle:
                json.dump({"cases": stored}, handle)
    return [stored[key] for key in keys]
