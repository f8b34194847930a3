"""The offline rule benchmarks on hand-made data: ``bounds`` of ``benchmarks/probe_rule_search.py`` and the
reference rules of ``benchmarks/probe_reference_rules.py``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def search() -> ModuleType:
    return load("probe_rule_search")


@pytest.fixture(scope="module")
def references() -> ModuleType:
    return load("probe_reference_rules")


def trace(full_ok: bool, waits: list[list[object]], dense: list[list[object]] | None = None) -> dict[str, object]:
    """A cached trace of 1,000 thinking tokens; answers "7" are right, "5" wrong."""
    return {
        "id": "math500/1/M/seed42",
        "dataset": "math500",
        "model": "M",
        "total": 1000,
        "full": "7" if full_ok else "5",
        "full_ok": full_ok,
        "waits": waits,  # [position, tokens, offset, answer, confidence, out_tokens]
        "answers": [],
        "solutions": [],
        "loops": [],
        "dense": dense or [],  # [tokens, offset, answer, certain, out_tokens]
        "graded": {"7": True, "5": False},
    }


def test_confidence_bins(search: ModuleType) -> None:
    assert search.confidence_bin(0.0) == "none"
    assert search.confidence_bin(0.3) == "0.0-0.5"
    assert search.confidence_bin(0.95) == "0.9-0.99"
    assert search.confidence_bin(0.9995) == ">=0.999"


def test_no_regret_stop_waits_for_the_last_probe_that_would_change_the_outcome(search: ModuleType) -> None:
    right = trace(
        True,
        [
            [100, 99, 400, "7", 0.95, 4],  # right, but a later probe is wrong: stopping here is luck
            [200, 199, 800, "5", 0.999, 4],  # the last probe that would change the outcome
            [300, 299, 1200, "7", 0.5, 4],
            [400, 399, 1600, "7", 0.9999, 4],
        ],
    )
    assert search.no_regret_stop(right, 0.0) == 305
    assert search.no_regret_stop(right, 0.9) == 405
    assert search.no_regret_stop(right, 0.99999) == 1000  # no probe that sure: the trace runs to its end
    wrong = trace(False, [[100, 99, 400, "5", 0.2, 4], [300, 299, 1200, "7", 0.9, 4], [500, 499, 2000, "5", 0.3, 4]])
    assert search.no_regret_stop(wrong, 0.0) == 505  # a right answer at 300 would change a wrong trace's outcome


def test_bounds_prints_precision_by_confidence_and_no_regret_savings(
    search: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    traces = [
        trace(True, [[100, 99, 400, "5", 0.95, 4], [200, 199, 800, "7", 0.95, 4]], dense=[[64, 200, "7", True, 5]]),
        trace(False, [[100, 99, 400, "5", 0.0, 4]], dense=[[64, 200, "5", True, 5]]),
    ]
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps(traces))
    assert search.bounds(argparse.Namespace(cache=str(cache))) == 0
    out = capsys.readouterr().out
    assert "0.9-0.99" in out and "50.0% right" in out  # one of the right trace's two 0.9-0.99 probes is right
    # no-regret stops: 205 and 105 of 2 x 1000 tokens at >= 0.0 (84.5%), 205 and the end at >= 0.9 (39.75%);
    # the first right dense probe: 64 on the right trace, none on the wrong one (46.8%)
    assert ">=0.0:  84.5%" in out and ">=0.9:  39.8%" in out and "first right dense probe:  46.8%" in out


def test_reference_rules_never_stop_on_an_empty_answer(references: ModuleType) -> None:
    """A probe whose boxed answer did not close within its token limit gave nothing to submit."""
    waits = [[100, 0, "", 0.9999, 20], [200, 0, "", 0.9999, 20], [300, 0, "7", 0.998, 4], [400, 0, "7", 0.9995, 4]]
    trace = {"wait_probes": waits, "probes": [[64 * i, 0, "", True, 32] for i in range(1, 9)]}
    assert references.first_over(trace, 0.995) == (305, "7", 44, 3)
    assert references.RULES["deer>0.999"](trace) == (405, "7", 48, 4)
    assert references.two_agree(trace, 0.95) == (405, "7", 48, 4)  # the two empty answers do not agree
    assert references.dynasor(trace, 3)[0] is None  # eight certain empty dense answers: no stop
