"""``python -m server backup ...`` through real subprocesses: exit codes, output (plain lines off a
terminal, a tqdm bar on one), verify of good and damaged backups, delete, prune, restore, S3, and
the lock file shared with a running server (in both directions)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import sqlite3
import struct
import subprocess
import sys
import termios
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (CATALOG, ROOT, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, S3Server, ServerProcess, free_port,
                      run_cli, wait_for)
from test_backup_restore import MANIFEST, SAFETY_NAME, add_note, login, make_notes, notes, rewrite_zip, wait_idle

BUSY = "Try again later - another backup/restore process has already been started."
AUTO_NAME = re.compile(r"^pb_backup_acme_(\d{14})\.zip$")


# --- helpers -------------------------------------------------------------------------------


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m server backup ARGS --dir DATA_DIR``, with extra environment; never raises."""
    return subprocess.run([sys.executable, "-m", "server", "backup", *args, "--dir", str(data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def failed(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The stderr of a run that must have exited with ``code``."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stderr


def temp_entries(data_dir: Path) -> list[str]:
    temp = data_dir / ".pb_temp_to_delete"
    return sorted(p.name for p in temp.iterdir()) if temp.exists() else []


def local_keys(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "backups").iterdir() if p.name != CATALOG)


def new_data_dir(tmp: Path) -> Path:
    data_dir = tmp / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    return data_dir


def logged(data_dir: Path, message: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(data_dir / "auxiliary.db", timeout=10)
    try:
        rows = conn.execute("SELECT data FROM _logs WHERE message = ?", (message,)).fetchall()
    finally:
        conn.close()
    return [json.loads(row[0]) for row in rows]


def run_in_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m server ARGS`` with stdout and stderr on a pseudo-terminal (100 columns);
    returns the exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, output.decode("utf-8", "replace")


def replace_entry(source: Path, target: Path, name: str, change: Any) -> None:
    """Copy a zip entry by entry, changing ``name`` with ``change(data)`` and keeping the old manifest."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info.filename, change(data) if info.filename == name else data)


def break_index(work: Path) -> Any:
    """A ``change`` for ``rewrite_zip``: data.db stays a readable SQLite file, but one of its
    indexes no longer matches its table, so ``integrity_check`` fails."""
    def change(name: str, data: bytes) -> bytes:
        if name != "data.db":
            return data
        work.write_bytes(data)
        conn = sqlite3.connect(work)
        conn.executescript("""
            CREATE TABLE zz_broken (a TEXT, b TEXT);
            CREATE INDEX zz_broken_a ON zz_broken (a);
            INSERT INTO zz_broken VALUES ('1', 'x'), ('2', 'y'), ('3', 'z');
        """)
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX zz_broken_a ON zz_broken (b)' "
                     "WHERE name = 'zz_broken_a'")
        conn.commit()
        conn.close()
        return work.read_bytes()
    return change


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with ~40 MB of incompressible files in pb_data/storage (put there through
    the API); no server runs on it afterwards."""
    data_dir = new_data_dir(tmp_path_factory.mktemp("big"))
    server = ServerProcess(data_dir)
    server.start()
    try:
        api = Api(server)
        su = login(server)
        make_notes(api, su)
        for i in range(5):
            add_note(api, su, f"big {i}", i, os.urandom(8 << 20))
        api.close()
    finally:
        server.stop()
    size = sum(p.stat().st_size for p in (data_dir / "storage").rglob("*") if p.is_file())
    assert size >= 40 << 20
    return data_dir


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return new_data_dir(tmp_path)


@pytest.fixture()
def gated(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A gate file and the environment that holds a backup write / a restore extraction while it exists."""
    gate = tmp_path / "gate"
    env = {"PB_FAULTS": "gate:backup-write,gate:restore-extract", "PB_FAULTS_GATE": str(gate)}
    yield gate, env
    gate.unlink(missing_ok=True)


# --- create and list -----------------------------------------------------------------------


def test_create_and_list_match_the_servers_list(data_dir: Path) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = ok(cli(data_dir, "create"))
    after = datetime.now(timezone.utc)
    match = re.fullmatch(r"Created (\S+), [\d.]+ MB\n", result.stdout)
    assert match, result.stdout
    auto = match.group(1)
    stamp = AUTO_NAME.fullmatch(auto)
    assert stamp, auto
    assert before <= datetime.strptime(stamp.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc) <= after
    assert "Creating " + auto in result.stderr and "Done in" in result.stderr

    assert ok(cli(data_dir, "create", "--name", "mine.zip")).stdout.startswith("Created mine.zip, ")
    assert local_keys(data_dir) == sorted([auto, "mine.zip"])

    # Names: taken, or not of the allowed form: exit 1 with the validation reason, nothing made.
    stderr = failed(cli(data_dir, "create", "--name", "mine.zip"))
    assert "already exists" in stderr and "Traceback" not in stderr
    for bad in ("Bad Name.zip", "upper.ZIP", "no-extension", "../up.zip", "x" * 150 + ".zip"):
        stderr = failed(cli(data_dir, "create", "--name", bad))
        assert "name:" in stderr and ("valid format" in stderr or "length" in stderr), (bad, stderr)
    assert local_keys(data_dir) == sorted([auto, "mine.zip"])

    # The archives are sound zips with the databases and the manifest.
    for key in (auto, "mine.zip"):
        with zipfile.ZipFile(data_dir / "backups" / key) as archive:
            assert archive.testzip() is None
            names = set(archive.namelist())
            assert {"data.db", "auxiliary.db", MANIFEST} <= names
            manifest = json.loads(archive.read(MANIFEST))
            assert set(manifest["files"]) == names - {MANIFEST}

    table = ok(cli(data_dir, "list")).stdout.splitlines()
    assert [line.split()[0] for line in table] == sorted([auto, "mine.zip"])
    listed = json.loads(ok(cli(data_dir, "list", "--json")).stdout)
    for line, item in zip(table, listed):
        assert f"{item['size']:,d}" in line and item["modified"] in line

    # What the server's API lists for the same directory, field for field.
    server = ServerProcess(data_dir)
    server.start()
    try:
        response = httpx.get(server.url + "/api/backups", headers=login(server), timeout=10)
        assert response.status_code == 200
        assert sorted(response.json(), key=lambda b: b["key"]) == sorted(listed, key=lambda b: b["key"])
    finally:
        server.stop()

    # What the CLI did is in the logs, as the server's own jobs are.
    assert sorted(entry["key"] for entry in logged(data_dir, "Backup created")) == sorted([auto, "mine.zip"])


def test_list_of_an_empty_or_missing_directory(tmp_path: Path, data_dir: Path) -> None:
    result = ok(cli(data_dir, "list"))
    assert result.stdout == "" and "No backups" in result.stderr
    assert json.loads(ok(cli(data_dir, "list", "--json")).stdout) == []
    stderr = failed(cli(tmp_path / "nowhere", "list"))
    assert "No data directory" in stderr
    assert not (tmp_path / "nowhere").exists()


# --- progress ------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_a_plain_line_per_step(big_dir: Path) -> None:
    result = ok(cli(big_dir, "create", "--name", "plain.zip"))
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "Creating plain.zip (local storage) ..."
    assert re.fullmatch(r"Writing the archive \(4\d\.\d MB\) \.\.\.", lines[1]), lines
    # Between the step lines, a line per quarter seen while the job runs (a fast one may show none).
    for line in lines[2:-1]:
        assert re.fullmatch(r"  (25|50|75)%: [\d.]+ MB of 4\d\.\d MB, [\d.]+ MB/s", line), lines
    assert re.fullmatch(r"Done in [\d.]+ s\.", lines[-1]), lines
    assert result.stdout.startswith("Created plain.zip, 4")

    result = ok(cli(big_dir, "verify", "plain.zip"))
    assert "\r" not in result.stderr
    assert re.search(r"^Extracting and checking \(4\d\.\d MB\) \.\.\.$", result.stderr, re.M), result.stderr
    assert "plain.zip is a valid backup" in result.stdout


def test_progress_on_a_terminal_is_a_bar(big_dir: Path) -> None:
    code, output = run_in_pty(["backup", "create", "--name", "tty.zip", "--dir", str(big_dir)])
    assert code == 0, output
    assert "Writing the archive" in output and "%|" in output, output
    assert re.search(r"Writing the archive: 100%\|", output), output  # the bar ends full
    assert re.search(r"[\d.]+[kMG]?B/s", output), output
    assert re.search(r"/4\d\.\dM", output), output  # bytes done / total, in MB
    assert "\r" in output  # redrawn in place
    assert "Created tty.zip" in output

    code, output = run_in_pty(["backup", "verify", "tty.zip", "--dir", str(big_dir)])
    assert code == 0, output
    assert "Extracting and checking" in output and "%|" in output and "B/s" in output, output
    assert "tty.zip is a valid backup" in output
    assert temp_entries(big_dir) == []


# --- verify --------------------------------------------------------------------------------


def test_verify_tells_a_sound_backup_from_damaged_ones(data_dir: Path) -> None:
    ok(cli(data_dir, "create", "--name", "good.zip"))
    backups = data_dir / "backups"
    good = backups / "good.zip"
    result = ok(cli(data_dir, "verify", "good.zip"))
    assert re.fullmatch(r"good\.zip is a valid backup: \d+ files, [\d.]+ MB; manifest checksums, "
                        r"databases pass integrity_check\.\n", result.stdout), result.stdout

    # A PocketBase-style zip (no manifest) is valid too, and said to be without one.
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(backups / "bare.zip", "w") as bare:
        for info in source.infolist():
            if info.filename != MANIFEST:
                bare.writestr(info.filename, source.read(info))
    assert "no manifest" in ok(cli(data_dir, "verify", "bare.zip")).stdout

    def flip(data: bytes) -> bytes:
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]

    replace_entry(good, backups / "checksum.zip", "data.db", flip)
    rewrite_zip(good, backups / "notsqlite.zip", lambda name, data: b"garbage" * 700 if name == "data.db" else data)
    rewrite_zip(good, backups / "integrity.zip", break_index(data_dir.parent / "work.db"))
    rewrite_zip(good, backups / "nodata.zip", lambda name, data: None if name == "data.db" else data)
    (backups / "truncated.zip").write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    (backups / "notzip.zip").write_bytes(b"this is not a zip archive at all\n" * 50)
    cases = {
        "checksum.zip": "the checksum of 'data.db' does not match the manifest",
        "notsqlite.zip": "data.db is not a valid SQLite database",
        "integrity.zip": "data.db failed its integrity check",
        "nodata.zip": "the archive has no data.db at its root",
        "truncated.zip": "the file is not a readable zip archive",
        "notzip.zip": "the file is not a readable zip archive",
    }
    for key, reason in cases.items():
        result = cli(data_dir, "verify", key)
        stderr = failed(result)
        assert f"Error: {key} is NOT a valid backup: {reason}" in stderr, (key, stderr)
        assert result.stdout == "" and "Traceback" not in stderr
        assert temp_entries(data_dir) == [], key

    # --quick: the restore's tier. The manifest vouches for integrity.zip's bytes, so quick_check
    # runs, which does not match indexes against their tables; the full check above caught it.
    assert ok(cli(data_dir, "verify", "--quick", "integrity.zip")).stdout.endswith("databases pass quick_check.\n")
    assert "databases pass integrity_check." in ok(cli(data_dir, "verify", "--quick", "bare.zip")).stdout
    stderr = failed(cli(data_dir, "verify", "--quick", "notsqlite.zip"))
    assert "data.db is not a valid SQLite database" in stderr

    stderr = failed(cli(data_dir, "verify", "missing.zip"))
    assert "No backup named 'missing.zip'" in stderr
    assert temp_entries(data_dir) == []
    # Verifying changed nothing: every file is still there, the good one still valid.
    assert len(local_keys(data_dir)) == 2 + len(cases)
    ok(cli(data_dir, "verify", "good.zip"))


# --- delete and prune ----------------------------------------------------------------------


def test_delete(data_dir: Path) -> None:
    ok(cli(data_dir, "create", "--name", "gone.zip"))
    ok(cli(data_dir, "create", "--name", "stays.zip"))
    result = ok(cli(data_dir, "delete", "gone.zip"))
    assert result.stdout == "Deleted gone.zip\n"
    assert local_keys(data_dir) == ["stays.zip"]
    for key in ("gone.zip", "never.zip"):
        stderr = failed(cli(data_dir, "delete", key))
        assert f"No backup named '{key}'" in stderr
    assert local_keys(data_dir) == ["stays.zip"]


def test_prune_keeps_the_newest_scheduled_backups_and_never_the_manual_ones(data_dir: Path) -> None:
    ok(cli(data_dir, "create", "--name", "source.zip"))
    backups = data_dir / "backups"
    source = backups / "source.zip"
    auto = [  # oldest first, by the name's timestamp then its _N suffix
        "@auto_pb_backup_acme_20260101000000.zip",
        "@auto_pb_backup_acme_20260102000000.zip",
        "@auto_pb_backup_acme_20260102000000_2.zip",
        "@auto_pb_backup_acme_20260102000000_10.zip",
        "@auto_pb_backup_acme_20260103000000.zip",
    ]
    manual = ["pb_backup_acme_20200101000000.zip", "mine.zip", "source.zip"]
    for i, key in enumerate(auto + manual[:2]):
        shutil.copyfile(source, backups / key)
        mtime = time.time() - 1000 * i  # the modified times run the other way: the names decide
        os.utime(backups / key, (mtime, mtime))

    result = ok(cli(data_dir, "prune", "--keep", "2"))
    assert result.stdout.splitlines() == [f"Deleted {key}" for key in reversed(auto[:3])]
    assert "Kept the newest 2 unpinned scheduled (@auto_) backups: 3 deleted" in result.stderr
    assert local_keys(data_dir) == sorted(auto[3:] + manual)

    result = ok(cli(data_dir, "prune", "--keep", "2"))  # nothing more to do
    assert result.stdout == "" and ": 0 deleted" in result.stderr

    result = ok(cli(data_dir, "prune", "--keep", "0"))
    assert sorted(result.stdout.splitlines()) == sorted(f"Deleted {key}" for key in auto[3:])
    assert local_keys(data_dir) == sorted(manual)

    for keep in ("-1", "x"):
        result = cli(data_dir, "prune", "--keep", keep)
        assert result.returncode != 0 and result.stderr, keep
    assert "--keep must be 0 or more" in cli(data_dir, "prune", "--keep", "-1").stderr
    assert local_keys(data_dir) == sorted(manual)

    # --all: every backup counts; the newest by the name's timestamp is kept.
    newest = ok(cli(data_dir, "create")).stdout.split()[1].rstrip(",")
    assert AUTO_NAME.fullmatch(newest) and newest > manual[0]
    result = ok(cli(data_dir, "prune", "--all", "--keep", "1"))
    assert sorted(result.stdout.splitlines()) == sorted(f"Deleted {key}" for key in manual)
    assert "Kept the newest 1 unpinned backups: 3 deleted" in result.stderr
    assert local_keys(data_dir) == [newest]
    assert sorted(entry["key"] for entry in logged(data_dir, "Backup pruned")) == sorted(auto + manual)


# --- restore -------------------------------------------------------------------------------


def test_restore_with_the_server_stopped_and_refusals(data_dir: Path) -> None:
    server = ServerProcess(data_dir)
    server.start()
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "kept", 1, b"a file in the backup")
    add_note(api, su, "changed later", 2)
    before = notes(api, su)
    ok(cli(data_dir, "create", "--name", "snap.zip"))  # beside the running server
    add_note(api, su, "added later", 3)
    changed = next(r for r in before.values() if r["n"] == 2)
    assert api.http.patch(f"/api/collections/notes/records/{changed['id']}", headers=su,
                          json={"title": "after"}).status_code == 200
    current = notes(api, su)

    # A server runs: refused, and pointed at the API; the server goes on untouched.
    pid = server.process.pid
    result = cli(data_dir, "restore", "snap.zip")
    stderr = failed(result)
    assert "A server is running on this data directory" in stderr
    assert "POST /api/backups/snap.zip/restore" in stderr
    assert server.process.poll() is None and server.process.pid == pid
    assert notes(api, login(server)) == current
    assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
    server.stop()

    # Damaged backups, or none: refused with the reason, the data unchanged and nothing left over.
    source = data_dir / "backups" / "snap.zip"
    # (No manifest vouches for its bytes, so the restore runs the full integrity_check.)
    rewrite_zip(source, data_dir / "backups" / "bad.zip", break_index(data_dir.parent / "work.db"), manifest_too=False)
    stderr = failed(cli(data_dir, "restore", "bad.zip"))
    assert "nothing was changed" in stderr and "data.db failed its integrity check" in stderr, stderr
    with zipfile.ZipFile(source) as archive:
        stored = next(n for n in archive.namelist() if n.startswith("storage/"))
    replace_entry(source, data_dir / "backups" / "flipped.zip", stored, lambda d: d[:-1] + b"!")
    stderr = failed(cli(data_dir, "restore", "flipped.zip"))
    assert f"the checksum of {stored!r} does not match the manifest" in stderr, stderr
    stderr = failed(cli(data_dir, "restore", "missing.zip"))
    assert "Missing or invalid backup file." in stderr
    assert temp_entries(data_dir) == []
    assert not (data_dir / ".pb_restore").exists()
    assert sorted(entry["key"] for entry in logged(data_dir, "Backup restore failed")) == ["bad.zip", "flipped.zip"]

    server.start()
    assert notes(api, login(server)) == current
    server.stop()

    result = ok(cli(data_dir, "restore", "snap.zip"))
    restored, saved = result.stdout.splitlines()
    assert restored == "Restored snap.zip"
    safety = saved.removeprefix("The replaced data was saved as ")
    assert SAFETY_NAME.fullmatch(safety), saved
    for step in ("Fetching, extracting and verifying snap.zip", "Swapping the data", "Opening the restored data",
                 "Saving the replaced data as a backup"):
        assert step in result.stderr
    assert temp_entries(data_dir) == []
    assert not (data_dir / ".pb_restore").exists()
    # The backups stay, and the data the restore replaced is one more.
    assert sorted(local_keys(data_dir)) == sorted(["bad.zip", "flipped.zip", "snap.zip", safety])

    server.start()
    su = login(server)
    assert notes(api, su) == before
    kept = next(r for r in before.values() if r["n"] == 1)
    response = api.http.get(f"/api/files/notes/{kept['id']}/{kept['doc']}")
    assert response.status_code == 200 and response.content == b"a file in the backup"
    api.close()
    server.stop()
    assert [entry["key"] for entry in logged(data_dir, "Backup restored")] == ["snap.zip"]


# --- the lock shared with a running server -------------------------------------------------


def test_the_cli_and_a_server_never_run_two_jobs_at_once(data_dir: Path, gated: tuple[Path, dict[str, str]]) -> None:
    gate, env = gated
    server = ServerProcess(data_dir, env=env)
    server.start()
    try:
        api = Api(server)
        su = login(server)
        make_notes(api, su)
        add_note(api, su, "one", 1, b"a file")
        ok(cli(data_dir, "create", "--name", "base.zip"))
        ok(cli(data_dir, "create", "--name", "other.zip"))
        archive_bytes = (data_dir / "backups" / "base.zip").read_bytes()

        # (a) The server runs a job: the CLI's jobs are refused; reading is not.
        gate.touch()
        assert api.http.post("/api/backups", headers=su, json={"name": "by_server.zip"}).status_code == 204
        for args in (["create"], ["create", "--name", "by_cli.zip"], ["delete", "other.zip"],
                     ["prune", "--keep", "0"], ["prune", "--all", "--keep", "0"]):
            stderr = failed(cli(data_dir, *args, env=env))
            assert f"Error: {BUSY}" in stderr, (args, stderr)
        assert [line.split()[0] for line in ok(cli(data_dir, "list")).stdout.splitlines()] == ["base.zip", "other.zip"]
        ok(cli(data_dir, "verify", "base.zip"))
        assert api.http.get("/api/backups/status", headers=su).json()["active"]["key"] == "by_server.zip"
        gate.unlink()
        last = wait_idle(server)
        assert last["ok"] and last["key"] == "by_server.zip", last  # the CLI runs did not disturb it
        assert local_keys(data_dir) == ["base.zip", "by_server.zip", "other.zip"]
        ok(cli(data_dir, "create", "--name", "by_cli.zip", env=env))
        ok(cli(data_dir, "delete", "by_cli.zip"))

        # (b) The CLI runs a job: the server refuses its own, and says it cannot back up.
        gate.touch()
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "backup", "create", "--name", "held.zip", "--dir", str(data_dir)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        try:
            # In the job (writing its archive), not just opening the data (which takes the lock briefly).
            wait_for(lambda: any(name.startswith("upload_") for name in temp_entries(data_dir)),
                     what="the CLI backup to be writing")
            assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is False
            response = api.http.post("/api/backups", headers=su, json={"name": "refused.zip"})
            assert response.status_code == 400 and response.json()["message"] == BUSY
            response = api.http.post("/api/backups/upload", headers=su,
                                     files={"file": ("up.zip", archive_bytes, "application/zip")})
            assert response.status_code == 400 and response.json()["message"] == BUSY, response.text
            response = api.http.post("/api/backups/base.zip/restore", headers=su)
            assert response.status_code == 400 and response.json()["message"] == BUSY
            stderr = failed(cli(data_dir, "create", "--name", "second.zip"))  # nor a second CLI
            assert BUSY in stderr
            assert process.poll() is None
        finally:
            gate.unlink(missing_ok=True)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert stdout.startswith("Created held.zip")
        assert api.http.get("/api/health", headers=su).json()["data"]["canBackup"] is True
        assert api.http.post("/api/backups", headers=su, json={"name": "after.zip"}).status_code == 204
        last = wait_idle(server)
        assert last["ok"] and last["key"] == "after.zip", last
        assert local_keys(data_dir) == ["after.zip", "base.zip", "by_server.zip", "held.zip", "other.zip"]
        with zipfile.ZipFile(data_dir / "backups" / "held.zip") as archive:
            assert archive.testzip() is None
        assert temp_entries(data_dir) == []
        api.close()
    finally:
        server.stop()


def test_a_cli_restore_keeps_a_server_from_starting(data_dir: Path, gated: tuple[Path, dict[str, str]]) -> None:
    gate, env = gated
    ok(cli(data_dir, "create", "--name", "snap.zip"))
    gate.touch()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "backup", "restore", "snap.zip", "--dir", str(data_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        wait_for(lambda: any(name.startswith("restore_") for name in temp_entries(data_dir)),
                 what="the restore to be extracting")
        port = free_port()
        serve = subprocess.run([sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{port}",
                                "--dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert serve.returncode != 0
        output = serve.stdout + serve.stderr
        assert "a restore from the command line" in output, output
        # Meanwhile the CLI refuses other jobs too.
        assert BUSY in failed(cli(data_dir, "create"))
        assert process.poll() is None
    finally:
        gate.unlink(missing_ok=True)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    restored, saved = stdout.splitlines()
    assert restored == "Restored snap.zip" and saved.startswith("The replaced data was saved as @pre_restore_")
    server = ServerProcess(data_dir)
    server.start()
    try:
        response = httpx.get(server.url + "/api/backups", headers=login(server), timeout=10)
        keys = [b["key"] for b in response.json()]
        assert keys[1:] == ["snap.zip"] and SAFETY_NAME.fullmatch(keys[0]), keys
    finally:
        server.stop()


def test_a_server_starting_during_a_cli_backup_leaves_its_work_alone(data_dir: Path,
                                                                    gated: tuple[Path, dict[str, str]]) -> None:
    """A starting server empties the temp directory only when no job runs anywhere: the CLI's
    backup in progress there survives it (and so does the reverse, a CLI beside a server)."""
    gate, env = gated
    gate.touch()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "backup", "create", "--name", "beside.zip", "--dir", str(data_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    server = ServerProcess(data_dir)
    try:
        wait_for(lambda: any(name.startswith("upload_") for name in temp_entries(data_dir)),
                 what="the CLI backup to be writing")
        server.start()
        assert any(name.startswith("upload_") for name in temp_entries(data_dir))  # left alone
        su = login(server)
        assert httpx.get(server.url + "/api/health", headers=su, timeout=10).json()["data"]["canBackup"] is False
        gate.unlink()
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert stdout.startswith("Created beside.zip")
        with zipfile.ZipFile(data_dir / "backups" / "beside.zip") as archive:
            assert archive.testzip() is None
        response = httpx.get(server.url + "/api/backups", headers=su, timeout=10)
        assert [b["key"] for b in response.json()] == ["beside.zip"]
        assert temp_entries(data_dir) == []
    finally:
        gate.unlink(missing_ok=True)
        if process.poll() is None:
            process.kill()
        server.stop()


def test_cli_runs_after_a_server_backup_still_see_the_servers_writes(data_dir: Path) -> None:
    """A server that has made a backup still holds its SQLite locks, so a CLI closing its
    connections leaves the server's WAL alone, and a CLI backup holds the server's latest writes."""
    server = ServerProcess(data_dir)
    server.start()
    try:
        api = Api(server)
        su = login(server)
        make_notes(api, su)
        assert api.http.post("/api/backups", headers=su, json={"name": "by_server.zip"}).status_code == 204
        assert wait_idle(server)["ok"]
        ok(cli(data_dir, "list"))
        for i in range(3):
            add_note(api, su, f"after {i}", i)
        assert len(notes(api, su)) == 3
        ok(cli(data_dir, "create", "--name", "by_cli.zip"))
        with zipfile.ZipFile(data_dir / "backups" / "by_cli.zip") as archive:
            copy = data_dir.parent / "by_cli.db"
            copy.write_bytes(archive.read("data.db"))
        conn = sqlite3.connect(copy)
        try:
            assert conn.execute("SELECT count(*) FROM notes").fetchone() == (3,)
        finally:
            conn.close()
        api.close()
    finally:
        server.stop()


# --- S3 ------------------------------------------------------------------------------------


def test_backups_in_s3_per_the_saved_settings(data_dir: Path, s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    server = ServerProcess(data_dir)
    server.start()
    try:
        response = httpx.patch(server.url + "/api/settings", headers=login(server), timeout=30,
                               json={"backups": {"s3": s3_server.settings(bucket)}})
        assert response.status_code == 200, response.text
    finally:
        server.stop()

    result = ok(cli(data_dir, "create", "--name", "cloud.zip"))
    assert "Creating cloud.zip (s3 storage)" in result.stderr
    assert s3_server.objects(bucket) == ["cloud.zip"]
    assert local_keys(data_dir) == []
    listed = json.loads(ok(cli(data_dir, "list", "--json")).stdout)
    assert [b["key"] for b in listed] == ["cloud.zip"]
    assert listed[0]["size"] == (s3_server.root / bucket / "cloud.zip").stat().st_size
    assert ok(cli(data_dir, "list")).stdout.startswith("cloud.zip ")

    result = ok(cli(data_dir, "verify", "cloud.zip"))
    assert "cloud.zip is a valid backup" in result.stdout
    assert "Downloading" in result.stderr and "Extracting and checking" in result.stderr
    assert temp_entries(data_dir) == []
    assert "No backup named 'nope.zip'" in failed(cli(data_dir, "verify", "nope.zip"))
    assert "already exists" in failed(cli(data_dir, "create", "--name", "cloud.zip"))

    assert ok(cli(data_dir, "delete", "cloud.zip")).stdout == "Deleted cloud.zip\n"
    assert s3_server.objects(bucket) == []
    assert "No backup named 'cloud.zip'" in failed(cli(data_dir, "delete", "cloud.zip"))
    assert json.loads(ok(cli(data_dir, "list", "--json")).stdout) == []
    assert [entry["key"] for entry in logged(data_dir, "Backup created")] == ["cloud.zip"]
