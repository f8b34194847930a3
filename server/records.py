"""The one metrics record of a finished choice (:meth:`server.metrics.Metrics.observe_request`).

Invariant: recording never raises into the response (a failure is logged).
"""

from __future__ import annotations

import logging
import time

from controller.session import ThinkingController
from server.events import ChoiceResult
from server.metrics import Metrics, RequestRecord
from server.probing import ProbeStats

log = logging.getLogger(__name__)


def record_choice(
    metrics: Metrics, model: str, controller: ThinkingController, result: ChoiceResult, outcome: str,
    timing: tuple[float, float | None], probes: ProbeStats,
) -> None:  # fmt: skip
    """Count the choice; ``timing``: when it started and when its first token left (None: none did)."""
    policy = result.policy
    if controller.error:
        metrics.count_controller_error(model, policy)
    decision, would = result.decision, result.shadow_decision
    started, first = timing
    try:
        metrics.observe_request(
            RequestRecord(
                model=model,
                policy=policy,
                outcome=outcome,
                reason=decision.reason if decision else None,
                prompt_tokens=result.prompt_tokens,
                thinking_tokens=controller.thinking_tokens,
                answer_tokens=controller.answer_tokens,
                solutions=max(controller.solutions, decision.solutions if decision else 0),
                stop_position_tokens=decision.tokens if decision else None,
                shadow=result.shadow,
                shadow_would_stop=would is not None,
                shadow_stop_tokens=would.tokens if would else None,
                shadow_agree=result.shadow_agree,
                ttft_seconds=None if first is None else first - started,
                latency_seconds=time.perf_counter() - started,
                probe_tokens=probes.tokens,
                probe_fallback=probes.fallback,
            )
        )
    except Exception:  # noqa: BLE001 - metrics must never break a response
        log.exception("recording request metrics failed")
