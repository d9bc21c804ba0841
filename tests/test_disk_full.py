"""A full disk during a backup, an upload or a restore, on a real server process (issue 7).

Two ways of running out of space:

- a file-size limit (``RLIMIT_FSIZE`` set in the server process; Python ignores SIGXFSZ, so a
  write past the limit fails with EFBIG): the databases fit, a backup zip or an extracted file
  holding an incompressible storage file does not;
- a real small file system (ENOSPC): a tmpfs of a few MB mounted on ``pb_data`` (as root; otherwise
  inside a user and mount namespace made with ``unshare``).

In each case: the job fails with a clear reason (``/api/backups/status`` ``last.error`` for a
backup or a restore, a 4xx in the contract's error shape for an upload) that holds no filesystem
path; the server keeps serving; nothing half-written remains (nothing new listed, nothing in
``backups/`` or ``.pb_temp_to_delete/``); the current data is untouched; and once space is freed
the next backup succeeds.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (CATALOG, 
    ROOT,
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    Api,
    ServerProcess,
    auth,
    wait_healthy,
)
from test_backup_restore import add_note, make_notes, notes
from test_backups_api import listed, sqlite_bytes, wait_idle

MB = 1 << 20
TEMP = ".pb_temp_to_delete"
FSIZE_LIMIT = 2 * MB  # the server's RLIMIT_FSIZE: the databases fit under it, a 3 MB record file does not


# --- a server with a file-size limit, or inside a namespace --------------------------------------


class LimitedServer(ServerProcess):
    """A ``ServerProcess`` started with ``RLIMIT_FSIZE`` = ``fsize`` (soft; the hard limit stays
    unlimited) and/or behind a command ``prefix`` (``nsenter`` into the namespace of a small disk).

    ``data_dir`` is where the test sees the data; ``server_dir`` where the server does (they differ
    only inside a namespace)."""

    def __init__(self, data_dir: Path, server_dir: Path | None = None, log_dir: Path | None = None,
                 fsize: int | None = None, prefix: tuple[str, ...] = ()) -> None:
        super().__init__(data_dir)
        self.server_dir = server_dir or data_dir
        self.fsize = fsize
        self.prefix = prefix
        if log_dir is not None:
            self.log_path = log_dir / f"server-{self.port}.log"

    def _limit(self) -> None:  # in the child, before exec
        if self.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize, resource.RLIM_INFINITY))

    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "a") as log:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{self.port}",
                 "--dir", str(self.server_dir)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)},
                preexec_fn=self._limit,  # noqa: PLW1509 - only setrlimit, a plain system call
            )
        process = self.process
        wait_healthy(self.url, timeout, lambda: process.poll() is None, self.output)


def upsert_superuser(server_dir: Path, prefix: tuple[str, ...] = ()) -> None:
    command = [*prefix, sys.executable, "-m", "server", "superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD,
               "--dir", str(server_dir)]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"


class SmallDisk:
    """A tmpfs of ``size`` bytes on ``mountpoint``: mounted directly as root, else inside a user
    and mount namespace held by an ``unshare`` process, where the test sees it through
    ``/proc/<pid>/root`` and the server is started with ``nsenter``."""

    def __init__(self, mountpoint: Path, size: int) -> None:
        self.mountpoint = mountpoint
        self.size = size
        self.holder: subprocess.Popen[str] | None = None
        self.view = mountpoint  # the mount as the test process sees it
        self.prefix: tuple[str, ...] = ()  # how to run a command that sees it

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        options = f"size={self.size},mode=0700"
        if os.geteuid() == 0 and os.environ.get("PB_TEST_DISK_UNSHARE") != "1":
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.mountpoint)],
                           check=True, capture_output=True, timeout=30)
            return
        self.holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f'mount -t tmpfs -o {options} tmpfs "$0" && echo mounted && exec sleep 3600', str(self.mountpoint)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line.strip() == "mounted", f"unshare could not mount a tmpfs: {self.holder.stderr.read() if self.holder.stderr else ''}"
        pid = self.holder.pid
        self.view = Path(f"/proc/{pid}/root{self.mountpoint}")
        self.prefix = ("nsenter", f"--target={pid}", "--user", "--mount", "--preserve-credentials",
                       f"--wd={ROOT}")

    def unmount(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            self.holder = None
            return
        result = subprocess.run(["umount", str(self.mountpoint)], check=False, capture_output=True, timeout=30)
        if result.returncode != 0:  # still busy: detach it now, freed when the last user goes
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True, timeout=30)

    def free(self) -> int:
        return shutil.disk_usage(self.view).free


# --- helpers -------------------------------------------------------------------------------------


def login(server: ServerProcess) -> dict[str, str]:
    response = httpx.post(server.url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return auth(response.json()["token"])


def incompressible(directory: Path, count: int, size: int, prefix: str = "blob") -> list[Path]:
    """``count`` files of ``size`` random bytes (stored, not deflated, in a backup)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"{prefix}_{index}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the record files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clear(reason: Any, server: ServerProcess, *words: str) -> None:
    """A reason a user can act on: it says what ran out, and names no path."""
    assert isinstance(reason, str) and reason, reason
    lowered = reason.lower()
    assert any(word in lowered for word in words), f"unclear reason: {reason!r}"
    assert "/" not in reason and "pb_data" not in reason and str(server.data_dir) not in reason, reason
    assert "errno" not in lowered and "traceback" not in lowered, reason


def start_backup(api: Api, su: dict[str, str], name: str) -> dict[str, Any]:
    response = api.http.post("/api/backups", headers=su, json={"name": name})
    assert response.status_code == 204, response.text
    last = wait_idle(api, su, timeout=60)["last"]
    assert last is not None and last["op"] == "create" and last["key"] == name, last
    return last


def start_restore(api: Api, su: dict[str, str], key: str) -> dict[str, Any]:
    response = api.http.post(f"/api/backups/{key}/restore", headers=su)
    assert response.status_code == 204, response.text
    last = wait_idle(api, su, timeout=60)["last"]
    assert last is not None and last["op"] == "restore" and last["key"] == key, last
    return last


def upload_zip(api: Api, su: dict[str, str], name: str, content: bytes) -> httpx.Response:
    return api.http.post("/api/backups/upload", headers=su, files={"file": (name, content, "application/zip")})


def backup_zip(blob_size: int) -> bytes:
    """A valid backup (a real SQLite ``data.db`` at its root) holding an incompressible storage
    file of ``blob_size`` bytes, stored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("data.db", sqlite_bytes())
        archive.writestr("storage/c_upload/r_upload/blob.bin", os.urandom(blob_size))
    return buffer.getvalue()


def assert_upload_refused(response: httpx.Response, server: ServerProcess) -> None:
    """An upload that does not fit: a 4xx in the contract's error shape, with a clear reason."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"status", "message", "data"}, body
    assert body["status"] == response.status_code, body
    assert_clear(body["message"], server, "space", "disk")


def leftovers(server: ServerProcess) -> list[str]:
    """What a job left in the temp directory."""
    temp = server.data_dir / TEMP
    return sorted(str(p.relative_to(temp)) for p in temp.rglob("*")) if temp.exists() else []


def backup_files(server: ServerProcess) -> list[str]:
    return sorted(p.name for p in (server.data_dir / "backups").iterdir() if p.name != CATALOG)


def assert_restore_refused_for_space(api: Api, su: dict[str, str], server: ServerProcess, key: str, storage: Path,
                                     files: dict[str, str], before: dict[str, dict[str, Any]], note: str) -> None:
    """A restore of ``key`` fails for want of space, leaves nothing, changes nothing; writes go on."""
    last = start_restore(api, su, key)
    assert last["ok"] is False, last
    assert_clear(last["error"], server, "space", "disk")
    assert leftovers(server) == []
    assert backup_files(server) == [key]
    assert digests(storage) == files
    assert_still_serving(api, su, before)
    written = add_note(api, su, note, 100 + len(before))
    before[written["id"]] = written
    assert notes(api, su) == before


def assert_still_serving(api: Api, su: dict[str, str], expected: dict[str, dict[str, Any]]) -> None:
    """Health 200 with the lock free, the records readable and as they were."""
    response = api.http.get("/api/health", headers=su)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["canBackup"] is True, response.json()
    assert notes(api, su) == expected


def assert_backup_sound(path: Path, expected_files: dict[str, str]) -> None:
    """A published backup: a readable zip holding the databases and these record files."""
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        assert {"data.db", "auxiliary.db"} <= names, names
        for name, digest in expected_files.items():
            assert hashlib.sha256(archive.read(f"storage/{name}")).hexdigest() == digest, name


def pocketbase_style_zip(server: ServerProcess, target: Path) -> None:
    """A backup of the server's current data as PocketBase writes one (no manifest, storage
    stored), made by the test process: its ``data.db`` is an online copy of the live database."""
    snapshot = target.with_suffix(".db")
    source = sqlite3.connect(server.data_dir / "data.db")
    copy = sqlite3.connect(snapshot)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(snapshot, "data.db")
        storage = server.data_dir / "storage"
        for path in sorted(storage.rglob("*")):
            if path.is_file():
                archive.write(path, f"storage/{path.relative_to(storage)}")
    snapshot.unlink()
    os.chmod(target, 0o600)


# --- a file-size limit (EFBIG) -------------------------------------------------------------------


@pytest.fixture()
def limited(tmp_path: Path) -> Iterator[LimitedServer]:
    data_dir = tmp_path / "pb_data"
    upsert_superuser(data_dir)
    server = LimitedServer(data_dir, fsize=FSIZE_LIMIT)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_file_size_limit_fails_backup_upload_and_restore_cleanly(limited: LimitedServer) -> None:
    server = limited
    api = Api(server)
    try:
        su = login(server)
        collection = make_notes(api, su)
        for n in range(5):
            add_note(api, su, f"note {n}", n)
        before = notes(api, su)
        # One incompressible record file larger than the limit: the databases fit, a zip holding
        # it does not, and neither does the file itself when a restore extracts it.
        storage = server.data_dir / "storage"
        incompressible(storage / collection["id"] / "big_record", 1, 3 * MB)
        files = digests(storage)
        for db in ("data.db", "auxiliary.db"):
            assert (server.data_dir / db).stat().st_size < FSIZE_LIMIT, db  # the data itself fits
        restorable = server.data_dir / "backups" / "restorable.zip"
        pocketbase_style_zip(server, restorable)
        assert restorable.stat().st_size > 3 * MB

        # A backup: fails with a clear reason, leaves nothing behind.
        last = start_backup(api, su, "too_big.zip")
        assert last["ok"] is False, last
        assert_clear(last["error"], server, "space", "disk")
        assert set(listed(api, su)) == {"restorable.zip"}
        assert backup_files(server) == ["restorable.zip"]
        assert leftovers(server) == []
        assert_still_serving(api, su, before)

        # An upload of a valid backup larger than the limit: refused, nothing kept.
        response = upload_zip(api, su, "uploaded.zip", backup_zip(3 * MB))
        assert_upload_refused(response, server)
        assert set(listed(api, su)) == {"restorable.zip"}
        assert backup_files(server) == ["restorable.zip"]
        assert leftovers(server) == []
        assert_still_serving(api, su, before)

        # A restore whose extraction does not fit: fails before touching the current data.
        assert_restore_refused_for_space(api, su, server, "restorable.zip", storage, files, before,
                                         "written while limited")  # small writes still fit
    finally:
        api.close()

    # Space freed: the limit raised by restarting; the same backup now succeeds.
    server.stop()
    server.fsize = None
    server.start()
    api = Api(server)
    try:
        su = login(server)
        assert notes(api, su) == before
        last = start_backup(api, su, "too_big.zip")
        assert last["ok"] is True and last["error"] is None, last
        assert set(listed(api, su)) == {"restorable.zip", "too_big.zip"}
        assert leftovers(server) == []
        assert_backup_sound(server.data_dir / "backups" / "too_big.zip", files)
        # And the upload that did not fit is accepted now.
        response = upload_zip(api, su, "uploaded.zip", backup_zip(3 * MB))
        assert response.status_code == 204, response.text
        assert set(listed(api, su)) == {"restorable.zip", "too_big.zip", "uploaded.zip"}
    finally:
        api.close()


# --- a small file system (ENOSPC) ----------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[tuple[LimitedServer, SmallDisk]]:
    disk = SmallDisk(tmp_path / "pb_data", 8 * MB)
    disk.mount()
    server: LimitedServer | None = None
    try:
        upsert_superuser(disk.mountpoint, disk.prefix)
        server = LimitedServer(disk.view, server_dir=disk.mountpoint, log_dir=tmp_path, prefix=disk.prefix)
        server.start()
        yield server, disk
    finally:
        if server is not None:
            server.stop()
        disk.unmount()


def test_a_full_file_system_fails_backup_upload_and_restore_cleanly(small_disk: tuple[LimitedServer, SmallDisk]) -> None:
    server, disk = small_disk
    api = Api(server)
    try:
        su = login(server)
        collection = make_notes(api, su)
        for n in range(5):
            add_note(api, su, f"note {n}", n)
        before = notes(api, su)
        storage = server.data_dir / "storage"
        # Record files taking about two thirds of the free space: a backup of them cannot fit.
        free0 = disk.free()
        filler = incompressible(storage / collection["id"] / "filler_record", (free0 * 2 // 3) // MB, MB)
        files = digests(storage)
        free_full = disk.free()
        assert free_full < sum(p.stat().st_size for p in filler), (free0, free_full)

        # A backup: runs out of space, fails with a clear reason, and gives the space back.
        last = start_backup(api, su, "too_big.zip")
        assert last["ok"] is False, last
        assert_clear(last["error"], server, "space", "disk")
        assert listed(api, su) == {}
        assert backup_files(server) == []
        assert leftovers(server) == []
        assert disk.free() >= free_full - MB, (disk.free(), free_full)
        assert_still_serving(api, su, before)

        # An upload of a valid backup larger than the free space: refused, nothing kept.
        response = upload_zip(api, su, "uploaded.zip", backup_zip(disk.free() + MB))
        assert_upload_refused(response, server)
        assert listed(api, su) == {}
        assert backup_files(server) == []
        assert leftovers(server) == []
        assert disk.free() >= free_full - MB, (disk.free(), free_full)
        assert_still_serving(api, su, before)

        # Space freed (some record files deleted): the next backup succeeds, records are written.
        keep = max(1, int(free0 * 0.4) // MB)
        for path in filler[keep:]:
            path.unlink()
        files = digests(storage)
        written = add_note(api, su, "written once space was freed", 100)
        before[written["id"]] = written
        last = start_backup(api, su, "fits.zip")
        assert last["ok"] is True and last["error"] is None, last
        assert set(listed(api, su)) == {"fits.zip"}
        assert leftovers(server) == []
        assert_backup_sound(server.data_dir / "backups" / "fits.zip", files)

        # A restore of it cannot fit beside the current data: refused before extracting anything.
        assert disk.free() < keep * MB, (disk.free(), keep)
        assert_restore_refused_for_space(api, su, server, "fits.zip", storage, files, before,
                                         "written after the refused restore")
    finally:
        api.close()


# --- a file system with no space left at all -----------------------------------------------------


def fill_up(path: Path) -> None:
    """Write ``path`` until the file system has no space left (unbuffered: nothing is pending)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4096, 1):
            piece = os.urandom(size)
            try:
                while True:
                    os.write(fd, piece)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)


@pytest.fixture()
def full_disk(small_disk: tuple[LimitedServer, SmallDisk]) -> Iterator[tuple[LimitedServer, Api, dict[str, str], Path]]:
    """A server whose file system is full to the last byte (a ballast file the test wrote), with
    a collection of five records written before."""
    server, disk = small_disk
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su)
        for n in range(5):
            add_note(api, su, f"note {n}", n)
        ballast = server.data_dir / "storage" / "ballast.bin"
        fill_up(ballast)
        assert disk.free() < 64 << 10, disk.free()
        yield server, api, su, ballast
    finally:
        api.close()


def test_on_a_disk_with_no_space_left_backup_and_upload_fail_clearly(
        full_disk: tuple[LimitedServer, Api, dict[str, str], Path]) -> None:
    server, api, su, ballast = full_disk
    before = notes(api, su)

    last = start_backup(api, su, "no_space.zip")
    assert last["ok"] is False, last
    assert_clear(last["error"], server, "space", "disk")
    assert listed(api, su) == {}
    assert backup_files(server) == []
    assert leftovers(server) == []
    assert_still_serving(api, su, before)

    # An upload far larger than the whole disk: the answer still arrives, and is a clear refusal.
    response = upload_zip(api, su, "uploaded.zip", backup_zip(32 * MB))
    assert_upload_refused(response, server)
    assert listed(api, su) == {}
    assert backup_files(server) == []
    assert leftovers(server) == []
    assert_still_serving(api, su, before)

    ballast.unlink()
    written = add_note(api, su, "written once space was freed", 100)
    before[written["id"]] = written
    last = start_backup(api, su, "no_space.zip")
    assert last["ok"] is True and last["error"] is None, last
    assert set(listed(api, su)) == {"no_space.zip"}
    assert leftovers(server) == []
    assert_backup_sound(server.data_dir / "backups" / "no_space.zip", {})
    assert notes(api, su) == before


def test_on_a_disk_with_no_space_left_a_failed_write_does_not_break_the_connection(
        full_disk: tuple[LimitedServer, Api, dict[str, str], Path]) -> None:
    """A record write that cannot be stored gets an error answer in the contract's shape; the
    keep-alive connection it came on goes on serving the next request (a server that means to
    close it must say ``Connection: close``); once space is freed, writes succeed."""
    _, api, su, ballast = full_disk
    before = notes(api, su)
    for n in range(30):
        response = api.http.post("/api/collections/notes/records", headers=su, json={"title": "no room", "n": 1000 + n})
        assert response.status_code >= 400, response.text
        body = response.json()
        assert set(body) == {"status", "message", "data"} and body["status"] == response.status_code, body
        assert "/" not in body["message"], body
        if response.headers.get("connection", "").lower() == "close":
            continue  # announced: the client opens a new connection
        try:
            assert notes(api, su) == before  # at once, on the same connection
        except httpx.TransportError as exc:
            raise AssertionError(f"round {n}: the connection was dropped after a {response.status_code} "
                                 f"without 'Connection: close': {exc!r}") from exc
    ballast.unlink()
    written = add_note(api, su, "written once space was freed", 100)
    before[written["id"]] = written
    assert notes(api, su) == before
