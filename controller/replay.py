"""Replay recorded reasoning traces through the controller, token by token, as the server would stream them.

Each trace's thinking is tokenized with its own tokenizer (``tokenizer`` field, a folder with
``tokenizer.json``) and fed one token at a time to a :class:`ThinkingController` per policy. The full trace's
answer is the last ``\\boxed{}`` of ``final`` (or of ``thinking`` when ``final`` is empty).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.answers import AnswerComparer, last_boxed
from controller.delimiters import Delimiters
from controller.detector import ANSWER, SOLUTION, Event
from controller.efficiency import SolutionSpan, outcome_efficiency, process_efficiency
from controller.policies import OffConfig, PolicyConfig
from controller.session import ThinkingController

REPLAY_DELIMITERS = Delimiters(implicit_start=True)


def split_of(trace: dict[str, Any]) -> str:
    """``"tune"`` or ``"holdout"``: a stable half of the problems, the same for every model and seed.

    The key is ``dataset/question-index`` (the trace id without model and seed), so all generations of one
    problem fall on the same side: rules are tuned on one half and reported on the other.
    """
    key = "/".join(str(trace["id"]).split("/")[:2])
    return "tune" if zlib.crc32(key.encode()) % 2 == 0 else "holdout"


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
    config: PolicyConfig, deltas: Sequence[str], comparer: AnswerComparer, question: str | None = None
) -> ThinkingController:
    """Stream ``deltas`` (one token each) through a fresh controller (that knows the trace's ``question``)
    until it decides to stop."""
    controller = ThinkingController(config, REPLAY_DELIMITERS, comparer, question=question)
    for delta in deltas:
        update = controller.feed(delta, 1)
        if update.decision is not None:
            return controller
    controller.finish()
    return controller


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

    def __init__(self, comparer: AnswerComparer, question: str | None = None) -> None:
        super().__init__(OffConfig(), REPLAY_DELIMITERS, comparer, question=question)
        self.events: list[Event] = []

    def feed(self, delta: str, tokens: int) -> Any:
        update = super().feed(delta, tokens)
        self.events.extend(update.events)
        return update

    def finish(self) -> Any:
        update = super().finish()
        self.events.extend(update.events)
        return update


def replay_trace(
    trace: dict[str, Any], deltas: Sequence[str], configs: Sequence[PolicyConfig], comparer: AnswerComparer
) -> TraceResult:
    """Replay one trace under each policy config and grade the answers."""
    reference = str(trace["reference"])
    full_answer = last_boxed(trace.get("final") or "") or last_boxed(trace["thinking"])
    full_correct = full_answer is not None and comparer.equal(full_answer, reference)
    question = trace.get("question") or None
    recorder = EventRecorder(comparer, question)
    for delta in deltas:
        recorder.feed(delta, 1)
    recorder.finish()
    total = len(deltas)
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
        controller = run_controller(config, deltas, comparer, question)
        decision = controller.decision
        if decision is None:
            outcome = PolicyOutcome(config.name, False, "natural", total, full_answer, full_correct, True)
        else:
            answer = decision.answer
            correct = answer is not None and comparer.equal(answer, reference)
            agrees = answer is not None and full_answer is not None and comparer.equal(answer, full_answer)
            outcome = PolicyOutcome(config.name, True, decision.reason, decision.tokens, answer, correct, agrees)
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
    deltas = token_deltas(tokenizer, trace["thinking"])
    return replay_trace(trace, deltas, _worker.configs, _worker.comparer)
