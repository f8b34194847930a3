"""A real nginx load balancer in front of several OpenAI-compatible servers, for tests.

nginx comes from the Debian package ``nginx`` (``.ci/install-nginx.sh`` links it into ``.venv/bin``); without it
:func:`nginx_binary` skips the test outside CI and fails it in CI (``CI=true``).

Invariants of :func:`nginx_balancer`:

* Everything nginx writes (pid, temp files, error log) is in its own temporary directory, which is also its prefix
  (``-p``); nothing of the Debian package's compiled-in paths (``/etc/nginx``, ``/var/lib/nginx``, ``/var/log/nginx``,
  ``/run/nginx.pid``) is read or written, so it runs without root.
* One process (``master_process off``: no workers, no switch to ``user nobody`` when run as root), in the
  foreground (``daemon off``), so the :class:`subprocess.Popen` is nginx itself and stopping it leaves nothing behind.
* Streams pass through unbuffered (SSE events arrive as the upstream writes them), request bodies of any size pass
  unbuffered, and idle upstream connections are kept alive (HTTP/1.1).
* Balancing: round-robin, or a consistent hash of one request header (``hash $http_<name> consistent``: the same
  value always goes to the same upstream; requests without the header all hash alike).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.fixtures import REPO_ROOT, free_port

#: a guard against a hang on a slow, loaded machine, not a speed requirement: nginx starts in milliseconds
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def nginx_binary() -> str:
    """The nginx to run: ``.venv/bin/nginx`` of the repository (where ``.ci/install-nginx.sh`` links it), the
    running Python's bin folder, then ``PATH``. Missing: a failure under ``CI=true``, else a skip."""
    folders = [REPO_ROOT / ".venv" / "bin", Path(sys.executable).parent]
    binary = shutil.which("nginx", path=os.pathsep.join([*map(str, folders), os.environ.get("PATH", "")]))
    if binary is None:
        message = "nginx not found: install it with .ci/install-nginx.sh (Debian package nginx)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def nginx_config(workdir: Path, port: int, upstreams: list[str], hash_header: str | None = None) -> str:
    """The whole ``nginx.conf``: listen on 127.0.0.1:``port`` and proxy every request to ``upstreams`` (base URLs
    such as ``http://127.0.0.1:8100``); all paths nginx writes are inside ``workdir``."""
    servers = "".join(f"        server {urlsplit(url).netloc};\n" for url in upstreams)
    balance = f"        hash $http_{hash_header.lower().replace('-', '_')} consistent;\n" if hash_header else ""
    temp = "".join(
        f"    {kind}_temp_path {workdir / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
{temp}    upstream backends {{
{balance}{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_balancer(upstreams: list[str], hash_header: str | None = None) -> Iterator[str]:
    """Run nginx in front of ``upstreams`` and yield its base URL (``http://127.0.0.1:PORT``) once it accepts
    connections; round-robin, or a consistent hash of the ``hash_header`` request header. On exit nginx is stopped
    (SIGQUIT: graceful; killed after :data:`STOP_TIMEOUT`) and its directory removed. Raises, with the tail of
    nginx's error log, if nginx exits or does not listen within :data:`START_TIMEOUT` seconds."""
    if not upstreams:
        raise ValueError("nginx_balancer needs at least one upstream")
    binary = nginx_binary()
    with tempfile.TemporaryDirectory(prefix="thinkbrake-nginx-") as directory:
        workdir = Path(directory)
        port = free_port()
        config = workdir / "nginx.conf"
        config.write_text(nginx_config(workdir, port, upstreams, hash_header))
        log = workdir / "error.log"
        command = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", "stderr"]
        with open(workdir / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT)
        try:
            wait_listening(port, process, [workdir / "stderr.log", log])
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def wait_listening(port: int, process: subprocess.Popen[bytes], logs: list[Path]) -> None:
    """Block until 127.0.0.1:``port`` accepts a TCP connection; raise if ``process`` exits first or after
    :data:`START_TIMEOUT` seconds, with the tail of ``logs``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{tail(logs)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nginx did not listen on port {port} within {START_TIMEOUT:.0f} s:\n{tail(logs)}")


def tail(logs: list[Path], chars: int = 3000) -> str:
    return "\n".join(path.read_text(errors="replace")[-chars:] for path in logs if path.exists())


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop nginx (and only it): SIGQUIT (finish open requests, then exit), SIGKILL after :data:`STOP_TIMEOUT`."""
    if process.poll() is None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
