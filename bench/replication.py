"""Replication measured (issue 16), side by side with Litestream 0.5.17 beside our server.

    python -m bench.replication [--seconds 6] [--kills 5] [--no-s3]

Modes, each on a fresh data directory, one client writing numbered rows through the HTTP API
as fast as it can, the server SIGKILLed at a random moment (the last half of the run), pb_data
deleted and restored from the replica:
- ``off``: ours, replication off (the write-path baseline; nothing to restore);
- ``on``: ours, replication to a local directory, syncInterval 1000;
- ``sync``: ours, syncInterval 0 (a write is answered once it is in the replica);
- ``litestream``: ours with replication off, ``litestream replicate`` beside it (file replica,
  sync-interval 1s), both SIGKILLed together, restored with ``litestream restore``.
Per mode: writes/s, write p50/p99 (ms), acknowledged writes lost per kill, the oldest lost write's
age at the kill (s), the WAL's largest size seen (sampled every 20 ms), the server's peak RSS.
Then: restore time of the same replica by our CLI and by ``litestream restore``, and (unless
--no-s3) S3 requests per minute, busy and idle, with rclone's S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, S3Server, ServerProcess, run_cli  # noqa: E402

LITESTREAM = Path(sysconfig.get_path("scripts")) / "litestream"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else float("nan")


def rss_peak(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rows_of(db: Path) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        return {int(r[0]) for r in conn.execute("SELECT n FROM nums")}
    finally:
        conn.close()


class Setup:
    def __init__(self, tmp: Path, mode: str, s3: S3Server | None = None) -> None:
        self.tmp = tmp
        self.mode = mode
        self.data_dir = tmp / "pb_data"
        self.replica = tmp / "replica"
        run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=self.data_dir)
        self.server = ServerProcess(self.data_dir)
        self.server.start()
        self.http = httpx.Client(base_url=self.server.url, timeout=30)
        token = self.http.post("/api/collections/_superusers/auth-with-password",
                               json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}).json()["token"]
        self.su = {"Authorization": token}
        settings: dict[str, Any] = {}
        if mode in ("on", "sync", "s3"):
            settings["replication"] = {"enabled": True, "syncInterval": 0 if mode == "sync" else 1000}
            if mode != "s3":
                settings["replication"]["path"] = str(self.replica)
        if mode == "s3" and s3 is not None:
            bucket = s3.bucket()
            settings["s3"] = s3.settings(bucket)
        if settings:
            response = self.http.patch("/api/settings", headers=self.su, json={"backups": settings})
            assert response.status_code == 200, response.text
        response = self.http.post("/api/collections", headers=self.su, json={
            "name": "nums", "type": "base", "fields": [{"name": "n", "type": "number"}]})
        assert response.status_code == 200, response.text
        self.litestream: subprocess.Popen[bytes] | None = None
        if mode == "litestream":
            config = tmp / "litestream.yml"
            config.write_text(json.dumps({"dbs": [{"path": str(self.data_dir / "data.db"), "replicas": [
                {"type": "file", "path": str(self.replica), "sync-interval": "1s"}]}]}))
            self.litestream = subprocess.Popen([str(LITESTREAM), "replicate", "-config", str(config)],
                                               stdout=open(tmp / "litestream.log", "ab"), stderr=subprocess.STDOUT)
            time.sleep(1.5)  # its first snapshot

    def kill(self) -> float:
        assert self.server.process is not None
        pids = [self.server.process.pid] + ([self.litestream.pid] if self.litestream else [])
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        self.server.process.wait()
        self.server.process = None
        if self.litestream is not None:
            self.litestream.wait()
        self.http.close()
        return killed

    def restore(self) -> tuple[Path, float]:
        target = self.tmp / "restored"
        started = time.perf_counter()
        if self.mode == "litestream":
            target.mkdir()
            done = subprocess.run([str(LITESTREAM), "restore", "-o", str(target / "data.db"), f"file://{self.replica}"],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        else:
            run_cli("backup", "replica", "restore", "--from", str(self.replica), "--dir", str(target))
        return target / "data.db", time.perf_counter() - started


def write_until(setup: Setup, stop_at: float, wal: Path) -> tuple[list[tuple[int, float, float]], int, float]:
    """Rows written until ``stop_at`` then the kill: [(n, sent, acked)], the WAL's peak, the peak RSS."""
    acked: list[tuple[int, float, float]] = []
    peak_wal = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak_wal[0] = max(peak_wal[0], wal.stat().st_size)
            except OSError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = 0
    while time.time() < stop_at:
        n += 1
        sent = time.time()
        response = setup.http.post("/api/collections/nums/records", headers=setup.su, json={"n": n})
        if response.status_code != 200:
            raise RuntimeError(response.text)
        acked.append((n, sent, time.time()))
    done.set()
    assert setup.server.process is not None
    return acked, peak_wal[0], rss_peak(setup.server.process.pid)


def run_mode(mode: str, seconds: float, kills: int) -> dict[str, Any]:
    lost_counts, oldest_ages, latencies, rates, wal_peaks, rss_peaks, restore_times = [], [], [], [], [], [], []
    for _ in range(max(1, kills)):
        with tempfile.TemporaryDirectory() as tmp_name:
            setup = Setup(Path(tmp_name), mode)
            run_for = seconds * random.uniform(0.5, 1.0)
            start = time.time()
            acked, wal_peak, rss = write_until(setup, start + run_for, setup.data_dir / "data.db-wal")
            elapsed = time.time() - start
            rates.append(len(acked) / elapsed)
            latencies += [(a - s) * 1000 for _, s, a in acked]
            wal_peaks.append(wal_peak)
            rss_peaks.append(rss)
            killed = setup.kill()
            if mode == "off":
                shutil.rmtree(setup.data_dir)
                continue
            shutil.rmtree(setup.data_dir)
            db, took = setup.restore()
            restore_times.append(took)
            have = rows_of(db)
            lost = [(n, a) for n, _, a in acked if n not in have]
            lost_counts.append(len(lost))
            oldest_ages.append(killed - min(a for _, a in lost) if lost else 0.0)
    return {"mode": mode, "writes_per_s": round(statistics.median(rates), 1),
            "p50_ms": round(percentile(latencies, 50), 2), "p99_ms": round(percentile(latencies, 99), 2),
            "lost_per_kill": lost_counts, "oldest_lost_s": [round(x, 2) for x in oldest_ages],
            "wal_peak_mb": round(max(wal_peaks) / 2**20, 2), "rss_peak_mb": round(max(rss_peaks), 1),
            "restore_s": round(statistics.median(restore_times), 2) if restore_times else None}


def restore_race(seconds: float) -> dict[str, Any]:
    """The same replica (ours: Litestream reads it) restored by our CLI and by ``litestream restore``."""
    with tempfile.TemporaryDirectory() as tmp_name:
        setup = Setup(Path(tmp_name), "on")
        acked, _, _ = write_until(setup, time.time() + seconds, setup.data_dir / "data.db-wal")
        time.sleep(2.0)
        status = setup.http.get("/api/backups/replication", headers=setup.su).json()
        setup.server.stop()
        ours_dir = Path(tmp_name) / "ours"
        started = time.perf_counter()
        run_cli("backup", "replica", "restore", "--from", str(setup.replica), "--dir", str(ours_dir))
        ours = time.perf_counter() - started
        out = Path(tmp_name) / "ls.db"
        started = time.perf_counter()
        done = subprocess.run([str(LITESTREAM), "restore", "-o", str(out),
                               f"file://{setup.replica / status['lineage'] / 'data.db'}"], capture_output=True, text=True)
        theirs = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        same = rows_of(out) == rows_of(ours_dir / "data.db")
        return {"rows": len(acked), "db_mb": round((ours_dir / "data.db").stat().st_size / 2**20, 2),
                "ours_s": round(ours, 2), "litestream_s": round(theirs, 2), "same_rows": same}


def s3_requests(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        s3 = S3Server(Path(tmp_name) / "s3root")
        s3.start()
        try:
            setup = Setup(Path(tmp_name), "s3", s3)
            time.sleep(2)

            def requests() -> int:
                return int(setup.http.get("/api/backups/replication", headers=setup.su).json()["requests"])

            before = requests()
            started = time.time()
            write_until(setup, started + seconds, setup.data_dir / "data.db-wal")
            busy = (requests() - before) / ((time.time() - started) / 60)
            time.sleep(3)
            before = requests()  # (this read is logged: one write, so one sync, in the window)
            idle_window = 30.0
            time.sleep(idle_window)
            idle = requests() - before
            setup.server.stop()
            return {"busy_per_min": round(busy, 1), "idle_requests_in_30s": idle,
                    "idle_note": "includes the sync of the status read's own request log"}
        finally:
            s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--modes", default="off,on,sync,litestream")
    args = parser.parse_args()
    results = [run_mode(mode, args.seconds, 1 if mode == "off" else args.kills) for mode in args.modes.split(",")]
    for row in results:
        print(json.dumps(row), flush=True)
    print(json.dumps({"restore_race": restore_race(args.seconds * 2)}), flush=True)
    if not args.no_s3:
        print(json.dumps({"s3": s3_requests(args.seconds)}), flush=True)


if __name__ == "__main__":
    main()
