"""Starting the gridserve Serve app on a loopback Ray for the HTTP tests: one Ray and Serve kept from module to
module (SharedServe, through tests/serve/conftest.py), since their start-up is most of a module's time."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from tests.loopback import LOOPBACK, free_port, loopback_cluster

Nodes = tuple[dict[str, Any], ...]  # ray.init resources of the head node, then of each simulated extra node
ONE_NODE: Nodes = ({"num_cpus": 4},)
TWO_NODES: Nodes = ({"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 2, "num_gpus": 2})  # 2 logical GPUs each
App = tuple[dict[str, Any], dict[str, Any]]  # (GridServeConfig args, Serve deployment options)


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


class SharedServe:
    """Serve on a loopback Ray, kept between modules. A module asking for the nodes and apps that run now gets them
    as they are (modules that only read from an app share it); otherwise every app is deleted, the cluster
    restarted if its nodes differ, and the module's apps deployed."""

    def __init__(self) -> None:
        """Nothing runs until the first `serve`."""
        self.metrics_port = free_port()  # Ray's Prometheus exporter, on one-node clusters
        self.url = ""
        self._nodes: Nodes | None = None
        self._apps = ""  # the running apps' key; '' while none or while a deployment is half done
        self._stack = ExitStack()

    def serve(self, nodes: Nodes, apps: dict[str, App]) -> str:
        """Run exactly `apps` (name -> app; 'gridserve' under '/', others under '/<name>') on `nodes`; the base
        URL."""
        key = json.dumps(apps, sort_keys=True, default=str)
        if nodes != self._nodes:
            self.close()
            self._start(nodes)
        elif key == self._apps:
            return self.url
        else:
            self._delete_apps()
        self._apps = ""
        for name, (args, options) in apps.items():
            deploy(args, name=name, route_prefix="/" if name == "gridserve" else f"/{name}", **options)
        self._apps = key
        return self.url

    def _start(self, nodes: Nodes) -> None:
        """A fresh loopback Ray on `nodes` and Serve on a free port."""
        head, *others = nodes
        metrics = {} if others else {"_metrics_export_port": self.metrics_port}
        self._stack.enter_context(loopback_cluster({**head, **metrics}, *others))
        self.url = self._stack.enter_context(serve_on_loopback())
        self._nodes = nodes

    def _delete_apps(self) -> None:
        """Delete every Serve application (a test may have run its own), waiting until each is gone."""
        from ray import serve

        for name in list(serve.status().applications):
            serve.delete(name)

    def close(self) -> None:
        """Shut Serve and Ray down (if started)."""
        try:
            self._stack.close()
        finally:
            self._stack, self._nodes, self._apps, self.url = ExitStack(), None, "", ""
