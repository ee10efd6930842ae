"""The ``libmoe`` command. Each module in :mod:`libmoe_core.commands` adds one subcommand.

A command module defines ``register(subparsers)`` that adds its parser and sets
``func`` (called with the parsed args; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libmoe", description="libmoe-kit: MoE vision-language research kit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .moe.router_base import RouterPluginError

    try:
        return int(args.func(args) or 0)
    except RouterPluginError as err:  # a user's router module is broken: one line, not a traceback
        print(f"libmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
