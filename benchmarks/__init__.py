"""Benchmark scripts (run them as files: see benchmarks/README.md)."""
