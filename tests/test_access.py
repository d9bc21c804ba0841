"""Who may touch backups (issue 7), on one real server process started with umask 0.

- every backup, settings and cron route × every kind of wrong credential (none, a user's auth or
  file token, a superuser's file token where an auth token is needed and the other way round,
  tokens that really expired, tampered JWTs and file tokens, the tokens of a deleted superuser
  and of one whose password changed) → the contract's 401/403 body, and nothing happened;
- hostile backup keys (``..`` in every encoding, backslashes, NUL, over-long and dot names, keys
  with a slash) on download, delete and restore, local and S3: a 400/404 in the contract's shape,
  and the valid backups planted outside the store are neither served, deleted nor restored;
- backups, uploads and their temp files are owner-only (0600/0700) whatever the umask;
- the S3 secret appears in no response, log row or output line, with S3 working or failing.

What tests/test_auth.py (the 401/403 rules on other routes) and tests/test_backups_api.py (the
first hostile keys, a crafted expired file token) already cover is not repeated here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from conftest import (
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    S3Server,
    ServerProcess,
    auth,
    free_port,
    run_cli,
    unique,
    wait_for,
    wait_gate_held,
)
from test_backups_api import minimal_backup_zip, raw_request

NO_AUTH = {"status": 401, "message": "The request requires valid record authorization token.", "data": {}}
NOT_SUPERUSER = {"status": 403, "message": "The authorized record is not allowed to perform this action.", "data": {}}
DOWNLOAD_FORBIDDEN = {"status": 403, "message": "Insufficient permissions to access the resource.", "data": {}}
EXPECTED = {401: NO_AUTH, 403: NOT_SUPERUSER}
SUPERUSERS_ID = "pbc_3142635823"
VICTIM = "victim.zip"  # the backup every refused request aims at
SHORT = 10  # the shortest token lifetime (s) the server accepts
FILE_TOKEN_LIFETIME = 180  # the default
PASSWORD = "userpass123"


# --- the module's server -------------------------------------------------------------------------


@dataclass
class Env:
    server: ServerProcess
    http: httpx.Client
    gate: Path
    su: dict[str, str]
    user_email: str
    user_token: str
    victim: bytes
    aged: dict[str, str]  # credentials issued at ``aged_at`` (the auth tokens with a 10 s lifetime)
    aged_at: float

    @property
    def backups(self) -> Path:
        return self.server.data_dir / "backups"

    @property
    def temp(self) -> Path:
        return self.server.data_dir / ".pb_temp_to_delete"

    def file_token(self, token: str | None = None) -> str:
        response = self.http.post("/api/files/token", headers=auth(token or self.su["Authorization"]))
        assert response.status_code == 200, response.text
        return response.json()["token"]

    def status(self) -> dict[str, Any]:
        response = self.http.get("/api/backups/status", headers=self.su)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_idle(self) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status())["active"] is None and s, "the backup job to end")

    def patch_settings(self, body: dict[str, Any], status: int = 200) -> httpx.Response:
        response = self.http.patch("/api/settings", headers=self.su, json=body)
        assert response.status_code == status, response.text
        return response

    def set_lifetime(self, collection: str, kind: str, seconds: int) -> None:
        response = self.http.patch(f"/api/collections/{collection}", headers=self.su, json={kind: {"duration": seconds}})
        assert response.status_code == 200, response.text
        assert response.json()[kind]["duration"] == seconds


def login(http: httpx.Client, collection: str, email: str, password: str) -> dict[str, Any]:
    response = http.post(f"/api/collections/{collection}/auth-with-password", json={"identity": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("access")
    data_dir = tmp / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    gate = tmp / "gate"
    server = ServerProcess(data_dir, env={"PB_FAULTS": "gate:backup-write", "PB_FAULTS_GATE": str(gate)})
    previous = os.umask(0)  # the server must keep backups private by itself, not thanks to a umask
    try:
        server.start()
    finally:
        os.umask(previous)
    http = httpx.Client(base_url=server.url, timeout=60)
    try:
        yield _prepare(server, http, gate)
    finally:
        gate.unlink(missing_ok=True)
        http.close()
        server.stop()


def _prepare(server: ServerProcess, http: httpx.Client, gate: Path) -> Env:
    su = auth(login(http, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)["token"])
    user_email = unique("user") + "@example.com"
    response = http.post("/api/collections/users/records",
                         json={"email": user_email, "password": PASSWORD, "passwordConfirm": PASSWORD})
    assert response.status_code == 200, response.text
    env = Env(server, http, gate, su, user_email, "", b"", {}, 0.0)
    env.patch_settings({"backups": {"cron": "0 0 1 1 *"}})  # so that __pbAutoBackup__ exists
    assert http.post("/api/backups", headers=su, json={"name": VICTIM}).status_code == 204
    assert env.wait_idle()["last"]["ok"] is True
    env.victim = (env.backups / VICTIM).read_bytes()

    # Tokens that will really expire: auth tokens issued while the lifetime is 10 s (their `exp`
    # is fixed then), and a file token whose age the server checks against the lifetime of the
    # moment it is used (lowered to 10 s in the last test).
    lifetimes = {name: http.get(f"/api/collections/{name}", headers=su).json()["authToken"]["duration"]
                 for name in ("_superusers", "users")}
    for name in lifetimes:
        env.set_lifetime(name, "authToken", SHORT)
    try:
        aged_su = login(http, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)["token"]
        aged_user = login(http, "users", user_email, PASSWORD)["token"]
    finally:
        for name, seconds in lifetimes.items():
            env.set_lifetime(name, "authToken", seconds)
    env.aged = {"superuser auth": aged_su, "user auth": aged_user, "superuser file": env.file_token(aged_su)}
    env.aged_at = time.time()
    # ... and they work now.
    assert http.get("/api/backups", headers=auth(aged_su)).status_code == 200
    assert http.get("/api/backups", headers=auth(aged_user)).status_code == 403
    assert http.head(f"/api/backups/{VICTIM}", params={"token": env.aged["superuser file"]}).status_code == 200
    env.user_token = login(http, "users", user_email, PASSWORD)["token"]
    return env


def snapshot(env: Env) -> tuple[Any, ...]:
    """What a refused request must not change: the stored backups, the temp dir, the settings,
    the backup status (a started create/restore/upload shows there)."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in env.backups.iterdir())
    temp = sorted(p.name for p in env.temp.iterdir())
    settings = env.http.get("/api/settings", headers=env.su)
    assert settings.status_code == 200, settings.text
    status = env.status()
    status["storage"].pop("freeBytes", None)  # the disk's free space moves with everything else
    return files, temp, settings.json(), status


def assert_error_shape(env: Env, response: httpx.Response | tuple[int, bytes], statuses: tuple[int, ...],
                       head: bool = False, what: str = "") -> None:
    """A 4xx in the contract's shape (``{"status", "message", "data"}``), no path, no traceback."""
    if isinstance(response, tuple):
        status, raw = response
        body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
        headers = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    else:
        status, body = response.status_code, response.content
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    assert status in statuses, (what, status, headers, body[:300])
    assert "x-injected" not in headers.lower(), (what, headers)
    if head:
        return
    text = body.decode("utf-8", "replace")
    assert str(env.server.data_dir) not in text and "Traceback" not in text, (what, text)
    decoded = json.loads(body)
    assert set(decoded) == {"status", "message", "data"} and decoded["status"] == status, (what, decoded)
    assert isinstance(decoded["message"], str) and decoded["data"] == {}, (what, decoded)


# --- 1. permissions (first: they look at the temp dir while nothing else runs) --------------------


def modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.lstat().st_mode) for p in directory.rglob("*")}


def assert_private(directory: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for name, mode in modes(directory).items():
        expected = 0o700 if (directory / name).is_dir() else 0o600
        assert mode == expected, f"{name} is {oct(mode)}, not {oct(expected)}"


def test_backup_and_its_temp_files_are_owner_only(env: Env) -> None:
    """The server runs with umask 0: a backup held mid-way at the gate has its partial zip (and
    any snapshot) 0600 in a 0700 temp dir; the finished backup is 0600 in a 0700 backups dir."""
    key = "private_created.zip"
    env.gate.write_text("1")  # data.db goes in, then the job waits before the next file
    try:
        assert env.http.post("/api/backups", headers=env.su, json={"name": key}).status_code == 204
        wait_gate_held(env.gate)
        assert env.status()["active"]["key"] == key
        in_temp = modes(env.temp)
        assert any(name.endswith(".part") for name in in_temp), in_temp  # the zip being written
        assert_private(env.temp)
        assert not (env.backups / key).exists()
    finally:
        env.gate.unlink(missing_ok=True)
    assert env.wait_idle()["last"]["ok"] is True
    assert_private(env.backups)
    assert env.http.delete(f"/api/backups/{key}", headers=env.su).status_code == 204


def test_upload_and_its_temp_file_are_owner_only(env: Env) -> None:
    """An upload streamed slowly: while the body is still coming, its temp file is 0600; once
    stored, the backup is 0600."""
    key, boundary, content = "private_upload.zip", "accessboundary7", minimal_backup_zip()
    seen: dict[str, int] = {}

    def body() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{key}"\r\n'
               f"Content-Type: application/zip\r\n\r\n").encode() + content[:64]
        seen.update(wait_for(lambda: {n: m for n, m in modes(env.temp).items() if n.startswith("upload_")},
                             "the upload's temp file", timeout=15))
        assert env.status()["active"]["op"] == "upload"
        assert_private(env.temp)
        yield content[64:] + f"\r\n--{boundary}--\r\n".encode()

    response = env.http.post("/api/backups/upload", content=body(),
                             headers={**env.su, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 204, response.text
    assert seen and set(seen.values()) == {0o600}, seen
    assert (env.backups / key).read_bytes() == content
    assert_private(env.backups)
    assert not any(name.startswith("upload_") for name in modes(env.temp))
    assert env.http.delete(f"/api/backups/{key}", headers=env.su).status_code == 204


# --- 2. hostile keys ---------------------------------------------------------------------------------


def fingerprint(paths: list[Path]) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture()
def planted(env: Env) -> Iterator[list[Path]]:
    """Valid backups (copies of VICTIM) where a hostile key could reach them: in pb_data, in its
    parent dir, as a dot file and inside a directory in backups/; plus the live data.db."""
    data_dir = env.server.data_dir
    (env.backups / "dir.zip").mkdir()
    paths = [data_dir / "inner_trap.zip", data_dir.parent / "outer_trap.zip", env.backups / ".hidden.zip",
             env.backups / "dir.zip" / "inner.zip"]
    for path in paths:
        path.write_bytes(env.victim)
    yield paths + [data_dir / "data.db"]
    for path in paths:
        path.unlink(missing_ok=True)
    (env.backups / "dir.zip").rmdir()


LOCAL_KEYS = [
    "..", "%2e%2e", ".", "...", "%2E",
    "..%2Finner_trap.zip", "%2E%2E%2Finner_trap.zip", "..%2F..%2Fouter_trap.zip", "%2e%2e%2f%2e%2e%2fouter_trap.zip",
    "..%2F..%2F{parent}%2Fouter_trap.zip", "{absolute}",
    "..%5Cinner_trap.zip", "..%5C..%5Couter_trap.zip", "..\\inner_trap.zip", "..\\..\\outer_trap.zip",
    "%252e%252e%252finner_trap.zip", "..%252Finner_trap.zip",
    "inner_trap.zip%00", "..%00%2Finner_trap.zip", "victim.zip%00.zip", "victim.zip%00",
    ".hidden.zip", "%2Ehidden.zip", "dir.zip", "dir.zip%2Finner.zip", "dir.zip%5Cinner.zip",
    "a" * 300 + ".zip", "a" * 251 + ".zip",  # too long; the longest a file system allows (missing)
    "%c0%ae%c0%ae%2finner_trap.zip", "%ff%fe.zip", "%EF%BC%8E%EF%BC%8E%EF%BC%8Finner_trap.zip",
    "victim.zip%0d%0aX-Injected:%20yes", "victim.zip%2F.", "victim.zip%2F..%2Fvictim.zip",
]
# The restore route takes a path (``{key:path}``): keys with raw slashes reach its handler.
RAW_RESTORE_PATHS = [
    "/api/backups/../inner_trap.zip/restore", "/api/backups/../../outer_trap.zip/restore",
    "/api/backups/dir.zip/inner.zip/restore", "/api/backups/{absolute_raw}/restore",
    "/api/backups/./victim.zip/restore", "/api/backups/victim.zip/../../outer_trap.zip/restore",
]
RAW_DOWNLOAD_PATHS = ["/api/backups/dir.zip/inner.zip", "/api/backups/../inner_trap.zip", "/api/backups/{absolute_raw}"]


def check_hostile_key_requests(env: Env, keys: list[str], restore_paths: list[str], download_paths: list[str],
                               untouched: Callable[[], Any]) -> None:
    """Every key on download (GET, HEAD, with a valid superuser file token), delete and restore:
    a 400/404 in the contract's shape, and ``untouched()`` and the backup status unchanged."""
    before, last = untouched(), env.status()["last"]
    for key in keys:
        token = env.file_token()
        for method in ("GET", "HEAD"):
            response = raw_request(env.server, method, f"/api/backups/{key}?token={token}")
            assert_error_shape(env, response, (400, 404), head=method == "HEAD", what=f"{method} {key}")
            assert b"PK\x03\x04" not in response[1] and b"SQLite format 3" not in response[1], (method, key)
        assert_error_shape(env, raw_request(env.server, "DELETE", f"/api/backups/{key}", env.su), (400, 404),
                           what=f"DELETE {key}")
        assert_error_shape(env, raw_request(env.server, "POST", f"/api/backups/{key}/restore", env.su), (400, 404),
                           what=f"restore {key}")
    for path in restore_paths:
        assert_error_shape(env, raw_request(env.server, "POST", path, env.su), (400, 404), what=f"POST {path}")
    for path in download_paths:
        response = raw_request(env.server, "GET", f"{path}?token={env.file_token()}")
        assert_error_shape(env, response, (400, 404), what=f"GET {path}")
        assert b"PK\x03\x04" not in response[1]
        assert_error_shape(env, raw_request(env.server, "DELETE", path, env.su), (400, 404), what=f"DELETE {path}")
    status = env.status()
    assert status["active"] is None and status["last"] == last, status  # no restore (nor anything) started
    assert untouched() == before
    assert env.http.get("/api/health").status_code == 200


def test_hostile_keys_reach_nothing_outside_the_backups(env: Env, planted: list[Path]) -> None:
    outer = env.server.data_dir.parent / "outer_trap.zip"
    keys = [key.format(parent=quote(outer.parent.name, safe=""), absolute=quote(str(outer), safe="")) for key in LOCAL_KEYS]
    absolute_raw = str(outer).lstrip("/")
    restore_paths = [path.format(absolute_raw=absolute_raw) for path in RAW_RESTORE_PATHS]
    download_paths = [path.format(absolute_raw=absolute_raw) for path in RAW_DOWNLOAD_PATHS]
    listed = [item["key"] for item in env.http.get("/api/backups", headers=env.su).json()]
    assert listed == [VICTIM]  # neither the dot file nor the directory is a backup

    def untouched() -> Any:
        return fingerprint(planted), fingerprint([env.backups / VICTIM]), sorted(os.listdir(env.backups))

    check_hostile_key_requests(env, keys, restore_paths, download_paths, untouched)


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 server of this module's own, whose secret is distinctive enough to search for."""
    s3 = S3Server(tmp_path_factory.mktemp("access_s3") / "root")
    s3.SECRET = "SeCrEt-" + os.urandom(12).hex()  # type: ignore[misc]
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture()
def s3_backups(env: Env, own_s3: S3Server) -> Iterator[str]:
    bucket = own_s3.bucket()
    env.patch_settings({"backups": {"s3": own_s3.settings(bucket)}})
    try:
        yield bucket
    finally:
        env.patch_settings({"backups": {"s3": {"enabled": False}}})


def test_hostile_keys_on_s3_reach_no_other_object(env: Env, own_s3: S3Server, s3_backups: str) -> None:
    """On S3 a key is an object name, where ``/`` and ``..`` mean nothing to the server but may to
    the S3 side (rclone maps them to directories): a key that is not a flat name is refused before
    any S3 call, so an object under a prefix, a dot object or one in another bucket stays out of
    reach."""
    bucket, other = s3_backups, own_s3.bucket()
    client = own_s3.client()
    for name, where in (("real.zip", bucket), ("nested/inner.zip", bucket), (".hidden.zip", bucket), ("stolen.zip", other)):
        client.put_object(Bucket=where, Key=name, Body=env.victim)
    listed = env.http.get("/api/backups", headers=env.su)
    assert listed.status_code == 200, listed.text
    assert [item["key"] for item in listed.json()] == ["real.zip"]
    keys = [
        f"..%2F{other}%2Fstolen.zip", f"%2E%2E%2F{other}%2Fstolen.zip", f"..%5C{other}%5Cstolen.zip",
        f"%2F{other}%2Fstolen.zip", f"%2F..%2F{other}%2Fstolen.zip", "nested%2Finner.zip", "nested",
        ".hidden.zip", "%2Ehidden.zip", "real.zip%00", "..", "%2e%2e", "a" * 300 + ".zip",
    ]
    restore_paths = [f"/api/backups/../{other}/stolen.zip/restore", "/api/backups/nested/inner.zip/restore",
                     f"/api/backups//{other}/stolen.zip/restore"]
    download_paths = ["/api/backups/nested/inner.zip", f"/api/backups/../{other}/stolen.zip"]

    def untouched() -> Any:
        return own_s3.objects(bucket), own_s3.objects(other), fingerprint([env.backups / VICTIM])

    assert untouched()[:2] == ([".hidden.zip", "nested/inner.zip", "real.zip"], ["stolen.zip"])
    check_hostile_key_requests(env, keys, restore_paths, download_paths, untouched)
    # the valid one is served (the refusals above were about the keys, not the storage)
    download = env.http.get("/api/backups/real.zip", params={"token": env.file_token()})
    assert download.status_code == 200 and download.content == env.victim


# --- 3. the S3 secret -------------------------------------------------------------------------------


def test_s3_secret_never_leaves_the_server(env: Env, own_s3: S3Server) -> None:
    """With S3 working, then on a closed port, a missing bucket and wrong credentials: every
    settings, backup and cron answer, the status, the logs and the server's output are free of
    the secret (the working one and the wrong one)."""
    wrong = "SeCrEt-wrong-" + os.urandom(12).hex()
    secrets = (own_s3.SECRET, wrong)
    bucket = own_s3.bucket()
    answers: list[str] = []
    label = "a refused change"

    def look(response: httpx.Response, statuses: int | tuple[int, ...] = ()) -> httpx.Response:
        seen = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        answers.append(f"{response.request.method} {response.request.url}")
        for secret in secrets:
            assert secret not in seen, f"the S3 secret leaked into {response.request.method} {response.request.url}"
        expected = statuses if isinstance(statuses, tuple) else (statuses,)
        if expected:
            assert response.status_code in expected, (label, response.request.url, response.status_code, response.text)
        return response

    working = own_s3.settings(bucket)
    configs = [
        ("working", working),
        ("closed port", {**working, "endpoint": f"http://127.0.0.1:{free_port()}"}),
        ("missing bucket", {**working, "bucket": "nosuchbucket" + os.urandom(4).hex()}),
        ("wrong credentials", {**working, "secret": wrong}),
    ]
    # A refused settings change that carries the secret does not echo it back.
    look(env.http.patch("/api/settings", headers=env.su,
                        json={"backups": {"s3": {**working, "bucket": "", "endpoint": "not a url"}}}), 400)
    try:
        for label, s3 in configs:
            ok = label == "working"
            slug = label.replace(" ", "_")
            look(env.http.patch("/api/settings", headers=env.su, json={"backups": {"s3": s3}}), 200)
            settings = look(env.http.get("/api/settings", headers=env.su), 200).json()
            assert "secret" not in settings["backups"]["s3"], settings
            look(env.http.post("/api/settings/test/s3", headers=env.su, json={"filesystem": "backups"}),
                 204 if ok else 400)
            look(env.http.get("/api/backups", headers=env.su), 200 if ok else 400)
            for body in ({"name": f"secret_{slug}.zip"}, {}):
                # refused at once, or (a missing bucket looks like a missing key) failing in the job
                created = look(env.http.post("/api/backups", headers=env.su, json=body), 204 if ok else (204, 400))
                last = env.wait_idle()["last"]
                if created.status_code == 204:
                    assert last["ok"] is ok, (label, last)
            look(env.http.post("/api/backups/upload", headers=env.su,
                               files={"file": (f"up_{slug}.zip", minimal_backup_zip(), "application/zip")}),
                 204 if ok else 400)
            token = env.file_token()
            # (a HEAD on a missing bucket is a bare 404, as for a missing key)
            look(env.http.get(f"/api/backups/secret_{slug}.zip", params={"token": token}), 200 if ok else (400, 404))
            look(env.http.get("/api/backups/missing.zip", params={"token": token}), 404 if ok else (400, 404))
            look(env.http.post("/api/backups/missing.zip/restore", headers=env.su), 400)
            look(env.http.delete(f"/api/backups/up_{slug}.zip", headers=env.su), 204 if ok else (400, 404))
            last = look(env.http.get("/api/backups/status", headers=env.su), 200).json()["last"]
            # the scheduled job: runs in the background, fails (but for the working S3) into the status
            look(env.http.post("/api/crons/__pbAutoBackup__", headers=env.su), 204)
            after = wait_for(lambda last=last: (s := env.status())["active"] is None and s["last"] != last and s,
                             "the scheduled backup to run")
            look(env.http.get("/api/backups/status", headers=env.su), 200)
            assert after["last"]["ok"] is ok, (label, after)
            assert after["storage"]["kind"] == "s3" and "secret" not in json.dumps(after["storage"]).lower()
            look(env.http.get("/api/health", headers=env.su), 200)
            look(env.http.get("/api/crons", headers=env.su), 200)
    finally:
        env.patch_settings({"backups": {"s3": {"enabled": False}}})
    assert own_s3.objects(bucket)  # the working configuration did write there
    # The failures were logged (flushed every half second), without the secret.
    # (closed port and wrong credentials; with a missing bucket the job itself fails, logged apart)
    wait_for(lambda: len([r for r in env.server.sql("SELECT message FROM _logs", db="auxiliary.db")
                          if r["message"] == "Scheduled backup failed"]) >= 2, "the failed scheduled backups in the logs")
    time.sleep(0.7)  # one more flush: the request log of the last answers
    logged = json.dumps([dict(r) for r in env.server.sql("SELECT * FROM _logs", db="auxiliary.db")])
    output = env.server.output()
    for secret in secrets:
        assert secret not in logged
        assert secret not in output
    assert len(answers) > 60


# --- 4. every route × every credential -------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    # (client, headers, control) -> response; ``control`` asks for a request that a superuser gets
    # past the auth check with but that changes nothing (to prove the refusals are about the token)
    send: Callable[[httpx.Client, dict[str, str], bool], httpx.Response]
    control_status: int


HOSTILE_SETTINGS = {"meta": {"appName": "taken over"},
                    "backups": {"cron": "* * * * *", "cronMaxKeep": 1,
                                "s3": {"enabled": True, "bucket": "evil", "region": "us-east-1", "endpoint": "http://127.0.0.1:9",
                                       "accessKey": "evil", "secret": "evil-secret-123", "forcePathStyle": True}}}
UPLOAD = minimal_backup_zip()
ROUTES = [
    Route("GET /api/backups", lambda c, h, ctl: c.get("/api/backups", headers=h), 200),
    Route("POST /api/backups", lambda c, h, ctl: c.post("/api/backups", headers=h,
                                                        json={"name": "Bad Name" if ctl else "sneaky.zip"}), 400),
    Route("POST /api/backups/upload", lambda c, h, ctl: c.post(
        "/api/backups/upload", headers=h, files={"other" if ctl else "file": ("sneaky_upload.zip", UPLOAD, "application/zip")}), 400),
    Route("GET /api/backups/status", lambda c, h, ctl: c.get("/api/backups/status", headers=h), 200),
    Route("DELETE /api/backups/{key}", lambda c, h, ctl: c.delete(f"/api/backups/{'missing.zip' if ctl else VICTIM}", headers=h), 404),
    Route("POST /api/backups/{key}/restore",
          lambda c, h, ctl: c.post(f"/api/backups/{'missing.zip' if ctl else VICTIM}/restore", headers=h), 400),
    # the catalog (issue 15): the control request is harmless (a missing key, a dry run)
    Route("GET /api/backups/{key}/info", lambda c, h, ctl: c.get(f"/api/backups/{'missing.zip' if ctl else VICTIM}/info",
                                                                 headers=h), 404),
    Route("POST /api/backups/{key}/pin", lambda c, h, ctl: c.post(f"/api/backups/{'missing.zip' if ctl else VICTIM}/pin",
                                                                  headers=h), 404),
    Route("DELETE /api/backups/{key}/pin", lambda c, h, ctl: c.delete(
        f"/api/backups/{'missing.zip' if ctl else VICTIM}/pin", headers=h), 404),
    Route("POST /api/backups/prune", lambda c, h, ctl: c.post("/api/backups/prune", headers=h,
                                                              json={"keep": 0, "scope": "all", "dryRun": ctl}), 200),
    Route("POST /api/backups/notify/test", lambda c, h, ctl: c.post("/api/backups/notify/test", headers=h), 400),
    Route("GET /api/settings", lambda c, h, ctl: c.get("/api/settings", headers=h), 200),
    Route("PATCH /api/settings", lambda c, h, ctl: c.patch(
        "/api/settings", headers=h, json={"backups": {"cron": "not a cron"}} if ctl else HOSTILE_SETTINGS), 400),
    Route("POST /api/settings/test/s3", lambda c, h, ctl: c.post("/api/settings/test/s3", headers=h,
                                                                 json={"filesystem": "backups"}), 400),
    Route("GET /api/crons", lambda c, h, ctl: c.get("/api/crons", headers=h), 200),
    Route("POST /api/crons/{id}", lambda c, h, ctl: c.post(f"/api/crons/{'no_such_job' if ctl else '__pbAutoBackup__'}",
                                                           headers=h), 404),
]


def flip(segment: str) -> str:
    """``segment`` (base64url) with its middle character changed."""
    index = len(segment) // 2
    return segment[:index] + ("A" if segment[index] != "A" else "B") + segment[index + 1:]


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def check_credential(env: Env, name: str, value: str | None, on_superuser_routes: int | None,
                     on_download: int | None) -> None:
    """``value`` in the Authorization header of every superuser route and as ``?token=`` of a
    download: the expected refusal (``None``: the control, which must get past the check), and
    nothing changed."""
    headers = {} if value is None else {"Authorization": value}
    for route in ROUTES:
        before = snapshot(env)
        response = route.send(env.http, headers, on_superuser_routes is None)
        where = f"{route.name} with {name}"
        if on_superuser_routes is None:
            assert response.status_code == route.control_status, (where, response.text)
        else:
            assert response.status_code == on_superuser_routes, (where, response.text)
            assert response.json() == EXPECTED[on_superuser_routes], (where, response.text)
        assert snapshot(env) == before, f"{where} changed something"
    before = snapshot(env)
    params = {} if value is None else {"token": value}
    get = env.http.get(f"/api/backups/{VICTIM}", params=params)
    head = env.http.head(f"/api/backups/{VICTIM}", params=params)
    if on_download is None:
        assert get.status_code == 200 and get.content == env.victim, name
        assert head.status_code == 200, name
    else:
        assert get.status_code == 403 and get.json() == DOWNLOAD_FORBIDDEN, (name, get.content[:200])
        assert head.status_code == 403 and head.content == b"", name
    assert snapshot(env) == before, f"a download with {name} changed something"


def test_every_route_refuses_every_wrong_credential(env: Env) -> None:
    http, su_token = env.http, env.su["Authorization"]
    su_file = env.file_token()
    user_file = env.file_token(env.user_token)
    su_id = login(http, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)["record"]["id"]
    head, payload, signature = su_token.split(".")
    file_payload, file_stamp, file_signature = su_file.rsplit(".", 2)
    user_head, _, user_signature = env.user_token.split(".")
    user_file_payload, user_file_stamp, user_file_signature = user_file.rsplit(".", 2)
    claims = jwt.decode(su_token, options={"verify_signature": False})

    # A superuser created from the command line while the server runs; its tokens work, then it
    # is deleted.
    doomed_email = unique("doomed") + "@example.com"
    run_cli("superuser", "upsert", doomed_email, "doomedpass123", data_dir=env.server.data_dir)
    doomed = login(http, "_superusers", doomed_email, "doomedpass123")
    doomed_file = env.file_token(doomed["token"])
    assert http.get("/api/backups", headers=auth(doomed["token"])).status_code == 200
    assert http.head(f"/api/backups/{VICTIM}", params={"token": doomed_file}).status_code == 200
    response = http.delete(f"/api/collections/_superusers/records/{doomed['record']['id']}", headers=env.su)
    assert response.status_code == 204, response.text

    # A superuser whose password changes after its tokens were issued.
    rotated_email = unique("rotated") + "@example.com"
    response = http.post("/api/collections/_superusers/records", headers=env.su,
                         json={"email": rotated_email, "password": "rotatedpass1", "passwordConfirm": "rotatedpass1"})
    assert response.status_code == 200, response.text
    rotated = login(http, "_superusers", rotated_email, "rotatedpass1")
    rotated_file = env.file_token(rotated["token"])
    assert http.get("/api/backups", headers=auth(rotated["token"])).status_code == 200
    assert http.head(f"/api/backups/{VICTIM}", params={"token": rotated_file}).status_code == 200
    response = http.patch(f"/api/collections/_superusers/records/{response.json()['id']}", headers=env.su,
                          json={"password": "rotatedpass2", "passwordConfirm": "rotatedpass2"})
    assert response.status_code == 200, response.text
    assert http.get("/api/backups", headers=auth(login(http, "_superusers", rotated_email, "rotatedpass2")["token"])).status_code == 200

    credentials: list[tuple[str, str | None, int | None, int | None]] = [
        ("no token", None, 401, 403),
        ("an empty token", "", 401, 403),
        ("garbage", "not.a.token", 401, 403),
        ("a user's auth token", env.user_token, 403, 403),
        ("a user's auth token (Bearer)", "Bearer " + env.user_token, 403, 403),
        ("a user's file token", user_file, 401, 403),
        ("the superuser's auth token", su_token, None, 403),
        ("the superuser's auth token (Bearer)", "Bearer " + su_token, None, 403),
        ("the superuser's file token", su_file, 401, None),
        ("a superuser JWT with a payload character changed", f"{head}.{flip(payload)}.{signature}", 401, 403),
        ("a superuser JWT with a signature character changed", f"{head}.{payload}.{flip(signature)}", 401, 403),
        ("a superuser JWT with alg none", jwt.encode(claims, None, algorithm="none"), 401, 403),
        ("a user's JWT rewritten to name the superuser", f"{user_head}.{b64({**claims, 'id': su_id})}.{user_signature}", 401, 403),
        ("a superuser file token with a payload character changed", f"{flip(file_payload)}.{file_stamp}.{file_signature}", 401, 403),
        ("a superuser file token with a signature character changed", f"{file_payload}.{file_stamp}.{flip(file_signature)}", 401, 403),
        ("a superuser file token with a timestamp character changed", f"{file_payload}.{flip(file_stamp)}.{file_signature}", 401, 403),
        ("a superuser file payload with a user's stamp and signature",
         f"{file_payload}.{user_file_stamp}.{user_file_signature}", 401, 403),
        ("a user's file payload with the superuser's stamp and signature",
         f"{user_file_payload}.{file_stamp}.{file_signature}", 401, 403),
        ("a deleted superuser's auth token", doomed["token"], 401, 403),
        ("a deleted superuser's file token", doomed_file, 401, 403),
        ("a superuser auth token from before a password change", rotated["token"], 401, 403),
        ("a superuser file token from before a password change", rotated_file, 401, 403),
    ]
    for name, value, on_superuser_routes, on_download in credentials:
        check_credential(env, name, value, on_superuser_routes, on_download)

    # Tokens that expired: the auth tokens issued with a 10 s lifetime in the module's set-up; the
    # file token of the same moment, still good under the default 180 s lifetime, refused once
    # the lifetime is 10 s (the server checks a file token's age when it is used).
    wait_for(lambda: time.time() > env.aged_at + SHORT + 2, "the aged tokens to expire", timeout=SHORT + 5)
    aged_file = env.aged["superuser file"]
    assert http.head(f"/api/backups/{VICTIM}", params={"token": aged_file}).status_code == 200
    aged_payload, _, aged_signature = aged_file.rsplit(".", 2)
    env.set_lifetime("_superusers", "fileToken", SHORT)
    try:
        for name, value in [
            ("an expired superuser auth token", env.aged["superuser auth"]),
            ("an expired user auth token", env.aged["user auth"]),
            ("an expired superuser file token", aged_file),
            ("an expired superuser file token given a fresh timestamp",
             f"{aged_payload}.{env.file_token().rsplit('.', 2)[1]}.{aged_signature}"),
        ]:
            check_credential(env, name, value, 401, 403)
        # while a fresh one still downloads under the 10 s lifetime
        fresh = http.get(f"/api/backups/{VICTIM}", params={"token": env.file_token()})
        assert fresh.status_code == 200 and fresh.content == env.victim
    finally:
        env.set_lifetime("_superusers", "fileToken", FILE_TOKEN_LIFETIME)
