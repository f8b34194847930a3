"""`thinkbrake replay` end to end on a few real traces, and the efficiency definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.offline.efficiency import SolutionSpan, new_approach_flags, outcome_efficiency, process_efficiency
from server.cli import main
from tests.test_detector import DEV_TRACES


def test_replay_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not DEV_TRACES.exists():
        pytest.skip(f"dev traces not found at {DEV_TRACES}")
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    code = main(
        ["replay", str(DEV_TRACES), "--policy", "fcs_reflection", "--policy", "off", "--policy", "budget",
         "--policy-arg", "budget.max_thinking_tokens=500", "--limit", "6", "--jobs", "1",
         "--json", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "| ALL | fcs_reflection | 6 |" in table and "| ALL | off | 6 |" in table
    report = json.loads(out.read_text())
    total = report["groups"]["ALL"]
    assert total["off"]["saved"] == 0.0 and total["off"]["acc_stop"] == total["off"]["acc_full"]
    assert total["budget"]["reasons"].get("budget", 0) >= 1
    for trace in report["traces"]:
        budget = next(o for o in trace["outcomes"] if o["policy"] == "budget")
        assert budget["tokens"] == min(500, trace["tokens"])
        fcs = next(o for o in trace["outcomes"] if o["policy"] == "fcs_reflection")
        assert fcs["tokens"] <= trace["tokens"]
    assert png.stat().st_size > 1000


def test_replay_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such trace file" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "x.jsonl"), "--policy", "nope"]) == 2
    assert "policy" in capsys.readouterr().err


def test_a_recheck_is_not_a_new_approach_but_another_method_is() -> None:
    first = "Speed is distance over time, so 18 divided by 3 is 6. So her speed is 6 mph. "
    recheck = "Wait, speed is distance over time, so 18 divided by 3 is 6. So her speed is 6 mph. "
    other = "Alternatively, in one hour she walks a third of eighteen miles, that makes six miles each hour. "
    text = first + recheck + other
    spans = [
        SolutionSpan("6", 0, 0, 10),
        SolutionSpan("6", 20, len(first), 30),
        SolutionSpan("6", 40, len(first + recheck), 50),
    ]
    assert new_approach_flags(text, spans) == [True, False, True]
    assert process_efficiency(text, spans, 60) == pytest.approx((20 + 20) / 60)
    assert outcome_efficiency(15, 60) == 0.25 and outcome_efficiency(None, 60) is None


def test_replay_in_worker_processes_exits_after_its_report(tmp_path: Path) -> None:
    """With --jobs 2 every worker compares answers with Math-Verify in worker processes of its own; each
    worker must stop those when it exits, or the replay hangs after the last trace."""
    import subprocess
    import sys

    if not DEV_TRACES.exists():
        pytest.skip(f"dev traces not found at {DEV_TRACES}")
    command = [sys.executable, "-m", "server.cli", "replay", str(DEV_TRACES), "--policy", "fcs_reflection",
               "--limit", "12", "--jobs", "2", "--json", str(tmp_path / "out.json")]  # fmt: skip
    # a guard against the hang this test is about (minutes, forever), not a speed goal: 12 traces take about 20 s on
    # a 2-core machine, and the limit leaves room for one three times slower under load
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| ALL | fcs_reflection | 12 |" in done.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert len(report["traces"]) == 12
