"""``teacache-fast``: the command line.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires
them into argparse and imports a module when its subcommand is used.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "calibrate": "teacache_fast.calibrate_cli",
    "info": "teacache_fast.info",
    "bench": "teacache_fast.bench_ops",
    "demo": "teacache_fast.demo",
}


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="teacache-fast",
        description="TeaCache for diffusion transformers: fused kernels and a caching wrapper.")
    parser.add_argument("--version", action="version", version=f"teacache_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
