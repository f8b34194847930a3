"""The serving process freezes its start-up heap once the backend is ready (collections then skip it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from server.heap import OLDER_THRESHOLDS, YOUNG_THRESHOLD
from tests.support.fake_upstream import FakeUpstream
from tests.support.serving import thinkbrake_server

FROZE = re.compile(r"garbage collector: (\d+) objects alive after start-up frozen; thresholds \(50000, 20, 10\)")


def test_freeze_startup_heap_moves_every_live_object_to_the_permanent_generation() -> None:
    code = (
        "import gc, json; from server.heap import freeze_startup_heap; "
        "frozen = freeze_startup_heap(); "
        "print(json.dumps([frozen, gc.get_freeze_count(), gc.get_count()[2], gc.get_threshold()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    frozen, count, oldest, thresholds = json.loads(out.stdout)
    assert frozen == count > 1000  # the interpreter and the server's modules
    assert oldest == 0  # nothing left in the oldest generation for a collection to walk
    assert thresholds == [YOUNG_THRESHOLD, *OLDER_THRESHOLDS] and YOUNG_THRESHOLD > 700


def wait_for_line(path, pattern: re.Pattern[str], count: int, deadline: float = 60.0) -> list[int]:
    """The numbers of the first ``count`` matches of ``pattern`` in the log at ``path`` (waits for them)."""
    end = time.monotonic() + deadline
    while True:
        found = [int(match.group(1)) for match in pattern.finditer(path.read_text(errors="replace"))]
        if len(found) >= count or time.monotonic() > end:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_freezes_the_heap_once_ready(tmp_path, workers: int) -> None:
    log = tmp_path / "serve.log"
    with FakeUpstream() as upstream:
        args = ["--upstream", upstream.url, "--log-level", "debug", "--workers", str(workers)]
        with thinkbrake_server(*args, log_path=log):
            frozen = wait_for_line(log, FROZE, workers)
    assert len(frozen) == workers, log.read_text()[-2000:]  # each worker process froze its own heap
    assert all(count > 1000 for count in frozen)
