"""The ``tokenmerge`` command: ``generate``, ``demo``, ``eval`` and ``bench``, one module each."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    try:
        from . import bench, demo, evaluate, generate
    except ImportError as err:  # the core installs without the tools' libraries
        raise SystemExit(f"tokenmerge: the command needs the tools extra ({err.name} is not installed): "
                         "pip install 'tokenmerge[tools]'") from err
    parser = argparse.ArgumentParser(prog="tokenmerge", description="Training-free token merging for diffusers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, demo, evaluate, bench):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
