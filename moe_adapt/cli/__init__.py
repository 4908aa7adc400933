"""The `moe-adapt` command line. Each subcommand lives in `moe_adapt/cli/<name>.py` and exposes
`register(subparsers)`; the subcommand's `func(args)` returns the exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("data", "inspect", "extract")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-adapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"moe_adapt.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"moe-adapt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
