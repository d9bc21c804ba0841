"""The command line, through real subprocesses: help, superuser upsert/delete, serve's banner."""

from __future__ import annotations

import queue
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from conftest import ROOT, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, free_port, run_cli, terminate, wait_healthy


def superusers(data_dir: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(data_dir / "data.db", timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute('SELECT id, email, password, tokenKey FROM "_superusers" ORDER BY email').fetchall()
    finally:
        conn.close()


def journal_mode(path: Path) -> str:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    assert result.stderr.strip() or result.stdout.strip(), "a failure must say why"


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------


def test_top_level_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "superuser" in result.stdout


def test_serve_help() -> None:
    result = run_cli("serve", "--help")
    assert "--http" in result.stdout and "--dir" in result.stdout
    assert "Traceback" not in result.stderr


def test_superuser_help() -> None:
    result = run_cli("superuser", "--help")
    assert "upsert" in result.stdout and "delete" in result.stdout


@pytest.mark.parametrize("action", ["upsert", "delete"])
def test_superuser_action_help(action: str) -> None:
    result = run_cli("superuser", action, "--help")
    out = result.stdout
    assert "--dir" in out
    assert "email" in out.lower()
    if action == "upsert":
        assert "password" in out.lower()


def test_no_command_is_an_error() -> None:
    result = run_cli(check=False)
    assert_clean_failure(result)


# ---------------------------------------------------------------------------------------------
# superuser upsert
# ---------------------------------------------------------------------------------------------


def test_upsert_creates_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "pb_data"
    result = run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    assert result.returncode == 0
    assert f'Successfully saved superuser "{SUPERUSER_EMAIL}"!' in result.stdout
    assert "Traceback" not in result.stderr
    for name in ("data.db", "auxiliary.db"):
        assert (data_dir / name).is_file(), name
        assert journal_mode(data_dir / name).lower() == "wal", name
    for name in ("storage", "backups", ".pb_temp_to_delete"):
        assert (data_dir / name).is_dir(), name
    rows = superusers(data_dir)
    assert [row["email"] for row in rows] == [SUPERUSER_EMAIL]
    assert bcrypt.checkpw(SUPERUSER_PASSWORD.encode(), rows[0]["password"].encode())


def test_upsert_again_changes_the_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    before = superusers(data_dir)[0]
    result = run_cli("superuser", "upsert", SUPERUSER_EMAIL, "a-new-password", data_dir=data_dir)
    assert f'Successfully saved superuser "{SUPERUSER_EMAIL}"!' in result.stdout
    rows = superusers(data_dir)
    assert len(rows) == 1 and rows[0]["id"] == before["id"]
    assert rows[0]["password"] != before["password"]
    assert rows[0]["tokenKey"] != before["tokenKey"]
    assert bcrypt.checkpw(b"a-new-password", rows[0]["password"].encode())
    assert not bcrypt.checkpw(SUPERUSER_PASSWORD.encode(), rows[0]["password"].encode())

    # And through the server: the old password fails, the new one works.
    server = ServerProcess(data_dir)
    server.start()
    api = Api(server)
    try:
        old = api.http.post("/api/collections/_superusers/auth-with-password",
                            json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
        assert old.status_code == 400, old.text
        token = api.login("_superusers", SUPERUSER_EMAIL, "a-new-password")
        assert api.http.get("/api/collections", headers={"Authorization": token}).status_code == 200
    finally:
        api.close()
        server.stop()


def test_upsert_second_superuser(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    result = run_cli("superuser", "upsert", "second@example.com", "second-pass", data_dir=data_dir)
    assert 'Successfully saved superuser "second@example.com"!' in result.stdout
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL, "second@example.com"]


def test_start_empties_the_temp_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    temp = data_dir / ".pb_temp_to_delete"
    (temp / "stale.bin").write_bytes(b"left over")
    (temp / "stale_dir").mkdir()
    (temp / "stale_dir" / "inner.txt").write_text("x")
    server = ServerProcess(data_dir)
    server.start()
    try:
        assert temp.is_dir()
        assert not (temp / "stale.bin").exists()
        assert not (temp / "stale_dir").exists()
    finally:
        server.stop()


@pytest.mark.parametrize("email", ["not-an-email", "", "two@@example.com", "spaces in@example.com"])
def test_upsert_invalid_email(tmp_path: Path, email: str) -> None:
    data_dir = tmp_path / "pb_data"
    result = run_cli("superuser", "upsert", email, SUPERUSER_PASSWORD, data_dir=data_dir, check=False)
    assert_clean_failure(result)
    assert "Successfully" not in result.stdout
    if (data_dir / "data.db").exists():
        assert superusers(data_dir) == []


@pytest.mark.parametrize("password", ["short", "1234567", ""])
def test_upsert_short_password(tmp_path: Path, password: str) -> None:
    data_dir = tmp_path / "pb_data"
    result = run_cli("superuser", "upsert", SUPERUSER_EMAIL, password, data_dir=data_dir, check=False)
    assert_clean_failure(result)
    assert "Successfully" not in result.stdout
    if (data_dir / "data.db").exists():
        assert superusers(data_dir) == []


def test_upsert_short_password_keeps_existing_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    before = superusers(data_dir)[0]
    assert_clean_failure(run_cli("superuser", "upsert", SUPERUSER_EMAIL, "short", data_dir=data_dir, check=False))
    after = superusers(data_dir)[0]
    assert after["password"] == before["password"] and after["tokenKey"] == before["tokenKey"]


def test_upsert_missing_arguments(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("superuser", "upsert", data_dir=tmp_path / "pb_data", check=False))
    assert_clean_failure(run_cli("superuser", "upsert", SUPERUSER_EMAIL, data_dir=tmp_path / "pb_data", check=False))


# ---------------------------------------------------------------------------------------------
# superuser delete
# ---------------------------------------------------------------------------------------------


def test_delete_the_only_superuser_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    result = run_cli("superuser", "delete", SUPERUSER_EMAIL, data_dir=data_dir, check=False)
    assert_clean_failure(result)
    assert "only existing superuser" in result.stderr + result.stdout
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]


def test_delete_one_of_two_superusers(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    run_cli("superuser", "upsert", "second@example.com", "second-pass", data_dir=data_dir)
    result = run_cli("superuser", "delete", "second@example.com", data_dir=data_dir, check=False)
    assert result.returncode == 0, result.stderr
    assert 'Successfully deleted superuser "second@example.com"!' in result.stdout
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]
    # Now it is the only one again.
    again = run_cli("superuser", "delete", SUPERUSER_EMAIL, data_dir=data_dir, check=False)
    assert_clean_failure(again)
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]


def test_delete_missing_superuser(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    result = run_cli("superuser", "delete", "nobody@example.com", data_dir=data_dir, check=False)
    assert result.returncode == 0, result.stderr
    assert 'superuser "nobody@example.com" is missing or already deleted' in result.stdout
    assert "Traceback" not in result.stderr
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]


def test_delete_superuser_while_server_runs_invalidates_its_token(fresh_server: ServerProcess) -> None:
    run_cli("superuser", "upsert", "second@example.com", "second-pass", data_dir=fresh_server.data_dir)
    api = Api(fresh_server)
    try:
        token = api.login("_superusers", "second@example.com", "second-pass")
        assert api.http.get("/api/collections", headers={"Authorization": token}).status_code == 200
        result = run_cli("superuser", "delete", "second@example.com", data_dir=fresh_server.data_dir)
        assert "Successfully deleted" in result.stdout
        assert api.http.get("/api/collections", headers={"Authorization": token}).status_code == 401
    finally:
        api.close()


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


class Serving:
    """``python -m server serve`` with its merged output read line by line in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{self.port}", "--dir", str(data_dir)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} not printed in {timeout}s:\n{''.join(self.output)}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"serve exited before printing {text!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if text in line:
                return line

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_healthy(self.url, timeout, lambda: self.process.poll() is None, lambda: "".join(self.output))

    def stop(self) -> str:
        """Terminate, and return everything it printed."""
        terminate(self.process)
        self.reader.join(timeout=10)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line)
        return "".join(self.output)


def test_serve_without_superuser_prints_the_command_to_create_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    serving = Serving(data_dir)
    try:
        banner = serving.wait_for("Server started at")
        assert f"Server started at http://127.0.0.1:{serving.port}" in banner
        hint = serving.wait_for("superuser upsert", timeout=10)
        serving.wait_healthy()
    finally:
        output = serving.stop()
    assert "Traceback" not in output
    command = hint.strip()
    assert "-m server superuser upsert" in command
    assert str(data_dir) in command or "pb_data" in command

    # The printed command, with EMAIL and PASSWORD filled in, really creates a superuser.
    argv = [SUPERUSER_EMAIL if a == "EMAIL" else SUPERUSER_PASSWORD if a in ("PASSWORD", "PASS") else a
            for a in shlex.split(command)]
    assert SUPERUSER_EMAIL in argv and SUPERUSER_PASSWORD in argv, argv
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]


def test_serve_hint_command_works_for_a_dir_with_a_space(tmp_path: Path) -> None:
    data_dir = tmp_path / "my data" / "pb_data"
    serving = Serving(data_dir)
    try:
        serving.wait_for("Server started at")
        hint = serving.wait_for("superuser upsert", timeout=10)
    finally:
        serving.stop()
    argv = [SUPERUSER_EMAIL if a == "EMAIL" else SUPERUSER_PASSWORD if a in ("PASSWORD", "PASS") else a
            for a in shlex.split(hint.strip())]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [row["email"] for row in superusers(data_dir)] == [SUPERUSER_EMAIL]


def test_serve_with_superuser_prints_no_hint(tmp_path: Path) -> None:
    data_dir = tmp_path / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    serving = Serving(data_dir)
    try:
        banner = serving.wait_for("Server started at")
        assert f"Server started at http://127.0.0.1:{serving.port}" in banner
        serving.wait_healthy()  # by now the whole banner has been printed
    finally:
        output = serving.stop()
    assert "superuser upsert" not in output
    assert "No superuser" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:notaport", "127.0.0.1:99999"])
def test_serve_with_an_invalid_address(tmp_path: Path, address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--http", address, "--dir", str(tmp_path / "pb_data")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert_clean_failure(result)
    assert address in result.stderr or "address" in result.stderr.lower() or "port" in result.stderr.lower()


def test_serve_on_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{port}", "--dir", str(tmp_path / "pb_data")],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    assert_clean_failure(result)
    assert str(port) in result.stderr or "in use" in result.stderr.lower()
