"""Loopback-only Ray for tests: one free-port helper and one cluster helper, used by every fixture."""
from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


# Ports handed out by this process, so two calls never return the same one.
_GIVEN: set[int] = set()
# Ray's worker processes take ports 10002-19999 by default; the ones above 20000 are ours to pick.
_LOWEST = 20000
# Its own generator: drawing ports must not move the global `random` state that seeded tests rely on.
_RNG = random.Random()


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to bind(0) and outgoing connections (32768 when unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port on loopback, below the kernel's ephemeral range.

    A port from bind(0) is ephemeral: between this check and the server's bind, any process (Ray's own daemons
    starting up, an outgoing connection) may be handed it, and `ray start` then fails with "address already in
    use". Ports below that range are only ever taken by an explicit bind."""
    floor = _ephemeral_floor()
    candidates = [p for p in _RNG.sample(range(_LOWEST, floor), min(200, floor - _LOWEST))
                  if p not in _GIVEN] if floor - _LOWEST >= 1000 else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextmanager
def loopback_cluster(head: dict[str, Any], *others: dict[str, Any]) -> Iterator[Any]:
    """Ray bound to 127.0.0.1: a local node (`head` holds ray.init's resources and options), or with `others` a
    simulated multi-node cluster (yielded). Shut down on exit."""
    import ray

    if not others:
        ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, **head)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    # Cluster derives the GCS address from the outward-facing interface; keep everything on loopback.
    original = services.node_ip_address_from_perspective
    services.node_ip_address_from_perspective = lambda address=None: LOOPBACK
    cluster = Cluster(initialize_head=True, head_node_args={**head, "node_ip_address": LOOPBACK,
                                                           "include_dashboard": False})
    try:
        for node in others:
            cluster.add_node(**node, node_ip_address=LOOPBACK)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        services.node_ip_address_from_perspective = original


def spawn_ranks(target: Callable[[int, int, Any], None], size: int, timeout_s: float = 180) -> dict[int, tuple]:
    """Run `target(rank, port, queue)` in `size` fresh processes that rendezvous on a free loopback port; each puts
    (rank, *result) on the queue. Returns rank -> result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        return {r: tuple(rest) for r, *rest in (queue.get(timeout=timeout_s) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()  # a process this helper started
