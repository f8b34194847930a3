"""A vLLM v1 logits processor that makes a model emit a scripted token sequence.

Register it at engine construction:

* in process: ``AsyncEngineArgs(..., logits_processors=[ScriptedLogitsProcessor])``
  (or the string ``"server.demo.scripted_logits:ScriptedLogitsProcessor"``);
* OpenAI server: ``python -m vllm.entrypoints.openai.api_server
  --logits-processors server.demo.scripted_logits:ScriptedLogitsProcessor``
  (or ``thinkbrake serve --logits-processors ...``; ``server`` importable).

Switch it on per request with ``SamplingParams.extra_args`` (HTTP: the request
body field ``vllm_xargs``, which vLLM copies verbatim into ``extra_args``):

* ``"script"``: the whole intended output as token ids -- thinking tokens, the
  ``</think>`` id, answer tokens, eos. A list of ints, or (for clients that only
  send scalars) a comma-separated string such as ``"17,4,909,2"``.
* ``"think_end_id"`` (optional): the ``</think>`` id. If the request's *prompt*
  contains it, the request is a continuation after a stop, and the forced
  output is the part of the script after the script's own first ``</think>``
  (answer tokens, eos). A script without ``</think>`` then forces eos at once.
* ``"eos_id"`` (optional): the id forced once the script is exhausted; defaults
  to the model's eos id.
* ``"probe_script"`` (optional): the output of the request's answer probes. The
  server sends a probe with the request's ``extra_args`` plus the marker
  ``"thinkbrake_probe"`` (:data:`server.backend.PROBE_MARKER`); a request with the
  marker is forced to emit ``probe_script`` (then eos) instead of ``script``.
  A probe of a scripted request without ``probe_script`` emits eos at once.

Invariants:

* For a scripted request, at every sampling step exactly one logit of its row
  is finite: the one of ``script[start + n]`` where ``n`` is the number of
  output tokens generated so far and ``start`` is 0, or the index after the
  script's ``</think>`` for a continuation; past the end of the script, eos.
  So any sampling settings (greedy or not) give the scripted stream.
* Rows of requests without ``"script"`` or ``"probe_script"`` are never touched.
* This is the v1 (``vllm.v1.sample.logits_processor``) interface used by the
  V1 model runner, which is what the CPU build runs. vLLM's Model Runner V2
  (the GPU default in 0.32) has a different interface and rejects this class;
  run with ``VLLM_USE_V2_MODEL_RUNNER=0`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from server.backend import PROBE_MARKER

if TYPE_CHECKING:
    from vllm.config import VllmConfig

SCRIPT_KEY = "script"
THINK_END_KEY = "think_end_id"
EOS_KEY = "eos_id"
PROBE_SCRIPT_KEY = "probe_script"


@dataclass(frozen=True)
class ScriptPlan:
    """What to force for one request.

    ``output`` is vLLM's live list of the request's output token ids (it grows
    as the request decodes), so ``len(output)`` is the current position.
    """

    script: tuple[int, ...]
    start: int
    eos_id: int
    output: list[int]

    def next_token(self) -> int:
        """The token to force at this step."""
        position = self.start + len(self.output)
        return self.script[position] if position < len(self.script) else self.eos_id


def parse_token_ids(value: Any, key: str) -> tuple[int, ...]:
    """Token ids from a list of ints (or int-like strings) or a comma-separated string."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ValueError(f"extra_args[{key!r}] must be a list of token ids or 'id,id,...'")
    return tuple(parse_token_id(item, key) for item in value)


def parse_token_id(value: Any, key: str) -> int:
    """One non-negative token id from an int, an integral float or a digit string."""
    if isinstance(value, bool):
        raise ValueError(f"extra_args[{key!r}] must be a token id, not a bool")
    try:
        token_id = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"extra_args[{key!r}] has a non-integer token id {value!r}") from error
    if token_id != value and not isinstance(value, str):
        raise ValueError(f"extra_args[{key!r}] has a non-integer token id {value!r}")
    if token_id < 0:
        raise ValueError(f"extra_args[{key!r}] has a negative token id {value!r}")
    return token_id


def script_start(script: Sequence[int], prompt_ids: Sequence[int] | None, think_end_id: int | None) -> int:
    """Index in ``script`` of the first token to force.

    0 for a fresh request; for a continuation (prompt contains ``think_end_id``)
    the index after the script's first ``think_end_id``, or ``len(script)`` if
    the script has none.
    """
    if think_end_id is None or not prompt_ids or think_end_id not in prompt_ids:
        return 0
    if think_end_id not in script:
        return len(script)
    return list(script).index(think_end_id) + 1


def model_eos_id(vllm_config: VllmConfig) -> int | None:
    """The model's eos id from its HF config (first one if it lists several)."""
    eos = getattr(vllm_config.model_config.hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


class ScriptedLogitsProcessor(LogitsProcessor):
    """Forces each scripted request's next token; see the module docstring."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject malformed ``script`` / ``think_end_id`` / ``eos_id`` at admission."""
        extra_args = sampling_params.extra_args or {}
        if PROBE_SCRIPT_KEY in extra_args:
            parse_token_ids(extra_args[PROBE_SCRIPT_KEY], PROBE_SCRIPT_KEY)
        if SCRIPT_KEY not in extra_args:
            return
        parse_token_ids(extra_args[SCRIPT_KEY], SCRIPT_KEY)
        for key in (THINK_END_KEY, EOS_KEY):
            if extra_args.get(key) is not None:
                parse_token_id(extra_args[key], key)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self._device = device
        self._default_eos_id = model_eos_id(vllm_config)
        self._plans: dict[int, ScriptPlan] = {}

    def is_argmax_invariant(self) -> bool:
        """Forcing a token changes the argmax."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Track added, removed and moved batch rows (vLLM's dict helper)."""
        process_dict_updates(self._plans, batch_update, self._new_plan)

    def _new_plan(
        self,
        params: SamplingParams,
        prompt_ids: list[int] | None,
        output_ids: list[int],
    ) -> ScriptPlan | None:
        """A plan for a newly added request, or None if it has no script."""
        extra_args = params.extra_args or {}
        probe = PROBE_MARKER in extra_args
        if SCRIPT_KEY not in extra_args and not (probe and PROBE_SCRIPT_KEY in extra_args):
            return None
        if probe:
            script = parse_token_ids(extra_args.get(PROBE_SCRIPT_KEY, ()), PROBE_SCRIPT_KEY)
        else:
            script = parse_token_ids(extra_args[SCRIPT_KEY], SCRIPT_KEY)
        think_end = extra_args.get(THINK_END_KEY)
        think_end_id = None if think_end is None else parse_token_id(think_end, THINK_END_KEY)
        eos = extra_args.get(EOS_KEY)
        eos_id = self._default_eos_id if eos is None else parse_token_id(eos, EOS_KEY)
        if eos_id is None:
            raise ValueError("ScriptedLogitsProcessor needs an eos id (model or extra_args)")
        start = 0 if probe else script_start(script, prompt_ids, think_end_id)
        return ScriptPlan(script=script, start=start, eos_id=eos_id, output=output_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask every scripted row to its one forced token (logit 0, rest -inf)."""
        if not self._plans:
            return logits
        rows = [row for row in self._plans if row < logits.shape[0]]
        tokens = [self._plans[row].next_token() for row in rows]
        row_index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        token_index = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        logits[row_index] = float("-inf")
        logits[row_index, token_index] = 0.0
        return logits
