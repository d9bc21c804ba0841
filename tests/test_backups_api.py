"""The backup routes (``/api/backups...``) over HTTP, against a real server process.

What PocketBase 0.40.6 answered to the same requests is in
docs/reference/pocketbase-0.40.6-observations.md ("### Backups"); where we differ on purpose, the
contract (CONTRACT.md, "Backups") says so and the test says "ours".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import sqlite3
import stat
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, auth, run_cli, unique
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

MANIFEST = "pb_backup_manifest.json"
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}Z$")
BUSY = "Try again later - another backup/restore process has already been started."
FORBIDDEN_DOWNLOAD = "Insufficient permissions to access the resource."
NOT_SUPERUSER = "The authorized record is not allowed to perform this action."
NO_AUTH = "The request requires valid record authorization token."
VALIDATION = "An error occurred while validating the submitted data."
FILE_SALT = "pb-file-token"
ATTACHMENT = b"attachment bytes of a record, " * 40


# --- helpers ---------------------------------------------------------------------------------


def wait_idle(api: Api, su: dict[str, str], timeout: float = 30) -> dict[str, Any]:
    """Poll ``GET /api/backups/status`` until no job runs; returns the last status seen."""
    deadline = time.monotonic() + timeout
    while True:
        response = api.http.get("/api/backups/status", headers=su)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["active"] is None:
            return body
        assert time.monotonic() < deadline, f"the backup job did not end: {body}"
        time.sleep(0.02)


def create_backup(api: Api, su: dict[str, str], name: str | None = None) -> str:
    """Start a backup, wait for it, check it succeeded; returns its key."""
    response = api.http.post("/api/backups", headers=su, json={"name": name} if name else {})
    assert response.status_code == 204, response.text
    last = wait_idle(api, su)["last"]
    assert last is not None and last["op"] == "create" and last["ok"] is True, last
    if name:
        assert last["key"] == name
    return last["key"]


def listed(api: Api, su: dict[str, str]) -> dict[str, dict[str, Any]]:
    response = api.http.get("/api/backups", headers=su)
    assert response.status_code == 200, response.text
    return {item["key"]: item for item in response.json()}


def file_token(api: Api, token: str) -> str:
    response = api.http.post("/api/files/token", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()["token"]


def upload(api: Api, headers: dict[str, str], filename: str, content: bytes,
           mime: str = "application/zip") -> httpx.Response:
    return api.http.post("/api/backups/upload", headers=headers, files={"file": (filename, content, mime)})


def assert_error(response: httpx.Response, status: int, message: str | None = None,
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert "pb_data" not in response.text, response.text  # no filesystem path in an error
    body = response.json()
    assert body["status"] == status
    if message is not None:
        assert body["message"] == message, body
    if data is not None:
        assert body["data"] == data, body
    return body


def field_code(response: httpx.Response, field: str) -> str:
    body = assert_error(response, 400, VALIDATION)
    assert set(body["data"]) == {field}, body
    return body["data"][field]["code"]


def temp_entries(server: ServerProcess) -> set[str]:
    temp = server.data_dir / ".pb_temp_to_delete"
    return {str(path.relative_to(temp)) for path in temp.rglob("*")}


def raw_request(server: ServerProcess, method: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request with the target sent byte for byte (no client-side URL normalisation)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    return int(response.split(b" ", 2)[1]), response


def fill_storage(server: ServerProcess, megabytes: int) -> None:
    """Incompressible filler in pb_data/storage (about `megabytes` MB)."""
    directory = server.data_dir / "storage" / "filler_collection" / "filler_record"
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(0, megabytes, 8):
        (directory / f"filler_{index}.bin").write_bytes(os.urandom(min(8, megabytes - index) << 20))


def minimal_backup_zip(extra: dict[str, bytes] | None = None, data_db: bool = True) -> bytes:
    """A small zip with the structure of a backup: a real (empty) SQLite ``data.db`` at its root."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        if data_db:
            archive.writestr("data.db", sqlite_bytes())
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return buffer.getvalue()


def sqlite_bytes() -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    data = conn.serialize()
    conn.close()
    return bytes(data)


@pytest.fixture()
def fresh_api(fresh_server: ServerProcess) -> Iterator[tuple[Api, dict[str, str]]]:
    client = Api(fresh_server)
    yield client, auth(client.superuser_token())
    client.close()


# --- the shared server's setup ---------------------------------------------------------------


@dataclass
class Setup:
    user: dict[str, Any]
    user_token: str
    collection: dict[str, Any]
    record: dict[str, Any]
    first_key: str  # a backup made before the record existed
    key: str  # a backup holding the record and its file
    size: int


@pytest.fixture(scope="module")
def setup(api: Api, su: dict[str, str], server: ServerProcess) -> Setup:
    user, user_token = api.create_user(unique("backupuser") + "@example.com")
    response = api.http.post("/api/collections", headers=su, json={
        "name": unique("docs"), "type": "base",
        "fields": [{"name": "title", "type": "text"}, {"name": "attachment", "type": "file", "maxSelect": 1}],
    })
    assert response.status_code == 200, response.text
    collection = response.json()
    first_key = create_backup(api, su, "first_backup.zip")  # so that backups/ is not empty below
    response = api.http.post(f"/api/collections/{collection['name']}/records", headers=su,
                             data={"title": "kept in the backup"},
                             files={"attachment": ("notes.txt", ATTACHMENT, "text/plain")})
    assert response.status_code == 200, response.text
    record = response.json()
    # Something in the temp dir, which must not go into the backup.
    junk = server.data_dir / ".pb_temp_to_delete" / "junk_in_temp.txt"
    junk.write_text("temporary")
    try:
        key = create_backup(api, su, "main_backup.zip")
    finally:
        junk.unlink()
    size = (server.data_dir / "backups" / key).stat().st_size
    return Setup(user, user_token, collection, record, first_key, key, size)


@pytest.fixture(scope="module")
def su_file_token(api: Api, su: dict[str, str]) -> str:
    return file_token(api, su["Authorization"])


# --- list ------------------------------------------------------------------------------------


def test_list_needs_a_superuser(api: Api, setup: Setup) -> None:
    assert_error(api.http.get("/api/backups"), 401, NO_AUTH, {})
    assert_error(api.http.get("/api/backups", headers=auth("garbage")), 401, NO_AUTH, {})
    assert_error(api.http.get("/api/backups", headers=auth(setup.user_token)), 403, NOT_SUPERUSER, {})


def test_list_items_sorted_by_key(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup) -> None:
    # created in an order that is not the key order
    keys = [create_backup(api, su, name) for name in ("zz_sort_check.zip", "aa_sort_check.zip", "mm_sort_check.zip")]
    response = api.http.get("/api/backups", headers=su)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    items = response.json()
    assert isinstance(items, list)
    assert [item["key"] for item in items] == sorted(item["key"] for item in items)
    by_key = {item["key"]: item for item in items}
    assert set(keys) | {setup.first_key, setup.key} <= set(by_key)
    for item in items:
        assert set(item) == {"key", "size", "modified", "pinned"}, item  # ours: pinned (issue 15)
        assert DATETIME_RE.match(item["modified"]), item
        on_disk = (server.data_dir / "backups" / item["key"]).stat()
        assert item["size"] == on_disk.st_size
        modified = datetime.strptime(item["modified"], "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(modified.timestamp() - on_disk.st_mtime) < 0.002, (item, on_disk.st_mtime)
    for key in keys:
        assert api.http.delete(f"/api/backups/{key}", headers=su).status_code == 204


def test_list_hides_dot_files_directories_and_links(api: Api, su: dict[str, str], server: ServerProcess,
                                                      setup: Setup) -> None:
    backups = server.data_dir / "backups"
    hidden = backups / ".hidden_partial.zip"
    directory = backups / "a_directory.zip"
    link = backups / "a_link.zip"
    hidden.write_bytes(minimal_backup_zip())
    directory.mkdir()
    link.symlink_to(server.data_dir / "data.db")
    try:
        keys = set(listed(api, su))
        assert {setup.key, setup.first_key} <= keys
        assert not {".hidden_partial.zip", "a_directory.zip", "a_link.zip"} & keys
    finally:
        hidden.unlink()
        directory.rmdir()
        link.unlink()


# --- create ----------------------------------------------------------------------------------


def test_create_needs_a_superuser(api: Api, su: dict[str, str], setup: Setup) -> None:
    before = set(listed(api, su))
    assert_error(api.http.post("/api/backups", json={"name": "guest_try.zip"}), 401, NO_AUTH, {})
    assert_error(api.http.post("/api/backups", headers=auth(setup.user_token), json={"name": "user_try.zip"}),
                 403, NOT_SUPERUSER, {})
    assert wait_idle(api, su)["active"] is None
    assert set(listed(api, su)) == before


@pytest.mark.parametrize("name, code", [
    ("Bad Name.zip", "validation_match_invalid"),
    ("noext", "validation_match_invalid"),
    ("UPPER.zip", "validation_match_invalid"),
    ("dots.in.name.zip", "validation_match_invalid"),
    ("../escape.zip", "validation_match_invalid"),
    (".zip", "validation_match_invalid"),
    ("a" * 147 + ".zip", "validation_length_out_of_range"),  # 151 characters
])
def test_create_name_validation(api: Api, su: dict[str, str], server: ServerProcess, name: str, code: str) -> None:
    before = set(listed(api, su))
    response = api.http.post("/api/backups", headers=su, json={"name": name})
    assert field_code(response, "name") == code
    if code == "validation_match_invalid":
        assert response.json()["data"]["name"]["message"] == "Must be in a valid format."
    # nothing was started, nothing was written
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["active"] is None
    assert set(listed(api, su)) == before
    assert not (server.data_dir / "escape.zip").exists()


def test_create_name_of_150_characters_is_accepted(api: Api, su: dict[str, str]) -> None:
    name = "b" * 146 + ".zip"
    assert len(name) == 150
    assert create_backup(api, su, name) == name
    assert name in listed(api, su)
    assert api.http.delete(f"/api/backups/{name}", headers=su).status_code == 204


def test_create_existing_name(api: Api, su: dict[str, str], setup: Setup) -> None:
    size_before = listed(api, su)[setup.key]["size"]
    response = api.http.post("/api/backups", headers=su, json={"name": setup.key})
    assert field_code(response, "name") == "validation_backup_name_exists"
    assert response.json()["data"]["name"]["message"] == "The backup file name is invalid or already exists."
    assert wait_idle(api, su)["active"] is None
    assert listed(api, su)[setup.key]["size"] == size_before


@pytest.mark.parametrize("body", [{"name": 123}, {"name": ["x.zip"]}, {"name": {"a": 1}}, {"name": True}])
def test_create_name_not_a_string(api: Api, su: dict[str, str], body: dict[str, Any]) -> None:
    before = set(listed(api, su))
    response = api.http.post("/api/backups", headers=su, json=body)
    assert_error(response, 400)
    assert wait_idle(api, su)["active"] is None
    assert set(listed(api, su)) == before


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'"x.zip"'])
def test_create_body_not_a_json_object(api: Api, su: dict[str, str], content: bytes) -> None:
    before = set(listed(api, su))
    response = api.http.post("/api/backups", headers={**su, "content-type": "application/json"}, content=content)
    assert_error(response, 400, data={})
    assert set(listed(api, su)) == before


def test_create_auto_name_and_status(fresh_server: ServerProcess, fresh_api: tuple[Api, dict[str, str]]) -> None:
    api, su = fresh_api
    response = api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "Test App"}})
    assert response.status_code == 200, response.text
    assert wait_idle(api, su)["last"] is None  # nothing ran yet on a fresh server

    pattern = re.compile(r"^pb_backup_test_app_(\d{14})\.zip$")
    seen = []
    for kwargs in ({}, {"json": {}}, {"json": {"name": ""}}):  # no body, an empty object, an empty name
        started = datetime.now(UTC).replace(microsecond=0)
        response = api.http.post("/api/backups", headers=su, **kwargs)
        assert response.status_code == 204, (kwargs, response.text)
        assert response.content == b""
        status = wait_idle(api, su)
        ended = datetime.now(UTC)
        last = status["last"]
        assert set(last) == {"op", "key", "ok", "error", "startedAt", "finishedAt"}, last
        assert last["op"] == "create" and last["ok"] is True and last["error"] is None, last
        match = pattern.match(last["key"])
        assert match, last["key"]
        stamp = datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        assert started - timedelta(seconds=1) <= stamp <= ended, (stamp, started, ended)
        assert DATETIME_RE.match(last["startedAt"]) and DATETIME_RE.match(last["finishedAt"]), last
        assert last["startedAt"] <= last["finishedAt"]
        assert status["storage"]["kind"] == "local" and status["storage"]["writable"] is True
        assert last["key"] in listed(api, su)
        assert (fresh_server.data_dir / "backups" / last["key"]).is_file()
        seen.append(last["key"])
        # the names have a 1-second resolution: delete it so the next auto name is free
        assert api.http.delete(f"/api/backups/{last['key']}", headers=su).status_code == 204
    assert len(seen) == 3

    # a long app name: its slug is cut to 50 characters
    response = api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "My Super-Long Application Name " * 3}})
    assert response.status_code == 200, response.text
    key = create_backup(api, su)
    match = re.match(r"^pb_backup_([a-z0-9_]+)_\d{14}\.zip$", key)
    assert match and match.group(1).startswith("my_super_long_application_name_"), key
    assert len(match.group(1)) <= 50, key


def test_failed_create_is_reported_and_not_listed(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """The temp dir replaced by a file: the job fails in the background; the reason is in the
    status (without a path), nothing is listed, and the lock is free again."""
    before = set(listed(api, su))
    temp = server.data_dir / ".pb_temp_to_delete"
    aside = server.data_dir / "temp_aside"
    temp.rename(aside)
    try:
        temp.write_text("not a directory")
        response = api.http.post("/api/backups", headers=su, json={"name": "doomed.zip"})
        assert response.status_code == 204, response.text
        last = wait_idle(api, su)["last"]
    finally:
        temp.unlink()
        aside.rename(temp)
    assert last["op"] == "create" and last["key"] == "doomed.zip" and last["ok"] is False, last
    assert isinstance(last["error"], str) and last["error"], last
    assert str(server.data_dir) not in last["error"] and "/" not in last["error"], last
    assert DATETIME_RE.match(last["finishedAt"]), last
    assert set(listed(api, su)) == before
    assert not (server.data_dir / "backups" / "doomed.zip").exists()
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
    assert create_backup(api, su, "doomed.zip") == "doomed.zip"
    assert api.http.delete("/api/backups/doomed.zip", headers=su).status_code == 204


@pytest.fixture()
def gated_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose backup jobs wait at each archive entry while the gate file exists."""
    gate = tmp_path / "gate"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=tmp_path / "pb_data")
    server = ServerProcess(tmp_path / "pb_data", env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    server.start()
    yield server, gate
    gate.unlink(missing_ok=True)
    server.stop()


def test_concurrent_creates_single_flight(gated_server: tuple[ServerProcess, Path]) -> None:
    fresh_server, gate = gated_server
    api = Api(fresh_server)
    su = auth(api.superuser_token())
    fill_storage(fresh_server, 64)
    gate.touch()  # the winner's job waits at its first entry until the checks below are done
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
    names = [f"race_{index:02d}.zip" for index in range(20)]
    barrier = threading.Barrier(len(names))

    def post(name: str) -> tuple[str, httpx.Response]:
        with httpx.Client(base_url=fresh_server.url, timeout=30) as client:
            client.get("/api/health")  # connect first, so that the posts leave together
            barrier.wait()
            return name, client.post("/api/backups", headers=su, json={"name": name})

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(post, names))

    winners = [name for name, response in results if response.status_code == 204]
    assert len(winners) == 1, [(name, response.status_code, response.text) for name, response in results]
    winner = winners[0]
    for name, response in results:
        if name != winner:
            assert_error(response, 400, BUSY, {})

    # The job is still running: the lock is visible everywhere, and other jobs are refused.
    health = api.http.get("/api/health", headers=su).json()
    assert health["data"]["canBackup"] is False, health
    active = api.http.get("/api/backups/status", headers=su).json()["active"]
    assert active is not None
    assert active["op"] == "create" and active["key"] == winner, active
    # bytesTotal is 0 ("not known yet") until the job has listed what it will archive.
    deadline = time.monotonic() + 10
    while active is not None and active["bytesTotal"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
        active = api.http.get("/api/backups/status", headers=su).json()["active"]
    assert active is not None
    assert DATETIME_RE.match(active["startedAt"]) and active["bytesTotal"] > 64 << 20, active
    assert 0 <= active["bytesDone"] <= active["bytesTotal"]
    assert winner not in listed(api, su)  # not published before it is complete
    assert_error(api.http.post("/api/backups", headers=su, json={}), 400, BUSY, {})
    assert_error(upload(api, su, "upload_while_busy.zip", minimal_backup_zip()), 400, BUSY, {})
    assert_error(api.http.post(f"/api/backups/{winner}/restore", headers=su), 400, BUSY, {})
    response = api.http.delete(f"/api/backups/{winner}", headers=su)
    assert_error(response, 400)  # that backup is being created
    assert api.http.get("/api/backups/status", headers=su).json()["active"] is not None

    gate.unlink()
    status = wait_idle(api, su)
    assert status["last"]["key"] == winner and status["last"]["ok"] is True, status
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
    keys = set(listed(api, su))
    assert winner in keys
    assert not (set(names) - {winner}) & keys
    assert "upload_while_busy.zip" not in keys
    # and the lock is free again
    assert create_backup(api, su, "after_the_race.zip") == "after_the_race.zip"


# --- the archive -----------------------------------------------------------------------------


def test_backup_zip_content(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup,
                            su_file_token: str, tmp_path: Path) -> None:
    response = api.http.get(f"/api/backups/{setup.key}", params={"token": su_file_token})
    assert response.status_code == 200
    content = response.content
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert len(names) == len(set(names))
        assert {"data.db", "auxiliary.db", MANIFEST} <= set(names)
        stored = f"storage/{setup.collection['id']}/{setup.record['id']}/{setup.record['attachment']}"
        assert stored in names, names
        assert archive.read(stored) == ATTACHMENT
        for name in names:
            assert not name.startswith(("backups/", ".pb_temp_to_delete/", "/")), name
            assert not name.endswith(("-wal", "-shm", "-journal")), name
            assert ".." not in name.split("/"), name
        assert not any("junk_in_temp" in name for name in names)

        manifest = json.loads(archive.read(MANIFEST))
        assert manifest["format"] == 1
        assert set(manifest["files"]) == set(names) - {MANIFEST}
        for name, entry in manifest["files"].items():
            data = archive.read(name)
            assert entry["size"] == len(data), name
            assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name

        (tmp_path / "data.db").write_bytes(archive.read("data.db"))
        (tmp_path / "auxiliary.db").write_bytes(archive.read("auxiliary.db"))

    conn = sqlite3.connect(tmp_path / "data.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(f'SELECT id, title, attachment FROM "{setup.collection["name"]}"').fetchall()
        assert (setup.record["id"], "kept in the backup", setup.record["attachment"]) in rows
        superusers = conn.execute('SELECT email FROM "_superusers"').fetchall()
        assert ("admin@example.com",) in superusers
    finally:
        conn.close()
    conn = sqlite3.connect(tmp_path / "auxiliary.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()

    # the first backup was made before the record: it does not hold it
    first = api.http.get(f"/api/backups/{setup.first_key}", params={"token": su_file_token})
    with zipfile.ZipFile(io.BytesIO(first.content)) as archive:
        assert not any(setup.record["id"] in name for name in archive.namelist())


def test_backup_files_are_private(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup) -> None:
    response = upload(api, su, "private_check.zip", minimal_backup_zip())
    assert response.status_code == 204, response.text
    backups = server.data_dir / "backups"
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    keys = set(listed(api, su))  # what the server wrote (the tests' own trap files are not listed)
    assert {setup.key, setup.first_key, "private_check.zip"} <= keys
    for key in keys:
        assert stat.S_IMODE((backups / key).stat().st_mode) == 0o600, key
    assert api.http.delete("/api/backups/private_check.zip", headers=su).status_code == 204


# --- upload ----------------------------------------------------------------------------------


def test_upload_a_real_backup(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup,
                              su_file_token: str) -> None:
    content = api.http.get(f"/api/backups/{setup.key}", params={"token": su_file_token}).content
    assert len(content) == setup.size
    response = upload(api, su, "uploaded_copy.zip", content)
    assert response.status_code == 204, response.text
    assert response.content == b""
    items = listed(api, su)
    assert items["uploaded_copy.zip"]["size"] == setup.size
    assert (server.data_dir / "backups" / "uploaded_copy.zip").read_bytes() == content
    last = wait_idle(api, su)["last"]
    assert last["op"] == "upload" and last["key"] == "uploaded_copy.zip" and last["ok"] is True, last

    # the same name again
    response = upload(api, su, "uploaded_copy.zip", content)
    body = assert_error(response, 400, VALIDATION)
    assert body["data"] == {"file": {"code": "validation_backup_name_exists",
                                     "message": "Backup file with the specified name already exists."}}
    # a name taken by a created backup
    assert field_code(upload(api, su, setup.key, content), "file") == "validation_backup_name_exists"
    assert (server.data_dir / "backups" / "uploaded_copy.zip").read_bytes() == content
    assert api.http.delete("/api/backups/uploaded_copy.zip", headers=su).status_code == 204


def test_upload_needs_a_superuser(api: Api, su: dict[str, str], setup: Setup) -> None:
    before = set(listed(api, su))
    assert_error(upload(api, {}, "guest_upload.zip", minimal_backup_zip()), 401, NO_AUTH, {})
    assert_error(upload(api, auth(setup.user_token), "user_upload.zip", minimal_backup_zip()), 403, NOT_SUPERUSER, {})
    assert set(listed(api, su)) == before


def test_upload_refusals_leave_nothing(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup) -> None:
    real = (server.data_dir / "backups" / setup.key).read_bytes()
    before = set(listed(api, su))
    temp_before = temp_entries(server)

    # no file part: only an unrelated one
    response = api.http.post("/api/backups/upload", headers=su, files={"other": ("a.txt", b"hello", "text/plain")})
    body = assert_error(response, 400, VALIDATION)
    assert body["data"] == {"file": {"code": "validation_required", "message": "Cannot be blank."}}
    # a "file" field that is not a file (no filename)
    response = api.http.post("/api/backups/upload", headers=su, data={"file": "not a file"})
    assert field_code(response, "file") == "validation_required"
    # no body at all
    response = api.http.post("/api/backups/upload", headers=su)
    assert field_code(response, "file") == "validation_required"
    # a text file named .zip
    response = upload(api, su, "x.zip", b"this is not a zip\n")
    assert field_code(response, "file") == "validation_invalid_mime_type"
    message = response.json()["data"]["file"]["message"]
    assert "application/zip" in message and str(server.data_dir) not in message
    last = wait_idle(api, su)["last"]
    assert last["op"] == "upload" and last["key"] == "x.zip" and last["ok"] is False and last["error"], last
    assert str(server.data_dir) not in last["error"]
    # an invalid name (ours: PocketBase accepts it)
    response = upload(api, su, "Bad Name.zip", real)
    assert field_code(response, "file") == "validation_match_invalid"
    response = upload(api, su, "c" * 147 + ".zip", real)
    assert field_code(response, "file") == "validation_length_out_of_range"
    # a valid zip that is not a backup (no data.db)
    response = upload(api, su, "not_a_backup.zip", minimal_backup_zip({"a.txt": b"hello"}, data_db=False))
    assert field_code(response, "file") == "validation_invalid_backup"
    # data.db only in a sub-folder is not at the root
    response = upload(api, su, "nested_db.zip", minimal_backup_zip({"sub/data.db": sqlite_bytes()}, data_db=False))
    assert field_code(response, "file") == "validation_invalid_backup"
    # a truncated backup
    response = upload(api, su, "truncated.zip", real[: len(real) // 2])
    assert field_code(response, "file") == "validation_invalid_backup"
    # an empty file
    response = upload(api, su, "empty.zip", b"")
    assert_error(response, 400)
    # a zip whose entry escapes the directory
    response = upload(api, su, "escaping.zip", minimal_backup_zip({"../outside.txt": b"x"}))
    assert field_code(response, "file") == "validation_invalid_backup"
    # a zip with a symbolic link entry
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.db", sqlite_bytes())
        link = zipfile.ZipInfo("storage/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    response = upload(api, su, "with_link.zip", buffer.getvalue())
    assert field_code(response, "file") == "validation_invalid_backup"
    # a manifest that is not JSON
    response = upload(api, su, "bad_manifest.zip", minimal_backup_zip({MANIFEST: b"{not json"}))
    assert field_code(response, "file") == "validation_invalid_backup"

    assert wait_idle(api, su)["active"] is None
    assert set(listed(api, su)) == before
    assert temp_entries(server) == temp_before
    assert not (server.data_dir / "outside.txt").exists()


def test_upload_file_name_with_a_path(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """A client may send a full path as the file name: only the last part is the key."""
    temp_before = temp_entries(server)
    for sent in ("C:\\Users\\me\\path_win.zip", "../../path_up.zip", "/abs/path_abs.zip"):
        response = upload(api, su, sent, minimal_backup_zip())
        assert response.status_code == 204, (sent, response.text)
    keys = set(listed(api, su))
    for leaf in ("path_win.zip", "path_up.zip", "path_abs.zip"):
        assert leaf in keys
        assert (server.data_dir / "backups" / leaf).is_file()
        assert not (server.data_dir / leaf).exists()
        assert not (server.data_dir.parent / leaf).exists()
        assert api.http.delete(f"/api/backups/{leaf}", headers=su).status_code == 204
    assert temp_entries(server) == temp_before


def test_upload_larger_than_the_body_limit(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """40 MB, over the 32 MB default body limit: accepted, streamed to disk (not held in memory)."""
    big = os.urandom(40 << 20)
    content = minimal_backup_zip({"storage/big/record/blob.bin": big})
    assert len(content) > 40 << 20
    pid = server.process.pid if server.process else None
    assert pid is not None
    peak_before = _peak_rss(pid)
    response = upload(api, su, "big_upload.zip", content)
    assert response.status_code == 204, response.text
    peak_after = _peak_rss(pid)
    assert peak_after - peak_before < 24 << 20, f"the server's peak memory grew by {(peak_after - peak_before) >> 20} MB"
    assert listed(api, su)["big_upload.zip"]["size"] == len(content)
    path = server.data_dir / "backups" / "big_upload.zip"
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()
    assert api.http.delete("/api/backups/big_upload.zip", headers=su).status_code == 204


def test_upload_interrupted_by_the_client(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """A client that goes away mid-upload: the lock is released and nothing is left or listed."""
    before = set(listed(api, su))
    temp_before = temp_entries(server)
    boundary = "----backupboundary" + os.urandom(4).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"interrupted.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode()
    declared = len(head) + (16 << 20)
    request = (f"POST /api/backups/upload HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
               f"Authorization: {su['Authorization']}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(request + head + b"PK\x03\x04" + os.urandom((2 << 20) - 4))
        deadline = time.monotonic() + 10
        while True:  # the upload is being received: it holds the lock
            active = api.http.get("/api/backups/status", headers=su).json()["active"]
            if active is not None and active["bytesDone"] > 0:
                break
            assert time.monotonic() < deadline, "the upload never showed up in the status"
            time.sleep(0.02)
        assert active["op"] == "upload" and active["key"] == "interrupted.zip", active
        assert active["bytesTotal"] == declared
        assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is False
        assert_error(upload(api, su, "second_upload.zip", minimal_backup_zip()), 400, BUSY, {})
        assert_error(api.http.post("/api/backups", headers=su, json={"name": "during_upload.zip"}), 400, BUSY, {})
        assert_error(api.http.post("/api/backups/any.zip/restore", headers=su), 400, BUSY, {})
        assert "interrupted.zip" not in listed(api, su)
    finally:
        sock.close()
    last = wait_idle(api, su)["last"]
    assert last["op"] == "upload" and last["key"] == "interrupted.zip" and last["ok"] is False, last
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
    assert set(listed(api, su)) == before
    assert temp_entries(server) == temp_before
    assert not (server.data_dir / "backups" / "interrupted.zip").exists()


def test_upload_multipart_body_cut_short(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """The HTTP body is complete but the file part never ends (no closing boundary)."""
    before = set(listed(api, su))
    temp_before = temp_entries(server)
    boundary = "cutshort" + os.urandom(4).hex()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut_short.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode() + minimal_backup_zip()
    response = api.http.post("/api/backups/upload", headers={**su, "content-type": f"multipart/form-data; boundary={boundary}"},
                             content=body)
    assert_error(response, 400)
    assert wait_idle(api, su)["active"] is None
    assert set(listed(api, su)) == before
    assert temp_entries(server) == temp_before


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --- download --------------------------------------------------------------------------------


def test_download(api: Api, server: ServerProcess, setup: Setup, su_file_token: str) -> None:
    path = server.data_dir / "backups" / setup.key
    response = api.http.get(f"/api/backups/{setup.key}", params={"token": su_file_token})
    assert response.status_code == 200
    assert response.content == path.read_bytes()
    headers = response.headers
    assert headers["content-type"] == "application/zip"
    assert headers["content-disposition"] == f'attachment; filename="{setup.key}"'
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-length"] == str(setup.size)
    modified = parsedate_to_datetime(headers["last-modified"])
    assert abs(modified.timestamp() - path.stat().st_mtime) < 1
    assert headers["last-modified"].endswith(" GMT")

    head = api.http.head(f"/api/backups/{setup.key}", params={"token": su_file_token})
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-disposition", "accept-ranges", "content-length", "last-modified"):
        assert head.headers[name] == headers[name], name


def test_download_ranges(api: Api, server: ServerProcess, setup: Setup, su_file_token: str) -> None:
    data = (server.data_dir / "backups" / setup.key).read_bytes()
    size = len(data)
    url = f"/api/backups/{setup.key}"
    params = {"token": su_file_token}

    response = api.http.get(url, params=params, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 0-9/{size}"
    assert response.headers["content-length"] == "10"
    assert response.content == data[:10] and data[:4] == b"PK\x03\x04"

    response = api.http.get(url, params=params, headers={"Range": "bytes=-5"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"
    assert response.content == data[-5:]

    response = api.http.get(url, params=params, headers={"Range": "bytes=100-"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    assert response.content == data[100:]

    response = api.http.get(url, params=params, headers={"Range": f"bytes=10-{size + 1000}"})
    assert response.status_code == 206
    assert response.content == data[10:]

    for wanted in (f"bytes={size}-", "bytes=99999999-", f"bytes={size + 10}-{size + 20}"):
        response = api.http.get(url, params=params, headers={"Range": wanted})
        assert response.status_code == 416, wanted
        assert response.headers["content-range"] == f"bytes */{size}"
        assert data[:4] not in response.content

    head = api.http.head(url, params=params, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-range"] == f"bytes 0-9/{size}"


def _superuser_file_key(server: ServerProcess) -> tuple[str, str, str]:
    collection = server.sql("SELECT id, options FROM _collections WHERE name = '_superusers'")[0]
    row = server.sql("SELECT id, tokenKey FROM _superusers WHERE email = 'admin@example.com'")[0]
    key = row["tokenKey"] + json.loads(collection["options"])["fileToken"]["secret"]
    return key, row["id"], collection["id"]


def _craft_file_token(key: str, record_id: str, collection_id: str, age: int) -> str:
    class AgedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    class AgedSerializer(URLSafeTimedSerializer):
        default_signer = AgedSigner

    return str(AgedSerializer(key, salt=FILE_SALT).dumps({"id": record_id, "collectionId": collection_id, "type": "file"}))


def test_download_needs_a_superuser_file_token(api: Api, su: dict[str, str], server: ServerProcess,
                                               setup: Setup, su_file_token: str) -> None:
    url = f"/api/backups/{setup.key}"
    user_file_token = file_token(api, setup.user_token)
    key, superuser_id, superusers_id = _superuser_file_key(server)
    # a token crafted as the server signs them is accepted fresh, refused expired
    assert api.http.get(url, params={"token": _craft_file_token(key, superuser_id, superusers_id, 10)}).status_code == 200
    expired = _craft_file_token(key, superuser_id, superusers_id, 1000)
    payload, stamp, signature = su_file_token.rsplit(".", 2)
    tampered = f"{payload}.{stamp}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    attempts = [
        {},  # no token
        {"params": {"token": su["Authorization"]}},  # the superuser's AUTH token
        {"headers": su},  # an auth token in the header
        {"headers": {"Authorization": su_file_token}},  # even a file token, in the header
        {"params": {"token": user_file_token}},  # a user's file token
        {"params": {"token": "wrong"}},
        {"params": {"token": ""}},
        {"params": {"token": expired}},
        {"params": {"token": tampered}},
    ]
    for attempt in attempts:
        response = api.http.get(url, **attempt)
        assert_error(response, 403, FORBIDDEN_DOWNLOAD, {})
        assert b"PK\x03\x04" not in response.content
        response = api.http.head(url, **attempt)
        assert response.status_code == 403, attempt
    # a missing backup is 403 too without a valid token (no existence oracle), 404 with one
    assert_error(api.http.get("/api/backups/missing.zip", params={"token": user_file_token}), 403, FORBIDDEN_DOWNLOAD)
    assert_error(api.http.get("/api/backups/missing.zip", params={"token": su_file_token}), 404,
                 "The requested resource wasn't found.", {})


# --- delete ----------------------------------------------------------------------------------


def test_delete(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup, su_file_token: str) -> None:
    key = create_backup(api, su, "to_delete.zip")
    assert key in listed(api, su)
    assert_error(api.http.delete(f"/api/backups/{key}"), 401, NO_AUTH, {})
    assert_error(api.http.delete(f"/api/backups/{key}", headers=auth(setup.user_token)), 403, NOT_SUPERUSER, {})
    assert key in listed(api, su)

    response = api.http.delete(f"/api/backups/{key}", headers=su)
    assert response.status_code == 204 and response.content == b""
    assert key not in listed(api, su)
    assert not (server.data_dir / "backups" / key).exists()
    assert api.http.get(f"/api/backups/{key}", params={"token": su_file_token}).status_code == 404
    # again: missing (ours: 404, PocketBase says 400 and leaks a path)
    body = assert_error(api.http.delete(f"/api/backups/{key}", headers=su), 404, data={})
    assert str(server.data_dir) not in body["message"]
    assert_error(api.http.delete("/api/backups/never_existed.zip", headers=su), 404, data={})
    assert_error(api.http.delete("/api/backups/never_existed.zip", headers=auth(setup.user_token)), 403, NOT_SUPERUSER)
    # the others are untouched
    assert {setup.key, setup.first_key} <= set(listed(api, su))


# --- restore (refusals only) -----------------------------------------------------------------


def test_restore_refusals(api: Api, su: dict[str, str], setup: Setup) -> None:
    assert_error(api.http.post("/api/backups/missing.zip/restore", headers=su), 400, "Missing or invalid backup file.", {})
    assert_error(api.http.post(f"/api/backups/{setup.key}/restore"), 401, NO_AUTH, {})
    assert_error(api.http.post(f"/api/backups/{setup.key}/restore", headers=auth(setup.user_token)), 403, NOT_SUPERUSER, {})
    assert_error(api.http.post("/api/backups/missing.zip/restore", headers=auth(setup.user_token)), 403, NOT_SUPERUSER, {})
    status = wait_idle(api, su)
    assert status["last"] is None or status["last"]["op"] != "restore", status


# --- status ----------------------------------------------------------------------------------


def test_status(api: Api, su: dict[str, str], setup: Setup) -> None:
    assert_error(api.http.get("/api/backups/status"), 401, NO_AUTH, {})
    assert_error(api.http.get("/api/backups/status", headers=auth(setup.user_token)), 403, NOT_SUPERUSER, {})
    key = create_backup(api, su, "status_check.zip")
    response = api.http.get("/api/backups/status", headers=su)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"active", "last", "storage", "stats"}
    assert body["active"] is None
    assert body["storage"]["kind"] == "local" and body["storage"]["writable"] is True
    assert isinstance(body["storage"]["freeBytes"], int)
    last = body["last"]
    assert set(last) == {"op", "key", "ok", "error", "startedAt", "finishedAt"}
    assert (last["op"], last["key"], last["ok"], last["error"]) == ("create", key, True, None)
    assert DATETIME_RE.match(last["startedAt"]) and DATETIME_RE.match(last["finishedAt"])
    health = api.http.get("/api/health", headers=su).json()
    assert health["data"]["canBackup"] is True
    assert "canBackup" not in api.http.get("/api/health").json()["data"]
    assert "canBackup" not in api.http.get("/api/health", headers=auth(setup.user_token)).json()["data"]
    assert api.http.delete(f"/api/backups/{key}", headers=su).status_code == 204


# --- hostile keys ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traps(server: ServerProcess, setup: Setup) -> Iterator[bytes]:
    """Files a hostile key could try to reach: a dot file and a link inside backups/, a file in
    the temp dir, and the databases one level up. Returns a marker found in none of the backups."""
    marker = b"TRAP-" + os.urandom(8).hex().encode()
    backups = server.data_dir / "backups"
    created = [backups / ".secret.zip", server.data_dir / ".pb_temp_to_delete" / "trap.zip", server.data_dir / "trap.zip"]
    for path in created:
        path.write_bytes(b"PK\x03\x04" + marker)
    link = backups / "link_to_db.zip"
    link.symlink_to(server.data_dir / "data.db")
    outside_link = backups / "link_to_trap.zip"
    outside_link.symlink_to(server.data_dir / "trap.zip")
    yield marker
    for path in created + [link, outside_link]:
        path.unlink(missing_ok=True)


HOSTILE_KEYS = [
    "..",
    "%2e%2e",
    ".",
    "..%2Fdata.db",
    "..%2F..%2Fdata.db",
    "%2e%2e%2fdata.db",
    "..%2Ftrap.zip",
    "..%2F.pb_temp_to_delete%2Ftrap.zip",
    "..%5Cdata.db",
    "..%5Ctrap.zip",
    "%5Cetc%5Cpasswd",
    ".secret.zip",
    "%2Esecret.zip",
    "link_to_db.zip",
    "link_to_trap.zip",
    "%2Fetc%2Fpasswd",
    "x%00.zip",
    "a" * 300 + ".zip",
    "%C3%A9" * 130 + ".zip",  # 264 bytes of UTF-8
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=lambda key: key[:40])
def test_hostile_keys(api: Api, su: dict[str, str], server: ServerProcess, setup: Setup, su_file_token: str,
                      traps: bytes, key: str) -> None:
    for method in ("GET", "HEAD"):
        status, response = raw_request(server, method, f"/api/backups/{key}?token={su_file_token}")
        assert status == 404, (method, key, response[:300])
        assert traps not in response and b"SQLite format 3" not in response and b"root:" not in response
    if key not in ("link_to_db.zip", "link_to_trap.zip"):
        status, response = raw_request(server, "DELETE", f"/api/backups/{key}", su)
        assert status == 404, (key, response[:300])
    status, response = raw_request(server, "POST", f"/api/backups/{key}/restore", su)
    assert status == 400, (key, response[:300])
    assert response.endswith(b'{"status":400,"message":"Missing or invalid backup file.","data":{}}'), response[-300:]
    assert wait_idle(api, su)["active"] is None, "a restore must not have started"
    # everything is still in place
    for path in (server.data_dir / "backups" / ".secret.zip", server.data_dir / "trap.zip",
                 server.data_dir / ".pb_temp_to_delete" / "trap.zip", server.data_dir / "data.db",
                 server.data_dir / "backups" / setup.key):
        assert path.is_file(), path
    assert api.http.get("/api/health").status_code == 200
