"""The interface every policy runtime implements (:class:`controller.policies.PolicyRuntime` for the text rules,
:class:`controller.probe_policy.ProbeRuntime` for ``probe_fcs``): the session drives either the same way.

Invariants: events arrive in stream order; once :meth:`Runtime.advance` returns a decision it returns that same
decision ever after (``decision`` holds it); a step whose equality raises
:class:`controller.equality.ComparisonPending` (``observe``, a probe result) has changed nothing, so it can be
taken again once the verdict is known.
"""

from __future__ import annotations

from typing import Protocol

from controller.detector import Event
from controller.equality import Equal
from controller.policies import PolicyConfig, PolicyRuntime, ProbeFcsConfig, StopDecision
from controller.probe_policy import ProbeRuntime


class Runtime(Protocol):
    """Per-request state of a stop policy."""

    decision: StopDecision | None

    def observe(self, event: Event) -> None:
        """Take one detector event."""

    def advance(self, tokens: int, offset: int) -> StopDecision | None:
        """After each delta, with the thinking tokens and characters so far: the decision once it is made."""


def runtime_for(config: PolicyConfig, equal: Equal, probes: bool) -> tuple[Runtime, ProbeRuntime | None]:
    """The runtime of ``config`` and, when it asks answer probes (``probes``: the backend can run them), the same
    runtime as the one that takes probe triggers and results. Without probes ``probe_fcs`` runs its text-only
    fallback."""
    if isinstance(config, ProbeFcsConfig) and probes:
        runtime = ProbeRuntime(config, equal)
        return runtime, runtime
    if isinstance(config, ProbeFcsConfig):
        return PolicyRuntime(config.fallback(), equal), None
    return PolicyRuntime(config, equal), None
