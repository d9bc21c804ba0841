"""Request and app logs, written in batches to ``auxiliary.db`` (``_logs``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from .database import Database
from .tools.security import random_id
from .tools.times import now

LOGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS _logs (
    id TEXT PRIMARY KEY DEFAULT ('r'||lower(hex(randomblob(7)))) NOT NULL,
    level INTEGER DEFAULT 0 NOT NULL,
    message TEXT DEFAULT '' NOT NULL,
    data JSON DEFAULT '{}' NOT NULL,
    created TEXT DEFAULT '' NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_logs_level ON _logs (level);
CREATE INDEX IF NOT EXISTS idx_logs_message ON _logs (message);
CREATE INDEX IF NOT EXISTS idx_logs_created_hour ON _logs (strftime('%Y-%m-%d %H:00:00', created));
"""
DEBUG, INFO, WARN, ERROR = -4, 0, 4, 8
_FLUSH_SECONDS = 0.5
_MAX_BATCH = 500
_MAX_PENDING = 20_000

logger = logging.getLogger("server")


class LogWriter:
    """Queues log entries and writes them in one transaction every half second."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[tuple[str, int, str, str, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.dropped = 0

    async def prepare(self) -> None:
        """Create the ``_logs`` table if needed (``flush`` writes into it)."""
        for statement in LOGS_SCHEMA.strip().split(";"):
            if statement.strip():
                await self._db.execute(statement)

    async def start(self) -> None:
        await self.prepare()
        self._task = asyncio.create_task(self._run(), name="log-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    def add(self, level: int, message: str, data: dict[str, Any]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1  # never let a logging backlog grow memory without bound
            return
        self._pending.append((random_id(), level, message, json.dumps(data, default=str), now()))
        if len(self._pending) >= _MAX_BATCH:
            self._wake.set()

    def error(self, message: str, **data: Any) -> None:
        logger.error("%s %s", message, data)
        self.add(ERROR, message, data)

    def info(self, message: str, **data: Any) -> None:
        self.add(INFO, message, data)

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            async with self._db.transaction() as tx:
                await tx.executemany("INSERT INTO _logs (id, level, message, data, created) VALUES (?,?,?,?,?)", batch)
        except Exception:  # a log that cannot be written must not take a request down
            logger.exception("could not write %d log entries", len(batch))

    async def delete_older_than(self, days: int) -> int:
        if days <= 0:
            return await self._db.execute("DELETE FROM _logs")
        return await self._db.execute(
            "DELETE FROM _logs WHERE created < strftime('%Y-%m-%d %H:%M:%fZ', 'now', ?)", (f"-{days} days",)
        )

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _FLUSH_SECONDS)
            self._wake.clear()
            await self.flush()
