"""Partial restore while the server serves (issue 14): writers to other collections go on, writes
to the collection being restored are refused with a clear 400 (and none that was answered 200 is
lost), readers see the old or the new state, never a mix; and the server killed (SIGKILL) at each
step of a partial restore comes back with the collection exactly as it was or wholly restored."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, run_cli, wait_gate_held
from test_backup_restore import add_note, backup, login, make_notes, notes, wait_restored

MESSAGE = "The collection is being restored; try again in a moment."


def fill(data_dir: Path, table: str, count: int, start: int = 0) -> None:
    """``count`` plain records straight into the table (the server stopped)."""
    conn = sqlite3.connect(data_dir / "data.db")
    with conn:
        conn.executemany(f'INSERT INTO "{table}" (id, title, n, doc) VALUES (?, ?, ?, \'\')',
                         [(f"bulk{i:011d}", f"bulk record {i} " + "x" * 80, i) for i in range(start, start + count)])
    conn.close()


def count(api: Api, su: dict[str, str], name: str) -> int:
    response = api.http.get(f"/api/collections/{name}/records", headers=su, params={"perPage": 1})
    assert response.status_code == 200, response.text
    return response.json()["totalItems"]


def post_restore(server: ServerProcess, key: str, body: dict[str, Any]) -> None:
    response = httpx.post(f"{server.url}/api/backups/{key}/restore", headers=login(server), json=body, timeout=30)
    assert response.status_code == 204, response.text


# --- serving during a restore ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merge", "replace"])
def test_other_collections_are_served_and_the_restored_one_refuses_writes_until_done(
        tmp_path: Path, mode: str) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    gate = tmp_path / "gate"
    server = ServerProcess(data_dir, env={"PB_FAULTS": "gate:partial-copy", "PB_FAULTS_GATE": str(gate)})
    server.start()
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su, "orders")
        make_notes(api, su, "customers")
        server.stop()
        fill(data_dir, "orders", 40_000)
        server.start()
        su = login(server)
        backup(server, "night.zip")
        extra = [add_note(api, su, f"since {i}", i, collection="orders") for i in range(3)]
        old_count = count(api, su, "orders")
        assert old_count == 40_003

        # Writers on both collections all along; the job is held in the middle of its copy.
        gate.write_text("1")  # the second batch of a shadow copy; after building the new data.db
        stop = threading.Event()
        results: dict[str, list[Any]] = {"customers": [], "orders": [], "orders_ok": [], "reads": []}

        def writer(name: str) -> None:
            with httpx.Client(base_url=server.url, headers=su, timeout=30) as http:
                i = 0
                while not stop.is_set():
                    response = http.post(f"/api/collections/{name}/records", json={"title": f"w{i}", "n": i})
                    results[name].append((response.status_code, time.monotonic()))
                    if response.status_code == 200 and name == "orders":
                        results["orders_ok"].append(response.json()["id"])
                    elif response.status_code != 200:
                        assert response.json()["message"] == MESSAGE, response.text
                    i += 1
                    time.sleep(0.005)

        def reader() -> None:
            with httpx.Client(base_url=server.url, headers=su, timeout=30) as http:
                while not stop.is_set():
                    response = http.get("/api/collections/orders/records", params={"perPage": 1})
                    results["reads"].append(response.status_code)
                    time.sleep(0.01)

        threads = [threading.Thread(target=writer, args=(n,)) for n in ("customers", "orders")]
        threads.append(threading.Thread(target=reader))
        for thread in threads:
            thread.start()
        post_restore(server, "night.zip", {"collections": ["orders"], "mode": mode})
        wait_gate_held(gate)
        time.sleep(0.3)
        status = httpx.get(server.url + "/api/backups/status", headers=su, timeout=10).json()
        assert status["active"]["op"] == "restore" and status["active"]["collections"] == ["orders"]
        assert status["active"]["mode"] == mode
        # Held mid-copy: the restored collection refuses writes (records and definition) and reads
        # see the old state; the others are written.
        during = count(api, su, "orders")
        response = api.http.post("/api/collections/orders/records", headers=su, json={"title": "refused"})
        assert response.status_code == 400 and response.json()["message"] == MESSAGE
        response = api.http.patch(f"/api/collections/orders/records/{extra[0]['id']}", headers=su, json={"n": 7})
        assert response.status_code == 400 and response.json()["message"] == MESSAGE
        response = api.http.delete(f"/api/collections/orders/records/{extra[0]['id']}", headers=su)
        assert response.status_code == 400 and response.json()["message"] == MESSAGE
        response = api.http.patch("/api/collections/orders", headers=su, json={"listRule": ""})
        assert response.status_code == 400 and response.json()["message"] == MESSAGE
        response = api.http.delete("/api/collections/orders", headers=su)
        assert response.status_code == 400 and response.json()["message"] == MESSAGE
        customers_before = len([r for r in results["customers"] if r[0] == 200])
        time.sleep(0.3)
        assert len([r for r in results["customers"] if r[0] == 200]) > customers_before
        assert count(api, su, "orders") == during  # no write got in
        gate.unlink()
        last = wait_restored(server, "night.zip", timeout=120)
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
        assert last["ok"] is True, last

        su = login(server)
        assert all(code == 200 for code, _ in results["customers"]), set(results["customers"])
        assert all(code == 200 for code in results["reads"])
        refused = [r for r in results["orders"] if r[0] == 400]
        assert refused, "the writer to orders was never refused"
        final = notes_ids(server)
        if mode == "merge":
            # Every write answered 200 is there: before the restore (merged in) and after it.
            assert set(results["orders_ok"]) <= final
            assert {r["id"] for r in extra} <= final
        else:
            # Those made before the restore began are gone with the rest (replace: exactly the
            # backup's records, then whatever was written once the restore was done).
            assert not {r["id"] for r in extra} & final
            assert {f"bulk{i:011d}" for i in range(40_000)} <= final
    finally:
        api.close()
        server.stop()


def notes_ids(server: ServerProcess) -> set[str]:
    return {row["id"] for row in server.sql('SELECT id FROM "orders"')}


# --- kill points ---------------------------------------------------------------------------------

# Where each kill point is, and what the restarted server must hold: the current data (B) before
# the commit, the restored collection (A) from the commit on.
POINTS = [
    ("partial-fetched", "B"),  # the zip at hand, nothing extracted
    ("partial-verified", "B"),  # data.db and the files extracted and verified
    ("partial-copying", "B"),  # the first batch copied into the shadow table
    ("partial-files-staging", "B"),  # one file new to its record moved into storage
    ("partial-staged", "B"),  # every new file moved into storage, journal written
    ("partial-before-commit", "B"),  # inside the switching transaction
    ("partial-committed", "A"),  # committed; replaced and removed files not yet done
    ("partial-files-done", "A"),  # files done; the old table not yet deleted
]
KEY = "night.zip"


def state(server: ServerProcess) -> dict[str, Any]:
    su = login(server)
    with httpx.Client(base_url=server.url, headers=su, timeout=30) as http:
        orders = http.get("/api/collections/orders")
        records = http.get("/api/collections/orders/records", params={"perPage": 1000, "sort": "n"})
        customers = http.get("/api/collections/customers/records", params={"perPage": 1000, "sort": "n"})
    storage = server.data_dir / "storage"
    return {
        "definition": orders.json(),
        "records": records.json()["items"],
        "customers": customers.json()["items"],
        "files": {str(p.relative_to(storage)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(storage.rglob("*")) if p.is_file()},
    }


class Template:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.a: dict[str, Any] = {}
        self.b: dict[str, Any] = {}

    def copy(self, tmp: Path, env: dict[str, str] | None = None) -> ServerProcess:
        target = tmp / "pb_data"
        shutil.copytree(self.data_dir, target, symlinks=True)
        return ServerProcess(target, env=env)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    tmp = tmp_path_factory.mktemp("crash_partial")
    data_dir = tmp / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir)
    server.start()
    api = Api(server)
    try:
        su = login(server)
        make_notes(api, su, "orders")
        make_notes(api, su, "customers")
        with_files = [add_note(api, su, f"a{i}", i, os.urandom(50_000 + i), collection="orders") for i in range(4)]
        plain = [add_note(api, su, f"plain {i}", 100 + i, collection="orders") for i in range(10)]
        add_note(api, su, "customer", 1, collection="customers")
        backup(server, KEY)
        # B: a record with a file deleted (its file comes back: staged), one's file replaced, a new
        # one with a file (removed by the replace), one changed, the definition changed.
        assert api.http.delete(f"/api/collections/orders/records/{with_files[0]['id']}", headers=su).status_code == 204
        response = api.http.patch(f"/api/collections/orders/records/{with_files[1]['id']}", headers=su,
                                  files={"doc": ("other.bin", os.urandom(3000))})
        assert response.status_code == 200, response.text
        add_note(api, su, "b new", 200, os.urandom(2000), collection="orders")
        assert api.http.patch(f"/api/collections/orders/records/{plain[0]['id']}", headers=su,
                              json={"title": "b changed"}).status_code == 200
        assert api.http.patch("/api/collections/orders", headers=su, json={"listRule": ""}).status_code == 200
        add_note(api, su, "customer b", 2, collection="customers")
    finally:
        api.close()
        server.stop()
    template = Template(data_dir)
    trial = template.copy(tmp / "trial")
    trial.start()
    try:
        template.b = state(trial)
        post_restore(trial, KEY, {"collections": ["orders"], "mode": "replace"})
        last = wait_restored(trial, KEY)
        assert last["ok"], last
        template.a = state(trial)
    finally:
        trial.stop()
    assert template.a["customers"] == template.b["customers"]
    assert all(template.a[k] != template.b[k] for k in ("definition", "records", "files"))
    return template


@pytest.mark.parametrize("point, expected", POINTS, ids=[p for p, _ in POINTS])
def test_a_kill_at_each_step_leaves_the_collection_exactly_old_or_new(template: Template, tmp_path: Path,
                                                                      point: str, expected: str) -> None:
    server = template.copy(tmp_path, env={"PB_FAULTS": point})
    server.start()
    try:
        post_restore(server, KEY, {"collections": ["orders"], "mode": "replace"})
        assert server.process is not None
        server.process.wait(timeout=60)
        assert server.process.returncode == -9, server.output()
        server.env = {}
        server.start()
        found = state(server)
        want = template.a if expected == "A" else template.b
        assert found == want, {k: found[k] == want[k] for k in found}
        su = login(server)
        status = httpx.get(server.url + "/api/backups/status", headers=su, timeout=10).json()
        assert status["last"]["op"] == "restore" and status["last"]["key"] == KEY
        assert status["last"]["ok"] is (expected == "A"), status["last"]
        assert not (server.data_dir / ".pb_partial_restore").exists()
        assert server.sql("SELECT name FROM sqlite_master WHERE name LIKE '_pb_partial_%'") == []
        assert server.sql("SELECT id FROM _params WHERE id = '__pbPartialRestore__'") == []
        # The next restore works, and ends at A.
        post_restore(server, KEY, {"collections": ["orders"], "mode": "replace"})
        last = wait_restored(server, KEY)
        assert last["ok"], last
        assert state(server) == template.a
    finally:
        server.stop()
