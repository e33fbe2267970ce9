"""Benchmarks that measure clrsearch against a baseline in the same run (docs/benchmarks.md)."""
