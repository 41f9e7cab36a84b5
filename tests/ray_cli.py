"""A real Ray cluster driven through its CLI from tests: finding and stopping its processes, `ray job submit`."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.waits import wait_until

REPO = Path(__file__).resolve().parents[1]


def processes_with(marker: str) -> set[int]:
    """Pids whose command line mentions `marker`, with all their descendants."""
    parents: dict[int, int] = {}
    hits: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmd:
            hits.add(int(entry.name))
    found, frontier = set(hits), set(hits)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def stop_processes(marker: str) -> None:
    """SIGTERM the cluster we started (found by its private temp dir), SIGKILL what is left after 10 s."""
    pids = processes_with(marker) - {os.getpid()}
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}
            time.sleep(0.2)


def _state(pid: int) -> str:
    """A process's state letter ('' if it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def submit(url: str, env: dict[str, str], args: list[str], job_id: str, wait: bool = True) -> str:
    """`ray job submit` of the batch module from the repository (retried while the job agent starts)."""
    cmd = ["ray", "job", "submit", "--address", url, "--working-dir", str(REPO), "--submission-id", job_id]
    cmd += ([] if wait else ["--no-wait"]) + ["--", "python", "-m", "deployments.batch"] + args

    def attempt() -> str:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        return "" if "No available agent" in out else out

    return wait_until(attempt, 90, "the job agent to accept the submission", poll_s=1)
