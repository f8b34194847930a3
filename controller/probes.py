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
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: what triggered a probe
WAIT = "wait"  # just before a reflection opener such as "Wait" (the DEER trigger)
SOLUTION = "solution"  # at a solution boundary: an answer followed by a reflection


HESITATION = ("wait", "hold", "but", "okay", "no", "hmm")


@dataclass(frozen=True)
class ProbeSpec:
    """How a probe is asked and read; each is a probe recorded in ``dev-probes`` so replay carries over.

    ``suffix`` is appended to the prefix; ``in_braces``: the suffix already opened the ``\\boxed{`` (the
    answer runs to the first unmatched ``}``), otherwise the text starts with ``{``.
    ``confidence``: ``"mean"`` (arithmetic mean of the answer tokens' probabilities), ``"geometric"``, or
    ``"certain"`` (1.0 unless the probe text holds a hesitation word, as Dynasor reads it).
    ``needs_close``: confidence is 0 unless the probe's own output closed thinking (Qwen3 is over-confident).
    """

    suffix: str = "\n**Final Answer**\n\\boxed"
    max_tokens: int = 20
    confidence: str = "mean"
    needs_close: bool = False
    in_braces: bool = False


#: the DEER probe of ``wait_probes`` (R1-distill reading; Qwen3: see :func:`probe_spec`)
WAIT_PROBE = ProbeSpec()
#: the dense probe of ``probes`` (Dynasor family)
DENSE_PROBE = ProbeSpec("**Final Answer**\n\n\\[ \\boxed{", 32, "certain", False, True)


def probe_spec(trigger: str, model: str = "") -> ProbeSpec:
    """The probe to send for ``trigger`` on ``model`` (a name or path; Qwen3 reads confidence differently)."""
    if trigger == WAIT:
        if "qwen3" in model.lower():
            return ProbeSpec(confidence="geometric", needs_close=True)
        return WAIT_PROBE
    return DENSE_PROBE


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
    answer, answer_tokens = _braced(text, len(logprobs), spec.in_braces)
    if spec.confidence == "certain":
        words = set(re.findall(r"[a-z]+", text.lower()))
        certain = answer is not None and not words.intersection(HESITATION)
        return ProbeResult(request_id, answer, 1.0 if certain else 0.0, len(logprobs))
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


def _braced(text: str, tokens: int, in_braces: bool) -> tuple[str | None, int]:
    """The ``{...}`` content at the start of ``text`` (or, ``in_braces``, up to the first unmatched ``}``) and
    an estimate of the tokens it spans (all of them)."""
    stripped = "{" + text if in_braces else text.lstrip()
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


_WAIT_WORD = re.compile(r"(?<![A-Za-z])wait(?![A-Za-z])", re.IGNORECASE)
_HOLD = 4  # characters kept to see a word boundary on both sides of "wait"


class WaitScanner:
    """Finds every whole word "wait" (any case) in streamed thinking: the DEER trigger.

    :meth:`feed` takes one delta and the tokens generated *before* it and returns ``(tokens, offset)`` for each
    "wait" completed so far: ``offset`` is the character offset of its ``w`` in the thinking, ``tokens`` the
    tokens generated before the delta that carried the ``w`` (so the probe prefix ends before the trigger).
    Invariants: each occurrence is reported once, at the same offset however the text is split; work per
    delta is O(len(delta)) (only a few held characters are scanned again).
    """

    def __init__(self) -> None:
        self._tail = ""  # the last few characters seen, still able to take part in a match
        self._tail_offset = 0  # offset of the tail's first character
        self._tail_tokens: list[int] = []  # tokens before the delta that carried each tail character
        self._reported = -1  # offset of the last reported match

    def feed(self, text: str, tokens_before: int) -> list[tuple[int, int]]:
        if not text:
            return []
        window = self._tail + text
        found: list[tuple[int, int]] = []
        # the pattern only where it can match. Exact: its "w" and "a" match only W/w and A/a, which lower() keeps
        # side by side (its "i" also matches dotted and dotless i, which a check for "wait" would miss)
        if "wa" in window.lower():
            held = len(self._tail)
            for match in _WAIT_WORD.finditer(window):
                start = match.start()
                offset = self._tail_offset + start
                if match.end() >= len(window) or offset <= self._reported or (start == 0 and self._tail_offset):
                    continue  # the next character is not known yet (it may continue the word), or already seen
                found.append((self._tail_tokens[start] if start < held else tokens_before, offset))
                self._reported = offset
        keep = min(len(window), _HOLD + 1)
        self._tail_tokens = (self._tail_tokens + [tokens_before] * min(len(text), keep))[-keep:]
        self._tail_offset += len(window) - keep
        self._tail = window[len(window) - keep :]
        return found

    def flush(self, tokens: int) -> list[tuple[int, int]]:
        """End of thinking: a "wait" that ends the text counts too."""
        found = []
        match = _WAIT_WORD.search(self._tail)
        while match is not None:
            offset = self._tail_offset + match.start()
            if offset > self._reported and match.end() == len(self._tail) and (match.start() or not self._tail_offset):
                found.append((self._tail_tokens[match.start()], offset))
                self._reported = offset
            match = _WAIT_WORD.search(self._tail, match.end())
        self._tail = ""
        return found
