"""Run ``thinkbrake serve`` for tests and benchmarks: as a subprocess (real CLI, measurable CPU/RSS) or in a
thread of the test process (uvicorn on loopback; lets a test patch the server's internals).

Both wait for ``GET /health`` to answer 200 (the upstream is connected) before handing out the base URL, and
both always stop what they started.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support.fixtures import REPO_ROOT, free_port, server_process, stop_process, wait_healthy


@contextlib.contextmanager
def thinkbrake_process(
    upstream: str, *flags: str, log_path: pathlib.Path | None = None, env: dict[str, str] | None = None,
    wait: bool = True,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:  # fmt: skip
    """``python -m server.cli serve --upstream URL`` on a free port; yields (base URL, process)."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--upstream", upstream, "--port", str(port), *flags]
    with server_process(command, env or {}, log_path, stop_timeout=10.0) as process:
        base_url = f"http://127.0.0.1:{port}"
        if wait:
            wait_healthy(base_url, process=process)
        yield base_url, process


@contextlib.contextmanager
def thinkbrake_thread(app: Any, wait: bool = True) -> Iterator[str]:
    """Serve a built app (``server.app.build_app``) with uvicorn on a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="thinkbrake", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_healthy(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(15)


@contextlib.contextmanager
def fake_upstream_process(*flags: str) -> Iterator[str]:
    """``python -m tests.support.fake_upstream`` on a free port (its own process: no GIL shared with the test)."""
    port = free_port()
    command = [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), *flags]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # a deadline, not a wait: a slow, loaded machine may need it
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("fake upstream did not start") from None
                time.sleep(0.05)
        yield base_url
    finally:
        stop_process(process, 10.0)
