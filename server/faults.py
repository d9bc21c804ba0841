"""Fault-injection points for crash tests.

``PB_FAULTS`` is a comma-separated list of point names; reaching a listed point kills the process
with SIGKILL, as a power cut would. Unset (always, outside tests), a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "PB_FAULTS"


def point(name: str) -> None:
    armed = os.environ.get(ENV)
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


class InjectedFault(RuntimeError):
    pass


def raise_point(name: str) -> None:
    """Like ``point``, but raises ``InjectedFault`` (a failure the process survives)."""
    armed = os.environ.get(ENV)
    if armed and "raise:" + name in armed.split(","):
        raise InjectedFault(f"injected fault at {name}")


GATE_ENV = "PB_FAULTS_GATE"


def gate(name: str) -> None:
    """With ``gate:<name>`` armed, wait here while the file named by ``PB_FAULTS_GATE`` exists.

    Lets a test hold a job at a known step, act, then release it by deleting the file. If the file
    holds a number N > 0, N passes go through first (it counts down; at 0 the gate holds), so a
    test can stop a job after exactly N steps. Blocking: only reached from worker threads."""
    armed = os.environ.get(ENV)
    if not armed or "gate:" + name not in armed.split(","):
        return
    path = os.environ.get(GATE_ENV, "")
    try:
        passes = int(open(path).read().strip() or 0) if path else 0
    except (OSError, ValueError):
        passes = 0
    if passes > 0:
        with open(path, "w") as handle:
            handle.write(str(passes - 1))
        return
    while path and os.path.exists(path):
        time.sleep(0.01)
