"""A full restore never destroys the only copy of the data it replaces (issue 13; CONTRACT.md,
"Restore, step by step", step 6): once the restored data is served, the replaced data becomes the
backup ``@pre_restore_<app>_<UTC time>.zip``, which restores it exactly; ``preRestoreMaxKeep``
keeps the newest N (0: none); a restore whose safety copy clearly cannot fit is refused before
anything changes; a safety copy that fails keeps the replaced data for the next start. Also the
verification tier each kind of archive gets (``status.last.verified``). The kill points while the
copy is written are in tests/test_crash_restore.py."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, run_cli
from test_backup_restore import (
    MANIFEST,
    SAFETY_NAME,
    add_note,
    backup,
    login,
    make_notes,
    notes,
    restore,
    wait_idle,
)
from test_disk_full import MB, LimitedServer, SmallDisk, pocketbase_style_zip, upsert_superuser


def state(server: ServerProcess) -> dict[str, Any]:
    """What a restore must bring back: the app name, the collections, every note, every stored file."""
    su = login(server)
    with httpx.Client(base_url=server.url, headers=su, timeout=30) as http:
        app = http.get("/api/settings").json()["meta"]["appName"]
        collections = sorted(c["name"] for c in http.get("/api/collections", params={"perPage": 500}).json()["items"])
        records = http.get("/api/collections/notes/records", params={"perPage": 500, "sort": "n"}).json()["items"]
    storage = server.data_dir / "storage"
    files = {str(p.relative_to(storage)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(storage.rglob("*")) if p.is_file()}
    return {"app": app, "collections": collections, "records": records, "files": files}


def safety_copies(api: Api, su: dict[str, str]) -> list[str]:
    return sorted((b["key"] for b in api.http.get("/api/backups", headers=su).json()
                   if b["key"].startswith("@pre_restore_")), reverse=True)


def set_backups(api: Api, su: dict[str, str], **values: Any) -> None:
    response = api.http.patch("/api/settings", headers=su, json={"backups": values})
    assert response.status_code == 200, response.text


@pytest.fixture()
def server(tmp_path: Path) -> Any:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    process = ServerProcess(data_dir)
    process.start()
    yield process
    process.stop()


def make_a_and_b(server: ServerProcess, api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
    """State A, backed up as ``snap.zip``, then state B (added, changed, deleted, renamed)."""
    su = login(server)
    assert api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "Shop A"}}).status_code == 200
    make_notes(api, su)
    kept = [add_note(api, su, f"a{i}", i, os.urandom(20_000 + i)) for i in range(3)]
    add_note(api, su, "plain", 10)
    a = state(server)
    backup(server, "snap.zip")
    add_note(api, su, "b new", 20, os.urandom(50_000))
    assert api.http.delete(f"/api/collections/notes/records/{kept[0]['id']}", headers=su).status_code == 204
    assert api.http.patch(f"/api/collections/notes/records/{kept[1]['id']}", headers=su,
                          json={"title": "b changed"}).status_code == 200
    make_notes(api, su, "b_only")
    assert api.http.patch("/api/settings", headers=su, json={"meta": {"appName": "Shop B"}}).status_code == 200
    b = state(server)
    assert a != b and a["files"] != b["files"]
    return a, b


def test_the_replaced_data_becomes_a_backup_that_restores_it(server: ServerProcess) -> None:
    api = Api(server)
    try:
        a, b = make_a_and_b(server, api)
        last = restore(server, "snap.zip")
        assert last["ok"] is True and last["verified"] == "sha256+quick_check", last
        assert state(server) == a
        su = login(server)

        # Named after the replaced data's app, listed beside the other backups.
        safety = last["safetyCopy"]["key"]
        assert last["safetyCopy"] == {"key": safety, "ok": True, "error": None}
        assert SAFETY_NAME.fullmatch(safety) and safety.startswith("@pre_restore_shop_b_"), safety
        assert safety_copies(api, su) == [safety]
        assert not (server.data_dir / ".pb_restore").exists()

        # Downloadable through a file token, as any backup; an archive of ours, saying what it is.
        token = api.http.post("/api/files/token", headers=su).json()["token"]
        response = api.http.get(f"/api/backups/{safety}", params={"token": token})
        assert response.status_code == 200
        assert response.content == (server.data_dir / "backups" / safety).read_bytes()
        with zipfile.ZipFile(server.data_dir / "backups" / safety) as archive:
            manifest = json.loads(archive.read(MANIFEST))
            assert archive.testzip() is None
        assert manifest["createdBy"] == {"kind": "pre-restore"} and manifest["replacedBy"] == "snap.zip"
        assert manifest["app"] == "Shop B"
        assert {"data.db", "auxiliary.db"} <= set(manifest["files"])

        # Restoring it brings back exactly the data the restore replaced, and saves A in turn.
        last = restore(server, safety)
        assert last["ok"] is True and last["verified"] == "sha256+quick_check", last
        assert state(server) == b
        su = login(server)
        second = last["safetyCopy"]["key"]
        assert second.startswith("@pre_restore_shop_a_") and set(safety_copies(api, su)) == {safety, second}
        assert restore(server, second)["ok"]
        assert state(server) == a
    finally:
        api.close()


def test_a_zip_without_manifest_gets_the_full_check(server: ServerProcess, tmp_path: Path) -> None:
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su)
        add_note(api, su, "in the zip", 1, b"a file")
        before = notes(api, su)
        pocketbase_style_zip(server, tmp_path / "plain.zip")
        response = api.http.post("/api/backups/upload", headers=su,
                                 files={"file": ("plain.zip", (tmp_path / "plain.zip").read_bytes(), "application/zip")})
        assert response.status_code == 204, response.text
        add_note(api, su, "later", 2)
        last = restore(server, "plain.zip")
        assert last["ok"] is True and last["verified"] == "integrity_check", last
        assert notes(api, login(server)) == before
    finally:
        api.close()


def test_how_many_safety_copies_are_kept_and_none_at_zero(server: ServerProcess) -> None:
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su)
        add_note(api, su, "first", 1)
        set_backups(api, su, preRestoreMaxKeep=2, cron="", cronMaxKeep=1)
        backup(server, "snap.zip")
        made = []
        for n in range(3):
            add_note(api, login(server), f"change {n}", 10 + n)
            last = restore(server, "snap.zip")
            assert last["ok"], last
            made.append(last["safetyCopy"]["key"])
        su = login(server)
        assert len(set(made)) == 3
        assert safety_copies(api, su) == sorted(made[1:], reverse=True)  # the newest 2
        # Pruning the scheduled backups never touches them.
        assert run_cli("backup", "prune", "--keep", "0", data_dir=server.data_dir).returncode == 0
        assert safety_copies(api, su) == sorted(made[1:], reverse=True)

        # 0 (the setting of the data being replaced is what counts): no copy, the old data deleted.
        set_backups(api, su, preRestoreMaxKeep=0)
        add_note(api, su, "not kept", 99)
        last = restore(server, "snap.zip")
        assert last["ok"] is True and "safetyCopy" not in last, last
        assert safety_copies(api, login(server)) == sorted(made[1:], reverse=True)
        assert not (server.data_dir / ".pb_restore").exists()

        # A negative count is refused in the contract's shape.
        response = api.http.patch("/api/settings", headers=login(server), json={"backups": {"preRestoreMaxKeep": -1}})
        assert response.status_code == 400
        assert response.json()["data"]["backups"]["preRestoreMaxKeep"]["code"] == \
            "validation_min_greater_equal_than_required"
    finally:
        api.close()


def test_a_restore_whose_safety_copy_cannot_fit_is_refused_before_anything_changes(tmp_path: Path) -> None:
    """A real small file system: room to extract the backup, none for a copy of the present data."""
    disk = SmallDisk(tmp_path / "pb_data", 96 * MB)
    disk.mount()
    server: LimitedServer | None = None
    try:
        upsert_superuser(disk.mountpoint, disk.prefix)
        server = LimitedServer(disk.view, server_dir=disk.mountpoint, log_dir=tmp_path, prefix=disk.prefix)
        server.start()
        api = Api(server)
        su = login(server)
        make_notes(api, su)
        add_note(api, su, "small", 1, os.urandom(100_000))
        backup(server, "small.zip")
        big = [add_note(api, su, f"big {i}", 10 + i, os.urandom(4 * MB)) for i in range(6)]
        before = state(server)
        free = disk.free()
        assert 64 * MB < free < (64 + 24) * MB, free  # extracting fits the margin; 24 MB more does not

        response = api.http.post("/api/backups/small.zip/restore", headers=su)
        assert response.status_code == 204, response.text
        last = wait_idle(server)
        assert last["op"] == "restore" and last["ok"] is False, last
        assert "Not enough free disk space for the safety copy" in last["error"], last
        assert "preRestoreMaxKeep" in last["error"] and str(tmp_path) not in last["error"]
        assert state(server) == before  # nothing changed
        assert sorted(os.listdir(server.data_dir / ".pb_temp_to_delete")) == []
        assert not (server.data_dir / ".pb_restore").exists()
        assert safety_copies(api, su) == []

        # With space freed, the same restore goes through, with its safety copy.
        for record in big[:4]:
            assert api.http.delete(f"/api/collections/notes/records/{record['id']}", headers=su).status_code == 204
        last = restore(server, "small.zip")
        assert last["ok"] is True and last["safetyCopy"]["ok"] is True, last
        api.close()
    finally:
        if server is not None:
            server.stop()
        disk.unmount()


def test_a_safety_copy_that_fails_keeps_the_replaced_data_for_the_next_start(tmp_path: Path) -> None:
    """The copy cannot be written (a file-size limit smaller than it): the restore itself stands,
    the replaced data stays where it is, a further restore is refused until it is saved, and the
    next start saves it."""
    data_dir = tmp_path / "pb_data"
    upsert_superuser(data_dir)
    server = LimitedServer(data_dir, fsize=3 * MB)
    server.start()
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su)
        add_note(api, su, "a", 1)
        a = state(server)
        backup(server, "snap.zip")
        for i in range(3):
            add_note(api, su, f"b {i}", 10 + i, os.urandom(MB + i))  # each under the limit, together over it
        b = state(server)

        last = restore(server, "snap.zip")
        assert last["ok"] is True, last
        assert last["safetyCopy"]["ok"] is False and last["safetyCopy"]["error"] == "not enough disk space", last
        assert state(server) == a
        assert (server.data_dir / ".pb_restore" / "old" / "data.db").is_file()  # kept
        su = login(server)
        assert safety_copies(api, su) == []
        assert os.listdir(server.data_dir / ".pb_temp_to_delete") == []

        # Another restore would delete it: refused, with the reason, and nothing changes.
        response = api.http.post("/api/backups/snap.zip/restore", headers=su)
        assert response.status_code == 204
        last = wait_idle(server)
        assert last["ok"] is False and "could not be saved" in last["error"], last
        assert state(server) == a and (server.data_dir / ".pb_restore" / "old" / "data.db").is_file()

        # The next start, without the limit, saves it; it holds B.
        server.stop()
        server.fsize = None
        server.start()
        assert wait_idle(server)["safetyCopy"]["ok"] is True
        su = login(server)
        copies = safety_copies(api, su)
        assert len(copies) == 1 and not (server.data_dir / ".pb_restore").exists()
        assert restore(server, copies[0])["ok"]
        assert state(server) == b
    finally:
        api.close()
        server.stop()
