"""End-to-end benchmark: the same as ``teacache-fast bench e2e``; see teacache_fast/bench_e2e.py.

    python benchmarks/bench_e2e.py                 # two model sizes, writes results/e2e-<device>.md
    python benchmarks/bench_e2e.py --quick
"""
import sys

from teacache_fast.bench_e2e import main

if __name__ == "__main__":
    sys.exit(main())
