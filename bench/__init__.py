"""Benchmarks: `python -m bench.<name>`; each prints a table and one JSON line last (docs/benchmarks.md)."""
