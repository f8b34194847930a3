"""Prometheus metrics for thinkbrake: what the brake saved, and whether answers stayed the same.

One :class:`Metrics` per registry. The server calls :meth:`Metrics.observe_request` once per choice when the
choice ends, :meth:`Metrics.observe_controller` for controller work, and serves :meth:`Metrics.render` on
``GET /metrics``. With ``registry=None`` the metrics live in prometheus_client's default ``REGISTRY``, where the
embedded vLLM engine registers its own ``vllm:`` metrics, so both appear on the same ``/metrics``.

Names carry units (``_total``, ``_tokens``, ``_seconds``, ``_ratio``); labels are bounded: ``model``, ``policy``,
``outcome`` (one of :data:`OUTCOMES`) and ``reason`` (the stop policy's reason), never request ids.

Tokens saved: measured and estimated are separate metrics and are never added together.

* **Measured** (``thinkbrake_tokens_saved_measured_total``), from shadow requests only. A shadow request is not
  stopped; the controller records where it would have stopped. Per shadow request that would have stopped::

      measured = max(0, thinking_tokens - shadow_stop_tokens)

  These tokens were generated (the request ran on); they are what the brake *would* have saved on the sample.
  If the shadow request hit its length limit, the natural end is unknown and the value is a lower bound.
* **Estimated** (``thinkbrake_tokens_saved_estimated_total``), for requests actually stopped early. Their natural
  length is never observed, so it is estimated from the stop ratio measured on shadow requests of the same
  ``(model, policy)``::

      f = (PRIOR_STOP_RATIO * PRIOR_WEIGHT_TOKENS + sum(shadow_stop_tokens))
          / (PRIOR_WEIGHT_TOKENS + sum(thinking_tokens))        # over shadow requests that would have stopped
      f = max(f, MIN_STOP_RATIO)
      estimated = thinking_at_stop * (1 / f - 1)

  ``thinking_at_stop`` is ``stop_position_tokens`` (or ``thinking_tokens`` if absent). The prior
  (``PRIOR_STOP_RATIO = 0.5`` worth ``PRIOR_WEIGHT_TOKENS = 4096`` thinking tokens: "a stop lands half way") is
  outweighed once a few shadow requests have been seen. ``f`` is a ratio of sums, so applying the estimate to the
  shadow requests themselves reproduces their measured total. ``f`` lives in this process: each worker in
  multiprocess mode learns it from the shadow requests it served. ``MIN_STOP_RATIO = 0.05`` caps an estimate at
  19 times the thinking at the stop.

Answer probes (see :mod:`server.probing`): ``thinkbrake_probes_total`` (sent), ``thinkbrake_probe_tokens_total``
(tokens the probes decoded: real engine work on top of the main decode), ``thinkbrake_probe_cached_tokens_total``
(probe prompt tokens the prefix cache served) over ``thinkbrake_probe_reported_prompt_tokens_total`` (the prompt
tokens of the probes whose backend reports cache hits: the probe cache hit ratio), ``thinkbrake_probe_errors_total``, the latency histogram
``thinkbrake_probe_latency_seconds``, and ``thinkbrake_probe_fallbacks_total{reason}`` (choices of a probing policy
that ran text-only because the backend cannot probe). Both savings are **net of the choice's own probe tokens**
(``RequestRecord.probe_tokens``, floored at 0): a stop that cost more in probes than it saved counts as 0 saved.
Probe tokens of choices that did not stop are not in the savings; they are in ``thinkbrake_probe_tokens_total``.

Agreement: a shadow request that would have stopped is *compared* when both the answer at the would-be stop and
the final answer could be extracted (``shadow_agree`` is not None); ``thinkbrake_shadow_agree_total`` over
``thinkbrake_shadow_compared_total`` is the agreement ratio.

Recording (``serve --record``): ``thinkbrake_recorded_traces_total`` counts traces written,
``thinkbrake_recording_dropped_traces_total{reason}`` traces dropped (``queue_full``: the writer lagged;
``write_error``: the file could not be written). The recording's own probes count in the probe metrics above.

Series of a ``(model, policy)`` pair are created at 0 when its first request ends, or earlier with
:meth:`Metrics.prepare` (call it at startup for the served model and default policy): ``rate()`` only sees an
increment if Prometheus scraped the series before it.

Errors count in ``requests_total`` as ``outcome="client_error"`` (the request was refused as bad, a 4xx, or the
client went away) or ``outcome="server_error"`` (the backend or thinkbrake failed: what the error-rate alert reads),
and in the token counters (the tokens were generated), but not in the per-request histograms or the savings.

Several uvicorn workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory *before* the process
starts (prometheus_client picks its value storage when it is imported). Every worker then writes its samples
there and :meth:`Metrics.render` merges all workers with ``MultiProcessCollector``. Wipe the directory on each
deployment start. Only counters and histograms are used, so no gauge aggregation mode is needed. Without the
variable, run one worker per process (scale with more processes or replicas behind a load balancer).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from controller.stop_reasons import STOP_REASONS
from server.vocabulary import PROBE_FALLBACK_REASONS, RECORDING_DROP_REASONS

OUTCOMES: Final = frozenset({"stopped", "natural", "length", "client_error", "server_error"})
#: the outcomes of a choice that ended in an error (see :func:`server.choice.error_outcome`)
ERROR_OUTCOMES: Final = frozenset({"client_error", "server_error"})
PRIOR_STOP_RATIO: Final = 0.5
PRIOR_WEIGHT_TOKENS: Final = 4096
MIN_STOP_RATIO: Final = 0.05
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Reason label for a stop whose record carries no reason.
UNKNOWN_REASON: Final = "unknown"

SOLUTION_BUCKETS: Final = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)
TOKEN_BUCKETS: Final = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CONTROLLER_BUCKETS: Final = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROBE_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one choice of one request, reported once when the choice ends.

    Invariants (checked): ``outcome`` is one of :data:`OUTCOMES`; token counts are >= 0; a shadow request is never
    ``stopped``. ``shadow_stop_tokens`` and ``shadow_agree`` are only read when ``shadow and shadow_would_stop``.
    """

    model: str
    policy: str
    outcome: str
    reason: str | None
    prompt_tokens: int
    thinking_tokens: int
    answer_tokens: int
    solutions: int
    stop_position_tokens: int | None
    shadow: bool
    shadow_would_stop: bool
    shadow_stop_tokens: int | None
    shadow_agree: bool | None
    ttft_seconds: float | None
    latency_seconds: float
    probe_tokens: int = 0
    probe_fallback: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {self.outcome!r}")
        if self.shadow and self.outcome == "stopped":
            raise ValueError("a shadow request is never stopped; its outcome is natural, length or error")
        counts = (self.prompt_tokens, self.thinking_tokens, self.answer_tokens, self.solutions, self.probe_tokens)
        if min(counts) < 0 or min(self.stop_position_tokens or 0, self.shadow_stop_tokens or 0) < 0:
            raise ValueError("token counts and solutions must be >= 0")
        if self.probe_fallback is not None and self.probe_fallback not in PROBE_FALLBACK_REASONS:
            raise ValueError(f"probe_fallback must be one of {PROBE_FALLBACK_REASONS}, got {self.probe_fallback!r}")


@dataclass
class _StopRatio:
    """Running sums for the estimate's stop ratio of one (model, policy): shadow requests that would have stopped."""

    stop_tokens: int = 0
    thinking_tokens: int = 0

    def ratio(self) -> float:
        weighted = PRIOR_STOP_RATIO * PRIOR_WEIGHT_TOKENS + self.stop_tokens
        return max(MIN_STOP_RATIO, weighted / (PRIOR_WEIGHT_TOKENS + self.thinking_tokens))


def estimate_tokens_saved(thinking_at_stop: int, stop_ratio: float) -> float:
    """Thinking tokens a stopped request would still have generated: ``thinking_at_stop * (1/f - 1)``."""
    return thinking_at_stop * (1.0 / max(stop_ratio, MIN_STOP_RATIO) - 1.0)


class Collectors:
    """thinkbrake's Prometheus collectors on one registry (labels ``model``, ``policy`` and, where named, one more)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        counter, histogram = self._counter, self._histogram
        self.requests = counter("thinkbrake_requests", "Finished choices by outcome.", "outcome")
        self.prompt_tokens = counter("thinkbrake_prompt_tokens", "Prompt tokens of finished choices.")
        self.thinking_tokens = counter("thinkbrake_thinking_tokens", "Thinking tokens generated.")
        self.answer_tokens = counter("thinkbrake_answer_tokens", "Answer (content) tokens generated.")
        self.early_stops = counter("thinkbrake_early_stops", "Choices whose thinking was stopped early.", "reason")
        self.saved_measured = counter(
            "thinkbrake_tokens_saved_measured",
            "MEASURED on shadow requests: thinking tokens generated after the point where the brake would have stopped.",
        )
        self.saved_estimated = counter(
            "thinkbrake_tokens_saved_estimated",
            "ESTIMATED for stopped requests: thinking_at_stop * (1/f - 1), f = stop ratio measured on shadow requests.",
        )
        self.shadow_requests = counter("thinkbrake_shadow_requests", "Finished shadow choices (not stopped).")
        self.shadow_thinking = counter("thinkbrake_shadow_thinking_tokens", "Thinking tokens of shadow choices.")
        self.shadow_would_stop = counter(
            "thinkbrake_shadow_would_stop", "Shadow choices where the brake would have stopped."
        )
        self.shadow_would_stop_thinking = counter(
            "thinkbrake_shadow_would_stop_thinking_tokens",
            "Thinking tokens of shadow choices where the brake would have stopped (denominator of the stop ratio).",
        )
        self.shadow_compared = counter(
            "thinkbrake_shadow_compared", "Would-stop shadow choices whose answer at the stop was compared."
        )
        self.shadow_agree = counter(
            "thinkbrake_shadow_agree", "Compared shadow choices whose answer at the stop equals the final answer."
        )
        self.controller_errors = counter("thinkbrake_controller_errors", "Controller failures (request continued).")
        self.probes = counter("thinkbrake_probes", "Answer probes sent.")
        self.probe_tokens = counter(
            "thinkbrake_probe_tokens", "Tokens decoded by answer probes (engine work on top of the main decode)."
        )
        self.probe_cached_tokens = counter(
            "thinkbrake_probe_cached_tokens", "Prompt tokens of answer probes served from the prefix cache."
        )
        self.probe_reported_prompt_tokens = counter(
            "thinkbrake_probe_reported_prompt_tokens",
            "Prompt tokens of answer probes whose backend reported its prefix-cache hits (the cache hit ratio is "
            "thinkbrake_probe_cached_tokens_total over this).",
        )
        self.probe_errors = counter("thinkbrake_probe_errors", "Answer probes that failed or were rejected.")
        self.probe_fallbacks = counter(
            "thinkbrake_probe_fallbacks",
            "Choices of a probing policy that ran text-only because the backend cannot probe.",
            "reason",
        )
        self.recorded = counter("thinkbrake_recorded_traces", "Choices recorded: traces written to the --record files.")
        self.recording_dropped = counter(
            "thinkbrake_recording_dropped_traces", "Recorded choices dropped instead of written.", "reason"
        )
        self.probe_latency = histogram(
            "thinkbrake_probe_latency_seconds", "Time from sending an answer probe to its answer.", PROBE_BUCKETS
        )
        self.solutions = histogram("thinkbrake_solutions_per_request", "Solutions found per choice.", SOLUTION_BUCKETS)
        self.thinking_per_request = histogram(
            "thinkbrake_request_thinking_tokens", "Thinking tokens generated per choice.", TOKEN_BUCKETS
        )
        self.stop_position = histogram(
            "thinkbrake_stop_position_tokens", "Thinking tokens at an early stop.", TOKEN_BUCKETS
        )
        self.shadow_stop_ratio = histogram(
            "thinkbrake_shadow_stop_ratio",
            "Would-be stop position / thinking tokens, per shadow choice.",
            RATIO_BUCKETS,
        )
        self.controller_seconds = histogram(
            "thinkbrake_controller_seconds_per_token", "Controller time per generated token.", CONTROLLER_BUCKETS
        )
        self.ttft = histogram("thinkbrake_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.latency = histogram(
            "thinkbrake_e2e_request_latency_seconds", "End-to-end latency of a choice.", LATENCY_BUCKETS
        )

    def _counter(self, name: str, documentation: str, *extra_labels: str) -> Counter:
        return Counter(name, documentation, ("model", "policy", *extra_labels), registry=self._registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, documentation, ("model", "policy"), buckets=buckets, registry=self._registry)

    def per_pair(self) -> tuple[Counter | Histogram, ...]:
        """The collectors labelled by ``(model, policy)`` alone."""
        return (
            self.prompt_tokens, self.thinking_tokens, self.answer_tokens, self.saved_measured, self.saved_estimated,
            self.shadow_requests, self.shadow_thinking, self.shadow_would_stop, self.shadow_would_stop_thinking,
            self.shadow_compared, self.shadow_agree, self.controller_errors, self.solutions, self.thinking_per_request,
            self.stop_position, self.shadow_stop_ratio, self.controller_seconds, self.ttft, self.latency,
            self.probes, self.probe_tokens, self.probe_cached_tokens, self.probe_reported_prompt_tokens, self.probe_errors, self.probe_latency,
            self.recorded,
        )  # fmt: skip


class Metrics:
    """thinkbrake's Prometheus collectors on one registry, and the estimator state behind the estimated savings."""

    def __init__(self, registry: CollectorRegistry | None = None, multiproc_dir: str | None = None) -> None:
        """``registry=None`` uses the default REGISTRY; ``multiproc_dir`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``."""
        self._registry = REGISTRY if registry is None else registry
        self._multiproc_dir = multiproc_dir if multiproc_dir is not None else os.environ.get(MULTIPROC_ENV) or None
        self._stop_ratios: dict[tuple[str, str], _StopRatio] = {}
        self._prepared: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._controller_children: dict[tuple[str, str], Histogram] = {}
        try:
            self._c = Collectors(self._registry)
        except ValueError as error:  # prometheus_client: "Duplicated timeseries in CollectorRegistry"
            raise ValueError(
                f"thinkbrake metrics already registered on this registry ({error}); "
                "create one Metrics per registry, or pass a fresh CollectorRegistry"
            ) from error

    def prepare(self, model: str, policy: str) -> None:
        """Create every series of ``(model, policy)`` at 0 (idempotent).

        Prometheus' ``rate()`` and ``increase()`` see a counter's first increment only if the series existed, at 0,
        in an earlier scrape. Call this at startup for the served model and default policy; the other series of a
        pair are created when its first request ends, so e.g. its first error or first ``loop`` stop still counts.
        """
        labels = (model, policy)
        with self._lock:
            if labels in self._prepared:
                return
            self._prepared.add(labels)
        for outcome in sorted(OUTCOMES):
            self._c.requests.labels(*labels, outcome)
        for reason in (*STOP_REASONS, UNKNOWN_REASON):
            self._c.early_stops.labels(*labels, reason)
        for reason in PROBE_FALLBACK_REASONS:
            self._c.probe_fallbacks.labels(*labels, reason)
        for reason in RECORDING_DROP_REASONS:
            self._c.recording_dropped.labels(*labels, reason)
        for collector in self._c.per_pair():
            collector.labels(*labels)

    def observe_request(self, record: RequestRecord) -> None:
        """Count one finished choice. Call exactly once per choice, at its end."""
        labels = (record.model, record.policy)
        self.prepare(*labels)
        self._c.requests.labels(*labels, record.outcome).inc()
        self._c.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        self._c.thinking_tokens.labels(*labels).inc(record.thinking_tokens)
        self._c.answer_tokens.labels(*labels).inc(record.answer_tokens)
        if record.probe_fallback is not None:
            self._c.probe_fallbacks.labels(*labels, record.probe_fallback).inc()
        if record.outcome in ERROR_OUTCOMES:
            return
        self._c.solutions.labels(*labels).observe(record.solutions)
        self._c.thinking_per_request.labels(*labels).observe(record.thinking_tokens)
        if record.ttft_seconds is not None:
            self._c.ttft.labels(*labels).observe(record.ttft_seconds)
        self._c.latency.labels(*labels).observe(record.latency_seconds)
        if record.outcome == "stopped":
            self._observe_stop(record)
        if record.shadow:
            self._observe_shadow(record)

    def _observe_stop(self, record: RequestRecord) -> None:
        labels = (record.model, record.policy)
        at_stop = record.stop_position_tokens if record.stop_position_tokens is not None else record.thinking_tokens
        self._c.early_stops.labels(*labels, record.reason or UNKNOWN_REASON).inc()
        self._c.stop_position.labels(*labels).observe(at_stop)
        estimate = estimate_tokens_saved(at_stop, self.stop_ratio(*labels))
        self._c.saved_estimated.labels(*labels).inc(max(0.0, estimate - record.probe_tokens))

    def _observe_shadow(self, record: RequestRecord) -> None:
        labels = (record.model, record.policy)
        self._c.shadow_requests.labels(*labels).inc()
        self._c.shadow_thinking.labels(*labels).inc(record.thinking_tokens)
        if not record.shadow_would_stop or record.shadow_stop_tokens is None:
            return
        stop = min(record.shadow_stop_tokens, record.thinking_tokens)
        self._c.shadow_would_stop.labels(*labels).inc()
        self._c.shadow_would_stop_thinking.labels(*labels).inc(record.thinking_tokens)
        self._c.saved_measured.labels(*labels).inc(max(0, record.thinking_tokens - stop - record.probe_tokens))
        if record.thinking_tokens > 0:
            self._c.shadow_stop_ratio.labels(*labels).observe(stop / record.thinking_tokens)
        with self._lock:
            sums = self._stop_ratios.setdefault(labels, _StopRatio())
            sums.stop_tokens += stop
            sums.thinking_tokens += record.thinking_tokens
        if record.shadow_agree is not None:
            self._c.shadow_compared.labels(*labels).inc()
            if record.shadow_agree:
                self._c.shadow_agree.labels(*labels).inc()

    def stop_ratio(self, model: str, policy: str) -> float:
        """The ``f`` of the savings estimate for ``(model, policy)``: prior blended with this process's shadow data."""
        with self._lock:
            return self._stop_ratios.get((model, policy), _StopRatio()).ratio()

    def observe_controller(self, seconds: float, tokens: int, model: str, policy: str) -> None:
        """Record controller time spent on ``tokens`` generated tokens (ignored when ``tokens`` is 0). Called for
        every delta, so the pair's histogram child is looked up once and kept (series are never removed)."""
        child = self._controller_children.get((model, policy))
        if child is None:
            self.prepare(model, policy)
            child = self._controller_children[(model, policy)] = self._c.controller_seconds.labels(model, policy)
        if tokens > 0:
            child.observe(seconds / tokens)

    def count_probe(self, model: str, policy: str) -> None:
        """One answer probe sent."""
        self.prepare(model, policy)
        self._c.probes.labels(model, policy).inc()

    def observe_probe(
        self, model: str, policy: str, seconds: float, tokens: int, cached_tokens: int | None, prompt_tokens: int = 0
    ) -> None:
        """One answer probe answered after ``seconds``, having decoded ``tokens``: ``cached_tokens`` of its
        ``prompt_tokens`` served from the prefix cache (None when the backend does not say; such a probe counts in
        neither side of the hit ratio)."""
        self.prepare(model, policy)
        self._c.probe_latency.labels(model, policy).observe(seconds)
        self._c.probe_tokens.labels(model, policy).inc(tokens)
        if cached_tokens is not None:
            self._c.probe_cached_tokens.labels(model, policy).inc(cached_tokens)
            self._c.probe_reported_prompt_tokens.labels(model, policy).inc(max(prompt_tokens, cached_tokens))

    def count_probe_error(self, model: str, policy: str) -> None:
        self.prepare(model, policy)
        self._c.probe_errors.labels(model, policy).inc()

    def count_controller_error(self, model: str, policy: str) -> None:
        self.prepare(model, policy)
        self._c.controller_errors.labels(model, policy).inc()

    def count_recorded(self, model: str, policy: str) -> None:
        """One recorded trace written (any thread)."""
        self.prepare(model, policy)
        self._c.recorded.labels(model, policy).inc()

    def count_recording_dropped(self, model: str, policy: str, reason: str) -> None:
        """One recorded trace dropped for ``reason`` (one of ``RECORDING_DROP_REASONS``; any thread)."""
        self.prepare(model, policy)
        self._c.recording_dropped.labels(model, policy, reason).inc()

    def render(self) -> tuple[bytes, str]:
        """Body and content type for ``GET /metrics``; merges all workers' files in multiprocess mode."""
        if self._multiproc_dir is None:
            return generate_latest(self._registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
