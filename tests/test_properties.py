"""Property-based tests (hypothesis), in-process and fast:

- the archive validator (``server.backups.archive.extract``): a small sound backup, mutated at
  random (entries renamed to hostile names, duplicated, dropped, overlapped, links and odd
  attributes, lying sizes, CRCs, flags and methods, then bytes flipped, cut, or junk added) is
  either extracted exactly, or refused with ``ArchiveError``; never another exception, never a
  file outside the target;
- backup names (``manager.name_errors``): exactly ``^[a-z0-9_-]+\\.zip$``, 1..150 characters;
- storage keys: the local and the S3 storage accept the same keys, and none that could name
  anything but a file directly in the store (the S3 side runs against the suite's ``rclone``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import sqlite3
import stat
import string
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import S3Server
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_hostile_archives import (
    MANIFEST,
    RawEntry,
    build_zip,
    describe,
    manifest_bytes,
    raw_entry,
)

from server.backups import archive
from server.backups.archive import ArchiveError
from server.backups.manager import MAX_NAME_LENGTH, name_errors
from server.storage import InvalidKey, check_key
from server.storage.local import LocalStorage
from server.storage.s3 import S3Config, S3Storage

SLOW_OK = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- (a) the archive validator -------------------------------------------------------------------


def sqlite_bytes(table: str, rows: int) -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany(f"INSERT INTO {table} (v) VALUES (?)", [(f"value {i}",) for i in range(rows)])
    conn.commit()
    data = bytes(conn.serialize())
    conn.close()
    return data


FILES: dict[str, bytes] = {
    "data.db": sqlite_bytes("items", 30),
    "auxiliary.db": sqlite_bytes("logs", 5),
    "storage/col/rec/photo.bin": bytes(range(256)) * 8,
    "storage/col/rec/notes.txt": b"some notes\n" * 20,
    "types.d.ts": b"// types\n",
}


def base_entries() -> list[RawEntry]:
    entries = [raw_entry(name, data) for name, data in FILES.items()]
    entries[2] = raw_entry("storage/col/rec/photo.bin", FILES["storage/col/rec/photo.bin"], method=0)  # one stored
    return entries + [raw_entry(MANIFEST, manifest_bytes(describe(FILES)))]


BASE = base_entries()


def test_the_unmutated_archive_extracts_exactly(tmp_path: Path) -> None:
    """The property's starting point: the base archive is sound."""
    zip_path = tmp_path / "base.zip"
    zip_path.write_bytes(build_zip(BASE))
    manifest = archive.extract(zip_path, tmp_path / "target")
    assert manifest is not None and set(manifest["files"]) == set(FILES)
    assert regular_files(tmp_path / "target") == FILES


# Absolute names point here: it must never come to exist.
ESCAPE_DIR = f"/tmp/pbprop_{os.urandom(4).hex()}"
NAME_PARTS = ["..", ".", "", "/", "//", "\\", "\x00", "storage", "data.db", "auxiliary.db", MANIFEST, "backups",
              ".hidden", "x-wal", "C:", "é", "名", "\u202e", " ", "\n", "a" * 300, "evil", ESCAPE_DIR + "/abs"]
_PARTS = st.sampled_from(NAME_PARTS)
HOSTILE_NAMES = st.one_of(
    st.lists(_PARTS, max_size=6).map("".join),
    st.lists(_PARTS, max_size=6).map("/".join),
    st.lists(_PARTS, max_size=6).map("\\".join),
    st.sampled_from([*FILES, MANIFEST]),  # a duplicate, once renamed
    st.text(max_size=30),
)
U32 = st.integers(0, 0xFFFFFFFF)
SIZES = st.one_of(st.integers(0, 70_000), st.integers(0, 1 << 63), st.sampled_from([0xFFFFFFFF, 1 << 32, 1 << 50]))
MODES = st.one_of(st.sampled_from([stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o644,
                                   stat.S_IFCHR | 0o644, stat.S_IFSOCK | 0o644, stat.S_IFBLK | 0o644,
                                   stat.S_IFREG | 0o644, 0]),
                  st.integers(0, 0xFFFF))
_INDEX = st.integers(0, 63)
STRUCTURAL = st.one_of(
    st.tuples(st.just("rename"), _INDEX, HOSTILE_NAMES),
    st.tuples(st.just("raw_name"), _INDEX, st.binary(max_size=24)),
    st.tuples(st.just("duplicate"), _INDEX, _INDEX),
    st.tuples(st.just("drop"), _INDEX),
    st.tuples(st.just("drop_manifest"), _INDEX),
    st.tuples(st.just("swap"), _INDEX, _INDEX),
    st.tuples(st.just("mode"), _INDEX, MODES),
    st.tuples(st.just("external_attr"), _INDEX, U32),
    st.tuples(st.just("usize"), _INDEX, SIZES),
    st.tuples(st.just("csize"), _INDEX, SIZES),
    st.tuples(st.just("size_delta"), _INDEX, st.integers(-3, 3)),
    st.tuples(st.just("crc"), _INDEX, U32),
    st.tuples(st.just("flags"), _INDEX, st.integers(0, 0xFFFF)),
    st.tuples(st.just("method"), _INDEX, st.sampled_from([0, 1, 8, 9, 12, 14, 93, 99])),
    st.tuples(st.just("local_name"), _INDEX, st.binary(max_size=24)),
    st.tuples(st.just("overlap"), _INDEX, _INDEX),
    st.tuples(st.just("payload_xor"), _INDEX, st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("bad_block"), _INDEX),
)
BYTE_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("prepend"), st.binary(min_size=1, max_size=64)),
)


def mutate(entries: list[RawEntry], op: tuple[Any, ...]) -> list[RawEntry]:
    if not entries:
        return entries
    entries = list(entries)
    kind, i = op[0], op[1] % len(entries)
    entry = entries[i]
    if kind == "rename":
        entries[i] = replace(entry, name=op[2].encode())
    elif kind == "raw_name":
        entries[i] = replace(entry, name=op[2], flags=entry.flags & ~0x800)
    elif kind == "duplicate":
        entries.insert(op[2] % (len(entries) + 1), replace(entry, shares=None))
    elif kind == "drop":
        del entries[i]
    elif kind == "drop_manifest":
        entries = [e for e in entries if e.name != MANIFEST.encode()]
    elif kind == "swap":
        j = op[2] % len(entries)
        entries[i], entries[j] = entries[j], entries[i]
    elif kind == "mode":
        entries[i] = replace(entry, external_attr=(op[2] << 16) | (entry.external_attr & 0xFFFF))
    elif kind == "external_attr":
        entries[i] = replace(entry, external_attr=op[2])
    elif kind in ("usize", "csize"):
        entries[i] = replace(entry, **{kind: op[2]})
    elif kind == "size_delta":
        entries[i] = replace(entry, usize=max(0, entry.usize + op[2]))
    elif kind == "crc":
        entries[i] = replace(entry, crc=op[2])
    elif kind == "flags":
        entries[i] = replace(entry, flags=op[2])
    elif kind == "method":
        entries[i] = replace(entry, method=op[2])
    elif kind == "local_name":
        entries[i] = replace(entry, local_name=op[2])
    elif kind == "overlap" and i > 0:
        entries[i] = replace(entry, shares=op[2] % i)  # its central record points at an earlier local header
    elif kind == "payload_xor" and entry.payload:
        at = op[2] % len(entry.payload)
        payload = entry.payload[:at] + bytes((entry.payload[at] ^ op[3],)) + entry.payload[at + 1:]
        entries[i] = replace(entry, payload=payload)
    elif kind == "bad_block" and entry.payload:
        # The first deflate block header says block type 11, which is reserved: invalid.
        entries[i] = replace(entry, payload=bytes((entry.payload[0] | 0x06,)) + entry.payload[1:])
    # Overlaps must point backwards; moving entries around may have broken that.
    return [replace(e, shares=None) if e.shares is not None and e.shares >= n else e for n, e in enumerate(entries)]


def mutate_bytes(data: bytes, op: tuple[Any, ...]) -> bytes:
    if op[0] == "flip" and data:
        at = int(op[1] * len(data))
        return data[:at] + bytes((data[at] ^ op[2],)) + data[at + 1:]
    if op[0] == "cut":
        return data[: int(op[1] * len(data))]
    if op[0] == "append":
        return data + op[1]
    if op[0] == "prepend":
        return op[1] + data
    return data


def snapshot(root: Path, skip: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for directory, dirs, files in os.walk(root):
        base = Path(directory)
        dirs[:] = [d for d in dirs if base / d != skip]
        for name in dirs + files:
            path = base / name
            st_ = path.lstat()
            found[str(path.relative_to(root))] = (stat.S_IFMT(st_.st_mode), st_.st_size,
                                                  path.read_bytes() if stat.S_ISREG(st_.st_mode) else None)
    return found


def regular_files(target: Path) -> dict[str, bytes]:
    """The files under ``target``, which must hold nothing but directories and regular files."""
    found: dict[str, bytes] = {}
    for directory, dirs, files in os.walk(target):
        base = Path(directory)
        for name in dirs + files:
            mode = (base / name).lstat().st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), f"{base / name}: not a plain file or directory"
            if stat.S_ISREG(mode):
                found[(base / name).relative_to(target).as_posix()] = (base / name).read_bytes()
    return found


def central_directory(zip_path: Path) -> list[zipfile.ZipInfo]:
    """The entries as Python's zipfile reads them (a second reader, to judge a success by)."""
    with zipfile.ZipFile(zip_path) as zf:
        return zf.infolist()


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arena")


_counter = itertools.count()


@pytest.mark.soak  # `make soak`: many more examples (the hypothesis profile in conftest)
@SLOW_OK
@given(structural=st.lists(STRUCTURAL, max_size=4), byte_level=st.lists(BYTE_MUTATIONS, max_size=2))
# A damaged deflate stream (data.db's first block is of the reserved type).
@example(structural=[("bad_block", 0)], byte_level=[])
# A name that the archive may hold but no file system: a 300-byte component.
@example(structural=[("drop_manifest", 0), ("rename", 3, "storage/" + "a" * 300)], byte_level=[])
def test_a_mutated_backup_is_extracted_exactly_or_refused(arena: Path, structural: list[tuple[Any, ...]],
                                                          byte_level: list[tuple[Any, ...]]) -> None:
    entries = BASE
    for op in structural:
        entries = mutate(entries, op)
    content = build_zip(entries)
    for op in byte_level:
        content = mutate_bytes(content, op)

    # Deep in the arena, so that any relative escape would still land inside it and be seen.
    sandbox = arena / "a" / "b" / "c" / "d" / f"x{next(_counter)}"
    work = sandbox / "pb_data" / ".pb_temp_to_delete" / "restore_x"
    work.mkdir(parents=True)
    (sandbox / "pb_data" / "data.db").write_bytes(b"the current data")
    zip_path = sandbox / "backup.zip"
    zip_path.write_bytes(content)
    target = work / "data"
    before = snapshot(arena, target)
    try:
        try:
            manifest = archive.extract(zip_path, target)
        except ArchiveError as exc:
            refused: ArchiveError | None = exc
            event("refused: " + re.sub(r"'.*'", "X", str(exc))[:50])
        else:
            refused = None
            event("extracted")

        # Never a file outside the target, whatever happened.
        assert snapshot(arena, target) == before
        assert not os.path.lexists(ESCAPE_DIR)
        assert not target.is_symlink()
        got = regular_files(target) if target.exists() else {}

        try:
            archive.check_upload(zip_path)
            upload_ok = True
        except ArchiveError:
            upload_ok = False
        if refused is not None:
            if target.exists():  # left for the caller to remove, as extract's contract says
                assert target.is_dir()
                shutil.rmtree(target)
            assert snapshot(arena, target) == before
            return
        assert upload_ok, "extract accepted what the upload check refuses"

        # Extracted: exactly the original content when the manifest vouched for it; else exactly
        # what the central directory describes (names, sizes, CRCs).
        infos = [i for i in central_directory(zip_path) if not i.is_dir()]
        names = {str(PurePosixPath(i.filename)): i for i in infos}
        assert "data.db" in got
        if MANIFEST in names:
            assert manifest is not None
            assert got == FILES
        else:
            assert manifest is None
            wanted = {name: info for name, info in names.items() if not archive.is_excluded(PurePosixPath(name))}
            assert set(got) == set(wanted)
            for name, info in wanted.items():
                assert len(got[name]) == info.file_size and zlib.crc32(got[name]) == info.CRC, name
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


# --- (b) backup names ----------------------------------------------------------------------------

ALLOWED = set(string.ascii_lowercase + string.digits + "_-")


def spec_accepts(name: str) -> bool:
    """``^[a-z0-9_-]+\\.zip$`` over the whole string (no newline before the end), 1..150 long."""
    stem, dot_zip = name[:-4], name[-4:]
    return 1 <= len(name) <= 150 and dot_zip == ".zip" and len(stem) >= 1 and all(c in ALLOWED for c in stem)


NEAR = ["a", "z", "0", "9", "_", "-", ".", "A", "Z", " ", "\n", "\r", "\t", "\x00", "/", "\\", "٣", "１", "ａ", "é",
        "ß", "ı", "İ", "\u212a", "\u0660", "²", "\u200b"]
NAMES = st.one_of(
    st.text(max_size=160),
    st.builds(lambda stem, tail: stem + tail,
              st.text(alphabet=st.sampled_from(NEAR), max_size=30),
              st.sampled_from([".zip", ".ZIP", ".Zip", ".zip\n", "\n.zip", ".zip ", ".zip\x00", ".zi", "zip", "",
                               ".zip.zip", ".zıp", ".ｚip", "\u0130.zip"])),
    st.builds(lambda n, c, tail: c * n + tail, st.integers(0, 160), st.sampled_from(["a", "9", "-", "A", "é"]),
              st.sampled_from([".zip", ".zip\n", ".ZIP"])),
)


@pytest.mark.soak
@given(name=NAMES)
def test_backup_name_validation_is_exactly_the_contract(name: str) -> None:
    problem = name_errors(name)
    assert (problem is None) == spec_accepts(name), (name, problem)
    if problem is not None:
        expected = "validation_length_out_of_range" if not 1 <= len(name) <= MAX_NAME_LENGTH else "validation_match_invalid"
        assert problem["code"] == expected, (name, problem)
    else:
        assert check_key(name) == name  # a valid backup name is always a valid storage key


# --- (c) storage keys ----------------------------------------------------------------------------

KEY_CHARS = [".", "..", "/", "\\", "\x00", "\n", "\x1f", "\x7f", "a", "z", "0", "-", "_", " ", ":", "%2f", "~", "é",
             "名", "\u202e", "\u2028", "\ufeff", "\U0001f600", "\u2215", "\uff0f"]
KEYS = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(KEY_CHARS), max_size=12).map("".join),
    st.builds(lambda n, c, tail: c * n + tail, st.integers(60, 260), st.sampled_from(["a", "é", "名", "\U0001f600"]),
              st.sampled_from(["", ".zip", "/x", "é"])),
)


def local_accepts(store: LocalStorage, key: str) -> bool:
    try:
        asyncio.run(store.stat(key))
    except InvalidKey:
        return False
    return True


def s3_accepts(store: S3Storage, key: str) -> bool:
    try:
        asyncio.run(store.stat(key))
    except InvalidKey:
        return False
    return True


async def _one_chunk() -> AsyncIterator[bytes]:
    yield b"key test"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[tuple[Path, LocalStorage, S3Storage, Path]]:
    root = tmp_path_factory.mktemp("keys")
    local = LocalStorage(root / "store" / "backups", root / "store" / "temp")
    local.root.mkdir(parents=True)
    local.temp_dir.mkdir(parents=True)
    bucket = s3_server.bucket()
    s3 = S3Storage(S3Config(bucket=bucket, region="us-east-1", endpoint=s3_server.url, access_key=s3_server.ACCESS_KEY,
                            secret=s3_server.SECRET, force_path_style=True), root / "s3temp")
    yield root, local, s3, s3_server.root / bucket


@pytest.mark.soak
@SLOW_OK
@given(key=KEYS)
def test_storage_keys_agree_and_never_escape(stores: tuple[Path, LocalStorage, S3Storage, Path], key: str) -> None:
    root, local, s3, bucket_dir = stores
    accepted = local_accepts(local, key)
    assert s3_accepts(s3, key) == accepted, key
    try:
        check_key(key)
        assert accepted
    except InvalidKey:
        assert not accepted
    if not accepted:
        return

    # A flat name: it can only ever be a file directly in the store.
    assert key not in (".", "..") and not key.startswith(".")
    assert "/" not in key and "\\" not in key and "\x00" not in key
    joined = os.path.join(str(local.root), key)
    assert os.path.normpath(joined) == joined and os.path.dirname(joined) == str(local.root)
    assert PurePosixPath(key).parts == (key,)

    # And it is: written through each storage, it lands there and nowhere else.
    before = snapshot(root, root / "none")
    asyncio.run(local.write(key, _one_chunk()))
    assert os.listdir(local.root) == [key]
    assert (local.root / key).read_bytes() == b"key test"
    asyncio.run(local.delete(key))
    assert os.listdir(local.root) == [] and os.listdir(local.temp_dir) == []

    asyncio.run(s3.write(key, _one_chunk()))
    stored = [p for p in bucket_dir.rglob("*") if not p.name.startswith(".rclone_temp")]
    assert len(stored) == 1 and stored[0].parent == bucket_dir and stored[0].is_file(), stored
    assert [info.key for info in asyncio.run(s3.list())] == [key]
    asyncio.run(s3.delete(key))
    assert not [p for p in bucket_dir.rglob("*") if not p.name.startswith(".rclone_temp")]
    assert snapshot(root, root / "none") == before
