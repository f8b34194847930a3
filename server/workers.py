"""``thinkbrake serve --workers N`` (upstream mode): N worker processes accept on one port.

uvicorn's process supervisor binds the port once and starts N workers (spawned); each builds its own app and
upstream client from the settings the parent wrote to a private file (mode 0600: it may hold API keys), named by
:data:`SETTINGS_ENV`. A request, its answer probes and its continuation run in the worker that accepted it, so no
state is shared between workers but the metrics: ``PROMETHEUS_MULTIPROC_DIR`` (set here before any worker starts;
a folder given in the environment is emptied, else a temporary one is made and removed at exit) holds every
worker's samples and ``/metrics`` in any worker sums them (:class:`server.metrics.Metrics`). SIGINT/SIGTERM to the
parent stop every worker gracefully (uvicorn's supervisor); a worker that dies is replaced.

Invariants: the settings file and a folder made here are removed when ``serve`` returns; the folder a worker
writes to is empty when the workers start.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

from server.metrics import MULTIPROC_ENV

log = logging.getLogger("thinkbrake")

#: the environment variable naming the file that holds the pickled :class:`server.settings.Settings`
SETTINGS_ENV = "THINKBRAKE_WORKER_SETTINGS"


def serve_workers(settings: Any) -> int:
    """Run ``settings.workers`` workers on ``settings.host:settings.port`` until stopped."""
    import uvicorn

    given = os.environ.get(MULTIPROC_ENV)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="thinkbrake-metrics-"))
    if given:  # samples of an earlier run would be summed in: start empty
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    handle, settings_path = tempfile.mkstemp(prefix="thinkbrake-settings-", suffix=".pickle")
    try:
        with os.fdopen(handle, "wb") as file:  # (mkstemp makes it readable by this user only)
            pickle.dump(settings, file)
        os.environ[MULTIPROC_ENV] = str(folder)
        os.environ[SETTINGS_ENV] = settings_path
        log.info("starting %d workers for upstream %s at http://%s:%d/v1 (policy %s; Ctrl+C to stop)",
                 settings.workers, ", ".join(settings.upstream), settings.host, settings.port, settings.policy)  # fmt: skip
        uvicorn.run(
            "server.workers:worker_app", factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_level=settings.log_level, timeout_keep_alive=settings.keep_alive_timeout,
        )  # fmt: skip
    finally:
        os.unlink(settings_path)
        if not given:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def worker_app() -> Any:
    """The app of one worker (uvicorn calls this in each worker process)."""
    from server.app import build_app
    from server.heap import freeze_startup_heap
    from server.replicas import upstream_backend

    with open(os.environ[SETTINGS_ENV], "rb") as file:
        settings = pickle.load(file)  # noqa: S301 - written by this server's parent process, mode 0600
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend, _ = upstream_backend(settings)

    def ready() -> None:
        freeze_startup_heap()
        log.info("worker %d ready: serving %s", os.getpid(), backend.model_name)

    return build_app(settings, backend, on_ready=ready)
