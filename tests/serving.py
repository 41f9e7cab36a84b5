"""Starting the gridserve Serve app on a loopback Ray for the HTTP tests (module fixtures call these)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.loopback import LOOPBACK, free_port, loopback_cluster


@contextmanager
def serve_on_loopback() -> Iterator[str]:
    """Serve's HTTP proxy on a free loopback port of the connected Ray; yields the base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        serve.shutdown()


def deploy(args: dict, name: str = "gridserve", route_prefix: str = "/", **deployment_options: Any) -> None:
    """Deploy the gridserve app with `args` as application `name` under `route_prefix`; returns once its replicas
    run."""
    from ray import serve

    from cluster.config import GridServeConfig
    from deployments.serve_app import make_app

    serve.run(make_app(GridServeConfig(**args), **deployment_options), name=name, route_prefix=route_prefix)


@contextmanager
def serving(args: dict, metrics_port: int | None = None, **deployment_options: Any) -> Iterator[str]:
    """A local loopback Ray (Ray's metrics exporter on `metrics_port` if given) serving the app; the base URL."""
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    with loopback_cluster({"num_cpus": 4, **extra}), serve_on_loopback() as url:
        deploy(args, **deployment_options)
        yield url
