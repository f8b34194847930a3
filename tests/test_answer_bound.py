"""Answer comparisons that outlive their time bound are really stopped, and the process still exits at once.

The comparer must answer "not equal" at the bound, kill the worker doing the work (its CPU is freed), cache the
verdict, keep comparing with a fresh worker, and never hold up the exit of its process.

The mechanism is tested with a comparison that never ends by construction (:mod:`tests.support.slow_compare`,
handed to the comparer as its ``verify`` function), so the tests hold on a CPU of any speed. The real pathological
pairs (huge powers, nested infinite sums, factorials of polynomials: Math-Verify ran 1.3 s to more than 25 s on
each on a 2-core machine) are kept as a check that *when* one outlives the bound, it is stopped there: the tests
count the timeouts that happened and assert on those, never on how many there must be.

Time margins: every wall-clock limit below separates "stopped at the bound" from "ran until the comparer's own
fallback (:data:`WORKER_START_SECONDS`, 60 s) or forever", so each is generous (10 s or more) and holds on a
machine three times slower than a 2-core one under load, or three times faster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from controller.verify import CPU_BOUND_WALL_FACTOR, WORKER_START_SECONDS, AnswerComparer
from tests.support.fixtures import REPO_ROOT
from tests.support.slow_compare import NAP, SPIN, spin_or_compare

#: the bound of the real pathological pairs; a run may raise it (THINKBRAKE_TEST_ANSWER_BOUND=60) to act out a
#: CPU fast enough to decide every pair in time: the tests must pass then too
BOUND = float(os.environ.get("THINKBRAKE_TEST_ANSWER_BOUND", "2.0"))
#: the bound of the endless comparisons (any bound stops them; a short one keeps the tests short)
SPIN_BOUND = 1.0
#: the caller gets its answer within the bound plus this (the pool notices an expired task on its next tick; a
#: loaded machine may take a few seconds to schedule it). Far below the 60 s fallback, so it still tells them apart.
SLACK = 10.0
assert SLACK < WORKER_START_SECONDS
PATHOLOGICAL = [
    ("(x+1)^{3000}", "(x+2)^{3000}"),
    ("(x+y+z+1)^{60}", "(x+y+z+2)^{60}"),
    (
        "\\sum_{k=1}^{\\infty}\\sum_{j=1}^{\\infty}\\sum_{i=1}^{\\infty}\\frac{1}{k^{j}\\, j^{i}\\, i!}",
        "\\sum_{n=1}^{\\infty}\\frac{1}{n^{3}+1}",
    ),
    ("\\frac{(x^{40}+3x^{27}+x^{9}+1)!}{(x^{40}+3x^{27}+x^{9}-5)!}", "(x^{40}+3x^{27}+x^{9}+1)^{6}+1"),
    (
        "\\frac{(x^{9}+2x^{5}+x+1)!\\,(x^{8}+x^{3}+4)!\\,(x^{7}+x^{2}+5)!}"
        "{(x^{9}+2x^{5}+x-5)!\\,(x^{8}+x^{3}-2)!\\,(x^{7}+x^{2}-1)!}",
        "(x^{9}+2x^{5}+x+1)^{6}(x^{8}+x^{3}+4)^{6}(x^{7}+x^{2}+5)^{6}",
    ),
]
#: pairs whose comparison never ends (different keys, so the comparer must ask its worker)
ENDLESS = [(f"{SPIN}{number}", f"{SPIN}{number}x") for number in range(3)]


def children_cpu_seconds() -> tuple[float, set[int]]:
    """CPU seconds used so far by the living child processes of this process, and the pids of the comparer's
    workers among them (multiprocessing's resource tracker is not one)."""
    total, pids = 0.0, set()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            tracker = "resource_tracker" in " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if not tracker:
            pids.add(child.pid)
    return total, pids


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.add(pid)
        except psutil.NoSuchProcess:
            pass
    return living


def wait_until_idle(window: float = 1.0, budget: float = 0.2, deadline: float = 90.0) -> None:
    """Wait for a window in which all children together use less than ``budget`` CPU seconds (a replaced worker
    imports Math-Verify first: a few CPU seconds, more on a slow machine, hence the long deadline)."""
    give_up = time.monotonic() + deadline
    while True:
        before, _ = children_cpu_seconds()
        time.sleep(window)
        used = children_cpu_seconds()[0] - before
        if used < budget:
            return
        assert time.monotonic() < give_up, f"children still use {used:.2f} CPU seconds per {window} s"


def wait_gone(pids: set[int], deadline: float = SLACK) -> None:
    """Wait until none of ``pids`` is alive (a killed worker disappears once the pool reaps it)."""
    give_up = time.monotonic() + deadline
    while alive(pids):
        assert time.monotonic() < give_up, f"processes {alive(pids)} are still alive"
        time.sleep(0.05)


def compare_bounded(comparer: AnswerComparer, first: str, second: str, bound: float) -> bool:
    """Compare one pair that is not equal; return whether it timed out.

    Invariants checked here for every pair: the verdict is "not equal", it comes within the bound plus
    :data:`SLACK` (a CPU-time bound: within its wall-clock backstop), and a pair that timed out had its worker
    killed (a worker set that lost a member) when the bound is wall-clock time, or kept when it is CPU time."""
    _, workers = children_cpu_seconds()
    timeouts = comparer.timeouts
    began = time.monotonic()
    assert comparer.equal(first, second) is False
    limit = bound * CPU_BOUND_WALL_FACTOR if comparer.clock == "cpu" else bound
    assert time.monotonic() - began < limit + SLACK, (first, second)
    timed_out = comparer.timeouts == timeouts + 1
    assert comparer.timeouts in (timeouts, timeouts + 1)
    if timed_out and comparer.clock == "cpu":
        assert alive(workers) == workers  # interrupted in its worker, which goes on
    elif timed_out:
        # the worker that was stuck is gone (killed), not left running in the background
        give_up = time.monotonic() + SLACK
        while alive(workers) == workers:
            assert time.monotonic() < give_up, "the stuck comparison's process is still alive"
            time.sleep(0.05)
    return timed_out


def test_endless_comparisons_are_stopped_at_the_bound_and_their_cpu_freed(monkeypatch) -> None:
    """A wall-clock bound (the server's): the worker doing an endless comparison is killed and replaced."""
    comparer = AnswerComparer(timeout_seconds=SPIN_BOUND, verify=spin_or_compare, clock="wall")
    try:
        assert comparer.equal("x+1", "1+x")  # the workers are up and run the injected comparison
        for number, (first, second) in enumerate(ENDLESS):
            assert compare_bounded(comparer, first, second, SPIN_BOUND), (first, second)
            assert comparer.timeouts == number + 1
            # comparisons go on (on the other worker while the killed one is replaced)
            assert comparer.equal(f"{number + 2}x+1", f"1+{number + 2}x")
            # ... and once the replacement has started (it imports Math-Verify), nothing burns CPU any more
            wait_until_idle()

        # a timed-out verdict is cached: asking again runs nothing (no comparison is even scheduled)
        def no_run(first: str, second: str) -> bool:
            raise AssertionError(f"a cached verdict was computed again: {first!r} vs {second!r}")

        monkeypatch.setattr(comparer, "_verify_bounded", no_run)
        assert comparer.equal(*ENDLESS[0]) is False
        assert comparer.equal(ENDLESS[0][1], ENDLESS[0][0]) is False  # the cache is keyed by the unordered pair
        assert comparer.timeouts == len(ENDLESS)
    finally:
        _, workers = children_cpu_seconds()
        comparer.close()
    assert workers
    wait_gone(workers)


def test_a_cpu_time_bound_stops_endless_work_and_never_a_comparison_that_waits() -> None:
    """A CPU-time bound (the default): an endless comparison is interrupted once it used the bound's CPU seconds,
    in a worker that lives on; a comparison that takes three times the bound in wall-clock time without using
    the CPU (as one does on a machine too loaded to run it) is not cut: its verdict stands."""
    comparer = AnswerComparer(timeout_seconds=SPIN_BOUND, verify=spin_or_compare)
    assert comparer.clock == "cpu"
    try:
        assert comparer.equal("x+1", "1+x")
        _, workers = children_cpu_seconds()
        for number, (first, second) in enumerate(ENDLESS):
            assert compare_bounded(comparer, first, second, SPIN_BOUND), (first, second)
            assert comparer.timeouts == number + 1
            wait_until_idle()  # nothing spins on after the interruption
        assert alive(workers) == workers  # the same workers throughout: none was killed
        began = time.monotonic()
        assert comparer.equal(f"{NAP}y+1", f"1+y{NAP}")  # sleeps 3 x the bound, then compares
        assert time.monotonic() - began >= 3 * SPIN_BOUND
        assert comparer.timeouts == len(ENDLESS)
    finally:
        comparer.close()


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_pathological_pairs_are_stopped_at_the_bound_when_they_outlive_it(clock: str) -> None:
    """Each real pair is "not equal" within the bound plus slack; the ones that outlived the bound (as many as this
    machine's speed makes them: counted, not assumed) were stopped and their CPU freed (with a wall-clock bound,
    by killing their worker)."""
    comparer = AnswerComparer(timeout_seconds=BOUND, clock=clock)  # type: ignore[arg-type]
    stopped = []
    try:
        assert comparer.equal("x+1", "1+x")  # the workers are up (and Math-Verify still works)
        for number, (first, second) in enumerate(PATHOLOGICAL):
            if compare_bounded(comparer, first, second, BOUND):
                stopped.append(number)
            assert comparer.timeouts == len(stopped)
            assert comparer.equal(f"{number + 2}x+1", f"1+{number + 2}x")
            wait_until_idle()
        print(
            f"\n{len(stopped)} of {len(PATHOLOGICAL)} pathological pairs outlived the {BOUND} s {clock} bound: {stopped}"
        )
    finally:
        _, workers = children_cpu_seconds()
        comparer.close()
    assert workers
    wait_gone(workers)


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import psutil
    from controller.verify import AnswerComparer
    from tests.support.slow_compare import spin_or_compare

    pairs = json.loads(sys.argv[1])
    comparer = AnswerComparer(timeout_seconds=float(sys.argv[2]), verify=spin_or_compare, clock="wall")
    assert comparer.equal("x+1", "1+x")
    for first, second in pairs:
        assert not comparer.equal(first, second)
    if sys.argv[3] == "close":
        comparer.close()
    pids = [child.pid for child in psutil.Process().children(recursive=True)]
    print(json.dumps({"timeouts": comparer.timeouts, "pids": pids, "done": time.time()}), flush=True)
    """
)
#: a process with nothing left to do exits in about a second; a stuck comparison thread used to hold the exit for
#: minutes (a spin: forever). 20 s tells the two apart on a machine three times slower under load.
EXIT_SECONDS = 20.0


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_the_process_exits_promptly_after_timed_out_comparisons(ending: str) -> None:
    import json

    pairs = json.dumps(ENDLESS)
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, pairs, str(SPIN_BOUND), ending],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        report = json.loads(line)
        process.wait(timeout=EXIT_SECONDS)
        exited = time.time()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert report["timeouts"] == len(ENDLESS)  # every endless comparison was stopped at its bound
    assert exited - report["done"] < EXIT_SECONDS
    wait_gone(set(report["pids"]))  # worker processes do not outlive the process that started them


def test_a_server_fed_pathological_answers_stays_idle_and_stops_promptly(tmp_path) -> None:
    """Answers that make Math-Verify run away cost the server at most its bound per pair, then nothing; SIGTERM
    ends it in under 10 s (a stuck comparison used to hold the exit)."""
    import signal

    import httpx

    from tests.support.fake_upstream import FakeUpstream, Trace
    from tests.support.servers import thinkbrake_process

    traces = [
        Trace(
            f"Let me work it out. So the answer is \\boxed{{{first}}}.\n\nWait, let me double-check this.\n\n"
            f"So the answer is \\boxed{{{second}}}.\n\nHmm, let me look at it once more from the start.\n\n",
            "\n\nDone.",
        )
        for first, second in PATHOLOGICAL
    ]
    log = tmp_path / "serve.log"
    with (
        FakeUpstream(traces) as upstream,
        thinkbrake_process(upstream.url, "--policy", "fcs_reflection", log_path=log) as (url, process),
    ):
        server = psutil.Process(process.pid)

        def tree_cpu() -> float:
            total = 0.0
            for member in [server, *server.children(recursive=True)]:
                try:
                    times = member.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system + times.children_user + times.children_system
            return total

        for index in range(len(traces)):
            body = {"model": "fake-reasoner", "messages": [{"role": "user", "content": "?"}], "fake_trace": index}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 30  # the replaced workers import Math-Verify once, then all is quiet
        while True:
            before = tree_cpu()
            time.sleep(2.0)
            used = tree_cpu() - before
            if used < 0.3:
                break
            assert time.monotonic() < deadline, f"the server still uses {used:.2f} CPU seconds per 2 s"
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.monotonic() - began < 10
    assert "answer comparison stopped" in log.read_text()  # the pairs did reach Math-Verify and were cut off
