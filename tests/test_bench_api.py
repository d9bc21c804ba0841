"""bench/api.py's own arithmetic: wrk's summary line, the medians and ratios of the table, and
the Lua scripts (the benchmark itself runs with `make bench-api`, never in the test suite)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.api import BenchApiError, format_table, lua_script, parse_wrk, summarize  # noqa: E402


def test_wrk_summary_is_read_from_the_done_hook_line() -> None:
    output = ("Running 8s test @ http://127.0.0.1:1/api/health\n  2 threads and 32 connections\n"
              'WRKJSON {"requests":80000,"duration_us":8000000,"bytes":1,"connect":0,"read":2,"write":0,'
              '"timeout":1,"status":3,"p50_us":1500,"p90_us":2500,"p99_us":12345,"max_us":50000,"mean_us":1.5}\n')
    result = parse_wrk(output)
    assert result["rps"] == 10000.0 and result["p99_ms"] == 12.35 and result["max_ms"] == 50.0
    assert result["errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 1, "status": 3}
    assert result["error_count"] == 6
    with pytest.raises(BenchApiError):
        parse_wrk("wrk: connection refused\n")


def row(server: str, rps: float, p99: float, errors: int = 0, run: int = 1) -> dict:
    return {"section": "idle", "run": run, "server": server, "route": "view", "conns": 32, "rps": rps,
            "p99_ms": p99, "error_count": errors}


def test_the_table_takes_medians_and_sums_errors() -> None:
    runs = [row("ours", 900, 10), row("ours", 1100, 30, 1), row("ours", 1000, 20),
            row("pocketbase", 2000, 5), row("pocketbase", 1000, 40), row("pocketbase", 3000, 10, 2)]
    (line,) = summarize(runs)
    assert line["ours"]["rps"] == 1000 and line["pocketbase"]["rps"] == 2000
    assert line["ours"]["p99_ms"] == 20 and line["pocketbase"]["p99_ms"] == 10
    assert line["ours"]["errors"] == 1 and line["pocketbase"]["errors"] == 2
    assert line["ratio"] == 0.5 and line["p99_ratio"] == 2.0
    text = format_table([line])
    assert "| view one record | 32 | 2,000 | 1,000 | 0.5 | 10.0 | 20.0 | 2 / 1 |" in text


def test_the_lua_scripts_aim_at_the_benchmark_collections() -> None:
    assert 'ids[math.random(#ids)]' in lua_script("view", ["a" * 15, "b" * 15], 1)
    assert '"' + "a" * 15 + '"' in lua_script("view", ["a" * 15], 1)
    assert "perPage=30&page=" in lua_script("list", [], 67) and "local pages = 67" in lua_script("list", [], 67)
    create = lua_script("create", [], 1)
    assert 'wrk.method = "POST"' in create and "application/json" in create
    for route in ("health", "list", "view", "create"):
        assert "done = function(summary, latency, requests)" in lua_script(route, ["x" * 15], 1)
