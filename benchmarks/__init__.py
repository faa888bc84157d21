"""Benchmarks that print numbers; none of them asserts on time."""
