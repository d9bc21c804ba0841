"""Continuous replication and point-in-time restore (issue 16), on real server processes.

One server for the module replicates to a local directory (syncInterval 200 ms); a client writes
numbered rows through the API with quiet gaps around chosen moments, so that the rows each moment
must hold are known exactly. The moments are restored with our CLI (a new data directory), with
the real ``litestream restore`` (Litestream 0.5 reads our replica), through the API (partial, dry
run, full with its re-exec, each starting a new lineage), and after a SIGKILL with pb_data gone.
An S3 test replicates to rclone's S3 server.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import (SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, S3Server, ServerProcess, auth, run_cli, start_server,
                      wait_for)

SYNC_MS = 200
QUIET = 0.5  # seconds without writes on each side of a moment (> SYNC_MS + a round)


def stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def rows_of(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [int(r[0]) for r in conn.execute("SELECT n FROM nums ORDER BY n")]
    finally:
        conn.close()


def replication(api: Api, su: dict[str, str]) -> dict[str, Any]:
    response = api.http.get("/api/backups/replication", headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def wait_synced(api: Api, su: dict[str, str], lineage: str | None = None) -> dict[str, Any]:
    """Until every write made before this call is in the replica (the status polls are writes
    too: request logs in auxiliary.db, so the lag itself need not reach 0)."""
    since = stamp(time.time())

    def synced() -> dict[str, Any] | None:
        status = replication(api, su)
        ok = (status["window"]["to"] or "") >= since and status["lastError"] is None
        return status if ok and (lineage is None or status["lineage"] != lineage) else None

    try:
        return wait_for(synced, "the replica to catch up", timeout=30)
    except AssertionError:
        raise AssertionError(f"the replica did not catch up: {replication(api, su)}") from None


def write(api: Api, su: dict[str, str], numbers: range) -> list[tuple[int, float]]:
    acked = []
    for n in numbers:
        response = api.http.post("/api/collections/nums/records", headers=su, json={"n": n})
        assert response.status_code == 200, response.text
        acked.append((n, time.time()))
    return acked


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("repl")
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=tmp / "pb_data")
    # Level-0 files compacted every second (5 minutes by default): the restores below read both.
    server = ServerProcess(tmp / "pb_data", env={"PB_REPLICA_COMPACT_SECONDS": "1"})
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    replica = tmp / "replica"
    response = api.http.patch("/api/settings", headers=su, json={"backups": {"replication": {
        "enabled": True, "path": str(replica), "syncInterval": SYNC_MS}}})
    assert response.status_code == 200, response.text
    response = api.http.post("/api/collections", headers=su, json={
        "name": "nums", "type": "base", "fields": [{"name": "n", "type": "number"}]})
    assert response.status_code == 200, response.text
    # Numbered rows with quiet moments: marks[i] = (moment, rows it must hold).
    marks = []
    written = 0
    for batch in (60, 90, 120):
        write(api, su, range(written + 1, written + batch + 1))
        written += batch
        time.sleep(QUIET)
        marks.append((time.time(), list(range(1, written + 1))))
        time.sleep(QUIET)
    # One more row: Litestream restores only moments before its newest file.
    write(api, su, range(written + 1, written + 2))
    status = wait_synced(api, su)
    yield {"tmp": tmp, "server": server, "api": api, "su": su, "replica": replica, "marks": marks,
           "written": written, "lineage": status["lineage"], "rows_now": list(range(1, written + 2))}
    api.close()
    server.stop()


def test_settings_status_and_refusals(env: Any) -> None:
    api, su = env["api"], env["su"]
    status = replication(api, su)
    assert status["enabled"] is True and status["lastError"] is None and status["bytes"] > 0
    assert status["window"]["from"] <= stamp(env["marks"][0][0]) <= status["window"]["to"]
    assert api.http.get("/api/backups/replication").status_code == 401
    for bad, field in (({"syncInterval": -1}, "syncInterval"), ({"retention": 0}, "retention"),
                       ({"path": "relative/dir"}, "path"), ({"path": str(env["server"].data_dir / "x")}, "path"),
                       ({"enabled": "yes"}, "enabled")):
        response = api.http.patch("/api/settings", headers=su, json={"backups": {"replication": bad}})
        assert response.status_code == 400, (bad, response.text)
        assert field in response.json()["data"]["backups"]["replication"], response.text
    response = api.http.post("/api/backups/replication/restore", headers=su, json={"at": "not a time"})
    assert response.status_code == 400 and "at" in response.json()["data"]
    assert api.http.post("/api/backups/replication/restore", headers=su, json={}).status_code == 400
    assert api.http.get("/api/backups", headers=su).json() == []  # the replica is never a backup
    # Both databases replicate, each in Litestream's layout under the lineage.
    lineage = env["replica"] / env["lineage"]
    for db in ("data.db", "auxiliary.db"):
        assert list((lineage / db / "ltx" / "9").glob("*.ltx")), db
    assert len(list((lineage / "data.db" / "ltx" / "0").glob("*.ltx"))) >= 3
    assert list((lineage / "data.db" / "ltx" / "1").glob("*.ltx"))  # compactions


def test_point_in_time_with_our_cli_and_litestream(env: Any) -> None:
    litestream = Path(sysconfig.get_path("scripts")) / "litestream"
    for index, (moment, expected) in enumerate(env["marks"]):
        target = env["tmp"] / f"restored_{index}"
        result = run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--at", stamp(moment),
                         "--dir", str(target))
        assert "Restored" in result.stdout
        assert rows_of(target / "data.db") == expected
        assert (target / "auxiliary.db").exists()
        # The real Litestream restores the same moment from our files, row for row.
        out = env["tmp"] / f"litestream_{index}.db"
        iso = datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        done = subprocess.run([str(litestream), "restore", "-timestamp", iso, "-o", str(out),
                               f"file://{env['replica'] / env['lineage'] / 'data.db'}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert rows_of(out) == expected
    # A moment before the replica's window is refused, with the reason.
    result = run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--at", "2001-01-01 00:00:00.000Z",
                     "--dir", str(env["tmp"] / "too_old"), check=False)
    assert result.returncode == 1 and "Error:" in result.stderr


def test_a_restart_goes_on_with_the_lineage(env: Any) -> None:
    api, su = env["api"], env["su"]
    server: ServerProcess = env["server"]
    server.restart()  # SIGTERM: the last writes are shipped before the databases close
    more = range(env["written"] + 2, env["written"] + 12)
    write(api, su, more)
    env["rows_now"] += list(more)
    # A backup meanwhile: its snapshot checkpoints the WAL, after the replicator has read it.
    assert api.http.post("/api/backups", headers=su, json={}).status_code == 204
    wait_for(lambda: (lambda st: st["active"] is None and (st["last"] or {}).get("op") == "create")(
        api.http.get("/api/backups/status", headers=su).json()), "the backup")
    more = range(env["written"] + 12, env["written"] + 22)
    write(api, su, more)
    env["rows_now"] += list(more)
    status = wait_synced(api, su)
    assert status["lineage"] == env["lineage"]
    snapshots = sorted((env["replica"] / env["lineage"] / "data.db" / "ltx" / "9").glob("*.ltx"))
    assert len(snapshots) == 2  # the lineage's first, and the one taken at the restart
    target = env["tmp"] / "after_restart"
    run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--dir", str(target))
    assert rows_of(target / "data.db") == env["rows_now"]
    litestream = Path(sysconfig.get_path("scripts")) / "litestream"
    out = env["tmp"] / "litestream_after_restart.db"
    done = subprocess.run([str(litestream), "restore", "-o", str(out),
                           f"file://{env['replica'] / env['lineage'] / 'data.db'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert rows_of(out) == env["rows_now"]
    # A moment before the restart still restores from the same lineage.
    moment, expected = env["marks"][1]
    target = env["tmp"] / "before_restart"
    run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--at", stamp(moment), "--dir", str(target))
    assert rows_of(target / "data.db") == expected


def _wait_job(api: Api, su: dict[str, str], since: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        try:
            last = api.http.get("/api/backups/status", headers=su).json()["last"]
        except Exception:
            return None
        return last if last and last["op"] == "restore" and last["startedAt"] >= since else None

    return wait_for(done, "the restore job", timeout=60)


def test_restores_through_the_api_start_new_lineages(env: Any) -> None:
    api, su, marks = env["api"], env["su"], env["marks"]
    server: ServerProcess = env["server"]
    url = "/api/backups/replication/restore"
    before = replication(api, su)["lineage"]
    # A dry run changes nothing and says what would.
    since = stamp(time.time())
    response = api.http.post(url, headers=su, json={"at": stamp(marks[0][0]), "dryRun": True})
    assert response.status_code == 204, response.text
    last = _wait_job(api, su, since)
    assert last["ok"], last
    assert rows_of(server.data_dir / "data.db") == env["rows_now"]
    # "nums as it was at that moment", online: a partial restore of the collection.
    since = stamp(time.time())
    response = api.http.post(url, headers=su, json={"at": stamp(marks[1][0]), "collections": ["nums"],
                                                    "mode": "replace"})
    assert response.status_code == 204, response.text
    last = _wait_job(api, su, since)
    assert last["ok"], last
    assert rows_of(server.data_dir / "data.db") == marks[1][1]
    partial_lineage = wait_synced(api, su, before)["lineage"]
    assert partial_lineage > before
    # The full restore of the first moment: verified, swapped in, the process re-executed.
    since = stamp(time.time())
    response = api.http.post(url, headers=su, json={"at": stamp(marks[0][0])})
    assert response.status_code == 204, response.text
    last = _wait_job(api, su, since)
    assert last["ok"], last
    assert rows_of(server.data_dir / "data.db") == marks[0][1]
    full_lineage = wait_synced(api, su, partial_lineage)["lineage"]
    assert full_lineage > partial_lineage
    # The older lineages still restore their own moments (never mixed with the new one).
    target = env["tmp"] / "after_restores"
    run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--at", stamp(marks[2][0]),
            "--dir", str(target))
    assert rows_of(target / "data.db") == marks[2][1]


def test_sigkill_then_a_new_machine(env: Any) -> None:
    """Rows written at full speed, the server SIGKILLed, pb_data deleted: the replica restores
    every row acknowledged up to a little more than syncInterval before the kill."""
    api, su = env["api"], env["su"]
    server: ServerProcess = env["server"]
    start = 100_000
    deadline = time.time() + 1.5
    acked: list[tuple[int, float]] = []
    n = start
    while time.time() < deadline:
        acked += write(api, su, range(n, n + 10))
        n += 10
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    killed = time.time()
    server.process.wait()
    server.process = None
    shutil.rmtree(server.data_dir)
    target = env["tmp"] / "new_machine"
    run_cli("backup", "replica", "restore", "--from", str(env["replica"]), "--dir", str(target))
    rows = [r for r in rows_of(target / "data.db") if r >= start]
    assert rows == list(range(start, start + len(rows)))  # a consistent prefix
    must = [num for num, at in acked if at < killed - (SYNC_MS / 1000 + 0.6)]
    assert len(rows) >= len(must), (len(rows), len(must), len(acked))
    # The rebuilt directory boots, and serves what it holds.
    fresh = ServerProcess(target)
    fresh.start()
    try:
        fresh_api = Api(fresh)
        token = fresh_api.superuser_token()
        listed = fresh_api.http.get("/api/collections/nums/records?perPage=1", headers=auth(token)).json()
        assert listed["totalItems"] == len(rows_of(target / "data.db"))
        fresh_api.close()
    finally:
        fresh.stop()


def test_kill_points_in_the_replicator(tmp_path: Path) -> None:
    """SIGKILL inside the replicator (an LTX file staged and not sent; one just sent; a checkpoint
    halfway, with a 64 KiB WAL bound so that it comes soon): each time the replica restores a
    consistent prefix of the rows, and the restarted server goes on with the lineage."""
    data_dir = tmp_path / "pb_data"
    replica = tmp_path / "replica"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_REPLICA_CHECKPOINT_BYTES": str(64 << 10),
                                          "PB_REPLICA_SNAPSHOT_SECONDS": "1"})
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    response = api.http.post("/api/backups/replication/restore", headers=su, json={"at": stamp(time.time())})
    assert response.status_code == 400 and "not enabled" in response.json()["message"]
    assert api.http.get("/api/backups/replication", headers=su).json()["enabled"] is False
    assert api.http.patch("/api/settings", headers=su, json={"backups": {"replication": {
        "enabled": True, "path": str(replica), "syncInterval": 100}}}).status_code == 200
    assert api.http.post("/api/collections", headers=su, json={
        "name": "nums", "type": "base", "fields": [{"name": "n", "type": "number"}]}).status_code == 200
    n = 0
    try:
        for point in ("replica-staged", "replica-uploaded", "replica-checkpointing"):
            server.stop()
            server.env["PB_FAULTS"] = point
            server.start()
            api.close()
            api = Api(server)
            acked = n
            while n < acked + 5000:
                try:
                    response = api.http.post("/api/collections/nums/records", headers=su, json={"n": n + 1},
                                             timeout=5)
                except Exception:
                    break  # killed at the point
                assert response.status_code == 200, response.text
                n += 1
            assert server.process is not None and server.process.wait(timeout=10) == -signal.SIGKILL, point
            server.process = None
            target = tmp_path / f"after_{point}"
            run_cli("backup", "replica", "restore", "--from", str(replica), "--dir", str(target))
            rows = rows_of(target / "data.db")
            committed = rows_of(data_dir / "data.db")  # (the last write may be in, its answer lost)
            assert rows == committed[:len(rows)], point  # a consistent prefix
            n = len(committed)
        server.env.pop("PB_FAULTS")
        server.start()
        api.close()
        api = Api(server)
        write(api, su, range(n + 1, n + 21))
        time.sleep(1.2)  # a periodic snapshot (1 s here) comes with the next writes
        write(api, su, range(n + 21, n + 41))
        wait_synced(api, su)
        # The periodic snapshot matched the state the level-0 files had built, checksum for checksum.
        assert "checksum differs" not in server.output()
        lineage = next(replica.iterdir())
        kills_and_first = 1 + 3
        assert len(list((lineage / "data.db" / "ltx" / "9").glob("*.ltx"))) > kills_and_first
        target = tmp_path / "at_last"
        run_cli("backup", "replica", "restore", "--from", str(replica), "--dir", str(target))
        assert rows_of(target / "data.db") == rows_of(data_dir / "data.db")
        assert len(list(replica.iterdir())) == 1  # one lineage through the kills
    finally:
        api.close()
        server.stop()


def test_a_long_outage_and_retention(tmp_path: Path) -> None:
    """The replica away past the bound of waiting files (1 byte here): they are dropped, writes go
    on, and once it is back a new lineage begins, which holds everything. Retention (2 s here, with
    a snapshot every second) then deletes the old lineage and the superseded files, never what the
    latest state needs."""
    data_dir = tmp_path / "pb_data"
    replica = tmp_path / "replica"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_REPLICA_MAX_STAGED_BYTES": "1", "PB_REPLICA_RETENTION_SECONDS": "2",
                                          "PB_REPLICA_SNAPSHOT_SECONDS": "1"})
    server.start()
    api = Api(server)
    try:
        su = auth(api.superuser_token())
        assert api.http.patch("/api/settings", headers=su, json={"backups": {"replication": {
            "enabled": True, "path": str(replica), "syncInterval": 100}}}).status_code == 200
        assert api.http.post("/api/collections", headers=su, json={
            "name": "nums", "type": "base", "fields": [{"name": "n", "type": "number"}]}).status_code == 200
        write(api, su, range(1, 21))
        first = wait_synced(api, su)["lineage"]
        away = tmp_path / "replica.away"
        replica.rename(away)
        replica.write_text("not a directory")  # the disk of the replica is gone
        write(api, su, range(21, 41))
        wait_for(lambda: replication(api, su)["lastError"], "the outage to show")
        replica.unlink()
        away.rename(replica)
        second = wait_synced(api, su, first)["lineage"]
        assert second > first and "stayed unreachable" in server.output()
        target = tmp_path / "after_outage"
        run_cli("backup", "replica", "restore", "--from", str(replica), "--dir", str(target))
        assert rows_of(target / "data.db") == list(range(1, 41))
        for start in (41, 51, 61):
            write(api, su, range(start, start + 10))
            time.sleep(1.1)

        more = iter(range(1000, 100000))

        def trimmed() -> bool:
            number = next(more)
            write(api, su, range(number, number + 1))
            level = replica / second / "data.db" / "ltx"
            superseded = (level / "0" / "0000000000000002-0000000000000002.ltx").exists()
            return not (replica / first).exists() and len(list((level / "9").glob("*.ltx"))) <= 4 and not superseded

        wait_for(trimmed, "retention", timeout=20)
        wait_synced(api, su)
        target = tmp_path / "after_retention"
        run_cli("backup", "replica", "restore", "--from", str(replica), "--dir", str(target))
        assert rows_of(target / "data.db") == rows_of(data_dir / "data.db")
    finally:
        api.close()
        server.stop()


def test_s3_replica_outage_and_sync_mode(tmp_path: Path, s3_server: S3Server) -> None:
    """Replication to S3 (rclone) under replica/, age-encrypted (backups.encryption): an outage
    makes the lag grow and shows in the status, writes go on, and it heals by itself; then in
    sync mode (syncInterval 0) every acknowledged write survives a SIGKILL."""
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "key.txt"
    key_file.write_text(str(identity) + "\n")
    server = start_server(tmp_path)
    api = Api(server)
    try:
        su = auth(api.superuser_token())
        bucket = s3_server.bucket()
        response = api.http.patch("/api/settings", headers=su, json={"backups": {
            "s3": s3_server.settings(bucket), "replication": {"enabled": True, "syncInterval": SYNC_MS},
            "encryption": {"recipients": [str(identity.to_public())]}}})
        assert response.status_code == 200, response.text
        assert api.http.post("/api/collections", headers=su, json={
            "name": "nums", "type": "base", "fields": [{"name": "n", "type": "number"}]}).status_code == 200
        write(api, su, range(1, 41))
        wait_synced(api, su)
        # Idle costs nothing: no S3 request but the sync of each status read's own request log.
        time.sleep(1.0)
        before = replication(api, su)["requests"]
        time.sleep(2.5)
        assert replication(api, su)["requests"] - before <= 2
        assert api.http.get("/api/backups", headers=su).json() == []  # under replica/, not a backup
        assert s3_server.objects(bucket) and all(key.startswith("replica/") for key in s3_server.objects(bucket))
        s3_server.stop()
        try:
            write(api, su, range(41, 61))  # writes never wait for, nor fail with, the replica
            status = wait_for(lambda: (lambda st: st if st["lastError"] and st["lagMs"] > 500 else None)(
                replication(api, su)), "the outage to show", timeout=30)
            assert "S3" in status["lastError"] or "reach" in status["lastError"], status
        finally:
            s3_server.start()
        status = wait_synced(api, su)
        assert status["lastError"] is None
        response = api.http.patch("/api/settings", headers=su, json={"backups": {"replication": {"syncInterval": 0}}})
        assert response.status_code == 200, response.text
        write(api, su, range(61, 81))
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)  # at once: no time for a sync after the last answer
        server.process.wait()
        server.process = None
        sample = next(p for p in (s3_server.root / bucket).rglob("*.ltx"))
        assert sample.read_bytes().startswith(b"age-encryption.org/v1")
        target = tmp_path / "from_s3"
        env = {"AWS_ACCESS_KEY_ID": s3_server.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3_server.SECRET}

        def cli(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [os.sys.executable, "-m", "server", "backup", "replica", "restore", "--from", f"s3://{bucket}/replica",
                 "--endpoint", s3_server.url, "--region", "us-east-1", "--force-path-style", "--dir", str(target),
                 *extra], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
                env={**os.environ, **env})

        refused = cli()
        assert refused.returncode == 1 and "identity is required" in refused.stderr and not target.exists()
        result = cli("--identity-file", str(key_file))
        assert result.returncode == 0, result.stderr
        assert rows_of(target / "data.db") == list(range(1, 81))
    finally:
        api.close()
        server.stop()
