"""Restoring a damaged or hostile backup over HTTP, on a real server process: the restore is
refused in the background with a reason in /api/backups/status, the process does not restart,
the current data is untouched, nothing is written outside the data directory, the temp directory
is cleaned up, and a normal backup and restore still work afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import (
    ROOT,
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    Api,
    ServerProcess,
    auth,
    unique,
)

MANIFEST = "pb_backup_manifest.json"
BANNER = "Server started at"
DOC = b"attached document bytes\n" * 200

Entries = list[tuple[zipfile.ZipInfo, bytes]]


# --- helpers ------------------------------------------------------------------------------------


def login(server: ServerProcess) -> dict[str, str]:
    response = httpx.post(server.url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return auth(response.json()["token"])


def get_status(server: ServerProcess, headers: dict[str, str]) -> dict[str, Any] | None:
    """The backup status, or ``None`` while the server cannot answer (restarting)."""
    try:
        response = httpx.get(server.url + "/api/backups/status", headers=headers, timeout=10)
    except httpx.TransportError:
        return None
    if response.status_code == 401:
        headers.update(login(server))  # a restored database may hold other token keys
        return None
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(server: ServerProcess, op: str, key: str, timeout: float = 30) -> dict[str, Any]:
    """Poll the status until no job runs and the last one is ``op`` of ``key``; returns the status."""
    headers = login(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = get_status(server, headers)
        if status is not None and status["active"] is None:
            last = status["last"]
            if last is not None and last["op"] == op and last["key"] == key:
                return status
        time.sleep(0.05)
    raise AssertionError(f"the {op} of {key} did not finish:\n{server.output()[-3000:]}")


def create_backup(server: ServerProcess, name: str) -> Path:
    response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": name}, timeout=30)
    assert response.status_code == 204, response.text
    last = wait_job(server, "create", name)["last"]
    assert last["ok"] is True, last
    path = server.data_dir / "backups" / name
    assert path.is_file()
    return path


def start_restore(server: ServerProcess, key: str) -> None:
    response = httpx.post(f"{server.url}/api/backups/{key}/restore", headers=login(server), timeout=30)
    assert response.status_code == 204, response.text


def read_entries(path: Path) -> Entries:
    with zipfile.ZipFile(path) as zf:
        return [(zi, zf.read(zi)) for zi in zf.infolist()]


def entry(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    zi.external_attr = mode << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi


def write_entries(path: Path, entries: Entries, patch: Callable[[zipfile.ZipFile], None] | None = None) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for zi, data in entries:
            fresh = entry(zi.filename, zi.external_attr >> 16)
            zf.writestr(fresh, data)
        if patch is not None:
            patch(zf)
    os.chmod(path, 0o600)


def manifest_of(entries: Entries) -> dict[str, Any]:
    return json.loads({zi.filename: data for zi, data in entries}[MANIFEST])


def with_manifest(entries: Entries, manifest: dict[str, Any]) -> Entries:
    return [(zi, json.dumps(manifest).encode() if zi.filename == MANIFEST else data) for zi, data in entries]


def replace(entries: Entries, name: str, data: bytes) -> Entries:
    """``name`` gets new bytes, and the manifest agrees with them."""
    changed = [(zi, data if zi.filename == name else old) for zi, old in entries]
    manifest = manifest_of(changed)
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return with_manifest(changed, manifest)


# Each variant: (name in backups/, build(entries of the good backup) -> path writer, reason pattern)
def v_bad_checksum(entries: Entries, path: Path) -> None:
    manifest = manifest_of(entries)
    manifest["files"]["data.db"]["sha256"] = "0" * 64
    write_entries(path, with_manifest(entries, manifest))


def v_corrupt_db(entries: Entries, path: Path) -> None:
    size = len({zi.filename: d for zi, d in entries}["data.db"])
    write_entries(path, replace(entries, "data.db", os.urandom(size)))


def v_missing_db(entries: Entries, path: Path) -> None:
    write_entries(path, [(zi, d) for zi, d in entries if zi.filename != "data.db"])


def v_extra(name: str, mode: int = stat.S_IFREG | 0o644, data: bytes = b"evil payload\n") -> Callable[[Entries, Path], None]:
    def build(entries: Entries, path: Path) -> None:
        # The hostile entry first, so that nothing else would have stopped the restore before it.
        write_entries(path, [(entry(name, mode), data), *entries])
    return build


def v_ratio_bomb(entries: Entries, path: Path) -> None:
    def patch(zf: zipfile.ZipFile) -> None:
        zf.getinfo("storage/bomb.bin").file_size = 200 << 20
    write_entries(path, [*entries, (entry("storage/bomb.bin"), b"A" * 5000)], patch)


def v_not_a_zip(entries: Entries, path: Path) -> None:
    path.write_bytes(b"PK\x03\x04" + os.urandom(20_000))


VARIANTS: list[tuple[str, Callable[[Entries, Path], None], str]] = [
    ("bad_checksum.zip", v_bad_checksum, r"checksum"),
    ("corrupt_db.zip", v_corrupt_db, r"SQLite"),
    ("missing_db.zip", v_missing_db, r"data\.db"),
    ("dotdot_entry.zip", v_extra("../evil.txt"), r"unsafe"),
    ("storage_escape.zip", v_extra("storage/../../x"), r"unsafe"),
    ("absolute_entry.zip", v_extra("/evil.txt"), r"unsafe"),
    ("backslash_entry.zip", v_extra("..\\evil.txt"), r"unsafe"),
    ("symlink_entry.zip", v_extra("storage/evil.txt", stat.S_IFLNK | 0o777, b"../../../evil.txt"), r"link"),
    ("ratio_bomb.zip", v_ratio_bomb, r"compression ratio"),
    ("not_a_zip.zip", v_not_a_zip, r"not a readable zip"),
]


def forbidden_files(base: Path) -> list[Path]:
    """Files a hostile entry could have written: anything named evil.txt or x under ``base``, and
    evil.txt just above it or at the file system root."""
    found = [p for p in base.rglob("*") if p.name in ("evil.txt", "x")]
    found += [p for p in (base.parent / "evil.txt", base.parent / "x", Path("/evil.txt")) if p.exists()]
    return found


class World:
    """A server with a collection and records made before and after a good backup."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.headers = login(server)
        response = httpx.post(server.url + "/api/collections", headers=self.headers, timeout=30, json={
            "name": unique("notes"), "type": "base", "listRule": "", "viewRule": "",
            "fields": [{"name": "title", "type": "text"}, {"name": "doc", "type": "file", "maxSelect": 1}],
        })
        assert response.status_code == 200, response.text
        self.collection = response.json()["name"]
        self.records: dict[str, dict[str, Any]] = {}

    def add(self, title: str, with_file: bool = False) -> dict[str, Any]:
        files = [("doc", ("doc.txt", DOC, "text/plain"))] if with_file else None
        response = httpx.post(f"{self.server.url}/api/collections/{self.collection}/records", headers=self.headers,
                              data={"title": title}, files=files, timeout=30)
        assert response.status_code == 200, response.text
        record = response.json()
        self.records[record["id"]] = record
        return record

    def get(self, record_id: str) -> httpx.Response:
        return httpx.get(f"{self.server.url}/api/collections/{self.collection}/records/{record_id}",
                         headers=login(self.server), timeout=30)

    def assert_present(self, ids: list[str], context: str) -> None:
        for record_id in ids:
            response = self.get(record_id)
            assert response.status_code == 200, f"{context}: {record_id}: {response.text}"
            record = response.json()
            assert record["title"] == self.records[record_id]["title"], context
            if record["doc"]:
                file = httpx.get(f"{self.server.url}/api/files/{self.collection}/{record_id}/{record['doc']}",
                                 timeout=30)
                assert file.status_code == 200 and file.content == DOC, f"{context}: file of {record_id}"


def assert_no_path(text: str, server: ServerProcess, context: str) -> None:
    for path in ("/tmp", str(server.data_dir), str(server.data_dir.parent), str(ROOT)):
        assert path not in text, f"{context}: the error shows a filesystem path: {text}"


# --- tests --------------------------------------------------------------------------------------


def test_damaged_backups_are_refused_and_data_untouched(fresh_server: ServerProcess) -> None:
    server = fresh_server
    data_dir = server.data_dir
    assert server.process is not None
    pid = server.process.pid
    world = World(server)
    before = [world.add("before with file", with_file=True)["id"], world.add("before 1")["id"],
              world.add("before 2")["id"]]
    good = create_backup(server, "base.zip")
    after = [world.add("after with file", with_file=True)["id"], world.add("after 1")["id"]]
    good_entries = read_entries(good)
    assert {zi.filename for zi, _ in good_entries} >= {"data.db", "auxiliary.db", MANIFEST}
    assert any(zi.filename.startswith("storage/") for zi, _ in good_entries)
    banners = server.output().count(BANNER)
    assert banners == 1

    for name, build, reason in VARIANTS:
        build(good_entries, data_dir / "backups" / name)
        listed = httpx.get(server.url + "/api/backups", headers=login(server), timeout=30)
        assert name in [item["key"] for item in listed.json()], name
        db_inode = (data_dir / "data.db").stat().st_ino
        storage_inode = (data_dir / "storage").stat().st_ino

        start_restore(server, name)
        status = wait_job(server, "restore", name)
        last = status["last"]
        assert last["ok"] is False, f"{name}: {last}"
        assert isinstance(last["error"], str) and re.search(reason, last["error"], re.IGNORECASE), \
            f"{name}: the reason should match {reason!r}: {last['error']!r}"
        assert_no_path(json.dumps(status), server, name)

        # The same process, never restarted, on the same data.
        assert server.process.poll() is None and server.process.pid == pid, name
        assert server.output().count(BANNER) == banners, f"{name}: the server restarted"
        assert (data_dir / "data.db").stat().st_ino == db_inode, f"{name}: data.db was replaced"
        assert (data_dir / "storage").stat().st_ino == storage_inode, f"{name}: storage/ was replaced"
        world.assert_present(before + after, name)

        # Nothing escaped, nothing left behind.
        assert forbidden_files(data_dir.parent) == [], name
        assert os.listdir(data_dir / ".pb_temp_to_delete") == [], name
        assert not (data_dir / ".pb_restore").exists(), name
        health = httpx.get(server.url + "/api/health", headers=login(server), timeout=30).json()
        assert health["data"]["canBackup"] is True, name

    # A normal backup and restore still work, with a restart on the restored data.
    latest = create_backup(server, "latest.zip")
    assert latest.exists()
    gone = world.add("made after the latest backup")["id"]
    start_restore(server, "latest.zip")
    last = wait_job(server, "restore", "latest.zip", timeout=60)["last"]
    assert last["ok"] is True and last["error"] is None, last
    assert server.process.poll() is None and server.process.pid == pid  # re-exec'd in place
    assert server.output().count(BANNER) == banners + 1
    world.assert_present(before + after, "after the good restore")
    assert world.get(gone).status_code == 404
    assert os.listdir(data_dir / ".pb_temp_to_delete") == []
    assert not (data_dir / ".pb_restore").exists()
    assert forbidden_files(data_dir.parent) == []
    keys = [item["key"] for item in httpx.get(server.url + "/api/backups", headers=login(server), timeout=30).json()]
    assert "latest.zip" in keys and "base.zip" in keys


def test_restore_request_refused_at_once(server: ServerProcess, api: Api, su: dict[str, str],
                                         tmp_path: Path) -> None:
    missing = api.http.post("/api/backups/missing_backup.zip/restore", headers=su)
    assert missing.status_code == 400, missing.text
    assert missing.json()["message"] == "Missing or invalid backup file."

    # A link planted in the backups directory is not a backup, even if it points at a good zip.
    outside = tmp_path / "outside.zip"
    with zipfile.ZipFile(outside, "w") as zf:
        zf.writestr("data.db", b"")
    link = server.data_dir / "backups" / "planted_link.zip"
    link.symlink_to(outside)
    try:
        planted = api.http.post("/api/backups/planted_link.zip/restore", headers=su)
        assert planted.status_code == 400, planted.text
        assert "planted_link.zip" not in [item["key"] for item in api.http.get("/api/backups", headers=su).json()]
    finally:
        link.unlink()

    (server.data_dir / "backups" / ".hidden.zip").write_bytes(outside.read_bytes())
    try:
        hidden = api.http.post("/api/backups/.hidden.zip/restore", headers=su)
        assert hidden.status_code in (400, 404), hidden.text
    finally:
        (server.data_dir / "backups" / ".hidden.zip").unlink()

    anonymous = api.http.post("/api/backups/missing_backup.zip/restore")
    assert anonymous.status_code == 401
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["active"] is None
    assert_no_path(missing.text + planted.text + hidden.text, server, "request refusals")


def test_backup_name_with_trailing_newline_refused(server: ServerProcess, api: Api, su: dict[str, str]) -> None:
    """A name must match ``^[a-z0-9_-]+\\.zip$`` in full: "x.zip\\n" is not such a name (a regex "$"
    also matches before a final newline). Such a backup could not even be downloaded: its name
    goes into the Content-Disposition header."""
    name = unique("nl") + ".zip\n"
    response = api.http.post("/api/backups", headers=su, json={"name": name})
    try:
        assert response.status_code == 400, response.text
        assert response.json()["data"]["name"]["code"] == "validation_match_invalid"
    finally:
        if response.status_code == 204:  # clean up after the bug, so the module server stays usable
            wait_job(server, "create", name)
            (server.data_dir / "backups" / name).unlink(missing_ok=True)
    assert name not in [item["key"] for item in api.http.get("/api/backups", headers=su).json()]
