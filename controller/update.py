"""What one step of a :class:`controller.session.ThinkingController` produced (see :mod:`controller.session`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.detector import Event
from controller.equality import ComparisonPending
from controller.policies import StopDecision
from controller.probes import ProbeRequest


@dataclass
class Update:
    """What one delta produced: text to forward per section, and a stop decision if one was just made."""

    reasoning: str = ""
    content: str = ""
    decision: StopDecision | None = None
    events: list[Event] = field(default_factory=list)
    probes: list[ProbeRequest] = field(default_factory=list)
    #: this delta confirmed a pending decision: its text lies past the stop point (a server acting on the stop
    #: does not forward it and continues from the tokens fed before it, ``ThinkingController.kept_tokens``)
    past_stop: bool = False
    #: the comparison the controller waits for (see the module docstring): compare the pair, then ``resume()``
    compare: ComparisonPending | None = None
