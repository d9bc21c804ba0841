"""Backup and restore work runs below the requests' priority (issue 13): the threads that read,
deflate, hash, inflate and check run at nice 19 (``server.tools.threads``), the event loop at the
process's own priority, so the API keeps its latency while a job keeps the cores busy."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx

from conftest import Api, ServerProcess, wait_gate_held
from server.tools.threads import BACKGROUND_NICE, background_pool, thread_priority
from test_backup_restore import add_note, faulty_server, login, make_notes, wait_idle  # noqa: F401 (a fixture)


def nice_of_threads(pid: int) -> dict[int, int]:
    """tid -> nice value of every thread of ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # ended meanwhile
        found[int(tid)] = int(fields[16])
    return found


def test_a_background_pool_lowers_only_its_own_threads() -> None:
    before = thread_priority()
    with background_pool(2, "test") as pool:
        seen = set(pool.map(lambda _: (threading.get_native_id(), thread_priority()), range(8)))
    assert {nice for _, nice in seen} == {max(before, BACKGROUND_NICE)}
    assert thread_priority() == before  # the caller's thread is left as it was


def test_a_backup_runs_below_the_event_loop(faulty_server: ServerProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.write_text("2")  # data.db and auxiliary.db go through, the next entry waits
    faulty_server.env.update(PB_FAULTS="gate:backup-write", PB_FAULTS_GATE=str(gate))
    faulty_server.start()
    api = Api(faulty_server)
    try:
        su = login(faulty_server)
        make_notes(api, su)
        add_note(api, su, "with a file", 1, os.urandom(3 << 20))
        assert faulty_server.process is not None
        pid = faulty_server.process.pid
        idle = nice_of_threads(pid)
        assert set(idle.values()) == {0}, idle
        assert api.http.post("/api/backups", headers=su, json={"name": "held.zip"}).status_code == 204
        wait_gate_held(gate)
        held = nice_of_threads(pid)
        assert held[pid] == 0  # the event loop
        lowered = [tid for tid, nice in held.items() if nice == BACKGROUND_NICE]
        assert len(lowered) >= 3, held  # the job's thread, the deflate threads, the hasher
        # Requests are served meanwhile, by the loop at its own priority.
        assert httpx.get(faulty_server.url + "/api/health", timeout=5).status_code == 200
        gate.unlink()
        assert wait_idle(faulty_server)["ok"]
    finally:
        api.close()
