"""Catalog latencies (issue 15): `GET /api/backups` with 1,000 backups and `GET .../info` of a
backup with many entries, local and on S3 (rclone serve s3), medians over repeated requests.

    python -m bench.catalog [--backups 1000] [--entries 10000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import (SUPERUSER_EMAIL, SUPERUSER_PASSWORD, S3Server, ServerProcess, run_cli)  # noqa: E402


def make_archive(path: Path, entries: int) -> None:
    """A backup-shaped zip: data.db, many storage files, and a manifest listing them all."""
    files = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zipped:
        zipped.writestr("data.db", os.urandom(1 << 20) * 8)
        for index in range(entries):
            name = f"storage/pbc_{index % 20}/r{index:07d}/file_{index}.txt"
            zipped.writestr(name, b"x" * 500)
            files[name] = {"size": 500, "sha256": "0" * 64}
        zipped.writestr("pb_backup_manifest.json", json.dumps(
            {"format": 1, "app": "Bench", "files": files,
             "collections": {f"c{i}": {"records": 1000, "files": entries // 20} for i in range(20)}}))


def timed(client: httpx.Client, url: str, headers: dict[str, str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(url, headers=headers)
        samples.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backups", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir = tmp / "pb_data"
        run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
        backups = data_dir / "backups"
        backups.mkdir(parents=True)
        big = backups / "big.zip"
        make_archive(big, args.entries)
        small = tmp / "small.zip"
        make_archive(small, 10)
        for index in range(args.backups - 1):
            os.link(small, backups / f"b{index:05d}.zip")
        s3 = S3Server(tmp / "s3root")
        s3.start()
        server = ServerProcess(data_dir)
        server.start()
        rows = []
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                token = client.post("/api/collections/_superusers/auth-with-password",
                                    json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}).json()["token"]
                su = {"Authorization": token}
                rows.append(("local", "list", timed(client, "/api/backups", su, args.repeat)))
                rows.append(("local", "info", timed(client, "/api/backups/big.zip/info", su, args.repeat)))
                bucket = s3.bucket()
                s3_client = s3.client()
                s3_client.upload_file(str(big), bucket, "big.zip")
                for index in range(args.backups - 1):
                    s3_client.upload_file(str(small), bucket, f"b{index:05d}.zip")
                saved = client.patch("/api/settings", headers=su, json={"backups": {"s3": s3.settings(bucket)}})
                assert saved.status_code == 200, saved.text
                rows.append(("s3", "list", timed(client, "/api/backups", su, args.repeat)))
                rows.append(("s3", "info", timed(client, "/api/backups/big.zip/info", su, args.repeat)))
        finally:
            server.stop()
            s3.stop()
        print(f"catalog latency, median of {args.repeat} requests ({args.backups} backups; info of a backup "
              f"with {args.entries} entries, {big.stat().st_size / 1e6:.1f} MB)")
        print(f"{'storage':<8} {'route':<6} {'ms':>8}  goal")
        for storage, route, ms in rows:
            goal = "< 300 ms" if route == "list" else ("< 100 ms" if storage == "local" else "a few GETs")
            print(f"{storage:<8} {route:<6} {ms:>8.1f}  {goal}")


if __name__ == "__main__":
    main()
