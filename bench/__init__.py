"""Benchmarks: run from the repository root, e.g. ``python -m bench.compare`` (``make bench``)
or ``python -m bench.s3_memory`` (``make bench-s3``)."""
