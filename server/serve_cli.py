"""``thinkbrake serve``: run the OpenAI-compatible server on an embedded vLLM engine or in front of an upstream.

Start-up order (each step fails with one line on stderr and exit code 2 or 1, never a long traceback):
1. a cheap look at the command line: a model that looks like a path and does not exist, or a hub id with no hub
   reachable and nothing cached, fails here, before vLLM is imported (:mod:`server.model_source`);
2. the full command line: thinkbrake's flags plus, for the embedded engine, vLLM's own engine flags
   (:mod:`server.engine_config`); the proxy never imports vLLM;
3. the server listens at once (``/health`` answers 503) while "loading MODEL ..." runs; the listening address is
   printed only when the model is loaded and requests can be served.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from controller.policies import POLICIES

if TYPE_CHECKING:
    from server.settings import Flag

DESCRIPTION = """\
Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) that
streams the model's thinking through the thinkbrake controller. When the controller sees an answer reached
and confirmed, it aborts decoding, closes the thinking and lets the model write its final answer
(a continuation from the same token ids, so the prefix cache is reused).

Two modes:
  thinkbrake serve MODEL [vLLM engine flags]  embedded vLLM engine, a drop-in for `vllm serve MODEL ...`
                                              (MODEL: a local folder or a hub id; --model MODEL works too)
  thinkbrake serve --upstream URL             proxy in front of an OpenAI-compatible server (e.g. vllm serve)

The embedded engine takes vLLM's own engine flags (--gpu-memory-utilization, --max-model-len,
--tensor-parallel-size, --kv-cache-memory-bytes, --enable-prefix-caching, --reasoning-parser, ...), exactly as
`vllm serve` does. On a CPU-only machine the KV cache defaults to a quarter of the free memory (at most 4 GiB).

Every thinkbrake flag can also be set by an environment variable THINKBRAKE_<FLAG> (e.g. THINKBRAKE_MODEL,
THINKBRAKE_POLICY_ARGS="k=3,min_thinking_tokens=100"); a flag wins over the variable.
Per request, clients override the policy with a "thinkbrake" object in the body, e.g.
  {"thinkbrake": {"policy": "consistency", "k": 3, "finalize": "answer", "max_answer_tokens": 512}}
or choose a preset with the OpenAI field "reasoning_effort": "low" | "medium" | "high".
"""
USAGE = "thinkbrake serve [MODEL] [thinkbrake flags] [vLLM engine flags]\n       thinkbrake serve --upstream URL [thinkbrake flags]"


class _EngineFlagsHelp:
    """``--help`` of the embedded-engine parser: thinkbrake's flags in full, vLLM's groups as one line each
    (vLLM's own ``--help=all``, ``--help=CacheConfig``, ``--help=memory`` search them, as in ``vllm serve``)."""

    own_groups: list[Any]

    def format_help(self) -> str:
        if getattr(self, "_search_keyword", None) is not None:
            return super().format_help()  # type: ignore[misc,no-any-return]
        formatter = self._get_formatter()  # type: ignore[attr-defined]
        formatter.add_usage(USAGE, [], [])
        formatter.add_text(DESCRIPTION)
        for group in self.own_groups:
            formatter.start_section(group.title)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
        own = {id(group) for group in self.own_groups}
        lines = []
        for group in self._action_groups:  # type: ignore[attr-defined]
            if id(group) in own or not group._group_actions or group.title in ("positional arguments", "options"):
                continue
            summary = (group.description or "").strip().split("\n")[0]
            lines.append(f"{group.title:<24} {summary}")
        formatter.start_section("vLLM engine flags (as `vllm serve`: --help=all, --help=CacheConfig, --help=WORD)")
        formatter.add_text("\n".join(lines))
        formatter.end_section()
        return str(formatter.format_help())


def build_parser(engine: bool) -> tuple[argparse.ArgumentParser, list[str]]:
    """The ``serve`` parser; with ``engine`` (and vLLM installed) it takes vLLM's engine flags too.

    Returns the parser and the destinations of vLLM's flags (empty without them).
    """
    parser: argparse.ArgumentParser
    engine_dests: list[str] = []
    kwargs: dict[str, Any] = {"prog": "thinkbrake serve", "usage": USAGE, "description": DESCRIPTION}
    kwargs.update(argument_default=argparse.SUPPRESS, conflict_handler="resolve")
    flexible: Any = None
    if engine:
        try:
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            flexible = FlexibleArgumentParser
        except ImportError:
            flexible = None
    if flexible is not None:
        parser_class = type("ServeParser", (_EngineFlagsHelp, flexible), {})
        parser = parser_class(**kwargs)
    else:
        parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument(
        "model_tag", nargs="?", metavar="MODEL", help="model folder or hub id for the embedded engine (as --model)"
    )
    if flexible is not None:
        from server.engine_config import add_vllm_arguments

        engine_dests = add_vllm_arguments(parser)
    own_groups = _add_own_flags(parser, vllm_flags=flexible is not None)
    if flexible is not None:
        parser.own_groups = own_groups  # type: ignore[attr-defined]
    return parser, engine_dests


def setting_flags() -> list[tuple[str, Flag, Any]]:
    """(field name, its :class:`server.settings.Flag`, its type) of every setting that is a ``serve`` flag, in order."""
    from server.settings import Flag, Settings

    found = []
    for name, info in Settings.model_fields.items():
        flag = next((item for item in info.metadata if isinstance(item, Flag)), None)
        if flag is not None:
            found.append((name, flag, info.annotation))
    return found


def _argument(name: str, flag: Flag, annotation: Any) -> tuple[str, dict[str, Any]]:
    """The ``add_argument`` flag and keywords of one setting, read off its type and :class:`Flag`."""
    kind = annotation
    if isinstance(annotation, types.UnionType):  # X | None
        kind = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    options: dict[str, Any] = {"dest": name, "help": flag.help}
    if kind is bool:
        options["action"] = "store_true"
    elif typing.get_origin(kind) in (list, dict):
        options["action"] = "append"
    elif flag.lower:
        options["type"] = str.lower
    elif kind in (int, float):
        options["type"] = kind
    choices = flag.choices or (typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None)
    if choices:
        options["choices"] = list(choices)
    if flag.metavar:
        options["metavar"] = flag.metavar
    return "--" + (flag.name or name).replace("_", "-"), options


def _add_own_flags(parser: argparse.ArgumentParser, vllm_flags: bool) -> list[Any]:
    """thinkbrake's flags, made from the settings (:func:`setting_flags`), plus ``--verbose``; with vLLM's engine
    flags, the settings vLLM's parser has a flag for are left to it, and ``--kv-cache-bytes`` is its alias."""
    from server.settings import ENGINE, FLAG_GROUPS, SERVER

    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS}
    for name, flag, annotation in setting_flags():
        if flag.own_engine and vllm_flags:
            continue
        option, options = _argument(name, flag, annotation)
        groups[flag.group].add_argument(option, **options)
        if name == "log_level":
            groups[SERVER].add_argument(
                "--verbose", action="store_true",
                help="show vLLM's own log (its start-up lines and warnings); without it vLLM logs errors only",
            )  # fmt: skip
    if vllm_flags:
        kv_type: Any = next(a.type for a in parser._actions if a.dest == "kv_cache_memory_bytes")
        groups[ENGINE].add_argument(
            "--kv-cache-bytes", dest="kv_cache_memory_bytes", type=kv_type, metavar="BYTES",
            help="KV cache size, same as vLLM's --kv-cache-memory-bytes (e.g. 2G; CPU default: a quarter of "
            "the free memory, at most 4 GiB)",
        )  # fmt: skip
    return list(groups.values())


def add_parser(commands: Any) -> None:
    """List ``serve`` in ``thinkbrake --help``; :func:`main` parses its arguments (see :mod:`server.cli`)."""
    commands.add_parser("serve", help="run the OpenAI-compatible server that stops overthinking", add_help=False)


def prescan(argv: Sequence[str]) -> tuple[bool, str | None]:
    """(proxy mode?, the model) from a glance at the command line and environment, before any parsing."""
    upstream = bool(os.environ.get("THINKBRAKE_UPSTREAM")) or any(
        arg == "--upstream" or arg.startswith("--upstream=") for arg in argv
    )
    model = None
    for index, arg in enumerate(argv):
        if arg == "--model" and index + 1 < len(argv):
            model = argv[index + 1]
        elif arg.startswith("--model="):
            model = arg.removeprefix("--model=")
    if model is None and argv and not argv[0].startswith("-"):
        model = argv[0]
    return upstream, model or os.environ.get("THINKBRAKE_MODEL") or None


def quiet_vllm(argv: Sequence[str]) -> None:
    """vLLM's and transformers' own log: errors only, unless ``--verbose`` (or ``--log-level debug``) asks for all
    of it. A ``VLLM_LOGGING_LEVEL`` / ``TRANSFORMERS_VERBOSITY`` already in the environment wins. Called before
    vLLM is imported (vLLM reads the variable then)."""
    verbose = "--verbose" in argv or any(
        arg == "--log-level=debug" or (arg == "--log-level" and argv[i + 1 : i + 2] == ["debug"])
        for i, arg in enumerate(argv)
    )
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings in the engine process
        quiet_imports()


def quiet_imports() -> None:
    """In this process, when ``VLLM_LOGGING_LEVEL`` is ERROR or CRITICAL: vLLM's logger at that level from the
    start, and Python warnings raised in vLLM's code hidden. vLLM warns while it is imported, before its own
    logging is set up ("Triton is installed, but doesn't include CPU backend"). vLLM's engine process is a spawn
    child that imports ``server.cli`` as its main module, which calls this there too."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
    if level in ("ERROR", "CRITICAL"):
        logging.getLogger("vllm").setLevel(level)
        warnings.filterwarnings("ignore", module=r"vllm(\.|$)")


def print_engine_help() -> None:
    """The embedded-engine ``--help``, from the cache when it is there (no vLLM import); made and cached if not."""
    from server import serve_help

    path = serve_help.cache_path(sorted(POLICIES))
    text = serve_help.cached(path)
    if text is None:
        parser, engine_dests = build_parser(engine=True)
        text = parser.format_help()
        if engine_dests:  # vLLM's parser made it: worth keeping
            serve_help.store(path, text)
    sys.stdout.write(text)


def main(argv: Sequence[str]) -> int:
    """``thinkbrake serve ARGS``."""
    argv = list(argv)
    wants_help = any(arg in ("-h", "--help") or arg.startswith("--help=") for arg in argv)
    upstream, model = prescan(argv)
    quiet_vllm(argv)
    if not upstream:
        from server.serve_help import plain_help

        if plain_help(argv):
            print_engine_help()
            raise SystemExit(0)  # as argparse ends on --help
    checked = None
    if not wants_help and not upstream:
        from server.model_source import check_model_source
        from server.settings import DEFAULT_MODEL

        checked = model or DEFAULT_MODEL
        reason = check_model_source(checked)
        if reason:
            print(f"thinkbrake serve: {reason}", file=sys.stderr)
            return 2
    parser, engine_dests = build_parser(engine=not upstream)
    namespace = argparse.Namespace()
    if engine_dests:
        from server import serve_help
        from server.engine_config import unset_namespace

        namespace = unset_namespace(engine_dests)
        path = serve_help.cache_path(sorted(POLICIES))
        if path is not None and not path.exists():  # vLLM's parser is built anyway: the next --help is quick
            serve_help.store(path, parser.format_help())
    args = parser.parse_args(argv, namespace)
    try:
        settings = load_settings(args, engine_dests)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        print(f"thinkbrake serve: {_settings_error(error)}", file=sys.stderr)
        return 2
    if settings.mode == "embedded" and settings.model != checked:
        from server.model_source import check_model_source

        reason = check_model_source(str(settings.model))
        if reason:
            print(f"thinkbrake serve: {reason}", file=sys.stderr)
            return 2
    return run(settings)


def _settings_error(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if errors is None:
        return str(error)
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in errors())


def load_settings(args: argparse.Namespace, engine_dests: Sequence[str] = ()) -> Any:
    """Settings from parsed flags (thinkbrake's and vLLM's) over ``THINKBRAKE_*`` variables and defaults."""
    from server.engine_config import SETTING_DESTS, given_engine_args
    from server.settings import Settings

    given = vars(args)
    own = [name for name, _, _ in setting_flags() if name not in engine_dests and name in given]
    overrides = {name: given[name] for name in own}
    model_tag = getattr(args, "model_tag", None)
    if model_tag:
        overrides["model"] = model_tag
    engine_args = given_engine_args(args, list(engine_dests))
    for dest, setting in SETTING_DESTS.items():
        if dest not in engine_args:
            continue
        value = engine_args.pop(dest)
        if dest == "served_model_name" and isinstance(value, list):
            value = value[0] if value else None
        if dest == "max_model_len" and isinstance(value, int) and value < 1:  # "auto": let vLLM size it
            engine_args[dest] = value
            continue
        if value is not None:
            overrides[setting] = value
    if engine_args:
        overrides["engine_args"] = engine_args
    return Settings(**overrides)


def run(settings: Any, when_ready: Callable[[str, Callable[[], None]], None] | None = None) -> int:
    """Serve until stopped; 1 if the backend could not start.

    ``when_ready(base_url, stop)`` runs on a thread of its own once the backend is ready (``thinkbrake demo``).
    """
    import threading

    import uvicorn

    from server.app import build_app
    from server.heap import freeze_startup_heap

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").addFilter(_HideEarlyAddress())
    if settings.workers > 1:
        from server.workers import serve_workers

        return serve_workers(settings)
    if settings.upstream:
        from server.replicas import upstream_backend

        backend, what = upstream_backend(settings)
    else:
        from server.engine import EmbeddedBackend

        backend, what = EmbeddedBackend(settings), f"model {settings.model}"
    failures: list[BaseException] = []
    servers: list[uvicorn.Server] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        for server in servers:
            server.should_exit = True

    def stop_serving() -> None:
        for server in servers:
            server.should_exit = True

    def ready() -> None:
        freeze_startup_heap()
        address = f"http://{settings.host}:{_bound_port(servers, settings.port)}"
        log.info("ready: serving %s at %s/v1 (policy %s; Ctrl+C to stop)", backend.model_name, address, settings.policy)
        if when_ready is not None:
            threading.Thread(target=when_ready, args=(address, stop_serving), name="when-ready", daemon=True).start()

    log.info("loading %s ... (GET /health answers 503 until it is ready)", what)
    app = build_app(settings, backend, on_startup_failure=stop, on_ready=ready)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_timeout,
    )  # fmt: skip
    server = uvicorn.Server(config)
    servers.append(server)
    server.run()
    if failures:
        print(f"thinkbrake serve: {failures[0]}", file=sys.stderr)
        return 1
    return 0


log = logging.getLogger("thinkbrake")


class _HideEarlyAddress(logging.Filter):
    """Drops uvicorn's "Uvicorn running on ..." line: it comes before the model is loaded; thinkbrake prints
    the address when it is ready."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Uvicorn running on")


def _bound_port(servers: Sequence[Any], configured: int) -> int:
    for server in servers:
        for listener in getattr(server, "servers", []):
            for sock in listener.sockets:
                return int(sock.getsockname()[1])
    return configured
