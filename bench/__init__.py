"""Benchmarks (not tests): each prints a table comparing gridserve with a reference in the same run."""
from cluster.loopback import pin_local_ray_to_loopback

pin_local_ray_to_loopback()  # every benchmark starts its own Ray; this runs before any benchmark module imports Ray
