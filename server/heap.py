"""The garbage collector of a serving process.

Once started, the process holds tens of thousands of long-lived objects (modules, the app, the tokenizer, the
settings). A full collection walks every one of them (tens of milliseconds), a pause every open stream feels as
inter-token latency. As vLLM's own server does once it has started (``vllm.utils.gc_utils.freeze_gc_heap``), the
objects alive when the backend is ready are collected once and then moved to the permanent generation: collections
while serving walk only what serving made. Only for a serving process (``thinkbrake serve`` and its workers), not
for an app built inside another program.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: %d objects alive after start-up frozen", frozen)
    return frozen
