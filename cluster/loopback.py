"""Keep a Ray that this process starts on 127.0.0.1 (Ray-free: it must run before `ray` is imported).

The knob: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray._private.ray_constants` is imported. At "0"
`ray.init(_node_ip_address="127.0.0.1")` keeps that address for the GCS, raylets, object managers and workers; at
its Linux default Ray swaps in the outward-facing address. Nothing here runs on import; callers call it.
"""
from __future__ import annotations

import os
from pathlib import Path

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a given 127.0.0.1 instead of the outward address


def local_ray_running() -> bool:
    """Whether a Ray cluster already runs on this machine (then it is joined as it is).

    Read from /proc, not through Ray: importing Ray fixes how it picks its node address, and the caller may still
    have to change that. Where /proc is missing the answer is "yes", which leaves Ray's defaults alone.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            program = cmdline.read_bytes().split(b"\0", 1)[0]
        except OSError:  # the process ended meanwhile
            continue
        if program.endswith((b"/gcs_server", b"/raylet")):
            return True
    return False


def pin_local_ray_to_loopback() -> None:
    """Set LOOPBACK_ENV=0 (unless the caller set it) so a Ray this process or a child starts stays on 127.0.0.1.

    Call before importing Ray, and only in processes that start their own Ray (a driver joining a remote cluster
    would then advertise 127.0.0.1)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")


def loopback_if_starting_ray(args: list[str]) -> None:
    """Pin to loopback if the command will start its own local Ray (no --address, no RAY_ADDRESS, none running);
    a cluster being joined is left exactly as it is. Must run before `ray` is imported."""
    joining = any(a == "--address" or a.startswith("--address=") for a in args) or os.environ.get("RAY_ADDRESS")
    if not joining and not local_ray_running():
        pin_local_ray_to_loopback()
