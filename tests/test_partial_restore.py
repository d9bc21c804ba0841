"""Partial restore (issue 14), on real server processes and real archives: chosen collections of a
backup merged into or replacing the current ones, without a re-exec; dry runs that change no byte;
files; auth records that log in after a merge; conflicts that change nothing; bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ROOT, Api, ServerProcess, auth
from test_backup_restore import add_note, backup, login, make_notes, notes, wait_idle, wait_restored


# --- helpers -------------------------------------------------------------------------------


def restore_partial(server: ServerProcess, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a restore with ``body``, wait for its end, return ``status.last``."""
    response = httpx.post(f"{server.url}/api/backups/{key}/restore", headers=login(server), json=body, timeout=30)
    assert response.status_code == 204, response.text
    return wait_restored(server, key)


def collection(api: Api, su: dict[str, str], name: str) -> dict[str, Any]:
    response = api.http.get(f"/api/collections/{name}", headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def storage_state(server: ServerProcess) -> dict[str, str]:
    storage = server.data_dir / "storage"
    return {str(p.relative_to(storage)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(storage.rglob("*")) if p.is_file()}


def database_state(server: ServerProcess) -> list[tuple[Any, ...]]:
    """Every row of every table of data.db (and the schema), in a stable order."""
    conn = sqlite3.connect(server.data_dir / "data.db", timeout=10)
    try:
        out: list[tuple[Any, ...]] = list(conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"))
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall():
            out.append(("table", table))
            out.extend(conn.execute(f'SELECT rowid, * FROM "{table}" ORDER BY rowid').fetchall())
        return out
    finally:
        conn.close()


def shop(api: Api, su: dict[str, str]) -> None:
    """``orders`` and ``customers``, each with a text, a number and a file field."""
    make_notes(api, su, "orders")
    make_notes(api, su, "customers")


# --- merge and replace -----------------------------------------------------------------------


def test_merge_brings_back_deleted_and_changed_records_and_keeps_new_ones(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    a = add_note(api, su, "a", 1, collection="orders")
    b = add_note(api, su, "b", 2, collection="orders")
    c = add_note(api, su, "c", 3, collection="orders")
    customer = add_note(api, su, "alice", 1, collection="customers")
    before = notes(api, su, "orders")
    backup(fresh_server, "night.zip")

    # The bad script: a deleted, b changed; meanwhile d created; customers changed too.
    assert api.http.delete(f"/api/collections/orders/records/{a['id']}", headers=su).status_code == 204
    assert api.http.patch(f"/api/collections/orders/records/{b['id']}", headers=su, json={"title": "broken"}).status_code == 200
    d = add_note(api, su, "d", 4, collection="orders")
    assert api.http.patch(f"/api/collections/customers/records/{customer['id']}", headers=su,
                          json={"title": "alice (changed)"}).status_code == 200
    customers_before = notes(api, su, "customers")
    definition = collection(api, su, "orders")

    pid = fresh_server.process.pid
    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"]})
    assert last["ok"] is True, last
    assert last["collections"] == ["orders"] and last["mode"] == "merge" and last["dryRun"] is False
    assert last["summary"] == {"dryRun": False, "collections": {"orders": {
        "inserted": 1, "updated": 1, "deleted": 0, "unchanged": 1, "action": "merge",
        "files": {"added": 0, "replaced": 0, "removed": 0}}}}
    assert fresh_server.process.pid == pid  # no re-exec

    su = login(fresh_server)
    after = notes(api, su, "orders")
    assert after[a["id"]] == before[a["id"]]
    assert after[b["id"]]["title"] == "b"
    assert after[c["id"]] == before[c["id"]]
    assert after[d["id"]]["title"] == "d"  # created since the backup: kept
    assert set(after) == {a["id"], b["id"], c["id"], d["id"]}
    assert notes(api, su, "customers") == customers_before  # not named: untouched
    assert collection(api, su, "orders") == definition  # merge keeps the current definition
    # Writes work again on the restored collection.
    add_note(api, su, "e", 5, collection="orders")
    assert not (fresh_server.data_dir / ".pb_partial_restore").exists()
    tables = fresh_server.sql("SELECT name FROM sqlite_master WHERE name LIKE '_pb_partial_%'")
    assert tables == []


def test_replace_puts_back_the_collection_exactly_with_definition_and_files(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    docs = {i: os.urandom(3000 + i) for i in range(3)}
    kept = [add_note(api, su, f"k{i}", i, docs[i], collection="orders") for i in range(3)]
    add_note(api, su, "alice", 1, collection="customers")
    definition = collection(api, su, "orders")
    before = notes(api, su, "orders")
    files_before = storage_state(fresh_server)
    backup(fresh_server, "night.zip")

    # After the backup: a field added, a rule changed, a record added (with a file), one deleted,
    # one whose file is replaced.
    changed = dict(definition)
    changed["fields"] = definition["fields"] + [{"name": "extra", "type": "text"}]
    response = api.http.patch("/api/collections/orders", headers=su, json={"fields": changed["fields"], "listRule": ""})
    assert response.status_code == 200, response.text
    added = add_note(api, su, "later", 9, os.urandom(500), collection="orders")
    assert api.http.delete(f"/api/collections/orders/records/{kept[0]['id']}", headers=su).status_code == 204
    response = api.http.patch(f"/api/collections/orders/records/{kept[1]['id']}", headers=su,
                              files={"doc": ("new.bin", os.urandom(700))})
    assert response.status_code == 200, response.text
    customers_before = notes(api, su, "customers")

    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["ok"] is True, last
    summary = last["summary"]["collections"]["orders"]
    # kept[0] comes back (with its file), kept[1] gets its file back (the new one goes), kept[2] is
    # as it was (in the fields both definitions have), the later record goes with its file.
    assert summary == {"inserted": 1, "updated": 1, "deleted": 1, "unchanged": 1, "action": "replace",
                       "files": {"added": 2, "replaced": 0, "removed": 2}}, summary

    su = login(fresh_server)
    assert collection(api, su, "orders") == definition
    assert notes(api, su, "orders") == before
    assert storage_state(fresh_server) == files_before
    assert notes(api, su, "customers") == customers_before
    assert api.http.get(f"/api/collections/orders/records/{added['id']}", headers=su).status_code == 404
    for record in kept:
        response = api.http.get(f"/api/files/orders/{record['id']}/{before[record['id']]['doc']}")
        assert response.status_code == 200 and response.content == docs[kept.index(record)]


def test_replace_creates_a_deleted_collection_again_with_its_id_records_and_files(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    doc = os.urandom(4000)
    record = add_note(api, su, "x", 1, doc, collection="orders")
    definition = collection(api, su, "orders")
    before = notes(api, su, "orders")
    backup(fresh_server, "night.zip")
    assert api.http.delete("/api/collections/orders", headers=su).status_code == 204
    assert not (fresh_server.data_dir / "storage" / definition["id"]).exists()

    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["ok"] is True, last
    assert last["summary"]["collections"]["orders"] == {
        "inserted": 1, "updated": 0, "deleted": 0, "unchanged": 0, "action": "create",
        "files": {"added": 1, "replaced": 0, "removed": 0}}
    su = login(fresh_server)
    assert collection(api, su, "orders") == definition
    assert notes(api, su, "orders") == before
    response = api.http.get(f"/api/files/orders/{record['id']}/{record['doc']}")
    assert response.status_code == 200 and response.content == doc


def test_merge_of_files_puts_back_the_backups_and_keeps_those_of_newer_records(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    docs = [os.urandom(2000 + i) for i in range(3)]
    records = [add_note(api, su, f"r{i}", i, docs[i], collection="orders") for i in range(3)]
    backup(fresh_server, "night.zip")
    # r0 deleted (its file goes), r1's file replaced by another, r2 left alone, r3 created with a file.
    assert api.http.delete(f"/api/collections/orders/records/{records[0]['id']}", headers=su).status_code == 204
    response = api.http.patch(f"/api/collections/orders/records/{records[1]['id']}", headers=su,
                              files={"doc": ("other.bin", os.urandom(900))})
    assert response.status_code == 200, response.text
    replacement = response.json()["doc"]
    newer_doc = os.urandom(1234)
    newer = add_note(api, su, "r3", 3, newer_doc, collection="orders")

    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "merge"})
    assert last["ok"] is True, last
    assert last["summary"]["collections"]["orders"] == {
        "inserted": 1, "updated": 1, "deleted": 0, "unchanged": 1, "action": "merge",
        "files": {"added": 2, "replaced": 0, "removed": 1}}
    su = login(fresh_server)
    for index, record in enumerate(records):
        response = api.http.get(f"/api/files/orders/{record['id']}/{record['doc']}")
        assert response.status_code == 200 and response.content == docs[index], index
    assert api.http.get(f"/api/files/orders/{records[1]['id']}/{replacement}").status_code == 404
    assert not (fresh_server.data_dir / "storage" / records[1]["collectionId"] / records[1]["id"] / replacement).exists()
    response = api.http.get(f"/api/files/orders/{newer['id']}/{newer['doc']}")
    assert response.status_code == 200 and response.content == newer_doc


def test_dry_runs_change_no_byte_and_say_what_the_real_run_then_does(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    records = [add_note(api, su, f"r{i}", i, os.urandom(1500), collection="orders") for i in range(4)]
    add_note(api, su, "c", 1, collection="customers")
    backup(fresh_server, "night.zip")
    assert api.http.delete(f"/api/collections/orders/records/{records[0]['id']}", headers=su).status_code == 204
    assert api.http.patch(f"/api/collections/orders/records/{records[1]['id']}", headers=su,
                          json={"title": "changed"}).status_code == 200
    add_note(api, su, "new", 9, os.urandom(100), collection="orders")
    add_note(api, su, "new customer", 2, collection="customers")
    wait_idle(fresh_server)
    time.sleep(0.5)  # the log writer's last flush (auxiliary.db is not compared, data.db is)

    db_before, files_before = database_state(fresh_server), storage_state(fresh_server)
    dry = {}
    for body in ({"collections": ["orders"], "dryRun": True},
                 {"collections": ["orders", "customers"], "mode": "replace", "dryRun": True},
                 {"dryRun": True}):
        last = restore_partial(fresh_server, "night.zip", body)
        assert last["ok"] is True and last["dryRun"] is True and last["summary"]["dryRun"] is True, last
        assert database_state(fresh_server) == db_before, body
        assert storage_state(fresh_server) == files_before, body
        dry[str(body)] = last["summary"]["collections"]
    assert not (fresh_server.data_dir / ".pb_partial_restore").exists()

    full = dry[str({"dryRun": True})]
    assert full["orders"]["deleted"] == 1 and full["orders"]["inserted"] == 1 and full["orders"]["updated"] == 1
    assert full["customers"]["deleted"] == 1 and full["customers"]["unchanged"] == 1
    assert full["_superusers"]["unchanged"] == 1

    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"]})
    assert last["ok"] is True and last["summary"]["dryRun"] is False
    assert last["summary"]["collections"] == dry[str({"collections": ["orders"], "dryRun": True})]
    assert last["summary"]["collections"]["orders"] == {
        "inserted": 1, "updated": 1, "deleted": 0, "unchanged": 2, "action": "merge",
        "files": {"added": 1, "replaced": 0, "removed": 0}}


# --- auth collections --------------------------------------------------------------------------


def test_users_log_in_with_their_backup_passwords_after_a_merge(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    ann, _ = api.create_user("ann@example.com", "ann-password-1")
    bob, _ = api.create_user("bob@example.com", "bob-password-1")
    backup(fresh_server, "night.zip")
    # Since: ann's password changed, bob deleted, cid registered.
    assert api.http.patch(f"/api/collections/users/records/{ann['id']}", headers=su,
                          json={"password": "changed-pass-2", "passwordConfirm": "changed-pass-2"}).status_code == 200
    assert api.http.delete(f"/api/collections/users/records/{bob['id']}", headers=su).status_code == 204
    api.create_user("cid@example.com", "cid-password-1")

    last = restore_partial(fresh_server, "night.zip", {"collections": ["users"]})
    assert last["ok"] is True, last
    assert last["summary"]["collections"]["users"]["inserted"] == 1
    assert last["summary"]["collections"]["users"]["updated"] == 1
    api.login("users", "ann@example.com", "ann-password-1")
    api.login("users", "bob@example.com", "bob-password-1")
    api.login("users", "cid@example.com", "cid-password-1")  # registered since: kept
    response = api.http.post("/api/collections/users/auth-with-password",
                             json={"identity": "ann@example.com", "password": "changed-pass-2"})
    assert response.status_code == 400
    # The superusers were not named: untouched (the one logged in still is).
    assert api.http.get("/api/collections", headers=su).status_code == 200


# --- conflicts -----------------------------------------------------------------------------------


def test_a_merge_the_current_definition_refuses_fails_with_the_ids_and_changes_nothing(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    blank = add_note(api, su, "", 1, collection="orders")
    filled = add_note(api, su, "filled", 2, collection="orders")
    backup(fresh_server, "night.zip")
    assert api.http.delete(f"/api/collections/orders/records/{blank['id']}", headers=su).status_code == 204
    assert api.http.delete(f"/api/collections/orders/records/{filled['id']}", headers=su).status_code == 204
    # Since the backup, title became required: the backup's record with an empty title is refused.
    fields = collection(api, su, "orders")["fields"]
    for item in fields:
        if item["name"] == "title":
            item["required"] = True
    assert api.http.patch("/api/collections/orders", headers=su, json={"fields": fields}).status_code == 200
    wait_idle(fresh_server)
    time.sleep(0.3)
    db_before, files_before = database_state(fresh_server), storage_state(fresh_server)

    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"]})
    assert last["ok"] is False
    assert blank["id"] in last["error"] and "title" in last["error"] and filled["id"] not in last["error"], last
    assert "Nothing was changed" in last["error"]
    assert database_state(fresh_server) == db_before
    assert storage_state(fresh_server) == files_before
    # The dry run says the same.
    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "dryRun": True})
    assert last["ok"] is False and blank["id"] in last["error"]
    # A replace puts the old definition back, so it goes through.
    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["ok"] is True, last
    add_note(api, su, "writable again", 3, collection="orders")


def test_a_merge_breaking_a_unique_index_fails_with_the_ids_and_changes_nothing(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    ann, _ = api.create_user("ann@example.com", "ann-password-1")
    backup(fresh_server, "night.zip")
    assert api.http.delete(f"/api/collections/users/records/{ann['id']}", headers=su).status_code == 204
    other, _ = api.create_user("ann@example.com", "another-pass-1")  # the same email, another id
    wait_idle(fresh_server)
    time.sleep(0.3)
    db_before = database_state(fresh_server)

    last = restore_partial(fresh_server, "night.zip", {"collections": ["users"]})
    assert last["ok"] is False, last
    assert ann["id"] in last["error"] and "email" in last["error"], last["error"]
    assert database_state(fresh_server) == db_before
    api.login("users", "ann@example.com", "another-pass-1")
    last = restore_partial(fresh_server, "night.zip", {"collections": ["users"], "dryRun": True})
    assert last["ok"] is False and ann["id"] in last["error"]
    assert database_state(fresh_server) == db_before


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("body, field, code", [
    ({"collections": "orders"}, "collections", "validation_invalid_value"),
    ({"collections": [1]}, "collections", "validation_invalid_value"),
    ({"collections": []}, "collections", "validation_required"),
    ({"collections": ["orders"], "mode": "upsert"}, "mode", "validation_in_invalid"),
    ({"collections": ["orders"], "mode": 3}, "mode", "validation_in_invalid"),
    ({"mode": "merge"}, "mode", "validation_in_invalid"),
    ({"collections": ["orders"], "dryRun": "yes"}, "dryRun", "validation_invalid_value"),
    ({"collections": ["_mfas"]}, "collections", "validation_system_collection"),
    ({"collections": ["_collections"]}, "collections", "validation_system_collection"),
    ({"collections": ["no such/name"]}, "collections", "validation_match_invalid"),
])
def test_a_malformed_body_is_a_400_at_once(backed_up: ServerProcess, body: dict[str, Any], field: str,
                                           code: str) -> None:
    su = login(backed_up)
    response = httpx.post(f"{backed_up.url}/api/backups/night.zip/restore", headers=su, json=body, timeout=30)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["status"] == 400 and answer["data"][field]["code"] == code, answer
    status = httpx.get(f"{backed_up.url}/api/backups/status", headers=su, timeout=30).json()
    assert status["active"] is None and status["last"]["op"] == "create"  # no job started
    response = httpx.post(f"{backed_up.url}/api/backups/night.zip/restore", headers=su, content=b"[1, 2]",
                          timeout=30)
    assert response.status_code == 400


@pytest.fixture(scope="module")
def backed_up(server: ServerProcess) -> ServerProcess:
    """The module's server, with the backup ``night.zip`` (for tests that never start a job)."""
    backup(server, "night.zip")
    return server


def test_a_collection_in_neither_the_backup_nor_the_data_fails_the_job_and_changes_nothing(
        fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    add_note(api, su, "a", 1, collection="orders")
    backup(fresh_server, "night.zip")
    add_note(api, su, "b", 2, collection="orders")
    wait_idle(fresh_server)
    time.sleep(0.3)
    db_before = database_state(fresh_server)
    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders", "nowhere"], "mode": "replace"})
    assert last["ok"] is False and "'nowhere'" in last["error"] and "neither" in last["error"], last
    assert database_state(fresh_server) == db_before
    # A collection the backup lacks: merge keeps it, replace deletes it (as in the backup: absent).
    make_notes(api, su, "later")
    add_note(api, su, "l", 1, os.urandom(100), collection="later")
    last = restore_partial(fresh_server, "night.zip", {"collections": ["later"], "dryRun": True, "mode": "replace"})
    assert last["ok"] and last["summary"]["collections"]["later"]["action"] == "delete"
    assert last["summary"]["collections"]["later"]["deleted"] == 1
    assert last["summary"]["collections"]["later"]["files"]["removed"] == 1
    last = restore_partial(fresh_server, "night.zip", {"collections": ["later"]})
    assert last["ok"] and last["summary"]["collections"]["later"]["action"] == "keep"
    assert api.http.get("/api/collections/later", headers=login(fresh_server)).status_code == 200


def test_missing_backup_and_busy_are_400s(fresh_server: ServerProcess) -> None:
    su = login(fresh_server)
    response = httpx.post(f"{fresh_server.url}/api/backups/missing.zip/restore", headers=su,
                          json={"collections": ["users"]}, timeout=30)
    assert response.status_code == 400 and response.json()["message"] == "Missing or invalid backup file."
    response = httpx.post(f"{fresh_server.url}/api/backups/missing.zip/restore", json={"collections": ["users"]},
                          timeout=30)
    assert response.status_code == 401


# --- a PocketBase-made backup ------------------------------------------------------------------


def test_collections_of_a_backup_made_by_pocketbase_are_restored(fresh_server: ServerProcess, pocketbase: str,
                                                                tmp_path: Path) -> None:
    """The live PocketBase 0.40.6 makes the backup: its ``orders`` (with a file) is created here
    by a replace, and its ``users`` merged in log in with their PocketBase passwords."""
    doc = os.urandom(5000)
    with httpx.Client(base_url=pocketbase, timeout=60) as pb:
        token = pb.post("/api/collections/_superusers/auth-with-password",
                        json={"identity": "admin@example.com", "password": "1234567890"}).json()["token"]
        su_pb = auth(token)
        response = pb.post("/api/collections", headers=su_pb, json={
            "name": "orders", "type": "base", "listRule": "", "viewRule": "",
            "fields": [{"name": "title", "type": "text"}, {"name": "n", "type": "number"},
                       {"name": "doc", "type": "file", "maxSelect": 1, "maxSize": 1 << 20}]})
        assert response.status_code == 200, response.text
        made = []
        for i in range(3):
            response = pb.post("/api/collections/orders/records", headers=su_pb, data={"title": f"pb {i}", "n": str(i)},
                               files={"doc": ("doc.bin", doc)} if i == 0 else None)
            assert response.status_code == 200, response.text
            made.append(response.json())
        response = pb.post("/api/collections/users/records", json={
            "email": "pb-user@example.com", "password": "pb-password-1", "passwordConfirm": "pb-password-1"})
        assert response.status_code == 200, response.text
        assert pb.post("/api/backups", headers=su_pb, json={"name": "from_pb.zip"}).status_code == 204
        file_token = pb.post("/api/files/token", headers=su_pb).json()["token"]
        response = pb.get("/api/backups/from_pb.zip", params={"token": file_token})
        assert response.status_code == 200
        archive = tmp_path / "from_pb.zip"
        archive.write_bytes(response.content)

    su = login(fresh_server)
    with open(archive, "rb") as handle:
        response = httpx.post(f"{fresh_server.url}/api/backups/upload", headers=su,
                              files={"file": ("from_pb.zip", handle, "application/zip")}, timeout=60)
    assert response.status_code == 204, response.text
    api = Api(fresh_server)
    api.create_user("ours@example.com", "ours-password-1")

    last = restore_partial(fresh_server, "from_pb.zip", {"collections": ["orders", "users"], "mode": "merge"})
    assert last["ok"] is True, last
    assert last["summary"]["collections"]["orders"]["action"] == "create"
    assert last["summary"]["collections"]["orders"]["inserted"] == 3
    # The file and the ``.attrs`` file PocketBase's storage keeps beside it.
    assert last["summary"]["collections"]["orders"]["files"]["added"] == 2
    assert last["summary"]["collections"]["users"]["inserted"] == 1
    su = login(fresh_server)  # our superusers: untouched
    records = notes(api, su, "orders")
    assert {r["id"] for r in made} == set(records)
    first = records[made[0]["id"]]
    assert first["title"] == "pb 0" and first["doc"] == made[0]["doc"]
    response = api.http.get(f"/api/files/orders/{first['id']}/{first['doc']}")
    assert response.status_code == 200 and response.content == doc
    api.login("users", "pb-user@example.com", "pb-password-1")
    api.login("users", "ours@example.com", "ours-password-1")
    add_note(api, su, "ours now", 9, collection="orders")


# --- the CLI -----------------------------------------------------------------------------------


def backup_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "backup", *args, "--dir", str(data_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_partial_restore_needs_the_server_stopped_and_prints_the_summary(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    gone = add_note(api, su, "gone later", 1, os.urandom(300), collection="orders")
    add_note(api, su, "stays", 2, collection="orders")
    backup(fresh_server, "night.zip")
    assert api.http.delete(f"/api/collections/orders/records/{gone['id']}", headers=su).status_code == 204
    data_dir = fresh_server.data_dir

    result = backup_cli(data_dir, "restore", "night.zip", "--collections", "orders")
    assert result.returncode == 1
    assert "A server is running" in result.stderr and "POST /api/backups/night.zip/restore" in result.stderr
    fresh_server.stop()
    result = backup_cli(data_dir, "restore", "night.zip", "--collections", "orders,nowhere", "--mode", "replace")
    assert result.returncode == 1 and "'nowhere'" in result.stderr, result.stderr
    result = backup_cli(data_dir, "restore", "night.zip", "--collections", "_mfas")
    assert result.returncode == 1 and "_mfas" in result.stderr, result.stderr

    result = backup_cli(data_dir, "restore", "night.zip", "--collections", "orders", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {"dryRun": True, "collections": {"orders": {
        "inserted": 1, "updated": 0, "deleted": 0, "unchanged": 1, "action": "merge",
        "files": {"added": 1, "replaced": 0, "removed": 0}}}}
    result = backup_cli(data_dir, "restore", "night.zip", "--collections", "orders")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["collection", "action", "inserted", "updated", "deleted", "unchanged", "files",
                                "added", "replaced", "removed"]
    assert lines[1].split() == ["orders", "merge", "1", "0", "0", "1", "1", "0", "0"]
    assert lines[-1] == "Restored night.zip"
    result = backup_cli(data_dir, "restore", "night.zip", "--dry-run")  # a full restore's dry run
    assert result.returncode == 0, result.stderr
    assert "Dry run: nothing was changed." in result.stdout and "_superusers" in result.stdout

    fresh_server.start()
    su = login(fresh_server)
    records = notes(api, su, "orders")
    assert gone["id"] in records
    response = api.http.get(f"/api/files/orders/{gone['id']}/{gone['doc']}")
    assert response.status_code == 200


def test_the_manifest_counts_records_and_files_per_collection(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    for i in range(3):
        add_note(api, su, f"o{i}", i, os.urandom(100) if i else None, collection="orders")
    add_note(api, su, "c", 1, collection="customers")
    path = backup(fresh_server, "night.zip")
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("pb_backup_manifest.json"))
    assert manifest["collections"]["orders"] == {"records": 3, "files": 2}
    assert manifest["collections"]["customers"] == {"records": 1, "files": 0}
    assert manifest["collections"]["_superusers"] == {"records": 1, "files": 0}


def test_a_file_failing_its_checksum_after_data_db_was_counted_fails_the_job_and_changes_nothing(
        fresh_server: ServerProcess) -> None:
    """The count starts once data.db matches the manifest, while the files still extract: a file
    of the collection whose SHA-256 then does not match fails the job with that reason, the
    collection is writable again and nothing changed."""
    api = Api(fresh_server)
    su = login(fresh_server)
    shop(api, su)
    for i in range(3):
        add_note(api, su, f"a{i}", i, os.urandom(20_000), collection="orders")
    backup(fresh_server, "night.zip")
    good = fresh_server.data_dir / "backups" / "night.zip"
    bad = fresh_server.data_dir / "backups" / "bad.zip"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as target:
        names = source.namelist()
        manifest_name = next(n for n in names if n.endswith("manifest.json"))
        manifest = json.loads(source.read(manifest_name))
        assert names.index("data.db") < min(i for i, n in enumerate(names) if n.startswith("storage/"))
        victim = [n for n in names if n.startswith("storage/")][-1]
        manifest["files"][victim]["sha256"] = "0" * 64
        for name in names:
            data = json.dumps(manifest).encode() if name == manifest_name else source.read(name)
            target.writestr(name, data)
    add_note(api, su, "b", 9, collection="orders")
    wait_idle(fresh_server)
    time.sleep(0.3)
    db_before, files_before = database_state(fresh_server), storage_state(fresh_server)
    last = restore_partial(fresh_server, "bad.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["ok"] is False and "checksum" in last["error"] and victim in last["error"], last
    assert database_state(fresh_server) == db_before
    assert storage_state(fresh_server) == files_before
    assert not (fresh_server.data_dir / ".pb_partial_restore").exists()
    created = api.http.post("/api/collections/orders/records", headers=login(fresh_server), json={"title": "c", "n": 10})
    assert created.status_code == 200, created.text


def test_the_count_splits_rowid_ranges_without_gaps_or_overlaps() -> None:
    from server.backups.partial import _ranges
    for low, high, parts in [(1, 1, 2), (1, 2, 2), (1, 3, 2), (-5, 5, 3), (1, 1_200_001, 2),
                             (-(1 << 63), (1 << 63) - 1, 2), (7, 9, 5)]:
        ranges = _ranges(low, high, parts)
        assert 1 <= len(ranges) <= parts
        assert ranges[0][0] == low and ranges[-1][1] == high
        assert all(a <= b for a, b in ranges)
        assert all(ranges[i][1] + 1 == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_the_page_comparison_leaves_out_only_rows_alike_in_both_files(tmp_path: Path) -> None:
    """``tools.sqlite_pages``: a copy of a multi-level table, then changed in place, resized,
    deleted, inserted in the middle and at the end: every rowid whose row differs (or is in one
    file only) is in a returned range, and the ranges are a small part of the table."""
    from server.tools import sqlite_pages

    def rows(path: Path) -> dict[int, tuple[Any, ...]]:
        conn = sqlite3.connect(path)
        try:
            return {row[0]: row[1:] for row in conn.execute("SELECT rowid, * FROM t")}
        finally:
            conn.close()

    def ranges(a: Path, b: Path) -> list[tuple[int, int]]:
        roots = [sqlite3.connect(p).execute("SELECT rootpage FROM sqlite_master WHERE name = 't'").fetchone()[0]
                 for p in (a, b)]
        with open(a, "rb") as fa, open(b, "rb") as fb:
            infos = {sqlite_pages.header_info(f.read(100)) for f in (fa, fb)}
            assert len(infos) == 1
            page_size = infos.pop()[0]
            return sqlite_pages.differing_ranges(lambda at, n: os.pread(fa.fileno(), n, at), roots[0],
                                                 lambda at, n: os.pread(fb.fileno(), n, at), roots[1], page_size)

    a, b = tmp_path / "a.db", tmp_path / "b.db"
    conn = sqlite3.connect(a)
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, title TEXT NOT NULL, n INTEGER)")
    conn.executemany("INSERT INTO t (rowid, id, title, n) VALUES (?, ?, ?, ?)",
                     [(i * 3, f"id{i:08d}", f"title {i} " + "x" * (i % 150), i) for i in range(1, 30_000)])
    conn.commit()
    conn.close()
    shutil.copyfile(a, b)
    assert ranges(a, b) == []  # identical: every row settled by its page
    conn = sqlite3.connect(b)
    conn.execute("UPDATE t SET n = -1 WHERE rowid = 300")  # same size
    conn.execute("UPDATE t SET title = title || ' longer by far than before' WHERE rowid = 45000")
    conn.execute("DELETE FROM t WHERE rowid IN (60000, 60003)")
    conn.execute("INSERT INTO t (rowid, id, title, n) VALUES (70001, 'inserted', 'in the middle', 0)")
    conn.execute("INSERT INTO t (rowid, id, title, n) VALUES (200000, 'appended', 'at the end', 0)")
    conn.commit()
    conn.close()
    before, after = rows(a), rows(b)
    differing = {r for r in before.keys() | after.keys() if before.get(r) != after.get(r)}
    assert differing == {300, 45000, 60000, 60003, 70001, 200000}
    found = ranges(a, b)
    assert all(any(low <= r <= high for low, high in found) for r in differing), found
    covered = sum(1 for r in before if any(low <= r <= high for low, high in found))
    assert 0 < covered < len(before) // 20, (covered, found)
    # Either file first; a table whose root differs is one range, everything.
    assert all(any(low <= r <= high for low, high in ranges(b, a)) for r in differing)
    conn = sqlite3.connect(b)
    conn.execute("VACUUM")
    conn.close()
    assert all(any(low <= r <= high for low, high in ranges(a, b)) for r in differing)

    # No overflow page anywhere in a file (a free list, too), told from the b-trees' interior pages.
    def without_overflow(path: Path) -> bool:
        conn = sqlite3.connect(path)
        trees = [row[0] for row in conn.execute("SELECT rootpage FROM sqlite_master WHERE rootpage > 0")]
        conn.close()
        with open(path, "rb") as handle:
            return sqlite_pages.without_overflow(lambda at, n: os.pread(handle.fileno(), n, at), 4096, [1, *trees])

    conn = sqlite3.connect(a)
    conn.execute("CREATE INDEX t_title ON t (title)")
    conn.execute("DELETE FROM t WHERE rowid % 7 = 0")
    conn.commit()
    assert without_overflow(a)
    conn.execute("INSERT INTO t (id, title, n) VALUES ('big', ?, 0)", ("y" * 5000,))
    conn.commit()
    assert not without_overflow(a)
    conn.execute("DELETE FROM t WHERE id = 'big'")
    conn.commit()
    conn.close()
    assert without_overflow(a)


def test_a_replace_of_a_big_table_counts_what_changed_also_where_pages_are_alike(fresh_server: ServerProcess) -> None:
    """The summary of a replace compares the two tables' pages first (identical leaves settle
    their rows); changed, deleted and new records are still counted exactly (the dry run, which
    walks every record, says the same), and a record big enough for overflow pages (its leaf
    alike, its tail changed) is not taken for unchanged."""
    api = Api(fresh_server)
    su = login(fresh_server)
    make_notes(api, su, "orders")
    fresh_server.stop()
    conn = sqlite3.connect(fresh_server.data_dir / "data.db")
    with conn:
        conn.executemany("INSERT INTO orders (id, title, n, doc) VALUES (?, ?, ?, '')",
                         [(f"bulk{i:011d}", f"bulk record {i} " + "x" * 80, i) for i in range(6000)])
    conn.close()
    fresh_server.start()
    su = login(fresh_server)
    backup(fresh_server, "night.zip")
    for record, change in (("bulk00000000100", {"title": "changed"}), ("bulk00000003000", {"n": -1})):
        assert api.http.patch(f"/api/collections/orders/records/{record}", headers=su, json=change).status_code == 200
    for record in ("bulk00000002000", "bulk00000004000"):
        assert api.http.delete(f"/api/collections/orders/records/{record}", headers=su).status_code == 204
    for i in range(3):
        add_note(api, su, f"since {i}", i, collection="orders")
    expected = {"inserted": 2, "updated": 2, "deleted": 3, "unchanged": 5996, "action": "replace",
                "files": {"added": 0, "replaced": 0, "removed": 0}}
    dry = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "replace", "dryRun": True})
    assert dry["summary"]["collections"]["orders"] == expected, dry
    last = restore_partial(fresh_server, "night.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["ok"] is True and last["summary"]["collections"]["orders"] == expected, last

    # A record of 6000 characters: its tail (and only it) changed since the backup, in place.
    fresh_server.stop()
    conn = sqlite3.connect(fresh_server.data_dir / "data.db")
    with conn:
        conn.execute("INSERT INTO orders (id, title, n, doc) VALUES ('big000000000000', ?, 1, '')", ("b" * 6000,))
    conn.close()
    fresh_server.start()
    backup(fresh_server, "big.zip")
    fresh_server.stop()
    conn = sqlite3.connect(fresh_server.data_dir / "data.db")
    with conn:
        conn.execute("UPDATE orders SET title = substr(title, 1, 5999) || 'c' WHERE id = 'big000000000000'")
    conn.close()
    fresh_server.start()
    last = restore_partial(fresh_server, "big.zip", {"collections": ["orders"], "mode": "replace"})
    assert last["summary"]["collections"]["orders"] == dict(expected, inserted=0, updated=1, deleted=0,
                                                            unchanged=6000), last


def test_a_wal_left_by_another_process_refuses_the_swap_and_one_of_ours_does_not(tmp_path: Path) -> None:
    """``_last_close_clears_wal``: the data.db swap's check that no other process holds the file."""
    import subprocess
    import sys

    from server.backups.partial import _last_close_clears_wal

    db, wal = tmp_path / "data.db", tmp_path / "data.db-wal"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (a)")
    conn.execute("INSERT INTO t VALUES (1)")
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
                               "c.execute('SELECT * FROM t').fetchall(); print('open', flush=True); time.sleep(60)", str(db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        conn.close()
        size = wal.stat().st_size
        assert size > 0
        assert not _last_close_clears_wal(db, wal)  # another process has it open: refused
        assert wal.stat().st_size == size  # and its WAL untouched
    finally:
        holder.kill()
        holder.wait()
    assert _last_close_clears_wal(db, wal)  # ours alone: the last close takes the WAL away
    assert not wal.exists()
    check = sqlite3.connect(db)
    assert check.execute("SELECT a FROM t").fetchall() == [(1,)]
    check.close()
