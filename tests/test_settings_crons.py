"""``/api/settings`` and ``/api/crons``, through HTTP."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Api, ServerProcess, auth, unique

S3_KEYS = {"enabled", "bucket", "region", "endpoint", "accessKey", "forcePathStyle"}


def walk_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_keys(item)


def stored_params(server: ServerProcess) -> str:
    """Everything in ``_params``, as one text (the settings are persisted there)."""
    return "\n".join(str(row["value"]) for row in server.sql("SELECT value FROM _params"))


def get_settings(api: Api, su: dict[str, str]) -> dict[str, Any]:
    response = api.http.get("/api/settings", headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def patch(api: Api, su: dict[str, str], body: Any) -> Any:
    return api.http.patch("/api/settings", headers=su, json=body)


@pytest.fixture(scope="module")
def user_token(api: Api) -> str:
    return api.create_user(unique("settings") + "@example.com")[1]


# --- GET -----------------------------------------------------------------------------------


def test_get_settings_shape(api: Api, su: dict[str, str]) -> None:
    data = get_settings(api, su)
    assert isinstance(data["meta"]["appName"], str) and data["meta"]["appName"]
    backups = data["backups"]
    assert isinstance(backups["cron"], str)
    assert isinstance(backups["cronMaxKeep"], int)
    assert S3_KEYS <= set(backups["s3"])
    assert isinstance(backups["s3"]["enabled"], bool)
    assert isinstance(backups["s3"]["forcePathStyle"], bool)
    assert "secret" not in set(walk_keys(data))


def test_settings_need_a_superuser(api: Api, user_token: str) -> None:
    for method in ("GET", "PATCH"):
        body = {"meta": {"appName": "Hijacked"}} if method == "PATCH" else None
        response = api.http.request(method, "/api/settings", json=body)
        assert response.status_code == 401
        assert response.json() == {"status": 401, "message": "The request requires valid record authorization token.", "data": {}}
        response = api.http.request(method, "/api/settings", json=body, headers=auth(user_token))
        assert response.status_code == 403
        assert response.json() == {"status": 403, "message": "The authorized record is not allowed to perform this action.", "data": {}}
    response = api.http.get("/api/settings", headers=auth("not-a-token"))
    assert response.status_code == 401


# --- PATCH ---------------------------------------------------------------------------------


def test_patch_app_name(api: Api, su: dict[str, str]) -> None:
    name = unique("App")
    response = patch(api, su, {"meta": {"appName": name}})
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["appName"] == name
    assert get_settings(api, su)["meta"]["appName"] == name


def test_patch_merges(api: Api, su: dict[str, str]) -> None:
    before = get_settings(api, su)
    response = patch(api, su, {"backups": {"cronMaxKeep": before["backups"]["cronMaxKeep"] + 1}})
    assert response.status_code == 200, response.text
    after = get_settings(api, su)
    assert after["backups"]["cronMaxKeep"] == before["backups"]["cronMaxKeep"] + 1
    assert after["meta"] == before["meta"]
    assert after["backups"]["s3"] == before["backups"]["s3"]


def test_s3_secret_is_write_only(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    secret = unique("s3secretvalue")
    s3 = {"enabled": False, "bucket": "bucket-one", "region": "eu-west-1", "endpoint": "https://s3.example.com",
          "accessKey": "AKIAEXAMPLE", "secret": secret, "forcePathStyle": True}
    response = patch(api, su, {"backups": {"s3": s3}})
    assert response.status_code == 200, response.text
    assert secret not in response.text
    assert "secret" not in set(walk_keys(response.json()))
    got = api.http.get("/api/settings", headers=su)
    assert secret not in got.text
    assert "secret" not in set(walk_keys(got.json()))
    assert got.json()["backups"]["s3"] == {k: v for k, v in s3.items() if k != "secret"}
    assert secret in stored_params(server)

    # a later PATCH without the secret keeps it
    response = patch(api, su, {"backups": {"s3": {"bucket": "bucket-two"}}})
    assert response.status_code == 200, response.text
    assert secret not in response.text
    assert response.json()["backups"]["s3"]["bucket"] == "bucket-two"
    assert secret in stored_params(server)
    response = patch(api, su, {"meta": {"appName": unique("App")}})
    assert response.status_code == 200
    assert secret in stored_params(server)


@pytest.mark.parametrize("cron", ["not a cron", "* * * *", "* * * * * *", "61 * * * *", "@sometimes", "* * 32 * *"])
def test_bad_cron(api: Api, su: dict[str, str], cron: str) -> None:
    response = patch(api, su, {"backups": {"cron": cron}})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["status"] == 400
    assert body["data"]["backups"]["cron"]["code"] == "validation_invalid_cron"


@pytest.mark.parametrize("cron", ["@daily", "*/5 * * * *", "0 3 * * 1", ""])
def test_good_cron(api: Api, su: dict[str, str], cron: str) -> None:
    try:
        response = patch(api, su, {"backups": {"cron": cron}})
        assert response.status_code == 200, response.text
        assert response.json()["backups"]["cron"] == cron
        assert get_settings(api, su)["backups"]["cron"] == cron
    finally:
        assert patch(api, su, {"backups": {"cron": ""}}).status_code == 200


def test_empty_app_name(api: Api, su: dict[str, str]) -> None:
    for name in ("", "   "):
        response = patch(api, su, {"meta": {"appName": name}})
        assert response.status_code == 400, response.text
        assert response.json()["data"]["meta"]["appName"]["code"] == "validation_required"


def test_bad_app_url(api: Api, su: dict[str, str]) -> None:
    for url in ("not a url", "ftp//x", "://missing-scheme"):
        response = patch(api, su, {"meta": {"appURL": url}})
        assert response.status_code == 400, (url, response.text)
        assert response.json()["data"]["meta"]["appURL"]["code"] == "validation_is_url"
    response = patch(api, su, {"meta": {"appURL": "https://example.com/app"}})
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["appURL"] == "https://example.com/app"


def test_s3_enabled_needs_its_settings(api: Api, su: dict[str, str]) -> None:
    response = patch(api, su, {"backups": {"s3": {"enabled": True, "bucket": "", "region": "", "endpoint": "",
                                                  "accessKey": ""}}})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["message"] == "An error occurred while saving the new settings."
    errors = body["data"]["backups"]["s3"]
    for key in ("bucket", "region", "endpoint", "accessKey"):
        assert errors[key]["code"] == "validation_required", key
    assert get_settings(api, su)["backups"]["s3"]["enabled"] is False


@pytest.mark.parametrize("body,path", [
    ({"meta": {"appName": 5}}, ("meta", "appName")),
    ({"meta": {"appName": None}}, ("meta", "appName")),
    ({"backups": {"cronMaxKeep": "x"}}, ("backups", "cronMaxKeep")),
    ({"backups": {"cronMaxKeep": 1.5}}, ("backups", "cronMaxKeep")),
    ({"backups": {"cronMaxKeep": -1}}, ("backups", "cronMaxKeep")),
    ({"backups": {"cron": 5}}, ("backups", "cron")),
    ({"backups": {"s3": {"enabled": "yes"}}}, ("backups", "s3", "enabled")),
    ({"backups": {"s3": {"forcePathStyle": 1}}}, ("backups", "s3", "forcePathStyle")),
    ({"backups": {"s3": "nope"}}, ("backups", "s3")),
    ({"backups": "nope"}, ("backups",)),
    ({"meta": []}, ("meta",)),
])
def test_wrong_types(api: Api, su: dict[str, str], body: dict[str, Any], path: tuple[str, ...]) -> None:
    before = get_settings(api, su)
    response = patch(api, su, body)
    assert response.status_code == 400, response.text
    node = response.json()["data"]
    for key in path:
        assert key in node, (path, response.json())
        node = node[key]
    assert get_settings(api, su) == before


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"{\"meta\": "])
def test_bad_json(api: Api, su: dict[str, str], raw: bytes) -> None:
    before = get_settings(api, su)
    response = api.http.patch("/api/settings", headers={**su, "Content-Type": "application/json"}, content=raw)
    assert response.status_code == 400, response.text
    assert response.json() == {"status": 400, "message": "An error occurred while loading the submitted data.", "data": {}}
    assert get_settings(api, su) == before


def test_unknown_keys_are_ignored(api: Api, su: dict[str, str]) -> None:
    name = unique("App")
    response = patch(api, su, {"nope": 1, "meta": {"appName": name, "bogus": True}, "backups": {"s3": {"extra": "x"}}})
    assert response.status_code == 200, response.text
    data = response.json()
    assert "nope" not in data and "bogus" not in data["meta"] and "extra" not in data["backups"]["s3"]
    assert data["meta"]["appName"] == name
    assert get_settings(api, su) == data


def test_failed_patch_changes_nothing(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    before = get_settings(api, su)
    stored_before = stored_params(server)
    response = patch(api, su, {
        "meta": {"appName": unique("Changed")},
        "backups": {"cron": "bad cron", "cronMaxKeep": 9, "s3": {"bucket": "changed", "secret": "changed-secret"}},
    })
    assert response.status_code == 400
    assert "cron" in response.json()["data"]["backups"]
    assert "changed-secret" not in response.text
    assert get_settings(api, su) == before
    assert stored_params(server) == stored_before


def test_settings_persist_across_restart(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    try:
        su = auth(api.superuser_token())
        name, secret = unique("Persisted"), unique("persistedsecret")
        response = patch(api, su, {"meta": {"appName": name},
                                   "backups": {"cron": "0 4 * * *", "cronMaxKeep": 7,
                                               "s3": {"bucket": "kept-bucket", "secret": secret}}})
        assert response.status_code == 200, response.text
        before = get_settings(api, su)
        fresh_server.restart()
        after = get_settings(api, su)
        assert after == before
        assert after["meta"]["appName"] == name
        assert after["backups"]["cron"] == "0 4 * * *"
        assert after["backups"]["cronMaxKeep"] == 7
        assert after["backups"]["s3"]["bucket"] == "kept-bucket"
        assert secret in stored_params(fresh_server)
        assert secret not in api.http.get("/api/settings", headers=su).text
    finally:
        api.close()


# --- crons ---------------------------------------------------------------------------------


def test_list_crons(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/crons", headers=su)
    assert response.status_code == 200, response.text
    jobs = response.json()
    assert isinstance(jobs, list)
    for job in jobs:
        assert set(job) == {"id", "expression"}
        assert isinstance(job["id"], str) and isinstance(job["expression"], str)
    by_id = {job["id"]: job["expression"] for job in jobs}
    assert by_id["__pbLogsCleanup__"] == "0 */6 * * *"
    assert by_id["__pbDBOptimize__"] == "0 0 * * *"


def test_crons_need_a_superuser(api: Api, user_token: str) -> None:
    assert api.http.get("/api/crons").status_code == 401
    assert api.http.get("/api/crons", headers=auth(user_token)).status_code == 403
    assert api.http.post("/api/crons/__pbLogsCleanup__").status_code == 401
    assert api.http.post("/api/crons/__pbLogsCleanup__", headers=auth(user_token)).status_code == 403


def test_run_unknown_cron(api: Api, su: dict[str, str]) -> None:
    response = api.http.post("/api/crons/nope", headers=su)
    assert response.status_code == 404
    assert response.json() == {"status": 404, "message": "Missing or invalid cron job.", "data": {}}


def test_run_logs_cleanup(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    old_id, recent_id = unique("oldlog"), unique("newlog")
    conn = sqlite3.connect(server.data_dir / "auxiliary.db", timeout=10)
    try:
        with conn:
            conn.execute("INSERT INTO _logs (id, level, message, data, created) VALUES (?, 0, 'old entry', '{}', ?)",
                         (old_id, "2000-01-01 00:00:00.000Z"))
            conn.execute("INSERT INTO _logs (id, level, message, data, created) VALUES "
                         "(?, 0, 'recent entry', '{}', strftime('%Y-%m-%d %H:%M:%fZ', 'now'))", (recent_id,))
    finally:
        conn.close()
    original = get_settings(api, su)["logs"]["maxDays"]
    try:
        assert patch(api, su, {"logs": {"maxDays": 1}}).status_code == 200
        response = api.http.post("/api/crons/__pbLogsCleanup__", headers=su)
        assert response.status_code == 204
        assert response.content == b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not server.sql("SELECT 1 FROM _logs WHERE id = ?", (old_id,), db="auxiliary.db"):
                break
            time.sleep(0.1)
        assert not server.sql("SELECT 1 FROM _logs WHERE id = ?", (old_id,), db="auxiliary.db"), "old log not removed"
        assert server.sql("SELECT 1 FROM _logs WHERE id = ?", (recent_id,), db="auxiliary.db"), "recent log removed"
    finally:
        patch(api, su, {"logs": {"maxDays": original}})


def test_run_db_optimize(api: Api, su: dict[str, str]) -> None:
    response = api.http.post("/api/crons/__pbDBOptimize__", headers=su)
    assert response.status_code == 204
    assert api.http.get("/api/health").status_code == 200
