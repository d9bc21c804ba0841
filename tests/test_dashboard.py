"""The dashboard at /_/ in a real browser: Debian's headless Chromium driven by playwright-core
(tests/e2e/dashboard.mjs), against one real server process with real data for the module.

The browser acts as a person would (labels, buttons, the keyboard); each test then checks the
server's side over HTTP. The scenarios run in file order on one page (they share the sign-in)."""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, S3Server, ServerProcess, auth, run_cli, wait_for

E2E = Path(__file__).resolve().parent / "e2e"
CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<img src=x onerror="window.__xss=1"><b class="hostile">bold</b>'
CREDENTIALS = {"email": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}


class Browser:
    """The Node driver: one JSON command a line in, one answer a line out."""

    def __init__(self, url: str, log: Path) -> None:
        assert shutil.which("node"), "node is needed for the dashboard tests (make install-test)"
        assert Path(CHROMIUM).exists(), "Debian's chromium is needed for the dashboard tests (make install-test installs it)"
        self.log = log
        self.process = subprocess.Popen(["node", "dashboard.mjs", url], cwd=E2E, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=open(log, "w"), env={**os.environ})
        self.answers: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.answers.put(line)
        self.answers.put("")

    def run(self, scenario: str, timeout: float = 180, **args: Any) -> dict[str, Any]:
        self.next_id += 1
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": self.next_id, "scenario": scenario, "args": args}) + "\n")
        self.process.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{scenario}: no answer within {timeout} s\n{self.log.read_text()}") from None
        assert line, f"the browser driver exited:\n{self.log.read_text()}"
        answer = json.loads(line)
        assert answer["id"] == self.next_id
        assert answer["ok"], f"{scenario} failed in the browser:\n{answer['error']}"
        return answer["result"]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Env:
    def __init__(self, tmp: Path, server: ServerProcess, browser: Browser, gate: Path) -> None:
        self.tmp = tmp
        self.server = server
        self.browser = browser
        self.gate = gate
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.su: dict[str, str] = {}
        self.login()

    def login(self) -> None:
        response = self.http.post("/api/collections/_superusers/auth-with-password",
                                  json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
        assert response.status_code == 200, response.text
        self.su = auth(response.json()["token"])

    def status(self) -> dict[str, Any]:
        return self.http.get("/api/backups/status", headers=self.su).json()

    def keys(self) -> list[str]:
        return [b["key"] for b in self.http.get("/api/backups", headers=self.su).json()]

    def backup(self, name: str) -> None:
        """A backup made over the API, waited for."""
        assert self.http.post("/api/backups", headers=self.su, json={"name": name}).status_code == 204
        wait_for(lambda: (s := self.status())["active"] is None and s["last"] and s["last"]["key"] == name, f"backup {name}")
        assert self.status()["last"]["ok"], self.status()

    def titles(self) -> list[str]:
        response = self.http.get("/api/collections/notes/records?perPage=100", headers=self.su)
        assert response.status_code == 200, response.text
        return sorted(r["title"] for r in response.json()["items"])

    def add_note(self, title: str) -> dict[str, Any]:
        response = self.http.post("/api/collections/notes/records", headers=self.su, json={"title": title})
        assert response.status_code == 200, response.text
        return response.json()


def _sqlite_file(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("dashboard")
    gate = tmp / "gate"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=tmp / "pb_data")
    server = ServerProcess(tmp / "pb_data", env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    server.start()
    filler = server.data_dir / "storage" / "filler" / "record"
    filler.mkdir(parents=True)
    (filler / "blob.bin").write_bytes(os.urandom(2 << 20))
    browser = Browser(server.url, tmp / "browser.log")
    try:
        e = Env(tmp, server, browser, gate)
        response = e.http.post("/api/collections", headers=e.su, json={
            "name": "notes", "type": "base", "listRule": None,
            "fields": [{"name": "title", "type": "text"}, {"name": "created", "type": "autodate", "onCreate": True}]})
        assert response.status_code == 200, response.text
        e.add_note("first")
        e.add_note(HOSTILE)
        yield e
        e.http.close()
    finally:
        gate.unlink(missing_ok=True)
        browser.close()
        server.stop()


def test_page_and_headers(env: Env) -> None:
    response = env.http.get("/_/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "<script" in response.text and not re.search(r"<script(?![^>]*\ssrc=)", response.text), "no inline script"
    assert not re.search(r"(src|href)=\"(https?:)?//", response.text), "nothing from another host"
    assert env.http.get("/_/app.js").headers["content-type"].startswith("text/javascript")
    assert env.http.get("/_").headers["location"] == "/_/"
    assert env.http.get("/_/missing.js").status_code == 404


def test_sign_in_refresh_sign_out_and_expiry(env: Env) -> None:
    out = env.browser.run("signin", **CREDENTIALS)
    assert "frame-ancestors 'none'" in out["csp"]
    assert out["wrongPassword"] == "Failed to authenticate."
    assert out["who"] == SUPERUSER_EMAIL
    assert re.fullmatch(r"session expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in \d+ (d|h|min)\)", out["expiry"]), out["expiry"]
    assert out["stored"]["record"]["email"] == SUPERUSER_EMAIL  # the SDK's LocalAuthStore shape
    assert env.http.get("/api/backups", headers=auth(out["stored"]["token"])).status_code == 200
    assert out["refreshStatus"] == 200
    assert out["storedAfterSignOut"] is None
    assert out["expired"] == "Your session has expired. Sign in again."
    assert out["forged"].startswith("Your session is no longer valid (The request requires valid record authorization token.)")


def test_create_with_validation_and_live_progress(env: Env) -> None:
    env.backup("existing.zip")
    out = env.browser.run("create", gate=str(env.gate), name="made_in_browser.zip", existing="existing.zip")
    assert out["invalid"].startswith("The name must be 1 to 150 characters")
    assert "validation_backup_name_exists" not in out["exists"] and "name:" in out["exists"], out["exists"]
    held = out["held"]
    assert 0 < held["value"] < held["max"], held  # held by the gate after its first entry: part done
    assert "Creating made_in_browser.zip" in held["text"] and "%" in held["text"]
    assert re.search(r"made_in_browser\.zip succeeded at \d{4}-\d\d-\d\d", out["last"]), out["last"]
    assert out["idle"] == "No job running."
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out["row"]["date"]), out["row"]
    assert re.fullmatch(r"[\d.]+ (KB|MB)", out["row"]["size"]), out["row"]
    assert out["order"][0] == "made_in_browser.zip" and set(out["order"]) == set(env.keys())  # newest first
    assert "made_in_browser.zip" in env.keys()


def test_upload_with_progress(env: Env) -> None:
    source = env.tmp / "uploaded_backup.zip"
    data_db = env.tmp / "upload.db"
    _sqlite_file(data_db)
    with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as archive:
        archive.write(data_db, "data.db")
        archive.writestr("storage/big/file.bin", os.urandom(4 << 20))
    bad = env.tmp / "Bad Name.zip"
    shutil.copy(source, bad)
    out = env.browser.run("upload", file=str(source), badFile=str(bad))
    assert out["badName"].startswith("The file's name must be")
    assert out["done"] == "Uploaded uploaded_backup.zip."
    fractions = [value / total for value, total in out["seen"] if total > 1]
    assert any(0 < f < 1 for f in fractions), out["seen"]  # the bar moved through the upload
    assert "uploaded_backup.zip" in env.keys()
    assert out["creator"] == f"upload ({SUPERUSER_EMAIL})"  # the catalog's createdBy
    assert (env.server.data_dir / "backups" / "uploaded_backup.zip").read_bytes() == source.read_bytes()


def test_download_by_file_token_and_delete_confirmed(env: Env) -> None:
    saved = env.tmp / "downloaded.zip"
    out = env.browser.run("download", key="uploaded_backup.zip", saveTo=str(saved))
    assert out["filename"] == "uploaded_backup.zip"
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(
        (env.server.data_dir / "backups" / "uploaded_backup.zip").read_bytes()).digest()
    token = re.search(r"[?&]token=([^&]+)", out["url"]).group(1)
    assert token != out["token"]  # a file token in the link, never the auth token
    out = env.browser.run("delete", key="uploaded_backup.zip")
    assert out["dialog"] == "Delete uploaded_backup.zip? This cannot be undone."
    assert out["keptAfterCancel"] == 1
    assert "uploaded_backup.zip" not in env.keys()


def test_catalog_stats_creators_pins_details_and_prune(env: Env) -> None:
    before = env.keys()
    assert "existing.zip" in before and "made_in_browser.zip" in before
    out = env.browser.run("catalog", pin="existing.zip", keep=1, scope="all")
    stats = out["stats"]
    assert stats["Backups"] == str(len(before)) and stats["Writable"] == "yes", stats
    assert re.fullmatch(r"[\d.]+ (KB|MB|GB|TB)", stats["Free space"]), stats
    assert re.match(r"create made_in_browser\.zip — \d{4}-\d\d-\d\d", stats["Last success"]), stats
    assert re.match(r"made_in_browser\.zip — \d{4}-\d\d-\d\d", stats["Newest"]), stats
    assert stats["Next scheduled"] == "none", stats
    assert out["creators"]["made_in_browser.zip"] == f"manual ({SUPERUSER_EMAIL})", out["creators"]
    assert out["deletePinned"].startswith("Cannot delete a pinned backup") or "unpin" in out["deletePinned"].lower(), out
    assert out["details"]["Pinned"] == "yes" and out["details"]["Made by"] == f"manual ({SUPERUSER_EMAIL})", out["details"]
    assert out["details"]["Format"].startswith("with manifest") and "data.db" in out["details"], out["details"]
    # keep 1 of all: the newest stays, and the pinned one is never a candidate.
    assert sorted(out["planned"]) == sorted(set(before) - {"existing.zip", "made_in_browser.zip"}), out
    after = env.keys()
    assert sorted(after) == ["existing.zip", "made_in_browser.zip"], after
    assert out["statsAfter"]["Backups"] == "2", out["statsAfter"]
    info = env.http.get("/api/backups/existing.zip/info", headers=env.su).json()
    assert info["pinned"] is False


def test_retention_and_alert_settings_with_a_webhook_test(env: Env) -> None:
    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            received.append(self.rfile.read(int(self.headers.get("content-length") or 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        out = env.browser.run("alerts", webhook=f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    finally:
        receiver.shutdown()
    assert out["keepDaily"].startswith("Must be between 0 and"), out
    assert out["webhookURL"] == "Must be a valid http(s) URL.", out
    assert out["noWebhook"] and out["noWebhook"] != "Test alert delivered.", out
    assert out["sent"] == "Test alert delivered.", out
    assert len(received) == 1 and b"test" in received[0]
    settings = env.http.get("/api/settings", headers=env.su).json()["backups"]
    assert settings["retention"]["keepDaily"] == 7 and settings["notify"]["webhookURL"] == ""


def test_settings_forms_and_s3_test(env: Env, s3_server: S3Server) -> None:
    s3 = s3_server.settings(s3_server.bucket())
    out = env.browser.run("settings", s3=s3, wrongSecret="not-the-secret-at-all")
    assert out["cron"].startswith("Invalid cron expression"), out
    assert out["presetCron"] == "0 0 * * *"
    assert out["maxKeep"] == "Must be no less than 0."
    assert out["cronErrorCleared"] == ""
    assert out["bucket"] == "Cannot be blank." and out["endpoint"] == "Cannot be blank."
    assert out["saved"] == "Saved."
    assert out["s3Failed"].startswith("Failed to test the S3 filesystem."), out["s3Failed"]
    assert out["s3Ok"] == "Connection OK."
    assert out["secretShown"] == ""  # write-only: never shown again
    assert out["replSync"].startswith("Must be between 0 and"), out
    assert out["replPath"] == "Must be an absolute path.", out
    settings = env.http.get("/api/settings", headers=env.su).json()["backups"]
    assert settings["replication"]["syncInterval"] == 500 and settings["replication"]["enabled"] is False
    assert settings["cron"] == "0 0 * * *" and settings["cronMaxKeep"] == 4
    assert settings["s3"]["enabled"] is False and settings["s3"]["bucket"] == s3["bucket"]
    assert env.status()["storage"]["kind"] == "local"
    # Not left scheduled for the rest of the module.
    assert env.http.patch("/api/settings", headers=env.su, json={"backups": {"cron": ""}}).status_code == 200


def test_encryption_recipients_and_an_encrypted_preview_with_the_identity(env: Env) -> None:
    key_file = env.tmp / "dashboard-age.txt"
    subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
    secret = next(line for line in key_file.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    public = subprocess.run(["age-keygen", "-y", str(key_file)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        out = env.browser.run("encryption", recipient=public)
        assert out["invalid"] == "Recipient 1 is not an age public key (age1..., as age-keygen prints).", out
        assert out["saved"] == "Saved." and out["shown"] == public, out  # trimmed, one per line
        assert env.http.get("/api/settings", headers=env.su).json()["backups"]["encryption"]["recipients"] == [public]
        env.backup("encrypted_source.zip")
        assert (env.server.data_dir / "backups" / "encrypted_source.zip").read_bytes().startswith(b"age-encryption.org/v1")
        env.add_note("added after the encrypted backup")
        out = env.browser.run("encryptedPreview", key="encrypted_source.zip", collection="notes", identity=secret)
        assert out["badge"] == "encrypted", out
        assert "this backup is encrypted: an identity is required" in out["withoutIdentity"], out
        assert out["result"].startswith("Dry run finished"), out
        assert secret not in out["stored"], "the identity must stay in the page's memory"
        assert "added after the encrypted backup" in env.titles()  # a dry run changed nothing
    finally:
        assert env.http.patch("/api/settings", headers=env.su,
                              json={"backups": {"encryption": {"recipients": []}}}).status_code == 200


def test_partial_restore_with_preview(env: Env) -> None:
    env.backup("partial_source.zip")
    changed = env.add_note("added after the backup")
    first = next(r for r in env.http.get("/api/collections/notes/records", headers=env.su).json()["items"]
                 if r["title"] == "first")
    assert env.http.patch(f"/api/collections/notes/records/{first['id']}", headers=env.su,
                          json={"title": "first, edited"}).status_code == 200
    env.http.delete(f"/api/collections/notes/records/{changed['id']}", headers=env.su)
    before = env.titles()
    out = env.browser.run("partial", key="partial_source.zip", collection="notes")
    assert out["preview"]["caption"] == "Dry run: what the restore would change"
    [row] = out["preview"]["rows"]
    assert row[0] == "notes" and row[1:4] == ["0", "1", "0"], row  # "first" edited since: updated back
    assert out["previewResult"].startswith("Dry run finished: nothing was changed.")
    assert out["result"].startswith("Restored the collections from partial_source.zip.")
    assert out["done"]["caption"] == "What the restore changed"
    assert out["done"]["rows"] == out["preview"]["rows"]  # the preview said what the restore did
    after = env.titles()
    assert before != after and "first" in after and "first, edited" not in after


def test_full_restore_through_the_restart(env: Env) -> None:
    env.backup("full_source.zip")
    env.add_note("made after the full backup")
    out = env.browser.run("restore", key="full_source.zip")
    assert out["disabledWhenWrong"] is True
    assert out["error"] == ""
    assert out["result"].startswith("Restored full_source.zip."), out
    assert "restore full_source.zip succeeded" in out["last"]
    env.login()
    assert "made after the full backup" not in env.titles()
    last = env.status()["last"]
    assert last["op"] == "restore" and last["key"] == "full_source.zip" and last["ok"] is True


def test_failed_restore_shows_the_reason(env: Env) -> None:
    broken = env.tmp / "broken.zip"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("data.db", os.urandom(8192))  # accepted as an upload; not a database
    with open(broken, "rb") as handle:
        assert env.http.post("/api/backups/upload", headers=env.su, files={"file": ("broken.zip", handle)}).status_code == 204
    titles = env.titles()
    out = env.browser.run("failedRestore", key="broken.zip")
    assert out["result"] == ""
    assert out["error"] == "Restore failed: data.db is not a valid SQLite database", out
    assert "restore broken.zip failed" in out["last"]
    assert env.titles() == titles


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def test_point_in_time_restore(env: Env) -> None:
    def replication() -> dict[str, Any]:
        response = env.http.get("/api/backups/replication", headers=env.su)
        assert response.status_code == 200, response.text
        return response.json()

    def synced() -> dict[str, Any]:
        since = _stamp(time.time())
        return wait_for(lambda: (r := replication())["lastError"] is None and (r["window"]["to"] or "") >= since and r,
                        "the replica to catch up", timeout=30)

    response = env.http.patch("/api/settings", headers=env.su, json={"backups": {"replication": {
        "enabled": True, "path": str(env.tmp / "replica"), "syncInterval": 200}}})
    assert response.status_code == 200, response.text
    try:
        synced()  # the first snapshot: the window begins
        for n in range(1, 6):
            env.add_note(f"moment {n}")
        expected = env.titles()
        # The picker holds whole seconds: the moment is the first whole second after these writes,
        # the next ones come after it.
        written = time.time()
        moment = math.ceil(written + 0.05)
        time.sleep(moment + 0.3 - time.time())
        for n in range(6, 11):
            env.add_note(f"moment {n}")
        window = synced()["window"]
        out = env.browser.run("moment", at=moment * 1000, collection="notes",
                              before=(datetime.fromisoformat(window["from"].replace("Z", "+00:00")).timestamp() - 3600) * 1000,
                              after=(time.time() + 3600) * 1000)
        panel = out["panel"]
        assert panel["Enabled"] == "yes" and panel["Last error"] == "none", panel
        assert re.fullmatch(r"\d+ ms|[\d.]+ s", panel["Lag"]), panel
        assert re.fullmatch(r"[\d.]+ (B|KB|MB)", panel["Shipped"]), panel
        span = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        assert re.fullmatch(rf"{span} → {span} \(UTC[+−]\d\d:\d\d\)", panel["Restorable window"]), panel
        assert out["title"] == "Restore a moment" and out["focused"] == "restore-at"
        assert out["identityShown"] is False  # the backups are not encrypted here
        start = datetime.fromisoformat(window["from"].replace("Z", "+00:00")).timestamp()
        assert out["limits"]["min"] == math.ceil(start) * 1000, (out["limits"], window)
        assert out["limits"]["max"] >= moment * 1000 >= out["limits"]["min"], (out["limits"], moment)
        too_early, too_late = out["refused"]
        for refused in (too_early, too_late):
            assert " is outside the restorable window: choose a moment from " in refused, refused
        assert out["postedForRefused"] == 0  # refused in the page, no job started
        assert out["utc"] == f"That is {_stamp(moment)[:19]} UTC.", out["utc"]
        assert out["preview"]["caption"] == "Dry run: what the restore would change"
        [row] = out["preview"]["rows"]
        assert row[0] == "notes" and row[1:4] == ["0", "0", "5"], row  # the five written after the moment
        assert out["previewResult"].startswith("Dry run finished: nothing was changed."), out
        assert out["disabledWhenWrong"] is True
        assert out["error"] == "" and out["result"].startswith(
            f"Restored the collections as they were at {out['confirmWord']}."), out
        assert out["done"]["rows"] == out["preview"]["rows"]
        assert env.titles() == expected  # notes as they were at that moment
        last = env.status()["last"]
        assert last["ok"] and last["key"] == f"replica@{_stamp(moment)}", last
    finally:
        assert env.http.patch("/api/settings", headers=env.su,
                              json={"backups": {"replication": {"enabled": False}}}).status_code == 200
        # The notes as they were before this test (the hostile one among the newest, for the next).
        items = env.http.get("/api/collections/notes/records?perPage=100", headers=env.su).json()["items"]
        for record in items:
            if record["title"].startswith("moment "):
                env.http.delete(f"/api/collections/notes/records/{record['id']}", headers=env.su)


def test_hostile_strings_are_text(env: Env) -> None:
    assert env.http.patch("/api/settings", headers=env.su, json={"meta": {"appName": HOSTILE}}).status_code == 200
    hostile_zip = env.tmp / "hostile.zip"
    data_db = env.tmp / "hostile.db"
    _sqlite_file(data_db)
    with zipfile.ZipFile(hostile_zip, "w") as archive:
        archive.write(data_db, "data.db")
        archive.writestr("../" + HOSTILE, "x")
    out = env.browser.run("xss", collection="notes", hostileZip=str(hostile_zip))
    assert out["title"] == f"{HOSTILE} · dashboard"
    assert HOSTILE in out["records"]
    assert HOSTILE in out["uploadError"], out["uploadError"]
    assert out["injected"] == {"flag": None, "images": 0, "bold": 0}
    assert env.http.patch("/api/settings", headers=env.su, json={"meta": {"appName": "Acme"}}).status_code == 200


def test_no_other_host_no_token_in_urls_no_page_errors(env: Env) -> None:
    out = env.browser.run("report")
    assert out["problems"] == []
    assert out["requests"] and all(url.startswith(env.server.url + "/") for url in out["requests"]), \
        [u for u in out["requests"] if not u.startswith(env.server.url)]
    assert len(out["tokens"]) >= 3 and not [url for url in out["requests"] if any(t in url for t in out["tokens"])]
    with_token = [url for url in out["requests"] if "token=" in url]
    assert with_token and all(re.match(re.escape(env.server.url) + r"/api/backups/[^/?]+\?token=", url) for url in with_token)
