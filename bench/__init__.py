"""Benchmarks (not tests): each prints a table comparing gridserve with a reference in the same run."""
