"""API throughput: ``wrk`` against this server and PocketBase 0.40.6, on the same data, in one run.

    python -m bench.api [--seconds 8] [--runs 3] [--conns 32,256] [--routes health,list,view,create]
                        [--rows 2000] [--backup-rows 100000] [--backup-files 20] [--no-backup]
                        [--threads 2] [--servers ours,pocketbase] [--server-args ARGS] [--keep] [--out FILE]
    python -m bench.api --show bench/results/api.json

What it does, everything in one temporary directory (removed at the end unless ``--keep``):

1. Data, the same in both servers: each server gets a superuser and two collections through its
   own API (``bench_records`` and ``bench_created``, whose list/view/create rules are public, so
   that a request measures the route and not a login; and ``bench_bulk``, superuser-only); then, with the servers stopped,
   ``--rows`` generated records go into ``bench_records`` and ``--backup-rows`` records and
   ``--backup-files`` files of 500 KiB into ``bench_bulk`` (``bench.compare``'s generator: the
   reference data of ``make bench``, scaled down), copied row for row into PocketBase's
   ``data.db``.
2. Both servers run side by side on loopback ports; one is loaded at a time. For each run
   (``--runs``), connection count (``--conns``) and route, ``wrk -t2 -cN -dS --latency`` runs
   against ours, then against PocketBase (the order alternates between runs, so that a drift of
   the machine's load hurts both alike). The routes:
   - ``health``: ``GET /api/health``;
   - ``list``: ``GET /api/collections/bench_records/records?page=P&perPage=30``, P random;
   - ``view``: ``GET /api/collections/bench_records/records/ID``, ID random among 500 records;
   - ``create``: ``POST /api/collections/bench_created/records`` with a small JSON record (a
     collection of its own, so that list and view see the same 2,000 rows in every run).
   A Lua ``done`` hook writes wrk's own counters as JSON: requests, duration, the latency
   percentiles (exact, from wrk's histogram), the socket errors (connect, read, write, timeout)
   and the answers with a status >= 400.
3. "During a backup": the same, while a thread makes backups back to back on the server under
   load (``POST /api/backups``, waited for until complete, then deleted) of the whole data
   (``bench_bulk`` included). The share of the wrk window covered by a running backup is printed.
4. The table: per route and connection count, the median of the runs for each server, the ratio
   ours / PocketBase of the throughput and the p99 latencies; the errors are summed over the runs.
   JSON in ``bench/results/api.json``.

``wrk`` is a prerequisite (Debian package ``wrk``; ``make bench-api`` installs it when it can).
The client shares the machine's cores with the server under load, as in the issue's measurements.
Absolute numbers depend on the machine and its load: only ratios are comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .compare import FIELDS, LABELS, OURS, PB, BenchError, PocketBaseProcess, copy_rows, write_rows
from .s3_memory import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, ServerProcess, machine, source_version, tail

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "api.json"
COLLECTION = "bench_records"
CREATED = "bench_created"  # the create route writes here, so that list and view see the same rows throughout
BULK = "bench_bulk"
ROUTES = ("health", "list", "view", "create")
PER_PAGE = 30
VIEW_IDS = 500
WRK_TIMEOUT = "5s"  # a request slower than that counts as a timeout error
NOTE = ("Only ratios (ours / PocketBase) are comparable between runs: absolute numbers depend on the machine "
        "and its load. wrk runs on the same cores as the server under load.")

# wrk's Lua: the done() hook prints one JSON line with wrk's own counters (latency in microseconds).
_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"status":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


class BenchApiError(BenchError):
    pass


# --- wrk -----------------------------------------------------------------------------------------


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise BenchApiError("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), or run `make bench-api` "
                            "as root, which installs it")
    return found


def lua_script(route: str, ids: list[str], pages: int) -> str:
    base = f"/api/collections/{COLLECTION}/records"
    if route == "health":
        body = ""
    elif route == "list":
        body = (f'local pages = {pages}\n'
                'request = function()\n'
                f'  return wrk.format("GET", "{base}?perPage={PER_PAGE}&page=" .. math.random(pages))\n'
                'end\n')
    elif route == "view":
        listed = ",".join(f'"{i}"' for i in ids)
        body = (f'local ids = {{{listed}}}\n'
                'request = function()\n'
                f'  return wrk.format("GET", "{base}/" .. ids[math.random(#ids)])\n'
                'end\n')
    elif route == "create":
        record = json.dumps({"title": "A record made by wrk", "body": "Some text of the benchmark, " * 8,
                             "meta": '{"ref":"wrk","seq":1}'})
        body = ('wrk.method = "POST"\n'
                f'wrk.body = {json.dumps(record)}\n'
                'wrk.headers["Content-Type"] = "application/json"\n')
    else:
        raise ValueError(route)
    seed = "math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)\n"
    return seed + body + _DONE


def route_path(route: str) -> str:
    if route == "health":
        return "/api/health"
    return f"/api/collections/{CREATED if route == 'create' else COLLECTION}/records"


def parse_wrk(output: str) -> dict[str, Any]:
    """wrk's counters from the ``WRKJSON`` line our ``done`` hook prints."""
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON "):])
            seconds = raw["duration_us"] / 1e6
            errors = {k: raw[k] for k in ("connect", "read", "write", "timeout", "status")}
            return {
                "rps": round(raw["requests"] / seconds, 1) if seconds > 0 else 0.0,
                "requests": raw["requests"],
                "seconds": round(seconds, 3),
                "p50_ms": round(raw["p50_us"] / 1000, 2),
                "p90_ms": round(raw["p90_us"] / 1000, 2),
                "p99_ms": round(raw["p99_us"] / 1000, 2),
                "max_ms": round(raw["max_us"] / 1000, 2),
                "errors": errors,
                "error_count": sum(errors.values()),
            }
    raise BenchApiError(f"no summary in wrk's output:\n{output[-2000:]}")


def run_wrk(url: str, script: Path, threads: int, conns: int, seconds: float) -> dict[str, Any]:
    command = [wrk_binary(), f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
               "--timeout", WRK_TIMEOUT, "-s", str(script), url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise BenchApiError(f"wrk failed ({result.returncode}): {result.stderr[-2000:]}")
    return parse_wrk(result.stdout)


# --- servers and data ------------------------------------------------------------------------------


class OurApiServer(ServerProcess):
    """``python -m server serve`` from this tree, with extra arguments (``--server-args``)."""

    def __init__(self, data_dir: Path, log_path: Path, extra: list[str]) -> None:
        super().__init__(data_dir, log_path)
        self.extra = extra

    def command(self) -> list[str]:
        return [*super().command(), *self.extra]

    def upsert_superuser(self) -> None:
        result = subprocess.run([sys.executable, "-m", "server", "superuser", "upsert", SUPERUSER_EMAIL,
                                 SUPERUSER_PASSWORD, "--dir", str(self.data_dir)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchApiError(f"superuser upsert failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def make_server(kind: str, data_dir: Path, log_path: Path, extra: list[str]) -> ServerProcess:
    return OurApiServer(data_dir, log_path, extra) if kind == OURS else PocketBaseProcess(data_dir, log_path)


def login(url: str) -> str:
    response = httpx.post(url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=60)
    if response.status_code != 200:
        raise BenchApiError(f"{url}: superuser login: HTTP {response.status_code}: {response.text[:300]}")
    return str(response.json()["token"])


def create_collections(server: ServerProcess) -> dict[str, str]:
    token = login(server.url)
    ids = {}
    public = {"listRule": "", "viewRule": "", "createRule": ""}
    for name, rules in ((COLLECTION, public), (CREATED, public), (BULK, {})):
        response = httpx.post(server.url + "/api/collections", headers={"Authorization": token}, timeout=60,
                              json={"name": name, "type": "base", "fields": FIELDS, **rules})
        if response.status_code != 200:
            raise BenchApiError(f"create {name}: HTTP {response.status_code}: {response.text[:300]}")
        ids[name] = response.json()["id"]
    return ids


def generate(work: Path, kinds: list[str], rows: int, bulk_rows: int, bulk_files: int, seed: int,
             extra: list[str]) -> tuple[dict[str, Path], list[str]]:
    """A data directory per server with the same collections and rows; the ids of view targets."""
    dirs = {kind: work / kind / "pb_data" for kind in kinds}
    collection_ids: dict[str, dict[str, str]] = {}
    for kind, data_dir in dirs.items():
        data_dir.mkdir(parents=True)
        server = make_server(kind, data_dir, work / kind / "setup.log", extra)
        server.upsert_superuser()  # type: ignore[attr-defined]
        with server:
            collection_ids[kind] = create_collections(server)
    first, *others = kinds
    write_rows(dirs[first] / "data.db", COLLECTION, rows, 1, seed, dirs[first] / "storage" / collection_ids[first][COLLECTION])
    if bulk_rows > 0:
        write_rows(dirs[first] / "data.db", BULK, bulk_rows, max(1, min(bulk_rows, bulk_files)), seed + 1,
                   dirs[first] / "storage" / collection_ids[first][BULK])
    for kind in others:
        for name in (COLLECTION, BULK) if bulk_rows > 0 else (COLLECTION,):
            copy_rows(dirs[first] / "data.db", dirs[kind] / "data.db", name)
            source = dirs[first] / "storage" / collection_ids[first][name]
            if source.exists():
                shutil.copytree(source, dirs[kind] / "storage" / collection_ids[kind][name], dirs_exist_ok=True)
    import sqlite3

    conn = sqlite3.connect(dirs[first] / "data.db")
    try:
        all_ids = [r[0] for r in conn.execute(f'SELECT id FROM "{COLLECTION}" ORDER BY rowid')]
    finally:
        conn.close()
    os.sync()
    return dirs, random.Random(seed).sample(all_ids, min(VIEW_IDS, len(all_ids)))


# --- backups during the load -----------------------------------------------------------------------


class BackupLoop(threading.Thread):
    """Backups back to back on one server until stopped: each waited for until complete, then
    deleted. Notes the time spans during which a backup ran."""

    def __init__(self, kind: str, url: str) -> None:
        super().__init__(name=f"backups-{kind}", daemon=True)
        self.kind = kind
        self.url = url
        self.stop_event = threading.Event()
        self.spans: list[tuple[float, float]] = []
        self.error: str | None = None
        self.count = 0

    def run(self) -> None:
        http = httpx.Client(base_url=self.url, headers={"Authorization": login(self.url)}, timeout=600)
        try:
            while not self.stop_event.is_set():
                name = f"api_bench_{self.count}.zip"
                started = time.monotonic()
                response = http.post("/api/backups", json={"name": name})
                if response.status_code != 204:
                    self.error = f"backup: HTTP {response.status_code}: {response.text[:300]}"
                    return
                if self.kind == OURS:  # PocketBase answers once the archive is complete
                    while True:
                        status = http.get("/api/backups/status").json()
                        if status.get("active") is None:
                            break
                        time.sleep(0.02)
                    last = status.get("last") or {}
                    if not last.get("ok"):
                        self.error = f"backup failed: {last}"
                        return
                self.spans.append((started, time.monotonic()))
                self.count += 1
                http.delete(f"/api/backups/{name}")
        except httpx.HTTPError as exc:
            self.error = f"backup loop: {exc!r}"
        finally:
            http.close()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=600)

    def coverage(self, start: float, end: float) -> float:
        covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.spans)
        return covered / (end - start) if end > start else 0.0


# --- the runs ----------------------------------------------------------------------------------------


def measure(kind: str, server: ServerProcess, route: str, conns: int, script: Path, args: argparse.Namespace,
            during_backup: bool) -> dict[str, Any]:
    url = server.url + route_path(route)
    loop = None
    if during_backup:
        loop = BackupLoop(kind, server.url)
        loop.start()
        time.sleep(0.3)  # the first backup under way
    started = time.monotonic()
    try:
        result = run_wrk(url, script, args.threads, conns, args.seconds)
    finally:
        ended = time.monotonic()
        if loop is not None:
            loop.finish()
    if loop is not None:
        if loop.error:
            raise BenchApiError(f"{LABELS[kind]}: {loop.error}")
        result["backups"] = loop.count
        result["backup_coverage"] = round(loop.coverage(started, ended), 3)
    if server.process is None or server.process.poll() is not None:
        raise BenchApiError(f"{LABELS[kind]} exited during the run:\n{tail(server.log_path)}")
    return result


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)


def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = args.servers
    extra = args.server_args.split()
    work = Path(tempfile.mkdtemp(prefix="bench_api_"))
    results: dict[str, Any] = {"machine": machine(), "source": source_version(), "note": NOTE,
                               "params": {k: v for k, v in vars(args).items() if k not in ("show", "out")},
                               "runs": []}
    servers: dict[str, ServerProcess] = {}
    try:
        print(f"data: {args.rows} records (+ {args.backup_rows} and {args.backup_files} files for the backups) "
              f"in {work}", flush=True)
        dirs, ids = generate(work, kinds, args.rows, 0 if args.no_backup else args.backup_rows, args.backup_files,
                             args.seed, extra)
        pages = max(1, -(-args.rows // PER_PAGE))
        scripts = {}
        for route in args.routes:
            scripts[route] = work / f"{route}.lua"
            scripts[route].write_text(lua_script(route, ids, pages))
        for kind in kinds:
            servers[kind] = make_server(kind, dirs[kind], work / kind / "server.log", extra)
            servers[kind].start()
        sections = [("idle", False)] + ([] if args.no_backup else [("during a backup", True)])
        for section, during in sections:
            conns_list = args.conns if not during else args.backup_conns
            for run_index in range(args.runs):
                order = kinds if run_index % 2 == 0 else list(reversed(kinds))
                for conns in conns_list:
                    for route in args.routes:
                        for kind in order:
                            settle()
                            result = measure(kind, servers[kind], route, conns, scripts[route], args, during)
                            row = {"section": section, "run": run_index + 1, "server": kind, "route": route,
                                   "conns": conns, **result}
                            results["runs"].append(row)
                            extra_note = (f", {result['backups']} backups, {result['backup_coverage']:.0%} covered"
                                          if during else "")
                            print(f"  [{section}] run {run_index + 1} {route:6} c={conns:<3} {LABELS[kind]:10} "
                                  f"{result['rps']:>9.0f} req/s  p99 {result['p99_ms']:>7.1f} ms  "
                                  f"errors {result['error_count']}{extra_note}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["table"] = summarize(results["runs"])
    return results


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (section, route, conns): each server's medians and summed errors, and the ratios."""
    groups: dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]] = {}
    for row in runs:
        groups.setdefault((row["section"], row["route"], row["conns"]), {}).setdefault(row["server"], []).append(row)
    table = []
    for (section, route, conns), by_server in groups.items():
        line: dict[str, Any] = {"section": section, "route": route, "conns": conns}
        for kind, rows in by_server.items():
            line[kind] = {
                "runs": len(rows),
                "rps": round(statistics.median(r["rps"] for r in rows), 1),
                "rps_each": [r["rps"] for r in rows],
                "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 2),
                "errors": sum(r["error_count"] for r in rows),
            }
            if "backup_coverage" in rows[0]:
                line[kind]["backup_coverage"] = round(statistics.median(r["backup_coverage"] for r in rows), 3)
        if OURS in line and PB in line and line[PB]["rps"] > 0:
            line["ratio"] = round(line[OURS]["rps"] / line[PB]["rps"], 2)
            line["p99_ratio"] = round(line[OURS]["p99_ms"] / line[PB]["p99_ms"], 2) if line[PB]["p99_ms"] else None
        table.append(line)
    return table


ROUTE_LABELS = {"health": "GET /api/health", "list": "list 30 records", "view": "view one record",
                "create": "create a record"}


def format_table(table: list[dict[str, Any]]) -> str:
    out = []
    for section in dict.fromkeys(line["section"] for line in table):
        lines = [line for line in table if line["section"] == section]
        out.append(f"\n{section}: median of {max(v['runs'] for l in lines for k, v in l.items() if k in (OURS, PB))} "
                   "runs per route and connection count")
        out.append("| route | conns | PocketBase req/s | ours req/s | ours/PB | p99 PB ms | p99 ours ms "
                   "| errors PB / ours |" + (" backup coverage PB / ours |" if section != "idle" else ""))
        out.append("|---|---|---|---|---|---|---|---|" + ("---|" if section != "idle" else ""))
        for line in lines:
            pb, ours = line.get(PB, {}), line.get(OURS, {})

            def cell(d: dict[str, Any], key: str, fmt: str) -> str:
                return format(d[key], fmt) if key in d else "-"

            row = (f"| {ROUTE_LABELS.get(line['route'], line['route'])} | {line['conns']} | {cell(pb, 'rps', ',.0f')} "
                   f"| {cell(ours, 'rps', ',.0f')} | {line.get('ratio', '-')} | {cell(pb, 'p99_ms', '.1f')} "
                   f"| {cell(ours, 'p99_ms', '.1f')} | {pb.get('errors', '-')} / {ours.get('errors', '-')} |")
            if section != "idle":
                row += f" {cell(pb, 'backup_coverage', '.0%')} / {cell(ours, 'backup_coverage', '.0%')} |"
            out.append(row)
    return "\n".join(out)


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8, help="of each wrk run (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="runs per route and connection count (default 3)")
    parser.add_argument("--conns", type=lambda v: [int(c) for c in csv_list(v)], default=[32, 256])
    parser.add_argument("--backup-conns", type=lambda v: [int(c) for c in csv_list(v)], default=[32, 256])
    parser.add_argument("--routes", type=csv_list, default=list(ROUTES))
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--rows", type=int, default=2000, help="records of the measured collection")
    parser.add_argument("--backup-rows", type=int, default=100_000, help="records of the backed-up bulk collection")
    parser.add_argument("--backup-files", type=int, default=20, help="files of 500 KiB in the bulk collection")
    parser.add_argument("--no-backup", action="store_true", help="skip the 'during a backup' section")
    parser.add_argument("--servers", type=csv_list, default=[OURS, PB])
    parser.add_argument("--server-args", type=str, default="",
                        help="extra arguments of our server's `serve` (split on spaces)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--show", type=Path, help="print the table of a JSON result and exit")
    args = parser.parse_args(argv)
    if args.show:
        print(format_table(json.loads(args.show.read_text())["table"]))
        return 0
    unknown = set(args.routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes: {sorted(unknown)}")
    wrk_binary()
    results = run(args)
    print(format_table(results["table"]))
    print(f"\n{NOTE}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
