"""``thinkbrake serve --workers 2 --upstream URL``: two worker processes on one port (server/workers.py).

A real ``thinkbrake serve`` subprocess in front of the fake OpenAI-compatible upstream. Requests are sent on new
connections until both workers have served some (each worker's samples are read from its own file in
``PROMETHEUS_MULTIPROC_DIR``); ``/metrics`` (answered by either worker) must then count every request, and SIGTERM to
the parent must stop both workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from server.settings import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.fixtures import free_port, server_process
from tests.support.serving import serve_command

#: a guard against a hang, not a speed requirement: each wait ends as soon as its condition holds
TIMEOUT = 600.0
MODEL = "fake-reasoner"


def requests_per_worker(folder: Path) -> dict[int, float]:
    """pid -> the ``thinkbrake_requests_total`` it counted, read from its own sample file."""
    served: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "thinkbrake_requests_total":
                served[pid] = served.get(pid, 0.0) + value
    return served


def merged_requests(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=60).text
    return sum(float(value) for value in re.findall(r'^thinkbrake_requests_total\{[^}]*model="fake-reasoner"[^}]*\} (\S+)$',
                                                      text, re.M))  # fmt: skip


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_workers_share_the_port_sum_their_metrics_and_stop_together(tmp_path: Path) -> None:
    folder, log = tmp_path / "metrics", tmp_path / "serve.log"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left from an earlier run")  # the server empties the folder first
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with FakeUpstream(model=MODEL, record=False) as upstream:
        command = serve_command(port, "--upstream", upstream.url, "--workers", "2")
        with server_process(command, {"PROMETHEUS_MULTIPROC_DIR": str(folder)}, log) as process:
            wait_for(lambda: process.poll() is not None or len(re.findall(r"worker \d+ ready", log.read_text())) == 2,
                     "two workers to be ready")  # fmt: skip
            assert process.poll() is None, log.read_text()[-3000:]
            workers = {int(pid) for pid in re.findall(r"worker (\d+) ready", log.read_text())}
            sent = 0
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Solve it."}], "fake_trace": 0,
                    "thinkbrake": {"policy": "fcs_reflection"}}  # fmt: skip
            while len(requests_per_worker(folder)) < 2:
                assert sent < 400, f"one worker served all {sent} requests: {requests_per_worker(folder)}"
                with httpx.Client(timeout=60) as client:  # a new connection each time: the kernel spreads them
                    response = client.post(f"{base}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["thinkbrake"]["stopped"]
                sent += 1
            per_worker = requests_per_worker(folder)
            print(f"{sent} requests: {per_worker} (workers {sorted(workers)})")
            assert set(per_worker) == workers and all(count > 0 for count in per_worker.values())
            assert sum(per_worker.values()) == sent
            for _ in range(4):  # whichever worker answers /metrics, it sums both
                assert merged_requests(base) == sent

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=TIMEOUT) == 0
            for pid in workers:
                wait_for(lambda pid=pid: not _alive(pid), f"worker {pid} to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_need_an_upstream() -> None:
    with pytest.raises(ValueError, match="--workers needs --upstream"):
        Settings(model="some/model", workers=2)
    assert Settings(upstream="http://127.0.0.1:9", workers=2).workers == 2
