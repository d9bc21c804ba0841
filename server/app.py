"""The application core: the data directory, its databases and the services built on them.

``App`` is what the HTTP layer, the CLI and (later) the backup manager share. It holds no HTTP
concerns; ``server.api.create_asgi_app`` wraps it for uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from . import faults
from .backups import BackupManager, partial, restore
from .backups.manager import describe_error
from .collections import SUPERUSERS, CollectionStore
from .cron import Scheduler
from .database import Database
from .datadir import DataDir
from .logs import LogWriter
from .records import RecordService
from .replication.replica import Replicator
from .settings import Settings

logger = logging.getLogger("server")
AUTO_BACKUP_JOB = "__pbAutoBackup__"
STALE_CHECK_SECONDS = 60.0  # how often the server asks whether backups went stale (issue 15)
STALE_CHECK_ENV = "PB_STALE_CHECK_SECONDS"  # a test hook: a shorter period
DIR_IN_USE = "another process (a restore from the command line) is using this data directory"


@asynccontextmanager
async def opened(data_dir: str | Path) -> AsyncIterator["App"]:
    """An ``App`` opened for one-off work (the CLI), closed afterwards."""
    app = App(data_dir)
    await app.open()
    try:
        yield app
    finally:
        await app.close()


class App:
    def __init__(self, data_dir: str | Path, *, scheduler: Scheduler | None = None) -> None:
        self.datadir = DataDir(Path(data_dir).resolve())
        self.db = Database(self.datadir.data_db)
        self.aux_db = Database(self.datadir.aux_db)
        self.collections = CollectionStore(self.db, self.datadir)
        self.records = RecordService(self.db, self.collections, self.datadir)
        self.settings = Settings(self.db)
        self.settings.data_root = self.datadir.root
        self.logs = LogWriter(self.aux_db)
        self.scheduler = scheduler or Scheduler.from_env()
        self.backups = BackupManager(self.datadir, self.db, self.aux_db, self.settings, self.logs)
        self.backups.collections = self.collections  # (partial restores)
        self.replication = Replicator(self)  # (issue 16; started by ``start`` when enabled)
        self.backups.replication = self.replication
        self._started = False
        self._serving = False  # set by start(): a serving process
        self._stale_watch: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the databases and bring their schema up to date (no background tasks).

        If a restore swapped new data in before the process re-executed, this is its first boot:
        the old data is deleted if the new data opens, and put back if it does not."""
        root = self.datadir.root
        # Start-up maintenance (emptying the temp directory, finishing a restore's swap) needs the
        # backup lock: another process (the CLI, or a server) may have a job in progress here.
        maintenance = await self._maintenance_lock()
        try:
            await self._open_maintained(root, maintenance)
        finally:
            if maintenance and self.backups.active is None:
                self.backups.lock.release_job()

    async def _maintenance_lock(self) -> bool:
        """Take the backup lock for start-up maintenance. If another process holds it and a
        restore's swap awaits its end here, wait for that process (it is finishing the restore);
        otherwise go on without maintenance."""
        lock = self.backups.lock
        deadline = asyncio.get_running_loop().time() + 60
        while not lock.try_job():
            if restore.read_journal(self.datadir.root) is None:
                return False
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("a restore in progress in another process holds the data directory")
            await asyncio.sleep(0.1)
        return True

    async def _open_maintained(self, root: Path, maintenance: bool) -> None:
        outcome = await asyncio.to_thread(restore.interrupted, root) if maintenance and root.exists() else None
        journal = await asyncio.to_thread(restore.pending, root) if maintenance and root.exists() else None
        await asyncio.to_thread(self.datadir.prepare, maintenance)
        try:
            if journal is not None:
                faults.point("restore-booting")
                faults.raise_point("restore-boot")
            await self._open_data()
        except Exception as exc:
            if journal is None:
                raise
            logger.exception("the restored data failed to open")
            await self._close_data()
            outcome = await asyncio.to_thread(restore.rollback, root, journal, describe_error(exc))
            journal = None
            await self._open_data()
        if journal is not None:
            # A server serves the new data while the old is deleted (or kept, to be saved as a
            # backup: ``preserve_replaced``); the CLI waits for it.
            outcome = await asyncio.to_thread(restore.commit, root, journal, self._serving)
            faults.point("restore-committed")
        if outcome is None and maintenance:
            # A restore committed before this start, whose replaced data still awaits its copy.
            outcome = await asyncio.to_thread(restore.committed_outcome, root)
        if outcome is not None:
            self.backups.record_restore_outcome(outcome)
        if maintenance:  # a partial restore the process was stopped in: completed or taken back
            interrupted = await asyncio.to_thread(partial.recover, root)
            if interrupted is not None:
                self.backups.record_restore_outcome(restore.Outcome(
                    interrupted["key"], interrupted["startedAt"], interrupted["ok"], interrupted["error"]))
                await self.collections.reload()

    async def _open_data(self) -> None:
        await self.db.open()
        await self.aux_db.open()
        await self.collections.bootstrap()
        await self.settings.load()
        if self.settings.data["backups"]["replication"]["enabled"]:
            # Checkpoints belong to the replicator of the server (issue 16): this process (the CLI
            # beside a running server) must never checkpoint frames the server has not read.
            for database in (self.db, self.aux_db):
                await database.set_autocheckpoint(False)

    async def _close_data(self) -> None:
        # Side by side: each close waits for its connection threads (and the last one of a
        # database checkpoints its WAL), and a restore's downtime includes this.
        await asyncio.gather(self.aux_db.close(), self.db.close())

    async def start(self) -> None:
        """``open`` plus the background work of a serving process: log writer and scheduler."""
        if not self.backups.lock.hold_server():
            raise RuntimeError(DIR_IN_USE)
        self._serving = True
        await self.open()
        await self.logs.start()
        self._register_system_jobs()
        self._schedule_backups()
        self.settings.on_change(lambda _settings: self._schedule_backups())
        self.settings.on_change(lambda _settings: self.replication.apply_settings())
        self.scheduler.on_error = lambda job_id, exc: self.logs.error(f"Cron job {job_id} failed", error=str(exc))
        self.scheduler.start()
        self._started = True
        # The data a restore replaced becomes a backup now that the restored data is served.
        self.backups.start_preserving()
        self._stale_watch = asyncio.create_task(self._watch_stale(), name="backup-stale-watch")
        try:
            await self.replication.apply_settings(boot=True)
        except Exception as exc:  # never stops the server from serving: shown in the status
            logger.exception("replication could not start")
            self.replication.last_error = describe_error(exc)

    async def close(self) -> None:
        if self._started:
            if self._stale_watch is not None:
                self._stale_watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._stale_watch
                self._stale_watch = None
            await self.backups.shutdown()
            await self.backups.notifier.close()
            await self.scheduler.stop()
            await self.logs.stop()
            # Last: the final log lines are writes too; the last sync ships them.
            await self.replication.stop(final_sync=True)
            self.backups.lock.release_server()
            self._started = False
        await self._close_data()

    async def _watch_stale(self) -> None:
        """Every ``STALE_CHECK_SECONDS``: has a backup succeeded within ``staleAfterHours``? (an
        alert once if not; ``backupStale`` in the health answer)."""
        period = float(os.environ.get(STALE_CHECK_ENV) or STALE_CHECK_SECONDS)
        while True:
            if self.settings.data["backups"]["notify"]["staleAfterHours"]:
                try:
                    await self.backups.check_stale()
                except Exception as exc:  # the storage is away: tried again at the next period
                    logger.warning("the stale backup check failed: %s", exc)
            else:
                self.backups.backup_stale = False
            await asyncio.sleep(period)

    async def has_superuser(self) -> bool:
        return bool(await self.db.scalar(f'SELECT EXISTS (SELECT 1 FROM "{SUPERUSERS}")'))

    def _schedule_backups(self) -> None:
        """``__pbAutoBackup__`` follows ``settings.backups.cron``: added, changed or removed."""
        expression = self.settings.data["backups"]["cron"]
        if expression:
            self.scheduler.add(AUTO_BACKUP_JOB, expression, self.backups.auto_backup)
        else:
            self.scheduler.remove(AUTO_BACKUP_JOB)

    def _register_system_jobs(self) -> None:
        async def logs_cleanup() -> None:
            await self.logs.delete_older_than(int(self.settings.data["logs"]["maxDays"]))

        async def db_optimize() -> None:
            for database in (self.db, self.aux_db):
                await database.execute("PRAGMA optimize")
                await database.checkpoint()

        self.scheduler.add("__pbLogsCleanup__", "0 */6 * * *", logs_cleanup)
        self.scheduler.add("__pbDBOptimize__", "0 0 * * *", db_optimize)
