"""One database's side of replication (``data.db`` or ``auxiliary.db``), after Litestream's ``db.go``.

It reads the frames that transactions commit to the WAL and turns them into LTX files staged on
the local disk, and it owns the checkpoints:
- the app's connections run with ``wal_autocheckpoint = 0`` while replication is on, and every
  checkpoint of this process goes through ``Database.checkpoint`` / ``Database.snapshot``, which
  call ``capture`` first, under the app's write lock: no frame is ever checkpointed (and then
  overwritten by a WAL restart) before it was read;
- the WAL is read through a descriptor kept open while the database is (``Database.wal_fd``):
  closing a descriptor of a database file would drop this process's POSIX locks on it;
- reading new frames takes the write lock for the time of one ``pread`` of what was appended
  since the last read (the frames of a transaction in progress are never read half-written); the
  LTX encoding happens after the lock is released;
- a snapshot is encoded from a pinned read of the main file (a read transaction begun on a
  truncated WAL, as the backup does), never under the write lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import faults
from ..database import pin_main_file
from . import ltx, wal

if TYPE_CHECKING:
    from ..database import Database

logger = logging.getLogger("server.replication")
# The WAL is checkpointed (TRUNCATE) once it has grown past this (PB_REPLICA_CHECKPOINT_BYTES: a
# test hook, a smaller bound).
CHECKPOINT_BYTES = int(os.environ.get("PB_REPLICA_CHECKPOINT_BYTES") or 4 << 20)
MAX_READ = 64 << 20  # at most this much WAL is read under the write lock at once
SNAPSHOT_LEVEL = 9


@dataclass
class Staged:
    """An LTX file written to the staging directory, waiting for its upload."""

    path: Path
    key: str  # <lineage>/<db>/ltx/<level>/<min>-<max>.ltx
    timestamp: int  # ms: every transaction in it committed before this moment
    size: int
    first_write: float | None  # time.time() of the oldest write it holds (lag)


@dataclass
class _Captured:
    batch: wal.Batch
    txid: int
    timestamp: int
    first_write: float | None
    raw: bytes


class DBReplica:
    def __init__(self, name: str, db: "Database", staging: Path) -> None:
        self.name = name
        self.db = db
        self.staging = staging
        self.lineage = ""
        self.txid = 0
        self.page_size = 0
        self.commit = 0
        self._rolling = 0  # XOR of the page checksums (low 63 bits)
        self._checksums = array("Q")
        self._salts: bytes | None = None
        self._offset = 0
        self._captured: list[_Captured] = []
        self._encode_lock = asyncio.Lock()
        self._ckpt: sqlite3.Connection | None = None
        self._pin_conn: sqlite3.Connection | None = None  # a short read transaction (``checkpoint_in_two``)
        self.first_write: float | None = None  # the oldest write not captured yet
        self.ready = False  # a snapshot of the lineage is staged: captures may go on
        self._seq = 0
        # Work that holds a connection of ours outside the write lock (a checkpoint's first phases,
        # a snapshot's encoding): a file swap waits for it (``quiesce``). ``generation`` changes
        # with each swap: what began before it does not set ``ready`` again.
        self.busy = 0
        self.generation = 0

    # --- positions ------------------------------------------------------------------------

    @property
    def post_apply(self) -> int:
        return ltx.FLAG | self._rolling

    def _connection(self) -> sqlite3.Connection:
        if self._ckpt is None:
            self._ckpt = sqlite3.connect(self.db.path, timeout=0.05, isolation_level=None, check_same_thread=False)
        return self._ckpt

    async def quiesce(self) -> None:
        """Before a swap of the file: no read of it any more, no connection of ours left open."""
        self.ready = False
        self.generation += 1
        while self.busy:
            await asyncio.sleep(0.005)
        self.close()

    def close(self) -> None:
        for conn in (self._ckpt, self._pin_conn):
            if conn is not None:
                conn.close()  # a SQLite connection: SQLite keeps the file's locks for the others
        self._ckpt = self._pin_conn = None

    def note_write(self) -> None:
        if self.first_write is None:
            self.first_write = time.time()

    # --- capture (the caller holds the app's write lock) -----------------------------------

    def capture(self) -> None:
        """Read what was committed to the WAL since the last read (blocking; under the write lock)."""
        if not self.ready:
            return
        first_write, self.first_write = self.first_write, None
        fd = self.db.wal_fd()
        if fd is None:
            return
        head = wal.header(os.pread(fd, wal.WAL_HEADER_SIZE, 0))
        if head is None:
            self._salts, self._offset = None, 0
            return
        page_size, salts = head
        if salts != self._salts:
            self._salts, self._offset = salts, wal.WAL_HEADER_SIZE  # a new WAL: everything before was read
        end = os.fstat(fd).st_size
        want = MAX_READ
        while self._offset < end:
            raw = os.pread(fd, min(end - self._offset, want), self._offset)
            batch, stop = wal.parse(raw, self._offset, page_size, salts)
            if stop == self._offset:
                if len(raw) == want:  # one transaction larger than a read: read more at once
                    want *= 2
                    continue
                break
            self._offset = stop
            self.txid += 1
            self._captured.append(_Captured(batch, self.txid, int(time.time() * 1000), first_write, raw))
            first_write = None
            if len(raw) < want:
                break

    def before_checkpoint(self) -> bool:
        """``Database``'s hook before any checkpoint of its own (blocking; under the write lock):
        the frames are read first; False (no checkpoint now) while a snapshot is being encoded."""
        if not self.ready:
            return False
        self.capture()
        return True

    def wal_size(self) -> int:
        fd = self.db.wal_fd()
        return os.fstat(fd).st_size if fd is not None else 0

    def checkpoint(self) -> bool:
        """TRUNCATE checkpoint (blocking; under the write lock, right after ``capture``)."""
        try:
            busy, _, _ = self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            return False
        return not busy

    async def checkpoint_in_two(self) -> None:
        """Checkpoint with the writers waiting only for the tail of the WAL.

        1. A short read transaction begins (its read mark: the WAL's end now). While it lasts the
           WAL cannot restart, so no frame can be overwritten before it was read.
        2. A PASSIVE checkpoint copies the WAL up to that mark into the main file, writers running.
        3. Under the write lock: the new frames are read, the read transaction ends, and a
           TRUNCATE checkpoint copies what was written meanwhile and empties the WAL."""
        if not self.ready:
            return
        self.busy += 1
        try:
            pinned = await asyncio.to_thread(self._pin_reader)
            if pinned:
                await asyncio.to_thread(self._passive)
                faults.point("replica-checkpointing")
        finally:
            self.busy -= 1
        async with self.db.write_locked():
            await asyncio.to_thread(self.capture)
            await asyncio.to_thread(self._unpin_reader)
            if self.ready:
                await asyncio.to_thread(self.checkpoint)

    def _reader(self) -> sqlite3.Connection:
        if self._pin_conn is None:
            self._pin_conn = sqlite3.connect(self.db.path, timeout=0.05, isolation_level=None, check_same_thread=False)
        return self._pin_conn

    def _pin_reader(self) -> bool:
        if not self.ready:  # (the file is being swapped: a connection now would keep its WAL)
            return False
        try:
            conn = self._reader()
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return True
        except sqlite3.Error:
            self._unpin_reader()
            return False

    def _unpin_reader(self) -> None:
        conn = self._pin_conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                conn.close()
                self._pin_conn = None

    def _passive(self) -> None:
        try:
            self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError:
            pass

    # --- encoding (after the lock) ---------------------------------------------------------

    async def encode_pending(self) -> list[Staged]:
        async with self._encode_lock:
            staged = []
            while self._captured:
                item = self._captured.pop(0)
                staged.append(await asyncio.to_thread(self._encode, item))
            return staged

    def _stage_path(self, level: int, min_txid: int, max_txid: int) -> tuple[Path, str]:
        self._seq += 1
        name = ltx.filename(min_txid, max_txid)
        key = f"{self.lineage}/{self.name}/ltx/{level}/{name}"
        return self.staging / f"{time.time_ns():020d}_{self._seq:06d}_{self.name}_{level}_{name}", key

    def _encode(self, item: _Captured) -> Staged:
        batch = item.batch
        pre = self.post_apply
        commit = batch.commit
        self._resize(commit)
        lock = ltx.lock_pgno(self.page_size)
        path, key = self._stage_path(0, item.txid, item.txid)
        pgnos = [p for p in sorted(batch.pages) if p <= commit and p != lock]
        for pgno in pgnos:  # the checksum after the file goes into its header: computed first
            checksum = ltx.page_checksum(pgno, batch.pages[pgno])
            self._rolling ^= (self._checksums[pgno - 1] ^ checksum) & ltx.LOW
            self._checksums[pgno - 1] = checksum
        with open(path, "wb") as out:
            encoder = ltx.Encoder(out, ltx.Header(self.page_size, commit, item.txid, item.txid, item.timestamp,
                                                  pre, self.post_apply))
            for pgno in pgnos:
                encoder.page(pgno, batch.pages[pgno])
            encoder.finish()
        item.batch = wal.Batch()
        item.raw = b""
        return Staged(path, key, item.timestamp, path.stat().st_size, item.first_write)

    def _resize(self, commit: int) -> None:
        while len(self._checksums) > commit:
            self._rolling ^= self._checksums.pop() & ltx.LOW
        if len(self._checksums) < commit:
            self._checksums.extend(array("Q", bytes(8 * (commit - len(self._checksums)))))
        self.commit = commit

    # --- snapshots -------------------------------------------------------------------------

    async def snapshot(self, lineage: str, new: bool, start_txid: int | None = None) -> list[Staged]:
        """A snapshot (level 9, TXIDs 1..N) of the database now: of a new lineage (N = 1), of the
        current one at its last TXID, or (``start_txid``) of a lineage resumed after a restart at
        that TXID. Returns what it staged (the last captures, then the snapshot)."""
        generation = self.generation
        if start_txid is not None:
            self._captured.clear()
            self.ready = False
            self.lineage, self.txid = lineage, start_txid
        staged: list[Staged] = []
        conn = await asyncio.to_thread(sqlite3.connect, self.db.path, timeout=0.05, isolation_level=None,
                                       check_same_thread=False)
        try:
            for attempt in range(200):
                async with self.db.write_locked():
                    if self.generation != generation:
                        # The file was swapped since ``conn`` was opened: it is the old file's, and
                        # must not touch the new one's WAL (same name).
                        raise RuntimeError(f"{self.name}: the file was swapped during the snapshot")
                    if not new and start_txid is None:
                        await asyncio.to_thread(self.capture)
                    pinned = await asyncio.to_thread(self._pin, conn)
                    if pinned is not None:
                        self.ready = False  # no capture until the snapshot is encoded
                        self._salts, self._offset = None, 0
                        self.first_write = None
                        break
                if not new:
                    staged += await self.encode_pending()
                await asyncio.sleep(min(0.5, 0.01 * (attempt + 1)))
            else:
                raise RuntimeError(f"{self.name}: could not checkpoint the WAL for a snapshot")
            if not new:
                staged += await self.encode_pending()
            page_size, pages = pinned
            if new:
                self._captured.clear()
                self.lineage, self.txid = lineage, 1
            self.busy += 1  # (the read transaction on the pinned file lasts the encoding)
            try:
                staged.append(await asyncio.to_thread(self._encode_snapshot, page_size, pages,
                                                      not new and start_txid is None))
            finally:
                await asyncio.to_thread(conn.close)
                self.busy -= 1
        finally:
            await asyncio.to_thread(conn.close)  # (again: harmless)
            if self.generation == generation:
                self.ready = True
        if self.generation != generation:
            raise RuntimeError(f"{self.name}: the file was swapped during the snapshot")
        return staged

    def _pin(self, conn: sqlite3.Connection) -> tuple[int, int] | None:
        """The main file pinned as the backup's snapshot pins it (``database.pin_main_file``):
        (page size, pages) of that state, or None if it cannot be pinned this time."""
        if not pin_main_file(conn, self.db.path):
            return None
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return page_size, pages

    def _encode_snapshot(self, page_size: int, pages: int, check: bool) -> Staged:
        expected = self.post_apply
        self.page_size = page_size
        checksums = array("Q", bytes(8 * pages))
        rolling = 0
        lock = ltx.lock_pgno(page_size)
        timestamp = int(time.time() * 1000)
        path, key = self._stage_path(SNAPSHOT_LEVEL, 1, self.txid)
        fd = self.db.open_file().fileno()
        # Two passes over the pinned file (the page cache serves the second): the checksum of the
        # whole database goes into the header.
        for pgno in range(1, pages + 1):
            if pgno == lock:
                continue
            data = os.pread(fd, page_size, (pgno - 1) * page_size)
            if len(data) != page_size:
                raise RuntimeError(f"{self.name}: short read of page {pgno}")
            checksum = ltx.page_checksum(pgno, data)
            checksums[pgno - 1] = checksum
            rolling ^= checksum & ltx.LOW
        with open(path, "wb") as out:
            encoder = ltx.Encoder(out, ltx.Header(page_size, pages, 1, self.txid, timestamp, 0, ltx.FLAG | rolling))
            for pgno in range(1, pages + 1):
                if pgno != lock:
                    encoder.page(pgno, os.pread(fd, page_size, (pgno - 1) * page_size))
            encoder.finish()
        if check and expected != ltx.FLAG | rolling:
            # The replicated state and the database differ: a bug, or a write behind our back (another
            # process). The snapshot is the truth from here on; restores before it use the older files.
            logger.error("%s: the snapshot's checksum differs from the replicated state", self.name)
        self._checksums, self._rolling, self.commit = checksums, rolling, pages
        return Staged(path, key, timestamp, path.stat().st_size, None)
