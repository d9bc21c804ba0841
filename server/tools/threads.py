"""Worker threads for background work that must not slow the requests down.

A backup or restore keeps both cores busy (deflate, inflate, SHA-256, SQLite's checks). Run at the
same priority as the event loop, those threads take the cores from it, and the API's latency
triples while a job runs. On Linux a thread has a nice value of its own (``setpriority`` with
the thread's id), so the job's threads run at ``BACKGROUND_NICE``: the scheduler then gives the
event loop, SQLite's connection threads and the other processes a core whenever they want one,
and the job still uses every core that is idle.

A thread cannot take its priority back without privileges, so only threads created for such
work are lowered: the pools made here, never the event loop's default executor.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

def _nice_from_env(default: int = 19) -> int:
    try:
        return max(0, min(19, int(os.environ.get("PB_JOB_NICE", default))))
    except ValueError:
        return default


# CFS weight 15 against 1024 for nice 0: the job gets what the app leaves idle. ``PB_JOB_NICE``
# (0-19) sets another value, e.g. 0 to measure what the priority costs the job.
BACKGROUND_NICE = _nice_from_env()


def lower_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Lower the calling thread's priority to ``nice`` (never raise it); False where not possible."""
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or refused
        return False


def thread_priority(tid: int | None = None) -> int:
    """The nice value of a thread (the calling one by default)."""
    return os.getpriority(os.PRIO_PROCESS, tid if tid is not None else threading.get_native_id())


def background_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at the background priority."""
    return ThreadPoolExecutor(max(1, workers), thread_name_prefix=name, initializer=lower_priority)
