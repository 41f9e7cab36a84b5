"""A process's scheduling priority, set on every thread (Linux keeps one niceness per thread)."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("gridserve.nice")


def set_nice(nice: int, setting: str) -> None:
    """Give every thread of this process niceness `nice` (threads started later inherit their creator's).
    Lowering it needs CAP_SYS_NICE: without, the process keeps what it has and a warning names `setting`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except PermissionError:
            log.warning("%s=%d: not permitted here (needs CAP_SYS_NICE); this process keeps niceness %d", setting,
                        nice, os.getpriority(os.PRIO_PROCESS, 0))
            return
        except OSError:
            continue  # a thread that ended meanwhile
