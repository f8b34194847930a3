"""The shared dev traces (``../shared/data/traces``) as the tests read them."""

from __future__ import annotations

import gzip
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import pytest

DEV_PROBES = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "dev-probes.jsonl.gz"


def traces_by_id(ids: Iterable[str], path: pathlib.Path = DEV_PROBES) -> dict[str, dict[str, Any]]:
    """The traces of ``path`` with these ids, by id; skips the test when the file is not there, and fails it when
    an id is missing."""
    if not path.exists():
        pytest.skip(f"dev traces not found at {path}")
    wanted, found = set(ids), {}
    with gzip.open(path, "rt") as lines:
        for line in lines:
            trace = json.loads(line)
            if trace["id"] in wanted:
                found[trace["id"]] = trace
    assert set(found) == wanted
    return found
