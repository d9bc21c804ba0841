"""Rebuilding a database from the replica as it was at a moment (ours, and Litestream's layout).

The plan, per database, within one lineage (a restore never mixes lineages): the newest snapshot
(level 9) taken at or before ``at``, then the level-0 files that follow it TXID by TXID while their
timestamp is at or before ``at``. Each file's checksum is checked as it is read; each file must
start from the database checksum the previous one ended on; the rebuilt file's own checksum must be
the last file's post-apply checksum; then ``PRAGMA quick_check``. Any failure raises
``ReplicaRestoreError`` and leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import ltx
from .client import RemoteFile, ReplicaClient

DATABASES = ("data.db", "auxiliary.db")
LINEAGE_RE = re.compile(r"^(\d{8}T\d{9}Z)-[0-9a-f]{6}$")
SLACK = 120.0  # seconds a listing's time may trail an LTX timestamp (S3: the upload's time)


class ReplicaRestoreError(Exception):
    """Why the replica cannot give that moment (safe to show)."""


def lineage_time(lineage: str) -> datetime | None:
    match = LINEAGE_RE.match(lineage)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=timezone.utc)


def new_lineage_name(random_hex: str) -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{random_hex}"


@dataclass
class Entry:
    lineage: str
    db: str
    level: int
    min_txid: int
    max_txid: int
    file: RemoteFile


@dataclass
class Layout:
    """What a listing of the replica holds, by lineage and database."""

    entries: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)
    bytes: int = 0

    @classmethod
    def of(cls, files: list[RemoteFile]) -> "Layout":
        layout = cls()
        for f in files:
            parts = f.key.split("/")
            if len(parts) != 5 or parts[2] != "ltx" or lineage_time(parts[0]) is None or parts[1] not in DATABASES:
                continue
            span = ltx.parse_filename(parts[4])
            if span is None or not parts[3].isdigit():
                continue
            layout.bytes += f.size
            layout.entries.setdefault(parts[0], {}).setdefault(parts[1], []).append(
                Entry(parts[0], parts[1], int(parts[3]), span[0], span[1], f))
        return layout

    def lineages(self) -> list[str]:
        return sorted(self.entries)

    def snapshots(self, lineage: str, db: str) -> list[Entry]:
        found = [e for e in self.entries.get(lineage, {}).get(db, []) if e.level == 9]
        return sorted(found, key=lambda e: (e.max_txid, e.file.modified))

    def incrementals(self, lineage: str, db: str) -> list[Entry]:
        """Level 0 (one file per sync) and the compactions (levels 1-8: one file for many TXIDs)."""
        return sorted((e for e in self.entries.get(lineage, {}).get(db, []) if 0 <= e.level < 9),
                      key=lambda e: (e.min_txid, -e.max_txid))

    def first_time(self, lineage: str) -> float | None:
        snaps = self.snapshots(lineage, "data.db")
        return min(e.file.modified for e in snaps) if snaps else None

    def window(self) -> tuple[float, float] | None:
        """(earliest, latest) listing time of what can be restored."""
        starts = [t for t in (self.first_time(x) for x in self.lineages()) if t is not None]
        if not starts:
            return None
        last = max(e.file.modified for dbs in self.entries.values() for es in dbs.values() for e in es)
        return min(starts), last

    def candidates(self, at: float | None) -> list[str]:
        """The lineages that may hold the moment ``at``, the best first: the newest begun by then
        (a later one began with a restore or a restart, after that moment), then older ones."""
        found = [x for x in self.lineages() if self.snapshots(x, "data.db")]
        if not found:
            raise ReplicaRestoreError("the replica holds no snapshot")
        if at is not None:
            found = [x for x in found if (lineage_time(x) or datetime.max.replace(tzinfo=timezone.utc)).timestamp() <= at]
            if not found:
                raise ReplicaRestoreError("the replica holds nothing that old (before its window)")
        return found[::-1]


def restore_db(client: ReplicaClient, layout: Layout, lineage: str, db: str, at: float | None,
               target: Path, work: Path, identities: Any = None) -> dict[str, int]:
    """The database ``db`` of ``lineage`` at ``at`` (seconds; None: the latest) into ``target``.
    Returns {"txid", "timestamp", "files"}."""
    at_ms = None if at is None else int(at * 1000)
    snapshots = layout.snapshots(lineage, db)
    header_cache: dict[str, ltx.Header] = {}

    def first_by(candidates: Iterable[Entry]) -> tuple[Entry | None, ltx.Header | None]:
        """The first of ``candidates`` whose transactions are not after the moment (the file's
        time first, its header's timestamp then), with its header."""
        for candidate in candidates:
            if at is not None and candidate.file.modified > at + SLACK:
                continue
            found = _header(client, candidate, work, header_cache, identities)
            if at_ms is None or found.timestamp <= at_ms:
                return candidate, found
        return None, None

    chosen, _ = first_by(reversed(snapshots))
    if chosen is None:
        raise ReplicaRestoreError(f"no snapshot of {db} at or before that moment")
    partial = target.with_name(target.name + ".partial")
    applied = 0
    try:
        # Pages go in with pwrite (a buffered file's seek flushes at every page: 3x slower).
        with open(partial, "wb+", buffering=0) as out:
            checksum, page_size, last_ts = _apply(client, chosen, out, None, work, identities)
            txid = chosen.max_txid
            applied = 1
            following: dict[int, list[Entry]] = {}
            for entry in layout.incrementals(lineage, db):
                following.setdefault(entry.min_txid, []).append(entry)  # the longest span first
            while True:
                # The file that starts right after the state reached and goes furthest while it is
                # not after the moment (a compaction, else the level-0 file): no file is skipped,
                # so each one's checksum before must be the one the state ended on.
                entry, header = first_by(following.get(txid + 1, []))
                if entry is None or header is None:  # (both or neither)
                    break  # the moment is reached, or a gap: the state before it is the latest one
                if header.pre_apply != checksum:
                    raise ReplicaRestoreError(f"{db}: the replica's files do not follow each other (TXID {entry.min_txid})")
                checksum, page_size, last_ts = _apply(client, entry, out, page_size, work, identities)
                txid = entry.max_txid
                applied += 1
            os.fsync(out.fileno())
        with open(partial, "rb", buffering=1 << 20) as rebuilt:  # read back: what is on disk is checked
            if database_checksum(rebuilt, page_size) != checksum:
                raise ReplicaRestoreError(f"{db}: the rebuilt database does not match the replica's checksum")
        _quick_check(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(partial) + suffix).unlink(missing_ok=True)
    return {"txid": txid, "timestamp": last_ts, "files": applied}


def _header(client: ReplicaClient, entry: Entry, work: Path, cache: dict[str, ltx.Header],
            identities: Any = None) -> ltx.Header:
    if entry.file.key not in cache:
        local = _local(client, entry, work, identities)
        with open(local, "rb") as handle:
            cache[entry.file.key] = ltx.Header.unpack(handle.read(ltx.HEADER_SIZE))
    return cache[entry.file.key]


def _local(client: ReplicaClient, entry: Entry, work: Path, identities: Any = None) -> Path:
    path = work / entry.file.key.replace("/", "_")
    if not path.exists():
        part = path.with_name(path.name + ".part")
        client.fetch(entry.file.key, part)
        with open(part, "rb") as handle:
            head = handle.read(64)
        if _is_age(head):  # written while backups.encryption had recipients
            from ..backups import crypto  # (the server's whole backup package: only when needed)

            if not identities:
                part.unlink(missing_ok=True)
                raise ReplicaRestoreError("the replica is encrypted: an identity is required")
            plain = path.with_name(path.name + ".plain")
            try:
                crypto.decrypt_file(part, plain, identities)
            except crypto.CryptoError as exc:
                raise ReplicaRestoreError(str(exc)) from None
            finally:
                part.unlink(missing_ok=True)
            part = plain
        os.replace(part, path)
    return path


def _is_age(head: bytes) -> bool:
    """An age file, binary or armored (as ``backups.crypto.is_encrypted``)."""
    return head.startswith(b"age-encryption.org/") or head.lstrip(b" \t\r\n").startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")


def _apply(client: ReplicaClient, entry: Entry, out: Any, page_size: int | None, work: Path,
           identities: Any = None) -> tuple[int, int, int]:
    local = _local(client, entry, work, identities)
    try:
        with open(local, "rb") as handle:
            for item in ltx.decode(handle):
                if isinstance(item, ltx.Decoded):
                    header = item.header
                    if page_size is not None and header.page_size != page_size:
                        raise ReplicaRestoreError("the page size changed within a lineage")
                    os.ftruncate(out.fileno(), header.commit * header.page_size)
                    return header.post_apply, header.page_size, header.timestamp
                pgno, data = item
                os.pwrite(out.fileno(), data, (pgno - 1) * len(data))
    except ltx.LTXError as exc:
        raise ReplicaRestoreError(f"{entry.db}: a replica file is damaged ({exc})") from None
    finally:
        local.unlink(missing_ok=True)
    raise ReplicaRestoreError("truncated LTX file")


def database_checksum(handle, page_size: int) -> int:
    rolling = 0
    lock = ltx.lock_pgno(page_size)
    pgno = 0
    while True:
        data = handle.read(page_size)
        if not data:
            break
        pgno += 1
        if pgno == lock:
            continue
        if len(data) != page_size:
            raise ReplicaRestoreError("the rebuilt database has a partial page")
        rolling ^= ltx.page_checksum(pgno, data) & ltx.LOW
    return ltx.FLAG | rolling


def _quick_check(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ReplicaRestoreError(f"the rebuilt database is not valid: {exc}") from None
    finally:
        conn.close()
    if result != "ok":
        raise ReplicaRestoreError(f"the rebuilt database failed its check: {result}")


def restore_all(client: ReplicaClient, at: float | None, target_dir: Path, work: Path,
                lineage: str | None = None, identities: Any = None) -> dict[str, object]:
    """``data.db`` and ``auxiliary.db`` at ``at`` into ``target_dir`` (which must exist)."""
    layout = Layout.of(client.list())
    work.mkdir(parents=True, exist_ok=True)
    problem: ReplicaRestoreError | None = None
    for chosen in [lineage] if lineage else layout.candidates(at):
        out: dict[str, object] = {"lineage": chosen}
        try:
            out["data.db"] = restore_db(client, layout, chosen, "data.db", at, target_dir / "data.db", work, identities)
        except ReplicaRestoreError as exc:
            problem = problem or exc
            if lineage or "no snapshot" not in str(exc):
                raise
            continue  # that lineage's first snapshot came just after the moment: the one before
        if layout.snapshots(chosen, "auxiliary.db"):
            try:
                out["auxiliary.db"] = restore_db(client, layout, chosen, "auxiliary.db", at,
                                                 target_dir / "auxiliary.db", work, identities)
            except ReplicaRestoreError as exc:
                if "no snapshot" not in str(exc):
                    raise
        return out
    raise problem or ReplicaRestoreError("the replica holds no data.db")


def backup_zip(client: ReplicaClient, at: float | None, root: Path, work: Path,
               progress: Any = lambda n: None, cancel: Any = None, identities: Any = None) -> tuple[Path, dict[str, object]]:
    """The databases at ``at`` from the replica, with the record files of ``root`` as they are now
    (the replica holds no files), as a backup zip with our manifest in ``work``: what a restore of
    a backup (full, partial or a dry run) takes."""
    from ..backups import archive

    dbs = work / "dbs"
    dbs.mkdir(parents=True, exist_ok=True)
    info = restore_all(client, at, dbs, work / "fetch", identities=identities)
    target = work / "replica.zip"
    with open(target, "wb") as out:
        zipper = archive.ArchiveWriter(out, progress, cancel)
        try:
            for name in DATABASES:
                if (dbs / name).exists():
                    zipper.add(archive.Source(name, dbs / name))
            for source in archive.collect_files(root):
                zipper.add(source, True)
            zipper.finish({"createdBy": {"kind": "replica"}, "replica": {"lineage": info["lineage"]}})
        except BaseException:
            zipper.close()
            raise
    for name in DATABASES:
        (dbs / name).unlink(missing_ok=True)
    return target, info
