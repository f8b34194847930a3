"""What a choice runner hands the response writers: text events and, last, the choice's result.

Invariants: a choice yields any number of text events and then exactly one event carrying its
:class:`ChoiceResult`; a result knows the policy and shadow flag it ran under, so its ``thinkbrake`` object
(:meth:`ChoiceResult.info`) needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.policies import StopDecision


@dataclass
class ChoiceResult:
    """Everything known about a finished choice."""

    finish_reason: str
    policy: str = "off"
    shadow: bool = False
    prompt_tokens: int = 0
    generated_tokens: int = 0
    thinking_tokens: int = 0
    answer_tokens: int = 0
    stopped: bool = False
    decision: StopDecision | None = None
    shadow_decision: StopDecision | None = None
    shadow_agree: bool | None = None
    solutions: int = 0
    continuation_cached_tokens: int | None = None
    controller_error: str | None = None
    probes: dict[str, Any] | None = None
    risk: float | None = None  # the calibrated level the policy came from (``serve --calibration``)

    def info(self) -> dict[str, Any]:
        """The ``thinkbrake`` object of the response for this choice."""
        decision = self.decision
        data: dict[str, Any] = {
            "stopped": self.stopped,
            "reason": decision.reason if decision else None,
            "answer": decision.answer if decision else None,
            "solutions": self.solutions,
            "thinking_tokens": self.thinking_tokens,
            "answer_tokens": self.answer_tokens,
            "policy": self.policy,
        }
        if self.risk is not None:
            data["risk"] = self.risk
        if decision is not None:
            data["stop_position_tokens"] = decision.tokens
        if self.continuation_cached_tokens is not None:
            data["continuation_cached_tokens"] = self.continuation_cached_tokens
        if self.probes is not None:
            data["probes"] = self.probes
        if self.shadow:
            would = self.shadow_decision
            data["shadow"] = {
                "would_stop": would is not None,
                "reason": would.reason if would else None,
                "answer": would.answer if would else None,
                "stop_tokens": would.tokens if would else None,
                "solutions": would.solutions if would else None,
                "agree": self.shadow_agree,
            }
        if self.controller_error:
            data["error"] = self.controller_error
        return data


@dataclass
class ChoiceEvent:
    """Text for the client (``text`` is raw text for completions), or the end of the choice (``result``)."""

    index: int
    reasoning: str = ""
    content: str = ""
    text: str = ""
    result: ChoiceResult | None = None

    @property
    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.text or self.result)
