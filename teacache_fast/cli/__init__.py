"""``teacache-fast``: the command line.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires
them into argparse. A :class:`~teacache_fast.cli.args.UsageError` from a
subcommand ends as argparse errors do: ``error: <message>``, exit code 2.

Layering: this package uses the core through its public names only
(``teacache_fast``, ``teacache_fast.ops``, ``teacache_fast.calibrate``, ``teacache_fast.quality``,
``teacache_fast.models``); nothing outside it imports it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .args import UsageError

SUBCOMMANDS = {
    "calibrate": "teacache_fast.cli.calibrate",
    "info": "teacache_fast.cli.info",
    "bench": "teacache_fast.cli.bench",
    "demo": "teacache_fast.cli.demo",
    "sweep": "teacache_fast.cli.sweep",
}

__all__ = ["main", "build_parser", "SUBCOMMANDS", "UsageError"]


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="teacache-fast",
        description="TeaCache for diffusion transformers: fused kernels and a caching wrapper.")
    parser.add_argument("--version", action="version", version=f"teacache_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        args._parser.error(str(exc))
    return 2  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
