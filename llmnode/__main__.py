"""Command line tools: C{python -m llmnode check [--strict] PATH}."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, cast

from llmnode.config import Config, ConfigError, load_config
from llmnode.costs import CostBook, costs_path
from llmnode.preflight import key_lines, line_of, script_problems


def check(args: argparse.Namespace) -> int:
    """Validate a config file: 0 valid, 1 invalid, 2 unreadable. Each finding is printed as
    C{FILE:LINE: error|warning: YAML.path: message}; with C{--strict} warnings (unknown keys,
    script programs that cannot run) are errors."""
    try:
        config = load_config(args.path)
    except OSError as e:
        print(f"error: cannot read {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        config, problems, warnings = None, e.problems, e.warnings
    lines = _lines_of_file(args.path)
    if config is not None:
        problems, warnings = [], list(config.warnings) + script_problems(config, lines)
    if args.strict:
        problems, warnings = warnings + problems, []
    for kind, found in (("warning", warnings), ("error", problems)):
        for message in found:
            line = line_of(message, lines)
            where = args.path if line is None else f"{args.path}:{line}"
            print(f"{where}: {kind}: {message}", file=sys.stderr)
    if problems:
        return 1
    config = cast(Config, config)  # no problems: it loaded
    count = len(config.models)
    print(f"{args.path}: OK ({count} model{'' if count == 1 else 's'})")
    for cost_line in cost_lines(config):
        print(cost_line)
    return 0


def cost_lines(config: Config) -> list[str]:
    """Per plan, declared and learned memory and load time, once a node using this config's
    runtime folder has learned any (none before: nothing to compare)."""
    book = CostBook(costs_path(cast(str, config.program.runtime_dir)))  # load_config sets it
    try:
        book.load()
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"learned costs: unreadable ({e})"]
    if not any(True for _ in book.items()):
        return []
    lines = [f"learned costs ({book.path}):"]
    for model in config.models:
        for plan, figures in book.info(model).items():
            parts = []
            for requirement, declared in figures["declared_mb"].items():
                learned = figures["learned_peak_mb"].get(requirement)
                parts.append(f"{requirement}: declared "
                             f"{'-' if declared is None else f'{declared:.0f} MB'}, learned "
                             f"{'-' if learned is None else f'{learned:.0f} MB'}")
            load = figures["learned_load_s"]
            parts.append(f"load {'-' if load is None else f'{load:.1f} s'}")
            lines.append(f"  {model.id} / {plan}: " + "; ".join(parts))
    return lines


def _lines_of_file(path: str) -> dict[str, int]:
    """L{key_lines} of the file at C{path}; none when it cannot be read as text."""
    try:
        with open(path, encoding="utf-8") as f:
            return key_lines(f.read())
    except (OSError, UnicodeDecodeError):
        return {}


def parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets C{func}."""
    top = argparse.ArgumentParser(
        prog="python -m llmnode",
        description="llmnode tools (run the node itself with 'twistd -n llmnode').")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    checker = commands.add_parser(
        "check", help="validate a config file",
        description="Report every problem in a config file, with its line, and plans whose "
                    "script program is missing or not executable; exit 0 valid, 1 invalid, "
                    "2 unreadable.")
    checker.add_argument("--strict", action="store_true",
                         help="treat warnings (unknown keys, script programs that cannot run) "
                              "as errors")
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
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
