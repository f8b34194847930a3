"""``thinkbrake serve --help``: vLLM's flags listed, nothing on stderr, and vLLM not imported once the text is cached.

Each run is a fresh process with its own cache folder (``XDG_CACHE_HOME``); whether vLLM was imported is read
from ``sys.modules`` at the end of the process, not from how long it took.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.support.fixtures import REPO_ROOT

PROBE = (
    "import sys\n"
    "from server.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as stop:\n"
    "    code = stop.code\n"
    "sys.stderr.write('vllm imported: %s\\n' % ('vllm' in sys.modules))\n"
    "sys.exit(code)\n"
)


def serve_help(cache: pathlib.Path, *args: str, columns: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(REPO_ROOT), "COLUMNS": str(columns)}
    for name in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)  # as a user's shell has it
    command = [sys.executable, "-c", PROBE, "serve", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_full_help(text: str) -> None:
    assert text.startswith("usage: thinkbrake serve [MODEL]")
    assert "vLLM engine flags (as `vllm serve`" in text and "CacheConfig" in text and "ModelConfig" in text
    for flag in ("--upstream URL", "--policy", "--kv-cache-bytes", "--verbose", "--api-key"):
        assert flag in text, flag


@pytest.mark.engine
def test_help_is_made_once_then_printed_without_importing_vllm(tmp_path: pathlib.Path) -> None:
    first = serve_help(tmp_path, "--help")
    assert first.returncode == 0, first.stderr
    assert first.stderr == "vllm imported: True\n"  # made from vLLM's parser, and not one warning
    assert_full_help(first.stdout)
    assert len(list((tmp_path / "thinkbrake" / "serve-help").glob("*.txt"))) == 1

    again = serve_help(tmp_path, "-h")
    assert again.returncode == 0, again.stderr
    assert again.stderr == "vllm imported: False\n"
    assert again.stdout == first.stdout

    with_model = serve_help(tmp_path, "/some/model", "--help")
    assert with_model.stderr == "vllm imported: False\n" and with_model.stdout == first.stdout

    narrow = serve_help(tmp_path, "--help", columns=80)  # another width is another text: made anew, not reused
    assert narrow.stderr == "vllm imported: True\n"
    assert_full_help(narrow.stdout)
    assert len(list((tmp_path / "thinkbrake" / "serve-help").glob("*.txt"))) == 2


def test_proxy_help_never_imports_vllm(tmp_path: pathlib.Path) -> None:
    result = serve_help(tmp_path, "--upstream", "http://fleet:8000", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "vllm imported: False\n"
    assert "--upstream URL" in result.stdout and "--policy" in result.stdout


@pytest.mark.engine
def test_any_run_that_builds_vllms_parser_caches_the_help(tmp_path: pathlib.Path) -> None:
    search = serve_help(tmp_path, "--help=CacheConfig")  # a search of vLLM's flags runs vLLM's parser
    assert search.returncode == 0, search.stderr
    assert search.stderr == "vllm imported: True\n" and "--block-size" in search.stdout
    plain = serve_help(tmp_path, "--help")
    assert plain.stderr == "vllm imported: False\n"
    assert_full_help(plain.stdout)
