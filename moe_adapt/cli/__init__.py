"""The `moe-adapt` command line. Each subcommand lives in `moe_adapt/cli/<name>.py` and exposes either
`register(subparsers)` (commands with sub-subcommands or their own parser set-up) or `HELP`, `add_arguments(parser)`
and `run(args)` (the commands a recipe script shares, `recipe_main`); `run(args)` returns the exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("data", "pretrain", "inspect", "extract", "finetune", "continual")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-adapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"moe_adapt.cli.{name}")
        if hasattr(module, "register"):
            module.register(sub)
            continue
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__.splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


#: what counts as a user's mistake (bad path, bad value, bad YAML): one `error:` line, exit 2, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def debug_requested(flag: bool = False) -> bool:
    """Whether to show the full traceback of a user error: `--debug`, or `MOE_ADAPT_DEBUG=1` in the environment."""
    return flag or os.environ.get("MOE_ADAPT_DEBUG", "").lower() not in ("", "0", "false", "no")


def run_reporting_errors(prog: str, func, *args, debug: bool = False) -> int:
    """`func(*args)` as a command's body: its return value as the exit code, or, for a user error (a wrong path,
    value, config key or YAML file), one line `PROG: error: MESSAGE` on stderr and exit code 2. With `debug` (or
    `MOE_ADAPT_DEBUG=1`) the error propagates with its traceback."""
    import yaml

    try:
        return int(func(*args) or 0)
    except (*USER_ERRORS, yaml.YAMLError) as err:
        if debug_requested(debug):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def recipe_main(name: str, description: str, argv: list[str] | None = None) -> int:
    """What `recipes/NAME.py` runs (a thin script that `accelerate launch` and `torchrun` start): the
    `moe-adapt NAME` subcommand's arguments and body, with errors reported as `NAME.py: error: ...`."""
    module = importlib.import_module(f"moe_adapt.cli.{name}")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(f"{name}.py", module.run, args, debug=args.debug)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_reporting_errors(f"moe-adapt {args.command}", args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
