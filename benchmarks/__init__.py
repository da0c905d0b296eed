"""Benchmarks: each prints one JSON object on the last line of stdout."""
