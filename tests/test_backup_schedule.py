"""Scheduled backups (``__pbAutoBackup__``) on a real server process whose scheduler clock runs
fast (``PB_TEST_CRON_MINUTE_SECONDS=1``: a cron minute lasts one real second), so that
``* * * * *`` fires every second and no test waits a real minute.

Names, retention (``cronMaxKeep``; manual and uploaded backups are never pruned), the crons API,
a run that finds a job active is skipped, a failing run is logged and shown in the status, and
the schedule survives a restore's re-exec."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CATALOG, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, S3Server, ServerProcess, free_port, run_cli, wait_for
from test_backup_restore import login, make_notes, add_note, notes, restore, wait_idle

AUTO_RE = re.compile(r"^@auto_pb_backup_acme_\d{14}(_\d+)?\.zip$")
FAST = {"PB_TEST_CRON_MINUTE_SECONDS": "1"}


def new_server(tmp_path: Path, **env: str) -> ServerProcess:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={**FAST, **env})
    server.start()
    return server


@pytest.fixture()
def server(tmp_path: Path) -> Any:
    server = new_server(tmp_path)
    yield server
    server.stop()


def set_backups(server: ServerProcess, **backups: Any) -> None:
    response = httpx.patch(server.url + "/api/settings", headers=login(server), json={"backups": backups}, timeout=30)
    assert response.status_code == 200, response.text


def keys(server: ServerProcess) -> list[str]:
    response = httpx.get(server.url + "/api/backups", headers=login(server), timeout=30)
    assert response.status_code == 200, response.text
    return sorted(item["key"] for item in response.json())


def crons(server: ServerProcess) -> list[dict[str, str]]:
    response = httpx.get(server.url + "/api/crons", headers=login(server), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def logs(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    rows = server.sql("SELECT data FROM _logs WHERE message = ? ORDER BY created", (message,), db="auxiliary.db")
    return [json.loads(row["data"]) for row in rows]


def auto_created(server: ServerProcess) -> list[str]:
    """Keys of the scheduled backups created so far, oldest first (from the server's logs)."""
    return [entry["key"] for entry in logs(server, "Backup created") if entry.get("key", "").startswith("@auto_")]


def create(server: ServerProcess, name: str) -> None:
    response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": name}, timeout=30)
    assert response.status_code == 204, response.text
    assert wait_idle(server)["ok"]


# --- the schedule and retention --------------------------------------------------------------


def test_scheduled_backups_are_named_and_pruned_to_cron_max_keep(server: ServerProcess) -> None:
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "one", 1, b"a file")
    create(server, "manual.zip")
    with open(server.data_dir / "backups" / "manual.zip", "rb") as handle:
        response = api.http.post("/api/backups/upload", headers=su, files={"file": ("uploaded.zip", handle.read())})
    assert response.status_code == 204, response.text
    assert [c for c in crons(server) if c["id"] == "__pbAutoBackup__"] == []

    set_backups(server, cron="* * * * *", cronMaxKeep=2)
    assert {"id": "__pbAutoBackup__", "expression": "* * * * *"} in crons(server)
    created = wait_for(lambda: len(auto_created(server)) >= 4 and auto_created(server), "four scheduled backups")
    set_backups(server, cron="")  # stop the schedule; a run in flight may still finish
    wait_idle(server)
    time.sleep(1.5)
    created = auto_created(server)

    assert all(AUTO_RE.match(key) for key in created), created
    listed = keys(server)
    auto = [key for key in listed if key.startswith("@auto_")]
    assert sorted(auto) == sorted(created[-2:])  # the two newest, by their timestamps
    assert "manual.zip" in listed and "uploaded.zip" in listed  # never pruned
    pruned = [entry["key"] for entry in logs(server, "Backup pruned")]
    assert sorted(pruned) == sorted(created[:-2])
    # Every scheduled backup was a real, complete backup.
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["last"]["key"] == created[-1] and status["last"]["ok"] is True

    # The schedule is gone: not listed, not runnable, and no new backups appear.
    assert [c for c in crons(server) if c["id"] == "__pbAutoBackup__"] == []
    response = api.http.post("/api/crons/__pbAutoBackup__", headers=su)
    assert response.status_code == 404
    count = len(auto_created(server))
    time.sleep(2.5)
    assert len(auto_created(server)) == count
    api.close()


def test_cron_max_keep_zero_keeps_every_scheduled_backup(server: ServerProcess) -> None:
    set_backups(server, cron="* * * * *", cronMaxKeep=0)
    wait_for(lambda: len(auto_created(server)) >= 3, "three scheduled backups")
    set_backups(server, cron="")
    wait_idle(server)
    time.sleep(1.5)
    created = auto_created(server)
    assert sorted(created) == [key for key in keys(server) if key.startswith("@auto_")]
    assert logs(server, "Backup pruned") == []


def test_run_now_through_the_crons_api_and_macros(server: ServerProcess) -> None:
    set_backups(server, cron="@yearly", cronMaxKeep=1)
    assert {"id": "__pbAutoBackup__", "expression": "@yearly"} in crons(server)
    su = login(server)
    for expected in (1, 2):
        response = httpx.post(server.url + "/api/crons/__pbAutoBackup__", headers=su, timeout=30)
        assert response.status_code == 204, response.text
        wait_for(lambda: len(auto_created(server)) >= expected, "a scheduled backup run by hand")
        wait_idle(server)
        time.sleep(1.1)  # a new second: a new name
    wait_for(lambda: len(logs(server, "Backup pruned")) == 1, "the older one pruned")
    created = auto_created(server)
    assert [key for key in keys(server) if key.startswith("@auto_")] == [created[-1]]
    # Saving another expression replaces the job at once.
    set_backups(server, cron="0 3 * * 1")
    assert [c for c in crons(server) if c["id"] == "__pbAutoBackup__"] == [
        {"id": "__pbAutoBackup__", "expression": "0 3 * * 1"}]


# --- a busy or failing run ---------------------------------------------------------------------


def test_a_run_that_finds_a_job_active_is_skipped_and_logged(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    server = new_server(tmp_path, PB_FAULTS="gate:backup-write", PB_FAULTS_GATE=str(gate))
    try:
        su = login(server)
        gate.touch()
        response = httpx.post(server.url + "/api/backups", headers=su, json={"name": "held.zip"}, timeout=30)
        assert response.status_code == 204
        set_backups(server, cron="* * * * *", cronMaxKeep=0)
        wait_for(lambda: len(logs(server, "Scheduled backup skipped: another backup/restore process is running")) >= 2,
                 "two skipped runs")
        status = httpx.get(server.url + "/api/backups/status", headers=su, timeout=30).json()
        assert status["active"]["key"] == "held.zip"  # the running job was left alone
        assert auto_created(server) == []
        gate.unlink()
        # Once the job is done, the next runs go through: the skipped ones were not queued up.
        wait_for(lambda: auto_created(server), "a scheduled backup after the held one")
        skipped = len(logs(server, "Scheduled backup skipped: another backup/restore process is running"))
        assert "held.zip" in keys(server)
        assert skipped >= 2
    finally:
        gate.unlink(missing_ok=True)
        server.stop()


def test_a_failing_scheduled_backup_is_logged_and_in_the_status(server: ServerProcess) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    s3 = {"enabled": True, "bucket": "b", "region": "us-east-1", "endpoint": unreachable,
          "accessKey": S3Server.ACCESS_KEY, "secret": S3Server.SECRET, "forcePathStyle": True}
    set_backups(server, s3=s3, cron="* * * * *", cronMaxKeep=1)
    failures = wait_for(lambda: logs(server, "Scheduled backup failed"), "a failed scheduled backup")
    assert "cannot reach the S3 endpoint" in failures[0]["error"]
    su = login(server)
    status = httpx.get(server.url + "/api/backups/status", headers=su, timeout=30).json()
    assert status["last"]["ok"] is False and "cannot reach the S3 endpoint" in status["last"]["error"]
    assert status["last"]["key"].startswith("@auto_")
    assert S3Server.SECRET not in json.dumps(status) and S3Server.SECRET not in json.dumps(failures)
    assert httpx.get(server.url + "/api/health", timeout=10).status_code == 200
    set_backups(server, cron="", s3={"enabled": False})


def test_a_scheduled_backup_to_s3(server: ServerProcess, s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    set_backups(server, s3=s3_server.settings(bucket), cron="* * * * *", cronMaxKeep=2)
    wait_for(lambda: len(auto_created(server)) >= 3, "three scheduled backups to S3")
    set_backups(server, cron="")
    wait_idle(server)
    time.sleep(1.5)
    created = auto_created(server)
    assert s3_server.objects(bucket) == sorted(created[-2:])
    assert not (server.data_dir / "backups").exists() or [p for p in (server.data_dir / "backups").iterdir() if p.name != CATALOG] == []


# --- across a restore ----------------------------------------------------------------------------


def test_the_schedule_survives_a_restore(server: ServerProcess) -> None:
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "kept", 1)
    set_backups(server, cron="*/2 * * * *", cronMaxKeep=0)  # in the backup's settings too
    create(server, "with_schedule.zip")
    add_note(api, su, "after", 2)
    pid = server.process.pid
    assert restore(server, "with_schedule.zip")["ok"]
    assert server.process.pid == pid  # re-executed in place
    su = login(server)
    assert [n["title"] for n in notes(api, su).values()] == ["kept"]
    assert {"id": "__pbAutoBackup__", "expression": "*/2 * * * *"} in crons(server)
    before = len(auto_created(server))
    wait_for(lambda: len(auto_created(server)) >= before + 2, "scheduled backups after the restore")
    api.close()
