"""Neighborhood attention vs dense cuDNN SDPA, FlexAttention and NATTEN (thin script over ``visattn bench``).

Usage: python benchmarks/bench_neighborhood.py [visattn bench options]
Results go to benchmarks/results/ unless --out is given.
"""

import sys

from visattn.cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", "benchmarks/results"]
    sys.exit(main(["bench", "--methods", "neighborhood", *args]))
