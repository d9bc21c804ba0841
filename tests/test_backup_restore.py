"""Backup and restore end to end, on a real server process: what is restored is exactly what was
backed up, the process re-executes itself (same PID) without refusing a connection, a snapshot
taken under concurrent writes is consistent, and a restore that cannot boot is rolled back."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import sqlite3
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, auth, run_cli, wait_emptied, wait_gate_held

MANIFEST = "pb_backup_manifest.json"


# --- helpers -------------------------------------------------------------------------------


def login(server: ServerProcess) -> dict[str, str]:
    response = httpx.post(server.url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    return auth(response.json()["token"])


def wait_idle(server: ServerProcess, timeout: float = 60) -> dict[str, Any]:
    """Poll /api/backups/status until no job runs (logging in again if a restart dropped the token);
    returns ``last``."""
    deadline = time.monotonic() + timeout
    headers = login(server)
    while time.monotonic() < deadline:
        try:
            response = httpx.get(server.url + "/api/backups/status", headers=headers, timeout=10)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        if response.status_code == 401:
            headers = login(server)
            continue
        assert response.status_code == 200, response.text
        status = response.json()
        if status["active"] is None:
            return status["last"]
        time.sleep(0.05)
    raise AssertionError("the backup job did not finish")


def wait_restored(server: ServerProcess, key: str, timeout: float = 60) -> dict[str, Any]:
    """Poll until the status reports the end of the restore of ``key``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = wait_idle(server, timeout)
        if last is not None and last["op"] == "restore" and last["key"] == key:
            return last
        time.sleep(0.05)
    raise AssertionError("the restore did not finish")


def backup(server: ServerProcess, name: str) -> Path:
    response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": name}, timeout=30)
    assert response.status_code == 204, response.text
    last = wait_idle(server)
    assert last is not None and last["key"] == name and last["ok"], last
    return server.data_dir / "backups" / name


def restore(server: ServerProcess, key: str) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/api/backups/{key}/restore", headers=login(server), timeout=30)
    assert response.status_code == 204, response.text
    return wait_restored(server, key)


def make_notes(api: Api, headers: dict[str, str], name: str = "notes") -> dict[str, Any]:
    response = api.http.post("/api/collections", headers=headers, json={
        "name": name, "type": "base",
        "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"},
                   {"name": "doc", "type": "file", "maxSelect": 1, "maxSize": 50 << 20}],
    })
    assert response.status_code == 200, response.text
    return response.json()


def add_note(api: Api, headers: dict[str, str], title: str, n: int, doc: bytes | None = None,
             collection: str = "notes") -> dict[str, Any]:
    if doc is None:
        response = api.http.post(f"/api/collections/{collection}/records", headers=headers, json={"title": title, "n": n})
    else:
        response = api.http.post(f"/api/collections/{collection}/records", headers=headers,
                                 data={"title": title, "n": str(n)}, files={"doc": ("doc.bin", doc)})
    assert response.status_code == 200, response.text
    return response.json()


def notes(api: Api, headers: dict[str, str], collection: str = "notes") -> dict[str, dict[str, Any]]:
    response = api.http.get(f"/api/collections/{collection}/records", headers=headers,
                            params={"perPage": 500, "sort": "n"})
    assert response.status_code == 200, response.text
    return {item["id"]: item for item in response.json()["items"]}


SAFETY_NAME = re.compile(r"@pre_restore_[a-z0-9_]+_\d{14}(_\d+)?\.zip")


def rewrite_zip(source: Path, target: Path, change: Any, manifest_too: bool = True) -> None:
    """Copy a backup zip, letting ``change(name, data)`` return new bytes (or None to drop the
    entry), and write a manifest that matches the new content (none with ``manifest_too=False``:
    a PocketBase-style zip)."""
    files: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        manifest = json.loads(old.read(MANIFEST))
        for info in old.infolist():
            if info.filename == MANIFEST:
                continue
            data = change(info.filename, old.read(info))
            if data is None:
                continue
            new.writestr(info.filename, data)
            files[info.filename] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["files"] = files
        if manifest_too:
            new.writestr(MANIFEST, json.dumps(manifest))


class HealthPoller(threading.Thread):
    """Polls /api/health on a new connection each time, counting refused connections and errors."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.refused = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                response = httpx.get(self.url + "/api/health", timeout=30, headers={"Connection": "close"})
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.errors.append(f"status {response.status_code}")
            except httpx.ConnectError as exc:
                self.refused += 1
                self.errors.append(f"refused: {exc}")
            except httpx.TransportError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.005)


# --- restore round trip --------------------------------------------------------------------


def test_restore_brings_back_exactly_the_backed_up_data_in_the_same_process(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su)
    payloads = {i: os.urandom(20_000 + i) for i in range(3)}
    kept = [add_note(api, su, f"kept {i}", i, payloads[i]) for i in range(3)]
    changed = add_note(api, su, "before", 10)
    removed = add_note(api, su, "removed later", 11)
    assert api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "Before Restore"}}).status_code == 200
    before = notes(api, su)

    backup(fresh_server, "snap.zip")

    # Change everything after the backup: new records, an update, a delete, a new collection, settings.
    add_note(api, su, "added later", 20, os.urandom(1000))
    assert api.http.patch(f"/api/collections/notes/records/{changed['id']}", headers=su,
                          json={"title": "after"}).status_code == 200
    assert api.http.delete(f"/api/collections/notes/records/{removed['id']}", headers=su).status_code == 204
    make_notes(api, su, "later_collection")
    assert api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "After"}}).status_code == 200
    kept_dir = fresh_server.data_dir / "storage" / kept[0]["collectionId"]
    assert len(list(kept_dir.iterdir())) == 4

    pid = fresh_server.process.pid
    poller = HealthPoller(fresh_server.url)
    poller.start()
    try:
        last = restore(fresh_server, "snap.zip")
        time.sleep(0.3)  # a few more polls against the restarted process
    finally:
        poller.stop.set()
        poller.join()

    assert last["ok"] is True and last["error"] is None, last
    assert fresh_server.process.pid == pid and fresh_server.process.poll() is None
    assert poller.refused == 0, poller.errors[:5]
    assert poller.errors == [], poller.errors[:5]
    assert poller.ok > 10

    su = login(fresh_server)
    assert notes(api, su) == before
    for record in kept:
        name = record["doc"]
        response = api.http.get(f"/api/files/notes/{record['id']}/{name}")
        assert response.status_code == 200
        assert response.content == payloads[record["n"]]
    assert len(list(kept_dir.iterdir())) == 3  # the later record's directory is gone
    assert api.http.get("/api/collections/later_collection", headers=su).status_code == 404
    assert api.http.get("/api/settings", headers=su).json()["meta"]["appName"] == "Before Restore"
    # The backup itself is still there beside the safety copy of the replaced data, and nothing
    # of the swap is left behind.
    keys = [b["key"] for b in api.http.get("/api/backups", headers=su).json()]
    assert keys[1:] == ["snap.zip"] and SAFETY_NAME.fullmatch(keys[0]), keys
    assert last["safetyCopy"] == {"key": keys[0], "ok": True, "error": None}
    assert last["verified"] == "sha256+quick_check"
    assert not (fresh_server.data_dir / ".pb_restore").exists()
    assert wait_emptied(fresh_server.data_dir / ".pb_temp_to_delete") == []  # old data: deleted after
    health = api.http.get("/api/health", headers=su).json()
    assert health["data"]["canBackup"] is True
    api.close()


def test_restore_of_a_pocketbase_style_zip_without_manifest(fresh_server: ServerProcess) -> None:
    """A zip laid out as PocketBase's (data.db, auxiliary.db, storage/...), with no manifest."""
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su)
    add_note(api, su, "in the backup", 1)
    source = backup(fresh_server, "ours.zip")
    add_note(api, su, "not in the backup", 2)
    rewrite_zip(source, fresh_server.data_dir / "backups" / "pbstyle.zip", lambda name, data: data)
    with zipfile.ZipFile(fresh_server.data_dir / "backups" / "pbstyle.zip") as archive, \
            zipfile.ZipFile(fresh_server.data_dir / "backups" / "nomanifest.zip", "w") as bare:
        for info in archive.infolist():
            if info.filename != MANIFEST:
                bare.writestr(info.filename, archive.read(info))
    last = restore(fresh_server, "nomanifest.zip")
    assert last["ok"] is True, last
    titles = [r["title"] for r in notes(api, login(fresh_server)).values()]
    assert titles == ["in the backup"]
    api.close()


# --- consistency under concurrent writes ---------------------------------------------------


def test_snapshot_under_concurrent_writes_restores_a_gap_free_prefix(write_gated: tuple[ServerProcess, Path]) -> None:
    fresh_server, gate = write_gated
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su)
    # Incompressible files in storage: the job is held after two of them (the gate below).
    for i in range(12):
        add_note(api, su, f"bulk {i}", -1 - i, os.urandom(2 << 20))

    stop = threading.Event()
    written: list[int] = []
    failures: list[str] = []

    def writer() -> None:
        client = httpx.Client(base_url=fresh_server.url, timeout=30)
        n = 0
        while not stop.is_set():
            response = client.post("/api/collections/notes/records", headers=su, json={"title": "seq", "n": n})
            if response.status_code != 200:
                failures.append(response.text)
                break
            written.append(n)
            n += 1
            time.sleep(0.003)
        client.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    while len(written) < 20:
        time.sleep(0.01)
    at_start = len(written)
    gate.write_text("4")  # hold the job (after the databases and two files) while the writer goes on
    response = api.http.post("/api/backups", headers=su, json={"name": "busy.zip"})
    assert response.status_code == 204
    wait_gate_held(gate)
    held_at = len(written)
    deadline = time.monotonic() + 30
    while len(written) < held_at + 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.unlink()
    last = wait_idle(fresh_server)
    at_end = len(written)
    stop.set()
    thread.join()
    assert failures == []
    assert last["ok"], last
    assert at_end > at_start  # the writer kept going during the backup

    # What the backup holds: a prefix 0..k of the sequence, with no gap, in a sound database.
    with zipfile.ZipFile(fresh_server.data_dir / "backups" / "busy.zip") as archive:
        data = archive.read("data.db")
    copy = fresh_server.data_dir.parent / "busy-data.db"
    copy.write_bytes(data)
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        seq = [row[0] for row in conn.execute("SELECT n FROM notes WHERE title = 'seq' ORDER BY n")]
    finally:
        conn.close()
    assert seq == list(range(len(seq)))
    assert at_start <= len(seq) <= at_end

    # And the restored server holds exactly that prefix.
    assert restore(fresh_server, "busy.zip")["ok"]
    su = login(fresh_server)
    restored = sorted(r["n"] for r in notes(api, su).values() if r["title"] == "seq")
    assert restored == seq
    api.close()


# --- the lock ------------------------------------------------------------------------------


def test_create_during_restore_and_restore_during_create_are_refused(faulty_server: ServerProcess) -> None:
    gate = faulty_server.data_dir.parent / "gate"
    faulty_server.env.update(PB_FAULTS="gate:backup-write,gate:restore-extract", PB_FAULTS_GATE=str(gate))
    faulty_server.start()
    api = Api(faulty_server)
    su = login(faulty_server)
    make_notes(api, su)
    add_note(api, su, "one", 1, b"a file")
    backup(faulty_server, "base.zip")
    busy = "Try again later - another backup/restore process has already been started."

    gate.touch()  # hold the next job at its first entry
    assert api.http.post("/api/backups", headers=su, json={"name": "second.zip"}).status_code == 204
    response = api.http.post("/api/backups/base.zip/restore", headers=su)
    assert response.status_code == 400 and response.json()["message"] == busy
    response = api.http.post("/api/backups", headers=su, json={"name": "other.zip"})
    assert response.status_code == 400 and response.json()["message"] == busy
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["active"]["op"] == "create" and status["active"]["key"] == "second.zip"
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is False
    response = api.http.delete("/api/backups/second.zip", headers=su)
    assert response.status_code in (400, 404)  # being created: not deletable, not listed yet
    assert "second.zip" not in [b["key"] for b in api.http.get("/api/backups", headers=su).json()]
    gate.unlink()
    assert wait_idle(faulty_server)["ok"]

    gate.touch()
    response = api.http.post("/api/backups/base.zip/restore", headers=su)
    assert response.status_code == 204
    response = api.http.post("/api/backups", headers=su, json={"name": "third.zip"})
    assert response.status_code == 400 and response.json()["message"] == busy
    response = api.http.post("/api/backups/second.zip/restore", headers=su)
    assert response.status_code == 400 and response.json()["message"] == busy
    response = api.http.delete("/api/backups/base.zip", headers=su)
    assert response.status_code == 400  # in use by the restore
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["active"]["op"] == "restore" and status["active"]["key"] == "base.zip"
    gate.unlink()
    assert wait_restored(faulty_server, "base.zip")["ok"]
    su = login(faulty_server)
    keys = [b["key"] for b in api.http.get("/api/backups", headers=su).json()]
    assert keys[1:] == ["base.zip", "second.zip"] and SAFETY_NAME.fullmatch(keys[0]), keys  # + the safety copy
    api.close()


def test_a_failed_backup_is_reported_logged_and_releases_the_lock(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    backups_dir = fresh_server.data_dir / "backups"
    shutil.rmtree(backups_dir)
    backups_dir.write_text("not a directory")  # publishing into it fails
    try:
        assert api.http.post("/api/backups", headers=su, json={"name": "doomed.zip"}).status_code == 204
        last = wait_idle(fresh_server)
        assert last["ok"] is False and last["key"] == "doomed.zip" and last["error"]
        assert str(fresh_server.data_dir) not in last["error"]
        assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
        assert list((fresh_server.data_dir / ".pb_temp_to_delete").iterdir()) == []
    finally:
        backups_dir.unlink()
        backups_dir.mkdir()
    deadline = time.monotonic() + 10
    logged: list[sqlite3.Row] = []
    while time.monotonic() < deadline and not logged:
        logged = fresh_server.sql("SELECT message, data FROM _logs WHERE message = 'Backup create failed'",
                                  db="auxiliary.db")
        time.sleep(0.1)
    assert logged and json.loads(logged[0]["data"])["key"] == "doomed.zip"
    # The next backup works, and the failed one was never listed.
    backup(fresh_server, "fine.zip")
    assert [b["key"] for b in api.http.get("/api/backups", headers=su).json()] == ["fine.zip"]
    api.close()


def test_stopping_the_server_during_a_backup_leaves_nothing_listed(write_gated: tuple[ServerProcess, Path]) -> None:
    fresh_server, gate = write_gated
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su)
    for i in range(15):
        add_note(api, su, f"bulk {i}", i, os.urandom(2 << 20))
    gate.write_text("5")  # the databases and three files go in, then the job waits
    assert api.http.post("/api/backups", headers=su, json={"name": "cut.zip"}).status_code == 204
    wait_gate_held(gate)
    stopper = threading.Thread(target=fresh_server.stop)  # SIGTERM while the zip is being written
    stopper.start()
    time.sleep(0.5)
    gate.unlink()
    stopper.join()
    assert not (fresh_server.data_dir / "backups" / "cut.zip").exists()
    assert list((fresh_server.data_dir / ".pb_temp_to_delete").iterdir()) == []  # discarded on the way out
    fresh_server.start()
    su = login(fresh_server)
    assert api.http.get("/api/backups", headers=su).json() == []
    assert list((fresh_server.data_dir / ".pb_temp_to_delete").iterdir()) == []
    backup(fresh_server, "after.zip")
    api.close()


# --- restores that must not stick ----------------------------------------------------------


@pytest.fixture()
def faulty_server(tmp_path: Path) -> Any:
    """A server whose environment can carry PB_FAULTS; the test starts it."""
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir)
    yield server
    server.stop()


@pytest.fixture()
def write_gated(faulty_server: ServerProcess) -> tuple[ServerProcess, Path]:
    """A started server whose backups wait at each archive entry while its gate file exists."""
    gate = faulty_server.data_dir.parent / "gate"
    faulty_server.env.update(PB_FAULTS="gate:backup-write", PB_FAULTS_GATE=str(gate))
    faulty_server.start()
    return faulty_server, gate


def prepare_restore_case(server: ServerProcess) -> tuple[Api, set[str]]:
    """Data, a backup ``snap.zip`` of it, then more data; returns the ids present now."""
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "old", 1, b"old file")
    backup(server, "snap.zip")
    add_note(api, su, "newer", 2, b"newer file")
    return api, set(notes(api, su))


def test_restored_data_that_does_not_boot_is_rolled_back(faulty_server: ServerProcess) -> None:
    faulty_server.env["PB_FAULTS"] = "raise:restore-boot"
    faulty_server.start()
    api, current = prepare_restore_case(faulty_server)
    pid = faulty_server.process.pid
    last = restore(faulty_server, "snap.zip")
    assert last["ok"] is False and "did not start" in last["error"] and "previous data was kept" in last["error"]
    assert faulty_server.process.pid == pid
    assert set(notes(api, login(faulty_server))) == current
    assert not (faulty_server.data_dir / ".pb_restore").exists()
    api.close()


def test_a_backup_whose_database_cannot_be_loaded_is_rolled_back(fresh_server: ServerProcess) -> None:
    """A data.db that is sound SQLite (passes integrity_check) but not data this server can load."""
    api, current = prepare_restore_case(fresh_server)
    source = fresh_server.data_dir / "backups" / "snap.zip"
    work = fresh_server.data_dir.parent / "work.db"

    def break_settings(name: str, data: bytes) -> bytes:
        if name != "data.db":
            return data
        work.write_bytes(data)
        conn = sqlite3.connect(work)
        conn.execute("INSERT OR REPLACE INTO _params (id, value, created, updated) "
                     "VALUES ('settings', 'this is not json', '', '')")
        conn.commit()
        conn.close()
        return work.read_bytes()

    rewrite_zip(source, fresh_server.data_dir / "backups" / "broken.zip", break_settings)
    last = restore(fresh_server, "broken.zip")
    assert last["ok"] is False and "did not start" in last["error"], last
    assert set(notes(api, login(fresh_server))) == current
    api.close()


@pytest.mark.parametrize("point, expect_new", [
    ("restore-before-swap", False),
    ("restore-mid-swap", False),
    ("restore-after-swap", True),
    ("restore-before-commit", True),
])
def test_a_crash_during_the_swap_leaves_complete_old_or_complete_new_data(
        faulty_server: ServerProcess, point: str, expect_new: bool) -> None:
    faulty_server.env["PB_FAULTS"] = point
    faulty_server.start()
    api, current = prepare_restore_case(faulty_server)
    su = login(faulty_server)
    old_ids = {r["id"] for r in notes(api, su).values() if r["title"] == "old"}
    response = api.http.post("/api/backups/snap.zip/restore", headers=su)
    assert response.status_code == 204
    assert faulty_server.process.wait(timeout=60) != 0  # killed at the fault point
    faulty_server.env.pop("PB_FAULTS")
    faulty_server.start()
    su = login(faulty_server)
    ids = set(notes(api, su))
    assert ids == (old_ids if expect_new else current)
    files = {p.name for p in (faulty_server.data_dir / "storage").rglob("*") if p.is_file()}
    assert len(files) == len(ids)  # every record has its file, and no other file is left
    wait_idle(faulty_server)  # (the replaced data is being saved as a safety copy)
    assert not (faulty_server.data_dir / ".pb_restore").exists()
    last = api.http.get("/api/backups/status", headers=su).json()["last"]
    assert last is not None and last["op"] == "restore" and last["ok"] is expect_new, last
    api.close()


def test_a_swap_that_fails_before_moving_anything_keeps_the_data_and_says_so(faulty_server: ServerProcess) -> None:
    faulty_server.env["PB_FAULTS"] = "raise:restore-swap"
    faulty_server.start()
    api, current = prepare_restore_case(faulty_server)
    pid = faulty_server.process.pid
    last = restore(faulty_server, "snap.zip")
    assert last["ok"] is False and "could not be swapped" in last["error"], last
    assert faulty_server.process.pid == pid
    assert set(notes(api, login(faulty_server))) == current
    api.close()


def test_a_stray_file_where_the_restore_works_is_neither_fatal_nor_in_the_way(fresh_server: ServerProcess) -> None:
    api, _ = prepare_restore_case(fresh_server)
    stray = fresh_server.data_dir / ".pb_restore"
    stray.write_text("not a directory")
    fresh_server.restart()  # start-up looks for a restore journal there
    su = login(fresh_server)
    old_ids = {r["id"] for r in notes(api, su).values() if r["title"] == "old"}
    assert restore(fresh_server, "snap.zip")["ok"]
    assert set(notes(api, login(fresh_server))) == old_ids
    assert not stray.exists()
    api.close()


# --- the server's SQLite locks survive a backup ----------------------------------------------


def test_after_a_backup_another_process_cannot_take_the_wal_from_under_the_server(fresh_server: ServerProcess) -> None:
    """The backup reads the live database files. Reading them through a plain open()/close() in
    the server's process would drop SQLite's POSIX locks on them (POSIX releases a process's locks
    on a file when any of its descriptors of that file is closed). Another process that then
    closes its own connection would think it was the last one, checkpoint and delete the WAL under
    the server: "disk I/O error" at best, lost writes at worst."""
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su)
    add_note(api, su, "before", 1)
    backup(fresh_server, "first.zip")
    backup(fresh_server, "second.zip")
    for db in ("data.db", "auxiliary.db"):
        wal = fresh_server.data_dir / f"{db}-wal"
        assert wal.exists()
        other = sqlite3.connect(fresh_server.data_dir / db)  # another process: the CLI, a sqlite3 shell
        other.execute("SELECT count(*) FROM sqlite_master").fetchone()
        other.close()
        assert wal.exists(), f"{db}-wal was deleted under the running server"
    for n in range(2, 12):
        add_note(api, su, f"after {n}", n)
    backup(fresh_server, "third.zip")
    assert len(notes(api, su)) == 11
    assert wait_idle(fresh_server)["ok"]
    api.close()
