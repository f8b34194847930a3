"""The reasoning-trace format of ``../shared/data/README.md`` as a JSON Schema, and a check of a trace against it.

The schema is the README's table: the fields every trace has, their types, and the two probe lists of the probe
traces (``dev-probes``). A probe row has at least the five documented fields; a row may carry more (recordings
add a confidence to dense probes and the trigger), which readers ignore. An answer is null when none could be read
from the probe's text. ``tests/test_recording.py`` checks the schema against the real dev traces and recordings
against it.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_COUNT = {"type": "integer", "minimum": 0}
_ANSWER = {"type": ["string", "null"]}

TRACE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "dataset", "model", "tokenizer", "question", "reference", "thinking", "final", "closed"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "dataset": {"type": "string", "minLength": 1},
        "model": {"type": "string", "minLength": 1},
        "tokenizer": {"type": "string", "minLength": 1},
        "question": {"type": "string"},
        "reference": {"type": "string"},
        "thinking": {"type": "string"},
        "final": {"type": "string"},
        "closed": {"type": "boolean"},
        "level": {"type": ["integer", "null"]},
        "source": {"type": "string"},
        "seed": {"type": ["integer", "null"]},
        "full_correct": {"type": "boolean"},
        "probes": {  # [tokens, offset, answer, certain, out_tokens, ...]
            "type": "array",
            "items": {
                "type": "array",
                "minItems": 5,
                "prefixItems": [_COUNT, _COUNT, _ANSWER, {"type": "boolean"}, _COUNT],
            },
        },
        "wait_probes": {  # [tokens, offset, answer, confidence, out_tokens, ...]
            "type": "array",
            "items": {
                "type": "array",
                "minItems": 5,
                "prefixItems": [_COUNT, _COUNT, _ANSWER, {"type": "number", "minimum": 0, "maximum": 1}, _COUNT],
            },
        },
    },
}


def check_trace(trace: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``trace`` has the format; probe offsets must lie in the
    thinking."""
    jsonschema.validate(trace, TRACE_SCHEMA, cls=jsonschema.Draft202012Validator)
    size = len(trace["thinking"])
    for name in ("probes", "wait_probes"):
        for row in trace.get(name) or ():
            if row[1] > size:
                raise jsonschema.ValidationError(f"{name}: offset {row[1]} past the thinking ({size} characters)")
