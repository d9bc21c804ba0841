"""Benchmarks: run from the repository root, e.g. ``python -m bench.s3_memory`` (or ``make bench``)."""
