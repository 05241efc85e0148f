"""Benchmarks and load tests: `python -m bench` (one table, JSON results) and `python -m bench load`."""
