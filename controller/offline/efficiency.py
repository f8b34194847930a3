"""Efficiency metrics of one trace, with the definitions of arXiv 2412.21187.

A trace's solutions come from the detector's ``solution`` events. Solution ``i`` owns the tokens from its
start (the boundary before it; solution 0 starts at token 0) up to the start of solution ``i + 1`` (the last
one owns the rest of the trace).

- outcome efficiency = tokens up to the end of the first correct solution / all tokens (correct traces only).
- process efficiency = tokens of solutions that bring a new approach / all tokens.

"New approach" is approximated from the text: solution ``i`` is new when fewer than half of its word
trigrams already occur in earlier solutions, or when it reaches an answer no earlier solution reached.
Solution 0 is always new. A re-check that repeats a computation shares most trigrams with it and is not new.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NEW_APPROACH_MAX_OVERLAP = 0.5
_WORD = re.compile(r"\w+|[=+\-*/^]")


@dataclass(frozen=True)
class SolutionSpan:
    """One solution: its answer key, where it starts (tokens, chars) and where its answer was reached."""

    key: str
    start_tokens: int
    start_offset: int
    answer_tokens: int


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = [word.lower() for word in _WORD.findall(text)]
    return {tuple(words[index : index + 3]) for index in range(len(words) - 2)}


def new_approach_flags(text: str, spans: Sequence[SolutionSpan]) -> list[bool]:
    """For each solution, whether it brings a new approach (see the module docstring)."""
    flags: list[bool] = []
    seen_grams: set[tuple[str, ...]] = set()
    seen_keys: set[str] = set()
    for index, span in enumerate(spans):
        start = 0 if index == 0 else span.start_offset
        end = spans[index + 1].start_offset if index + 1 < len(spans) else len(text)
        grams = trigrams(text[start:end])
        overlap = len(grams & seen_grams) / len(grams) if grams else 1.0
        flags.append(index == 0 or overlap < NEW_APPROACH_MAX_OVERLAP or span.key not in seen_keys)
        seen_grams |= grams
        seen_keys.add(span.key)
    return flags


def process_efficiency(text: str, spans: Sequence[SolutionSpan], total_tokens: int) -> float:
    """Share of tokens spent in solutions that bring a new approach (1.0 for a trace without solutions)."""
    if not spans or total_tokens <= 0:
        return 1.0
    flags = new_approach_flags(text, spans)
    useful = 0
    for index, span in enumerate(spans):
        start = 0 if index == 0 else span.start_tokens
        end = spans[index + 1].start_tokens if index + 1 < len(spans) else total_tokens
        if flags[index]:
            useful += max(0, end - start)
    return useful / total_tokens


def outcome_efficiency(first_correct_tokens: int | None, total_tokens: int) -> float | None:
    """Tokens up to the first correct solution / all tokens; None when no solution was correct."""
    if first_correct_tokens is None or total_tokens <= 0:
        return None
    return min(1.0, first_correct_tokens / total_tokens)
