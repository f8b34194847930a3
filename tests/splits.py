"""Ways to split a text into deltas: whole, per character, at every single point, at random points."""

from __future__ import annotations

import random
from collections.abc import Iterator


def every_single_split(text: str) -> Iterator[list[str]]:
    """The text cut once at every possible point (and whole)."""
    yield [text]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def per_character(text: str) -> list[str]:
    return list(text)


def random_splits(text: str, seed: int, pieces: int = 12) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces, max(0, len(text) - 1)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
