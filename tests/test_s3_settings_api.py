"""S3 backup storage through HTTP: ``POST /api/settings/test/s3`` (compared with PocketBase 0.40.6),
switching backups between the disk and a bucket without a restart, S3 failures answered as 400s
that say why (never a 500, never a hang), and the S3 secret never leaving the server."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (CATALOG, 
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    Api,
    S3Server,
    ServerProcess,
    auth,
    free_port,
    run_cli,
    unique,
)
from test_backup_restore import login, wait_idle

TEST_S3 = "/api/settings/test/s3"
TEST_FAILED = "Failed to test the S3 filesystem."
RAW_ERROR = TEST_FAILED + " Raw error: \n"
NOT_ENABLED = "S3 storage filesystem is not enabled."
WRONG_SECRET = "wrong-secret-" + os.urandom(8).hex()
SECRETS = (S3Server.SECRET, WRONG_SECRET)
FORBIDDEN = "The authorized record is not allowed to perform this action."
UNAUTHORIZED = "The request requires valid record authorization token."


# --- helpers -------------------------------------------------------------------------------


def no_secret(response: httpx.Response) -> httpx.Response:
    """``response``, once checked to carry no S3 secret in its body or headers."""
    seen = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in SECRETS:
        assert secret not in seen, f"the S3 secret leaked into {response.request.method} {response.request.url}"
    return response


def new_bucket(s3: S3Server) -> str:
    return s3.bucket()


def unreachable_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    no_secret(response)
    assert response.status_code == status, f"{response.status_code} {response.text}"
    body = response.json()
    assert body["status"] == status
    return body


def set_s3(http: httpx.Client, headers: dict[str, str], s3: dict[str, Any]) -> dict[str, Any]:
    response = no_secret(http.patch("/api/settings", headers=headers, json={"backups": {"s3": s3}}))
    assert response.status_code == 200, response.text
    assert "secret" not in response.json()["backups"]["s3"]
    return response.json()


def probe(http: httpx.Client, headers: dict[str, str], body: Any = None) -> httpx.Response:
    return no_secret(http.post(TEST_S3, headers=headers, json={"filesystem": "backups"} if body is None else body))



def listed(server: ServerProcess, headers: dict[str, str]) -> list[str]:
    response = no_secret(httpx.get(server.url + "/api/backups", headers=headers, timeout=30))
    assert response.status_code == 200, response.text
    return sorted(item["key"] for item in response.json())


def create_backup(server: ServerProcess, headers: dict[str, str], name: str) -> dict[str, Any]:
    response = no_secret(httpx.post(server.url + "/api/backups", headers=headers, json={"name": name}, timeout=30))
    assert response.status_code == 204, response.text
    last = wait_idle(server, timeout=30)
    assert last is not None and last["key"] == name, last
    return last


def backup_status(server: ServerProcess, headers: dict[str, str]) -> dict[str, Any]:
    response = no_secret(httpx.get(server.url + "/api/backups/status", headers=headers, timeout=30))
    assert response.status_code == 200, response.text
    return response.json()


def local_backups(server: ServerProcess) -> list[str]:
    folder = server.data_dir / "backups"
    return sorted(p.name for p in folder.iterdir() if p.name != CATALOG) if folder.exists() else []


@pytest.fixture(scope="module")
def user_token(api: Api) -> str:
    return api.create_user(unique("s3user") + "@example.com")[1]


@pytest.fixture()
def s3_off(api: Api, su: dict[str, str]) -> Iterator[None]:
    """The shared server's S3 backups are switched off again after the test."""
    yield
    set_s3(api.http, su, {"enabled": False})


# --- 1. POST /api/settings/test/s3 -----------------------------------------------------------


def test_test_s3_needs_a_superuser(api: Api, user_token: str) -> None:
    assert error_of(api.http.post(TEST_S3, json={"filesystem": "backups"}), 401)["message"] == UNAUTHORIZED
    assert error_of(probe(api.http, auth("not-a-token")), 401)["message"] == UNAUTHORIZED
    assert error_of(probe(api.http, auth(user_token)), 403)["message"] == FORBIDDEN


@pytest.mark.parametrize(("body", "code"), [
    ({}, "validation_required"),
    ({"filesystem": ""}, "validation_required"),
    ({"filesystem": "nope"}, "validation_in_invalid"),
])
def test_test_s3_validates_the_filesystem(api: Api, su: dict[str, str], body: dict[str, Any], code: str) -> None:
    error = error_of(probe(api.http, su, body), 400)
    assert error["message"] == TEST_FAILED
    assert set(error["data"]) == {"filesystem"}
    assert error["data"]["filesystem"]["code"] == code


def test_test_s3_storage_filesystem_is_never_enabled(api: Api, su: dict[str, str]) -> None:
    error = error_of(probe(api.http, su, {"filesystem": "storage"}), 400)
    assert error["message"] == RAW_ERROR + NOT_ENABLED
    assert error["data"] == {}


def test_test_s3_backups_while_s3_is_disabled(api: Api, su: dict[str, str], s3_server: S3Server) -> None:
    # Complete, valid settings that are switched off are not tested.
    set_s3(api.http, su, s3_server.settings(new_bucket(s3_server), enabled=False))
    error = error_of(probe(api.http, su), 400)
    assert error["message"] == RAW_ERROR + NOT_ENABLED
    assert error["data"] == {}


def test_test_s3_against_rclone(api: Api, su: dict[str, str], s3_server: S3Server, s3_off: None) -> None:
    bucket = new_bucket(s3_server)
    set_s3(api.http, su, s3_server.settings(bucket))
    for _ in range(2):  # the probe object is removed each time, so it can run again
        response = probe(api.http, su)
        assert response.status_code == 204, response.text
        assert response.content == b""
        assert s3_server.objects(bucket) == []


def test_test_s3_wrong_secret(api: Api, su: dict[str, str], s3_server: S3Server, s3_off: None) -> None:
    bucket = new_bucket(s3_server)
    set_s3(api.http, su, s3_server.settings(bucket, secret=WRONG_SECRET))
    message = error_of(probe(api.http, su), 400)["message"]
    assert message.startswith(RAW_ERROR)
    assert "credentials" in message, message
    assert s3_server.objects(bucket) == []


def test_test_s3_missing_bucket(api: Api, su: dict[str, str], s3_server: S3Server, s3_off: None) -> None:
    bucket = f"missing{os.urandom(4).hex()}"
    set_s3(api.http, su, s3_server.settings(bucket))
    message = error_of(probe(api.http, su), 400)["message"]
    assert message.startswith(RAW_ERROR)
    assert "bucket" in message and bucket in message, message
    assert not (s3_server.root / bucket).exists()  # the test does not create it either


def test_test_s3_unreachable_endpoint(api: Api, su: dict[str, str], s3_server: S3Server, s3_off: None) -> None:
    endpoint = unreachable_endpoint()
    set_s3(api.http, su, s3_server.settings("bucket", endpoint=endpoint))
    started = time.monotonic()
    message = error_of(probe(api.http, su), 400)["message"]
    assert time.monotonic() - started < 15
    assert message.startswith(RAW_ERROR)
    assert "reach" in message and endpoint in message, message


def test_test_s3_uses_the_saved_settings_at_once(api: Api, su: dict[str, str], s3_server: S3Server,
                                                  s3_off: None) -> None:
    """Each PATCH is what the next test/s3 uses (no stale client kept from older settings)."""
    bucket = new_bucket(s3_server)
    set_s3(api.http, su, s3_server.settings(bucket))
    assert probe(api.http, su).status_code == 204
    set_s3(api.http, su, {"secret": WRONG_SECRET})
    assert "credentials" in error_of(probe(api.http, su), 400)["message"]
    set_s3(api.http, su, {"secret": S3Server.SECRET})
    assert probe(api.http, su).status_code == 204
    set_s3(api.http, su, {"enabled": False})
    assert error_of(probe(api.http, su), 400)["message"] == RAW_ERROR + NOT_ENABLED


def test_settings_never_return_the_secret(api: Api, su: dict[str, str], s3_server: S3Server, s3_off: None) -> None:
    set_s3(api.http, su, s3_server.settings(new_bucket(s3_server)))
    response = no_secret(api.http.get("/api/settings", headers=su))
    assert response.status_code == 200
    assert "secret" not in response.json()["backups"]["s3"]


# --- 2. the same questions to PocketBase 0.40.6 -------------------------------------------------


def pb_client(url: str) -> tuple[httpx.Client, dict[str, str]]:
    client = httpx.Client(base_url=url, timeout=30)
    response = client.post("/api/collections/_superusers/auth-with-password",
                           json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
    assert response.status_code == 200, response.text
    return client, auth(response.json()["token"])


def pb_user_token(client: httpx.Client) -> str:
    email, password = unique("pbuser") + "@example.com", "userpass123"
    response = client.post("/api/collections/users/records",
                           json={"email": email, "password": password, "passwordConfirm": password})
    assert response.status_code == 200, response.text
    response = client.post("/api/collections/users/auth-with-password", json={"identity": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def shape(response: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    body = response.json()
    return response.status_code, body["message"], {name: problem["code"] for name, problem in body["data"].items()}


def test_validation_answers_match_pocketbase(api: Api, su: dict[str, str], user_token: str, pocketbase: str) -> None:
    pb, pb_su = pb_client(pocketbase)
    pb_user = pb_user_token(pb)
    set_s3(api.http, su, {"enabled": False})
    try:
        cases: list[tuple[str, dict[str, str] | None, dict[str, str] | None, Any]] = [
            ("no auth", None, None, {"filesystem": "backups"}),
            ("user token", auth(user_token), auth(pb_user), {"filesystem": "backups"}),
            ("empty body", su, pb_su, {}),
            ("invalid filesystem", su, pb_su, {"filesystem": "nope"}),
            ("null filesystem", su, pb_su, {"filesystem": None}),
            ("wrong case", su, pb_su, {"filesystem": "Backups"}),
            ("not a string", su, pb_su, {"filesystem": 1}),
            ("a list", su, pb_su, {"filesystem": ["backups"]}),
            ("false", su, pb_su, {"filesystem": False}),
            ("not an object", su, pb_su, ["backups"]),
            ("storage", su, pb_su, {"filesystem": "storage"}),
            ("backups, s3 disabled", su, pb_su, {"filesystem": "backups"}),
        ]
        for label, ours_headers, pb_headers, body in cases:
            ours = no_secret(api.http.post(TEST_S3, headers=ours_headers or {}, json=body))
            theirs = pb.post(TEST_S3, headers=pb_headers or {}, json=body)
            assert shape(ours) == shape(theirs), f"{label}: ours {ours.text} / PocketBase {theirs.text}"
            assert ours.json()["data"] == theirs.json()["data"], label
    finally:
        pb.close()


def test_pocketbase_and_ours_agree_on_rclone(api: Api, su: dict[str, str], pocketbase: str,
                                             s3_server: S3Server, s3_off: None) -> None:
    """Both servers pointed at the same rclone S3 server: same status for a working bucket, a wrong
    secret, a missing bucket and an unreachable endpoint; both leave no probe object behind."""
    pb, pb_su = pb_client(pocketbase)
    ours_bucket, pb_bucket = new_bucket(s3_server), new_bucket(s3_server)
    endpoint = unreachable_endpoint()
    cases = [
        ("works", {}, 204, None),
        ("wrong secret", {"secret": WRONG_SECRET}, 400, "SignatureDoesNotMatch"),
        ("missing bucket", {"bucket": "nosuchbucket"}, 400, "NoSuchBucket"),
        ("unreachable", {"endpoint": endpoint}, 400, "connection refused"),
    ]
    try:
        for label, overrides, status, pb_says in cases:
            set_s3(api.http, su, {**s3_server.settings(ours_bucket), **overrides})
            response = pb.patch("/api/settings", headers=pb_su,
                                json={"backups": {"s3": {**s3_server.settings(pb_bucket), **overrides}}})
            assert response.status_code == 200, response.text
            ours, theirs = probe(api.http, su), pb.post(TEST_S3, headers=pb_su, json={"filesystem": "backups"})
            assert ours.status_code == theirs.status_code == status, f"{label}: ours {ours.text} / PocketBase {theirs.text}"
            if status == 400:
                assert ours.json()["message"].startswith(RAW_ERROR) and theirs.json()["message"].startswith(RAW_ERROR)
                assert pb_says is not None and pb_says in theirs.json()["message"], theirs.text
                assert ours.json()["data"] == theirs.json()["data"] == {}
            assert s3_server.objects(ours_bucket) == [] and s3_server.objects(pb_bucket) == [], label
    finally:
        pb.close()


# --- 3. switching the backup storage without a restart -----------------------------------------


def test_switching_storage_without_restart(fresh_server: ServerProcess, s3_server: S3Server) -> None:
    assert fresh_server.process is not None
    pid = fresh_server.process.pid
    headers = login(fresh_server)
    http = httpx.Client(base_url=fresh_server.url, timeout=30)
    bucket = new_bucket(s3_server)

    assert create_backup(fresh_server, headers, "local1.zip")["ok"]
    assert listed(fresh_server, headers) == ["local1.zip"]
    assert backup_status(fresh_server, headers)["storage"]["kind"] == "local"

    set_s3(http, headers, s3_server.settings(bucket))
    assert listed(fresh_server, headers) == []  # only what is in the bucket
    storage = backup_status(fresh_server, headers)["storage"]
    assert storage == {"kind": "s3", "bucket": bucket, "region": "us-east-1", "endpoint": s3_server.url,
                       "writable": True}  # ours: writable, by a real write (issue 15)

    last = create_backup(fresh_server, headers, "remote1.zip")
    assert last["ok"] and last["error"] is None, last
    assert s3_server.objects(bucket) == ["remote1.zip"]
    assert local_backups(fresh_server) == ["local1.zip"]
    assert listed(fresh_server, headers) == ["remote1.zip"]

    # A file token downloads the one in the bucket; it is a real zip.
    token = http.post("/api/files/token", headers=headers).json()["token"]
    response = no_secret(http.get("/api/backups/remote1.zip", params={"token": token}))
    assert response.status_code == 200 and response.content[:4] == b"PK\x03\x04"
    assert len(response.content) == (s3_server.root / bucket / "remote1.zip").stat().st_size

    set_s3(http, headers, {"enabled": False})
    assert listed(fresh_server, headers) == ["local1.zip"]
    assert backup_status(fresh_server, headers)["storage"]["kind"] == "local"
    assert error_of(probe(http, headers), 400)["message"] == RAW_ERROR + NOT_ENABLED

    set_s3(http, headers, {"enabled": True})  # the secret was kept (write-only, not forgotten)
    assert listed(fresh_server, headers) == ["remote1.zip"]
    assert probe(http, headers).status_code == 204

    assert fresh_server.process.pid == pid and fresh_server.process.poll() is None
    http.close()


# --- 4. the secret never leaks -------------------------------------------------------------------


@pytest.fixture()
def gated_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose backup jobs wait at each file while ``gate`` exists (PB_FAULTS gate)."""
    gate = tmp_path / "gate"
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    process = ServerProcess(data_dir, env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    process.start()
    try:
        yield process, gate
    finally:
        gate.unlink(missing_ok=True)
        process.stop()


@pytest.fixture()
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """An S3 server of the test's own, that it may stop and start with other credentials."""
    s3 = S3Server(tmp_path / "s3root")
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


def test_secret_never_leaks(gated_server: tuple[ServerProcess, Path], own_s3: S3Server) -> None:
    server, gate = gated_server
    headers = login(server)
    http = httpx.Client(base_url=server.url, timeout=30)
    bucket = new_bucket(own_s3)

    # Working S3: a backup, a listing, a download, a test.
    set_s3(http, headers, own_s3.settings(bucket))
    assert create_backup(server, headers, "good1.zip")["ok"]
    assert listed(server, headers) == ["good1.zip"]
    token = http.post("/api/files/token", headers=headers).json()["token"]
    assert no_secret(http.get("/api/backups/good1.zip", params={"token": token})).status_code == 200
    assert probe(http, headers).status_code == 204

    # A wrong secret: every use of the storage is a 400 that says why.
    set_s3(http, headers, {"secret": WRONG_SECRET})
    assert "credentials" in error_of(probe(http, headers), 400)["message"]
    message = error_of(http.get("/api/backups", headers=headers), 400)["message"]
    assert message.startswith("Failed to retrieve backup items. Reason: ") and "credentials" in message
    message = error_of(http.post("/api/backups", headers=headers, json={"name": "bad1.zip"}), 400)["message"]
    assert message.startswith("Failed to create backup. Reason: ") and "credentials" in message
    message = error_of(http.post("/api/backups", headers=headers, json={}), 400)["message"]
    assert message.startswith("Failed to create backup. Reason: ") and "credentials" in message
    for response in (http.post("/api/backups/good1.zip/restore", headers=headers),
                     http.delete("/api/backups/good1.zip", headers=headers),
                     http.get("/api/backups/good1.zip", params={"token": token})):
        assert "credentials" in error_of(response, 400)["message"]

    # The credentials stop working while a backup runs (rotated on the S3 side): the job fails,
    # says why in the status, and leaves nothing in the bucket.
    set_s3(http, headers, {"secret": S3Server.SECRET})
    gate.touch()
    response = no_secret(http.post("/api/backups", headers=headers, json={"name": "rotated1.zip"}))
    assert response.status_code == 204, response.text
    assert backup_status(server, headers)["active"]["key"] == "rotated1.zip"
    own_s3.stop()
    own_s3.SECRET = "rotated-secret-0123456789"  # type: ignore[misc]
    own_s3.start()
    gate.unlink()
    last = wait_idle(server, timeout=30)
    assert last is not None and last["key"] == "rotated1.zip" and last["ok"] is False, last
    assert "credentials" in last["error"], last
    assert not any(secret in json.dumps(last) for secret in SECRETS)
    assert own_s3.objects(bucket) == ["good1.zip"]

    # An endpoint that is down.
    own_s3.stop()
    message = error_of(http.get("/api/backups", headers=headers), 400)["message"]
    assert "reach" in message and own_s3.url in message, message
    assert "reach" in error_of(probe(http, headers), 400)["message"]

    settings = no_secret(http.get("/api/settings", headers=headers))
    assert settings.status_code == 200 and "secret" not in settings.json()["backups"]["s3"]
    http.close()

    server.stop()  # flushes the logs
    rows = server.sql("SELECT * FROM _logs", db="auxiliary.db")
    assert rows, "nothing was logged"
    logged = json.dumps([dict(row) for row in rows])
    assert "rotated1.zip" in logged  # the failed job is in the logs ...
    output = server.output()
    for secret in SECRETS:
        assert secret not in logged  # ... but no secret, in any column
        assert secret not in output
    params = "\n".join(str(row["value"]) for row in server.sql("SELECT value FROM _params"))
    assert S3Server.SECRET in params  # it is stored (the server needs it), just never shown


# --- 5. S3 enabled but unreachable --------------------------------------------------------------


def test_unreachable_s3_answers_400_not_500_nor_a_hang(api: Api, su: dict[str, str], s3_server: S3Server,
                                                       s3_off: None) -> None:
    endpoint = unreachable_endpoint()
    set_s3(api.http, su, s3_server.settings("bucket", endpoint=endpoint))
    token = api.http.post("/api/files/token", headers=su).json()["token"]

    statuses: list[int] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=api.server.url, timeout=10) as client:
            while not done.is_set():
                statuses.append(client.get("/api/health").status_code)
                time.sleep(0.02)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        calls = [
            ("list", lambda: api.http.get("/api/backups", headers=su), "Failed to retrieve backup items. Reason: "),
            ("create", lambda: api.http.post("/api/backups", headers=su, json={}), "Failed to create backup. Reason: "),
            ("create named", lambda: api.http.post("/api/backups", headers=su, json={"name": "x.zip"}),
             "Failed to create backup. Reason: "),
            ("delete", lambda: api.http.delete("/api/backups/x.zip", headers=su), "Failed to delete the backup. Reason: "),
            ("restore", lambda: api.http.post("/api/backups/x.zip/restore", headers=su), ""),
            ("download", lambda: api.http.get("/api/backups/x.zip", params={"token": token}), ""),
        ]
        for label, call, prefix in calls:
            body = error_of(call(), 400)  # within the client's timeout: S3 refusing is not a hang
            assert body["message"].startswith(prefix), f"{label}: {body['message']}"
            assert "reach" in body["message"] and endpoint in body["message"], f"{label}: {body['message']}"
    finally:
        done.set()
        poller.join(timeout=15)
    assert statuses and set(statuses) == {200}, statuses
    assert backup_status(api.server, su)["active"] is None

    set_s3(api.http, su, {"enabled": False})
    response = no_secret(api.http.get("/api/backups", headers=su))
    assert response.status_code == 200, response.text


def test_a_silent_s3_endpoint_does_not_starve_the_server(api: Api, su: dict[str, str], s3_server: S3Server,
                                                         s3_off: None) -> None:
    """An endpoint that accepts connections and never answers: S3 calls wait for their timeouts in
    threads of their own, so logins (password hashing in worker threads) and the rest go on."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the connections; nobody ever reads or answers
    try:
        set_s3(api.http, su, s3_server.settings("bucket", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}"))
        answers: list[int] = []

        def list_backups() -> None:
            answers.append(httpx.get(api.server.url + "/api/backups", headers=su, timeout=120).status_code)

        waiting = [threading.Thread(target=list_backups, daemon=True) for _ in range(12)]
        for thread in waiting:
            thread.start()
        time.sleep(1.0)  # all twelve are in the server, waiting on S3
        for _ in range(3):  # each login hashes a password in asyncio's default thread pool
            assert api.login("_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)
        assert api.http.get("/api/collections", headers=su).status_code == 200
        assert answers == []  # ... and they are all still waiting
    finally:
        silent.close()  # the waiting connections are reset; the retries find nothing listening
    for thread in waiting:
        thread.join(timeout=60)
    assert answers == [400] * 12
