"""Answer probes: asking the model, mid-thinking, what its answer is now.

A probe is a second, short generation on the same prefix: the request's prompt ids + the ids generated so far
(up to :attr:`ProbeRequest.tokens`) + the ids of :attr:`ProbeSpec.suffix`, greedy, at most
:attr:`ProbeSpec.max_tokens` tokens, with per-token log-probabilities. The engine's prefix cache serves the
prefix, so a probe costs the suffix's prefill and a short decode. The main decode does not wait for it.

This module is pure: it says *what* to ask and how to *read* the answer. The controller emits
:class:`ProbeRequest` objects (in ``Update.probes``); whoever runs the model (the server, or replay from
recorded probe data) answers each with a :class:`ProbeResult` through ``ThinkingController.probe_result``.

Invariants:
- ``ProbeRequest.id`` is unique per controller and increases; at most the policy's probe cap is ever issued.
- ``ProbeRequest.tokens`` counts generated tokens (thinking so far, the opening tag included when the model
  emitted it) *before* the trigger: the probe's prefix is ``generated_ids[:tokens]``.
- A :class:`ProbeResult` may arrive any number of tokens later (or never); decisions taken on it apply at the
  position where it arrived, never earlier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: what triggered a probe
WAIT = "wait"  # just before a reflection opener such as "Wait" (the DEER trigger)
SOLUTION = "solution"  # at a solution boundary: an answer followed by a reflection


@dataclass(frozen=True)
class ProbeSpec:
    """How a probe is asked and read: the recorded DEER probe of ``dev-probes`` ``wait_probes``.

    ``confidence``: ``"mean"`` (arithmetic mean of the answer tokens' probabilities) or ``"geometric"``.
    ``needs_close``: confidence is 0 unless the probe's own output closed thinking (Qwen3 is over-confident).
    """

    suffix: str = "\n**Final Answer**\n\\boxed"
    max_tokens: int = 20
    confidence: str = "mean"
    needs_close: bool = False


@dataclass(frozen=True)
class ProbeRequest:
    """Ask the model for its answer on the prefix of the first ``tokens`` generated tokens."""

    id: int
    tokens: int
    offset: int
    trigger: str


@dataclass(frozen=True)
class ProbeResult:
    """The model's answer to one probe.

    ``answer``: the answer read from the probe text (None when none could be read); ``confidence`` in [0, 1];
    ``out_tokens``: tokens the probe decoded (its cost, charged against the savings).
    """

    id: int
    answer: str | None
    confidence: float
    out_tokens: int


def read_probe(spec: ProbeSpec, request_id: int, text: str, logprobs: Sequence[float]) -> ProbeResult:
    """Read a probe's decoded ``text`` (what followed the suffix) and its per-token ``logprobs``.

    The answer is the content of the braces that open the text, up to the matching ``}``; confidence is the
    mean (or geometric mean) probability over the tokens generated up to that brace.
    """
    answer, answer_tokens = _braced(text, len(logprobs))
    values = list(logprobs[:answer_tokens]) if answer_tokens else list(logprobs)
    if not values or answer is None:
        return ProbeResult(request_id, answer, 0.0, len(logprobs))
    if spec.confidence == "geometric":
        confidence = math.exp(sum(values) / len(values))
    else:
        confidence = sum(math.exp(value) for value in values) / len(values)
    if spec.needs_close and "</think>" not in text:
        confidence = 0.0
    return ProbeResult(request_id, answer, min(1.0, max(0.0, confidence)), len(logprobs))


def _braced(text: str, tokens: int) -> tuple[str | None, int]:
    """The ``{...}`` content at the start of ``text`` and an estimate of the tokens it spans (all of them)."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None, tokens
    depth = 0
    for index, char in enumerate(stripped):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return stripped[1:index].strip(), tokens
    return None, tokens
