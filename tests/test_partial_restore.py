"""Partial restore (issue 14), on real server processes and real archives: chosen collections of a
backup merged into or replacing the current ones, without a re-exec; dry runs that change no byte;
files; auth records that log in after a merge; conflicts that change nothing; bad input."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Api, ServerProcess, auth
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
