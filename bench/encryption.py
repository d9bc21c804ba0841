"""Encrypted backups and restores (issue 17) against plain ones: the same server, data and run.

    python -m bench.encryption [--scale 1.0] [--seed 1] [--runs 3] [--keep] [--out FILE] [--timeout SECONDS]

The data is bench.compare's (``generate``: 1.2 M records and 200 files at scale 1) in our server.
Each run, on a fresh copy of the data, times in turn (the order alternates between runs, so
that a machine that slows down or speeds up during the run does not favour one side):

- a backup with ``backups.encryption.recipients`` empty, and one with a recipient (an X25519
  key made here with pyrage), each followed through ``/api/backups/status``;
- the full restore of each, from the request until the restored data is served after the
  re-exec (bench.compare's ``Client.restore``), the encrypted one with the identity in the body;
  then the safety copy of the replaced data is waited for (not measured);
- the server's peak RSS in each phase (bench.compare's ``watching``).

The report: the medians, and the ratios encrypted / plain (goals: backup and restore <= 1.10,
peak RSS within 10 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pyrage

from .compare import DEFAULT_TIMEOUT, OURS, BenchError, Client, counts, generate, make_server, watching
from .s3_memory import MB, Api, machine, source_version, tail

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "encryption.json"
GOAL_RATIO = 1.10
GOAL_RSS_MB = 10.0


def set_recipients(client: Client, recipients: list[str]) -> None:
    response = client.api.http.patch("/api/settings", json={"backups": {"encryption": {"recipients": recipients}}})
    Api._check(response, "set the recipients", 200)


def one_run(data_dir: Path, timeout: float, identity: str, recipient: str, encrypted_first: bool) -> dict[str, Any]:
    log_path = data_dir.parent / "server.log"
    server = make_server(OURS, data_dir, log_path)
    server.start(timeout=120)
    result: dict[str, Any] = {}
    try:
        client = Client(OURS, server, timeout)
        pid = server.pid
        order = ["encrypted", "plain"] if encrypted_first else ["plain", "encrypted"]
        for side in order:
            set_recipients(client, [recipient] if side == "encrypted" else [])
            name = f"bench_{side}.zip"
            with watching(pid) as box:
                started = time.perf_counter()
                client.backup(name)
                box["seconds"] = time.perf_counter() - started
            measured = box["measured"]
            head = (data_dir / "backups" / name).read_bytes()[:21]
            if (head == b"age-encryption.org/v1") != (side == "encrypted"):
                raise BenchError(f"the {side} backup is not what it should be: {head!r}")
            result[f"backup_{side}"] = {"seconds": round(measured.seconds, 3), "peak_rss_mb": round(measured.peak / MB, 1),
                                        "bytes": (data_dir / "backups" / name).stat().st_size}
        set_recipients(client, [])  # the safety copies of the restores below: plain on both sides
        for side in order:
            name = f"bench_{side}.zip"
            marker = client.add_record(f"after the {side} backup")
            body = {"identity": identity} if side == "encrypted" else None
            with watching(pid, use_hwm=False) as box:  # an exec resets VmHWM: sampled only
                started = time.perf_counter()
                seen = client.restore(name, gone=marker, present=[], body=body)
                box["seconds"] = time.perf_counter() - started
            measured = box["measured"]
            client.wait_idle()  # the safety copy, before the next phase
            if server.pid != pid:
                raise BenchError("the server's PID changed during the restore")
            result[f"restore_{side}"] = {"seconds": round(measured.seconds, 3), "peak_rss_mb": round(measured.peak / MB, 1),
                                         "switch_s": (round(seen["done_s"] - seen["last_old_s"], 3)
                                                      if seen.get("last_old_s") is not None else None)}
        client.close()
    except (BenchError, RuntimeError, httpx.HTTPError, OSError) as exc:
        raise BenchError(f"{exc}\n--- server log (tail) ---\n{tail(log_path)}") from exc
    finally:
        server.stop()
    return result


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for phase in ("backup", "restore"):
        plain = statistics.median(r[f"{phase}_plain"]["seconds"] for r in runs)
        encrypted = statistics.median(r[f"{phase}_encrypted"]["seconds"] for r in runs)
        each = [round(r[f"{phase}_encrypted"]["seconds"] / r[f"{phase}_plain"]["seconds"], 2) for r in runs]
        rows.append({"metric": f"{phase} s", "plain": plain, "encrypted": encrypted,
                     "ratio": round(statistics.median(each), 2), "each": each, "goal": f"<= {GOAL_RATIO}",
                     "met": statistics.median(each) <= GOAL_RATIO})
        rss_plain = max(r[f"{phase}_plain"]["peak_rss_mb"] for r in runs)
        rss_encrypted = max(r[f"{phase}_encrypted"]["peak_rss_mb"] for r in runs)
        rows.append({"metric": f"{phase}: peak RSS MB", "plain": rss_plain, "encrypted": rss_encrypted,
                     "ratio": round(rss_encrypted - rss_plain, 1), "each": None, "goal": f"+{GOAL_RSS_MB} MB at most",
                     "met": rss_encrypted - rss_plain <= GOAL_RSS_MB})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'metric':<22} {'plain':>8} {'encrypted':>10} {'enc/plain':>10}  {'each run':<18} {'goal':<18} met"]
    for row in rows:
        diff = row["metric"].endswith("MB")
        ratio = f"{row['ratio']:+.1f} MB" if diff else f"{row['ratio']:.2f}"
        each = ", ".join(f"{v:.2f}" for v in row["each"]) if row["each"] else ""
        lines.append(f"{row['metric']:<22} {row['plain']:>8.2f} {row['encrypted']:>10.2f} {ratio:>10}  {each:<18} "
                     f"{row['goal']:<18} {'yes' if row['met'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.encryption", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    begun = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pb-bench-encryption-"))
    key = pyrage.x25519.Identity.generate()
    identity, recipient = str(key), str(key.to_public())
    try:
        rows_n, files_n = counts(args.scale)
        print(f"generating {rows_n} records and {files_n} files (scale {args.scale}, seed {args.seed}) in {work} ...", flush=True)
        _dataset, dirs = generate(work, [OURS], args.scale, args.seed)
        runs: list[dict[str, Any]] = []
        for number in range(1, max(1, args.runs) + 1):
            run_dir = work / f"run{number}" / "pb_data"
            shutil.copytree(dirs[OURS], run_dir, symlinks=True)
            encrypted_first = number % 2 == 0
            print(f"run {number}: {'encrypted' if encrypted_first else 'plain'} first ...", flush=True)
            try:
                runs.append(one_run(run_dir, args.timeout, identity, recipient, encrypted_first))
            except BenchError as exc:
                print(f"FAILED: {exc}", file=sys.stderr)
                return 1
            finally:
                if not args.keep:
                    shutil.rmtree(run_dir.parent, ignore_errors=True)
            print("  " + json.dumps(runs[-1]), flush=True)
        rows = summary(runs)
        print()
        print(table(rows))
        info = machine()
        print(f"\nmedians of {len(runs)} runs; machine: {info['cores']} cores, Python {info['python']}; whole run "
              f"{time.perf_counter() - begun:.0f} s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "encryption", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        "scale": args.scale, "seed": args.seed, "source": source_version(),
                                        "machine": info, "runs": runs, "summary": rows}, indent=1) + "\n")
        print(f"written to {args.out}")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, True)


if __name__ == "__main__":
    raise SystemExit(main())
