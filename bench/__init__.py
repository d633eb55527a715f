"""Benchmarks: each script runs alone (`python -m bench.NAME [--quick]`) and prints its figures last, as name=value."""
