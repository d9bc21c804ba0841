"""In-process tests of the backup building blocks: local storage, database snapshots, archives
(writing, extracting, refusing hostile or damaged ones) and the journalled data swap.

Real files and real SQLite databases in ``tmp_path``; nothing is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import subprocess
import os
import shutil
import sqlite3
import stat
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.backups import archive, restore
from server.backups.archive import (
    MANIFEST,
    ArchiveError,
    ArchiveWriter,
    Source,
    collect_files,
    extract,
    plan_archive,
)
from server.backups.manager import name_errors
from server.database import Database
from server.storage import InvalidKey, StoredFileExists, StoredFileMissing, check_key
from server.storage.base import CHUNK_SIZE
from server.storage.local import LocalStorage

# --- helpers ---------------------------------------------------------------------------------


def tree(root: Path, skip_top: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every entry under ``root``: files as their bytes, directories as ``"<dir>"``, links as
    ``("<link>", target)``; top-level names in ``skip_top`` are left out."""
    found: dict[str, Any] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        base = Path(directory)
        rel = base.relative_to(root)
        if rel.parts and rel.parts[0] in skip_top:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = base / name
            key = (rel / name).as_posix()
            if not rel.parts and name in skip_top:
                continue
            if path.is_symlink():
                found[key] = ("<link>", os.readlink(path))
            elif path.is_dir():
                found[key] = "<dir>"
            else:
                found[key] = path.read_bytes()
    return found


def make_db(path: Path, rows: int = 50, wal: bool = False, table: str = "items") -> None:
    conn = sqlite3.connect(path)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.executemany(f"INSERT INTO {table} (name) VALUES (?)", [(f"row {i}",) for i in range(rows)])
        conn.commit()
    finally:
        conn.close()


def db_bytes(rows: int = 50, table: str = "items") -> bytes:
    """The bytes of a small, sound SQLite database (rollback-journal mode)."""
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"pbtest_{os.getpid()}_{os.urandom(4).hex()}.db"
    try:
        make_db(scratch, rows, table=table)
        return scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)


def integrity_failing_db() -> bytes:
    """A database whose header and structure are fine but whose index disagrees with its table:
    one byte string in a page in the middle of the file is changed."""
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"pbtest_{os.getpid()}_{os.urandom(4).hex()}.db"
    try:
        conn = sqlite3.connect(scratch)
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, pad TEXT)")
        conn.execute("CREATE INDEX t_k ON t (k)")
        conn.executemany("INSERT INTO t (k, pad) VALUES (?, ?)", [(f"key-{i:06d}", "p" * 50) for i in range(3000)])
        conn.commit()
        conn.close()
        data = bytearray(scratch.read_bytes())
        at = data.find(b"key-001500")
        pages = len(data) // 4096
        assert 2 <= at // 4096 <= pages - 2, "the marker should sit in a page in the middle"
        data[at + 4:at + 10] = b"zzzzzz"
        scratch.write_bytes(bytes(data))
        # Precondition: SQLite opens it, and integrity_check reports problems (it does not raise).
        conn = sqlite3.connect(scratch)
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        conn.close()
        assert rows != [("ok",)] and rows, rows
        return bytes(data)
    finally:
        scratch.unlink(missing_ok=True)


def malformed_db() -> bytes:
    """A database whose b-tree structure is broken (a table page's cell pointers are overwritten),
    which even ``quick_check`` finds."""
    data = bytearray(db_bytes(3000))
    page = 4096
    assert len(data) > 4 * page
    data[2 * page + 8:2 * page + 40] = b"\xff" * 32  # page 3: its cell pointer array
    return bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(files: dict[str, bytes]) -> bytes:
    return json.dumps({"format": 1, "createdAt": "2024-01-01 00:00:00.000Z",
                       "files": {name: {"size": len(data), "sha256": sha(data)} for name, data in files.items()}}).encode()


Entry = tuple["str | zipfile.ZipInfo", bytes]


def write_zip(path: Path, entries: list[Entry], patch: Callable[[zipfile.ZipFile], None] | None = None,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of ``entries``; ``patch`` may alter the central directory records before they are written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are wanted in one test
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
            if patch is not None:
                patch(zf)
    return path


def good_files() -> dict[str, bytes]:
    return {
        "data.db": db_bytes(40),
        "auxiliary.db": db_bytes(10, table="logs"),
        "storage/col1/rec1/photo.png": os.urandom(5000),
        "types.d.ts": b"// generated types\n",
    }


def good_entries(files: dict[str, bytes] | None = None, manifest: bool = True) -> list[Entry]:
    files = good_files() if files is None else files
    entries: list[Entry] = list(files.items())
    if manifest:
        entries.append((MANIFEST, manifest_for(files)))
    return entries


def info(name: str, mode: int = stat.S_IFREG | 0o644, compress_type: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    zi.external_attr = mode << 16
    zi.compress_type = compress_type
    return zi


# --- LocalStorage ----------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "backups", tmp_path / "temp")


async def read_all(store: LocalStorage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


async def test_storage_commit_publishes_atomically(store: LocalStorage) -> None:
    writer = store.open_write("a.zip")
    writer.write(b"hello ")
    writer.write(b"world")
    assert writer.tell() == 11
    # Nothing is visible before the commit.
    assert await store.stat("a.zip") is None
    assert await store.list() == []
    assert listing(store.root) == []
    assert len(listing(store.temp_dir)) == 1
    published = writer.commit()
    assert published.key == "a.zip" and published.size == 11
    assert await read_all(store, "a.zip") == b"hello world"
    assert listing(store.root) == ["a.zip"]
    assert listing(store.temp_dir) == []  # the temp file became the published one
    assert stat.S_IMODE(os.stat(store.root / "a.zip").st_mode) == 0o600
    found = await store.stat("a.zip")
    assert found is not None and found.size == 11 and found.modified.tzinfo is not None
    assert await store.exists("a.zip")


async def test_storage_abort_leaves_nothing(store: LocalStorage) -> None:
    writer = store.open_write("a.zip")
    writer.write(b"x" * 1000)
    writer.abort()
    writer.abort()  # idempotent
    assert listing(store.root) == [] and listing(store.temp_dir) == []
    assert await store.stat("a.zip") is None

    with pytest.raises(RuntimeError), store.open_write("b.zip") as writer:
        writer.write(b"partial")
        raise RuntimeError("the zip writer failed")
    assert listing(store.root) == [] and listing(store.temp_dir) == []

    async def failing() -> Any:
        yield b"first chunk"
        raise ValueError("the client went away")

    with pytest.raises(ValueError):
        await store.write("c.zip", failing())
    assert listing(store.root) == [] and listing(store.temp_dir) == []


async def test_storage_async_write(store: LocalStorage) -> None:
    async def chunks() -> Any:
        for i in range(5):
            yield bytes([i]) * 1000

    published = await store.write("w.zip", chunks())
    assert published.size == 5000
    assert await read_all(store, "w.zip") == b"".join(bytes([i]) * 1000 for i in range(5))
    assert stat.S_IMODE(os.stat(store.root / "w.zip").st_mode) == 0o600


async def test_storage_commit_never_overwrites(store: LocalStorage) -> None:
    first = store.open_write("a.zip")
    first.write(b"original")
    second = store.open_write("a.zip")  # both started before either committed
    second.write(b"intruder")
    first.commit()
    with pytest.raises(StoredFileExists):
        second.commit()
    assert await read_all(store, "a.zip") == b"original"
    assert listing(store.root) == ["a.zip"] and listing(store.temp_dir) == []

    async def chunks() -> Any:
        yield b"again"

    with pytest.raises(StoredFileExists):
        await store.write("a.zip", chunks())
    assert await read_all(store, "a.zip") == b"original"
    assert listing(store.temp_dir) == []


async def test_storage_list_sorted_regular_files_only(store: LocalStorage, tmp_path: Path) -> None:
    for key in ("b.zip", "a.zip", "c_other.zip"):
        writer = store.open_write(key)
        writer.write(key.encode())
        writer.commit()
    (store.root / ".hidden.zip").write_bytes(b"dot")
    (store.root / "dir.zip").mkdir()
    outside = tmp_path / "outside.zip"
    outside.write_bytes(b"secret")
    (store.root / "link.zip").symlink_to(outside)
    (store.root / "dangling.zip").symlink_to(tmp_path / "nothing")
    (store.temp_dir / "upload_x.part").write_bytes(b"in progress")

    files = await store.list()
    assert [f.key for f in files] == ["a.zip", "b.zip", "c_other.zip"]
    assert [f.size for f in files] == [5, 5, 11]
    assert [f.key for f in await store.list("c_")] == ["c_other.zip"]
    assert await store.list("zzz") == []
    assert await store.stat("missing.zip") is None
    assert await store.stat("dir.zip") is None
    assert await store.stat("link.zip") is None
    with pytest.raises(StoredFileMissing):
        await read_all(store, "dir.zip")
    assert await LocalStorage(tmp_path / "nowhere", tmp_path / "t2").list() == []


async def test_storage_read_ranges(store: LocalStorage) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 12345)
    writer = store.open_write("big.zip")
    writer.write(data)
    writer.commit()
    size = len(data)
    cases = [(0, None), (0, 10), (7, 8), (5, 5), (10, 5), (CHUNK_SIZE - 3, CHUNK_SIZE + 3),
             (CHUNK_SIZE, 2 * CHUNK_SIZE + 1), (size - 1, None), (size - 100, size + 100), (size, None),
             (size + 10, None), (100, size)]
    for start, end in cases:
        assert await read_all(store, "big.zip", start, end) == data[start:end], (start, end)
    chunks = [chunk async for chunk in store.read("big.zip")]
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks) and len(chunks) >= 3
    with pytest.raises(StoredFileMissing):
        await read_all(store, "missing.zip")


BAD_KEYS = ["a/b.zip", "a\\b.zip", "..", ".", "../x.zip", "..\\x.zip", ".hidden.zip", "a\x00b.zip", "",
            "x" * 252 + ".zip", "é" * 126 + ".zip", "/etc/passwd", "a\nb.zip", "a\tb.zip", "a.zip\n", "a.zip\r",
            "\ud800x.zip"]  # a lone surrogate


@pytest.mark.parametrize("key", BAD_KEYS, ids=[ascii(k)[:24] for k in BAD_KEYS])
async def test_storage_invalid_keys_refused_everywhere(store: LocalStorage, tmp_path: Path, key: str) -> None:
    writer = store.open_write("good.zip")
    writer.write(b"good")
    writer.commit()
    source = tmp_path / "source.zip"
    source.write_bytes(b"payload")
    before = tree(tmp_path)

    with pytest.raises(InvalidKey):
        check_key(key)
    with pytest.raises(InvalidKey):
        await store.stat(key)
    with pytest.raises(InvalidKey):
        await store.exists(key)
    with pytest.raises(InvalidKey):
        await read_all(store, key)
    with pytest.raises(InvalidKey):
        await store.delete(key)
    with pytest.raises(InvalidKey):
        store.open_write(key)
    with pytest.raises(InvalidKey):
        await store.put_file(key, source)
    with pytest.raises(InvalidKey):
        async with store.local_copy(key, store.temp_dir):
            pass

    async def chunks() -> Any:
        yield b"x"

    with pytest.raises(InvalidKey):
        await store.write(key, chunks())
    assert tree(tmp_path) == before  # nothing created, moved or removed anywhere


async def test_storage_longest_key_accepted(store: LocalStorage) -> None:
    key = "x" * 251 + ".zip"
    assert len(key.encode()) == 255
    writer = store.open_write(key)
    writer.write(b"long")
    writer.commit()
    assert [f.key for f in await store.list()] == [key]


@pytest.mark.parametrize("name", ["a.zip\n", "pb_backup.zip\n", "a.zip\r\n"])
def test_backup_names_with_trailing_newline_refused(name: str) -> None:
    # "$" in a regex also matches before a final newline: names must be matched in full.
    assert name_errors(name) is not None
    with pytest.raises(InvalidKey):
        check_key(name)


async def test_storage_delete(store: LocalStorage) -> None:
    with pytest.raises(StoredFileMissing):
        await store.delete("missing.zip")
    (store.root).mkdir(parents=True)
    (store.root / "dir.zip").mkdir()
    with pytest.raises(StoredFileMissing):
        await store.delete("dir.zip")
    assert (store.root / "dir.zip").is_dir()
    writer = store.open_write("a.zip")
    writer.write(b"a")
    writer.commit()
    await store.delete("a.zip")
    assert await store.stat("a.zip") is None and listing(store.root) == ["dir.zip"]
    with pytest.raises(StoredFileMissing):
        await store.delete("a.zip")


async def test_storage_put_file_moves(store: LocalStorage, tmp_path: Path) -> None:
    source = tmp_path / "upload.tmp"
    source.write_bytes(b"zip bytes" * 1000)
    os.chmod(source, 0o644)
    inode = source.stat().st_ino
    published = await store.put_file("up.zip", source)
    assert published.key == "up.zip" and published.size == 9000
    assert not source.exists()
    target = store.root / "up.zip"
    assert target.read_bytes() == b"zip bytes" * 1000
    assert target.stat().st_ino == inode  # moved, not copied
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(store.temp_dir) == []

    other = tmp_path / "other.tmp"
    other.write_bytes(b"other")
    with pytest.raises(StoredFileExists):
        await store.put_file("up.zip", other)
    assert target.read_bytes() == b"zip bytes" * 1000


async def test_storage_refuses_planted_symlink(store: LocalStorage, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not serve me")
    store.root.mkdir(parents=True)
    (store.root / "evil.zip").symlink_to(secret)
    with pytest.raises(StoredFileMissing):
        await read_all(store, "evil.zip")
    assert await store.stat("evil.zip") is None
    assert await store.list() == []
    with pytest.raises(StoredFileMissing):
        async with store.local_copy("evil.zip", store.temp_dir):
            pass
    # A committed file under a name taken by a link is refused too.
    writer = store.open_write("evil.zip")
    writer.write(b"new")
    with pytest.raises(StoredFileExists):
        writer.commit()
    assert secret.read_bytes() == b"do not serve me"


async def test_storage_local_copy_is_the_file(store: LocalStorage) -> None:
    writer = store.open_write("a.zip")
    writer.write(b"abc")
    writer.commit()
    async with store.local_copy("a.zip", store.temp_dir) as path:
        assert path.read_bytes() == b"abc"
    with pytest.raises(StoredFileMissing):
        async with store.local_copy("missing.zip", store.temp_dir):
            pass


# --- Database.snapshot ------------------------------------------------------------------------


def rows_of(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return [row[0] for row in conn.execute("SELECT id FROM t ORDER BY id")]
    finally:
        conn.close()


def copy_out(snapshot: Path, dest: Path) -> Path:
    """The snapshot file's bytes alone (no WAL beside them), as the backup reads them."""
    dest.write_bytes(snapshot.read_bytes())
    return dest


async def open_db(path: Path, rows: int) -> Database:
    db = Database(path)
    await db.open()
    await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB)")
    for _ in range(rows):
        await db.execute("INSERT INTO t (blob) VALUES (randomblob(100))")
    return db


async def timed_insert(db: Database, size: int = 100) -> None:
    """An insert that must not wait for the snapshot (a liveness bound, not a speed measure:
    the latencies are measured by ``make bench``)."""
    await asyncio.wait_for(db.execute("INSERT INTO t (blob) VALUES (randomblob(?))", (size,)), timeout=30)


async def test_snapshot_pins_main_file_while_writes_go_on(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    db = await open_db(tmp_path / "data.db", 200)
    try:
        async with db.snapshot(temp) as snap:
            assert snap == db.path  # the fast way: no copy
            # Enough data to pass SQLite's auto-checkpoint threshold (1000 pages) several times:
            # a checkpoint that wrote into the main file now would break the snapshot.
            for _ in range(40):
                await timed_insert(db, 200_000)
            assert await db.scalar("SELECT count(*) FROM t") == 240  # readers see the new rows
            assert (tmp_path / "data.db-wal").stat().st_size > 4_000_000
            copied = copy_out(snap, tmp_path / "copy.db")
        assert rows_of(copied) == list(range(1, 201))
        assert listing(temp) == []
        # Released: a full checkpoint can run again.
        conn = sqlite3.connect(db.path, timeout=1)
        try:
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            conn.close()
        assert await db.scalar("SELECT count(*) FROM t") == 240
    finally:
        await db.close()


async def test_snapshot_is_one_instant_under_concurrent_writes(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    db = await open_db(tmp_path / "data.db", 10)
    stop = asyncio.Event()

    async def keep_writing() -> int:
        count = 0
        while not stop.is_set():
            await timed_insert(db)
            count += 1
            await asyncio.sleep(0)
        return count

    writer = asyncio.create_task(keep_writing())
    try:
        await asyncio.sleep(0.1)
        async with db.snapshot(temp) as snap:
            copied = copy_out(snap, tmp_path / "copy.db")
            await asyncio.sleep(0.1)
        stop.set()
        written = await asyncio.wait_for(writer, timeout=10)
        ids = rows_of(copied)
        total = await db.scalar("SELECT count(*) FROM t")
        assert written > 0 and total == 10 + written
        assert ids == list(range(1, len(ids) + 1))  # a prefix: no gap, no half-written transaction
        assert 10 <= len(ids) < total
    finally:
        stop.set()
        if not writer.done():
            writer.cancel()
        await db.close()


async def test_snapshot_falls_back_to_copy_when_wal_is_busy(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    db = await open_db(tmp_path / "data.db", 100)
    reader = sqlite3.connect(db.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 100  # holds an old snapshot
        for _ in range(20):
            await db.execute("INSERT INTO t (blob) VALUES (randomblob(100))")
        async with db.snapshot(temp) as snap:
            assert snap != db.path and snap.parent == temp and snap.exists()
            assert stat.S_IMODE(snap.stat().st_mode) == 0o600
            for _ in range(10):
                await timed_insert(db)
            copied = copy_out(snap, tmp_path / "copy.db")
        assert not snap.exists() and listing(temp) == []
        assert rows_of(copied) == list(range(1, 121))
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 100  # the other reader was left alone
    finally:
        reader.execute("COMMIT")
        reader.close()
        await db.close()


# --- ArchiveWriter + extract ------------------------------------------------------------------


def build_pb_data(root: Path, outside: Path) -> dict[str, bytes]:
    """A fake pb_data; returns what a backup of it must hold (name to bytes)."""
    root.mkdir(parents=True)
    make_db(root / "data.db", 120)
    make_db(root / "auxiliary.db", 30, table="logs")
    (root / "storage" / "a" / "b").mkdir(parents=True)
    (root / "storage" / "a" / "b" / "file.bin").write_bytes(os.urandom(300_000))
    (root / "storage" / "a" / "zeros.bin").write_bytes(b"\0" * 2_000_000)
    (root / "storage" / "c").mkdir()
    (root / "storage" / "c" / "empty.txt").write_bytes(b"")
    (root / "storage" / "empty_dir").mkdir()
    (root / "types.d.ts").write_text("// types\n")
    # Never in a backup:
    (root / "backups").mkdir()
    (root / "backups" / "x.zip").write_bytes(b"an older backup")
    (root / ".pb_temp_to_delete").mkdir()
    (root / ".pb_temp_to_delete" / "t").write_bytes(b"temp")
    (root / ".pb_restore" / "old").mkdir(parents=True)
    (root / ".pb_restore" / "old" / "data.db").write_bytes(b"old data")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x").write_bytes(b"hidden")
    (root / ".dotfile").write_bytes(b"dot")
    (root / "data.db-wal").write_bytes(b"wal frames")
    (root / "data.db-shm").write_bytes(b"shm")
    (root / "auxiliary.db-journal").write_bytes(b"journal")
    (root / MANIFEST).write_bytes(b"{}")
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"outside secret")
    (root / "storage" / "link.txt").symlink_to(outside / "secret.txt")
    (root / "storage" / "dirlink").symlink_to(outside)
    names = ["data.db", "auxiliary.db", "storage/a/b/file.bin", "storage/a/zeros.bin", "storage/c/empty.txt",
             "types.d.ts"]
    return {name: (root / name).read_bytes() for name in names}


def write_backup(root: Path, out: Path, **kwargs: Any) -> tuple[dict[str, Any], list[int]]:
    sources = [Source("data.db", root / "data.db"), Source("auxiliary.db", root / "auxiliary.db")]
    sources += collect_files(root)
    progress: list[int] = []
    with open(out, "wb") as handle:
        zipper = ArchiveWriter(handle, progress.append, **kwargs)
        for source in sources:
            zipper.add(source)
        manifest = zipper.finish({"app": "Test App"})
    return manifest, progress


def test_collect_files_skips_what_a_backup_must_not_hold(tmp_path: Path) -> None:
    expected = build_pb_data(tmp_path / "pb_data", tmp_path / "outside")
    names = [source.arcname for source in collect_files(tmp_path / "pb_data")]
    assert sorted(names) == sorted(set(expected) - {"data.db", "auxiliary.db"})
    everything = [source.arcname for source in collect_files(tmp_path / "pb_data", skip=frozenset())]
    assert sorted(everything) == sorted(expected)


def test_archive_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "pb_data"
    expected = build_pb_data(root, tmp_path / "outside")
    out = tmp_path / "backup.zip"
    manifest, progress = write_backup(root, out)

    assert manifest["format"] == 1 and manifest["app"] == "Test App" and manifest["createdAt"]
    assert manifest["files"] == {name: {"size": len(data), "sha256": sha(data)} for name, data in expected.items()}
    assert sum(progress) == sum(len(data) for data in expected.values())
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted([*expected, MANIFEST])
        assert json.loads(zf.read(MANIFEST)) == manifest
        for zi in zf.infolist():
            assert zi.compress_type in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED)
            assert stat.S_ISREG(zi.external_attr >> 16)
        assert zf.getinfo("storage/a/zeros.bin").compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo("storage/a/zeros.bin").compress_size < 100_000  # compressed
        assert zf.testzip() is None

    archive.check_upload(out)
    target = tmp_path / "restored" / "data"
    extracted: list[int] = []
    assert extract(out, target, extracted.append) == manifest
    assert sum(extracted) == sum(len(data) for data in expected.values())
    got = tree(target)
    dirs = {name for name, value in got.items() if value == "<dir>"}
    assert {name: value for name, value in got.items() if name not in dirs} == expected
    assert dirs == {"storage", "storage/a", "storage/a/b", "storage/c"}
    assert not any(stat.S_IMODE((target / name).stat().st_mode) & 0o077 for name in expected)
    assert (tmp_path / "outside" / "secret.txt").read_bytes() == b"outside secret"


async def test_archive_written_through_local_storage(tmp_path: Path) -> None:
    """As the manager does: the zip is written into a storage writer and published on commit."""
    root = tmp_path / "pb_data"
    expected = build_pb_data(root, tmp_path / "outside")
    store = LocalStorage(root / "backups", root / ".pb_temp_to_delete")
    writer = store.open_write("pb_backup_test.zip")
    zipper = ArchiveWriter(writer)
    for source in [Source("data.db", root / "data.db"), Source("auxiliary.db", root / "auxiliary.db"),
                   *collect_files(root)]:
        zipper.add(source)
    zipper.finish()
    published = writer.commit()
    assert published.size == (root / "backups" / "pb_backup_test.zip").stat().st_size
    target = tmp_path / "restored"
    manifest = extract(root / "backups" / "pb_backup_test.zip", target)
    assert manifest is not None and set(manifest["files"]) == set(expected)
    for name, data in expected.items():
        assert (target / name).read_bytes() == data


def test_archive_writer_cancel_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * archive.CHUNK))
    cancel = threading.Event()
    cancel.set()
    buffer = io.BytesIO()
    zipper = ArchiveWriter(buffer, cancel=cancel)
    with pytest.raises(archive.Cancelled):
        zipper.add(Source("big.bin", tmp_path / "big.bin"))
    zipper.close()

    zipper = ArchiveWriter(io.BytesIO())
    zipper.add(Source("gone.bin", tmp_path / "gone.bin"), missing_ok=True)
    assert zipper.files == {}
    with pytest.raises(FileNotFoundError):
        zipper.add(Source("gone.bin", tmp_path / "gone.bin"))
    zipper.close()


def test_extract_cancelled(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "b.zip", good_entries())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(archive.Cancelled):
        extract(zip_path, tmp_path / "target", cancel=cancel)


def test_pocketbase_style_zip_without_manifest_accepted(tmp_path: Path) -> None:
    files = good_files()
    entries: list[Entry] = [(info("storage/", stat.S_IFDIR | 0o755), b""),
                            (info("storage/col1/", stat.S_IFDIR | 0o755), b"")]
    entries += [(info(name, 0), data) for name, data in files.items()]  # no unix mode, as some zippers do
    # Entries a restore must never bring back, even from a zip that holds them:
    entries += [("backups/old.zip", b"old"), (".pb_temp_to_delete/t", b"t"), ("data.db-wal", b"wal!"),
                ("data.db-shm", b"shm"), (".hidden/x", b"h"), (".pb_restore/journal.json", b"{}")]
    zip_path = write_zip(tmp_path / "pb.zip", entries)
    archive.check_upload(zip_path)
    target = tmp_path / "target"
    assert extract(zip_path, target) is None
    got = {name: value for name, value in tree(target).items() if value != "<dir>"}
    assert got == files


# --- refusals ---------------------------------------------------------------------------------


def _files_with(**changes: bytes | None) -> dict[str, bytes]:
    files = good_files()
    for name, data in changes.items():
        name = name.replace("__", ".")
        if data is None:
            files.pop(name)
        else:
            files[name] = data
    return files


def _set_flag(bit: int, name: str = "data.db") -> Callable[[zipfile.ZipFile], None]:
    def patch(zf: zipfile.ZipFile) -> None:
        zf.getinfo(name).flag_bits |= bit
    return patch


def _set_sizes(name: str, file_size: int | None = None, compress_size: int | None = None) -> Callable[[zipfile.ZipFile], None]:
    """Rewrite the sizes the central directory will declare for ``name``."""
    def patch(zf: zipfile.ZipFile) -> None:
        zi = zf.getinfo(name)
        if file_size is not None:
            zi.file_size = file_size
        if compress_size is not None:
            zi.compress_size = compress_size
    return patch


def case_entry(name: str | zipfile.ZipInfo, data: bytes = b"evil") -> Callable[[Path], Path]:
    return lambda path: write_zip(path, [*good_entries(), (name, data)])


def case_no_data_db(path: Path) -> Path:
    files = _files_with(data__db=None)
    return write_zip(path, good_entries(files))


def case_data_db_directory(path: Path) -> Path:
    files = _files_with(data__db=None)
    return write_zip(path, [(info("data.db/", stat.S_IFDIR | 0o755), b""), *good_entries(files)])


def case_data_db_nested(path: Path) -> Path:
    files = _files_with(data__db=None)
    files["storage/data.db"] = db_bytes()
    files["data.db/inner"] = db_bytes()
    return write_zip(path, good_entries(files))


def case_checksum_mismatch(path: Path) -> Path:
    files = good_files()
    entries: list[Entry] = [(MANIFEST, manifest_for(files))]
    files["storage/col1/rec1/photo.png"] = bytes(5000)  # same size, other bytes
    return write_zip(path, [*files.items(), *entries])


def case_size_mismatch(path: Path) -> Path:
    files = good_files()
    manifest = json.loads(manifest_for(files))
    manifest["files"]["types.d.ts"]["size"] += 1
    return write_zip(path, [*files.items(), (MANIFEST, json.dumps(manifest).encode())])


def case_manifest_lists_missing(path: Path) -> Path:
    files = good_files()
    manifest = manifest_for(files)
    files.pop("types.d.ts")
    return write_zip(path, [*files.items(), (MANIFEST, manifest)])


def case_unlisted_entry(path: Path) -> Path:
    files = good_files()
    return write_zip(path, [*files.items(), ("storage/extra.txt", b"extra"), (MANIFEST, manifest_for(files))])


def case_manifest(content: bytes) -> Callable[[Path], Path]:
    return lambda path: write_zip(path, [*good_files().items(), (MANIFEST, content)])


def case_database(name: str, data: bytes, manifest: bool = True) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        files = good_files()
        files[name] = data
        # With a manifest, it agrees: the database check must catch it.
        return write_zip(path, good_entries(files, manifest=manifest))
    return build


def case_truncated(path: Path) -> Path:
    write_zip(path, good_entries())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def case_tail_cut(path: Path) -> Path:
    write_zip(path, good_entries())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    return path


def case_raw(data: bytes) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return build


def case_declares_smaller(compression: int) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        files = good_files()
        files["storage/bomb.bin"] = b"A" * 3_000_000
        # The manifest agrees with the declared (small) size, as an attacker would write it.
        manifest = json.loads(manifest_for(files))
        manifest["files"]["storage/bomb.bin"] = {"size": 1000, "sha256": sha(b"A" * 1000)}
        return write_zip(path, [*files.items(), (MANIFEST, json.dumps(manifest).encode())],
                         patch=_set_sizes("storage/bomb.bin", file_size=1000), compression=compression)
    return build


def case_implausible_ratio(path: Path) -> Path:
    return write_zip(path, [*good_files().items(), ("storage/bomb.bin", b"A" * 4000)],
                     patch=_set_sizes("storage/bomb.bin", file_size=100 << 20))


def case_many_small_bombs(path: Path) -> Path:
    # Each entry under the per-entry limit (60 MiB of one byte), 300 MiB in all from a few KB.
    names = [f"storage/bomb{i}.bin" for i in range(5)]

    def patch(zf: zipfile.ZipFile) -> None:
        for name in names:
            _set_sizes(name, file_size=60 << 20)(zf)
    return write_zip(path, [*good_files().items(), *((name, b"A" * 4000) for name in names)], patch=patch)


def case_absurd_size(path: Path) -> Path:
    # A petabyte, with a compressed size that keeps the ratio plausible (64:1): the compressed size
    # then runs past the next entry. (A backup too large for an honest disk: tests/test_disk_full.py.)
    return write_zip(path, [*good_files().items(), ("storage/huge.bin", b"A" * 4000)],
                     patch=_set_sizes("storage/huge.bin", file_size=1 << 50, compress_size=1 << 44))


def case_bad_crc(path: Path) -> Path:
    payload = b"0123456789abcdef" * 1000
    write_zip(path, [*good_files().items(), (info("storage/stored.bin", compress_type=zipfile.ZIP_STORED), payload)])
    data = bytearray(path.read_bytes())
    at = data.find(payload)
    data[at + 5000] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def case_compression(method: int) -> Callable[[Path], Path]:
    return lambda path: write_zip(path, [(info("data.db", compress_type=method), db_bytes()),
                                         *good_entries(_files_with(data__db=None))[:-1]])


def case_file_then_directory(path: Path) -> Path:
    return write_zip(path, [*good_files().items(), ("storage/x", b"a file"), ("storage/x/y", b"under it")])


def case_directory_then_file(path: Path) -> Path:
    return write_zip(path, [*good_files().items(), ("storage/x/y", b"under it"), ("storage/x", b"a file")])


UNSAFE = "unsafe entry name"
UNREADABLE = "not a readable zip archive"
# (id, builder, message pattern, refused by plan_archive/check_upload already)
REFUSALS: list[tuple[str, Callable[[Path], Path], str, bool]] = [
    ("dotdot", case_entry("../evil"), UNSAFE, True),
    ("dotdot-deep", case_entry("storage/../../x"), UNSAFE, True),
    ("dotdot-end", case_entry("storage/.."), UNSAFE, True),
    ("absolute", case_entry("/etc/x"), UNSAFE, True),
    ("drive-backslash", case_entry("C:\\x"), UNSAFE, True),
    ("drive-relative", case_entry("C:x"), UNSAFE, True),
    ("backslashes", case_entry("storage\\..\\..\\evil"), UNSAFE, True),
    ("backslash-plain", case_entry("storage\\evil"), UNSAFE, True),
    ("symlink", case_entry(info("storage/link", stat.S_IFLNK | 0o777), b"/etc/passwd"), "link or special file", True),
    ("symlink-top", case_entry(info("evil", stat.S_IFLNK | 0o777), b"../../.."), "link or special file", True),
    ("fifo", case_entry(info("storage/fifo", stat.S_IFIFO | 0o644), b""), "link or special file", True),
    ("device", case_entry(info("storage/dev", stat.S_IFCHR | 0o644), b""), "link or special file", True),
    ("duplicate", case_entry("data.db", db_bytes(3)), "duplicate entry 'data.db'", True),
    ("duplicate-dot-slash", case_entry("./types.d.ts", b"other"), r"duplicate entry|unsafe entry", True),
    ("encrypted", lambda p: write_zip(p, good_entries(), patch=_set_flag(0x1)), "encrypted", True),
    ("bzip2", case_compression(zipfile.ZIP_BZIP2), "unsupported compression method", True),
    ("lzma", case_compression(zipfile.ZIP_LZMA), "unsupported compression method", True),
    ("no-data-db", case_no_data_db, "no data.db", True),
    ("data-db-directory", case_data_db_directory, "no data.db", True),
    ("data-db-not-at-root", case_data_db_nested, "no data.db", True),
    ("checksum", case_checksum_mismatch, r"checksum of 'storage/col1/rec1/photo.png' does not match", False),
    ("size", case_size_mismatch, r"checksum of 'types.d.ts' does not match", False),
    ("manifest-lists-missing", case_manifest_lists_missing, r"lacks 'types.d.ts'", False),
    ("unlisted-entry", case_unlisted_entry, r"'storage/extra.txt' is not in its manifest", False),
    ("manifest-not-json", case_manifest(b"{not json"), "manifest is not readable", True),
    ("manifest-files-list", case_manifest(b'{"files": []}'), "manifest is not readable", True),
    ("manifest-no-files", case_manifest(b'{"format": 1}'), "manifest is not readable", True),
    ("manifest-bad-entry", case_manifest(b'{"files": {"data.db": {"size": "12"}}}'), "manifest is not readable", True),
    ("data-db-random", case_database("data.db", os.urandom(8192)), "data.db is not a valid SQLite database", False),
    ("aux-db-random", case_database("auxiliary.db", os.urandom(8192)), "auxiliary.db is not a valid SQLite database", False),
    ("data-db-text", case_database("data.db", b"this is not a database\n" * 100), "data.db is not a valid SQLite database", False),
    # Without a manifest, nothing vouches for the bytes: the full integrity_check runs and catches an
    # index that disagrees with its table (see test_verification_tiers for the archive with one).
    ("data-db-integrity", case_database("data.db", integrity_failing_db(), manifest=False),
     "data.db failed its integrity check", False),
    ("data-db-malformed", case_database("data.db", malformed_db()),
     r"data\.db (failed its integrity check|is not a valid SQLite database)", False),
    ("truncated", case_truncated, UNREADABLE, True),
    ("tail-cut", case_tail_cut, UNREADABLE, True),
    ("not-a-zip", case_raw(os.urandom(50_000)), UNREADABLE, True),
    ("text-file", case_raw(b"hello, I am a text file\n" * 100), UNREADABLE, True),
    ("empty-file", case_raw(b""), UNREADABLE, True),
    ("zip-magic-only", case_raw(b"PK\x03\x04" + os.urandom(2000)), UNREADABLE, True),
    ("declares-smaller-deflated", case_declares_smaller(zipfile.ZIP_DEFLATED), r"larger than it declares|damaged", False),
    ("declares-smaller-stored", case_declares_smaller(zipfile.ZIP_STORED), r"larger than it declares|damaged", False),
    ("ratio", case_implausible_ratio, "implausible compression ratio", True),
    ("many-small-bombs", case_many_small_bombs, "implausible compression ratio", True),
    ("absurd-size", case_absurd_size, "overlaps another entry", True),
    ("bad-crc", case_bad_crc, "'storage/stored.bin' is damaged", False),
    ("file-then-directory", case_file_then_directory, r"storage/x", False),
    ("directory-then-file", case_directory_then_file, r"storage/x", False),
]


@pytest.mark.parametrize("builder,pattern,structural", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_extract_refuses(tmp_path: Path, builder: Callable[[Path], Path], pattern: str, structural: bool) -> None:
    zips = tmp_path / "zips"
    zips.mkdir()
    zip_path = builder(zips / "backup.zip")
    work = tmp_path / "pb_data" / ".pb_temp_to_delete" / "restore_x"
    work.mkdir(parents=True)
    (tmp_path / "pb_data" / "data.db").write_bytes(b"current data")
    target = work / "data"
    before = tree(tmp_path)

    with pytest.raises(ArchiveError, match=pattern) as caught:
        extract(zip_path, target)
    message = str(caught.value)
    assert str(tmp_path) not in message and "/tmp" not in message, message
    assert len(message) < 300

    # The caller can remove what was extracted, and nothing else changed anywhere.
    assert target.is_dir() and not target.is_symlink()
    shutil.rmtree(target)
    assert tree(tmp_path) == before
    for place in (tmp_path, tmp_path.parent, tmp_path / "pb_data", work):
        assert not (place / "evil").exists() and not (place / "x").exists()

    # Structural problems are already caught without extracting, so an upload is refused too.
    if structural:
        with pytest.raises(ArchiveError, match=pattern):
            archive.check_upload(zip_path)
        with pytest.raises(ArchiveError, match=pattern), archive.open_zip(zip_path) as zf:
            plan_archive(zf)
    else:
        archive.check_upload(zip_path)


def test_extract_refuses_existing_target(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "b.zip", good_entries())
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        extract(zip_path, target)
    assert (target / "keep").read_bytes() == b"keep"


@pytest.mark.parametrize("odd", ["we#ird", "what?now", "pct%41", "sp ace"])
def test_extract_checks_the_right_database_whatever_the_path(tmp_path: Path, odd: str) -> None:
    """The data directory may live under any path: the database check must look at the extracted
    file itself (a URI built from an unescaped path reads '#', '?' and '%' as URI syntax)."""
    base = tmp_path / odd
    base.mkdir()
    good = write_zip(tmp_path / "good.zip", good_entries())
    target = base / "good"
    manifest = extract(good, target)
    assert manifest is not None
    assert rows_of_items(target / "data.db") == 40

    bad = case_database("data.db", b"this is not a database\n" * 100)(tmp_path / "bad.zip")
    before = tree(tmp_path, skip_top=frozenset({odd}))
    with pytest.raises(ArchiveError, match="data.db is not a valid SQLite database"):
        extract(bad, base / "bad")
    assert tree(tmp_path, skip_top=frozenset({odd})) == before  # no stray database created beside
    assert sorted(os.listdir(base)) == ["bad", "good"]


def rows_of_items(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        conn.close()


# --- restore: the journalled swap ----------------------------------------------------------------


def fake_old(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "data.db").write_bytes(b"old data.db")
    (root / "auxiliary.db").write_bytes(b"old auxiliary.db")
    (root / "storage" / "c1" / "r1").mkdir(parents=True)
    (root / "storage" / "c1" / "r1" / "f.txt").write_bytes(b"old file")
    (root / "types.d.ts").write_bytes(b"old types")
    (root / ".old_dotfile").write_bytes(b"old dot")
    (root / "backups").mkdir()
    (root / "backups" / "b1.zip").write_bytes(b"backup one")
    (root / ".pb_temp_to_delete").mkdir()
    (root / ".pb_temp_to_delete" / "keep.txt").write_bytes(b"temp keep")
    (root / ".pb_backup.lock").write_bytes(b"")


def fake_new(root: Path) -> Path:
    new_dir = root / ".pb_temp_to_delete" / "restore_abc" / "data"
    (new_dir / "storage" / "c2").mkdir(parents=True)
    (new_dir / "data.db").write_bytes(b"new data.db")
    (new_dir / "storage" / "c2" / "g.txt").write_bytes(b"new file")
    (new_dir / "newonly.txt").write_bytes(b"new only")
    return new_dir


KEPT_TOP = frozenset({"backups", ".pb_temp_to_delete", ".pb_restore", ".pb_backup.lock"})


@pytest.fixture()
def swap_setup(tmp_path: Path) -> tuple[Path, Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    root = tmp_path / "pb_data"
    fake_old(root)
    new_dir = fake_new(root)
    old_tree = tree(root, skip_top=KEPT_TOP)
    new_tree = tree(new_dir)
    kept = {name: tree(root / name) for name in ("backups",)}
    kept["temp_keep"] = (root / ".pb_temp_to_delete" / "keep.txt").read_bytes()
    return root, new_dir, old_tree, new_tree, kept


def assert_kept(root: Path, kept: dict[str, Any]) -> None:
    assert tree(root / "backups") == kept["backups"]
    assert (root / ".pb_temp_to_delete" / "keep.txt").read_bytes() == kept["temp_keep"]
    assert (root / ".pb_backup.lock").exists()


def test_swap_then_commit(swap_setup: Any) -> None:
    root, new_dir, old_tree, new_tree, kept = swap_setup
    backups_inode = (root / "backups").stat().st_ino
    restore.swap_in(root, new_dir, "b1.zip", "2024-01-01 00:00:00.000Z")

    assert tree(root, skip_top=KEPT_TOP) == new_tree
    assert tree(root / ".pb_restore" / "old") == old_tree
    assert os.listdir(new_dir) == []
    assert (root / "backups").stat().st_ino == backups_inode
    assert_kept(root, kept)
    assert not (root / ".pb_restore" / "old" / "backups").exists()
    assert not (root / ".pb_restore" / "old" / ".pb_temp_to_delete").exists()

    journal = restore.pending(root)
    assert journal is not None and journal["phase"] == "swapped" and journal["key"] == "b1.zip"
    assert restore.interrupted(root) is None  # a completed swap is not undone
    assert tree(root, skip_top=KEPT_TOP) == new_tree

    outcome = restore.commit(root, journal)
    assert outcome.ok and outcome.key == "b1.zip" and outcome.error is None
    assert outcome.started_at == "2024-01-01 00:00:00.000Z"
    assert not (root / ".pb_restore").exists()
    assert tree(root, skip_top=KEPT_TOP) == new_tree
    assert_kept(root, kept)
    assert restore.pending(root) is None and restore.interrupted(root) is None


def test_commit_in_the_background_moves_the_old_data_into_temp_and_deletes_it(swap_setup: Any) -> None:
    """A server commits with ``background``: it serves the new data while the old is deleted
    from the temp directory (which the next start empties, should it stop first)."""
    root, new_dir, old_tree, new_tree, kept = swap_setup
    restore.swap_in(root, new_dir, "b1.zip", "2024-01-01 00:00:00.000Z")
    journal = restore.pending(root)
    assert journal is not None
    outcome = restore.commit(root, journal, background=True)
    assert outcome.ok
    assert not (root / ".pb_restore").exists()  # at once: a new restore can start
    assert restore.pending(root) is None and restore.interrupted(root) is None
    assert tree(root, skip_top=KEPT_TOP) == new_tree
    deadline = time.monotonic() + 10
    while any(p.name.startswith("restored_") for p in (root / ".pb_temp_to_delete").iterdir()):
        assert time.monotonic() < deadline, "the old data was not deleted"
        time.sleep(0.01)
    assert_kept(root, kept)


def test_swap_then_rollback(swap_setup: Any) -> None:
    root, new_dir, old_tree, _new_tree, kept = swap_setup
    restore.swap_in(root, new_dir, "b1.zip", "2024-01-01 00:00:00.000Z")
    journal = restore.pending(root)
    assert journal is not None
    outcome = restore.rollback(root, journal, "the database did not open")
    assert not outcome.ok and outcome.key == "b1.zip"
    assert outcome.error is not None and "the database did not open" in outcome.error
    assert tree(root, skip_top=KEPT_TOP) == old_tree
    assert not (root / ".pb_restore").exists()
    assert_kept(root, kept)
    assert restore.pending(root) is None


def test_swap_replaces_a_stale_work_dir(swap_setup: Any) -> None:
    root, new_dir, old_tree, _new_tree, _kept = swap_setup
    (root / ".pb_restore" / "old" / "junk").mkdir(parents=True)
    restore.swap_in(root, new_dir, "b1.zip", "s")
    assert tree(root / ".pb_restore" / "old") == old_tree
    journal = restore.pending(root)
    assert journal is not None
    restore.rollback(root, journal, "x")
    assert tree(root, skip_top=KEPT_TOP) == old_tree


def _journal_as_swap_in_writes_it(root: Path, new_dir: Path) -> dict[str, Any]:
    work = root / restore.WORK_DIR
    (work / "old").mkdir(parents=True)
    old = sorted(name for name in os.listdir(root) if name not in restore.KEPT)
    new = sorted(name for name in os.listdir(new_dir) if name not in restore.KEPT)
    journal = {"phase": "swapping", "key": "b1.zip", "startedAt": "2024-01-01 00:00:00.000Z", "old": old,
               "new": new, "newDir": str(new_dir)}
    (work / "journal.json").write_text(json.dumps(journal))
    return journal


# (old entries moved out, new entries moved in) when the process died; -1 means all of them.
CRASH_POINTS = [(0, 0), (1, 0), (2, 0), (3, 0), (-1, 0), (-1, 1), (-1, 2), (-1, -1)]


@pytest.mark.parametrize("moved_old,moved_new", CRASH_POINTS, ids=[f"old{a}-new{b}" for a, b in CRASH_POINTS])
def test_interrupted_swap_restores_old_data(swap_setup: Any, moved_old: int, moved_new: int) -> None:
    root, new_dir, old_tree, _new_tree, kept = swap_setup
    journal = _journal_as_swap_in_writes_it(root, new_dir)
    assert journal["new"] == ["data.db", "newonly.txt", "storage"]  # data.db and storage in both
    old = journal["old"] if moved_old == -1 else journal["old"][:moved_old]
    new = journal["new"] if moved_new == -1 else journal["new"][:moved_new]
    for name in old:
        os.rename(root / name, root / ".pb_restore" / "old" / name)
    for name in new:
        os.rename(new_dir / name, root / name)
    assert restore.pending(root) is None

    outcome = restore.interrupted(root)
    assert outcome is not None and not outcome.ok and outcome.key == "b1.zip"
    assert outcome.error and "interrupted" in outcome.error
    assert tree(root, skip_top=KEPT_TOP) == old_tree
    assert not (root / ".pb_restore").exists()
    assert_kept(root, kept)
    assert restore.interrupted(root) is None and restore.pending(root) is None


def test_interrupted_with_a_torn_journal_moves_nothing(swap_setup: Any) -> None:
    root, new_dir, old_tree, new_tree, kept = swap_setup
    (root / ".pb_restore").mkdir()
    (root / ".pb_restore" / "journal.json").write_text('{"phase": "swapp')
    outcome = restore.interrupted(root)
    assert outcome is not None and not outcome.ok
    assert tree(root, skip_top=KEPT_TOP) == old_tree
    assert tree(new_dir) == new_tree
    assert not (root / ".pb_restore").exists()
    assert_kept(root, kept)


def test_no_journal_nothing_to_do(swap_setup: Any) -> None:
    root, _new_dir, old_tree, _new_tree, _kept = swap_setup
    assert restore.interrupted(root) is None and restore.pending(root) is None
    assert tree(root, skip_top=KEPT_TOP) == old_tree


def test_a_work_dir_without_journal_is_removed_and_the_data_kept(swap_setup: Any) -> None:
    # A crash after a commit removed the journal, before the old data left the work directory
    # (or before a swap wrote its journal): what is left there is no data any more.
    root, _new_dir, old_tree, _new_tree, _kept = swap_setup
    left = root / restore.WORK_DIR / "old"
    left.mkdir(parents=True)
    (left / "data.db").write_bytes(b"the previous data, already replaced")
    (left / "storage").mkdir()
    assert restore.interrupted(root) is None and restore.pending(root) is None
    assert not (root / restore.WORK_DIR).exists()
    assert tree(root, skip_top=KEPT_TOP) == old_tree


def test_verification_tiers(tmp_path: Path) -> None:
    """CONTRACT.md, "Restore, step by step": a manifest whose every SHA-256 matches proves the bytes
    are the snapshot SQLite produced, so a restore runs ``quick_check``; the full
    ``integrity_check`` runs without a manifest, or when asked for (``backup verify``)."""
    files = good_files()
    files["data.db"] = integrity_failing_db()  # structurally sound, one index out of step with its table
    with_manifest = write_zip(tmp_path / "ours.zip", good_entries(files))
    plain = write_zip(tmp_path / "plain.zip", good_entries(files, manifest=False))

    manifest = extract(with_manifest, tmp_path / "quick")
    assert manifest is not None and archive.tier(manifest) == "sha256+quick_check"
    with pytest.raises(ArchiveError, match="data.db failed its integrity check"):
        extract(with_manifest, tmp_path / "full", full_check=True)
    assert archive.tier(manifest, True) == "sha256+integrity_check"
    with pytest.raises(ArchiveError, match="data.db failed its integrity check"):
        extract(plain, tmp_path / "plain")
    assert archive.tier(None) == archive.tier(None, True) == "integrity_check"

    # The quick tier applies only to bytes the manifest vouches for: one changed byte of data.db
    # with the manifest left as it was is a checksum failure, before any database check.
    changed = dict(files)
    changed["data.db"] = files["data.db"][:-1] + bytes([files["data.db"][-1] ^ 1])
    entries = [(name, data) for name, data in changed.items()] + [(MANIFEST, manifest_for(files))]
    with pytest.raises(ArchiveError, match="checksum of 'data.db' does not match"):
        extract(write_zip(tmp_path / "changed.zip", entries), tmp_path / "changed")


def test_large_entries_are_written_in_independent_segments_and_inflated_in_parallel(tmp_path: Path) -> None:
    """A deflated entry is a series of independent segments of ``SEGMENT`` bytes (one standard
    deflate stream to any unzip), whose compressed sizes the manifest lists: a restore inflates
    them in parallel. Wrong sizes in the manifest are either ignored (they cannot be segments) or
    make the entry 'damaged', never a wrong file."""
    from server.tools.zipstream import SEGMENT

    root = tmp_path / "pb_data"
    root.mkdir()
    rng = random.Random(7)
    words = [f"word{i}" for i in range(3000)]
    text = " ".join(rng.choice(words) for _ in range(2_600_000)).encode()  # ~23 MB, compressible
    assert len(text) > 4 * SEGMENT
    (root / "data.db").write_bytes(db_bytes(20))
    (root / "auxiliary.db").write_bytes(db_bytes(5, table="logs"))
    (root / "storage").mkdir()
    (root / "storage" / "big.txt").write_bytes(text)
    out = tmp_path / "backup.zip"
    manifest, _ = write_backup(root, out)
    listed = manifest["files"]["storage/big.txt"]["segments"]
    assert manifest["segmentSize"] == SEGMENT and len(listed) == -(-len(text) // SEGMENT)
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("storage/big.txt")
        assert sum(listed) == info.compress_size and zf.read(info) == text  # one stream to zipfile
        assert archive._segments(manifest["files"], "storage/big.txt", info, SEGMENT) == listed
    assert subprocess.run(["unzip", "-tq", str(out)], capture_output=True).returncode == 0
    target = tmp_path / "restored"
    assert extract(out, target) == manifest
    assert (target / "storage" / "big.txt").read_bytes() == text

    def with_segments(name: str, segments: list[Any]) -> Path:
        """The same archive, byte for byte the same entries, with ``segments`` in its manifest."""
        path = tmp_path / name
        with open(path, "wb") as handle:
            zipper = ArchiveWriter(handle)
            for source in [Source("data.db", root / "data.db"), Source("auxiliary.db", root / "auxiliary.db"),
                           *collect_files(root)]:
                zipper.add(source)
            zipper.files["storage/big.txt"]["segments"] = segments
            zipper.finish()
        return path

    # Sizes that add up but are not where the segments end: the entry is damaged.
    shifted = [listed[0] + 1, listed[1] - 1, *listed[2:]]
    with pytest.raises(ArchiveError, match="'storage/big.txt' is damaged"):
        extract(with_segments("shifted.zip", shifted), tmp_path / "shifted")
    # The first two as one (as many sizes: the last one split): it inflates past a segment's size.
    merged = [listed[0] + listed[1], *listed[2:-1], listed[-1] // 2, listed[-1] - listed[-1] // 2]
    assert len(merged) == len(listed) and sum(merged) == sum(listed)
    with pytest.raises(ArchiveError, match="'storage/big.txt' is damaged"):
        extract(with_segments("merged.zip", merged), tmp_path / "merged")  # a segment inflating past its size
    # Sizes that cannot be segments (wrong sum, too few, not numbers) are ignored: one stream.
    for index, bogus in enumerate(([1, 2], [sum(listed)], ["x"] * len(listed), [*listed[:-1], listed[-1] + 5])):
        target = tmp_path / f"bogus{index}"
        extract(with_segments(f"bogus{index}.zip", bogus), target)
        assert (target / "storage" / "big.txt").read_bytes() == text


def test_inflate_segment_refuses_what_is_not_one() -> None:
    from isal import isal_zlib

    from server.tools.zipstream import SegmentError, inflate_segment

    def deflate(data: bytes, flush: int) -> bytes:
        compressor = isal_zlib.compressobj(2, isal_zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(flush)

    middle = deflate(b"a" * 1000, isal_zlib.Z_SYNC_FLUSH)
    last = deflate(b"b" * 1000, isal_zlib.Z_FINISH)
    assert inflate_segment(middle, False) == b"a" * 1000 and inflate_segment(last, True) == b"b" * 1000
    with pytest.raises(SegmentError):
        inflate_segment(middle, True)  # does not end the stream
    with pytest.raises(SegmentError):
        inflate_segment(last, False)  # ends it too early
    with pytest.raises(SegmentError):
        inflate_segment(last + b"extra", True)  # bytes after its end
    with pytest.raises(SegmentError):
        inflate_segment(deflate(b"z" * 5000, isal_zlib.Z_FINISH), True, limit=4096)  # a bomb
