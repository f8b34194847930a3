"""Stop policies: configs (frozen dataclasses parsed from plain dicts) and their per-request runtime.

Every policy honours ``min_thinking_tokens`` (never stop earlier; a stop that becomes due earlier waits)
and ``max_thinking_tokens`` (always stop there). Answer policies stop only on an answer: text that never
reaches an answer is never stopped by them (only a token budget can stop it).

- ``probe_fcs`` (default): ``fcs_reflection`` with each solution's answer read by an answer probe (see
  :mod:`controller.probe_policy`); where probes are impossible it runs as ``fcs_reflection``.
- ``fcs_reflection``: the first solution plus one confirming reflection. Stop as soon as a solution
  that follows a reflection reaches the same answer as the solution before it, one of the two stating it
  explicitly; if it reaches a different answer, keep going until two consecutive solutions agree. Answers
  never stated explicitly need three agreeing solutions (``implicit_k``).
- ``first_answer``: stop at the first answer.
- ``consistency`` (``k``): stop when ``k`` consecutive solutions agree (``k=2`` behaves as ``fcs_reflection``).
- ``budget`` (``max_thinking_tokens``): stop at a hard budget only.
- ``off``: never stop (``max_thinking_tokens``, if given, still applies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from controller import stop_reasons
from controller.detector import ANSWER, LOOP, SOLUTION, Event
from controller.equality import Equal


class PolicyError(ValueError):
    """A bad policy name or argument; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PolicyConfig:
    """Arguments every policy takes. Invariant: 0 <= min_thinking_tokens, and min <= max when max is set."""

    name: ClassVar[str] = "off"
    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.min_thinking_tokens < 0:
            raise PolicyError("min_thinking_tokens", "must be >= 0")
        if self.max_thinking_tokens is not None:
            if self.max_thinking_tokens < 1:
                raise PolicyError("max_thinking_tokens", "must be >= 1")
            if self.max_thinking_tokens < self.min_thinking_tokens:
                raise PolicyError("max_thinking_tokens", "must be >= min_thinking_tokens")

    @property
    def stops_on_answers(self) -> bool:
        return False

    @property
    def stop_on_loop(self) -> bool:
        """Answer policies also stop a model stuck repeating itself (see ``loop`` events)."""
        return self.stops_on_answers

    @property
    def uses_probes(self) -> bool:
        """The policy asks the model for its answer (answer probes); see :mod:`controller.probe_policy`."""
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class OffConfig(PolicyConfig):
    name: ClassVar[str] = "off"


@dataclass(frozen=True)
class FirstAnswerConfig(PolicyConfig):
    name: ClassVar[str] = "first_answer"

    @property
    def stops_on_answers(self) -> bool:
        return True


@dataclass(frozen=True)
class ConsistencyConfig(PolicyConfig):
    name: ClassVar[str] = "consistency"
    k: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise PolicyError("k", "must be >= 2")

    @property
    def stops_on_answers(self) -> bool:
        return True


@dataclass(frozen=True)
class FcsReflectionConfig(ConsistencyConfig):
    """``fcs_reflection``: ``k`` (2) consecutive solutions agree and one of them states its answer explicitly
    (``\\boxed``, "the answer is"): the first solution plus one confirming reflection. When none of them does,
    ``implicit_k`` (3) consecutive solutions must agree: a value the model checks without calling it the answer
    is as often an intermediate quantity (a part of a sum, a side on the way to a diagonal) as the final one,
    so it needs a second confirmation. ``implicit_k <= k`` drops that distinction.
    """

    name: ClassVar[str] = "fcs_reflection"
    k: int = 2
    implicit_k: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.implicit_k < 2:
            raise PolicyError("implicit_k", "must be >= 2")


@dataclass(frozen=True)
class BudgetConfig(PolicyConfig):
    name: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        if self.max_thinking_tokens is None:
            raise PolicyError("max_thinking_tokens", "the budget policy needs max_thinking_tokens")
        super().__post_init__()


@dataclass(frozen=True)
class ProbeFcsConfig(PolicyConfig):
    """``probe_fcs``: answer probes at "Wait"s read each solution's answer (runtime: :mod:`controller.probe_policy`).

    ``max_probes``: probes per request at most; ``min_probe_tokens``: no probe earlier; ``confidence``: a probe
    answer counts when its confidence reaches it; ``confirm_confidence``: two consecutive counted probes with
    the same answer stop when one of them reaches it; ``sure_confidence``: one probe suffices when it reaches
    this and the thinking wrote the same answer among the last ``text_window`` answers before the probe
    (1.0: never); ``agree_confidence``: a probe reaching it is checked by a second, dense-suffix probe on the
    same prefix, and one that agrees stops (1.0: never); ``solution_agree``: a counted probe stops when at
    least this many of the solutions the thinking closed before the probe reached the same answer (0: never).
    Long thinking: from ``settle_tokens`` on, a dense probe at a "Wait" at least ``settle_spacing`` tokens after
    the previous one (at most ``max_settle_probes``), and a stop when ``settle_agree`` of them in a row give the
    same answer without hesitating, an answer the thinking wrote among its last ``settle_text_window`` answers
    (0: off). ``alone_confidence``: a counted probe reaching it stops on its own (the DEER rule; 1.0: never).
    Probe schedule: ``probe_spacing``: a wait probe only at a "Wait" at least this many tokens after the previous
    wait probe; ``backoff``: after this many answered wait probes in a row that did not count, the spacing
    doubles with each further one, from at least ``backoff_tokens`` (0: off), so a model whose probes carry no
    usable confidence is probed rarely. Without probes it runs as ``fcs_reflection``.
    Defaults: chosen on the tuning half of ``dev-probes`` (README, "Answer probes";
    ``benchmarks/probe_rule_search.py``).
    """

    name: ClassVar[str] = "probe_fcs"
    max_probes: int = 30
    min_probe_tokens: int = 0
    confidence: float = 0.9
    confirm_confidence: float = 0.999
    sure_confidence: float = 0.999
    text_window: int = 3
    agree_confidence: float = 0.999
    solution_agree: int = 2
    settle_tokens: int = 8192
    settle_spacing: int = 512
    settle_agree: int = 3
    settle_text_window: int = 2
    max_settle_probes: int = 16
    alone_confidence: float = 1.0
    probe_spacing: int = 0
    backoff: int = 0
    backoff_tokens: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        counts = ("max_probes", "min_probe_tokens", "text_window", "solution_agree", "settle_tokens", "settle_spacing",
                  "settle_text_window", "max_settle_probes", "probe_spacing", "backoff", "backoff_tokens")  # fmt: skip
        for field in counts:
            if getattr(self, field) < 0:
                raise PolicyError(field, "must be >= 0")
        if self.settle_agree < 0 or self.settle_agree == 1:
            raise PolicyError("settle_agree", "must be 0 (off) or >= 2")
        for field in ("confidence", "confirm_confidence", "sure_confidence", "agree_confidence", "alone_confidence"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise PolicyError(field, "must be between 0 and 1")

    @property
    def stops_on_answers(self) -> bool:
        return True

    @property
    def uses_probes(self) -> bool:
        return True

    def fallback(self) -> FcsReflectionConfig:
        """The text-only policy to run where probes are impossible (same token bounds)."""
        return FcsReflectionConfig(self.min_thinking_tokens, self.max_thinking_tokens)


POLICIES: dict[str, type[PolicyConfig]] = {
    cls.name: cls
    for cls in (ProbeFcsConfig, FcsReflectionConfig, FirstAnswerConfig, ConsistencyConfig, BudgetConfig, OffConfig)
}
DEFAULT_POLICY = ProbeFcsConfig.name


def parse_policy(data: Mapping[str, Any], default: str = DEFAULT_POLICY) -> PolicyConfig:
    """Build a config from a plain dict such as ``{"policy": "consistency", "k": 3}``.

    Raises :class:`PolicyError` naming the field for an unknown policy, unknown argument or bad value.
    """
    name = data.get("policy", default)
    if not isinstance(name, str) or name not in POLICIES:
        raise PolicyError("policy", f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {field.name: field for field in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "policy":
            continue
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise PolicyError(key, f"not an argument of policy {name!r} (arguments: {allowed})")
        if fields[key].type in (float, "float"):
            kwargs[key] = _as_float(key, value)
        else:
            kwargs[key] = _as_int(key, value, optional=key == "max_thinking_tokens")
    return cls(**kwargs)


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PolicyError(field, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(field, f"must be a number, got {value!r}") from None
    if number != number:
        raise PolicyError(field, "must be a number, got NaN")
    return number


def _as_int(field: str, value: Any, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise PolicyError(field, "must be an integer")
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise PolicyError(field, f"must be an integer, got {value!r}") from None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise PolicyError(field, f"must be an integer, got {value!r}")


@dataclass(frozen=True)
class StopDecision:
    """Why and where thinking stops.

    ``tokens``: thinking tokens generated when the stop was decided (the stop position). ``offset``: the
    character offset where the sentence that triggered the stop ended (independent of delta boundaries).
    """

    reason: str
    answer: str | None
    key: str | None
    tokens: int
    offset: int
    solutions: int


class PolicyRuntime:
    """Per-request state of a policy. Feed it every detector event and every token count.

    Invariants: once :meth:`decision` is not None it never changes; :meth:`observe` makes its comparisons before
    it changes anything, so an equality that raises :class:`controller.equality.ComparisonPending` leaves the
    runtime as it was (the event is observed again once the verdict is known).
    """

    def __init__(self, config: PolicyConfig, equal: Equal) -> None:
        self.config = config
        self._equal = equal
        self._solution_keys: list[str] = []  # latest answer key of each solution
        self._solution_explicit: list[bool] = []  # whether each solution's answer was stated explicitly
        self._due: StopDecision | None = None  # an answer stop waiting for min_thinking_tokens
        self._last: tuple[str, str] | None = None
        self.decision: StopDecision | None = None

    def observe(self, event: Event) -> None:
        """Take one detector event (events arrive in stream order)."""
        if self.decision is not None:
            return
        if event.kind == LOOP and self.config.stop_on_loop:
            answer, key = self._last if self._last else (None, None)
            self._due = self._due or StopDecision(
                stop_reasons.LOOP, answer, key, event.tokens, event.offset, len(self._solution_keys)
            )
            return
        if event.key is None or event.answer is None:
            return
        due = self._due
        if event.kind == ANSWER:
            if isinstance(self.config, FirstAnswerConfig):
                due = self._decide(stop_reasons.FIRST_ANSWER, event, event.solution + 1)
            elif event.explicit and isinstance(self.config, ConsistencyConfig):
                # an explicit answer is a conclusion already: it may confirm without waiting for the close
                keys, explicit = self._solution_keys + [event.key], self._solution_explicit + [True]
                due = due or self._consistent(keys, explicit, event)
            self._last = (event.answer, event.key)
        elif event.kind == SOLUTION:
            if isinstance(self.config, ConsistencyConfig) and due is None:
                keys, explicit = self._solution_keys + [event.key], self._solution_explicit + [event.explicit]
                due = self._consistent(keys, explicit, event)
            self._solution_keys.append(event.key)
            self._solution_explicit.append(event.explicit)
        self._due = due

    def _consistent(self, keys: list[str], explicit: list[bool], event: Event) -> StopDecision | None:
        """A decision if the last ``k`` solution answers in ``keys`` agree (for ``fcs_reflection``: one of them
        stated explicitly, or else the last ``implicit_k``)."""
        config = self.config
        assert isinstance(config, ConsistencyConfig)
        if len(keys) < config.k:
            return None
        current = keys[-1]
        if not all(self._equal(key, current) for key in keys[-config.k : -1]):
            return None
        if isinstance(config, FcsReflectionConfig) and not any(explicit[-config.k :]):
            n = max(config.implicit_k, config.k)
            if len(keys) < n or not all(self._equal(key, current) for key in keys[-n : -config.k]):
                return None
        reason = stop_reasons.CONFIRMED if isinstance(config, FcsReflectionConfig) else stop_reasons.CONSISTENT
        return self._decide(reason, event, len(keys))

    @staticmethod
    def _decide(reason: str, event: Event, solutions: int) -> StopDecision:
        return StopDecision(reason, event.answer, event.key, event.tokens, event.offset, solutions)

    def advance(self, tokens: int, offset: int) -> StopDecision | None:
        """Called after each delta with the thinking tokens so far; returns the decision once it is made."""
        if self.decision is not None:
            return self.decision
        config = self.config
        if self._due is not None and tokens >= config.min_thinking_tokens:
            due = self._due
            self.decision = dataclasses.replace(due, tokens=tokens)
        elif config.max_thinking_tokens is not None and tokens >= config.max_thinking_tokens:
            answer, key = self._last if self._last else (None, None)
            reason = stop_reasons.BUDGET if isinstance(config, BudgetConfig) else stop_reasons.MAX_THINKING_TOKENS
            self.decision = StopDecision(reason, answer, key, tokens, offset, len(self._solution_keys))
        return self.decision
