"""The backup catalog (issue 15, CONTRACT.md "Catalog"): info, pins, prune, retention, stats,
storage health and alerts, against real server processes (and a real PocketBase for its zip)."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, auth, free_port, run_cli, start_pocketbase,
                      terminate, wait_for)

from server.backups.catalog import retained
from server.storage import FileInfo


def wait_idle(api: Api, su: dict[str, str]) -> dict[str, Any]:
    return wait_for(lambda: (s := api.http.get("/api/backups/status", headers=su).json())["active"] is None and s,
                    "the backup job to end")


def create(api: Api, su: dict[str, str], name: str) -> None:
    response = api.http.post("/api/backups", headers=su, json={"name": name})
    assert response.status_code == 204, response.text
    status = wait_idle(api, su)
    assert status["last"]["key"] == name and status["last"]["ok"], status


def keys(api: Api, su: dict[str, str]) -> list[str]:
    return [item["key"] for item in api.http.get("/api/backups", headers=su).json()]


class Receiver:
    """A real HTTP endpoint on loopback that records the JSON events POSTed to it."""

    def __init__(self, fail_first: int = 0, status: int = 200) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail_first, self.status = fail_first, status
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if owner.fail_first > 0:
                    owner.fail_first -= 1
                    self.send_response(503)
                else:
                    owner.events.append(json.loads(body))
                    self.send_response(owner.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook?token=s3cr3t"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def make_collection_with_file(api: Api, su: dict[str, str]) -> None:
    response = api.http.post("/api/collections", headers=su, json={
        "name": "docs", "type": "base", "listRule": "", "viewRule": "",
        "fields": [{"name": "title", "type": "text"}, {"name": "doc", "type": "file", "maxSelect": 1}]})
    assert response.status_code == 200, response.text
    for index in range(3):
        files = {"doc": (f"d{index}.txt", b"document bytes " * 100, "text/plain")} if index == 0 else None
        response = api.http.post("/api/collections/docs/records", headers=su, data={"title": f"t{index}"}, files=files)
        assert response.status_code == 200, response.text


# --- info ------------------------------------------------------------------------------------


def test_info_of_our_backup_tells_what_it_holds(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    make_collection_with_file(api, su)
    create(api, su, "info_ours.zip")
    response = api.http.get("/api/backups/info_ours.zip/info", headers=su)
    assert response.status_code == 200, response.text
    info = response.json()
    me = api.http.post("/api/collections/_superusers/auth-refresh", headers=su).json()["record"]
    assert info["createdBy"] == {"kind": "superuser", "id": me["id"], "email": SUPERUSER_EMAIL}
    assert info["format"] == "manifest" and info["encrypted"] is False and info["pinned"] is False
    assert info["appName"] == "Acme" and info["serverVersion"]
    assert info["collections"]["docs"] == {"records": 3, "files": 1}
    with zipfile.ZipFile(server.data_dir / "backups" / "info_ours.zip") as zipped:
        sizes = {i.filename: i.file_size for i in zipped.infolist()}
    assert info["databases"] == {"data.db": sizes["data.db"], "auxiliary.db": sizes["auxiliary.db"]}
    stored = [size for name, size in sizes.items() if name.startswith("storage/")]
    assert info["files"] == {"count": len(stored), "bytes": sum(stored)} and len(stored) == 1
    assert info["size"] == (server.data_dir / "backups" / "info_ours.zip").stat().st_size
    made = datetime.strptime(info["createdAt"], "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(made - datetime.now(UTC)) < timedelta(minutes=2)


def test_info_refusals(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    assert api.http.get("/api/backups/nope.zip/info", headers=su).status_code == 404
    assert api.http.get("/api/backups/nope.zip/info").status_code == 401
    (server.data_dir / "backups" / "garbage.zip").write_bytes(b"PK\x03\x04 not a zip at all" * 10)
    response = api.http.get("/api/backups/garbage.zip/info", headers=su)
    assert response.status_code == 400 and "not a readable zip" in response.json()["message"]
    assert str(server.data_dir) not in response.text


def test_info_of_a_pocketbase_made_zip_comes_from_its_directory(api: Api, su: dict[str, str],
                                                                tmp_path: Path) -> None:
    url, process = start_pocketbase(tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=30) as pb:
            token = pb.post("/api/collections/_superusers/auth-with-password",
                            json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}).json()["token"]
            assert pb.post("/api/backups", headers=auth(token), json={"name": "pb_made.zip"}).status_code == 204
            wait_for(lambda: any(b["key"] == "pb_made.zip" for b in pb.get("/api/backups", headers=auth(token)).json()),
                     "PocketBase's backup")
            file_token = pb.post("/api/files/token", headers=auth(token)).json()["token"]
            made = pb.get(f"/api/backups/pb_made.zip?token={file_token}").content
    finally:
        terminate(process)
    response = api.http.post("/api/backups/upload", headers=su, files={"file": ("pb_made.zip", made, "application/zip")})
    assert response.status_code == 204, response.text
    info = api.http.get("/api/backups/pb_made.zip/info", headers=su).json()
    assert info["format"] == "plain" and info["collections"] is None and info["appName"] is None
    assert info["createdBy"]["kind"] == "upload" and info["createdBy"]["email"] == SUPERUSER_EMAIL
    assert info["databases"]["data.db"] > 0
    made_at = datetime.strptime(info["createdAt"], "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(made_at - datetime.now(UTC)) < timedelta(minutes=5), info["createdAt"]  # the zip's own UTC time


# --- pins ------------------------------------------------------------------------------------


def test_pins_protect_a_backup_and_survive_a_restart(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    create(api, su, "pin_me.zip")
    assert api.http.post("/api/backups/missing.zip/pin", headers=su).status_code == 404
    assert api.http.post("/api/backups/pin_me.zip/pin").status_code == 401
    assert api.http.post("/api/backups/pin_me.zip/pin", headers=su).status_code == 204
    listed = {item["key"]: item for item in api.http.get("/api/backups", headers=su).json()}
    assert listed["pin_me.zip"]["pinned"] is True
    response = api.http.delete("/api/backups/pin_me.zip", headers=su)
    assert response.status_code == 400 and "unpin it first" in response.json()["message"]
    server.restart()
    assert api.http.get("/api/backups/pin_me.zip/info", headers=su).json()["pinned"] is True
    assert api.http.delete("/api/backups/pin_me.zip/pin", headers=su).status_code == 204
    assert api.http.delete("/api/backups/pin_me.zip", headers=su).status_code == 204
    assert "pin_me.zip" not in keys(api, su)


def test_a_pin_survives_a_full_restore(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = auth(api.superuser_token())
    create(api, su, "base.zip")
    create(api, su, "keeper.zip")
    assert api.http.post("/api/backups/keeper.zip/pin", headers=su).status_code == 204
    assert api.http.post("/api/backups/base.zip/restore", headers=su).status_code == 204
    wait_for(lambda: (r := httpx.get(f"{fresh_server.url}/api/backups/status", headers=su, timeout=5)).status_code == 200
             and (s := r.json())["last"] and s["last"]["op"] == "restore" and s["active"] is None and s,
             "the restore to end", timeout=60)
    su = auth(api.superuser_token())
    assert api.http.get("/api/backups/keeper.zip/info", headers=su).json()["pinned"] is True
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["stats"]["lastSuccess"]["op"] == "restore" and status["stats"]["lastSuccess"]["key"] == "base.zip"
    api.close()


# --- prune -----------------------------------------------------------------------------------


def seed_auto(server: ServerProcess, source: str, stamps: list[str]) -> list[str]:
    """Scheduled-looking backups (copies of ``source``) with the given UTC stamps in their names."""
    names = [f"@auto_pb_backup_acme_{stamp}.zip" for stamp in stamps]
    for name in names:
        shutil.copy(server.data_dir / "backups" / source, server.data_dir / "backups" / name)
    return names


def test_prune_validation(api: Api, su: dict[str, str]) -> None:
    for body, field in (({}, "keep"), ({"keep": -1}, "keep"), ({"keep": "2"}, "keep"), ({"keep": True}, "keep"),
                        ({"keep": 1, "scope": "some"}, "scope"), ({"keep": 1, "dryRun": "yes"}, "dryRun")):
        response = api.http.post("/api/backups/prune", headers=su, json=body)
        assert response.status_code == 400 and field in response.json()["data"], (body, response.text)
    assert api.http.post("/api/backups/prune", json={"keep": 1}).status_code == 401


def test_prune_dry_run_then_real_never_a_pinned_one(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    create(api, su, "prune_src.zip")
    auto = seed_auto(server, "prune_src.zip", ["20260101000000", "20260102000000", "20260103000000", "20260104000000"])
    assert api.http.post(f"/api/backups/{auto[0]}/pin", headers=su).status_code == 204
    before = keys(api, su)
    size = (server.data_dir / "backups" / "prune_src.zip").stat().st_size
    dry = api.http.post("/api/backups/prune", headers=su, json={"keep": 1, "dryRun": True}).json()
    assert dry == {"before": len(before), "after": len(before) - 2, "deleted": [auto[2], auto[1]], "freedBytes": 2 * size}
    assert keys(api, su) == before
    real = api.http.post("/api/backups/prune", headers=su, json={"keep": 1}).json()
    assert real == dry
    left = keys(api, su)
    assert auto[0] in left and auto[3] in left and "prune_src.zip" in left and auto[1] not in left
    everything = api.http.post("/api/backups/prune", headers=su, json={"keep": 0, "scope": "all", "dryRun": True}).json()
    assert auto[0] not in everything["deleted"] and "prune_src.zip" in everything["deleted"]
    assert api.http.delete(f"/api/backups/{auto[0]}/pin", headers=su).status_code == 204


def test_prune_that_fails_halfway_deletes_nothing_it_should_keep(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_FAULTS": "prune-deleted"})  # killed after the first deletion
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    create(api, su, "src.zip")
    auto = seed_auto(server, "src.zip", ["20260101000000", "20260102000000", "20260103000000", "20260104000000"])
    with pytest.raises(httpx.HTTPError):
        api.http.post("/api/backups/prune", headers=su, json={"keep": 2})
    server.process.wait(10)
    left = sorted(p.name for p in (data_dir / "backups").glob("*.zip"))
    assert auto[2] in left and auto[3] in left and "src.zip" in left  # all it should keep
    assert len([k for k in auto[:2] if k not in left]) == 1  # one deletion done before the kill
    server.env = {"PB_FAULTS": "raise:prune-delete"}
    server.start()
    su = auth(api.superuser_token())
    response = api.http.post("/api/backups/prune", headers=su, json={"keep": 0, "scope": "all"})
    assert response.status_code == 400 and "0 deleted before it" in response.json()["message"], response.text
    assert sorted(p.name for p in (data_dir / "backups").glob("*.zip")) == left
    api.close()
    server.stop()


def test_cli_prune_dry_run_prints_the_figures(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    create(api, su, "cli_src.zip")
    seed_auto(server, "cli_src.zip", ["20250101000000", "20250102000000"])
    out = run_cli("backup", "prune", "--keep", "0", "--dry-run", "--json", data_dir=server.data_dir)
    result = json.loads(out.stdout)
    assert "@auto_pb_backup_acme_20250101000000.zip" in result["deleted"] and result["after"] < result["before"]
    assert "@auto_pb_backup_acme_20250101000000.zip" in keys(api, su)
    text = run_cli("backup", "prune", "--keep", "0", "--dry-run", data_dir=server.data_dir)
    assert "Would delete @auto_pb_backup_acme_20250101000000.zip" in text.stdout


# --- retention -------------------------------------------------------------------------------


def test_retention_keeps_restic_generations() -> None:
    moments = [datetime(2026, 11, 30, 23), datetime(2026, 11, 30, 1), datetime(2026, 11, 29, 12),
               datetime(2026, 11, 20), datetime(2026, 10, 15), datetime(2026, 9, 1)]
    backups = [(FileInfo(f"b{i}.zip", 1, m.replace(tzinfo=UTC)), m.replace(tzinfo=UTC)) for i, m in enumerate(moments)]
    assert retained(backups, {"keepLast": 2}) == {"b0.zip", "b1.zip"}
    assert retained(backups, {"keepDaily": 2}) == {"b0.zip", "b2.zip"}  # the newest of each of 2 days
    assert retained(backups, {"keepWeekly": 2}) == {"b0.zip", "b2.zip"}  # 2026-11-29 is a Sunday: week 48
    assert retained(backups, {"keepMonthly": 3}) == {"b0.zip", "b4.zip", "b5.zip"}
    assert retained(backups, {"keepLast": 1, "keepMonthly": 2}) == {"b0.zip", "b4.zip"}
    assert retained(backups, {}) == set()


def test_scheduled_backup_applies_retention_and_settings_are_validated(api: Api, su: dict[str, str],
                                                                       server: ServerProcess) -> None:
    bad = api.http.patch("/api/settings", headers=su, json={"backups": {
        "retention": {"keepDaily": -1, "keepLast": "x"}, "notify": {"webhookURL": "ftp://x", "staleAfterHours": -2}}})
    assert bad.status_code == 400, bad.text
    data = bad.json()["data"]["backups"]
    assert set(data["retention"]) == {"keepDaily", "keepLast"} and set(data["notify"]) == {"webhookURL", "staleAfterHours"}
    create(api, su, "ret_src.zip")
    old = seed_auto(server, "ret_src.zip", ["20240105000000", "20240110000000", "20240201000000", "20240202000000"])
    saved = api.http.patch("/api/settings", headers=su, json={"backups": {
        "cron": "0 3 * * *", "retention": {"keepLast": 1, "keepMonthly": 2}}})
    assert saved.status_code == 200, saved.text
    assert api.http.post(f"/api/backups/{old[0]}/pin", headers=su).status_code == 204
    for key in keys(api, su):  # other tests' scheduled backups: out of the way
        if key.startswith("@auto_") and key not in old:
            (server.data_dir / "backups" / key).unlink()
    assert api.http.post("/api/crons/__pbAutoBackup__", headers=su).status_code == 204
    wait_for(lambda: [k for k in keys(api, su) if k.startswith("@auto_") and k not in old]
             and api.http.get("/api/backups/status", headers=su).json()["active"] is None, "the scheduled backup")
    wait_for(lambda: old[1] not in keys(api, su), "retention after the scheduled backup")
    left = keys(api, su)
    # the new one by keepLast and keepMonthly; 2024-02-02 by keepMonthly; 2024-01-05 by its pin
    assert old[0] in left and old[3] in left and old[1] not in left and old[2] not in left, left
    assert len([k for k in left if k.startswith("@auto_") and k not in old]) == 1
    status = api.http.get("/api/backups/status", headers=su).json()
    assert status["stats"]["nextScheduled"] and status["stats"]["nextScheduled"].endswith("03:00:00.000Z")
    api.http.delete(f"/api/backups/{old[0]}/pin", headers=su)
    api.http.patch("/api/settings", headers=su, json={"backups": {"cron": "", "retention": {"keepLast": 0, "keepMonthly": 0}}})


# --- stats and storage health ----------------------------------------------------------------


def test_status_stats_and_storage(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    create(api, su, "stats.zip")
    status = api.http.get("/api/backups/status", headers=su).json()
    files = [p for p in (server.data_dir / "backups").iterdir() if p.suffix == ".zip"]
    stats = status["stats"]
    assert stats["count"] == len(files) and stats["totalSize"] == sum(p.stat().st_size for p in files)
    assert stats["lastSuccess"]["op"] == "create" and stats["lastSuccess"]["key"] == "stats.zip"
    assert stats["newest"]["key"] and stats["oldest"]["key"] and stats["stale"] is False
    assert status["storage"]["writable"] is True and status["storage"]["freeBytes"] > 0


def test_storage_that_cannot_be_written_shows_in_status(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    su = auth(api.superuser_token())
    backups = fresh_server.data_dir / "backups"
    shutil.rmtree(backups, ignore_errors=True)
    backups.write_bytes(b"a file where the directory should be")
    try:
        status = api.http.get("/api/backups/status", headers=su).json()
        assert status["storage"]["writable"] is False and status["statsError"] and status["stats"] is None
        assert str(fresh_server.data_dir) not in json.dumps(status)
    finally:
        backups.unlink()
        api.close()


# --- alerts ----------------------------------------------------------------------------------


def test_notify_test_route(api: Api, su: dict[str, str], receiver: Receiver) -> None:
    response = api.http.post("/api/backups/notify/test", headers=su)
    assert response.status_code == 400 and "no webhook URL" in response.json()["message"]
    assert api.http.patch("/api/settings", headers=su, json={"backups": {"notify": {"webhookURL": receiver.url}}}).status_code == 200
    assert api.http.post("/api/backups/notify/test", headers=su).status_code == 204
    assert receiver.events[-1]["event"] == "test" and receiver.events[-1]["app"] == "Acme"
    receiver.status = 500
    response = api.http.post("/api/backups/notify/test", headers=su)
    assert response.status_code == 400 and "answered 500" in response.json()["message"]
    assert "s3cr3t" not in response.text
    closed = f"http://127.0.0.1:{free_port()}/hook"
    api.http.patch("/api/settings", headers=su, json={"backups": {"notify": {"webhookURL": closed}}})
    response = api.http.post("/api/backups/notify/test", headers=su)
    assert response.status_code == 400 and "could not be reached" in response.json()["message"]
    api.http.patch("/api/settings", headers=su, json={"backups": {"notify": {"webhookURL": ""}}})


def test_failed_backup_alerts_with_retries(tmp_path: Path) -> None:
    hook = Receiver(fail_first=2)  # the first two deliveries fail: retried with backoff
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_NOTIFY_RETRY_SECONDS": "0.1"})
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    try:
        api.http.patch("/api/settings", headers=su, json={"backups": {"notify": {"webhookURL": hook.url}}})
        # A backup that fails: its storage directory cannot be created.
        backups = data_dir / "backups"
        shutil.rmtree(backups, ignore_errors=True)
        backups.write_bytes(b"not a directory")
        assert api.http.post("/api/backups", headers=su, json={"name": "fails.zip"}).status_code in (204, 400)
        event = wait_for(lambda: hook.events and hook.events[0], "the failure event", timeout=20)
        assert event["event"] == "failure" and event["op"] == "create" and event["key"] == "fails.zip"
        assert event["error"] and event["app"] == "Acme" and set(event) >= {"time"}
        assert str(data_dir) not in json.dumps(event) and "s3cr3t" not in json.dumps(event)
    finally:
        hook.close()
        api.close()
        server.stop()


def test_stale_backups_alert_once_and_show_in_health(tmp_path: Path) -> None:
    hook = Receiver()
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    (data_dir / "backups").mkdir(parents=True, exist_ok=True)
    long_ago = (datetime.now(UTC) - timedelta(hours=30)).strftime("%Y-%m-%d %H:%M:%S.000Z")
    (data_dir / "backups" / ".pb_catalog.json").write_text(json.dumps(
        {"format": 1, "backups": {}, "lastBackup": {"key": "old.zip", "finishedAt": long_ago}}))
    server = ServerProcess(data_dir, env={"PB_STALE_CHECK_SECONDS": "0.3"})
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    try:
        health = api.http.get("/api/health", headers=su).json()["data"]
        assert health["backupStale"] is False  # staleAfterHours is 0: off
        api.http.patch("/api/settings", headers=su, json={"backups": {"notify": {"webhookURL": hook.url,
                                                                                  "staleAfterHours": 24}}})
        wait_for(lambda: api.http.get("/api/health", headers=su).json()["data"]["backupStale"], "backupStale")
        wait_for(lambda: hook.events, "the stale event")
        time.sleep(1.5)  # several more checks: still one event
        assert [e["event"] for e in hook.events] == ["stale"], hook.events
        assert hook.events[0]["lastBackup"]["key"] == "old.zip" and hook.events[0]["staleAfterHours"] == 24
        assert "backupStale" not in api.http.get("/api/health").json()["data"]
        create(api, su, "fresh.zip")
        assert api.http.get("/api/health", headers=su).json()["data"]["backupStale"] is False
        assert api.http.get("/api/backups/status", headers=su).json()["stats"]["stale"] is False
    finally:
        hook.close()
        api.close()
        server.stop()


# --- on S3 (rclone serve s3) -----------------------------------------------------------------


def test_catalog_on_s3(api: Api, su: dict[str, str], server: ServerProcess, s3_server: Any) -> None:
    bucket = s3_server.bucket()
    saved = api.http.patch("/api/settings", headers=su, json={"backups": {"s3": s3_server.settings(bucket)}})
    assert saved.status_code == 200, saved.text
    try:
        create(api, su, "on_s3.zip")
        create(api, su, "on_s3_b.zip")
        info = api.http.get("/api/backups/on_s3.zip/info", headers=su).json()
        assert info["format"] == "manifest" and info["createdBy"]["kind"] == "superuser"
        assert info["databases"]["data.db"] > 0 and info["collections"]["_superusers"]["records"] >= 1
        assert api.http.post("/api/backups/on_s3.zip/pin", headers=su).status_code == 204
        assert s3_server.client().head_object(Bucket=bucket, Key=".pb_catalog.json")["ContentLength"] > 0
        listed = {item["key"]: item for item in api.http.get("/api/backups", headers=su).json()}
        assert set(listed) == {"on_s3.zip", "on_s3_b.zip"} and listed["on_s3.zip"]["pinned"] is True
        assert api.http.delete("/api/backups/on_s3.zip", headers=su).status_code == 400
        pruned = api.http.post("/api/backups/prune", headers=su, json={"keep": 0, "scope": "all"}).json()
        assert pruned["deleted"] == ["on_s3_b.zip"] and pruned["after"] == 1
        status = api.http.get("/api/backups/status", headers=su).json()
        assert status["storage"]["kind"] == "s3" and status["storage"]["writable"] is True
        assert "freeBytes" not in status["storage"] and status["stats"]["count"] == 1
        assert s3_server.SECRET not in json.dumps(status)
        assert api.http.delete("/api/backups/on_s3.zip/pin", headers=su).status_code == 204
    finally:
        api.http.patch("/api/settings", headers=su, json={"backups": {"s3": {"enabled": False}}})


def test_info_on_s3_takes_a_few_ranged_gets(tmp_path: Path, s3_server: Any) -> None:
    """The storage's ranged reader against the real S3 server: the directory and the manifest of a
    backup with many entries come in a few requests, not the whole object."""
    from server.backups import catalog
    from server.storage.s3 import S3Config, S3Storage

    bucket = s3_server.bucket()
    archive_path = tmp_path / "many.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("data.db", b"\0" * (3 << 20))
        for index in range(2000):
            zipped.writestr(f"storage/c1/r{index}/f.txt", b"x" * 900)
        zipped.writestr("pb_backup_manifest.json", json.dumps({"format": 1, "app": "Big", "files": {}}))
    s3_server.client().upload_file(str(archive_path), bucket, "many.zip")
    storage = S3Storage(S3Config.from_settings(s3_server.settings(bucket)), tmp_path)
    with storage.open_ranged("many.zip") as handle:
        facts = catalog.describe_archive(handle)
        requests = handle.raw.requests
    assert facts["format"] == "manifest" and facts["appName"] == "Big"
    assert facts["files"] == {"count": 2000, "bytes": 2000 * 900} and facts["databases"] == {"data.db": 3 << 20}
    assert requests <= 3, requests


def test_a_skipped_scheduled_run_alerts_and_prune_waits_for_the_job(tmp_path: Path) -> None:
    hook = Receiver()
    data_dir = tmp_path / "pb_data"
    gate = tmp_path / "gate"
    gate.write_text("0")  # the first backup write holds until the file goes
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    server.start()
    api = Api(server)
    su = auth(api.superuser_token())
    try:
        api.http.patch("/api/settings", headers=su, json={"backups": {"cron": "0 3 * * *",
                                                                       "notify": {"webhookURL": hook.url}}})
        assert api.http.post("/api/backups", headers=su, json={"name": "held.zip"}).status_code == 204
        wait_for(lambda: api.http.get("/api/backups/status", headers=su).json()["active"], "the held backup")
        response = api.http.post("/api/backups/prune", headers=su, json={"keep": 0, "scope": "all"})
        assert response.status_code == 400 and "Try again later" in response.json()["message"]  # the job lock
        assert api.http.post("/api/crons/__pbAutoBackup__", headers=su).status_code == 204
        event = wait_for(lambda: hook.events and hook.events[0], "the skipped event")
        assert event["event"] == "skipped" and event["op"] == "create" and "another backup" in event["error"]
    finally:
        gate.unlink(missing_ok=True)
        hook.close()
        api.close()
        server.stop()
