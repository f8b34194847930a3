"""The server's vocabularies, each defined once: how a stop is finalized, why a probing choice ran text-only, and
why a recorded trace was dropped.

Stop reasons are the controller's (:mod:`controller.stop_reasons`); metric outcomes are in :mod:`server.metrics`.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: after a stop: the model writes its answer from the same token ids (``model``), a boxed answer is written from
#: the detected one (``answer``), or the response ends with the thinking (``none``)
Finalize = Literal["model", "answer", "none"]
FINALIZE_MODES: Final[tuple[str, ...]] = get_args(Finalize)

#: why a choice of a probing policy ran text-only (the ``reason`` label of ``thinkbrake_probe_fallbacks_total``)
NO_PROBE_METHOD: Final = "unsupported"  # the backend cannot run answer probes
NO_TOKEN_IDS: Final = "no_token_ids"  # the backend returns no prompt or generated token ids
REJECTED: Final = "rejected"  # the backend refused a token-id probe request
REPLICA_LOST: Final = "replica_lost"  # the upstream replica holding the choice's prefix cannot be reached
PROBE_FALLBACK_REASONS: Final = (NO_PROBE_METHOD, NO_TOKEN_IDS, REJECTED, REPLICA_LOST)
#: the human-readable form of each (the ``thinkbrake.probes.fallback`` field)
FALLBACK_TEXT: Final = {
    NO_PROBE_METHOD: "the backend cannot run answer probes",
    NO_TOKEN_IDS: "the backend returns no token ids (a probe needs a token-id prompt)",
    REJECTED: "the backend rejected a token-id probe request",
    REPLICA_LOST: "the upstream replica holding this choice's prefix cache cannot be reached",
}

#: why a recorded trace was not written (the ``reason`` label of ``thinkbrake_recording_dropped_traces_total``)
RECORDING_QUEUE_FULL: Final = "queue_full"  # the writer's queue was full
RECORDING_WRITE_ERROR: Final = "write_error"  # the file could not be opened or written
RECORDING_DROP_REASONS: Final = (RECORDING_QUEUE_FULL, RECORDING_WRITE_ERROR)
