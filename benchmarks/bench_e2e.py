"""End-to-end benchmark: the same as ``teacache-fast bench e2e``; see teacache_fast/cli/bench_e2e.py.

    python benchmarks/bench_e2e.py                 # two model sizes + the host-cost row -> ./teacache-bench/
    python benchmarks/bench_e2e.py --quick
    python benchmarks/bench_e2e.py --host-cost only --out benchmarks/results   # update the committed table
"""
import sys

from teacache_fast.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["e2e", *sys.argv[1:]]))
