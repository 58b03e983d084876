"""Op benchmark: the same as ``teacache-fast bench ops``; see teacache_fast/bench_ops.py.

    python benchmarks/bench_ops.py                 # all sizes, bf16 + fp32
    python benchmarks/bench_ops.py --quick         # small sizes, few repeats
    python benchmarks/bench_ops.py --sizes flux --dtypes bf16
"""
import sys

from teacache_fast.bench_ops import main

if __name__ == "__main__":
    sys.exit(main())
