"""Benchmarks: `python -m bench.suite` (whole pytest runs) and `python -m bench.backends`."""
