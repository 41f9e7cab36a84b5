"""`gridserve` command: serve, batch, plan, status, make-model."""
from __future__ import annotations

import os
import sys
from pathlib import Path


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


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a given 127.0.0.1 instead of the outward address


def pin_local_ray_to_loopback() -> None:
    """A Ray this process (or a child) starts takes 127.0.0.1 as its node address: GCS, raylets, object managers,
    workers. Ray reads the setting on import, so call this before importing Ray, and only in processes that start
    their own Ray (a driver joining a remote cluster would then advertise 127.0.0.1)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")


def loopback_if_starting_ray(args: list[str]) -> None:
    """If the command will start its own local Ray (no --address, no RAY_ADDRESS, none running), keep that Ray's
    GCS, raylet, object manager and workers on 127.0.0.1 (Ray otherwise swaps in the outward-facing address).

    Must run before `ray` is imported; a cluster being joined is left exactly as it is.
    """
    joining = any(a == "--address" or a.startswith("--address=") for a in args) or os.environ.get("RAY_ADDRESS")
    if not joining and not local_ray_running():
        pin_local_ray_to_loopback()


def main(argv: list[str] | None = None) -> int:
    """Dispatch `gridserve serve|batch|plan|status|make-model ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: gridserve {serve [CONFIG] | batch ARGS... | plan MODEL ... | status [--url URL] [--png F] | "
             "make-model [OUT] ...}")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        config = rest[0] if rest else "ray_config.yaml"
        # Serve's proxy reaches replicas over gRPC instead of actor calls: ~1-2 ms less per request (BENCHMARKS.md).
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
        loopback_if_starting_ray([])
        os.execvp("serve", ["serve", "run", config, *rest[1:]])  # Serve starts local Ray when none runs
    if cmd == "batch":
        loopback_if_starting_ray(rest)
        from deployments.batch import main as batch_main
        return batch_main(rest)
    if cmd == "plan":
        from deployments.plan import main as plan_main
        return plan_main(rest)
    if cmd == "status":
        from deployments.status import main as status_main
        return status_main(rest)
    if cmd == "make-model":
        from deployments.make_model import main as make_main
        make_main(rest)
        return 0
    print(f"gridserve: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
