"""A minute-resolution job scheduler for the server's lifespan (cron expressions via croniter)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from croniter import croniter

from .errors import NotFound

Job = Callable[[], Awaitable[None]]
TEST_MINUTE_ENV = "PB_TEST_CRON_MINUTE_SECONDS"
logger = logging.getLogger("server.cron")


@dataclass
class Entry:
    id: str
    expression: str
    run: Job


class Scheduler:
    """Runs each job at the start of every minute its expression matches (UTC).

    ``tick_seconds`` is the period between checks (60 in production; tests may shorten it and
    pass a ``clock`` so that no test waits for a real minute).
    """

    def __init__(self, tick_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._jobs: dict[str, Entry] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tick = tick_seconds
        self._clock = clock
        self.on_error: Callable[[str, BaseException], None] = lambda job_id, exc: logger.error(
            "cron job %s failed: %s", job_id, exc
        )

    @classmethod
    def from_env(cls) -> "Scheduler":
        """The production scheduler, or, with ``PB_TEST_CRON_MINUTE_SECONDS=S`` set (a test hook),
        one whose clock runs so fast that a minute lasts ``S`` real seconds."""
        raw = os.environ.get(TEST_MINUTE_ENV, "")
        if not raw:
            return cls()
        seconds = float(raw)
        start = time.time()
        return cls(tick_seconds=seconds, clock=lambda: start + (time.time() - start) * 60.0 / seconds)

    def add(self, job_id: str, expression: str, run: Job) -> None:
        if not croniter.is_valid(expression):
            raise ValueError(f"invalid cron expression {expression!r}")
        self._jobs[job_id] = Entry(job_id, expression, run)

    def remove(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def jobs(self) -> list[Entry]:
        return sorted(self._jobs.values(), key=lambda entry: entry.id)

    def run_now(self, job_id: str) -> None:
        """Start a job in the background at once (``NotFound`` for an unknown id)."""
        entry = self._jobs.get(job_id)
        if entry is None:
            raise NotFound("Missing or invalid cron job.")
        self._spawn(entry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cron-scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        self._running.clear()

    def due(self, moment: datetime) -> list[Entry]:
        minute = moment.replace(second=0, microsecond=0)
        return [entry for entry in self._jobs.values() if croniter.match(entry.expression, minute)]

    async def _loop(self) -> None:
        last_minute: datetime | None = None
        while True:
            current = self._clock()
            await asyncio.sleep(self._tick - (current % self._tick) if self._tick >= 60 else self._tick)
            moment = datetime.fromtimestamp(self._clock(), timezone.utc).replace(second=0, microsecond=0)
            if moment == last_minute:
                continue
            last_minute = moment
            for entry in self.due(moment):
                self._spawn(entry)

    def _spawn(self, entry: Entry) -> None:
        running = self._running.get(entry.id)
        if running is not None and not running.done():
            logger.warning("cron job %s is still running; this run is skipped", entry.id)
            return
        task = asyncio.create_task(self._guarded(entry), name=f"cron:{entry.id}")
        self._running[entry.id] = task

    async def _guarded(self, entry: Entry) -> None:
        try:
            await entry.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing job is reported, never kills the scheduler
            self.on_error(entry.id, exc)
