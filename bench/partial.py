"""A partial restore (issue 14) of the reference collection against the full restore, same data, same run.

    python -m bench.partial [--scale 1.0] [--seed 1] [--runs 3] [--keep] [--out FILE] [--timeout SECONDS]

The data is bench.compare's (``generate``: 1.2 M records of mixed text and 200 files of 500 KiB
at scale 1) in our server, plus a small second collection ``bench_other``. A backup is made, then
``--runs`` times, in turn:

- ``partial``: ``POST /api/backups/bench.zip/restore {"collections": ["bench_records"],
  "mode": "replace"}``, followed through ``/api/backups/status`` until the job has ended (the old
  table deleted too); meanwhile a writer inserts a small record into ``bench_other`` every 20 ms
  (its latencies), a poller reads ``/api/health`` every 10 ms, and the server's RSS is sampled
  (and the kernel's VmHWM, reset before the phase). A record added to ``bench_records`` after the
  backup must then be gone, a generated one there.
- first, the writer alone for 5 s (what the machine's load gives, without a restore);
- ``full``: the full restore of the same backup, as bench.compare measures it (until the
  restored data is served after the re-exec), with the same writer; then the safety copy of the
  data it replaced is waited for (not measured) before the next phase.

The report: the median of the runs of each, their ratio (partial / full, must be <= 1.0), the
writer's p99 during the partial restore (<= 50 ms) and the peak RSS (<= 150 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from .compare import (
    COLLECTION,
    DEFAULT_TIMEOUT,
    HEALTH_INTERVAL,
    OURS,
    STATUS_POLL,
    WRITE_INTERVAL,
    BenchError,
    Client,
    Load,
    Measured,
    counts,
    generate,
    make_server,
    watching,
)
from .s3_memory import MB, Api, _raise_exit, machine, proc_status, reset_peak, source_version, tail

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "partial.json"
OTHER = "bench_other"
BACKUP = "bench.zip"
BUDGET_RATIO = 1.0
BUDGET_P99_MS = 50.0
BUDGET_RSS_MB = 150.0


def wait_job(client: Client, key: str, timeout: float) -> dict[str, Any]:
    """Poll the status until no job runs; the last job, which must be the restore of ``key``."""
    deadline = time.monotonic() + timeout
    while True:
        status = Api._check(client.api.http.get("/api/backups/status"), "backup status", 200).json()
        if status.get("active") is None:
            last = status.get("last") or {}
            if last.get("op") != "restore" or last.get("key") != key or not last.get("ok"):
                raise BenchError(f"the partial restore failed: {last}")
            return last
        if time.monotonic() > deadline:
            raise BenchError(f"the partial restore did not end within {timeout:.0f} s")
        time.sleep(STATUS_POLL)


def partial_phase(client: Client, pid: int, gone: str, present: list[str], timeout: float) -> dict[str, Any]:
    headers = {"Authorization": client.token}
    url = client.server.url
    writer = Load("writer", url, WRITE_INTERVAL,
                  lambda http, n: http.post(f"/api/collections/{OTHER}/records", json={"title": f"write {n}"}),
                  headers, timeout)
    health = Load("health", url, HEALTH_INTERVAL, lambda http, n: http.get("/api/health"), timeout=timeout)
    with watching(pid) as box:
        writer.begin()
        health.begin()
        try:
            started = time.perf_counter()
            response = client.api.http.post(f"/api/backups/{BACKUP}/restore",
                                            json={"collections": [COLLECTION], "mode": "replace"})
            Api._check(response, "start the partial restore", 204)
            last = wait_job(client, BACKUP, timeout)
            ended = time.perf_counter()
            box["seconds"] = ended - started
        finally:
            writer.end()
            health.end()
    measured: Measured = box["measured"]
    states = [client.api.http.get(f"/api/collections/{COLLECTION}/records/{record}").status_code
              for record in (gone, *present)]
    if states[0] != 404 or any(state != 200 for state in states[1:]):
        raise BenchError(f"the partial restore did not restore the collection (states {states})")
    return {"seconds": round(measured.seconds, 2), "peak_rss_mb": round(measured.peak / MB, 1),
            "baseline_rss_mb": round(measured.baseline_rss / MB, 1),
            "vm_hwm_mb": None if measured.vm_hwm is None else round(measured.vm_hwm / MB, 1),
            "server": measured.counters, "writer": writer.summary(started, ended),
            "health": health.summary(started, ended), "summary": last.get("summary")}


def full_phase(client: Client, pid: int, gone: str, present: list[str], timeout: float) -> dict[str, Any]:
    headers = {"Authorization": client.token}
    writer = Load("writer", client.server.url, WRITE_INTERVAL,
                  lambda http, n: http.post(f"/api/collections/{OTHER}/records", json={"title": f"write {n}"}),
                  headers, timeout)
    with watching(pid, use_hwm=False) as box:  # an exec resets VmHWM: sampled only
        writer.begin()
        try:
            started = time.perf_counter()
            seen = client.restore(BACKUP, gone=gone, present=present)
            ended = time.perf_counter()
            box["seconds"] = ended - started
        finally:
            writer.end()
    measured: Measured = box["measured"]
    # Then the replaced data is saved as a backup (the safety copy), in the background: not part
    # of the restore's time (as in bench.compare), but the next phase waits for it (a job at a time).
    seen["safety_copy_s"] = round(client.wait_idle() - started, 2)
    return {"seconds": round(measured.seconds, 2), "peak_rss_mb": round(measured.peak / MB, 1),
            "server": measured.counters, "seen": seen, "writer": writer.summary(started, ended, ok=200)}


def run(scale: float, seed: int, runs: int, keep: bool, out: Path | None, timeout: float) -> int:
    begun = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pb-bench-partial-"))
    with contextlib.ExitStack() as stack:
        stack.callback(print, f"kept {work}") if keep else stack.callback(shutil.rmtree, work, True)
        rows, files = counts(scale)
        print(f"working in {work}; generating {rows} records and {files} files (scale {scale}, seed {seed}) ...",
              flush=True)
        dataset, dirs = generate(work, [OURS], scale, seed)
        data_dir = dirs[OURS]
        server = make_server(OURS, data_dir, data_dir.parent / "server.log")
        server.start(timeout=120)
        stack.callback(server.stop)
        client = Client(OURS, server, timeout)
        stack.callback(lambda: client.close())
        pid = server.pid
        try:
            client.api.create_collection(OTHER, [{"name": "title", "type": "text"}])
            before = client.add_record("before the backup")
            print("backup ...", flush=True)
            client.backup(BACKUP)
            results: dict[str, list[dict[str, Any]]] = {"partial": [], "full": [], "idle": []}
            # The writer alone first: what the machine's load gives without any restore.
            writer = Load("writer", server.url, WRITE_INTERVAL,
                          lambda http, n: http.post(f"/api/collections/{OTHER}/records", json={"title": f"idle {n}"}),
                          {"Authorization": client.token}, timeout).begin()
            started = time.perf_counter()
            time.sleep(5)
            ended = time.perf_counter()
            results["idle"].append({"writer": writer.end().summary(started, ended)})
            print(f"writer alone: p99 {results['idle'][0]['writer']['p99_ms']} ms", flush=True)
            for index in range(runs):
                for phase in ("partial", "full"):
                    after = client.add_record(f"after the backup ({phase} {index})")
                    present = [before, *dataset.sample_ids]
                    measure = partial_phase if phase == "partial" else full_phase
                    result = measure(client, pid, after, present, timeout)
                    if server.pid != pid:
                        raise BenchError("the server's PID changed")
                    results[phase].append(result)
                    line = f"run {index + 1}: {phase} restore {result['seconds']:.1f} s, peak RSS " \
                           f"{result['peak_rss_mb']} MB, writer p99 {result['writer']['p99_ms']} ms " \
                           f"(max {result['writer']['max_ms']}, failed {result['writer']['failed']})"
                    print(line, flush=True)
        except (BenchError, RuntimeError, httpx.HTTPError, OSError) as exc:
            print(f"ERROR: {exc}\n--- server log (tail) ---\n{tail(server.log_path)}", file=sys.stderr)
            return 1

        def median(phase: str, getter: Any) -> float | None:
            values = [v for v in (getter(r) for r in results[phase]) if v is not None]
            return round(statistics.median(values), 2) if values else None

        partial_s = median("partial", lambda r: r["seconds"])
        full_s = median("full", lambda r: r["seconds"])
        ratio = round(partial_s / full_s, 2) if partial_s and full_s else None
        p99 = median("partial", lambda r: r["writer"]["p99_ms"])
        rss = median("partial", lambda r: r["peak_rss_mb"])
        failed = sum(r["writer"]["failed"] for r in results["partial"])
        checks = {
            f"partial / full restore time <= {BUDGET_RATIO}": ratio is not None and ratio <= BUDGET_RATIO,
            f"writer p99 during the partial restore <= {BUDGET_P99_MS:.0f} ms": p99 is not None and p99 <= BUDGET_P99_MS,
            f"peak RSS during the partial restore <= {BUDGET_RSS_MB:.0f} MB": rss is not None and rss <= BUDGET_RSS_MB,
            "no failed write during the partial restore": failed == 0,
        }
        info = machine()
        report = {"benchmark": "partial", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "scale": scale, "seed": seed, "runs": runs, "source": source_version(), "machine": info,
                  "dataset": {"rows": dataset.rows, "files": dataset.files, "db_bytes": dataset.db_bytes},
                  "median": {"partial_s": partial_s, "full_s": full_s, "ratio": ratio, "writer_p99_ms": p99,
                             "full_writer_p99_ms": median("full", lambda r: r["writer"]["p99_ms"]),
                             "idle_writer_p99_ms": median("idle", lambda r: r["writer"]["p99_ms"]),
                             "partial_peak_rss_mb": rss, "full_peak_rss_mb": median("full", lambda r: r["peak_rss_mb"]),
                             "health_p99_ms": median("partial", lambda r: r["health"]["p99_ms"])},
                  "checks": checks, "results": results, "seconds": round(time.perf_counter() - begun, 1)}
        print()
        print(f"median of {runs}: partial (replace of {COLLECTION}) {partial_s} s, full restore {full_s} s, "
              f"ratio {ratio}; writer p99 {p99} ms (full restore: {report['median']['full_writer_p99_ms']} ms, "
              f"no restore: {report['median']['idle_writer_p99_ms']} ms); "
              f"peak RSS {rss} MB (full: {report['median']['full_peak_rss_mb']} MB)")
        for label, passed in checks.items():
            print(f"  {'ok  ' if passed else 'FAIL'} {label}")
        print(f"machine: {info['cores']} cores ({info['usable_cores']} usable); data: {dataset.rows} records, "
              f"data.db {dataset.db_bytes[OURS] / MB:.0f} MB, {dataset.files} files; whole run {report['seconds']:.0f} s")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"written to {out}")
        return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.partial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the data (default 1.0)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="runs of each restore; the median is reported (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.runs < 1:
        parser.error("--scale must be positive and --runs at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        return run(args.scale, args.seed, args.runs, args.keep, args.out, args.timeout)
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
