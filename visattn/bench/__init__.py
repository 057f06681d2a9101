"""Benchmark suites behind ``visattn bench`` (one module per method, shared harness)."""

SUITES = {
    "block_sparse": "visattn.bench.block_sparse",
    "neighborhood": "visattn.bench.neighborhood",
}
