"""Hostile backup archives (issue 7), each through both ways in: an upload (``POST
/api/backups/upload``) and a restore of a file put straight into the storage (``pb_data/backups``
or the S3 bucket) behind the server's back.

An upload is refused with a 400 in the contract's shape and nothing is stored, or, for damage
only an extraction can see (checksums, database contents, inflated sizes), accepted and then
refused by its restore. A restore answers 204 and then fails with a reason in
``status.last.error``: same process (never re-executed), same records, same stored files, nothing
written outside the extraction directory, ``.pb_temp_to_delete`` emptied, and zip bombs stopped
before they take any real disk space (a watchdog measures the temp directory all along, and kills
the server should it grow past ``DISK_LIMIT``).

The archives are written byte by byte here (``RawEntry``, ``build_zip``), so that they can say
what ``zipfile`` would never write: lying sizes, overlapping entries, links, encryption."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from conftest import (
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    Api,
    S3Server,
    ServerProcess,
    auth,
    start_server,
    unique,
    wait_emptied,
)
from isal import isal_zlib

MANIFEST = "pb_backup_manifest.json"
BANNER = "Server started at"
DOC = b"an attached document, kept across every refusal\n" * 64
MARK = f"evil_{os.urandom(4).hex()}"  # in every hostile entry name: searched for afterwards
DISK_LIMIT = 64 << 20  # what a refused restore may take in the temp directory, at its peak
GIB = 1 << 30
ZEROS_SHA256 = "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"  # sha256 of 1 GiB of zeros
OVERLAPPED = 40  # entries sharing one 1 GiB stream: 40 GiB declared, about 1 MB of zip

# --- writing zips byte by byte ------------------------------------------------------------------

STORED, DEFLATED = 0, 8
REGULAR = (stat.S_IFREG | 0o644) << 16
UTF8 = 0x800
_MAX32 = 0xFFFFFFFF


@dataclass
class RawEntry:
    """One zip entry as it is written: ``payload`` is the bytes after the local header (already
    deflated or encrypted); every field of both headers can lie."""

    name: bytes
    payload: bytes
    method: int = DEFLATED
    crc: int = 0
    csize: int = 0
    usize: int = 0
    flags: int = UTF8
    external_attr: int = REGULAR
    local_name: bytes | None = None  # the local header's name, when it differs from the central one
    shares: int | None = None  # index of an earlier entry whose local header this one points to


def deflate(data: bytes) -> bytes:
    compressor = isal_zlib.compressobj(1, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def raw_entry(name: str | bytes, content: bytes, method: int = DEFLATED, **fields: Any) -> RawEntry:
    payload = deflate(content) if method == DEFLATED else content
    encoded = name.encode() if isinstance(name, str) else name
    entry = RawEntry(encoded, payload, method, zlib.crc32(content), len(payload), len(content))
    return replace(entry, **fields)


def build_zip(entries: list[RawEntry], comment: bytes = b"") -> bytes:
    out = io.BytesIO()
    offsets: list[int] = []
    for entry in entries:
        if entry.shares is not None:
            offsets.append(offsets[entry.shares])
            continue
        offsets.append(out.tell())
        name = entry.name if entry.local_name is None else entry.local_name
        big = entry.csize >= _MAX32 or entry.usize >= _MAX32
        extra = struct.pack("<HHQQ", 1, 16, entry.usize, entry.csize) if big else b""
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, entry.flags, entry.method, 0, 0x21,
                              entry.crc, _MAX32 if big else entry.csize, _MAX32 if big else entry.usize,
                              len(name), len(extra)) + name + extra + entry.payload)
    start = out.tell()
    for entry, offset in zip(entries, offsets):
        big = entry.csize >= _MAX32 or entry.usize >= _MAX32
        extra = struct.pack("<HHQQ", 1, 16, entry.usize, entry.csize) if big else b""
        out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45 if big else 20, entry.flags,
                              entry.method, 0, 0x21, entry.crc, _MAX32 if big else entry.csize,
                              _MAX32 if big else entry.usize, len(entry.name), len(extra), 0, 0, 0,
                              entry.external_attr, offset) + entry.name + extra)
    size = out.tell() - start
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), size, start, len(comment))
              + comment)
    return out.getvalue()


def manifest_bytes(files: dict[str, tuple[int, str]]) -> bytes:
    """A manifest in our format: name -> (size, sha256)."""
    return json.dumps({"format": 1, "createdAt": "2024-01-01 00:00:00.000Z",
                       "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in files.items()}},
                      indent=1).encode()


def describe(files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    return {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}


@cache
def gib_of_zeros() -> tuple[bytes, int]:
    """1 GiB of zeros, deflated (about 1 MB, ISA-L level 1), and the CRC-32 of the zeros."""
    block = bytes(1 << 20)
    compressor = isal_zlib.compressobj(1, zlib.DEFLATED, -15)
    parts, crc = [], 0
    for _ in range(GIB >> 20):
        parts.append(compressor.compress(block))
        crc = isal_zlib.crc32(block, crc)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def zeros_entry(name: str, declared: int = GIB, **fields: Any) -> RawEntry:
    payload, crc = gib_of_zeros()
    return RawEntry(name.encode(), payload, DEFLATED, crc, len(payload), declared, **fields)


# ZipCrypto ("traditional PKWARE encryption"), to write a really encrypted zip.
def _crc_byte(crc: int, byte: int) -> int:
    return zlib.crc32(bytes((byte,)), crc ^ _MAX32) ^ _MAX32


def zipcrypto(data: bytes, password: bytes, check: int) -> bytes:
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = _crc_byte(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & _MAX32
        keys[2] = _crc_byte(keys[2], keys[1] >> 24)

    for byte in password:
        update(byte)
    out = bytearray()
    for byte in os.urandom(11) + bytes((check,)) + data:
        temp = (keys[2] | 2) & 0xFFFF
        out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(byte)
    return bytes(out)


# --- the hostile archives -----------------------------------------------------------------------


Good = dict[str, bytes]  # the entries of a sound backup made by the server, in order, manifest included


def files_of(good: Good) -> Good:
    return {name: data for name, data in good.items() if name != MANIFEST}


def sound(good: Good, extra: dict[str, tuple[int, str]] | None = None, drop: tuple[str, ...] = (),
          files: Good | None = None) -> list[RawEntry]:
    """The good backup's entries (or ``files``), with a manifest of them plus ``extra``."""
    files = {name: data for name, data in (files or files_of(good)).items() if name not in drop}
    listed = {**describe(files), **(extra or {})}
    return [raw_entry(name, data) for name, data in files.items()] + [raw_entry(MANIFEST, manifest_bytes(listed))]


def h_extra(name: str, data: bytes = b"evil payload\n", **fields: Any) -> Callable[[Good], bytes]:
    """A hostile entry first (nothing else could have stopped the restore before it)."""
    return lambda good: build_zip([raw_entry(name, data, **fields), *sound(good)])


def h_symlink(good: Good) -> bytes:
    # A link out of the extraction directory, then a file written through it.
    link = raw_entry(f"storage/{MARK}_link", f"../../../../../../tmp/{MARK}_dir".encode(), STORED,
                     external_attr=(stat.S_IFLNK | 0o777) << 16)
    return build_zip([link, raw_entry(f"storage/{MARK}_link/{MARK}.txt", b"through the link"), *sound(good)])


def h_declares_small(good: Good) -> bytes:
    # 1 GiB of zeros that says it is 1000 bytes (in both headers and in the manifest).
    bomb = zeros_entry(f"storage/{MARK}_small.bin", declared=1000)
    return build_zip([bomb, *sound(good, {bomb.name.decode(): (1000, hashlib.sha256(bytes(1000)).hexdigest())})])


def h_huge_declared(good: Good) -> bytes:
    # A petabyte from 1 MB: an impossible ratio.
    bomb = zeros_entry(f"storage/{MARK}_huge.bin", declared=1 << 50)
    return build_zip([bomb, *sound(good, {bomb.name.decode(): (1 << 50, "0" * 64)})])


def h_huge_plausible(good: Good) -> bytes:
    # A petabyte declared with a compressed size that keeps the ratio plausible (and that the
    # archive cannot even hold).
    bomb = replace(raw_entry(f"storage/{MARK}_pb.bin", b"A" * 4000), usize=1 << 50, csize=1 << 41)
    return build_zip([bomb, *sound(good, {bomb.name.decode(): (1 << 50, "0" * 64)})])


def h_extreme_ratio(good: Good) -> bytes:
    # 1 GiB of zeros in 1 MB, every size honest, listed in the manifest with its true checksum.
    bomb = zeros_entry(f"storage/{MARK}_zeros.bin")
    return build_zip([bomb, *sound(good, {bomb.name.decode(): (GIB, ZEROS_SHA256)})])


def h_overlapping(good: Good) -> bytes:
    # Many entries whose central records all point at one local header: 40 GiB from about 1 MB
    # (each entry alone is honest, and the manifest lists them all).
    names = [f"storage/{MARK}_{index:02d}.bin" for index in range(OVERLAPPED)]
    bombs = [zeros_entry(names[0])] + [zeros_entry(name, shares=0) for name in names[1:]]
    return build_zip([*bombs, *sound(good, {name: (GIB, ZEROS_SHA256) for name in names})])


def h_truncated(good: Good) -> bytes:
    whole = build_zip(sound(good))
    return whole[: len(whole) // 2]


def h_damaged_deflate(good: Good) -> bytes:
    # data.db's first deflate block is of the reserved type 11: the stream cannot be inflated.
    entries = sound(good)
    first = entries[0]
    assert first.name == b"data.db" and first.method == DEFLATED
    entries[0] = replace(first, payload=bytes((first.payload[0] | 0x06,)) + first.payload[1:])
    return build_zip(entries)


def h_no_data_db(good: Good) -> bytes:
    return build_zip(sound(good, drop=("data.db",)))


def h_corrupt_db(good: Good) -> bytes:
    files = files_of(good)
    files["data.db"] = os.urandom(len(files["data.db"]))  # the manifest agrees with the new bytes
    return build_zip(sound(good, files=files))


def h_checksum(good: Good) -> bytes:
    files = files_of(good)
    listed = describe(files)
    name = next(n for n in files if n.startswith("storage/"))
    listed[name] = (listed[name][0], hashlib.sha256(b"other bytes").hexdigest())
    return build_zip([*(raw_entry(n, d) for n, d in files.items()), raw_entry(MANIFEST, manifest_bytes(listed))])


def h_duplicate(good: Good) -> bytes:
    # A second data.db after the first, as a zip made by appending would hold.
    return build_zip([*sound(good), raw_entry("data.db", good["data.db"][:4096])])


def h_not_a_zip(good: Good) -> bytes:
    return os.urandom(50_000)


def h_zip_magic_junk(good: Good) -> bytes:
    return b"PK\x03\x04" + os.urandom(50_000)


def h_encrypted(good: Good) -> bytes:
    entries = []
    for entry in sound(good):
        payload = zipcrypto(entry.payload, b"secret", entry.crc >> 24)
        entries.append(replace(entry, payload=payload, csize=len(payload), flags=entry.flags | 0x1))
    data = build_zip(entries)
    with zipfile.ZipFile(io.BytesIO(data)) as check:  # a real encrypted zip, readable with its password
        assert check.read("data.db", pwd=b"secret") == good["data.db"]
    return data


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Good], bytes]
    reason: str  # what the refusal must say (a regex, case-insensitive)
    at_upload: bool  # refused by the upload's structural check (else it may be accepted, and its restore refused)


UNSAFE = r"unsafe entry name"
BOMB = r"ratio|disk space|too large|too big|larger than|declares|overlap|bomb|size"
CASES = [
    Case("dotdot", h_extra(f"../{MARK}.txt"), UNSAFE, True),
    Case("dotdot_deep", h_extra(f"storage/../../../{MARK}.txt"), UNSAFE, True),
    Case("absolute", h_extra(f"/tmp/{MARK}.txt"), UNSAFE, True),
    Case("symlink", h_symlink, r"link", True),
    Case("bomb_declares_small", h_declares_small, r"larger than it declares|damaged", False),
    Case("bomb_huge_declared", h_huge_declared, r"compression ratio", True),
    Case("bomb_huge_plausible", h_huge_plausible, BOMB, False),
    Case("bomb_extreme_ratio", h_extreme_ratio, BOMB, False),
    Case("bomb_overlapping", h_overlapping, BOMB, False),
    Case("truncated", h_truncated, r"not a readable zip", True),
    Case("damaged_deflate", h_damaged_deflate, r"'data\.db' is damaged", False),
    Case("no_data_db", h_no_data_db, r"no data\.db", True),
    Case("corrupt_data_db", h_corrupt_db, r"data\.db is not a valid SQLite database|integrity", False),
    Case("checksum_mismatch", h_checksum, r"checksum of 'storage/.*' does not match", False),
    Case("duplicate_entry", h_duplicate, r"duplicate entry 'data\.db'", True),
    Case("not_a_zip", h_not_a_zip, r"not a readable zip|application/zip", True),
    Case("zip_magic_junk", h_zip_magic_junk, r"not a readable zip", True),
    Case("encrypted", h_encrypted, r"encrypted", True),
]


# --- a server with data, its storage, and what must not change -----------------------------------


def login(server: ServerProcess) -> dict[str, str]:
    response = httpx.post(server.url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return auth(response.json()["token"])


def file_tree(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, Any]:
    """Every entry under ``root``: a file as its SHA-256, a directory, a link as its target."""
    found: dict[str, Any] = {}
    if not root.exists():
        return found
    for directory, dirs, files in os.walk(root, followlinks=False):
        base = Path(directory)
        dirs[:] = [d for d in dirs if not skip(base / d)]
        for name in dirs + files:
            path = base / name
            if skip(path):
                continue
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def disk_use(root: Path) -> int:
    """Bytes of disk taken by the files under ``root`` (allocated blocks: a sparse file counts as
    what it really takes)."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskWatch(threading.Thread):
    """Samples the disk use of the server's work directories while a job runs; past ``limit`` it
    kills the server (a bomb is being extracted: the test fails, and the disk is spared)."""

    def __init__(self, server: ServerProcess, limit: int = DISK_LIMIT) -> None:
        super().__init__(daemon=True)
        self.server, self.limit = server, limit
        self.dirs = [server.data_dir / ".pb_temp_to_delete", server.data_dir / ".pb_restore"]
        self.peak = 0
        self.tripped = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            use = sum(disk_use(d) for d in self.dirs if d.exists())
            self.peak = max(self.peak, use)
            if use > self.limit and not self.tripped:
                self.tripped = True
                if self.server.process is not None:
                    self.server.process.kill()
            time.sleep(0.005)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self.join()


class Site:
    """A server with a collection, records (one with a file) and a good backup, its backups kept
    on the local disk or in an S3 bucket."""

    def __init__(self, kind: str, root: Path, s3: S3Server | None) -> None:
        self.kind = kind
        self.root = root
        self.server = start_server(root)
        self.s3 = s3
        self.bucket = ""
        if s3 is not None:
            self.bucket = s3.bucket()
            self.s3_client = s3.client()
            response = httpx.patch(self.server.url + "/api/settings", headers=login(self.server),
                                   json={"backups": {"s3": s3.settings(self.bucket)}}, timeout=30)
            assert response.status_code == 200, response.text
        self.api = Api(self.server)
        self.headers = login(self.server)
        response = self.api.http.post("/api/collections", headers=self.headers, json={
            "name": unique("hostile"), "type": "base",
            "fields": [{"name": "title", "type": "text"}, {"name": "doc", "type": "file", "maxSelect": 1}],
        })
        assert response.status_code == 200, response.text
        self.collection = response.json()["name"]
        for index in range(3):
            files = {"doc": ("doc.txt", DOC, "text/plain")} if index == 0 else None
            response = self.api.http.post(f"/api/collections/{self.collection}/records", headers=self.headers,
                                          data={"title": f"record {index}"}, files=files)
            assert response.status_code == 200, response.text
        response = self.api.http.post("/api/backups", headers=self.headers, json={"name": "good.zip"})
        assert response.status_code == 204, response.text
        assert self.wait_job("create", "good.zip")["ok"] is True
        with zipfile.ZipFile(io.BytesIO(self.fetch("good.zip"))) as good:
            self.good: Good = {info.filename: good.read(info) for info in good.infolist()}
        assert {"data.db", "auxiliary.db", MANIFEST} <= set(self.good), sorted(self.good)
        assert any(name.startswith("storage/") for name in self.good)

    # the storage, seen from outside the server
    def put(self, key: str, data: bytes) -> None:
        if self.s3 is None:
            path = self.server.data_dir / "backups" / key
            path.write_bytes(data)
            os.chmod(path, 0o600)
        else:
            self.s3_client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def fetch(self, key: str) -> bytes:
        if self.s3 is None:
            return (self.server.data_dir / "backups" / key).read_bytes()
        return self.s3_client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stored(self) -> dict[str, Any]:
        if self.s3 is None:
            return file_tree(self.server.data_dir / "backups")
        files = file_tree(self.s3.root / self.bucket)
        return {name: value for name, value in files.items() if not name.startswith(".rclone_temp_multipart_")}

    def unfinished_uploads(self) -> int:
        if self.s3 is None:
            return 0
        try:
            return len(self.s3_client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))
        except self.s3_client.exceptions.NoSuchUpload:
            return 0

    def listed(self) -> list[str]:
        response = self.api.http.get("/api/backups", headers=self.headers)
        assert response.status_code == 200, response.text
        return sorted(item["key"] for item in response.json())

    # the server
    def ensure_running(self) -> None:
        """A previous case's watchdog may have killed the server: start it again on its data."""
        if self.server.process is None or self.server.process.poll() is not None:
            self.server.process = None
            self.server.start()
        self.headers = login(self.server)

    def wait_job(self, op: str, key: str, watch: DiskWatch | None = None, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watch is not None and watch.tripped:
                raise AssertionError(f"the {op} of {key} took more than {DISK_LIMIT >> 20} MB of disk "
                                     f"({watch.peak >> 20} MB seen): the server was stopped")
            assert self.server.process is not None and self.server.process.poll() is None, \
                f"the server died:\n{self.server.output()[-3000:]}"
            try:
                response = httpx.get(self.server.url + "/api/backups/status", headers=self.headers, timeout=10)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if response.status_code == 401:  # a restored database has other token keys
                self.headers = login(self.server)
                continue
            assert response.status_code == 200, response.text
            status = response.json()
            last = status["last"]
            if status["active"] is None and last is not None and last["op"] == op and last["key"] == key:
                return last
            time.sleep(0.02)
        raise AssertionError(f"the {op} of {key} did not finish:\n{self.server.output()[-3000:]}")

    def records(self) -> dict[str, Any]:
        response = self.api.http.get(f"/api/collections/{self.collection}/records", headers=self.headers,
                                     params={"perPage": 500})
        assert response.status_code == 200, response.text
        return {item["id"]: (item["title"], item["doc"]) for item in response.json()["items"]}

    def state(self) -> dict[str, Any]:
        """Everything a refused job must leave as it was."""
        data_dir = self.server.data_dir

        def skip(path: Path) -> bool:
            relative = path.relative_to(self.root).parts
            if relative[0] != "pb_data":
                return relative[0].startswith("server-")  # the server's own log
            return len(relative) > 1 and (relative[1] in ("backups", ".pb_temp_to_delete")
                                          or relative[1].startswith(("data.db", "auxiliary.db")))

        return {"records": self.records(), "tree": file_tree(self.root, skip), "stored": self.stored(),
                "data.db": (data_dir / "data.db").stat().st_ino, "storage": (data_dir / "storage").stat().st_ino}

    def close(self) -> None:
        self.api.close()
        self.server.stop()


def escaped(site: Site) -> list[str]:
    """Files a hostile entry could have written out of the extraction directory."""
    found = [str(p) for p in site.root.parent.rglob(f"*{MARK}*")]
    found += [str(p) for p in Path("/tmp").glob(f"*{MARK}*")] + [str(p) for p in Path("/").glob(f"*{MARK}*")]
    if site.s3 is not None:
        found += [str(p) for p in site.s3.root.rglob(f"*{MARK}*")]
    return found


def assert_no_path(text: str, site: Site) -> None:
    for path in (str(site.root), str(site.server.data_dir), str(site.root.parent)):
        assert path not in text, f"an error shows a filesystem path: {text}"


def assert_restore_refused(site: Site, key: str, case: Case) -> None:
    """Restore ``key`` (in the storage already): 204, then refused with the case's reason, and
    nothing changed."""
    server = site.server
    assert server.process is not None
    pid = server.process.pid
    banners = server.output().count(BANNER)
    before = site.state()

    with DiskWatch(server) as watch:
        response = site.api.http.post(f"/api/backups/{key}/restore", headers=site.headers)
        assert response.status_code == 204, response.text
        last = site.wait_job("restore", key, watch)
    assert watch.peak <= DISK_LIMIT, f"{watch.peak >> 20} MB taken in the temp directory"
    assert last["ok"] is False, f"{case.name}: the hostile backup was restored: {last}"
    assert isinstance(last["error"], str) and re.search(case.reason, last["error"], re.IGNORECASE), \
        f"{case.name}: the reason should match {case.reason!r}: {last['error']!r}"
    assert len(last["error"]) < 300
    assert_no_path(last["error"], site)

    # The same process, never re-executed, on the same data; nothing written anywhere else.
    assert server.process.poll() is None and server.process.pid == pid
    assert server.output().count(BANNER) == banners, "the server restarted"
    assert wait_emptied(server.data_dir / ".pb_temp_to_delete") == []
    assert not (server.data_dir / ".pb_restore").exists()
    assert site.state() == before
    assert escaped(site) == []
    health = site.api.http.get("/api/health", headers=site.headers).json()
    assert health["data"]["canBackup"] is True


@pytest.fixture(scope="module", params=["local", "s3"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    made = Site(request.param, tmp_path_factory.mktemp(f"hostile_{request.param}"), s3)
    yield made
    made.close()


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_backup_in_the_storage_is_refused_by_its_restore(site: Site, case: Case) -> None:
    site.ensure_running()
    key = f"{case.name}.zip"
    site.put(key, case.build(site.good))
    assert key in site.listed()
    assert_restore_refused(site, key, case)
    assert key in site.listed()  # a refused restore deletes nothing


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_backup_upload_is_refused(site: Site, case: Case) -> None:
    """Refused at once (400, nothing stored) when its structure shows it; otherwise it may be
    stored, and then its restore is refused."""
    site.ensure_running()
    key = f"up_{case.name}.zip"
    content = case.build(site.good)
    listed, stored = site.listed(), site.stored()
    temp = site.server.data_dir / ".pb_temp_to_delete"

    with DiskWatch(site.server) as watch:
        response = site.api.http.post("/api/backups/upload", headers=site.headers,
                                      files={"file": (key, content, "application/zip")})
    assert watch.peak <= DISK_LIMIT and not watch.tripped
    assert site.wait_job("upload", key)["ok"] is (response.status_code == 204)
    if response.status_code == 204:
        assert not case.at_upload, f"{case.name}: accepted, though its structure is unsound"
        assert site.listed() == sorted([*listed, key])
        assert site.fetch(key) == content
        assert_restore_refused(site, key, case)
        assert site.api.http.delete(f"/api/backups/{key}", headers=site.headers).status_code == 204
    else:
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["status"] == 400 and body["message"] == "An error occurred while validating the submitted data."
        assert set(body["data"]) == {"file"}, body
        assert body["data"]["file"]["code"] in ("validation_invalid_backup", "validation_invalid_mime_type"), body
        message = body["data"]["file"]["message"]
        assert re.search(case.reason, message, re.IGNORECASE), f"{case.name}: {message!r} should match {case.reason!r}"
        assert_no_path(response.text, site)
    assert site.listed() == listed and site.stored() == stored
    assert site.unfinished_uploads() == 0
    assert wait_emptied(temp) == []
    assert escaped(site) == []
