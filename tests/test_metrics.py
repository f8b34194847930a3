"""Metrics: values read back from a fresh registry per test; measured and estimated savings kept apart."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import (
    MIN_STOP_RATIO,
    PRIOR_STOP_RATIO,
    PRIOR_WEIGHT_TOKENS,
    Metrics,
    RequestRecord,
    estimate_tokens_saved,
)

MODEL = "qwen3"
POLICY = "fcs_reflection"
LABELS = {"model": MODEL, "policy": POLICY}

NATURAL = RequestRecord(
    model=MODEL,
    policy=POLICY,
    outcome="natural",
    reason=None,
    prompt_tokens=20,
    thinking_tokens=900,
    answer_tokens=50,
    solutions=3,
    stop_position_tokens=None,
    shadow=False,
    shadow_would_stop=False,
    shadow_stop_tokens=None,
    shadow_agree=None,
    ttft_seconds=0.05,
    latency_seconds=4.0,
)
STOPPED = dataclasses.replace(
    NATURAL,
    outcome="stopped",
    reason="confirmed",
    thinking_tokens=400,
    stop_position_tokens=400,
    solutions=2,
    latency_seconds=2.0,
)
SHADOW = dataclasses.replace(
    NATURAL,
    shadow=True,
    thinking_tokens=1000,
    shadow_would_stop=True,
    shadow_stop_tokens=250,
    shadow_agree=True,
)
ERROR = dataclasses.replace(NATURAL, outcome="server_error", thinking_tokens=10, answer_tokens=0, prompt_tokens=7)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0.0 when the labelled child does not exist yet (prometheus_client returns None)."""
    sample = registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if sample is None else sample


def test_natural_request_counts_tokens_and_no_savings(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(NATURAL)

    assert value(registry, "thinkbrake_requests_total", outcome="natural") == 1
    assert value(registry, "thinkbrake_prompt_tokens_total") == 20
    assert value(registry, "thinkbrake_thinking_tokens_total") == 900
    assert value(registry, "thinkbrake_answer_tokens_total") == 50
    assert value(registry, "thinkbrake_solutions_per_request_sum") == 3
    assert value(registry, "thinkbrake_request_thinking_tokens_bucket", le="1024.0") == 1
    assert value(registry, "thinkbrake_request_thinking_tokens_bucket", le="512.0") == 0
    assert value(registry, "thinkbrake_time_to_first_token_seconds_count") == 1
    assert value(registry, "thinkbrake_e2e_request_latency_seconds_sum") == 4.0
    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 0
    assert value(registry, "thinkbrake_tokens_saved_estimated_total") == 0
    assert value(registry, "thinkbrake_early_stops_total", reason="confirmed") == 0
    assert value(registry, "thinkbrake_shadow_requests_total") == 0


def test_stopped_request_uses_prior_before_any_shadow_data(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(STOPPED)

    assert metrics.stop_ratio(MODEL, POLICY) == PRIOR_STOP_RATIO
    assert value(registry, "thinkbrake_requests_total", outcome="stopped") == 1
    assert value(registry, "thinkbrake_early_stops_total", reason="confirmed") == 1
    assert value(registry, "thinkbrake_stop_position_tokens_sum") == 400
    # f = 0.5: the request would have thought as long again.
    assert value(registry, "thinkbrake_tokens_saved_estimated_total") == 400
    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 0


def test_shadow_request_is_measured_not_estimated(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(SHADOW)

    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 750
    assert value(registry, "thinkbrake_tokens_saved_estimated_total") == 0
    assert value(registry, "thinkbrake_early_stops_total", reason="confirmed") == 0
    assert value(registry, "thinkbrake_requests_total", outcome="natural") == 1
    assert value(registry, "thinkbrake_shadow_requests_total") == 1
    assert value(registry, "thinkbrake_shadow_would_stop_total") == 1
    assert value(registry, "thinkbrake_shadow_thinking_tokens_total") == 1000
    assert value(registry, "thinkbrake_shadow_would_stop_thinking_tokens_total") == 1000
    assert value(registry, "thinkbrake_shadow_stop_ratio_bucket", le="0.3") == 1
    assert value(registry, "thinkbrake_shadow_stop_ratio_bucket", le="0.2") == 0


def test_estimate_learns_the_stop_ratio_from_shadow_requests(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(SHADOW)  # would stop at 250 of 1000 thinking tokens
    expected_ratio = (PRIOR_STOP_RATIO * PRIOR_WEIGHT_TOKENS + 250) / (PRIOR_WEIGHT_TOKENS + 1000)
    assert metrics.stop_ratio(MODEL, POLICY) == pytest.approx(expected_ratio)

    metrics.observe_request(STOPPED)

    expected = 400 * (1 / expected_ratio - 1)
    assert value(registry, "thinkbrake_tokens_saved_estimated_total") == pytest.approx(expected)
    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 750  # unchanged by the stopped request
    # The ratio is per (model, policy): another policy still starts from the prior.
    assert metrics.stop_ratio(MODEL, "first_answer") == PRIOR_STOP_RATIO


def test_ratio_of_sums_reproduces_measured_total_once_prior_is_outweighed() -> None:
    """Applied to the shadow requests themselves, the estimate gives back what was measured."""
    metrics = Metrics(CollectorRegistry())
    shadows = [(300, 1000), (1000, 4000), (50, 200)] * 400
    for stop, thinking in shadows:
        metrics.observe_request(dataclasses.replace(SHADOW, thinking_tokens=thinking, shadow_stop_tokens=stop))
    ratio = metrics.stop_ratio(MODEL, POLICY)
    estimated = sum(estimate_tokens_saved(stop, ratio) for stop, _ in shadows)
    measured = sum(thinking - stop for stop, thinking in shadows)
    assert estimated == pytest.approx(measured, rel=0.01)


def test_stop_ratio_has_a_floor() -> None:
    assert estimate_tokens_saved(100, 0.0) == pytest.approx(100 * (1 / MIN_STOP_RATIO - 1))


def test_agreement_counts(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(SHADOW)  # agrees
    metrics.observe_request(dataclasses.replace(SHADOW, shadow_agree=False))
    metrics.observe_request(dataclasses.replace(SHADOW, shadow_agree=None))  # no answer to compare
    metrics.observe_request(dataclasses.replace(SHADOW, shadow_would_stop=False, shadow_stop_tokens=None))

    assert value(registry, "thinkbrake_shadow_requests_total") == 4
    assert value(registry, "thinkbrake_shadow_would_stop_total") == 3
    assert value(registry, "thinkbrake_shadow_compared_total") == 2
    assert value(registry, "thinkbrake_shadow_agree_total") == 1
    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 3 * 750
    assert value(registry, "thinkbrake_shadow_thinking_tokens_total") == 4000
    assert value(registry, "thinkbrake_shadow_would_stop_thinking_tokens_total") == 3000


def test_shadow_stop_beyond_the_end_saves_nothing(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(dataclasses.replace(SHADOW, shadow_stop_tokens=1200))
    assert value(registry, "thinkbrake_tokens_saved_measured_total") == 0


def test_error_counts_tokens_but_no_distributions(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(ERROR)

    assert value(registry, "thinkbrake_requests_total", outcome="server_error") == 1
    assert value(registry, "thinkbrake_requests_total", outcome="client_error") == 0
    assert value(registry, "thinkbrake_prompt_tokens_total") == 7
    assert value(registry, "thinkbrake_thinking_tokens_total") == 10
    assert value(registry, "thinkbrake_solutions_per_request_count") == 0
    assert value(registry, "thinkbrake_e2e_request_latency_seconds_count") == 0


def test_stop_without_reason_is_labelled_unknown(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request(dataclasses.replace(STOPPED, reason=None, stop_position_tokens=None))
    assert value(registry, "thinkbrake_early_stops_total", reason="unknown") == 1
    assert value(registry, "thinkbrake_stop_position_tokens_sum") == 400  # falls back to thinking_tokens


def test_controller_time_per_token_and_errors(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_controller(0.002, 100, MODEL, POLICY)
    metrics.observe_controller(0.5, 0, MODEL, POLICY)  # no tokens: nothing to divide by, ignored
    metrics.count_controller_error(MODEL, POLICY)

    assert value(registry, "thinkbrake_controller_seconds_per_token_count") == 1
    assert value(registry, "thinkbrake_controller_seconds_per_token_sum") == pytest.approx(2e-5)
    assert value(registry, "thinkbrake_controller_seconds_per_token_bucket", le="3e-05") == 1
    assert value(registry, "thinkbrake_controller_errors_total") == 1


@pytest.mark.parametrize(
    "changes",
    [{"outcome": "aborted"}, {"shadow": True, "outcome": "stopped"}, {"thinking_tokens": -1}],
    ids=["unknown-outcome", "shadow-stopped", "negative-tokens"],
)
def test_record_rejects_impossible_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(NATURAL, **changes)


def test_second_metrics_on_one_registry_is_a_clear_error(registry: CollectorRegistry) -> None:
    Metrics(registry)
    with pytest.raises(ValueError, match="one Metrics per registry"):
        Metrics(registry)


def test_render_is_prometheus_text(metrics: Metrics) -> None:
    metrics.observe_request(STOPPED)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"thinkbrake_requests", "thinkbrake_tokens_saved_estimated", "thinkbrake_stop_position_tokens"} <= names


WORKER = """
import dataclasses, sys
from prometheus_client import CollectorRegistry
sys.path.insert(0, sys.argv[1])
from server.metrics import Metrics
from tests.test_metrics import SHADOW
Metrics(CollectorRegistry()).observe_request(SHADOW)
"""


def test_multiprocess_mode_merges_workers(tmp_path: Path, registry: CollectorRegistry) -> None:
    """Two worker processes write to PROMETHEUS_MULTIPROC_DIR; render() in a third sees the sum."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", WORKER, root], env=env, check=True, timeout=60)

    body, _ = Metrics(registry, multiproc_dir=str(tmp_path)).render()

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    labels = tuple(sorted(LABELS.items()))
    assert samples[("thinkbrake_tokens_saved_measured_total", labels)] == 1500
    assert samples[("thinkbrake_requests_total", tuple(sorted({**LABELS, "outcome": "natural"}.items())))] == 2


def test_series_exist_at_zero_before_their_first_increment(metrics: Metrics, registry: CollectorRegistry) -> None:
    """rate() only sees a first increment if the series was scraped at 0 before: create them up front."""
    assert registry.get_sample_value("thinkbrake_requests_total", {**LABELS, "outcome": "natural"}) is None
    metrics.prepare(MODEL, POLICY)
    for outcome in ("stopped", "natural", "length", "client_error", "server_error"):
        assert registry.get_sample_value("thinkbrake_requests_total", {**LABELS, "outcome": outcome}) == 0
    for reason in ("first_answer", "confirmed", "consistent", "loop", "budget", "max_thinking_tokens", "unknown"):
        assert registry.get_sample_value("thinkbrake_early_stops_total", {**LABELS, "reason": reason}) == 0
    assert registry.get_sample_value("thinkbrake_tokens_saved_estimated_total", LABELS) == 0
    assert registry.get_sample_value("thinkbrake_e2e_request_latency_seconds_count", LABELS) == 0

    metrics.observe_request(NATURAL)  # a new pair is prepared by its first request
    labels = {"model": MODEL, "policy": "first_answer"}
    metrics.observe_request(dataclasses.replace(NATURAL, policy="first_answer"))
    assert registry.get_sample_value("thinkbrake_requests_total", {**labels, "outcome": "server_error"}) == 0
    assert registry.get_sample_value("thinkbrake_requests_total", {**LABELS, "outcome": "natural"}) == 1
