"""Command line tools: C{python -m llmnode check PATH}."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llmnode.config import ConfigError, load_config


def check(args: argparse.Namespace) -> int:
    """Validate a config file: 0 valid, 1 invalid, 2 unreadable."""
    try:
        config = load_config(args.path)
    except OSError as e:
        print(f"error: cannot read {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        for line in e.warnings:
            print(f"warning: {line}", file=sys.stderr)
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    count = len(config.models)
    print(f"{args.path}: OK ({count} model{'' if count == 1 else 's'})")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets C{func}."""
    top = argparse.ArgumentParser(
        prog="python -m llmnode",
        description="llmnode tools (run the node itself with 'twistd -n llmnode').")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    checker = commands.add_parser(
        "check", help="validate a config file",
        description="Report every problem in a config file; exit 0 valid, 1 invalid, "
                    "2 unreadable.")
    checker.add_argument("path", metavar="PATH", help="the YAML config file")
    checker.set_defaults(func=check)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command named in C{argv} (default: C{sys.argv[1:]}); return the exit code."""
    top = parser()
    args = top.parse_args(argv)
    if getattr(args, "func", None) is None:
        top.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
