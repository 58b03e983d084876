"""Op benchmark: the same as ``teacache-fast bench ops``; see teacache_fast/cli/bench_ops.py.

    python benchmarks/bench_ops.py                 # all sizes, bf16 + fp32 -> ./teacache-bench/
    python benchmarks/bench_ops.py --quick         # small sizes, few repeats
    python benchmarks/bench_ops.py --sizes flux --dtypes bf16
    python benchmarks/bench_ops.py --out benchmarks/results   # update the committed tables
"""
import sys

from teacache_fast.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["ops", *sys.argv[1:]]))
