"""Niceness of the model workers and the Serve replicas: every thread of the process, threads started later too,
and a refusal that only warns."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from cluster.config import GridServeConfig

PROBE = """
import os, threading
from actors.shard.niceness import set_nice

def nice_of(task):
    try:  # a thread may end between listing and reading
        with open(f"/proc/self/task/{task}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])
    except FileNotFoundError:
        return None

stop = threading.Event()
running = threading.Thread(target=stop.wait, daemon=True)  # daemon: an error below cannot leave it waiting
running.start()
try:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    set_nice(base + 3, "worker_nice")
    later = []
    started = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0)))
    started.start()
    started.join()
    nices = [n for t in os.listdir("/proc/self/task") if (n := nice_of(t)) is not None]
finally:
    stop.set()
running.join()
print(base, min(nices), max(nices), later[0], len(nices))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's per-thread /proc")
def test_every_thread_and_later_ones_get_the_niceness() -> None:
    """Raising niceness needs no privilege: all threads (not just the caller) move, and new threads inherit it."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    base, low, high, later, threads = map(int, out.stdout.split())
    want = min(base + 3, 19)
    assert threads >= 2
    assert low == high == later == want


def test_a_refused_niceness_warns_and_goes_on(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Without CAP_SYS_NICE the process keeps Ray's niceness and says which setting; it never fails to start."""
    from actors.shard import niceness

    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(niceness.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="gridserve.nice"):
        niceness.set_nice(0, "serve_nice")
    assert "serve_nice=0" in caplog.text and "CAP_SYS_NICE" in caplog.text


@pytest.mark.parametrize("field", ["worker_nice", "serve_nice"])
def test_nice_settings_are_checked_and_optional(model_dirs: dict, field: str) -> None:
    """Out-of-range values are refused by name; None keeps Ray's; the default brings the processes back to 0."""
    from pydantic import ValidationError

    model = str(model_dirs["llama_gqa"])
    assert getattr(GridServeConfig(model=model), field) == 0
    assert getattr(GridServeConfig(model=model, **{field: None}), field) is None
    with pytest.raises(ValidationError, match=field):
        GridServeConfig(model=model, **{field: 20})
