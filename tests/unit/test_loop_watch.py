"""The health check's view of the engine loop: stalled only when requests wait and no step ran for the limit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments import llm_server
from deployments.llm_server import LoopWatch


def engine(steps: int, running: int = 0, waiting: int = 0, dead: str | None = None) -> SimpleNamespace:
    """What LoopWatch reads of an AsyncEngine."""
    return SimpleNamespace(stats=SimpleNamespace(steps=steps), num_running=running, num_waiting=waiting, dead=dead)


def test_stalled_only_with_work_and_no_step_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle engines and stepping engines are fine however long; one with requests and no step for > limit is not."""
    now = [100.0]
    monkeypatch.setattr(llm_server.time, "monotonic", lambda: now[0])
    watch = LoopWatch()
    assert watch.stalled(engine(5, running=2), 10) is None  # first look: the clock starts
    now[0] = 109.0
    assert watch.stalled(engine(5, running=2), 10) is None  # within the limit
    now[0] = 111.0
    why = watch.stalled(engine(5, running=2, waiting=1), 10)
    assert why is not None and "3 requests" in why and "11 s" in why
    assert watch.stalled(engine(6, running=2), 10) is None  # it stepped: the clock restarts
    now[0] = 200.0
    assert watch.stalled(engine(6), 10) is None  # nothing to do is not a stall
    now[0] = 300.0
    assert watch.stalled(engine(6, running=1, dead="grid failed"), 10) is None  # a dead grid has its own path
