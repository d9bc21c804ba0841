"""The replicator: ships both databases' LTX files to the replica (Litestream's ``replica.go``).

One task per server. While replication is enabled it:
- starts a lineage (a directory ``<lineage>/`` of the replica) with a snapshot of each database:
  at each start of the server, and after each restore (full or partial), so that a lineage never
  mixes the states of before and after a restore, and a restore to a moment only ever reads one;
- every ``syncInterval`` ms in which something was written, reads the new WAL frames of each
  database (``db.DBReplica.capture``), stages them as one level-0 LTX file and uploads the staged
  files in order; no write, no request (idle costs nothing);
- checkpoints a WAL once it has grown past ``db.CHECKPOINT_BYTES`` (TRUNCATE, right after reading
  it, under the write lock);
- takes a new snapshot every ``snapshotInterval`` hours, and deletes what is older than
  ``retention`` hours (never the newest snapshot and what follows it);
- when the replica cannot be reached, keeps the staged files (the lag grows, ``lastError`` says
  why) and retries with a backoff; past ``MAX_STAGED_BYTES`` of staged files it drops them and
  starts a new lineage once the replica answers again. Writes never fail, and the WAL stays
  checkpointed meanwhile.
- in sync mode (``syncInterval: 0``) a write's answer waits until the file that holds it is in
  the replica (fsynced, or the S3 PUT answered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import faults
from ..backups import crypto
from ..logs import WARN
from ..tools.security import random_string
from . import restore as replica_restore
from . import ltx
from .client import FileClient, ReplicaClient, S3Client
from .db import CHECKPOINT_BYTES, DBReplica, Staged

if TYPE_CHECKING:
    from ..app import App

logger = logging.getLogger("server.replication")
S3_PREFIX = "replica/"
# Test hooks: PB_REPLICA_MAX_STAGED_BYTES, PB_REPLICA_RETENTION_SECONDS (retention in seconds,
# checked every second), PB_REPLICA_SNAPSHOT_SECONDS (below).
MAX_STAGED_BYTES = int(os.environ.get("PB_REPLICA_MAX_STAGED_BYTES") or 256 << 20)
RETENTION_SECONDS_ENV = "PB_REPLICA_RETENTION_SECONDS"
# Level-0 files (one per sync) are compacted into one level-1 file every this many seconds, so that
# a restore reads at most a day of level-1 files and 5 minutes of level-0 ones after a snapshot
# (PB_REPLICA_COMPACT_SECONDS: a test hook).
COMPACT_SECONDS = float(os.environ.get("PB_REPLICA_COMPACT_SECONDS") or 300)
RETENTION_CHECK_SECONDS = 1.0 if os.environ.get(RETENTION_SECONDS_ENV) else 3600.0
SYNC_WAIT_SECONDS = 30.0  # sync mode: a write waits at most this long for the replica


SNAPSHOT_SECONDS_ENV = "PB_REPLICA_SNAPSHOT_SECONDS"  # a test hook: snapshotInterval in seconds


def settings_of(app: "App") -> dict[str, Any]:
    return app.settings.data["backups"]["replication"]


def snapshot_seconds(app: "App") -> float:
    return float(os.environ.get(SNAPSHOT_SECONDS_ENV) or settings_of(app)["snapshotInterval"] * 3600)


class _Hook:
    """What a ``Database`` calls (``Database.replica``)."""

    def __init__(self, replicator: "Replicator", replica: DBReplica) -> None:
        self.replicator = replicator
        self.replica = replica

    def wrote(self) -> Any:
        self.replica.note_write()
        return self.replicator.wrote()

    def before_checkpoint(self) -> bool:
        return self.replica.before_checkpoint()

    async def quiesce(self) -> None:
        await self.replica.quiesce()  # (a file swap: no more reads of it until the new lineage)

    def replaced(self) -> None:
        self.replica.ready = False  # nothing of the new file goes into the old lineage
        self.replicator.request_lineage("a restore replaced the database")


class Replicator:
    def __init__(self, app: "App") -> None:
        self.app = app
        self.staging = app.datadir.root / ".pb_replica"
        self.state_file = app.datadir.root / ".pb_replica_state.json"  # the lineage in progress
        self._resume: str | None = None
        self.replicas: list[DBReplica] = []
        self.client: ReplicaClient | None = None
        self.lineage = ""
        self.last_error: str | None = None
        self.bytes = 0
        self.window_from: float | None = None
        self.window_to: float | None = None
        self._queue: list[Staged] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._new_lineage: str | None = None
        self._config: tuple[Any, ...] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._write_seq = 0
        self._captured_seq = 0
        self._overflowed = False
        self._last_snapshot = 0.0
        self._last_retention = 0.0
        self._backoff = 0.0
        self._next_upload = 0.0  # (monotonic) uploads wait for this after a failure
        self._stopping: tuple[bool] | None = None
        self._stop = asyncio.Event()
        self._round_estimate = 0.0  # seconds a round takes (a moving average)
        self._lineage_started = 0.0
        self._snapshot_txids: list[int] = []  # each database's TXID at the last snapshot
        # Uploaded level-0 files kept on the local disk until they are compacted: per database,
        # [(path, min TXID, max TXID)] of the current lineage.
        self._compactable: dict[str, list[tuple[Path, int, int]]] = {}
        self._last_compaction = time.time()

    # --- configuration -----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(settings_of(self.app)["enabled"])

    def _client_for(self) -> tuple[ReplicaClient, tuple[Any, ...]]:
        conf = settings_of(self.app)
        if conf.get("path"):
            path = Path(conf["path"])
            return FileClient(path), ("local", str(path))
        s3 = self.app.settings.data["backups"]["s3"]
        if s3["enabled"]:
            storage = self.app.backups.storage()
            return S3Client(storage, S3_PREFIX), ("s3", repr(storage.config))
        path = self.app.datadir.backups / "replica"
        return FileClient(path), ("local", str(path))

    def client_now(self) -> ReplicaClient:
        return self._client_for()[0]

    async def apply_settings(self, boot: bool = False) -> None:
        """Start, stop or restart after a settings change, or at the server's start (``boot``:
        only then may the lineage of the last run go on)."""
        if not self.enabled:
            await self.stop()
            # Writes from now on reach no replica: a later start must not go on with the lineage.
            await asyncio.to_thread(self.state_file.unlink, True)
            return
        client, key = self._client_for()
        conf = settings_of(self.app)
        config = key + (conf["syncInterval"], conf["snapshotInterval"], conf["retention"])
        if self._task is not None and not self._task.done():
            if config[:2] == (self._config or ())[:2]:
                self._config = config  # the intervals are read at each round
                self._wake.set()
                return
            await self.stop()
        self._config = config
        self.client = client
        await self._start(resume=boot)

    def _target(self) -> str:
        assert self._config is not None
        return f"{self._config[0]}:{self._config[1]}"

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("lineage"), str) else None

    def _write_state(self) -> None:
        temp = self.state_file.with_name(self.state_file.name + ".tmp")
        with open(temp, "w") as out:
            json.dump({"lineage": self.lineage, "target": self._target()}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.state_file)

    async def _start(self, resume: bool = False) -> None:
        await asyncio.to_thread(shutil.rmtree, self.staging, True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.replicas = [DBReplica("data.db", self.app.db, self.staging),
                         DBReplica("auxiliary.db", self.app.aux_db, self.staging)]
        for replica in self.replicas:
            replica.db.replica = _Hook(self, replica)
            await replica.db.set_autocheckpoint(False)
        self._new_lineage = "the server started"
        # At the server's start, the lineage of the last run goes on (same replica, and the data
        # were not replaced meanwhile: a restore moves this file aside with the data it replaces).
        state = await asyncio.to_thread(self._read_state) if resume else None
        self._resume = state["lineage"] if state is not None and state.get("target") == self._target() else None
        self._task = asyncio.create_task(self._run(), name="replication")

    async def stop(self, final_sync: bool = False) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = (final_sync and self.last_error is None, )
            self._wake.set()
            self._stop.set()
            try:
                await asyncio.wait_for(task, 15)
            except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
                pass
            self._stopping = None
            self._stop.clear()
        for replica in self.replicas:
            replica.db.replica = None
            replica.close()
            try:
                await replica.db.set_autocheckpoint(True)
            except Exception:
                pass
        self.replicas = []
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()

    # --- the write path ----------------------------------------------------------------------

    def wrote(self) -> Any:
        self._write_seq += 1
        self._wake.set()
        if self._task is None or settings_of(self.app)["syncInterval"] != 0:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._write_seq, future))
        return self._durable(future)

    async def _durable(self, future: "asyncio.Future[None]") -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), SYNC_WAIT_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("replication: a write was answered before the replica held it (sync mode)")

    def request_lineage(self, reason: str, since: float | None = None) -> None:
        """A new lineage at the next round; with ``since`` (a time), not if one began or is
        asked for since then (a partial restore whose file swap asked already)."""
        if since is not None and (self._new_lineage is not None or self._lineage_started >= since):
            return
        self._new_lineage = reason
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.client is not None
        try:
            await self._refresh_layout()
        except Exception as exc:
            self._fail(exc)
        self._wake.set()
        while True:
            if not self._wake.is_set():
                timeout = self._next_timer()
                if self._queue:  # files waiting for a replica that failed: try again after the backoff
                    timeout = min(timeout, max(0.05, self._next_upload - time.monotonic()))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            if self._stopping is not None:
                if self._stopping[0]:
                    await self._round(True)  # the last writes, before the databases close
                return
            # A round runs when the oldest write not yet read would otherwise wait longer than
            # syncInterval (less the time a round takes): each write is in the replica within
            # about syncInterval, and rounds come at most that often while writes go on.
            delay = 0.0
            pending = [r.first_write for r in self.replicas if r.first_write is not None]
            if pending and self._new_lineage is None:
                interval = settings_of(self.app)["syncInterval"] / 1000
                # (5% to spare: the round may start late on a busy machine)
                delay = min(pending) + 0.95 * interval - self._round_estimate - time.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if self._stopping is not None:
                self._wake.set()
                continue
            started = time.monotonic()
            # While the replica fails, rounds go on reading the WAL and checkpointing it (its
            # bound holds); only the uploads wait for the backoff.
            upload = started >= self._next_upload
            try:
                await self._round(upload)
                if upload:
                    self._backoff = 0.0
                    self._round_estimate = 0.7 * self._round_estimate + 0.3 * min(1.0, time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(exc)
                self._backoff = min(30.0, max(1.0, self._backoff * 2))
                self._next_upload = time.monotonic() + self._backoff

    def _next_timer(self) -> float:
        snapshot_due = self._last_snapshot + snapshot_seconds(self.app) - time.time()
        retention_due = self._last_retention + RETENTION_CHECK_SECONDS - time.time()
        return max(1.0, min(snapshot_due, retention_due))

    def _fail(self, exc: BaseException) -> None:
        from ..backups.manager import describe_error

        message = describe_error(exc)
        if message != self.last_error:
            logger.warning("replication: %s", message)
            self.app.logs.add(WARN, "Replication failed", {"error": message})
        self.last_error = message

    async def _round(self, upload: bool = True) -> None:
        assert self.client is not None
        if self._new_lineage is not None and (not self._overflowed or (upload and await self._reachable())):
            reason, self._new_lineage = self._new_lineage, None
            await self._begin_lineage(reason)
        elif time.time() - self._last_snapshot > snapshot_seconds(self.app):
            if [r.txid for r in self.replicas] != self._snapshot_txids:
                await self._snapshot()
            else:  # nothing written since the last one: an idle database costs nothing
                self._last_snapshot = time.time()
        seq = self._write_seq
        for replica in self.replicas:
            if replica.first_write is not None or replica.wal_size() > CHECKPOINT_BYTES:
                async with replica.db.write_locked():
                    await asyncio.to_thread(replica.capture)
                if replica.wal_size() > CHECKPOINT_BYTES:
                    await replica.checkpoint_in_two()
                staged = await replica.encode_pending()
                if staged:
                    faults.point("replica-staged")
                if self._overflowed:  # read (the WAL stays bounded) and dropped: a new lineage follows
                    for item in staged:
                        item.path.unlink(missing_ok=True)
                    continue
                self._queue += staged
        self._captured_seq = seq
        if not upload:  # (backing off after a failure)
            if sum(s.size for s in self._queue) > MAX_STAGED_BYTES:
                self._overflow()
            return
        if time.time() - self._last_compaction > COMPACT_SECONDS and self._compactable:
            await self._compact()
        await self._upload()
        if time.time() - self._last_retention > RETENTION_CHECK_SECONDS:
            await self._retention()

    async def _reachable(self) -> bool:
        assert self.client is not None
        try:
            await asyncio.to_thread(self.client.probe)
            return True
        except Exception as exc:
            self._fail(exc)
            return False

    async def _begin_lineage(self, reason: str) -> None:
        resume, self._resume = self._resume, None
        if resume is not None and await self._resume_lineage(resume):
            return
        self.lineage = replica_restore.new_lineage_name(random_string(6, "0123456789abcdef"))
        self._drop_queue()
        self._overflowed = False
        self._lineage_started = time.time()
        for replica in self.replicas:
            self._queue += await replica.snapshot(self.lineage, new=True)
        self._last_snapshot = time.time()
        self._snapshot_txids = [r.txid for r in self.replicas]
        await asyncio.to_thread(self._write_state)
        logger.info("replication: lineage %s begun (%s)", self.lineage, reason)
        self.app.logs.info("Replication lineage begun", lineage=self.lineage, reason=reason)

    async def _resume_lineage(self, lineage: str) -> bool:
        """Go on with ``lineage`` after a restart: a snapshot of each database now, with the TXID
        after the last one in the replica (what the last run staged but never sent is in it).
        False (a new lineage, then) if the replica cannot tell where that lineage ended."""
        assert self.client is not None
        try:
            layout = replica_restore.Layout.of(await asyncio.to_thread(self.client.list, lineage + "/"))
        except Exception as exc:
            self._fail(exc)
            return False
        last = {}
        for replica in self.replicas:
            entries = layout.entries.get(lineage, {}).get(replica.name, [])
            if not entries:
                return False
            last[replica.name] = max(e.max_txid for e in entries)
        self.lineage = lineage
        self._drop_queue()
        self._overflowed = False
        for replica in self.replicas:
            self._queue += await replica.snapshot(lineage, new=False, start_txid=last[replica.name] + 1)
        self._last_snapshot = time.time()
        self._snapshot_txids = [r.txid for r in self.replicas]
        logger.info("replication: lineage %s goes on after a restart", lineage)
        self.app.logs.info("Replication lineage resumed", lineage=lineage)
        return True

    async def _snapshot(self) -> None:
        for replica in self.replicas:
            self._queue += await replica.snapshot(self.lineage, new=False)
        self._last_snapshot = time.time()
        self._snapshot_txids = [r.txid for r in self.replicas]

    def _drop_queue(self) -> None:
        for staged in self._queue:
            staged.path.unlink(missing_ok=True)
        self._queue.clear()
        self._drop_compactable()

    async def _upload(self) -> None:
        assert self.client is not None
        while self._queue:
            staged = self._queue[0]
            recipients = crypto.recipients_of(self.app.settings.data)
            try:
                if recipients:  # backups.encryption: the replica's files are age files too
                    sealed = staged.path.with_name(staged.path.name + ".age")
                    await asyncio.to_thread(_seal, staged.path, sealed, recipients)
                    try:
                        await asyncio.to_thread(self.client.put, staged.key, sealed, staged.timestamp)
                    finally:
                        sealed.unlink(missing_ok=True)
                else:
                    await asyncio.to_thread(self.client.put, staged.key, staged.path, staged.timestamp)
            except Exception:
                if sum(s.size for s in self._queue) > MAX_STAGED_BYTES:
                    self._overflow()
                raise
            self._queue.pop(0)
            if "/ltx/0/" in staged.key:
                faults.point("replica-uploaded")
                self._keep_for_compaction(staged)
            else:
                staged.path.unlink(missing_ok=True)
            self.bytes += staged.size
            self.window_to = staged.timestamp / 1000
            if self.window_from is None:
                self.window_from = self.window_to
            self.last_error = None
        self._release_waiters(self._captured_seq)

    def _keep_for_compaction(self, staged: Staged) -> None:
        lineage, db, _, _, name = staged.key.split("/")
        span = ltx.parse_filename(name)
        if lineage != self.lineage or span is None:
            staged.path.unlink(missing_ok=True)
            return
        kept = self.staging / "compact"
        kept.mkdir(exist_ok=True)
        target = kept / f"{db}_{name}"
        os.replace(staged.path, target)
        self._compactable.setdefault(db, []).append((target, span[0], span[1]))

    def _drop_compactable(self) -> None:
        for files in self._compactable.values():
            for path, _, _ in files:
                path.unlink(missing_ok=True)
        self._compactable.clear()

    async def _compact(self) -> None:
        """The level-0 files of each database since the last compaction, as one level-1 file
        (uploaded with the next files; the level-0 ones stay in the replica until retention)."""
        self._last_compaction = time.time()
        for db, files in list(self._compactable.items()):
            run: list[tuple[Path, int, int]] = []
            for item in files:  # the consecutive files that end with the newest
                run = run + [item] if run and item[1] == run[-1][2] + 1 else [item]
            if len(run) >= 2:
                name = ltx.filename(run[0][1], run[-1][2])
                path = self.staging / f"{time.time_ns():020d}_compact_{db}_{name}"

                def write() -> ltx.Header:
                    with open(path, "wb") as out:
                        return ltx.compact([str(p) for p, _, _ in run], out)

                header = await asyncio.to_thread(write)
                self._queue.append(Staged(path, f"{self.lineage}/{db}/ltx/1/{name}", header.timestamp,
                                          path.stat().st_size, None))
            for path, _, _ in files:
                path.unlink(missing_ok=True)
            del self._compactable[db]

    def _overflow(self) -> None:
        """The replica stayed away past the bound of waiting files: they go, and a new lineage
        begins once it answers again (meanwhile the WAL is still read and checkpointed)."""
        self._drop_queue()
        self._overflowed = True
        self.request_lineage("the replica was unreachable for too long")
        logger.error("replication: the replica stayed unreachable; a new snapshot will be taken once it answers again")
        self.app.logs.add(WARN, "Replication: the replica stayed unreachable; the waiting files were dropped and a "
                          "new lineage begins once it answers again", {})

    def _release_waiters(self, seq: int) -> None:
        keep = []
        for wanted, future in self._waiters:
            if wanted <= seq:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((wanted, future))
        self._waiters = keep

    async def _refresh_layout(self) -> replica_restore.Layout:
        assert self.client is not None
        layout = replica_restore.Layout.of(await asyncio.to_thread(self.client.list))
        self.bytes = layout.bytes
        window = layout.window()
        if window is not None:
            self.window_from = window[0]
        return layout

    async def _retention(self) -> None:
        """Delete what is older than ``retention`` hours: whole lineages that ended before, and in
        the current one, snapshots (and the files they supersede) older than the newest snapshot
        taken before that moment."""
        assert self.client is not None
        self._last_retention = time.time()
        cutoff = time.time() - float(os.environ.get(RETENTION_SECONDS_ENV) or settings_of(self.app)["retention"] * 3600)
        layout = replica_restore.Layout.of(await asyncio.to_thread(self.client.list))
        doomed: list[str] = []
        for lineage in layout.lineages():
            dbs = layout.entries[lineage]
            newest = max(e.file.modified for es in dbs.values() for e in es)
            if lineage != self.lineage and newest < cutoff:
                doomed += [e.file.key for es in dbs.values() for e in es]
                continue
            for db in dbs:
                old = [s for s in layout.snapshots(lineage, db) if s.file.modified < cutoff]
                if len(old) < 1:
                    continue
                keep = old[-1]
                doomed += [s.file.key for s in old[:-1]]
                doomed += [e.file.key for e in layout.incrementals(lineage, db)
                           if e.max_txid <= keep.max_txid and e.file.modified < cutoff]
        if doomed:
            await asyncio.to_thread(self.client.delete, doomed)
        await self._refresh_layout()

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        from ..tools.times import format_datetime
        from datetime import datetime, timezone

        def stamp(value: float | None) -> str | None:
            return None if value is None else format_datetime(datetime.fromtimestamp(value, timezone.utc))

        running = self._task is not None and not self._task.done()
        oldest = [r.first_write for r in self.replicas if r.first_write is not None]
        oldest += [s.first_write for s in self._queue if s.first_write is not None]
        if self._queue and not oldest:
            oldest = [self._queue[0].timestamp / 1000]
        now = time.time()
        lag = int((now - min(oldest)) * 1000) if oldest else 0
        # Every moment before the oldest write not yet in the replica can be restored; with none
        # pending, this very moment can.
        to = None
        if running and self.window_to is not None:
            to = min(oldest) if oldest else now
        return {"enabled": self.enabled and running, "lagMs": lag if running else 0,
                "window": {"from": stamp(self.window_from), "to": stamp(to)},
                "bytes": self.bytes, "lastError": self.last_error, "lineage": self.lineage or None,
                "requests": self.client.requests if self.client is not None else 0}


def _seal(source: Path, target: Path, recipients: list[str]) -> None:
    import pyrage

    with open(source, "rb") as plain, open(target, "wb") as out:
        pyrage.encrypt_io(plain, out, [crypto.parse_recipient(r) for r in recipients])
