"""Fault-injection points for crash tests.

``PB_FAULTS`` is a comma-separated list of point names; reaching a listed point kills the process
with SIGKILL, as a power cut would. Unset (always, outside tests), a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

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
