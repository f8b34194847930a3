"""Read vLLM's own token counters, in process or from a server's ``/metrics``.

What the counters mean (vLLM 0.32, V1 engine):

* ``vllm:generation_tokens_total`` (Prometheus counter, labels ``model_name``
  and ``engine``) is incremented by the front end's output processor for every
  token the engine core returns for a *live* request. It therefore counts the
  tokens the engine decoded and delivered; tokens decoded after an abort
  reached the front end are dropped and not counted.
* It exists only with stats on: ``AsyncEngineArgs(disable_log_stats=False)``
  in process (it lives in ``prometheus_client.REGISTRY`` of the process that
  owns the ``AsyncLLM``), and by default in the OpenAI server (``GET /metrics``).
* It is updated in the same output-handler iteration that queues the outputs,
  before the consumer sees them, but other tasks may still be running; use
  :func:`wait_for_counter` when an exact value is expected.
* Building a new engine in the same process unregisters and recreates all
  ``vllm:`` collectors, so the counter restarts at 0; compare deltas.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
PROMPT_TOKENS_CACHED = "vllm:prompt_tokens_cached_total"


def counter_value(name: str = GENERATION_TOKENS, registry: CollectorRegistry = REGISTRY) -> float:
    """Sum of sample ``name`` over all label sets in ``registry`` (0 if absent)."""
    return sum(sample.value for family in registry.collect() for sample in family.samples if sample.name == name)


def metrics_text_value(text: str, name: str = GENERATION_TOKENS) -> float:
    """Sum of sample ``name`` over all label sets in Prometheus exposition ``text``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def wait_for_counter(
    minimum: float,
    name: str = GENERATION_TOKENS,
    timeout: float = 60.0,
    registry: CollectorRegistry = REGISTRY,
) -> float:
    """Poll until the in-process counter reaches ``minimum``; return its value.

    Returns the last value seen if ``timeout`` seconds pass first (the caller
    asserts on it), so a wrong count fails with a useful number.
    """
    deadline = time.monotonic() + timeout
    value = counter_value(name, registry)
    while value < minimum and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        value = counter_value(name, registry)
    return value
