"""The ``thinkbrake`` command: ``serve`` runs the server, ``demo`` shows it stop a scripted model, ``replay``
evaluates the controller on traces, ``calibrate`` chooses per model the stop rule for a risk level. ``serve``
and ``demo`` parse their own arguments (``serve`` takes vLLM's engine flags, whose parser is vLLM's own)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server.serve_cli import quiet_imports

quiet_imports()  # here too in vLLM's engine process, which imports this module as the main module of a spawn


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from server import serve_cli

        return serve_cli.main(argv[1:])
    if argv[:1] == ["demo"]:
        from server import demo

        return demo.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="thinkbrake",
        description="Stop reasoning models from overthinking: an OpenAI-compatible server and its evaluation tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from server import calibrate_cli, replay_cli

    replay_cli.add_parser(commands)
    calibrate_cli.add_parser(commands)
    from server import demo, serve_cli

    serve_cli.add_parser(commands)
    demo.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
