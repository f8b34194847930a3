"""The ``thinkbrake`` command: ``replay`` evaluates the controller on traces; ``serve`` runs the server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="thinkbrake",
        description="Stop reasoning models from overthinking: an OpenAI-compatible server and its evaluation tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from server import replay_cli

    replay_cli.add_parser(commands)
    try:
        from server import serve_cli
    except ImportError:
        serve_cli = None  # type: ignore[assignment]
    if serve_cli is not None:
        serve_cli.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
