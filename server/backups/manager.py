"""The backup manager: one job at a time (create, upload or restore), whoever asks for it.

The HTTP API, the scheduler and the CLI all go through one ``BackupManager``. It owns the
single-flight lock, runs the work in a background task with the blocking parts in worker threads,
reports progress (``status``) and the outcome of the last job, and never lets a failed or
interrupted job leave a backup in the list.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import faults
from ..database import Database
from ..datadir import DataDir
from ..errors import ApiError, BadRequest, NotFound, ValidationError, field_error
from ..logs import WARN, LogWriter
from ..settings import Settings
from ..storage import FileInfo, InvalidKey, Storage, StorageError, StoredFileExists, StoredFileMissing
from ..storage.local import LocalStorage
from ..storage.s3_uploads import RECORD_FILE, UploadRecords
from ..tools.memory import release_free_memory
from ..tools.security import random_string
from ..tools.threads import background_pool
from ..tools.times import format_datetime, parse_datetime
from ..values import error
from .. import __version__
from . import archive, catalog, crypto, partial, restore
from .catalog import Catalog, CatalogError, CatalogFile
from .notify import Notifier
from .lock import ProcessLock
from .restore import Outcome

if TYPE_CHECKING:
    from ..collections import CollectionStore
    from ..storage.s3 import S3Storage

logger = logging.getLogger("server.backups")

NAME_RE = re.compile(r"^[a-z0-9_-]+\.zip$")
AUTO_PREFIX = "@auto_"  # scheduled backups: @auto_pb_backup_<app>_<UTC timestamp>.zip
PRE_RESTORE_PREFIX = "@pre_restore_"  # ours: the data a full restore replaced, @pre_restore_<app>_<UTC timestamp>.zip
_AUTO_ORDER_RE = re.compile(r"_(\d{14})(?:_(\d+))?\.zip$")
MAX_NAME_LENGTH = 150
STATUS_STORAGE_TIMEOUT = 3.0  # seconds the status waits for the storage's list (an S3 that hangs)
WRITABLE_TTL = 30.0  # seconds a storage's write check stays good (status is polled by dashboards)
BUSY_MESSAGE = "Try again later - another backup/restore process has already been started."
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class Busy(BadRequest):
    default_message = BUSY_MESSAGE


class InsufficientStorage(BadRequest):
    default_message = "Not enough free disk space to complete the operation."


# The heavy steps of a job (reading and deflating, extracting and checking) run on these threads,
# below the event loop's priority (``tools.threads``): the app stays responsive while a job runs.
_JOB_THREADS = background_pool(2, "backup-job")


async def _in_background(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_JOB_THREADS, functools.partial(fn, *args))


def slug(name: str) -> str:
    """The app name in snake_case, as in PocketBase's backup names (at most 50 characters)."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    text = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return text[:50].strip("_") or "pb"


def auto_name(app_name: str, prefix: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"{prefix}pb_backup_{slug(app_name)}_{stamp}.zip"


def safety_name(app_name: str) -> str:
    """The name of the safety copy of the data a restore replaces: ``@pre_restore_<app>_<UTC time>.zip``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"{PRE_RESTORE_PREFIX}{slug(app_name)}_{stamp}.zip"


def name_errors(name: str) -> dict[str, Any] | None:
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        return error("validation_length_out_of_range", f"The length must be between 1 and {MAX_NAME_LENGTH}.",
                     min=1, max=MAX_NAME_LENGTH)
    if not NAME_RE.fullmatch(name):
        return error("validation_match_invalid", "Must be in a valid format.")
    return None


def describe_error(exc: BaseException) -> str:
    """A reason safe to show a client: our own messages, or the OS error without its path."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{name}: {problem.get('message', '')}" for name, problem in exc.data.items()
                         if isinstance(problem, dict)) or exc.message
    if isinstance(exc, (archive.ArchiveError, StorageError, ApiError)):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return "not enough disk space"
        return exc.strerror or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return "not enough disk space"
    if isinstance(exc, asyncio.CancelledError):
        return "the job was interrupted"
    return type(exc).__name__


@dataclass
class Job:
    op: str
    key: str
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    bytes_done: int = 0
    bytes_total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    # A restore with a body (partial, or a dry run), and the summary it leaves (issue 14).
    request: partial.RestoreRequest | None = None
    summary: dict[str, Any] | None = None
    verified: str | None = None  # a restore's verification tier, once it passed (``archive.tier``)
    created_by: dict[str, Any] | None = None  # a backup's maker, for the catalog (``catalog.creator``)
    # An encrypted backup's identities, for this job only: never stored, logged or shown (issue 17).
    identities: crypto.Identities | None = field(default=None, repr=False)
    # What a job that wrote a backup knows of its encryption (create, safety copy, upload): for
    # the catalog's ``info`` (``encrypted``, the recipients' fingerprints).
    encryption: crypto.EncryptionFacts | None = None
    # A restore from the replica (issue 16): the backup-like zip of that moment, made by the job.
    local_zip: Path | None = None

    def advance(self, count: int) -> None:
        self.bytes_done += count  # from a worker thread; a plain int update is safe enough here

    def to_json(self) -> dict[str, Any]:
        out = {"op": self.op, "key": self.key, "startedAt": format_datetime(self.started_at),
               "bytesDone": self.bytes_done, "bytesTotal": self.bytes_total}
        if self.request is not None:
            out.update(self.request.describe())
        return out


@dataclass
class RestoreReady:
    """A verified backup extracted to ``new_dir``, waiting for the server to swap it in."""

    key: str
    new_dir: Path
    started_at: str
    verified: str | None = None  # the verification tier that passed (``archive.tier``)
    safety: dict[str, Any] | None = None  # the safety copy of the data replaced (``restore.swap_in``)


class BackupManager:
    def __init__(self, datadir: DataDir, db: Database, aux_db: Database, settings: Settings, logs: LogWriter) -> None:
        self.datadir = datadir
        self.db = db
        self.aux_db = aux_db
        self.settings = settings
        self.logs = logs
        self.active: Job | None = None
        self.last: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._s3: S3Storage | None = None  # kept while its settings stay the same: one boto3 client
        self._s3_uploads = UploadRecords(self.datadir.root / RECORD_FILE)
        self.lock = ProcessLock(datadir.root)  # one job at a time across processes (server and CLI)
        # Set by the server: called with a verified restore, it stops serving, swaps, re-execs.
        self.on_restore_ready: Callable[[RestoreReady], Awaitable[None]] | None = None
        # Set by the App: a partial restore rewrites collections and reloads their definitions.
        self.collections: CollectionStore | None = None
        self.replication: Any = None  # the App's replicator (issue 16)
        # Pins, the makers of uploads and the last successes, kept with the backups (issue 15).
        self.catalog = CatalogFile()
        self.backup_stale = False  # no backup succeeded for staleAfterHours (health; set by stats)
        self.started_at = datetime.now(timezone.utc)
        self._writable_checked: tuple[Any, float, bool] | None = None
        self.notifier = Notifier(lambda: self.settings.data["backups"]["notify"], lambda: self.settings.app_name,
                                 lambda event, reason: self.logs.add(WARN, "Backup alert not delivered",
                                                                     {"event": event, "error": reason}))

    # --- storage ---------------------------------------------------------------------------

    def storage(self) -> Storage:
        """Where backups go now: S3 while ``settings.backups.s3.enabled``, else ``pb_data/backups``.

        Read at each call, so that saving the settings switches storage without a restart; a job
        keeps the storage it started with."""
        s3 = self.settings.data["backups"]["s3"]
        if not s3["enabled"]:
            return LocalStorage(self.datadir.backups, self.datadir.temp)
        from ..storage.s3 import S3Config, S3Storage  # boto3 is imported only by those who use S3

        config = S3Config.from_settings(s3)
        if self._s3 is None or self._s3.config != config:
            self._s3 = S3Storage(config, self.datadir.temp, self._s3_uploads)
        return self._s3

    async def test_s3(self) -> None:
        """Write, read and delete a probe object with the saved S3 settings (``StorageError`` why not)."""
        storage = self.storage()
        if storage.kind != "s3":
            raise StorageError("S3 storage filesystem is not enabled.")
        await cast("S3Storage", storage).probe()

    # --- status ----------------------------------------------------------------------------

    @property
    def can_backup(self) -> bool:
        if self.active is not None:
            return False
        if not self.lock.try_job():  # a job of another process (the CLI)
            return False
        self.lock.release_job()
        return True

    async def status(self) -> dict[str, Any]:
        storage = self.storage()
        out: dict[str, Any] = {"active": self.active.to_json() if self.active else None, "last": self.last,
                               "storage": storage.describe(), "stats": None}
        try:
            out["stats"] = await asyncio.wait_for(self.stats(storage), STATUS_STORAGE_TIMEOUT)
        except (asyncio.TimeoutError, StorageError, CatalogError, OSError) as exc:
            out["statsError"] = describe_error(exc) if not isinstance(exc, asyncio.TimeoutError) else \
                "the storage did not answer in time"
        out["storage"].update(await self._storage_health(storage))
        return out

    def record_restore_outcome(self, outcome: Outcome) -> None:
        self.last = {"op": "restore", "key": outcome.key, "ok": outcome.ok, "error": outcome.error,
                     "startedAt": outcome.started_at, "finishedAt": format_datetime(datetime.now(timezone.utc)),
                     "verified": outcome.verified}
        if outcome.ok:
            self.logs.info("Backup restored", key=outcome.key)
            asyncio.ensure_future(self._remember_success(Job("restore", outcome.key)))
        else:
            self.logs.error("Backup restore failed", key=outcome.key, error=outcome.error or "")
            self.notify_event("failure", "restore", outcome.key, outcome.error or "")

    # --- the lock --------------------------------------------------------------------------

    def _acquire(self, op: str, key: str) -> Job:
        if self.active is not None or not self.lock.try_job():
            raise Busy()
        self.active = Job(op, key)
        return self.active

    def _record(self, job: Job, error: BaseException | None) -> None:
        self.last = {"op": job.op, "key": job.key, "ok": error is None,
                     "error": None if error is None else describe_error(error),
                     "startedAt": format_datetime(job.started_at),
                     "finishedAt": format_datetime(datetime.now(timezone.utc))}
        if job.request is not None:  # a partial restore or a dry run: what it did, or would do
            self.last.update(job.request.describe())
            self.last["summary"] = job.summary
        if job.verified is not None:
            self.last["verified"] = job.verified

    def _release(self, job: Job, error: BaseException | None) -> None:
        self._record(job, error)
        self._writable_checked = None  # the storage is checked again at the next status
        if job.op == "restore" and (job.request is None or not job.request.dry_run):
            if error is None:
                asyncio.ensure_future(self._remember_success(job))
                if job.request is not None and self.replication is not None and self.replication.enabled:
                    # The replica never mixes the states of before and after a restore (issue 16).
                    self.replication.request_lineage("a partial restore", job.started_at.timestamp())
            elif not isinstance(error, asyncio.CancelledError):
                self.notify_event("failure", job.op, job.key, self.last["error"])
        elif job.op == "create" and error is not None and not isinstance(error, asyncio.CancelledError):
            self.notify_event("failure", job.op, job.key, self.last["error"])
        if isinstance(error, ApiError) and error.status < 500:
            # Refused input (an upload that is not a backup): the client was told; a warning here.
            self.logs.add(WARN, f"Backup {job.op} refused", {"key": job.key, "error": self.last["error"]})
        elif error is not None:
            logger.error("backup %s of %s failed: %s", job.op, job.key, self.last["error"])
            self.logs.error(f"Backup {job.op} failed", key=job.key, error=self.last["error"])
        if self.active is job:
            self.active = None
            self.lock.release_job()
        # The job's buffers are freed by now; hand the memory back to the OS (off the event loop).
        asyncio.get_running_loop().run_in_executor(None, release_free_memory)

    def _spawn(self, job: Job, work: Awaitable[bool | None]) -> None:
        async def run() -> None:
            error: BaseException | None = None
            handed_over = False
            try:
                handed_over = bool(await work)
            except asyncio.CancelledError as exc:
                error = exc
            except Exception as exc:  # reported in status and the logs, never raised further
                error = exc
                logger.debug("backup job failed", exc_info=True)
            finally:
                if not handed_over:
                    self._release(job, error)

        self._task = asyncio.create_task(run(), name=f"backup-{job.op}")

    async def wait(self) -> None:
        """Wait for the running job (if any) to end."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    async def shutdown(self) -> None:
        """Stop the running job (the server is stopping): its partial output is discarded."""
        task = self._task
        if task is None or task.done():
            return
        if self.active is not None:
            self.active.cancel.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()

    # --- list, delete, read ----------------------------------------------------------------

    async def list(self) -> list[FileInfo]:
        with _storage_failure("Failed to retrieve backup items."):
            return await self.storage().list()

    async def stat(self, key: str) -> FileInfo | None:
        with _storage_failure("Failed to retrieve the backup file."):
            try:
                return await self.storage().stat(key)
            except InvalidKey:
                return None

    async def open_read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of ``key``. The first chunk is fetched before this returns, so
        that a storage failure becomes an error answer rather than a download cut short."""
        stream = self.storage().read(key, start, end)
        with _storage_failure("Failed to download the backup."):
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = b""
            except (InvalidKey, StoredFileMissing):
                raise NotFound() from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()

        return chunks()

    async def delete(self, key: str) -> None:
        if self.active is not None and self.active.key == key:
            raise BadRequest("The backup is in use by a running backup or restore; try again later.")
        storage = self.storage()
        with _storage_failure("Failed to delete the backup."):
            if (await self._read_catalog(storage)).pinned(key):
                if await self.stat(key) is None:
                    raise NotFound()
                raise BadRequest("The backup is pinned: unpin it first.")
            try:
                await storage.delete(key)
            except (InvalidKey, StoredFileMissing):
                raise NotFound() from None
        await self._forget(storage, [key])

    # --- create ----------------------------------------------------------------------------

    async def start_create(self, name: str | None = None, prefix: str = "",
                           created_by: dict[str, Any] | None = None) -> str:
        """Validate, take the lock and start a backup in the background; returns its key.

        ``created_by``: who asks (``catalog.creator``), recorded in the manifest."""
        with _storage_failure("Failed to create backup."):
            key, job = await self._begin_create(name, prefix)
        job.created_by = created_by
        self._spawn(job, self._create(job))
        return key

    async def create(self, name: str | None = None, prefix: str = "",
                     created_by: dict[str, Any] | None = None) -> str:
        """A backup, awaited to its end (the scheduler and CLI); raises if it failed."""
        key = await self.start_create(name, prefix, created_by)
        await self.wait()
        if self.last is None or self.last["key"] != key or not self.last["ok"]:
            raise BadRequest(f"The backup failed: {self.last['error'] if self.last else 'unknown error'}")
        return key

    async def auto_backup(self) -> None:
        """The ``__pbAutoBackup__`` cron job: a backup named ``@auto_pb_backup_...``, then only the
        newest ``cronMaxKeep`` of those are kept. A run that finds a job active is skipped (and
        logged); a failure is logged and shown in ``status().last``."""
        try:
            key = await self.start_create(prefix=AUTO_PREFIX, created_by={"kind": "scheduler"})
        except Busy:
            logger.warning("scheduled backup skipped: another backup/restore is running")
            self.logs.add(WARN, "Scheduled backup skipped: another backup/restore process is running", {})
            self.notify_event("skipped", "create", AUTO_PREFIX + "pb_backup",
                              "another backup/restore process is running")
            return
        except ApiError as exc:  # the storage cannot be used: no job started, so say it here
            self._record(Job("create", AUTO_PREFIX + "pb_backup"), exc)
            logger.error("scheduled backup failed: %s", exc.message)
            self.logs.error("Scheduled backup failed", error=exc.message)
            return
        await self.wait()
        if self.last is None or self.last["key"] != key or not self.last["ok"]:
            return  # logged and recorded by the job itself
        try:
            await self.apply_retention()
        except ApiError as exc:
            self.logs.error("Pruning scheduled backups failed", error=exc.message)

    async def _begin_create(self, name: str | None, prefix: str) -> tuple[str, Job]:
        if self.active is not None:
            raise Busy()
        storage = self.storage()
        if name:
            problem = name_errors(name)
            if problem is not None:
                raise ValidationError({"name": problem})
            key = name
            if await storage.exists(key):
                raise ValidationError({"name": field_error("validation_backup_name_exists",
                                                           "The backup file name is invalid or already exists.")})
        else:
            # ours: a second backup within the same second gets a suffix; PocketBase overwrites the first.
            key = auto_name(self.settings.app_name, prefix)
            stem, counter = key[:-len(".zip")], 2
            while await storage.exists(key):
                key, counter = f"{stem}_{counter}.zip", counter + 1
        return key, self._acquire("create", key)

    async def _create(self, job: Job) -> None:
        recipients = crypto.recipients_of(self.settings.data)
        async with _archive_writing(self.storage(), job, recipients) as (zipper, writer):
            async with AsyncExitStack() as snapshots:
                data_db = await snapshots.enter_async_context(self.db.snapshot(self.datadir.temp))
                aux_db = await snapshots.enter_async_context(self.aux_db.snapshot(self.datadir.temp))
                files = await asyncio.to_thread(archive.collect_files, self.datadir.root)
                databases = [_database_source("data.db", self.db, data_db),
                             _database_source("auxiliary.db", self.aux_db, aux_db)]
                job.bytes_total = sum(await asyncio.to_thread(_sizes, databases + files))
                # Per collection, its records and files at backup time (for the catalog, issue 14),
                # counted on a thread of its own while the databases are written.
                counting = asyncio.ensure_future(_in_background(partial.collection_counts, data_db,
                                                                [f.arcname for f in files]))
                try:
                    for source in databases:
                        await _in_background(zipper.add, source)
                finally:
                    counts = await counting
            # The databases are in; the snapshots are released so the WAL can be checkpointed again.
            for source in files:
                await _in_background(zipper.add, source, True)
            await _in_background(zipper.finish, {"app": self.settings.app_name, "collections": counts,
                                                 "serverVersion": __version__,
                                                 **({"createdBy": job.created_by} if job.created_by else {})})
        self.logs.info("Backup created", key=job.key, size=writer.bytes_written)
        await self._remember_success(job, fresh_key=True)

    # --- upload ----------------------------------------------------------------------------

    async def upload(self, filename: str, chunks: AsyncIterable[bytes], declared_size: int | None = None,
                     fields: dict[str, str] | None = None,
                     uploaded_by: dict[str, Any] | None = None) -> str:
        """Store an uploaded backup: streamed to a temp file, checked, then published.

        An age-encrypted file (issue 17) is accepted when its header is well-formed age; with an
        ``identity`` among ``fields`` (the form's other fields, complete once ``chunks`` is
        consumed) it is decrypted to a temp file and checked as a plain upload is, else it is
        stored unverified (``job.encryption``) and its restore checks it."""
        problem = name_errors(filename)
        if problem is not None:
            raise ValidationError({"file": problem})
        storage = self.storage()
        with _storage_failure("Failed to upload the backup."):
            if await storage.exists(filename):
                raise _name_exists()
        job = self._acquire("upload", filename)
        job.bytes_total = declared_size or 0
        temp = self.datadir.temp / f"upload_{random_string(12)}.zip"
        error: BaseException | None = None
        try:
            await self._receive(job, chunks, temp)
            identities = None
            if (fields or {}).get("identity"):
                try:
                    identities = crypto.parse_identities((fields or {})["identity"])
                except crypto.IdentityError as exc:
                    raise ValidationError({"identity": field_error("validation_invalid_identity", str(exc))}) from None
            head = await asyncio.to_thread(crypto.read_head, temp)
            try:
                if crypto.is_encrypted(head):
                    await _in_background(crypto.check_header, temp)
                    if identities:
                        await self._check_encrypted_upload(job, temp, identities)
                    job.encryption = crypto.EncryptionFacts(True, None, verified=bool(identities))
                elif not head.startswith(ZIP_MAGIC):
                    raise ValidationError({"file": field_error(
                        "validation_invalid_mime_type", f'"{filename}" mime type must be one of: application/zip.')})
                else:
                    await asyncio.to_thread(archive.check_upload, temp)
                    job.encryption = crypto.EncryptionFacts(False)
            except archive.ArchiveError as exc:
                raise ValidationError({"file": field_error("validation_invalid_backup", f"Invalid backup: {exc}.")})
            # What was received is checked: now it is stored (a rename on disk, an upload to S3).
            job.bytes_total, job.bytes_done = 2 * job.bytes_done, job.bytes_done
            try:
                with _storage_failure("Failed to upload the backup."):
                    await storage.put_file(filename, temp, job.advance)
            except StoredFileExists:
                raise _name_exists() from None
            self.logs.info("Backup uploaded", key=filename, size=job.bytes_done)
            maker = {"kind": "upload", **{k: v for k, v in (uploaded_by or {}).items() if k in ("id", "email")}}
            uploaded = format_datetime(datetime.now(timezone.utc))

            def edit(found: Catalog) -> None:
                found.backups[filename] = {"createdBy": maker, "uploadedAt": uploaded}
                if job.encryption is not None and job.encryption.encrypted:
                    found.backups[filename]["encryption"] = job.encryption.to_json()

            await self._note(storage, edit)
            return filename
        except BaseException as exc:
            error = exc
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise InsufficientStorage() from exc
            raise
        finally:
            await asyncio.to_thread(temp.unlink, True)
            self._release(job, error)

    async def _check_encrypted_upload(self, job: Job, temp: Path, identities: crypto.Identities) -> None:
        """An encrypted upload, decrypted with the request's identity to a temp file (removed
        after) and checked as a plain upload is."""
        plain = self.datadir.temp / f"upload_{random_string(12)}.decrypted.zip"
        try:
            await _in_background(crypto.decrypt_file, temp, plain, identities, None, job.cancel)
            await asyncio.to_thread(archive.check_upload, plain)
        finally:
            await asyncio.to_thread(plain.unlink, True)

    async def _receive(self, job: Job, chunks: AsyncIterable[bytes], temp: Path) -> None:
        def open_temp() -> Any:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            return os.fdopen(fd, "wb")

        handle = await asyncio.to_thread(open_temp)
        try:
            buffer = bytearray()
            async for chunk in chunks:
                buffer += chunk
                job.advance(len(chunk))
                if len(buffer) >= archive.CHUNK:
                    data = bytes(buffer)
                    buffer.clear()
                    await asyncio.to_thread(handle.write, data)
            if buffer:
                await asyncio.to_thread(handle.write, bytes(buffer))
        finally:
            await asyncio.to_thread(handle.close)

    # --- verify ----------------------------------------------------------------------------

    async def verify(self, key: str, progress: Callable[[str, int, int], None] | None = None,
                     quick: bool = False, identities: crypto.Identities | None = None) -> dict[str, Any]:
        """Check a backup without restoring it: fetched (from S3) and extracted into a temporary
        directory with every check of a restore (structure, manifest checksums), then deleted.
        The databases get the full ``integrity_check``, or with ``quick`` the restore's own tier
        (``archive.tier``). ``ArchiveError`` says why it is not restorable; returns
        ``{"files", "bytes", "manifest", "verified", "encrypted"}``. ``progress(step, done, total)``
        follows the work. An encrypted backup needs ``identities`` (``crypto.CryptoError`` else)."""
        storage = self.storage()
        info = await self.stat(key)
        if info is None:
            raise NotFound("Missing backup file.")
        work = self.datadir.temp / f"verify_{random_string(10)}"
        counters = {"step": "fetch", "done": 0, "total": info.size}

        def advance(count: int) -> None:
            counters["done"] += count
            if progress is not None:
                progress(str(counters["step"]), int(counters["done"]), int(counters["total"]))

        def set_total(total: int) -> None:
            counters.update(step="extract", done=0, total=total)
            advance(0)

        encrypted = False

        def decrypting(total: int) -> None:
            nonlocal encrypted
            encrypted = True
            counters.update(step="decrypt", done=0, total=total)
            advance(0)

        try:
            with _storage_failure("Failed to retrieve the backup file."):
                async with crypto.plain_copy(storage, key, self.datadir.temp, advance, identities,
                                             on_decrypt=decrypting, in_thread=_in_background) as zip_path:
                    manifest = await _in_background(archive.extract, zip_path, work / "data", advance, None,
                                                    set_total, not quick)
        except StoredFileMissing:
            raise NotFound("Missing backup file.") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        return {"files": len(manifest["files"]) if manifest is not None else None, "bytes": int(counters["total"]),
                "manifest": manifest is not None, "verified": archive.tier(manifest, not quick), "encrypted": encrypted}

    # --- restore ---------------------------------------------------------------------------

    async def start_restore(self, key: str, request: partial.RestoreRequest | None = None,
                            identities: crypto.Identities | None = None) -> None:
        """Check that ``key`` exists, take the lock and restore it in the background.

        ``request`` (a body): a partial restore (``server.backups.partial``, no re-exec) or a dry
        run, which verifies and leaves a summary without changing anything; None (no body, or
        one with only an identity): the full restore. ``identities`` decrypt an encrypted backup,
        for this job only."""
        if self.active is not None:
            raise Busy()
        if await self.stat(key) is None:
            raise BadRequest("Missing or invalid backup file.")
        if request is None and self.on_restore_ready is None:
            raise BadRequest("A restore needs the running server; use the API.")
        job = self._acquire("restore", key)
        job.identities = identities or None
        if request is None:
            self._spawn(job, self._restore(job))
            return
        job.request = request
        if request.partial:
            self._spawn(job, partial.run(self, job, request))
        else:
            self._spawn(job, self._restore_dry(job))

    async def start_replica_restore(self, at: datetime | None, request: partial.RestoreRequest | None = None,
                                    identities: crypto.Identities | None = None) -> None:
        """A restore of the moment ``at`` (None: the latest) from the replica (issue 16), as a
        backup's: the databases of that moment are rebuilt and verified (``replication.restore``)
        into a backup-like zip with the record files as they are now, which then goes the way of a
        backup's restore: full (safety copy, swap, re-exec), partial, or a dry run."""
        if self.replication is None or not self.replication.enabled:
            raise BadRequest("Replication is not enabled.")
        if self.active is not None:
            raise Busy()
        if request is None and self.on_restore_ready is None:
            raise BadRequest("A restore needs the running server; use the API.")
        key = "replica@" + (format_datetime(at) if at is not None else "latest")
        job = self._acquire("restore", key)
        job.request = request
        job.identities = identities or None
        self._spawn(job, self._replica_restore(job, at, request))

    async def _replica_restore(self, job: Job, at: datetime | None, request: partial.RestoreRequest | None) -> bool:
        from ..replication import restore as replica_restore

        work = self.datadir.temp / f"replica_{random_string(10)}"
        client = self.replication.client_now()
        try:
            try:
                job.local_zip, _info = await _in_background(
                    replica_restore.backup_zip, client, at.timestamp() if at is not None else None, self.datadir.root,
                    work, job.advance, job.cancel, job.identities)
                job.identities = None  # the zip of the moment is plain
            except replica_restore.ReplicaRestoreError as exc:
                raise BadRequest(f"The replica cannot restore that moment: {exc}.") from None
            if request is None:
                return await self._restore(job)
            if request.partial:
                await partial.run(self, job, request)
            else:
                await self._restore_dry(job)
            return False
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _restore_dry(self, job: Job) -> None:
        """A full restore's dry run: fetched, extracted and verified as for a restore, then its
        summary; nothing is swapped (issue 14)."""
        storage = self.storage()
        work = self.datadir.temp / f"restore_{random_string(10)}"

        def set_total(total: int) -> None:
            job.bytes_total, job.bytes_done = total, 0

        try:
            info = await storage.stat(job.key)
            job.bytes_total = info.size if info is not None else 0
            async with job_plain_copy(self, job) as zip_path:
                manifest = await _in_background(archive.extract, zip_path, work / "data", job.advance, job.cancel,
                                                set_total)
            job.verified = archive.tier(manifest)
            job.summary = await _in_background(partial.summarize_full, self.datadir.root, work / "data",
                                                  work / "summary")
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _restore(self, job: Job) -> bool:
        storage = self.storage()
        work = self.datadir.temp / f"restore_{random_string(10)}"
        target = work / "data"

        def set_total(total: int) -> None:
            # The download (from S3) is done; progress now counts the extraction.
            job.bytes_total, job.bytes_done = total, 0

        try:
            if restore.preserving(self.datadir.root) is not None:
                # The data an earlier restore replaced is not a backup yet: it is, before it can go.
                await self._preserve(job, replacing=True)
            info = await storage.stat(job.key)
            job.bytes_total = info.size if info is not None else 0  # the fetch first, if it is a download
            async with job_plain_copy(self, job) as zip_path:
                faults.point("restore-fetched")
                manifest = await _in_background(archive.extract, zip_path, target, job.advance, job.cancel, set_total)
                archive_size = (await asyncio.to_thread(zip_path.stat)).st_size
            await self._check_room_for_safety_copy(storage, archive_size, job.bytes_total)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        faults.point("restore-verified")
        assert self.on_restore_ready is not None
        await self.on_restore_ready(RestoreReady(job.key, target, format_datetime(job.started_at), archive.tier(manifest),
                                                 self._plan_safety_copy()))
        return True  # the job now belongs to the restart: the lock stays taken until the re-exec

    # --- alerts ---------------------------------------------------------------------------

    def notify_event(self, event: str, op: str, key: str, error: str | None) -> None:
        """A failure or a skipped scheduled run, to the webhook (in the background)."""
        self.notifier.send(event, op, key, error)

    async def check_stale(self) -> bool:
        """Whether no backup has succeeded for ``staleAfterHours``; the first time it is so (per
        last backup), the "stale" event goes out. Called periodically by the server."""
        storage = self.storage()
        found = await self._read_catalog(storage)
        files = await storage.list()
        self.backup_stale = self._stale(found, files)
        if not self.backup_stale:
            return False
        since = self._last_backup_time(found, files)
        marker = format_datetime(since) if since is not None else "never:" + format_datetime(self.started_at)
        if found.stale_alerted == marker:
            return True
        hours = self.settings.data["backups"]["notify"]["staleAfterHours"]
        last = found.last_backup or ({"key": None, "finishedAt": format_datetime(since)} if since else None)
        self.notifier.send("stale", "create", (last or {}).get("key") or "",
                           f"no backup has succeeded for {hours} hours", lastBackup=last, staleAfterHours=hours)

        def edit(changed: Catalog) -> None:
            changed.stale_alerted = marker

        await self._note(storage, edit)
        self.logs.add(WARN, "No backup has succeeded recently", {"staleAfterHours": hours})
        return True

    # --- the catalog: facts, pins, stats, prune and retention (issue 15) -------------------

    async def _read_catalog(self, storage: Storage) -> Catalog:
        return await self.catalog.read(storage)

    async def _forget(self, storage: Storage, keys: list[str], locked: bool = False) -> None:
        """Drop the catalog's facts of deleted backups. Best effort: a leftover entry is reset by the
        next backup of that name."""

        def edit(found: Catalog) -> None:
            for key in keys:
                found.backups.pop(key, None)

        try:
            known = (await self._read_catalog(storage)).backups
            if not any(key in known for key in keys):
                return
            await (self.catalog.change_locked(storage, edit) if locked else self.catalog.change(storage, edit))
        except (StorageError, OSError) as exc:
            logger.warning("could not update the backup catalog: %s", describe_error(exc))

    async def _note(self, storage: Storage, edit: Callable[[Catalog], Any]) -> None:
        """A change of the catalog that must never fail a job (logged when the storage refuses it)."""
        try:
            await self.catalog.change(storage, edit)
        except (StorageError, OSError) as exc:
            logger.warning("could not update the backup catalog: %s", describe_error(exc))
            self.logs.add(WARN, "Could not update the backup catalog", {"error": describe_error(exc)})

    async def _remember_success(self, job: Job, fresh_key: bool = False) -> None:
        finished = format_datetime(datetime.now(timezone.utc))

        def edit(found: Catalog) -> None:
            if fresh_key:
                found.backups.pop(job.key, None)  # a deleted backup's pin never passes to a new one
            found.last_success = {"op": job.op, "key": job.key, "finishedAt": finished}
            if job.op == "create":
                found.last_backup = {"key": job.key, "finishedAt": finished}
                found.stale_alerted = None
            if job.encryption is not None and job.encryption.encrypted:
                found.backups.setdefault(job.key, {})["encryption"] = job.encryption.to_json()

        await self._note(self.storage(), edit)
        if job.op == "create":
            self.backup_stale = False

    async def set_pinned(self, key: str, pinned: bool) -> None:
        """Pin (retention and prune never remove it, delete is refused) or unpin a backup."""
        if await self.stat(key) is None:
            raise NotFound()

        def edit(found: Catalog) -> None:
            entry = found.backups.setdefault(key, {})
            if pinned:
                entry["pinned"] = True
            else:
                entry.pop("pinned", None)
                if not entry:
                    found.backups.pop(key, None)

        with _storage_failure("Failed to pin the backup." if pinned else "Failed to unpin the backup."):
            await self.catalog.change(self.storage(), edit)
        self.logs.info("Backup pinned" if pinned else "Backup unpinned", key=key)

    async def list_with_pins(self) -> tuple[list[FileInfo], set[str] | None]:
        """The backups, and the pinned keys (None if the catalog cannot be read: the list still answers)."""
        files = await self.list()
        try:
            found = await self._read_catalog(self.storage())
        except (StorageError, OSError) as exc:
            logger.warning("could not read the backup catalog: %s", describe_error(exc))
            return files, None
        return files, {key for key, entry in found.backups.items() if entry.get("pinned")}

    async def info(self, key: str) -> dict[str, Any]:
        """What the backup ``key`` holds, from its zip directory and manifest (``catalog.describe_archive``)."""
        storage = self.storage()
        stat = await self.stat(key)
        if stat is None:
            raise NotFound()

        def read() -> dict[str, Any]:
            with storage.open_ranged(key) as handle:
                return catalog.describe_archive(handle)

        with _storage_failure("Failed to read the backup."):
            found = await self._read_catalog(storage)
            try:
                facts = await asyncio.to_thread(read)
            except StoredFileMissing:
                raise NotFound() from None
            except archive.ArchiveError as exc:
                raise BadRequest(f"The backup cannot be read: {exc}.") from None
        entry = found.backups.get(key, {})
        created_by = catalog.creator(entry.get("createdBy")) or facts["createdBy"] or catalog.kind_by_name(key)
        return {"key": key, "size": stat.size, "modified": format_datetime(stat.modified),
                "createdAt": facts["createdAt"] or format_datetime(stat.modified), "createdBy": created_by,
                "appName": facts["appName"], "serverVersion": facts["serverVersion"], "format": facts["format"],
                "encrypted": facts["encrypted"], "pinned": bool(entry.get("pinned")),
                # the recipients' fingerprints (not their keys) when we encrypted it; None if unknown
                **({"recipients": (entry.get("encryption") or {}).get("recipients")} if facts["encrypted"] else {}),
                "databases": facts["databases"], "files": facts["files"], "collections": facts["collections"]}

    async def stats(self, storage: Storage | None = None) -> dict[str, Any]:
        storage = storage or self.storage()
        files = await storage.list()
        found = await self._read_catalog(storage)
        ordered = sorted(files, key=_age_order)

        def brief(info: FileInfo | None) -> dict[str, Any] | None:
            return None if info is None else {"key": info.key, "modified": format_datetime(info.modified)}

        self.backup_stale = self._stale(found, files)
        return {"count": len(files), "totalSize": sum(info.size for info in files),
                "oldest": brief(ordered[0] if ordered else None), "newest": brief(ordered[-1] if ordered else None),
                "lastSuccess": found.last_success, "lastBackup": found.last_backup,
                "nextScheduled": self.next_scheduled(), "stale": self.backup_stale}

    def next_scheduled(self) -> str | None:
        expression = self.settings.data["backups"]["cron"]
        if not expression:
            return None
        from croniter import croniter

        moment = croniter(expression, datetime.now(timezone.utc)).get_next(datetime)
        return format_datetime(moment)

    def _last_backup_time(self, found: Catalog, files: list[FileInfo]) -> datetime | None:
        """When a backup of this server last succeeded: the catalog's record, else the newest backup
        the server made (not an upload, not a safety copy) in the storage."""
        recorded = (found.last_backup or {}).get("finishedAt")
        if isinstance(recorded, str):
            parsed = parse_datetime(recorded)
            if parsed is not None:
                return parsed
        made = [info.modified for info in files if not info.key.startswith(PRE_RESTORE_PREFIX)
                and ((found.backups.get(info.key) or {}).get("createdBy") or {}).get("kind") != "upload"]
        return max(made) if made else None

    def _stale(self, found: Catalog, files: list[FileInfo]) -> bool:
        hours = float(self.settings.data["backups"]["notify"]["staleAfterHours"] or 0)
        if hours <= 0:
            return False
        since = self._last_backup_time(found, files) or self.started_at  # never: counted from the start
        return (datetime.now(timezone.utc) - since).total_seconds() > hours * 3600

    async def _storage_health(self, storage: Storage) -> dict[str, Any]:
        """``writable`` by a real write (kept ``WRITABLE_TTL`` seconds), ``freeBytes`` where local."""
        identity = (storage.kind, repr(storage.describe()))
        checked = self._writable_checked
        if checked is None or checked[0] != identity or time.monotonic() - checked[1] > WRITABLE_TTL:
            try:
                await asyncio.wait_for(storage.check_writable(), STATUS_STORAGE_TIMEOUT)
                writable = True
            except (asyncio.TimeoutError, StorageError, OSError):
                writable = False
            checked = self._writable_checked = (identity, time.monotonic(), writable)
        out: dict[str, Any] = {"writable": checked[2]}
        try:
            free = await storage.free_bytes()
        except OSError:
            free = None
        if free is not None:
            out["freeBytes"] = free
        return out

    async def prune_backups(self, keep: int, scope: str = "scheduled", dry_run: bool = False) -> dict[str, Any]:
        """The prune route: all but the newest ``keep`` backups of ``scope`` ("scheduled": the
        ``@auto_`` ones; "all"), never a pinned one, under the job lock. ``dry_run``: what would go."""
        job = self._acquire("prune", "")
        try:
            return await self._prune(lambda newest_first: newest_first[keep:], "" if scope == "all" else AUTO_PREFIX,
                                     dry_run)
        finally:
            self._writable_checked = None
            if self.active is job:
                self.active = None
                self.lock.release_job()

    async def prune(self, keep: int, prefix: str = AUTO_PREFIX) -> list[str]:
        """Delete all but the newest ``keep`` backups whose key starts with ``prefix`` (by default the
        scheduled ones: manual and uploaded backups are never pruned), never a pinned one. Returns
        the deleted keys."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        return (await self._prune(lambda newest_first: newest_first[keep:], prefix, False))["deleted"]

    async def apply_retention(self) -> list[str]:
        """After a scheduled backup: ``backups.retention`` (restic's generations) where it is set,
        else the newest ``cronMaxKeep`` (0: all), as PocketBase does."""
        settings = self.settings.data["backups"]
        retention = settings.get("retention")
        if catalog.retention_set(retention):
            def doomed(newest_first: list[FileInfo]) -> list[FileInfo]:
                kept = catalog.retained(((info, _age_order(info)[0]) for info in newest_first), retention)
                return [info for info in newest_first if info.key not in kept]

            return (await self._prune(doomed, AUTO_PREFIX, False))["deleted"]
        keep = int(settings["cronMaxKeep"])
        return await self.prune(keep) if keep > 0 else []

    async def _prune(self, choose: Callable[[list[FileInfo]], list[FileInfo]], prefix: str,
                     dry_run: bool) -> dict[str, Any]:
        """Delete what ``choose`` picks from the unpinned, idle backups of ``prefix`` (newest first).

        Everything is decided from one complete listing before the first deletion, so a failure
        (the listing, the catalog, a deletion) can only leave fewer deletions done, never a backup
        deleted that should be kept. Pins wait for the end (the catalog's lock is held)."""
        storage = self.storage()
        with _storage_failure("Failed to retrieve backup items."):
            found = await storage.list()
        async with self.catalog.lock:
            with _storage_failure("Failed to read the backup catalog."):
                known = await self._read_catalog(storage)
            busy = self.active.key if self.active is not None else None
            candidates = [info for info in found if info.key.startswith(prefix) and not known.pinned(info.key)]
            # A busy backup (the one being written) counts among the kept, and is never deleted.
            doomed = [info for info in choose(sorted(candidates, key=_age_order, reverse=True)) if info.key != busy]
            deleted: list[str] = []
            freed = 0
            if dry_run:
                deleted, freed = [info.key for info in doomed], sum(info.size for info in doomed)
            else:
                try:
                    for info in doomed:
                        try:
                            with _storage_failure(f"Failed to delete {info.key} ({len(deleted)} deleted before it)."):
                                try:
                                    faults.raise_point("prune-delete")
                                except faults.InjectedFault as exc:
                                    raise StorageError(str(exc)) from None
                                await storage.delete(info.key)
                        except StoredFileMissing:
                            continue  # deleted meanwhile
                        faults.point("prune-deleted")
                        deleted.append(info.key)
                        freed += info.size
                        self.logs.info("Backup pruned", key=info.key)
                finally:
                    if deleted:
                        await self._forget(storage, deleted, locked=True)
        return {"before": len(found), "after": len(found) - len(deleted), "deleted": deleted, "freedBytes": freed}

    # --- the safety copy of the data a restore replaces --------------------------------------

    @property
    def safety_copies_kept(self) -> int:
        return int(self.settings.data["backups"]["preRestoreMaxKeep"])

    def _plan_safety_copy(self) -> dict[str, Any] | None:
        """The safety copy of the data about to be replaced (``restore.swap_in``), by the settings of
        that data (the restored ones may say otherwise); None: no copy."""
        keep = self.safety_copies_kept
        app = self.settings.app_name
        # The copy is written by the process that serves the restored data, whose settings may
        # name other recipients (or none): these data's recipients go with the plan (public keys).
        return {"key": safety_name(app), "keep": keep, "app": app,
                "recipients": crypto.recipients_of(self.settings.data)} if keep > 0 else None

    async def _check_room_for_safety_copy(self, storage: Storage, archive_size: int, extracted_size: int) -> None:
        """Refuse a restore whose safety copy clearly would not fit (local storage: S3 tells no free space).

        The copy of the present data is estimated at its size on disk times the compression of the
        backup being restored (``archive_size`` for ``extracted_size`` bytes), which is extracted by
        now, so the free space already excludes it."""
        if self.safety_copies_kept <= 0 or storage.kind != "local":
            return
        ratio = min(1.0, archive_size / extracted_size) if extracted_size > 0 else 1.0
        present = await asyncio.to_thread(_data_size, self.datadir.root)
        needed = int(present * ratio)
        free = (await asyncio.to_thread(shutil.disk_usage, self.datadir.backups)).free - archive.DISK_MARGIN
        if needed > free:
            raise InsufficientStorage(
                f"Not enough free disk space for the safety copy of the current data (about {needed >> 20} MiB "
                f"needed, {max(free, 0) >> 20} MiB free); nothing was changed. Free some space, or set "
                "backups.preRestoreMaxKeep to 0 to restore without a safety copy.")

    def start_preserving(self) -> None:
        """``preserve_replaced`` in the background (the server, once it serves the restored data).
        The job is taken at once, so that the status shows it from the first request on."""
        job = self._take_preserve_job()
        if job is not None:
            self._task = asyncio.create_task(self._run_preserve(job, True), name="backup-safety-copy")

    async def preserve_replaced(self) -> None:
        """Write the safety copy of the data a restore replaced, if one awaits (phase ``preserving``).

        The job shows in ``status().active`` as the creation of that backup; its outcome goes into
        ``last["safetyCopy"]`` of the restore, so that ``last`` keeps saying how the restore went. If
        it fails, the old data stays where it is and is saved at the next start, or before the
        next restore can begin."""
        job = self._take_preserve_job()
        if job is not None:
            await self._run_preserve(job, False)

    def _take_preserve_job(self) -> Job | None:
        journal = restore.preserving(self.datadir.root)
        if journal is None:
            return None
        try:
            return self._acquire("create", str((journal.get("safety") or {}).get("key") or ""))
        except Busy:
            logger.warning("the safety copy of the replaced data waits: another job is running")
            return None

    async def _run_preserve(self, job: Job, background: bool) -> None:
        try:
            await self._preserve(job, background=background)
        except Exception:
            pass  # logged, and in last["safetyCopy"]; the data stays for the next try
        finally:
            if self.active is job:
                self.active = None
                self.lock.release_job()

    async def _preserve(self, job: Job, replacing: bool = False, background: bool = False) -> None:
        """The safety copy itself, under ``job``'s lock (see ``preserve_replaced``); ``replacing``:
        from a restore about to replace the data again; ``background``: the old data is deleted
        by a thread of its own (a server)."""
        root = self.datadir.root
        journal = restore.preserving(root)
        if journal is None:
            return
        safety = journal.get("safety") or {}
        keep = int(safety.get("keep") or 0)
        key = str(safety.get("key") or "")
        outer_key, outer_op = job.key, job.op
        job.key, job.op, job.bytes_done, job.bytes_total = key, "create", 0, 0
        error: BaseException | None = None
        try:
            storage = self.storage()
            if keep > 0:
                # A copy under this name may have been published just before a crash: never trust
                # it to be this data; a second copy is cheap, and retention trims it.
                stem, counter = key[:-len(".zip")], 2
                while await storage.exists(key):
                    key, counter = f"{stem}_{counter}.zip", counter + 1
                job.key = key
                await self._write_safety_copy(job, storage, restore.replaced_dir(root), journal)
            await asyncio.to_thread(restore.preserved, root, background)
            if keep > 0:
                await self.prune(keep, PRE_RESTORE_PREFIX)
        except BaseException as exc:
            error = exc
            raise
        finally:
            job.key, job.op = outer_key, outer_op
            job.bytes_done = job.bytes_total = 0
            reason = None if error is None else describe_error(error)
            if self.last is not None and self.last.get("op") == "restore" and not replacing:
                self.last["safetyCopy"] = {"key": key if keep > 0 else None, "ok": error is None, "error": reason}
            if error is None:
                if keep > 0:
                    self.logs.info("Safety copy of the replaced data written", key=key, restored=journal.get("key", ""))
            else:
                logger.error("the safety copy %s of the replaced data failed: %s", key, reason)
                self.logs.error("Safety copy of the replaced data failed", key=key, error=reason or "")
                self.notify_event("failure", "create", key, f"the safety copy of the replaced data failed: {reason}")
                if replacing:
                    raise BadRequest("The data replaced by the previous restore could not be saved as the backup "
                                     f"{key}, so it is kept and nothing was changed: {reason}") from error

    async def _write_safety_copy(self, job: Job, storage: Storage, old: Path, journal: dict[str, Any]) -> None:
        """The replaced data (closed databases and files, in ``old``) as the backup ``job.key``."""
        databases = await asyncio.to_thread(_settle_databases, old)
        files = await asyncio.to_thread(archive.collect_files, old)
        job.bytes_total = sum(await asyncio.to_thread(_sizes, databases + files))
        safety = journal.get("safety") or {}
        # Encrypted while either side has recipients: those of the replaced data's settings
        # (planned before the swap) and those of the settings now (the restored data's), so that
        # any of those keys decrypts it.
        planned = safety.get("recipients") if isinstance(safety.get("recipients"), list) else []
        recipients = list(dict.fromkeys([r for r in planned if isinstance(r, str) and r] +
                                        crypto.recipients_of(self.settings.data)))
        async with _archive_writing(storage, job, recipients) as (zipper, _writer):
            for index, source in enumerate(databases + files):
                await _in_background(zipper.add, source)
                if index == 0:
                    faults.point("restore-safety-writing")
            await _in_background(zipper.finish, {"app": (journal.get("safety") or {}).get("app", ""),
                                                 "createdBy": {"kind": "pre-restore"},
                                                 "replacedBy": journal.get("key", "")})


@asynccontextmanager
async def _archive_writing(storage: Storage, job: Job,
                           recipients: list[str]) -> AsyncIterator[tuple[archive.ArchiveWriter, Any]]:
    """A backup archive written to ``storage`` as ``job.key``: the block adds the entries and calls
    ``finish``; the archive is published when the block ends, discarded (never listed) if it raises.
    With ``recipients``, it is age-encrypted to them on its way (``crypto.EncryptingWriter``);
    ``job.encryption`` says how it was written."""
    writer: Any = await asyncio.to_thread(storage.open_write, job.key)
    zipper: archive.ArchiveWriter | None = None
    try:
        if recipients:
            writer = await asyncio.to_thread(crypto.EncryptingWriter, writer, recipients)
        job.encryption = crypto.EncryptionFacts.written_for(recipients)
        zipper = await _in_background(archive.ArchiveWriter, writer, job.advance, job.cancel)
        yield zipper, writer
        zipper = None
        await asyncio.to_thread(writer.commit)
    except BaseException:
        if zipper is not None:
            await asyncio.to_thread(zipper.close)
        await asyncio.to_thread(writer.abort)
        raise


@asynccontextmanager
async def _given(path: Path) -> AsyncIterator[Path]:
    yield path


def job_plain_copy(manager: BackupManager, job: Job) -> Any:
    """The plaintext zip of the job's backup, decrypted with its identities if it is encrypted
    (``crypto.plain_copy``), the job's progress following the fetch, the decryption, then (the
    caller's ``set_total``) the extraction."""

    def decrypting(total: int) -> None:
        job.bytes_total, job.bytes_done = total, 0

    if job.local_zip is not None:
        return _given(job.local_zip)
    return crypto.plain_copy(manager.storage(), job.key, manager.datadir.temp, job.advance, job.identities,
                             job.cancel, decrypting, _in_background)


@contextmanager
def _storage_failure(action: str) -> Iterator[None]:
    """A storage that cannot be used (S3 unreachable, bad credentials) is a 400 that says why."""
    try:
        yield
    except (InvalidKey, StoredFileMissing, StoredFileExists):
        raise
    except StorageError as exc:
        raise BadRequest(f"{action} Reason: {exc}.") from exc


def _age_order(info: FileInfo) -> tuple[datetime, int, datetime]:
    """Oldest first: the UTC timestamp in the name (with its ``_N`` suffix for backups of the same
    second) where there is one, else the modified time to the second (a manual name, with
    ``prune --all``); the exact modified time breaks ties."""
    match = _AUTO_ORDER_RE.search(info.key)
    if match is not None:
        try:
            stamp = datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        except ValueError:
            pass
        else:
            return (stamp, int(match.group(2) or 1), info.modified)
    return (info.modified.replace(microsecond=0), 0, info.modified)


def _name_exists() -> ValidationError:
    return ValidationError({"file": field_error("validation_backup_name_exists",
                                                "Backup file with the specified name already exists.")})


def _database_source(arcname: str, db: Database, snapshot: Path) -> archive.Source:
    """The live file itself is read through the database's own descriptor (``Database.open_file``)."""
    return archive.Source(arcname, snapshot, db.open_file if snapshot == db.path else None)


def _settle_databases(old: Path) -> list[archive.Source]:
    """The databases of replaced data, each a single file: a WAL left beside one (the old process
    closed them, so normally there is none) is checkpointed into it first."""
    sources = []
    for name in archive.DATABASES:
        path = old / name
        if not path.is_file():
            continue
        if (old / f"{name}-wal").exists():
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
        sources.append(archive.Source(name, path))
    return sources


def _data_size(root: Path) -> int:
    """Bytes of what a backup of ``root`` holds (the databases with their WAL, and the files)."""
    total = 0
    for name in archive.DATABASES:
        for suffix in ("", "-wal"):
            try:
                total += (root / f"{name}{suffix}").stat().st_size
            except OSError:
                pass
    for source in archive.collect_files(root):
        try:
            total += source.path.stat().st_size
        except OSError:
            pass
    return total


def _sizes(sources: list[archive.Source]) -> list[int]:
    sizes = []
    for source in sources:
        try:
            sizes.append(source.path.stat().st_size)
        except OSError:
            sizes.append(0)
    return sizes

