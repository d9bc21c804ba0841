"""Request logs in ``auxiliary.db``, PocketBase's error shape, responsiveness, and WAL mode."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, auth, unique


def wait_for_log(server: ServerProcess, needle: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ``_logs`` rows whose data mentions ``needle``, polling until the writer has flushed them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = server.sql("SELECT id, level, message, data, created FROM _logs WHERE data LIKE ?",
                          (f"%{needle}%",), db="auxiliary.db")
        if rows or time.monotonic() > deadline:
            return [{"id": r["id"], "level": r["level"], "message": r["message"], "data": json.loads(r["data"]),
                     "created": r["created"]} for r in rows]
        time.sleep(0.1)


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"status", "message", "data"}, body
    assert body["status"] == status
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["data"], dict)
    return body


# --- request logs --------------------------------------------------------------------------


def test_request_is_logged(api: Api, server: ServerProcess) -> None:
    marker = unique("probe")
    assert api.http.get("/api/health", params={"probe": marker}).status_code == 200
    rows = wait_for_log(server, marker)
    assert len(rows) == 1, rows
    entry = rows[0]
    assert entry["message"] == "GET /api/health"
    assert entry["level"] == 0
    assert entry["data"]["method"] == "GET"
    assert entry["data"]["status"] == 200
    assert entry["data"]["url"] == f"/api/health?probe={marker}"
    assert entry["created"].endswith("Z") and len(entry["created"]) == len("2026-11-21 23:33:53.648Z")


def test_file_tokens_are_not_written_to_the_request_log(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    # A superuser file token downloads backups for minutes: the log keeps the request, not the token.
    token = api.http.post("/api/files/token", headers=su).json()["token"]
    marker = unique("tok")
    for query in (f"token={token}&probe={marker}", f"probe={marker}&%74oken={token}"):
        assert api.http.get(f"/api/backups/missing.zip?{query}").status_code == 404
    rows = wait_for_log(server, marker)
    assert len(rows) == 2, rows
    assert sorted(row["data"]["url"] for row in rows) == sorted([
        f"/api/backups/missing.zip?token=***&probe={marker}",
        f"/api/backups/missing.zip?probe={marker}&%74oken=***",
    ])
    assert not server.sql("SELECT id FROM _logs WHERE data LIKE ?", (f"%{token}%",), db="auxiliary.db")


def test_not_found_is_logged_as_warning(api: Api, server: ServerProcess) -> None:
    marker = unique("missing")
    assert api.http.get(f"/api/{marker}").status_code == 404
    rows = wait_for_log(server, marker)
    assert len(rows) == 1, rows
    assert rows[0]["level"] == 4
    assert rows[0]["data"]["status"] == 404
    assert rows[0]["data"]["method"] == "GET"


def test_log_ip_setting(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    marker_on, marker_off = unique("ipon"), unique("ipoff")
    assert api.http.get("/api/health", params={"probe": marker_on}).status_code == 200
    rows = wait_for_log(server, marker_on)
    assert rows and rows[0]["data"].get("remoteIP") == "127.0.0.1"
    try:
        response = api.http.patch("/api/settings", headers=su, json={"logs": {"logIP": False}})
        assert response.status_code == 200, response.text
        assert api.http.get("/api/health", params={"probe": marker_off}).status_code == 200
        rows = wait_for_log(server, marker_off)
        assert rows, "request not logged"
        assert "remoteIP" not in rows[0]["data"]
        assert "127.0.0.1" not in json.dumps(rows[0]["data"])
    finally:
        assert api.http.patch("/api/settings", headers=su, json={"logs": {"logIP": True}}).status_code == 200


# --- error shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/nope"),
    ("GET", "/api/"),
    ("GET", "/nope"),
    ("POST", "/api/nope"),
    ("DELETE", "/api/nope/deeper"),
    ("GET", "/api/collections/nope_missing/records/abc"),
    ("GET", "/api/health/"),  # a trailing slash is another route (as PocketBase), not a redirect
    ("GET", "/api/backups/some.zip/"),
    ("DELETE", "/api/backups/some.zip/"),
])
def test_unknown_route(api: Api, method: str, path: str) -> None:
    body = assert_error_shape(api.http.request(method, path), 404)
    assert body["data"] == {}


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/api/health"),
    ("PUT", "/api/settings"),
    ("DELETE", "/api/crons"),
    ("PUT", "/api/collections"),
])
def test_wrong_method(api: Api, method: str, path: str) -> None:
    body = assert_error_shape(api.http.request(method, path), 405)
    assert body["data"] == {}


def test_bad_json_to_collections(api: Api, su: dict[str, str]) -> None:
    for raw in (b"{oops", b"[]", b"\xff\xfe"):
        response = api.http.post("/api/collections", headers={**su, "Content-Type": "application/json"}, content=raw)
        body = assert_error_shape(response, 400)
        assert body["data"] == {}


def test_errors_never_leak_paths_or_tracebacks(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    user_token = api.create_user(unique("leak") + "@example.com")[1]
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/api/nope", {}),
        ("DELETE", "/api/health", {}),
        ("POST", "/api/collections", {"headers": {**su, "Content-Type": "application/json"}, "content": b"{oops"}),
        ("POST", "/api/collections", {"headers": su, "json": {"name": "bad name!", "fields": "x"}}),
        ("POST", "/api/collections", {"headers": su, "json": {"name": "_logs"}}),
        ("GET", "/api/collections/users/records", {"headers": su, "params": {"filter": "(((nope"}}),
        ("GET", "/api/collections/users/records", {"headers": su, "params": {"sort": "nope;drop"}}),
        ("GET", "/api/collections/users/records", {"headers": su, "params": {"page": "x"}}),
        ("POST", "/api/collections/users/records", {"headers": {"Content-Type": "multipart/form-data; boundary=zz"},
                                                    "content": b"--zz\r\nbroken"}),
        ("POST", "/api/collections/users/records", {"headers": {"Content-Type": "application/json"}, "content": b"{"}),
        ("PATCH", "/api/settings", {"headers": {**su, "Content-Type": "application/json"}, "content": b"{"}),
        ("PATCH", "/api/settings", {"headers": su, "json": {"backups": {"cron": "nope"}}}),
        ("GET", "/api/settings", {"headers": auth(user_token)}),
        ("GET", "/api/settings", {"headers": auth("eyJhbGciOiJub25lIn0.eyJpZCI6IngifQ.")}),
        ("POST", "/api/crons/nope", {"headers": su}),
        ("GET", "/api/files/nope/nope/nope.png", {}),
        ("GET", "/api/files/users/nope/..%2F..%2Fdata.db", {}),
        ("POST", "/api/collections/_superusers/auth-with-password", {"json": {"identity": 5, "password": []}}),
        ("POST", "/api/collections/_superusers/auth-with-password", {"content": b"\x00\x01"}),
        ("POST", "/api/files/token", {"headers": auth("garbage")}),
    ]
    data_dir = str(server.data_dir)
    parent = str(server.data_dir.parent)
    for method, path, kwargs in requests:
        response = api.http.request(method, path, **kwargs)
        assert response.status_code >= 400, (method, path, response.status_code)
        text = response.text
        assert data_dir not in text and parent not in text, (method, path, text)
        assert "Traceback" not in text and 'File "' not in text, (method, path, text)
        assert "sqlite3." not in text, (method, path, text)
        body = assert_error_shape(response, response.status_code)
        assert "/tmp/" not in body["message"], (method, path, body)


# --- responsiveness ------------------------------------------------------------------------


async def test_health_responsive_during_logins(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        async def login() -> int:
            response = await client.post("/api/collections/_superusers/auth-with-password",
                                         json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
            return response.status_code

        async def health() -> dict[str, Any]:
            response = await client.get("/api/health")
            assert response.status_code == 200
            return response.json()

        logins = [asyncio.create_task(login()) for _ in range(10)]
        checks = [asyncio.create_task(health()) for _ in range(20)]
        results = await asyncio.gather(*logins, *checks)
    assert results[:10] == [200] * 10
    for body in results[10:]:
        assert body == {"message": "API is healthy.", "code": 200, "data": {}}


# --- databases -----------------------------------------------------------------------------


def test_databases_use_wal(server: ServerProcess) -> None:
    for db in ("data.db", "auxiliary.db"):
        mode = server.sql("PRAGMA journal_mode", db=db)[0][0]
        assert str(mode).lower() == "wal", db
