"""Load during a backup and a restore (issue 7): many concurrent clients list backups, read record
pages and check health while a backup and then a restore (with its re-exec) run. No answer is a
5xx, no connection is refused or reset, every answer has the right shape, requests sent during the
re-exec wait and complete, and the restored data is served at the end. The latencies of each phase
are printed (``pytest -s``) and written to ``bench/results/load.json``.

The clients run in worker processes (``bench/load.py``), each client on its own keep-alive
connection. Environment: ``PB_LOAD_CLIENTS`` (200), ``PB_LOAD_PROCS`` (worker processes, 2),
``PB_LOAD_FRESH`` (4 more clients, each opening a new connection for every request), ``PB_LOAD_IDLE`` / ``PB_LOAD_HOLD`` / ``PB_LOAD_AFTER`` (seconds of the idle baseline, of holding
the backup and the restore at their fault gate, of load after the restored data is served),
``PB_LOAD_ROWS`` / ``PB_LOAD_FILES`` (the data set). ``PB_SOAK=1`` makes the phases longer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ROOT, SOAK, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, ServerProcess, auth, run_cli, wait_for, wait_gate_held

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.compare import FIELDS, write_rows  # noqa: E402  (the benchmark's realistic rows and files)
from bench.load import ENDPOINTS, Load, longest_gap, summarize, table  # noqa: E402


def env_number(name: str, quick: float, soak: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else (soak if SOAK else quick)


CLIENTS = int(env_number("PB_LOAD_CLIENTS", 200, 200))
PROCS = int(env_number("PB_LOAD_PROCS", 2, 2))
FRESH = int(env_number("PB_LOAD_FRESH", 4, 4))  # more clients, each with a new connection per request
IDLE = env_number("PB_LOAD_IDLE", 3, 30)
HOLD = env_number("PB_LOAD_HOLD", 3, 30)
AFTER = env_number("PB_LOAD_AFTER", 2, 15)
ROWS = int(env_number("PB_LOAD_ROWS", 5000, 50_000))
FILES = int(env_number("PB_LOAD_FILES", 10, 40))  # 500 KiB of random bytes each
PER_PAGE = 30
COLLECTION = "load_records"
ADDED = 7  # records added after the backup: the restore must take them away
OUT = ROOT / "bench" / "results" / "load.json"


def login(url: str) -> str:
    response = httpx.post(url + "/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["token"]


# Transport errors of the test's own requests on fresh connections (polls while the restore
# re-executes the server); reported with the load's failures instead of stopping the test at once.
PROBE_ERRORS: list[tuple[float, float, str]] = []  # (start, end, what)


def probe(method: str, url: str, **kwargs: Any) -> httpx.Response | None:
    """One request on a new connection; None (and the error noted) if the transport failed."""
    started = time.monotonic()
    try:
        return httpx.request(method, url, timeout=120, **kwargs)
    except httpx.TransportError as exc:
        PROBE_ERRORS.append((started, time.monotonic(), f"{method} {url.split('/api/', 1)[-1]}: {exc!r}"))
        return None


def status(url: str, token: str) -> dict[str, Any] | None:
    response = probe("GET", url + "/api/backups/status", headers=auth(token))
    if response is None:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def total_items(url: str) -> int | None:
    response = probe("GET", f"{url}/api/collections/{COLLECTION}/records", params={"perPage": 1})
    if response is None:
        return None
    assert response.status_code == 200, response.text
    return response.json()["totalItems"]


def loaded_server(tmp: Path) -> tuple[ServerProcess, Path, dict[str, Any]]:
    """A server with a superuser, a publicly listable collection of ROWS records of mixed text and
    FILES stored files, both backup and restore gates armed (held while the returned file exists)."""
    data_dir = tmp / "pb_data"
    gate = tmp / "gate"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir, env={"PB_FAULTS": "gate:backup-write,gate:restore-extract",
                                          "PB_FAULTS_GATE": str(gate)})
    server.start()
    response = httpx.post(server.url + "/api/collections", headers=auth(login(server.url)), timeout=60,
                          json={"name": COLLECTION, "type": "base", "fields": FIELDS, "listRule": "", "viewRule": ""})
    assert response.status_code == 200, response.text
    collection = response.json()
    server.stop()  # the rows go straight into the table, as the benchmark does
    dataset = write_rows(data_dir / "data.db", COLLECTION, ROWS, FILES, 7, data_dir / "storage" / collection["id"])
    assert dataset.files == FILES
    server.start()
    assert total_items(server.url) == ROWS
    first = dataset.sample_ids[0]  # the first generated record has a file
    name = server.sql(f"SELECT attachment FROM {COLLECTION} WHERE id = ?", (first,))[0][0]
    return server, gate, {"rows": ROWS, "files": FILES, "file_bytes": dataset.file_bytes,
                          "text_bytes": dataset.text_bytes, "db_bytes": (data_dir / "data.db").stat().st_size,
                          "file": f"/api/files/{collection['id']}/{first}/{name}"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (an exec keeps the count)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phases(tmp: Path) -> None:
    PROBE_ERRORS.clear()
    server, gate, data = loaded_server(tmp)
    url = server.url
    token = login(url)
    pid = server.process.pid
    pages = -(-ROWS // PER_PAGE)
    load = Load(url, token, COLLECTION, CLIENTS, PROCS, pages, PER_PAGE, timeout=120, workdir=tmp, fresh=FRESH)
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        load.start()
        # (1) idle baseline
        marks["idle"] = time.monotonic()
        cpu["idle"] = cpu_seconds(pid)
        time.sleep(IDLE)

        # (2) a backup, held at its second archive entry for HOLD seconds, then let go to its end
        gate.write_text("1")
        marks["backup"] = time.monotonic()
        cpu["backup"] = cpu_seconds(pid)
        response = httpx.post(url + "/api/backups", headers=auth(token), json={"name": "load.zip"}, timeout=120)
        assert response.status_code == 204, response.text
        wait_gate_held(gate, timeout=120)
        assert status(url, token)["active"]["op"] == "create"
        time.sleep(HOLD)
        gate.unlink()
        last = wait_for(lambda: (s := status(url, token)) and s["active"] is None and s["last"], "the backup's end", 300)
        assert last["op"] == "create" and last["key"] == "load.zip" and last["ok"], last
        marks["between"] = time.monotonic()
        cpu["between"] = cpu_seconds(pid)

        # Records added after the backup: the restore takes them away.
        added = []
        for n in range(ADDED):
            response = httpx.post(f"{url}/api/collections/{COLLECTION}/records", headers=auth(token), timeout=120,
                                  json={"title": f"after the backup {n}"})
            assert response.status_code == 200, response.text
            added.append(response.json()["id"])
        marks["added"] = time.monotonic()

        # (3) a restore, held at its second extracted entry for HOLD seconds, then the swap, the
        # re-exec and the restarted process serving the restored data; the load goes on after it.
        gate.write_text("1")
        marks["restore"] = time.monotonic()
        cpu["restore"] = cpu_seconds(pid)
        response = httpx.post(url + "/api/backups/load.zip/restore", headers=auth(token), timeout=120)
        assert response.status_code == 204, response.text
        wait_gate_held(gate, timeout=120)
        time.sleep(HOLD)
        gate.unlink()
        marks["released"] = time.monotonic()

        def restored() -> bool:
            last = (status(url, token) or {}).get("last")
            if not (last and last["op"] == "restore" and last["key"] == "load.zip"):
                return False
            assert last["ok"], last
            return total_items(url) == ROWS

        wait_for(restored, "the restored data to be served", 300)
        marks["restored"] = time.monotonic()
        cpu["restored"] = cpu_seconds(pid)
        time.sleep(AFTER)
        marks["end"] = time.monotonic()
        cpu["end"] = cpu_seconds(pid)
    finally:
        gate.unlink(missing_ok=True)
        if marks.get("end") is None:
            load.kill()
            server.stop()
    try:
        result = load.stop()
        # The restored data, as a client sees it at the end: the records added after the backup are gone.
        assert server.process.pid == pid and server.process.poll() is None  # re-executed in place
        assert total_items(url) == ROWS
        for record_id in added:
            response = httpx.get(f"{url}/api/collections/{COLLECTION}/records/{record_id}", timeout=60)
            assert response.status_code == 404, response.text
        stored = httpx.get(url + data["file"], timeout=60)
        assert stored.status_code == 200 and len(stored.content) == data["file_bytes"] // FILES, stored.status_code
        backups = httpx.get(url + "/api/backups", headers=auth(token), timeout=60)
        assert backups.status_code == 200, backups.text
        # (The safety copy of the replaced data may still be being written, under the same load.)
        assert [b["key"] for b in backups.json() if not b["key"].startswith("@pre_restore_")] == ["load.zip"]
    finally:
        server.stop()

    report(result, marks, cpu, data)
    check(result, marks)


def report(result: dict[str, Any], marks: dict[str, float], cpu: dict[str, float], data: dict[str, Any]) -> None:
    samples = result["samples"]
    spans = {"idle": ("idle", "backup"), "backup": ("backup", "between"), "restore": ("restore", "end"),
             "restore_held": ("restore", "released"), "restore_reexec": ("released", "restored"),
             "after_restore": ("restored", "end")}
    phases = {name: summarize(samples, marks[a], marks[b]) for name, (a, b) in spans.items()}
    # Requests in flight at some point between the release of the restore and the restored data
    # being served (the swap and the re-exec): the longest one is the longest wait a client saw.
    crossing = [s[2] - s[1] for s in samples if s[1] < marks["restored"] and s[2] > marks["released"]]
    wall = sum(b - a for a, b in result["walls"]) / max(1, len(result["walls"]))
    figures = {
        "machine": {"cores": os.cpu_count(), "note": "the load generator runs on the same cores as the server"},
        "clients": CLIENTS, "fresh_connection_clients": FRESH, "procs": result["procs"], "data": data,
        "seconds": {"idle": IDLE, "hold": HOLD, "after": AFTER},
        "phases": phases,
        "reexec": {"longest_wait_ms": round(max(crossing, default=0) * 1000, 1),
                   "requests_across_it": len(crossing),
                   "fresh_connection_requests_across_it": sum(1 for s in samples if s[7] and s[1] < marks["restored"]
                                                              and s[2] > marks["released"]),
                   "longest_gap_without_answer_ms": round(longest_gap(samples, marks["released"], marks["restored"]) * 1000, 1),
                   "swap_reexec_and_first_check_s": round(marks["restored"] - marks["released"], 2)},
        "keepalive_closed_retried": len(result["keepalive_closed"]),
        "connections_opened": result["connections"],
        "failures": len(result["failures"]), "failure_kinds": kinds(result["failures"]),
        "probe_failures": len(PROBE_ERRORS),
        "cpu_s": {"load_generator": round(result["cpu_s"], 1), "load_generator_per_s": round(result["cpu_s"] / wall, 2),
                  "server": round(cpu["end"] - cpu["idle"], 1),
                  "server_per_s": {phase: round((cpu[b] - cpu[a]) / (marks[b] - marks[a]), 2) for phase, (a, b) in
                                   {"idle": ("idle", "backup"), "backup": ("backup", "between"),
                                    "restore": ("restore", "end")}.items()}},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n{CLIENTS} keep-alive clients and {FRESH} with a new connection per request, in {result['procs']} "
          f"processes, on {os.cpu_count()} cores shared with the server")
    print(table(phases))
    print(json.dumps({k: figures[k] for k in ("reexec", "keepalive_closed_retried", "connections_opened", "failures",
                                              "failure_kinds", "probe_failures", "cpu_s")}, indent=2))
    print(f"written to {OUT}")


def kinds(failures: list[list[Any]]) -> dict[str, int]:
    """How many failures of each kind (connect, fresh-connection, reset, 5xx, shape, timeouts)."""
    counted: dict[str, int] = {}
    for failure in failures:
        counted[failure[3]] = counted.get(failure[3], 0) + 1
    return counted


def check(result: dict[str, Any], marks: dict[str, float]) -> None:
    failures = result["failures"]
    # (when: seconds from the release of the restore to the start and end of the failed request)
    described = [(f[0], f[3], f[4], f[5], f"{f[1] - marks['released']:+.3f}s..{f[2] - marks['released']:+.3f}s")
                 for f in failures]
    assert not failures, f"{len(failures)} failed requests {kinds(failures)}, e.g. {described[:5]}"
    probes = [(what, f"{a - marks['released']:+.3f}s..{b - marks['released']:+.3f}s") for a, b, what in PROBE_ERRORS]
    assert not PROBE_ERRORS, f"the test's own polls on new connections failed: {probes[:5]}"
    samples = result["samples"]
    records = ENDPOINTS.index("records")
    # Every phase had answers of every kind.
    for a, b in (("idle", "backup"), ("backup", "between"), ("restore", "released"), ("restored", "end")):
        counts = {ENDPOINTS[i]: sum(1 for s in samples if s[0] == i and marks[a] <= s[1] < marks[b]) for i in range(3)}
        assert all(counts.values()), (a, counts)
    # Record pages show the data before or after the restore, never something else; stale data
    # is never served once the restored data was seen. Outside the moment records are added, each
    # page holds exactly what the count says it should.
    pages = [s for s in samples if s[0] == records]
    writing = (marks["between"], marks["added"])
    assert all(ROWS <= s[3] <= ROWS + ADDED for s in pages), {s[3] for s in pages}
    outside = {s[3] for s in pages if s[2] < writing[0] or s[1] > writing[1]}
    assert outside <= {ROWS, ROWS + ADDED}, outside
    wrong = [s for s in pages if (s[2] < writing[0] or s[1] > writing[1])
             and s[4] != max(0, min(PER_PAGE, s[3] - (s[5] - 1) * PER_PAGE))]
    assert not wrong, f"{len(wrong)} pages hold another number of items than their count says, e.g. {wrong[:3]}"
    late = [s for s in pages if s[1] > marks["restored"]]
    assert late and {s[3] for s in late} == {ROWS}
    before = [s for s in pages if marks["added"] < s[1] and s[2] < marks["restore"]]
    assert {s[3] for s in before} <= {ROWS + ADDED}


@pytest.mark.soak  # `make test` runs it with short phases, `make soak` (PB_SOAK=1) with long ones
def test_200_clients_during_a_backup_and_a_restore(tmp_path: Path) -> None:
    run_phases(tmp_path)
