"""Mapping a function over many items, in this process or in a pool of worker processes, with a progress bar.

Invariant: the results come back in the order of the items, whatever ``jobs`` is; each process (this one with
``jobs <= 1``) runs ``initializer(*initargs)`` once before its first item.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_with_progress(
    function: Callable[[T], R],
    items: Sequence[T],
    jobs: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
    desc: str,
    progress: bool = True,
    chunksize: int = 4,
) -> list[R]:
    """``[function(item) for item in items]`` in ``jobs`` processes, a ``desc`` progress bar on stderr."""
    from tqdm import tqdm

    results: list[R] = []
    with tqdm(total=len(items), desc=desc, unit="trace", file=sys.stderr, disable=not progress) as bar:
        if jobs <= 1:
            initializer(*initargs)
            for item in items:
                results.append(function(item))
                bar.update()
        else:
            with ProcessPoolExecutor(jobs, initializer=initializer, initargs=initargs) as pool:
                for result in pool.map(function, items, chunksize=chunksize):
                    results.append(result)
                    bar.update()
    return results
