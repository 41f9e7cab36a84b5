"""`gridserve` command: serve, batch, plan, status, make-model."""
from __future__ import annotations

import os
import sys

from cluster.loopback import loopback_if_starting_ray


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
        if config.endswith((".yaml", ".yml")) and not os.path.isfile(config):
            print(f"gridserve serve: config file {config!r} not found in {os.getcwd()}; run it from the repository "
                  "root (where ray_config.yaml is) or pass the file's path: gridserve serve PATH/ray_config.yaml",
                  file=sys.stderr)
            return 2
        # Serve's proxy reaches replicas over gRPC instead of actor calls: less per request (BENCHMARKS.md).
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
        # Every method of ours is async and waits only in awaits (steps go over non-blocking sockets), so Serve may
        # run it, and the ingress's handle router, on the replica's own event loop: no thread hop per streamed
        # chunk (BENCHMARKS.md, "Serve's own loop for our methods").
        os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
        os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
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
