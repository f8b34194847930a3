"""The garbage collector of a serving process.

Once started, the process holds tens of thousands of long-lived objects (modules, the app, the tokenizer, the
settings). A full collection walks every one of them (tens of milliseconds), a pause every open stream feels as
inter-token latency. As vLLM's own server does once it has started (``vllm.utils.gc_utils.freeze_gc_heap``), the
objects alive when the backend is ready are collected once and then moved to the permanent generation: collections
while serving walk only what serving made. Only for a serving process (``thinkbrake serve`` and its workers), not
for an app built inside another program.

The youngest generation is then collected every :data:`YOUNG_THRESHOLD` allocations instead of Python's 700. A
request's objects live for its whole stream (seconds), so at 700 each collection walks, and promotes, the objects of
every open stream, and the older generations fill up and are walked too. With the higher threshold most of them are
freed by reference counting before any collection sees them. Timed with a ``gc.callbacks`` hook in the serving
process during ``benchmarks/proxy_overhead.py --probe-traces --token-rate 50 --concurrency 64,256 --modes
direct,default`` (two runs each, 2-core machine): before, about 450 young, 40 middle and 3-4 full collections per
run, 0.6-0.9 s in all, single pauses up to ~100 ms; after, under 0.1 s besides the one collection at start-up
(about 80 ms). Cyclic garbage waits a little longer to be freed (at most 50,000 objects' worth, a few MiB).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

#: allocations between collections of the youngest generation while serving (Python's default: 700)
YOUNG_THRESHOLD = 50_000
#: collections of one generation between collections of the next (Python's defaults: 10, 10)
OLDER_THRESHOLDS = (20, 10)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now, and set the serving thresholds; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: %d objects alive after start-up frozen; thresholds %s", frozen, gc.get_threshold())
    return frozen
