"""``teacache-fast bench [ops|e2e]``: the options both benchmarks share, and the dispatch.

``ops`` (:mod:`.bench_ops`) times every op against eager torch and
torch.compile; ``e2e`` (:mod:`.bench_e2e`) samples a random-weight FLUX
transformer with and without TeaCache and compares the host cost per call with
the official TeaCache script and diffusers' caches (:mod:`.host_cost`).
Results go to ``--out`` (default ``./teacache-bench``); the committed tables under
benchmarks/results/ change only when ``--out benchmarks/results`` is given.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from . import args as cli_args
from .bench_ops import DTYPES, OPS, SIZES

HELP = "benchmark the ops (or, with 'e2e', a cached sampling loop) and write CSV, PNG and markdown"
DEFAULT_OUT = "teacache-bench"
HOST_COST = ("include", "only", "skip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=("ops", "e2e"), default="ops",
                        help="ops: the op benchmark (default); e2e: the end-to-end sampling benchmark")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for the CSV, PNG and markdown (default ./{DEFAULT_OUT}; pass "
                             "--out benchmarks/results to update the committed tables)")
    parser.add_argument("--quick", action="store_true", help="short run: small sizes, few repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: numbers mean nothing")
    parser.add_argument("--repeats", type=cli_args.int_in("--repeats", 1), default=None,
                        help="ops: samples per measurement (default 7; quick 3); e2e: timed passes per "
                             "configuration (default 2, host-cost row 10; smoke 1)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="cap on the time spent timing one implementation (op benchmark)")
    parser.add_argument("--sizes", type=cli_args.csv_list(tuple(SIZES)), default=None,
                        help=f"op sizes, comma-separated from {', '.join(SIZES)} (default: all)")
    parser.add_argument("--dtypes", type=cli_args.csv_list(DTYPES + ("fp16",)), default=None,
                        help="dtypes, comma-separated (default: bf16,fp32; e2e: the first one, "
                             "default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--ops", type=cli_args.csv_list(OPS), default=None, help="ops to time (default: all)")
    parser.add_argument("--steps", type=cli_args.int_in("--steps", 2), default=None,
                        help="e2e: sampling steps (default 28; smoke 4)")
    from .flux_model import flux_preset

    published = ",".join(f"{t:g}" for t in flux_preset()[2])
    parser.add_argument("--thresholds", type=cli_args.thresholds, default=None,
                        help=f"e2e: thresholds besides 0 (default: the FLUX preset's published ones, {published})")
    parser.add_argument("--host-cost", choices=HOST_COST, default="include",
                        help="e2e: the host-cost row (this library vs the official TeaCache script vs "
                             "diffusers' FirstBlockCache and MagCache on a 1+1-block model): include "
                             "(default), only, skip")
    parser.add_argument("--note", default="", metavar="TEXT",
                        help="a line written into the results files (e.g. 'measured under load')")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows (compiling costs seconds per shape)")


def run(args: argparse.Namespace) -> int:
    if args.what == "e2e":
        from . import bench_e2e
        return bench_e2e.run(args)
    from . import bench_ops
    return bench_ops.run(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="teacache-fast bench", description=HELP)
    add_arguments(parser)
    return cli_args.run_parsed(parser, run, argv)
