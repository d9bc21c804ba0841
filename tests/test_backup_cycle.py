"""The backup cycle end to end, written once and run on both storages: the local disk
(``pb_data/backups``) and an S3-compatible bucket (a real ``rclone serve s3``).

Create, list, download (whole, ranges, HEAD), upload, restore with re-exec, delete; a job held
mid-way leaves nothing visible; a stopped server leaves nothing behind; a damaged backup is
refused with the data untouched. Plus, on S3 only: the endpoint going away in the middle of a
backup."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CATALOG, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, S3Server, ServerProcess, run_cli, wait_emptied, wait_gate_held
from test_backup_restore import (
    SAFETY_NAME,
    MANIFEST,
    HealthPoller,
    add_note,
    login,
    make_notes,
    notes,
    restore,
    wait_idle,
    wait_restored,
)

BUSY = "Try again later - another backup/restore process has already been started."


class Store:
    """Where a server keeps its backups, seen from outside the server (not through its API)."""

    kind = ""

    def configure(self, server: ServerProcess) -> None: ...

    def keys(self) -> list[str]: ...

    def fetch(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def unfinished(self) -> int:
        """How many backups are being written (S3: multipart uploads; disk: temp files)."""
        return 0


class LocalStore(Store):
    kind = "local"

    def __init__(self, server: ServerProcess) -> None:
        self.root = server.data_dir / "backups"
        self.temp = server.data_dir / ".pb_temp_to_delete"

    def unfinished(self) -> int:
        return len(list(self.temp.glob("upload_*.part")))

    def configure(self, server: ServerProcess) -> None:
        pass  # the default

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.name != CATALOG) if self.root.exists() else []

    def fetch(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        self.root.mkdir(exist_ok=True)
        (self.root / key).write_bytes(data)


class BucketStore(Store):
    kind = "s3"

    def __init__(self, s3: S3Server) -> None:
        self.s3 = s3
        self.bucket = s3.bucket()
        self.client = s3.client()

    def configure(self, server: ServerProcess) -> None:
        response = httpx.patch(server.url + "/api/settings", headers=login(server),
                               json={"backups": {"s3": self.s3.settings(self.bucket)}}, timeout=30)
        assert response.status_code == 200, response.text

    def keys(self) -> list[str]:
        # rclone's own directory, what really exists, less the parts of unfinished multipart
        # uploads (kept in .rclone_temp_multipart_*, never shown through S3)
        return [k for k in self.s3.objects(self.bucket) if not k.startswith(".rclone_temp_multipart_")]

    def fetch(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def unfinished(self) -> int:
        try:
            return len(self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))
        except self.client.exceptions.NoSuchUpload:
            return 0  # rclone's answer for a bucket that has had no multipart upload since it started


def new_server(tmp_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    return ServerProcess(data_dir, env=env)


@pytest.fixture(params=["local", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make_store(kind: str, server: ServerProcess, request: pytest.FixtureRequest) -> Store:
    if kind == "local":
        return LocalStore(server)
    return BucketStore(request.getfixturevalue("s3_server"))


@pytest.fixture()
def setup(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A started server whose backups go to the storage ``kind``, and that storage seen from outside."""
    server = new_server(tmp_path)
    server.start()
    store = make_store(kind, server, request)
    store.configure(server)
    yield server, store
    server.stop()


def create(server: ServerProcess, name: str) -> dict[str, Any]:
    response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": name}, timeout=30)
    assert response.status_code == 204, response.text
    return wait_idle(server)


def file_token(api: Api, headers: dict[str, str]) -> str:
    response = api.http.post("/api/files/token", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["token"]


# --- the whole cycle -------------------------------------------------------------------------


def test_create_list_download_upload_restore_delete(setup: Any) -> None:
    server, store = setup
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    payloads = {i: os.urandom(300_000 + i) for i in range(3)}
    records = [add_note(api, su, f"kept {i}", i, payloads[i]) for i in range(3)]
    before = notes(api, su)

    # Create: the job reports where it went; the backup is stored, listed with its real size.
    last = create(server, "snap.zip")
    assert last["ok"] is True and last["error"] is None and last["op"] == "create", last
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["storage"]["kind"] == store.kind and status["active"] is None
    assert "secret" not in status["storage"] and "accessKey" not in status["storage"]
    assert store.keys() == ["snap.zip"]
    stored = store.fetch("snap.zip")
    listed = api.http.get("/api/backups", headers=su).json()
    assert [(b["key"], b["size"]) for b in listed] == [("snap.zip", len(stored))]
    with zipfile.ZipFile(io.BytesIO(stored)) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
    assert {"data.db", "auxiliary.db", MANIFEST} <= names
    assert {f"storage/{r['collectionId']}/{r['id']}/{r['doc']}" for r in records} <= names

    # Download: whole, ranges, HEAD; a file token of a superuser is needed.
    token = file_token(api, su)
    response = api.http.get("/api/backups/snap.zip", params={"token": token})
    assert response.status_code == 200 and response.content == stored
    assert response.headers["content-disposition"] == 'attachment; filename="snap.zip"'
    assert response.headers["accept-ranges"] == "bytes"
    response = api.http.get("/api/backups/snap.zip", params={"token": token}, headers={"Range": "bytes=100-1099"})
    assert response.status_code == 206 and response.content == stored[100:1100]
    assert response.headers["content-range"] == f"bytes 100-1099/{len(stored)}"
    response = api.http.get("/api/backups/snap.zip", params={"token": token}, headers={"Range": "bytes=-22"})
    assert response.status_code == 206 and response.content == stored[-22:]
    response = api.http.get("/api/backups/snap.zip", params={"token": token},
                            headers={"Range": f"bytes={len(stored) - 5}-"})
    assert response.status_code == 206 and response.content == stored[-5:]
    response = api.http.get("/api/backups/snap.zip", params={"token": token},
                            headers={"Range": f"bytes={len(stored)}-"})
    assert response.status_code == 416
    response = api.http.head("/api/backups/snap.zip", params={"token": token})
    assert response.status_code == 200 and response.headers["content-length"] == str(len(stored))
    assert api.http.get("/api/backups/snap.zip").status_code == 403
    assert api.http.get("/api/backups/missing.zip", params={"token": token}).status_code == 404

    # Upload: what was downloaded goes back under another name, byte for byte.
    response = api.http.post("/api/backups/upload", headers=su, files={"file": ("copy.zip", stored, "application/zip")})
    assert response.status_code == 204, response.text
    assert store.keys() == ["copy.zip", "snap.zip"]
    assert store.fetch("copy.zip") == stored
    response = api.http.post("/api/backups/upload", headers=su, files={"file": ("copy.zip", stored, "application/zip")})
    assert response.status_code == 400
    assert response.json()["data"]["file"]["code"] == "validation_backup_name_exists"
    response = api.http.post("/api/backups", headers=su, json={"name": "snap.zip"})
    assert response.status_code == 400 and response.json()["data"]["name"]["code"] == "validation_backup_name_exists"

    # Change the data, then restore the uploaded copy: same process, nothing refused, data back.
    add_note(api, su, "after the backup", 50, b"later")
    assert api.http.delete(f"/api/collections/notes/records/{records[0]['id']}", headers=su).status_code == 204
    pid = server.process.pid
    poller = HealthPoller(server.url)
    poller.start()
    try:
        last = restore(server, "copy.zip")
        time.sleep(0.2)
    finally:
        poller.stop.set()
        poller.join()
    assert last["ok"] is True, last
    assert server.process.pid == pid and server.process.poll() is None
    assert poller.refused == 0 and poller.errors == [], poller.errors[:5]
    su = login(server)
    assert notes(api, su) == before
    for record in records:
        response = api.http.get(f"/api/files/notes/{record['id']}/{record['doc']}")
        assert response.status_code == 200 and response.content == payloads[record["n"]]
    # The restored settings are those of the backup: still this storage.
    assert api.http.get("/api/backups/status", headers=su).json()["storage"]["kind"] == store.kind
    assert wait_emptied(server.data_dir / ".pb_temp_to_delete") == []  # the download and the old data are gone

    # The data the restore replaced went to the same storage, as a backup of its own.
    assert last["verified"] == "sha256+quick_check"
    safety = last["safetyCopy"]["key"]
    assert last["safetyCopy"]["ok"] and SAFETY_NAME.fullmatch(safety), last
    assert store.keys() == sorted([safety, "copy.zip", "snap.zip"])

    # Delete: gone from the storage and the list; a second delete is a 404.
    assert api.http.delete("/api/backups/snap.zip", headers=su).status_code == 204
    assert api.http.delete(f"/api/backups/{safety}", headers=su).status_code == 204
    assert store.keys() == ["copy.zip"]
    assert [b["key"] for b in api.http.get("/api/backups", headers=su).json()] == ["copy.zip"]
    assert api.http.delete("/api/backups/snap.zip", headers=su).status_code == 404
    assert api.http.post("/api/backups/snap.zip/restore", headers=su).status_code == 400
    api.close()


def test_a_backup_larger_than_one_part_round_trips(setup: Any) -> None:
    """Big enough (incompressible files) that S3 gets several multipart parts in flight."""
    server, store = setup
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    docs = {i: os.urandom(7 << 20) for i in range(4)}
    for i, doc in docs.items():
        add_note(api, su, f"big {i}", i, doc)
    last = create(server, "big.zip")
    assert last["ok"], last
    stored = store.fetch("big.zip")
    assert len(stored) > 28 << 20
    token = file_token(api, su)
    with api.http.stream("GET", "/api/backups/big.zip", params={"token": token}) as response:
        assert response.status_code == 200
        assert b"".join(response.iter_bytes()) == stored
    with zipfile.ZipFile(io.BytesIO(stored)) as archive:
        assert archive.testzip() is None
        contents = sorted(archive.read(n) for n in archive.namelist() if n.startswith("storage/"))
    assert contents == sorted(docs.values())
    api.close()


# --- nothing partial is ever visible ---------------------------------------------------------


@pytest.fixture()
def gated(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A server whose backup jobs wait at each archive entry while the gate file exists."""
    gate = tmp_path / "gate"
    server = new_server(tmp_path, env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    server.start()
    store = make_store(kind, server, request)
    store.configure(server)
    yield server, store, gate
    gate.unlink(missing_ok=True)
    server.stop()


def hold_mid_backup(api: Api, su: dict[str, str], gate: Path, name: str, entries: int) -> None:
    """Start a backup and hold it at the start of archive entry ``entries + 1`` (the gate lets
    ``entries`` through): more than one S3 part is out, more is to come."""
    gate.write_text(str(entries))
    assert api.http.post("/api/backups", headers=su, json={"name": name}).status_code == 204
    wait_gate_held(gate)
    time.sleep(0.3)
    active = api.http.get("/api/backups/status", headers=su).json()["active"]
    assert active["key"] == name and 0 < active["bytesDone"] < active["bytesTotal"]


def test_a_backup_in_progress_is_invisible_and_a_stopped_server_leaves_nothing(gated: Any) -> None:
    server, store, gate = gated
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    for i in range(3):
        add_note(api, su, f"n{i}", i, os.urandom(6 << 20))

    hold_mid_backup(api, su, gate, "held.zip", 4)  # data.db, auxiliary.db and two 6 MB files
    assert store.unfinished() == 1  # being written (S3: a multipart upload with parts in it) ...
    assert store.keys() == []  # ... and not visible
    assert api.http.get("/api/backups", headers=su).json() == []
    response = api.http.post("/api/backups", headers=su, json={"name": "other.zip"})
    assert response.status_code == 400 and response.json()["message"] == BUSY

    # The server is stopped (SIGTERM) mid-backup: the job is cancelled, its output discarded.
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    time.sleep(0.5)
    gate.unlink()  # the job leaves the gate, sees the cancellation at its next chunk
    stopper.join()
    assert store.keys() == []
    assert store.unfinished() == 0  # the multipart upload was aborted
    server.start()
    su = login(server)
    assert api.http.get("/api/backups", headers=su).json() == []
    assert list((server.data_dir / ".pb_temp_to_delete").iterdir()) == []

    # And the next backup goes through.
    last = create(server, "after.zip")
    assert last["ok"], last
    assert store.keys() == ["after.zip"]
    api.close()


# --- refusals leave the data untouched -------------------------------------------------------


def test_a_damaged_backup_in_the_storage_is_refused_and_nothing_changes(setup: Any) -> None:
    server, store = setup
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "current", 1, b"current file")
    assert create(server, "good.zip")["ok"]
    good = store.fetch("good.zip")
    # Same entries, one byte of data.db changed: the manifest's checksum no longer matches.
    damaged = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "data.db":
                data = data[:5000] + bytes([data[5000] ^ 1]) + data[5001:]
            target.writestr(info.filename, data)
    store.put("damaged.zip", damaged.getvalue())
    store.put("notazip.zip", b"this is not a zip file at all" * 100)
    before = notes(api, su)
    pid = server.process.pid

    for key, reason in (("damaged.zip", "checksum"), ("notazip.zip", "zip")):
        response = api.http.post(f"/api/backups/{key}/restore", headers=su)
        assert response.status_code == 204, response.text
        last = wait_restored(server, key)
        assert last["ok"] is False and reason in last["error"], last
        assert server.process.pid == pid
        assert notes(api, login(server)) == before

    # An upload that is not a backup is refused and nothing is stored.
    response = api.http.post("/api/backups/upload", headers=su,
                             files={"file": ("junk.zip", b"PK\x03\x04 but not really", "application/zip")})
    assert response.status_code == 400
    response = api.http.post("/api/backups/upload", headers=su,
                             files={"file": ("text.zip", b"hello", "application/zip")})
    assert response.status_code == 400
    assert response.json()["data"]["file"]["code"] == "validation_invalid_mime_type"
    assert store.keys() == ["damaged.zip", "good.zip", "notazip.zip"]
    assert store.unfinished() == 0
    assert list((server.data_dir / ".pb_temp_to_delete").iterdir()) == []
    api.close()


# --- S3 only: the endpoint goes away in the middle of a backup -------------------------------


def test_s3_stopped_mid_backup_fails_cleanly_and_the_next_backup_succeeds(tmp_path: Path) -> None:
    s3 = S3Server(tmp_path / "s3root")
    s3.start()
    gate = tmp_path / "gate"
    server = new_server(tmp_path, env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    try:
        server.start()
        store = BucketStore(s3)
        store.configure(server)
        api = Api(server)
        su = login(server)
        make_notes(api, su)
        for i in range(4):
            add_note(api, su, f"n{i}", i, os.urandom(8 << 20))

        hold_mid_backup(api, su, gate, "doomed.zip", 4)  # data.db, auxiliary.db and two 8 MB files
        assert store.unfinished() == 1
        s3.stop()  # the endpoint goes away with parts uploaded and more to come
        gate.unlink()

        last = wait_idle(server)
        assert last["ok"] is False and last["key"] == "doomed.zip", last
        assert "cannot reach the S3 endpoint" in last["error"], last
        assert s3.SECRET not in last["error"]
        health = api.http.get("/api/health", headers=su).json()
        assert health["data"]["canBackup"] is True
        response = api.http.get("/api/backups", headers=su)
        assert response.status_code == 400 and "cannot reach the S3 endpoint" in response.json()["message"]

        s3.start()  # back, on the same port and directory
        assert store.keys() == []  # no object was left
        assert api.http.get("/api/backups", headers=su).json() == []
        last = create(server, "again.zip")
        assert last["ok"], last
        assert store.keys() == ["again.zip"]
        with zipfile.ZipFile(io.BytesIO(store.fetch("again.zip"))) as archive:
            assert archive.testzip() is None
        assert store.unfinished() == 0
        api.close()
    finally:
        gate.unlink(missing_ok=True)
        server.stop()
        s3.stop()
