"""`gridserve` command: serve, batch, plan, status, make-model."""
from __future__ import annotations

import os
import sys


def local_ray_running() -> bool:
    """Whether a Ray cluster already runs on this machine (then Serve joins it as it is)."""
    try:
        from ray._private.services import find_gcs_addresses  # Ray is pinned; a missing helper means "assume yes"
    except ImportError:
        return True
    return bool(find_gcs_addresses())


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
        if not os.environ.get("RAY_ADDRESS") and not local_ray_running():
            # Serve will start a local Ray: keep its GCS, raylet and object manager on loopback too.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.execvp("serve", ["serve", "run", config, *rest[1:]])  # Serve starts local Ray when none runs
    if cmd == "batch":
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
