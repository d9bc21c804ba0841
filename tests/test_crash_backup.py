"""Crashes during a backup (issue 7): the server is killed (SIGKILL, as a power cut) at random
moments of a backup, on the local disk and on S3, round after round.

The promise: whatever the moment, after a restart nothing partial is listed (every listed backup
downloads and passes every check of a restore), the temp directory is empty, every record written
before the kill is there with its file, the database is sound, and the next backup succeeds.

Kill moments come two ways: a random wall-clock delay within the measured duration of a backup
(so the publish and just after are hit too), and the fault gate ``gate:backup-write`` holding the
job after a random number of archive entries. ``make soak`` runs many more rounds (PB_SOAK=1); the
seed of each test is printed so a failing run can be replayed (PB_CRASH_SEED)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Api, ServerProcess, rounds, wait_for, wait_gate_held
from test_backup_cycle import file_token, make_store, new_server
from test_backup_restore import add_note, login, make_notes, wait_idle

from server.backups import archive

FILES = 10  # incompressible storage files of FILE_SIZE at the start: a backup takes a noticeable time
FILE_SIZE = 3 << 20
RECORDS = 300  # plain records, with long titles: data.db is not tiny either


def seeded(name: str) -> random.Random:
    seed = int(os.environ.get("PB_CRASH_SEED") or random.randrange(1 << 32))
    print(f"{name}: PB_CRASH_SEED={seed}")
    return random.Random(seed)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


WRITES_PER_ROUND = 150  # then the writer idles: in `make soak` the data must not grow without end


class Writer(threading.Thread):
    """Adds records (every third with a small file), at most ``WRITES_PER_ROUND``, until stopped or
    the server dies; remembers each one the server acknowledged, with the digest of its file."""

    def __init__(self, server: ServerProcess, headers: dict[str, str], start: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.headers = headers
        self.n = start
        self.acked: dict[str, tuple[int, str | None]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=10) as client:
            while not self.stop.is_set():
                if len(self.acked) >= WRITES_PER_ROUND:
                    self.stop.wait(0.05)
                    continue
                doc = os.urandom(5000 + self.n % 97) if self.n % 3 == 0 else None
                try:
                    if doc is None:
                        response = client.post("/api/collections/notes/records", headers=self.headers,
                                               json={"title": f"w{self.n}", "n": self.n})
                    else:
                        response = client.post("/api/collections/notes/records", headers=self.headers,
                                               data={"title": f"w{self.n}", "n": str(self.n)},
                                               files={"doc": ("w.bin", doc)})
                except httpx.TransportError:
                    return  # killed
                if response.status_code != 200:
                    return
                self.acked[response.json()["id"]] = (self.n, None if doc is None else digest(doc))
                self.n += 1
                time.sleep(0.01)  # ~1.5 s of writes at least: they go on through the backup and the kill


def records_on_disk(server: ServerProcess) -> dict[str, tuple[int, str | None]]:
    """Every note, read from data.db, with the digest of its file read from storage."""
    found: dict[str, tuple[int, str | None]] = {}
    rows = server.sql("SELECT n.id, n.n, n.doc, c.id AS cid FROM notes n, _collections c WHERE c.name = 'notes'")
    for row in rows:
        file_digest = None
        if row["doc"]:
            path = server.data_dir / "storage" / row["cid"] / row["id"] / row["doc"]
            file_digest = digest(path.read_bytes()) if path.exists() else "missing"
        found[row["id"]] = (int(row["n"]), file_digest)
    return found


def integrity(data_dir: Path, scratch: Path) -> list[tuple[str, ...]]:
    """``PRAGMA integrity_check`` of data.db as the kill left it (a copy with its WAL, so that the
    check recovers nothing in the server's own files)."""
    scratch.mkdir(exist_ok=True)
    for suffix in ("", "-wal"):
        source = data_dir / f"data.db{suffix}"
        target = scratch / f"data.db{suffix}"
        target.unlink(missing_ok=True)
        if source.exists():
            target.write_bytes(source.read_bytes())
    (scratch / "data.db-shm").unlink(missing_ok=True)
    conn = sqlite3.connect(scratch / "data.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def verify_listed(api: Api, server: ServerProcess, store: Any, scratch: Path, verified: set[str]) -> list[str]:
    """Everything listed downloads and passes a restore's checks (structure, manifest checksums,
    integrity of the databases); the storage holds nothing else. Returns the listed keys."""
    su = login(server)
    listed = api.http.get("/api/backups", headers=su).json()
    keys = sorted(b["key"] for b in listed)
    assert keys == store.keys(), f"the storage holds more than is listed: {store.keys()} vs {keys}"
    token = file_token(api, su)
    for item in listed:
        if item["key"] in verified:
            continue
        path = scratch / item["key"]
        with api.http.stream("GET", f"/api/backups/{item['key']}", params={"token": token}) as response:
            assert response.status_code == 200, item
            with open(path, "wb") as handle:
                handle.writelines(response.iter_bytes(1 << 20))
        assert path.stat().st_size == item["size"], item
        target = scratch / f"x_{item['key']}"
        try:
            manifest = archive.extract(path, target)
            assert manifest is not None and "data.db" in manifest["files"], item
        except archive.ArchiveError as exc:
            raise AssertionError(f"listed backup {item['key']} is not restorable: {exc}") from None
        finally:
            path.unlink(missing_ok=True)
            shutil.rmtree(target, ignore_errors=True)
        verified.add(item["key"])
    return keys


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%fZ")


def timed_backup(server: ServerProcess, name: str) -> float:
    """Make a backup; how long it took, as the server's status tells (not counting our polling)."""
    response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": name}, timeout=30)
    assert response.status_code == 204, response.text
    last = wait_idle(server, timeout=120)
    assert last is not None and last["key"] == name and last["ok"], last
    return (parse_time(last["finishedAt"]) - parse_time(last["startedAt"])).total_seconds()


@pytest.mark.soak
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_backup_killed_at_any_moment_leaves_nothing_partial_and_loses_nothing(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rng = seeded(f"crash backup {kind}")
    gate = tmp_path / "gate"
    faults = {"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)}
    server = new_server(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    api = Api(server)
    tally = {"delay: killed while running": 0, "delay: killed after it ended": 0, "gate": 0}
    try:
        server.start()
        store = make_store(kind, server, request)
        store.configure(server)
        su = login(server)
        make_notes(api, su)
        for i in range(FILES):
            add_note(api, su, f"file {i}", i, os.urandom(FILE_SIZE))
        for i in range(RECORDS):
            add_note(api, su, f"record {i} " + "x" * 1500, FILES + i)
        expected = records_on_disk(server)
        duration = timed_backup(server, "base.zip")
        verified: set[str] = set()
        verify_listed(api, server, store, scratch, verified)
        n = FILES + RECORDS

        first = rng.randrange(2)
        for r in range(rounds(3, 150)):
            use_gate = (r + first) % 2 == 1  # the two ways in turn (a random start): a quick run has both
            if use_gate:  # (a delay round runs on the plain server started after the last kill)
                server.stop()
                server.env = dict(faults)
                server.start()
            su = login(server)
            writer = Writer(server, su, n)
            writer.start()
            wait_for(lambda w=writer: len(w.acked) >= 5, "the writer to get going")
            name = f"round{r}.zip"
            entries = 2 + len([p for p in (server.data_dir / "storage").rglob("*") if p.is_file()])
            if use_gate:
                passes = rng.randrange(entries)
                gate.write_text(str(passes))
                response = api.http.post("/api/backups", headers=su, json={"name": name})
                assert response.status_code == 204, response.text
                wait_gate_held(gate)
                time.sleep(rng.uniform(0, 0.05))
                tally["gate"] += 1
            else:
                delay = rng.uniform(0, 1.3 * duration)
                response = api.http.post("/api/backups", headers=su, json={"name": name})
                assert response.status_code == 204, response.text
                time.sleep(delay)
            server.process.send_signal(signal.SIGKILL)
            assert server.process.wait(timeout=30) == -signal.SIGKILL
            writer.stop.set()
            writer.join(timeout=30)
            gate.unlink(missing_ok=True)
            expected.update(writer.acked)
            n = writer.n + 1
            assert integrity(server.data_dir, scratch / "db") == [("ok",)], f"round {r}"

            # Restart, plain (no PB_FAULTS): nothing partial, nothing lost, nothing left over.
            server.process = None
            server.env = {}
            server.start()
            keys = verify_listed(api, server, store, scratch, verified)
            if use_gate:
                assert name not in keys, f"round {r}: a backup held mid-way is listed"
            else:
                tally["delay: killed after it ended" if name in keys else "delay: killed while running"] += 1
            assert sorted(os.listdir(server.data_dir / ".pb_temp_to_delete")) == [], f"round {r}"
            assert not (server.data_dir / ".pb_restore").exists()
            now = records_on_disk(server)
            lost = {k: v for k, v in expected.items() if now.get(k) != v}
            assert not lost, f"round {r}: records written before the kill are lost or damaged: {lost}"
            expected = now  # (records committed but not acknowledged before the kill count from now on)
            status = api.http.get("/api/backups/status", headers=login(server)).json()
            assert status["active"] is None, status

            # The next backup goes through and verifies.
            after = f"after{r}.zip"
            duration = 0.5 * duration + 0.5 * timed_backup(server, after)
            verify_listed(api, server, store, scratch, verified)
            # The killed job's unfinished upload (S3: a multipart upload with parts, which S3 keeps
            # and bills) was aborted by that next backup; on disk, its temp file went at the start.
            assert store.unfinished() == 0, f"round {r}: the killed backup's upload is still there"
            # Keep the list short: delete what was checked, but the newest complete backup.
            su = login(server)
            for key in keys:
                if key != "base.zip":
                    assert api.http.delete(f"/api/backups/{key}", headers=su).status_code == 204
                    verified.discard(key)

        server.stop()
        assert integrity(server.data_dir, scratch / "db") == [("ok",)]
        print(f"crash backup {kind}: backup ~{duration:.2f} s; kills: {tally}")
    finally:
        gate.unlink(missing_ok=True)
        api.close()
        server.stop()
