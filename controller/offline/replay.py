"""Replay recorded reasoning traces through the controller, token by token, as the server would stream them.

The stream of a trace is what the model emitted (:func:`trace_stream`): its thinking followed, when the model
closed its thinking, by its end-of-thinking text (``"\\n</think>\\n\\n"``, or ``<|end_of_thought|>`` for Sky-T1
models), tokenized as one text with the trace's own tokenizer (``tokenizer`` field, a folder with
``tokenizer.json``) and fed one token at a time to a :class:`ThinkingController` per policy, as the server
would stream it. The full trace's answer is the last ``\\boxed{}`` of ``final`` (or of ``thinking`` when
``final`` is empty).

Answer probes are replayed from the trace's recorded probes (:class:`RecordedProbes`): a probe asked at a
"Wait" gets the wait probe recorded at that very character offset, any other probe the dense probe recorded
at the latest position at or before its token position. A result is delivered ``out_tokens + 1`` tokens
after it was asked (the probe decodes in the same batch as the main stream), and the decision it causes
applies there. Traces without probe data run the policy's text-only fallback.

Split rule (``split_of``): a trace belongs to ``tune`` or ``holdout`` by the SHA-256 of ``dataset/question``
(its id without model or seed), so every model and seed of one problem fall on the same side.
"""

from __future__ import annotations

import bisect
import dataclasses
import gzip
import hashlib
import heapq
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.answers import last_boxed
from controller.delimiters import FAMILIES, Delimiters
from controller.detector import ANSWER, SOLUTION, Event
from controller.offline.efficiency import SolutionSpan, outcome_efficiency, process_efficiency
from controller.policies import OffConfig, PolicyConfig
from controller.probes import WAIT, WAIT_PROBE, ProbeRequest, ProbeResult
from controller.session import ThinkingController
from controller.verify import AnswerComparer

TUNE = "tune"
HOLDOUT = "holdout"


def split_of(trace: dict[str, Any]) -> str:
    """``tune`` or ``holdout``: half of the problems each, by a stable hash of ``dataset/question-index``."""
    parts = str(trace.get("id", "")).split("/")
    key = "/".join(parts[:2])
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return TUNE if digest[0] % 2 == 0 else HOLDOUT


def has_probe_data(trace: dict[str, Any]) -> bool:
    return "probes" in trace or "wait_probes" in trace


class RecordedProbes:
    """Answers probe requests from one trace's recorded ``probes`` and ``wait_probes``.

    A wait probe the data lacks (only the first 30 "Wait"s were probed) is answered with no answer and
    charged the probe's full token limit; ``missing`` counts them.
    """

    def __init__(self, trace: dict[str, Any]) -> None:
        self.dense = sorted(trace.get("probes") or [], key=lambda probe: probe[0])
        self.dense_tokens = [probe[0] for probe in self.dense]
        self.waits = {probe[1]: probe for probe in trace.get("wait_probes") or []}
        self.missing = 0

    def answer(self, request: ProbeRequest) -> ProbeResult:
        if request.trigger == WAIT:
            found = self.waits.get(request.offset)
            if found is None:
                self.missing += 1
                return ProbeResult(request.id, None, 0.0, WAIT_PROBE.max_tokens)
            return ProbeResult(request.id, found[2], float(found[3]), int(found[4]))
        index = bisect.bisect_right(self.dense_tokens, request.tokens) - 1
        if index < 0:
            self.missing += 1
            return ProbeResult(request.id, None, 0.0, 32)
        _tokens, _offset, answer, certain, out_tokens = self.dense[index][:5]
        return ProbeResult(request.id, answer, 1.0 if certain else 0.0, int(out_tokens))


REPLAY_DELIMITERS = Delimiters(implicit_start=True)
SKY_T1_DELIMITERS = dataclasses.replace(FAMILIES["sky-t1"], implicit_start=True)


def trace_delimiters(trace: dict[str, Any]) -> Delimiters:
    """The thinking delimiters of the model that wrote ``trace`` (thinking starts implicitly: it is all thinking)."""
    return SKY_T1_DELIMITERS if "sky-t1" in str(trace.get("model", "")).lower() else REPLAY_DELIMITERS


def end_of_thinking_text(thinking: str, delimiters: Delimiters) -> str:
    """The text a model emits to close ``thinking``: a newline, the end delimiter, a blank line.

    The recorded thinking keeps what the model wrote before the end delimiter, so a newline it already ends
    with is that newline (``"...}.\\n" + "</think>\\n\\n"``).
    """
    lead = "" if thinking.endswith("\n") else "\n"
    return f"{lead}{delimiters.end}\n\n"


def trace_stream(trace: dict[str, Any]) -> str:
    """The raw text the model streamed for ``trace`` up to its answer: the thinking, then the end of thinking if
    the model closed it (a trace cut by its token limit ends inside its thinking)."""
    thinking = str(trace["thinking"])
    if not trace.get("closed", True):
        return thinking
    return thinking + end_of_thinking_text(thinking, trace_delimiters(trace))


def load_traces(paths: Sequence[str | Path]) -> Iterator[dict[str, Any]]:
    """Yield trace records from ``.jsonl`` or ``.jsonl.gz`` files, in order."""
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_number}: not JSON: {error}") from None


def default_tokenizer_root(trace_path: str | Path) -> Path:
    """``<shared>/tokenizers`` for a trace file at ``<shared>/data/traces/x.jsonl.gz``."""
    return Path(trace_path).resolve().parent.parent.parent / "tokenizers"


class Tokenizers:
    """Loads ``tokenizer.json`` files by name, once each. ``override`` forces one tokenizer for all traces."""

    def __init__(self, root: Path, override: Path | None = None) -> None:
        self.root = root
        self.override = override
        self._loaded: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        from tokenizers import Tokenizer

        folder = self.override or (self.root / name)
        key = str(folder)
        if key not in self._loaded:
            path = folder / "tokenizer.json" if folder.is_dir() else folder
            if not path.exists():
                raise FileNotFoundError(f"tokenizer {name!r} not found at {path} (use --tokenizer DIR)")
            self._loaded[key] = Tokenizer.from_file(str(path))
        return self._loaded[key]


def token_deltas(tokenizer: Any, text: str) -> list[str]:
    """Split ``text`` into per-token deltas using the tokenizer's character offsets.

    A token that ends inside a character already emitted yields an empty delta (as a streaming detokenizer
    holding back an incomplete UTF-8 sequence would). Invariant: ``"".join(result) == text``.
    """
    encoding = tokenizer.encode(text, add_special_tokens=False)
    deltas: list[str] = []
    emitted = 0
    for _start, end in encoding.offsets:
        end = max(end, emitted)
        deltas.append(text[emitted:end])
        emitted = end
    if emitted < len(text):
        if deltas:
            deltas[-1] += text[emitted:]
        else:
            deltas.append(text[emitted:])
    return deltas


@dataclass
class PolicyOutcome:
    """What one policy did on one trace."""

    policy: str
    stopped: bool
    reason: str
    tokens: int
    answer: str | None
    correct: bool
    agrees: bool
    probes: int = 0
    probe_tokens: int = 0
    fallback: bool = False
    missing_probes: int = 0


@dataclass
class TraceResult:
    """Everything the report needs about one trace."""

    id: str
    dataset: str
    model: str
    tokens: int
    answer: str | None
    correct: bool
    closed: bool
    solutions: int
    first_correct_tokens: int | None
    outcome_efficiency: float | None
    process_efficiency: float
    outcomes: list[PolicyOutcome] = field(default_factory=list)


def run_controller(
    config: PolicyConfig,
    deltas: Sequence[str],
    comparer: AnswerComparer,
    probes: RecordedProbes | None = None,
    delimiters: Delimiters = REPLAY_DELIMITERS,
    question: str | None = None,
) -> tuple[ThinkingController, int]:
    """Stream ``deltas`` (one token each) through a fresh controller (that knows the trace's ``question``)
    until it decides to stop.

    With ``probes``, every probe the controller asks is answered from the recording ``out_tokens + 1`` tokens
    later; without, the controller is told it cannot probe (text-only fallback). Returns the controller and
    the probe tokens charged: those of answered probes plus those still in flight at the stop.
    """
    controller = ThinkingController(config, delimiters, comparer, probes=probes is not None, question=question)
    pending: list[tuple[int, int, ProbeResult]] = []  # (token position where it arrives, id, result)
    for position, delta in enumerate(deltas, 1):
        update = controller.feed(delta, 1)
        if probes is not None:
            for request in update.probes:
                result = probes.answer(request)
                heapq.heappush(pending, (position + result.out_tokens + 1, request.id, result))
        if update.decision is not None:
            break
        while pending and pending[0][0] <= position:
            if controller.probe_result(heapq.heappop(pending)[2]).decision is not None:
                break
        if controller.decision is not None:
            break
    else:
        controller.finish()
    return controller, controller.probe_tokens + sum(result.out_tokens for _, _, result in pending)


def analyse_events(
    events: Sequence[Event], reference: str, comparer: AnswerComparer
) -> tuple[list[SolutionSpan], int | None]:
    """Solution spans of a full trace and the token position of its first correct answer."""
    spans: list[SolutionSpan] = []
    first_correct: int | None = None
    for event in events:
        if event.kind == SOLUTION and event.key is not None:
            spans.append(SolutionSpan(event.key, event.start_tokens, event.start_offset, event.answer_tokens))
        if event.kind == ANSWER and first_correct is None and event.answer and comparer.equal(event.answer, reference):
            first_correct = event.tokens
    return spans, first_correct


class EventRecorder(ThinkingController):
    """A pass-through controller that keeps every event (used for the analysis of the full trace)."""

    def __init__(
        self, comparer: AnswerComparer, delimiters: Delimiters = REPLAY_DELIMITERS, question: str | None = None
    ) -> None:
        super().__init__(OffConfig(), delimiters, comparer, question=question)
        self.events: list[Event] = []

    def feed(self, delta: str, tokens: int, through_end: int | None = None) -> Any:
        update = super().feed(delta, tokens, through_end)
        self.events.extend(update.events)
        return update

    def finish(self) -> Any:
        update = super().finish()
        self.events.extend(update.events)
        return update


def replay_trace(
    trace: dict[str, Any],
    deltas: Sequence[str],
    configs: Sequence[PolicyConfig],
    comparer: AnswerComparer,
    delimiters: Delimiters = REPLAY_DELIMITERS,
) -> TraceResult:
    """Replay one trace's stream (``deltas``, one token each) under each policy config and grade the answers.

    ``tokens`` of the result is the thinking tokens of the stream, counted as the server counts them (the tokens
    of the end delimiter included).
    """
    reference = str(trace["reference"])
    full_answer = last_boxed(trace.get("final") or "") or last_boxed(trace["thinking"])
    full_correct = full_answer is not None and comparer.equal(full_answer, reference)
    question = trace.get("question") or None
    recorder = EventRecorder(comparer, delimiters, question)
    for delta in deltas:
        recorder.feed(delta, 1)
    recorder.finish()
    total = recorder.thinking_tokens
    spans, first_correct = analyse_events(recorder.events, reference, comparer)
    result = TraceResult(
        id=trace["id"],
        dataset=trace.get("dataset", "?"),
        model=trace.get("model", "?"),
        tokens=total,
        answer=full_answer,
        correct=full_correct,
        closed=bool(trace.get("closed", True)),
        solutions=len(spans),
        first_correct_tokens=first_correct,
        outcome_efficiency=outcome_efficiency(first_correct, total) if full_correct else None,
        process_efficiency=process_efficiency(trace["thinking"], spans, total),
    )
    for config in configs:
        probes = RecordedProbes(trace) if config.uses_probes and has_probe_data(trace) else None
        controller, probe_tokens = run_controller(config, deltas, comparer, probes, delimiters, question)
        decision = controller.decision
        if decision is None:
            outcome = PolicyOutcome(config.name, False, "natural", total, full_answer, full_correct, True)
        else:
            answer = decision.answer
            correct = answer is not None and comparer.equal(answer, reference)
            agrees = answer is not None and full_answer is not None and comparer.equal(answer, full_answer)
            outcome = PolicyOutcome(config.name, True, decision.reason, decision.tokens, answer, correct, agrees)
        outcome.probes = controller.probes_sent
        outcome.probe_tokens = probe_tokens
        outcome.fallback = controller.probe_fallback is not None
        outcome.missing_probes = probes.missing if probes is not None else 0
        result.outcomes.append(outcome)
    return result


class _Worker:
    """Per-process replay state (tokenizers and comparer), created once by the pool initializer."""

    tokenizers: Tokenizers
    comparer: AnswerComparer
    configs: Sequence[PolicyConfig]


_worker = _Worker()


def init_worker(root: str, override: str | None, configs: Sequence[PolicyConfig]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker.tokenizers = Tokenizers(Path(root), Path(override) if override else None)
    _worker.comparer = AnswerComparer()
    _worker.configs = configs


def replay_in_worker(trace: dict[str, Any]) -> TraceResult:
    tokenizer = _worker.tokenizers.get(trace.get("tokenizer", ""))
    deltas = token_deltas(tokenizer, trace_stream(trace))
    return replay_trace(trace, deltas, _worker.configs, _worker.comparer, trace_delimiters(trace))
