"""Backup archives: writing one from the data directory, and checking and extracting one.

An archive mirrors ``pb_data`` at its root (``data.db``, ``auxiliary.db``, ``storage/...``), as
PocketBase's do, plus ``MANIFEST`` (ours): the size and SHA-256 of every other entry, checked
before a restore touches anything. An archive without a manifest (one made by PocketBase) is
still restorable; it is then checked for structure and database integrity only.

Everything here blocks: the manager runs it in worker threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading

import struct
import urllib.parse
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .. import faults
from ..tools.threads import background_pool
from ..tools.times import now
from ..tools.zipstream import Cancelled as ZipCancelled
from ..tools.zipstream import ZipStream
from ..tools.zipstream import SEGMENT, SegmentError, crc32, inflate_lib, inflate_segment

MANIFEST = "pb_backup_manifest.json"
MANIFEST_FORMAT = 1
DATABASES = ("data.db", "auxiliary.db")
CHUNK = 1 << 20
COMPRESS_LEVEL = 2  # ISA-L level 2: smaller than zlib level 1 (and PocketBase), ~4x as fast
# Entries of pb_data never put in a backup (and never restored from one).
EXCLUDED_TOP = frozenset({"backups"})
EXCLUDED_SUFFIXES = ("-wal", "-shm", "-journal")

# Limits against hostile archives (zip bombs). Deflate cannot expand more than ~1032:1, so a
# bomb is an entry of a very high ratio, many of them, or many entries sharing one compressed
# stream. Real pb_data compresses far less than 200:1 (the reference data.db: 2.3:1; photos:
# 1:1), so beyond that ratio an entry over 64 MiB is refused, and so is an archive that would
# expand to over 256 MiB; entries whose data overlap are refused whatever their size. (Files of
# zeros under 64 MiB, which a user may well upload, restore at any ratio.)
MAX_ENTRIES = 1_000_000
MAX_RATIO = 200
RATIO_MIN_SIZE = 64 << 20  # smaller entries may have any ratio...
TOTAL_RATIO_MIN_SIZE = 256 << 20  # ...and so may smaller archives
MAX_NAME_PART = 255  # bytes in one component of an entry's path (as the file systems allow)
MAX_NAME = 4096
DISK_MARGIN = 64 << 20  # free space kept on the disk after extracting

Progress = Callable[[int], None]


class ArchiveError(Exception):
    """The archive cannot be written or is not a sound backup; the message is safe to show."""


class Cancelled(ArchiveError):
    def __init__(self) -> None:
        super().__init__("the job was cancelled")


@dataclass
class Source:
    arcname: str
    path: Path
    # How to read it, when a plain open() must not be used (a live database: Database.open_file).
    opener: Callable[[], IO[bytes]] | None = None

    def open(self) -> IO[bytes]:
        return self.opener() if self.opener is not None else open(self.path, "rb")


def is_excluded(relative: PurePosixPath) -> bool:
    top = relative.parts[0]
    return top in EXCLUDED_TOP or top.startswith(".") or (len(relative.parts) == 1 and top.endswith(EXCLUDED_SUFFIXES))


def collect_files(root: Path, skip: frozenset[str] = frozenset(DATABASES)) -> list[Source]:
    """The regular files of ``root`` that go into a backup, except ``skip`` (the databases, which
    come from snapshots). Symbolic links are not followed."""
    found: list[Source] = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        base = Path(directory)
        rel_dir = PurePosixPath(base.relative_to(root).as_posix())
        if rel_dir.parts and is_excluded(rel_dir):
            dirs[:] = []
            continue
        dirs.sort()
        for name in sorted(files):
            relative = rel_dir / name
            if is_excluded(relative) or str(relative) in skip or name == MANIFEST and not rel_dir.parts:
                continue
            path = base / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(Source(str(relative), path))
    return found


class ArchiveWriter:
    """Writes a backup zip into ``out`` (a file-like object, never seeked), entry by entry, then
    the manifest. Deflate runs on ``workers`` threads (``tools.zipstream``); files whose start does
    not compress (photos, archives) are stored."""

    def __init__(self, out: IO[bytes], progress: Progress = lambda n: None, cancel: threading.Event | None = None,
                 level: int = COMPRESS_LEVEL, workers: int | None = None) -> None:
        self._cancel = cancel or threading.Event()
        self._zip = ZipStream(out, level, workers or default_workers(), self._cancel)
        # SHA-256 (for the manifest) on a thread of its own, beside reading and deflating.
        self._hasher = background_pool(1, "sha256")
        self._progress = progress
        self.files: dict[str, dict[str, Any]] = {}

    def add(self, source: Source, missing_ok: bool = False) -> None:
        """Add one file; with ``missing_ok`` a file deleted meanwhile is left out."""
        faults.gate("backup-write")
        try:
            handle = source.open()
        except FileNotFoundError:
            if missing_ok:
                return
            raise
        with handle:
            st = os.fstat(handle.fileno())
            digest = _Digest(self._hasher)
            try:
                entry = self._zip.add_file(source.arcname, handle, st.st_mtime, st.st_size, on_chunk=digest.update,
                                           progress=self._progress)
            except ZipCancelled:
                raise Cancelled() from None
            finally:
                sha256 = digest.hexdigest()
        self.files[source.arcname] = {"size": entry.size, "sha256": sha256}
        if entry.segments is not None and len(entry.segments) > 1:
            # Where its independent deflate segments end: a restore inflates them in parallel.
            self.files[source.arcname]["segments"] = entry.segments

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        manifest = {"format": MANIFEST_FORMAT, "createdAt": now(), **(extra or {}), "segmentSize": SEGMENT,
                    "files": self.files}
        self._zip.add_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._zip.close()
        self._hasher.shutdown()
        return manifest

    def close(self) -> None:
        """Release the writer after a failure (what was written is discarded by the caller)."""
        self._zip.abort()
        self._hasher.shutdown(cancel_futures=True)


class _InOrder:
    """Calls run in order on ``pool`` (one thread), at most ``behind`` calls behind the caller.

    A failed call raises its exception from the next ``submit`` or ``drain``."""

    def __init__(self, pool: ThreadPoolExecutor, behind: int = 8) -> None:
        self._pool = pool
        self._pending: deque[Future[None]] = deque()
        self._behind = behind

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._behind:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def abandon(self) -> None:
        """Cancel what has not started and wait for what has (its outcome is ignored)."""
        for pending in self._pending:
            pending.cancel()
        for pending in self._pending:
            if not pending.cancelled():
                pending.exception()
        self._pending.clear()


class _Digest:
    """SHA-256 of a file's chunks, computed in order on ``hasher`` (one thread), a few chunks behind."""

    def __init__(self, hasher: ThreadPoolExecutor, behind: int = 8) -> None:
        self._hash = hashlib.sha256()
        self._calls = _InOrder(hasher, behind)

    def update(self, chunk: bytes) -> None:
        self._calls.submit(self._hash.update, chunk)

    def hexdigest(self) -> str:
        self._calls.drain()
        return self._hash.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def default_workers() -> int:
    """Deflate threads: one per core the process may use (the reading thread hashes meanwhile)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# --- reading ---------------------------------------------------------------------------------


def _entry_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path inside the archive, refused if it could point outside the target."""
    name = info.filename
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"the archive has an unsafe entry name {name!r}")
    path = PurePosixPath(name)
    if any(part in ("..", ".") for part in path.parts) or not path.parts:
        raise ArchiveError(f"the archive has an unsafe entry name {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME or \
            any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_PART for part in path.parts):
        raise ArchiveError(f"the archive has an entry name that is too long {name[:80]!r}...")
    # Unix-made zips keep the file type in the high bits of external_attr (0 there: unspecified).
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"the archive has a link or special file entry {name!r}")
    return path


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:  # "zip file version 8.4"
        raise ArchiveError("the file is not a readable zip archive") from exc


@dataclass
class Plan:
    """What an archive would extract to, after its structure was checked."""

    entries: list[tuple[zipfile.ZipInfo, PurePosixPath]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    total_size: int = 0


def plan_archive(archive: zipfile.ZipFile) -> Plan:
    """Check the structure of ``archive`` without extracting it: safe names, no links, no
    duplicates, no encryption, only stored or deflated entries, sane sizes, ``data.db`` at the root."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise ArchiveError("the archive has too many entries")
    plan = Plan()
    seen: set[str] = set()
    manifest_info = None
    for info in infos:
        path = _entry_path(info)
        key = str(path)
        if key in seen:
            raise ArchiveError(f"the archive has a duplicate entry {key!r}")
        seen.add(key)
        if info.flag_bits & 0x1:
            raise ArchiveError("the archive is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(f"the archive entry {key!r} uses an unsupported compression method")
        if info.is_dir():
            continue
        if info.file_size > RATIO_MIN_SIZE and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ArchiveError(f"the archive entry {key!r} has an implausible compression ratio")
        if key == MANIFEST:
            manifest_info = info
            continue
        if is_excluded(path):
            continue  # never restored: backups, temp and dot entries, WAL files
        plan.entries.append((info, path))
        plan.total_size += info.file_size
    _refuse_overlaps(infos, getattr(archive, "start_dir", None))
    compressed = sum(info.compress_size for info in infos)
    if plan.total_size > TOTAL_RATIO_MIN_SIZE and plan.total_size > MAX_RATIO * max(compressed, 1):
        raise ArchiveError("the archive has an implausible compression ratio")
    if not any(str(path) == "data.db" for _, path in plan.entries):
        raise ArchiveError("the archive has no data.db at its root")
    if manifest_info is not None:
        if manifest_info.file_size > 64 << 20:
            raise ArchiveError("the archive manifest is too large")
        try:
            manifest = json.loads(archive.read(manifest_info))
            files = manifest["files"]
            assert isinstance(files, dict)
            for name, entry in files.items():
                assert isinstance(name, str) and isinstance(entry["size"], int) and isinstance(entry["sha256"], str)
        except Exception as exc:
            raise ArchiveError("the archive manifest is not readable") from exc
        plan.manifest = manifest
    return plan


def _refuse_overlaps(infos: list[zipfile.ZipInfo], central_directory: int | None) -> None:
    """Each entry's data must lie between its local header and the next entry's: entries sharing
    compressed data are a zip bomb (a few MB inflating to many entries of a GB each)."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for info, following in zip(ordered, ordered[1:] + [None]):
        end = info.header_offset + 30 + info.compress_size  # at least: header, name and extra aside
        limit = following.header_offset if following is not None else central_directory
        if limit is not None and end > limit:
            raise ArchiveError(f"the archive entry {info.filename!r} overlaps another entry")


def _checked_plan(archive: zipfile.ZipFile) -> Plan:
    """``plan_archive``, with any failure of zipfile itself reported as an unreadable archive."""
    try:
        return plan_archive(archive)
    except ArchiveError:
        raise
    except Exception as exc:
        raise ArchiveError("the file is not a readable zip archive") from exc


def check_upload(path: Path) -> None:
    """An uploaded file must be a readable zip with a sound structure and ``data.db`` at its root."""
    with open_zip(path) as archive:
        _checked_plan(archive)


QUICK_TIER = "sha256+quick_check"  # the manifest proves the bytes: SQLite's own structure check
FULL_TIER = "sha256+integrity_check"  # the same, with the full check asked for (``backup verify``)
PLAIN_TIER = "integrity_check"  # no manifest (PocketBase's zips, hand-made ones): the full check


def tier(manifest: dict[str, Any] | None, full_check: bool = False) -> str:
    """How an archive is verified: with a manifest whose every SHA-256 matched, the databases are
    the very snapshots SQLite produced inside a read transaction, so ``PRAGMA quick_check``
    suffices (0.24 s instead of 1.3 s on the reference data.db: it skips matching each index
    against its table); without one, nothing vouches for the bytes and the full
    ``integrity_check`` runs."""
    if manifest is None:
        return PLAIN_TIER
    return FULL_TIER if full_check else QUICK_TIER


def extract(zip_path: Path, target: Path, progress: Progress = lambda n: None,
            cancel: threading.Event | None = None, on_total: Progress = lambda n: None,
            full_check: bool = False, select: Callable[[str], bool] | None = None,
            on_verified: Callable[[str, Path], None] | None = None) -> dict[str, Any] | None:
    """Extract a backup into the empty directory ``target`` and verify it.

    Verification: the structure (``plan_archive``), the actual size of every entry against its
    declared size, the manifest's size and SHA-256 of every file (when there is a manifest), and
    the databases' check of the archive's ``tier``: ``PRAGMA quick_check`` when the manifest
    vouches for their bytes, ``PRAGMA integrity_check`` without a manifest or with
    ``full_check``. Raises ``ArchiveError`` with the reason; the caller removes ``target`` then.
    Returns the manifest (``None`` for an archive without one): ``tier(manifest, full_check)``
    names the check that ran. ``on_total`` learns the number of bytes to extract before
    ``progress`` counts them. ``select`` (a partial restore): only the entries whose path it
    accepts are extracted and verified; the structure and the manifest's list are checked for
    the whole archive. ``on_verified(name, path)`` (a partial restore, to start reading data.db
    while the rest extracts) is called, on this thread, as soon as an entry's size and SHA-256
    matched the manifest: never for an archive without a manifest, whose bytes only the database
    check vouches for; its own database check may still be running.
    """
    cancel = cancel or threading.Event()
    target.mkdir(parents=True, exist_ok=False)
    os.chmod(target, 0o700)
    with open_zip(zip_path) as archive:
        plan = _checked_plan(archive)
        names = {str(path) for _, path in plan.entries}
        if select is not None:  # (partial restore)
            plan.entries = [(info, path) for info, path in plan.entries if select(str(path))]
            plan.total_size = sum(info.file_size for info, _ in plan.entries)
        on_total(plan.total_size)
        free = shutil.disk_usage(target).free
        if plan.total_size > free - DISK_MARGIN:
            raise ArchiveError("not enough free disk space to extract the backup")
        expected = plan.manifest["files"] if plan.manifest is not None else None
        # A database is checked only once its own SHA-256 matched (below), so the quick tier is
        # never applied to bytes the manifest does not vouch for.
        quick = tier(plan.manifest, full_check) == QUICK_TIER
        if expected is not None:
            missing = sorted(set(expected) - names)
            if missing:
                raise ArchiveError(f"the archive lacks {missing[0]!r}, listed in its manifest")
            unlisted = sorted(names - set(expected))
            if unlisted:
                raise ArchiveError(f"the archive entry {unlisted[0]!r} is not in its manifest")
        # Writing, hashing and the databases' integrity checks run on threads of their own, beside
        # the inflating: a database is checked as soon as it is out, while the next entries inflate.
        segment_size = plan.manifest.get("segmentSize") if plan.manifest is not None else None
        with background_pool(1, "sha256") as hasher, background_pool(1, "extract-write") as writer, \
                background_pool(1, "integrity") as checker, background_pool(default_workers(), "inflate") as inflaters:
            checks: list[Future[None]] = []
            try:
                for index, (info, path) in enumerate(plan.entries):
                    faults.gate("restore-extract")
                    if index == 1:
                        faults.point("restore-extracting")
                    dest = target / Path(*path.parts)
                    segments = _segments(expected, str(path), info, segment_size)
                    size, digest = _extract_entry(archive, info, dest, progress, cancel, hasher, writer,
                                                  segments, segment_size, inflaters)
                    if expected is not None:
                        want = expected[str(path)]
                        if want["size"] != size or want["sha256"] != digest:
                            raise ArchiveError(f"the checksum of {str(path)!r} does not match the manifest")
                        if on_verified is not None:
                            on_verified(str(path), dest)
                    if str(path) in DATABASES:
                        checks.append(checker.submit(check_database, dest, str(path), quick))
                for check in checks:
                    check.result()
            finally:
                for check in checks:
                    check.cancel()
    return plan.manifest


def _segments(expected: dict[str, Any] | None, name: str, info: zipfile.ZipInfo, segment_size: Any) -> list[int] | None:
    """The compressed sizes of the entry's independent deflate segments, as its manifest lists
    them, if they can be: a deflated entry, sizes that add up to its compressed size, as many as
    its content needs. Otherwise None (the entry inflates as one stream). Whether each segment
    really is one is checked as it inflates (``inflate_segment``)."""
    listed = (expected or {}).get(name, {}).get("segments")
    if not isinstance(listed, list) or len(listed) < 2 or info.compress_type != zipfile.ZIP_DEFLATED:
        return None
    if not isinstance(segment_size, int) or not 0 < segment_size <= SEGMENT or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in listed):
        return None
    if sum(listed) != info.compress_size or len(listed) != -(-info.file_size // segment_size):
        return None
    return listed


def _extract_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, progress: Progress,
                   cancel: threading.Event, hasher: ThreadPoolExecutor, writer: ThreadPoolExecutor,
                   segments: list[int] | None = None, segment_size: int = SEGMENT,
                   inflaters: ThreadPoolExecutor | None = None) -> tuple[int, str]:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ArchiveError(f"the archive entry {info.filename!r} conflicts with another entry") from None
    digest = _Digest(hasher)
    size = 0
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise ArchiveError(f"the archive entry {info.filename!r} conflicts with another entry") from None
    crc = 0
    # This thread inflates (or, with segments, the inflaters do, in parallel); the writer thread
    # writes and the hasher hashes, a few chunks behind.
    if segments is not None and inflaters is not None:
        chunks = _segment_chunks(archive, info, segments, segment_size, inflaters)
        writes = _InOrder(writer, 2)
    else:
        chunks = _entry_chunks(archive, info)
        writes = _InOrder(writer)
    try:
        for chunk in chunks:
            if cancel.is_set():
                raise Cancelled()
            size += len(chunk)
            if size > info.file_size:
                raise ArchiveError(f"the archive entry {info.filename!r} is larger than it declares")
            writes.submit(_write_all, fd, chunk)
            crc = crc32(chunk, crc)
            digest.update(chunk)
            progress(len(chunk))
        writes.drain()
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zlib.error, inflate_lib.error, SegmentError, EOFError, ValueError, NotImplementedError,
            RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk (full, read-only), not the archive
        raise ArchiveError(f"the archive entry {info.filename!r} is damaged") from exc
    finally:
        writes.abandon()  # nothing may write to ``fd`` once it is closed
        os.close(fd)
        if hasattr(chunks, "close"):
            chunks.close()  # (the inflaters' work in flight is waited for)
    if size != info.file_size or crc != info.CRC:
        raise ArchiveError(f"the archive entry {info.filename!r} is damaged")
    return size, digest.hexdigest()


def _seek_to_data(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    """The archive's file, positioned at the first byte of ``info``'s compressed data."""
    handle = archive.fp
    assert handle is not None
    handle.seek(info.header_offset)
    header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ArchiveError(f"the archive entry {info.filename!r} is damaged")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    handle.seek(info.header_offset + 30 + name_length + extra_length)
    return handle


def _entry_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The content of ``info``, inflated by ISA-L where installed (about twice zlib's speed), at
    most ``CHUNK`` bytes at a time whatever the compression ratio. The caller checks size and CRC."""
    handle = _seek_to_data(archive, info)
    left = info.compress_size
    inflater = inflate_lib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    while left > 0:
        raw = handle.read(min(CHUNK, left))
        if not raw:
            raise ArchiveError(f"the archive entry {info.filename!r} is cut short")
        left -= len(raw)
        if inflater is None:
            yield raw
            continue
        data = inflater.decompress(raw, CHUNK)
        while True:
            if data:
                yield data
            if not inflater.unconsumed_tail:
                break
            data = inflater.decompress(inflater.unconsumed_tail, CHUNK)
    if inflater is not None:
        tail = inflater.flush()
        if tail:
            yield tail
        if not inflater.eof:
            raise ArchiveError(f"the archive entry {info.filename!r} is damaged")


def _segment_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, segments: list[int], segment_size: int,
                    inflaters: ThreadPoolExecutor) -> Iterator[bytes]:
    """The content of ``info``, its independent segments inflated on ``inflaters`` in parallel (a
    few ahead of the caller), in order. The caller checks size and CRC."""
    handle = _seek_to_data(archive, info)
    ahead = 2 * getattr(inflaters, "_max_workers", 2)
    pending: deque[Future[bytes]] = deque()
    try:
        for index, length in enumerate(segments):
            raw = handle.read(length)
            if len(raw) != length:
                raise ArchiveError(f"the archive entry {info.filename!r} is cut short")
            pending.append(inflaters.submit(inflate_segment, raw, index == len(segments) - 1, segment_size))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()


def check_database(path: Path, name: str, quick: bool = False) -> None:
    """``PRAGMA integrity_check`` (or, ``quick``, ``PRAGMA quick_check``) must answer ``ok``."""
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True, isolation_level=None)
        try:
            rows = conn.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ArchiveError(f"{name} is not a valid SQLite database") from exc
    if [tuple(row) for row in rows] != [("ok",)]:
        raise ArchiveError(f"{name} failed its integrity check")

