"""The model worker's niceness: every thread of its process, threads started later too, and a refusal that only
warns."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from cluster.config import GridServeConfig

PROBE = """
import os, threading
from actors.worker import set_nice

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
    set_nice(base + 3)
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
    """Without CAP_SYS_NICE the worker keeps Ray's niceness and says so; it never fails to start."""
    from actors import worker

    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(worker.os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger="gridserve.worker"):
        worker.set_nice(0)
    assert "worker_nice=0" in caplog.text and "CAP_SYS_NICE" in caplog.text


def test_worker_nice_is_checked_and_optional(model_dirs: dict) -> None:
    """Out-of-range values are refused by name; None keeps Ray's; the default brings workers back to 0."""
    from pydantic import ValidationError

    model = str(model_dirs["llama_gqa"])
    assert GridServeConfig(model=model).worker_nice == 0
    assert GridServeConfig(model=model, worker_nice=None).worker_nice is None
    with pytest.raises(ValidationError, match="worker_nice"):
        GridServeConfig(model=model, worker_nice=20)
