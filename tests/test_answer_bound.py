"""Answer comparisons that outlive their time bound are really stopped, and the process still exits at once.

Math-Verify (SymPy) can run for minutes on some answer pairs: huge powers, nested infinite sums, factorials of
polynomials. Each pair below takes well over the 2 s bound on this machine, even when it is idle (measured
alone: 4 s to more than 25 s; smaller factorials of polynomials took only 1.3 s there).
The comparer must answer "not equal" at the bound, kill the worker doing the work (its CPU is freed), cache the
verdict, keep comparing with a fresh worker, and never hold up the exit of its process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from controller.answers import AnswerComparer
from tests.support.fixtures import REPO_ROOT

BOUND = 2.0
#: the caller gets its answer within the bound plus this (the pool notices an expired task on its next tick)
SLACK = 2.0
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


def wait_until_idle(window: float = 1.0, budget: float = 0.2, deadline: float = 30.0) -> None:
    """Wait for a window in which all children together use less than ``budget`` CPU seconds."""
    give_up = time.monotonic() + deadline
    while True:
        before, _ = children_cpu_seconds()
        time.sleep(window)
        used = children_cpu_seconds()[0] - before
        if used < budget:
            return
        assert time.monotonic() < give_up, f"children still use {used:.2f} CPU seconds per {window} s"


def test_pathological_pairs_are_stopped_at_the_bound_and_their_cpu_freed() -> None:
    comparer = AnswerComparer(timeout_seconds=BOUND)
    try:
        assert comparer.equal("x+1", "1+x")  # the workers are up (and Math-Verify still works)
        for number, (first, second) in enumerate(PATHOLOGICAL):
            _, workers = children_cpu_seconds()
            began = time.monotonic()
            assert comparer.equal(first, second) is False
            assert time.monotonic() - began < BOUND + SLACK, (first, second)
            assert comparer.timeouts == number + 1
            # the worker that was stuck is gone (killed), not left running in the background
            deadline = time.monotonic() + SLACK
            while alive(workers) == workers:
                assert time.monotonic() < deadline, "the stuck comparison's process is still alive"
                time.sleep(0.05)
            # comparisons go on (on the other worker while the killed one is replaced)
            assert comparer.equal(f"{number + 2}x+1", f"1+{number + 2}x")
            # ... and once the replacement has started (it imports Math-Verify), nothing burns CPU any more
            wait_until_idle()
        # a timed-out verdict is cached: asking again costs nothing and runs nothing
        began = time.monotonic()
        assert comparer.equal(*PATHOLOGICAL[0]) is False
        assert time.monotonic() - began < 0.05
        assert comparer.timeouts == len(PATHOLOGICAL)
    finally:
        _, workers = children_cpu_seconds()
        comparer.close()
    assert workers and not alive(workers)


SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import psutil
    from controller.answers import AnswerComparer

    pairs = json.loads(sys.argv[1])
    comparer = AnswerComparer(timeout_seconds=float(sys.argv[2]))
    assert comparer.equal("x+1", "1+x")
    for first, second in pairs:
        assert not comparer.equal(first, second)
    if sys.argv[3] == "close":
        comparer.close()
    pids = [child.pid for child in psutil.Process().children(recursive=True)]
    print(json.dumps({"timeouts": comparer.timeouts, "pids": pids, "done": time.time()}), flush=True)
    """
)


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_the_process_exits_promptly_after_timed_out_comparisons(ending: str) -> None:
    import json

    pairs = json.dumps(PATHOLOGICAL[:3])
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, pairs, str(BOUND), ending], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        report = json.loads(line)
        process.wait(timeout=5)  # a stuck comparison thread used to hold the exit for minutes
        exited = time.time()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert report["timeouts"] == 3
    assert exited - report["done"] < 5
    time.sleep(0.5)
    assert not alive(set(report["pids"])), "worker processes outlived the process that started them"


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
