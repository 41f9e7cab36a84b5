"""Benchmarks (not tests): each prints a table comparing gridserve with a reference in the same run."""
import os

# Every benchmark starts its own local Ray; keep it on 127.0.0.1 (read by Ray on import, and this package's
# __init__ runs before any benchmark module imports Ray). Without it Ray swaps 127.0.0.1 for the outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
