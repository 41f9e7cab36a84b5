"""/metrics for a whole app: every model replica posts its Prometheus text to one small named actor, and whichever
ingress replica Serve picks answers with all of them merged (series keep their `replica` label), so a scrape
never jumps between replicas.

A replica posts at each of Serve's health checks (`health_check_period_s`, 10 s by default), so figures are at
most that old; a replica that stops posting for `STALE_S` is dropped. The board holds nothing that cannot be
posted again: if it is lost with the process that created it, the next post makes a new one.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("gridserve.serve")
STALE_S = 60.0  # a replica silent this long (several health periods) is gone


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest metrics text of each model replica of one app."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, bytes]] = {}

    def post(self, replica: str, text: bytes) -> None:
        """Replace `replica`'s text."""
        self.texts[replica] = (time.monotonic(), text)

    def drop(self, replica: str) -> None:
        """Forget a replica that shut down."""
        self.texts.pop(replica, None)

    def texts_now(self) -> list[bytes]:
        """Every live replica's text (stale ones dropped)."""
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t < STALE_S}
        return [text for _, text in self.texts.values()]


def board(app: str) -> Any:
    """The app's board, made by the first caller (ingress or replica) that asks for it."""
    return MetricsBoard.options(name=f"gridserve-metrics-{app}", get_if_exists=True).remote()  # type: ignore[attr-defined]


class _Families:
    """A prometheus_client collector over already parsed metric families."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)


def merge(texts: list[bytes]) -> bytes:
    """One exposition of several replicas' texts: each family once, with every replica's samples."""
    families: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name in families:
                families[family.name].samples += family.samples
            else:
                families[family.name] = family
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)
