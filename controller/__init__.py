"""thinkbrake controller: find solutions in streamed reasoning and decide when to stop thinking.

Pure Python. Nothing here knows about HTTP, FastAPI or vLLM; the server feeds text deltas with their token
counts and acts on the decisions.

Main entry points:
- :class:`controller.splitter.ThinkingSplitter` routes a delta stream to thinking or answer text.
- :class:`controller.detector.SolutionDetector` turns thinking deltas into answer / reflection / solution events.
- :func:`controller.policies.parse_policy` builds a stop-policy config from a plain dict.
- :class:`controller.session.ThinkingController` ties detector and policy together for one request choice.
"""

from controller.delimiters import Delimiters, delimiters_for
from controller.detector import Event, SolutionDetector
from controller.policies import PolicyConfig, PolicyError, StopDecision, parse_policy
from controller.session import ThinkingController
from controller.splitter import ThinkingSplitter

__all__ = [
    "Delimiters",
    "Event",
    "PolicyConfig",
    "PolicyError",
    "SolutionDetector",
    "StopDecision",
    "ThinkingController",
    "ThinkingSplitter",
    "delimiters_for",
    "parse_policy",
]
