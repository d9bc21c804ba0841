"""SQLite access through aiosqlite: one writer connection behind a lock, one reader.

Both databases of the data directory (``data.db`` and ``auxiliary.db``) are opened in WAL mode,
so reads see the last committed state and never wait for a writer.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

Params = Sequence[Any] | dict[str, Any]
logger = logging.getLogger("server.database")

_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA temp_store = MEMORY",
)


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        await conn.execute(pragma)
    return conn


class Transaction:
    """The writer connection while a transaction is open on it."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        rowcount = cursor.rowcount
        await cursor.close()
        return rowcount

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        await self._conn.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return list(await self._conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None


class LiveFile(io.RawIOBase):
    """Reads a database's main file through a descriptor that its ``Database`` keeps open for as
    long as the database is open; closing this object leaves that descriptor open."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self._fd).st_size - self._position)
        data = os.pread(self._fd, size, self._position)  # one copy, straight from the page cache
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = os.preadv(self._fd, [buffer], self._position)
        self._position += count
        return count

    def fileno(self) -> int:
        return self._fd


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Set by the replicator (``server.replication``) while replication is on: checkpoints are
        # its own then (autocheckpoint off), and every checkpoint lets it read the WAL first.
        self.replica: Any = None
        self._wal_fd: int | None = None
        self._wal_ino: int | None = None
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._file_fd: int | None = None
        # Reads wait while the file is being replaced (``replace_file``); ``_reading`` counts those
        # in progress.
        self._reads_open = asyncio.Event()
        self._reads_open.set()
        self._reading = 0

    async def open(self) -> None:
        self._writer = await _connect(self.path)
        self._reader = await _connect(self.path)
        if self.replica is not None:
            await self.set_autocheckpoint(False)

    async def set_autocheckpoint(self, on: bool) -> None:
        """SQLite's automatic checkpoints of our connections (off while replication owns them)."""
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.execute(f"PRAGMA wal_autocheckpoint = {1000 if on else 0}")

    def wal_fd(self) -> int | None:
        """A descriptor of the WAL file, kept open while the database is (``close`` closes it);
        reopened if the file was replaced. None while there is no WAL file."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            ino = os.stat(wal).st_ino
        except FileNotFoundError:
            return None
        if self._wal_fd is not None and self._wal_ino == ino:
            return self._wal_fd
        if self._wal_fd is not None:
            os.close(self._wal_fd)  # the WAL is not locked by SQLite (its -shm and main file are)
        self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        self._wal_ino = os.fstat(self._wal_fd).st_ino
        return self._wal_fd

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in (self._reader, self._writer) if conn is not None))
        self._reader = self._writer = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = self._wal_ino = None
        if self._file_fd is not None:  # only now: SQLite holds no lock on the file any more
            os.close(self._file_fd)
            self._file_fd = None

    def open_file(self) -> LiveFile:
        """The main database file, for reading a pinned snapshot (see ``snapshot``).

        Never ``open()`` the live file in this process: POSIX drops every lock a process holds
        on a file when it closes *any* descriptor of that file, and SQLite's locks on it belong
        to this process. Reading it through a plain ``open()``/``close()`` would silently release
        them; another process closing its connection would then believe it was the last one,
        checkpoint and delete the WAL under our connections. So the file is read through one
        descriptor, opened once and closed only after the connections (``close``)."""
        if self._file_fd is None:
            self._file_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return LiveFile(self._file_fd)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """An immediate write transaction; committed on success, rolled back on any error."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")
        await self._wrote()

    async def _wrote(self) -> None:
        """After a write: the replicator is told (and in its sync mode, the write waits for the
        replica to hold it)."""
        if self.replica is not None:
            waiting = self.replica.wrote()
            if waiting is not None:
                await waiting

    async def checkpoint(self) -> None:
        """A TRUNCATE checkpoint of the WAL, under the write lock (the replicator reads it first)."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            if self.replica is not None and not await asyncio.to_thread(self.replica.before_checkpoint):
                return
            await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @asynccontextmanager
    async def write_locked(self) -> AsyncIterator[None]:
        """The write lock, for the replicator's reads of the WAL (no write is reported)."""
        async with self._write_lock:
            yield

    @asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        """This process's writers wait while the context lasts (another connection writes a short
        batch meanwhile: a partial restore). Fair: writers queued before go first."""
        try:
            async with self._write_lock:
                yield
        finally:
            if self.replica is not None:
                self.replica.wrote()

    async def execute(self, sql: str, params: Params = ()) -> int:
        """One statement, atomic on its own (SQLite's autocommit), behind the write lock.

        The same effect as a transaction around it, in one trip to the connection's thread
        instead of three (BEGIN, the statement, COMMIT): writes are serialized by that lock, so
        their trips are what bounds the writes per second."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            cursor = await self._writer.execute(sql, params)
            rowcount = cursor.rowcount
            await cursor.close()
        await self._wrote()
        return rowcount

    async def execute_returning(self, sql: str, params: Params = (),
                                check: Callable[[], None] | None = None) -> list[sqlite3.Row]:
        """One writing statement with a ``RETURNING`` clause, as ``execute``: its rows, in the
        same single trip (they are all read before the statement, and so its commit, ends).
        ``check`` runs under the write lock first (it may raise: nothing is written)."""
        assert self._writer is not None, "database is not open"
        async with self._write_lock:
            if check is not None:
                check()
            rows = list(await self._writer.execute_fetchall(sql, params))
        await self._wrote()
        return rows

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        if not self._reads_open.is_set():
            await self._reads_open.wait()
        assert self._reader is not None, "database is not open"
        self._reading += 1
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        finally:
            self._reading -= 1

    async def replace_file(self, replace: Callable[[], None]) -> None:
        """Close the connections, run ``replace`` (blocking, in a thread: it puts another file at
        ``path``), and open again, on the old file if ``replace`` raised. The caller holds
        ``writes_paused``; reads wait meanwhile (a partial restore's switch, milliseconds)."""
        self._reads_open.clear()
        replica = self.replica
        try:
            while self._reading:
                await asyncio.sleep(0.001)
            if replica is not None:
                await replica.quiesce()  # its connections too, so that the old WAL goes with the old file
            await self.close()
            try:
                await asyncio.to_thread(replace)
            finally:
                await self.open()
        finally:
            self._reads_open.set()
            if replica is not None:
                replica.replaced()  # another database: a new lineage

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    @asynccontextmanager
    async def snapshot(self, temp_dir: Path) -> AsyncIterator[Path]:
        """A file holding this database as it was at one instant, valid while the context lasts.

        The fast way copies nothing: with writes paused for a moment (our own write lock), the WAL
        is checkpointed into the main file and a read transaction is opened on that state. A
        reader that started on a fully checkpointed WAL holds SQLite's read lock 0, which stops
        every checkpoint from writing to the main file, so the file stays byte-for-byte that
        state while the backup reads it; writers go on appending to the WAL meanwhile.

        If that cannot be had (a reader elsewhere keeps the WAL busy, or another process wrote in
        between), the database is copied with SQLite's online backup API into ``temp_dir``.
        """
        conn = await asyncio.to_thread(_snapshot_connection, self.path)
        copy: Path | None = None
        try:
            pinned = False
            for _ in range(_PIN_ATTEMPTS):
                # Copy most of the WAL into the main file first, with writers running, so that the
                # checkpoint done while they wait has only the last few frames left to copy (not
                # while replicating: a frame must never be checkpointed before it was read).
                if self.replica is None:
                    await asyncio.to_thread(_passive_checkpoint, conn)
                async with self._write_lock:
                    pinned = False
                    if self.replica is None or await asyncio.to_thread(self.replica.before_checkpoint):
                        pinned = await asyncio.to_thread(pin_main_file, conn, self.path)
                if pinned:
                    break
                await asyncio.sleep(0.05)
            if pinned:
                yield self.path
            else:
                logger.info("%s: WAL busy, taking the snapshot with the backup API", self.path.name)
                copy = temp_dir / f"snapshot_{os.getpid()}_{id(conn)}_{self.path.name}"
                await asyncio.to_thread(_backup_copy, conn, copy)
                yield copy
        finally:
            await asyncio.to_thread(conn.close)
            if copy is not None:
                copy.unlink(missing_ok=True)


_PIN_ATTEMPTS = 40


def _snapshot_connection(path: Path) -> sqlite3.Connection:
    # A short busy timeout: the checkpoint runs while our writers wait, so it must not linger.
    return sqlite3.connect(path, timeout=0.03, isolation_level=None, check_same_thread=False)


def _passive_checkpoint(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.OperationalError:
        pass


def pin_main_file(conn: sqlite3.Connection, path: Path) -> bool:
    """Checkpoint the WAL fully and open a read transaction on the main file alone.

    Called with our writers paused; returns False (and leaves no transaction open) if the main file
    cannot be pinned this time."""
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        return False
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        return False
    if busy:
        return False
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    wal = path.with_name(path.name + "-wal")
    # An empty WAL now means our read began before any new frame: it reads the main file only.
    if wal.exists() and wal.stat().st_size > 0:
        conn.execute("ROLLBACK")
        return False
    return True


def _backup_copy(conn: sqlite3.Connection, target: Path) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    dest = sqlite3.connect(target)
    try:
        conn.backup(dest)  # one step: a single read transaction on the source, so one instant
        dest.execute("PRAGMA journal_mode = DELETE")
    finally:
        dest.close()
