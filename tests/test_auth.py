"""Auth over HTTP: password login, tokens (JWT), refresh, 401/403 rules, file tokens and health."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import jwt
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, ServerProcess, auth, run_cli, unique

SUPERUSERS_ID = "pbc_3142635823"
USERS_ID = "_pb_users_auth_"
UNAUTHORIZED = {"status": 401, "message": "The request requires valid record authorization token.", "data": {}}
FORBIDDEN = {"status": 403, "message": "The authorized record is not allowed to perform this action.", "data": {}}
AUTH_FAILED = {"status": 400, "message": "Failed to authenticate.", "data": {}}
SUPERUSER_ROUTES = ["/api/collections", "/api/settings", "/api/crons"]

# Every error response seen in this module, to check that none leaks a filesystem path.
ERROR_TEXTS: list[str] = []


def error(server: ServerProcess, response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert an error response of ``status`` in PocketBase's envelope, free of paths; return its body."""
    assert response.status_code == status, response.text
    ERROR_TEXTS.append(response.text)
    assert str(server.data_dir) not in response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"status", "message", "data"}, body
    assert body["status"] == status and isinstance(body["message"], str) and isinstance(body["data"], dict)
    return body


def payload_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def login_response(api: Api, collection: str, identity: Any, password: Any) -> httpx.Response:
    return api.http.post(f"/api/collections/{collection}/auth-with-password",
                         json={"identity": identity, "password": password})


def token_secret(server: ServerProcess, collection_id: str) -> str:
    row = server.sql("SELECT options FROM _collections WHERE id = ?", (collection_id,))[0]
    return json.loads(row["options"])["authToken"]["secret"]


def token_key(server: ServerProcess, table: str, record_id: str) -> str:
    return server.sql(f'SELECT tokenKey FROM "{table}" WHERE id = ?', (record_id,))[0]["tokenKey"]


def craft_token(server: ServerProcess, table: str, collection_id: str, record_id: str, exp: int) -> str:
    """A token signed the way the server signs them: HS256 with tokenKey + collection secret."""
    key = token_key(server, table, record_id) + token_secret(server, collection_id)
    payload = {"collectionId": collection_id, "exp": exp, "id": record_id, "refreshable": True, "type": "auth"}
    return jwt.encode(payload, key, algorithm="HS256")


def tamper_signature(token: str) -> str:
    head, body, signature = token.split(".")
    # A middle character: every bit of it is significant (the last one carries padding bits).
    index = len(signature) // 2
    replacement = "A" if signature[index] != "A" else "B"
    return f"{head}.{body}.{signature[:index]}{replacement}{signature[index + 1:]}"


def superuser_id(server: ServerProcess) -> str:
    return server.sql('SELECT id FROM "_superusers" WHERE email = ?', (SUPERUSER_EMAIL,))[0]["id"]


def new_user(api: Api, password: str = "userpass123") -> tuple[dict[str, Any], str, str]:
    email = f"{unique('u')}@example.com"
    record, token = api.create_user(email, password)
    return record, token, email


# ---------------------------------------------------------------------------------------------
# auth-with-password
# ---------------------------------------------------------------------------------------------


def test_superuser_login_success(api: Api) -> None:
    response = login_response(api, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token", "record"}
    record = body["record"]
    assert record["collectionName"] == "_superusers"
    assert record["collectionId"] == SUPERUSERS_ID
    assert record["email"] == SUPERUSER_EMAIL
    assert "password" not in record and "tokenKey" not in record
    assert isinstance(body["token"], str) and body["token"]


def test_superuser_token_is_hs256_jwt_with_expected_claims(api: Api) -> None:
    before = int(time.time())
    response = login_response(api, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)
    assert response.status_code == 200, response.text
    token, record = response.json()["token"], response.json()["record"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    payload = payload_of(token)
    assert set(payload) == {"id", "collectionId", "type", "refreshable", "exp"}
    assert payload["id"] == record["id"]
    assert payload["collectionId"] == SUPERUSERS_ID
    assert payload["type"] == "auth"
    assert payload["refreshable"] is True
    assert isinstance(payload["exp"], int)
    assert payload["exp"] > time.time()
    assert before + 86400 - 5 <= payload["exp"] <= int(time.time()) + 86400 + 5


def test_wrong_password(api: Api, server: ServerProcess) -> None:
    response = login_response(api, "_superusers", SUPERUSER_EMAIL, "wrong-password")
    assert error(server, response, 400) == AUTH_FAILED


def test_unknown_identity(api: Api, server: ServerProcess) -> None:
    response = login_response(api, "_superusers", "nobody@example.com", SUPERUSER_PASSWORD)
    assert error(server, response, 400) == AUTH_FAILED


@pytest.mark.parametrize("body", [{}, {"identity": "", "password": ""}])
def test_missing_identity_and_password(api: Api, server: ServerProcess, body: dict[str, Any]) -> None:
    response = api.http.post("/api/collections/_superusers/auth-with-password", json=body)
    data = error(server, response, 400)["data"]
    assert data["identity"]["code"] == "validation_required"
    assert data["password"]["code"] == "validation_required"


def test_missing_password_only(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/_superusers/auth-with-password", json={"identity": SUPERUSER_EMAIL})
    data = error(server, response, 400)["data"]
    assert set(data) == {"password"}
    assert data["password"]["code"] == "validation_required"


def test_bad_json(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/_superusers/auth-with-password", content=b'{"identity": ',
                             headers={"Content-Type": "application/json"})
    error(server, response, 400)


def test_json_array_body(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/_superusers/auth-with-password",
                             json=[{"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD}])
    error(server, response, 400)


def test_identity_of_wrong_type(api: Api, server: ServerProcess) -> None:
    response = login_response(api, "_superusers", 123, SUPERUSER_PASSWORD)
    error(server, response, 400)


def test_form_urlencoded_login(api: Api) -> None:
    response = api.http.post("/api/collections/_superusers/auth-with-password",
                             data={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
    assert response.status_code == 200, response.text
    assert response.json()["record"]["email"] == SUPERUSER_EMAIL
    assert payload_of(response.json()["token"])["collectionId"] == SUPERUSERS_ID


def test_unknown_collection(api: Api, server: ServerProcess) -> None:
    response = login_response(api, "no_such_collection", SUPERUSER_EMAIL, SUPERUSER_PASSWORD)
    error(server, response, 404)


def test_base_collection_is_not_an_auth_collection(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    name = unique("base")
    created = api.http.post("/api/collections", headers=su,
                            json={"name": name, "type": "base", "fields": [{"name": "title", "type": "text"}]})
    assert created.status_code == 200, created.text
    response = login_response(api, name, SUPERUSER_EMAIL, SUPERUSER_PASSWORD)
    error(server, response, 400)
    refresh = api.http.post(f"/api/collections/{name}/auth-refresh", headers=su)
    assert refresh.status_code in (400, 403, 404), refresh.text
    error(server, refresh, refresh.status_code)


# ---------------------------------------------------------------------------------------------
# users collection
# ---------------------------------------------------------------------------------------------


def test_create_user_and_login(api: Api) -> None:
    email = f"{unique('u')}@example.com"
    response = api.http.post("/api/collections/users/records",
                             json={"email": email, "password": "userpass123", "passwordConfirm": "userpass123"})
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["collectionName"] == "users"
    assert "password" not in created and "tokenKey" not in created

    login = login_response(api, "users", email, "userpass123")
    assert login.status_code == 200, login.text
    body = login.json()
    assert body["record"]["id"] == created["id"]
    assert body["record"]["email"] == email
    assert body["record"]["collectionName"] == "users"
    assert "password" not in body["record"] and "tokenKey" not in body["record"]
    payload = payload_of(body["token"])
    assert payload["collectionId"] == USERS_ID
    assert payload["id"] == created["id"]
    assert payload["type"] == "auth" and payload["refreshable"] is True
    assert set(payload) == {"id", "collectionId", "type", "refreshable", "exp"}
    assert payload["exp"] > time.time()


def test_user_wrong_password(api: Api, server: ServerProcess) -> None:
    _, _, email = new_user(api)
    assert error(server, login_response(api, "users", email, "not-the-password"), 400) == AUTH_FAILED


def test_create_user_password_confirm_mismatch(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/users/records",
                             json={"email": f"{unique('u')}@example.com", "password": "userpass123",
                                   "passwordConfirm": "different123"})
    data = error(server, response, 400)["data"]
    assert data["passwordConfirm"]["code"] == "validation_values_mismatch"


def test_create_user_short_password(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/users/records",
                             json={"email": f"{unique('u')}@example.com", "password": "short", "passwordConfirm": "short"})
    data = error(server, response, 400)["data"]
    assert data["password"]["code"] == "validation_min_text_constraint"


def test_create_user_duplicate_email(api: Api, server: ServerProcess) -> None:
    _, _, email = new_user(api)
    response = api.http.post("/api/collections/users/records",
                             json={"email": email, "password": "otherpass123", "passwordConfirm": "otherpass123"})
    data = error(server, response, 400)["data"]
    assert data["email"]["code"] == "validation_not_unique"
    # The first user can still log in with the original password, not the rejected one.
    assert login_response(api, "users", email, "userpass123").status_code == 200
    assert login_response(api, "users", email, "otherpass123").status_code == 400


def test_user_cannot_log_in_as_superuser(api: Api, server: ServerProcess) -> None:
    _, _, email = new_user(api)
    assert error(server, login_response(api, "_superusers", email, "userpass123"), 400) == AUTH_FAILED


# ---------------------------------------------------------------------------------------------
# auth-refresh
# ---------------------------------------------------------------------------------------------


def test_refresh_superuser(api: Api, su: dict[str, str]) -> None:
    response = api.http.post("/api/collections/_superusers/auth-refresh", headers=su)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token", "record"}
    assert body["record"]["email"] == SUPERUSER_EMAIL
    assert "password" not in body["record"] and "tokenKey" not in body["record"]
    payload = payload_of(body["token"])
    assert payload["collectionId"] == SUPERUSERS_ID and payload["id"] == body["record"]["id"]
    # The refreshed token works in turn.
    assert api.http.get("/api/collections", headers=auth(body["token"])).status_code == 200


def test_refresh_user(api: Api) -> None:
    record, token, _ = new_user(api)
    response = api.http.post("/api/collections/users/auth-refresh", headers=auth(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["record"]["id"] == record["id"]
    assert payload_of(body["token"])["collectionId"] == USERS_ID
    again = api.http.post("/api/collections/users/auth-refresh", headers=auth(body["token"]))
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("prefix", ["Bearer ", "bearer "])
def test_refresh_with_bearer_prefix(api: Api, prefix: str) -> None:
    token = api.superuser_token()
    response = api.http.post("/api/collections/_superusers/auth-refresh", headers={"Authorization": prefix + token})
    assert response.status_code == 200, response.text
    assert response.json()["record"]["email"] == SUPERUSER_EMAIL


def test_refresh_without_token(api: Api, server: ServerProcess) -> None:
    response = api.http.post("/api/collections/_superusers/auth-refresh")
    assert error(server, response, 401) == UNAUTHORIZED
    response = api.http.post("/api/collections/users/auth-refresh")
    assert error(server, response, 401) == UNAUTHORIZED


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer garbage", "eyJhbGciOiJIUzI1NiJ9.e30.xxx"])
def test_refresh_with_garbage_token(api: Api, server: ServerProcess, token: str) -> None:
    response = api.http.post("/api/collections/_superusers/auth-refresh", headers={"Authorization": token})
    assert error(server, response, 401) == UNAUTHORIZED


def test_refresh_with_token_of_another_collection(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    response = api.http.post("/api/collections/users/auth-refresh", headers=su)
    error(server, response, 403)


def test_refresh_superusers_with_user_token(api: Api, server: ServerProcess) -> None:
    _, token, _ = new_user(api)
    response = api.http.post("/api/collections/_superusers/auth-refresh", headers=auth(token))
    error(server, response, 403)


# ---------------------------------------------------------------------------------------------
# 401 / 403 on superuser-only routes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", SUPERUSER_ROUTES)
def test_superuser_route_accepts_superuser(api: Api, su: dict[str, str], route: str) -> None:
    assert api.http.get(route, headers=su).status_code == 200


@pytest.mark.parametrize("route", SUPERUSER_ROUTES)
def test_superuser_route_without_token(api: Api, server: ServerProcess, route: str) -> None:
    assert error(server, api.http.get(route), 401) == UNAUTHORIZED


@pytest.mark.parametrize("route", SUPERUSER_ROUTES)
def test_superuser_route_with_user_token(api: Api, server: ServerProcess, route: str) -> None:
    _, token, _ = new_user(api)
    assert error(server, api.http.get(route, headers=auth(token)), 403) == FORBIDDEN


@pytest.mark.parametrize("route", SUPERUSER_ROUTES)
def test_superuser_route_with_tampered_token(api: Api, server: ServerProcess, route: str) -> None:
    token = api.superuser_token()
    assert api.http.get(route, headers=auth(token)).status_code == 200
    assert error(server, api.http.get(route, headers=auth(tamper_signature(token))), 401) == UNAUTHORIZED


def test_tampered_payload_is_rejected(api: Api, server: ServerProcess) -> None:
    """A user token whose payload is rewritten to say "superuser" does not pass as one."""
    record, token, _ = new_user(api)
    head, _, signature = token.split(".")
    forged = jwt.encode({"collectionId": SUPERUSERS_ID, "exp": int(time.time()) + 3600, "id": superuser_id(server),
                         "refreshable": True, "type": "auth"}, "x" * 32, algorithm="HS256").split(".")[1]
    response = api.http.get("/api/collections", headers=auth(f"{head}.{forged}.{signature}"))
    assert error(server, response, 401) == UNAUTHORIZED


def test_crafted_superuser_token_valid_then_expired(api: Api, server: ServerProcess) -> None:
    record_id = superuser_id(server)
    valid = craft_token(server, "_superusers", SUPERUSERS_ID, record_id, int(time.time()) + 3600)
    # The crafting method is sound: a non-expired token signed this way is accepted.
    for route in SUPERUSER_ROUTES:
        assert api.http.get(route, headers=auth(valid)).status_code == 200, route
    expired = craft_token(server, "_superusers", SUPERUSERS_ID, record_id, int(time.time()) - 60)
    for route in SUPERUSER_ROUTES:
        assert error(server, api.http.get(route, headers=auth(expired)), 401) == UNAUTHORIZED
    response = api.http.post("/api/collections/_superusers/auth-refresh", headers=auth(expired))
    assert error(server, response, 401) == UNAUTHORIZED


def test_crafted_user_token_valid_then_expired(api: Api, server: ServerProcess) -> None:
    record, _, _ = new_user(api)
    valid = craft_token(server, "users", USERS_ID, record["id"], int(time.time()) + 3600)
    response = api.http.post("/api/collections/users/auth-refresh", headers=auth(valid))
    assert response.status_code == 200, response.text
    assert response.json()["record"]["id"] == record["id"]
    expired = craft_token(server, "users", USERS_ID, record["id"], int(time.time()) - 60)
    response = api.http.post("/api/collections/users/auth-refresh", headers=auth(expired))
    assert error(server, response, 401) == UNAUTHORIZED


def test_token_signed_with_wrong_collection_secret(api: Api, server: ServerProcess) -> None:
    """The users secret with a superuser's token key does not make a superuser token."""
    record_id = superuser_id(server)
    key = token_key(server, "_superusers", record_id) + token_secret(server, USERS_ID)
    token = jwt.encode({"collectionId": SUPERUSERS_ID, "exp": int(time.time()) + 3600, "id": record_id,
                        "refreshable": True, "type": "auth"}, key, algorithm="HS256")
    assert error(server, api.http.get("/api/collections", headers=auth(token)), 401) == UNAUTHORIZED


@pytest.mark.parametrize("route", SUPERUSER_ROUTES)
def test_superuser_route_with_alg_none_token(api: Api, server: ServerProcess, route: str) -> None:
    payload = {"collectionId": SUPERUSERS_ID, "exp": int(time.time()) + 3600, "id": superuser_id(server),
               "refreshable": True, "type": "auth"}
    token = jwt.encode(payload, None, algorithm="none")
    assert error(server, api.http.get(route, headers=auth(token)), 401) == UNAUTHORIZED
    # The same with an (ignored) signature appended.
    assert error(server, api.http.get(route, headers=auth(token + "c2ln")), 401) == UNAUTHORIZED


def test_file_token_is_not_an_auth_token(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    file_token = api.http.post("/api/files/token", headers=su).json()["token"]
    assert error(server, api.http.get("/api/collections", headers=auth(file_token)), 401) == UNAUTHORIZED


def test_token_of_deleted_user(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    record, token, _ = new_user(api)
    assert api.http.post("/api/collections/users/auth-refresh", headers=auth(token)).status_code == 200
    assert api.http.get("/api/settings", headers=auth(token)).status_code == 403
    deleted = api.http.delete(f"/api/collections/users/records/{record['id']}", headers=su)
    assert deleted.status_code == 204, deleted.text
    response = api.http.post("/api/collections/users/auth-refresh", headers=auth(token))
    assert error(server, response, 401) == UNAUTHORIZED
    for route in SUPERUSER_ROUTES:
        assert error(server, api.http.get(route, headers=auth(token)), 401) == UNAUTHORIZED
    assert error(server, api.http.post("/api/files/token", headers=auth(token)), 401) == UNAUTHORIZED


# ---------------------------------------------------------------------------------------------
# password changes invalidate tokens
# ---------------------------------------------------------------------------------------------


def test_user_password_change_invalidates_old_tokens(api: Api, server: ServerProcess) -> None:
    record, old_token, email = new_user(api)
    second_old_token = api.login("users", email, "userpass123")
    response = api.http.patch(f"/api/collections/users/records/{record['id']}", headers=auth(old_token),
                              json={"password": "newpass4567", "passwordConfirm": "newpass4567",
                                    "oldPassword": "userpass123"})
    assert response.status_code == 200, response.text
    assert "password" not in response.json() and "tokenKey" not in response.json()
    for token in (old_token, second_old_token):
        refresh = api.http.post("/api/collections/users/auth-refresh", headers=auth(token))
        assert error(server, refresh, 401) == UNAUTHORIZED
    assert error(server, login_response(api, "users", email, "userpass123"), 400) == AUTH_FAILED
    new_token = api.login("users", email, "newpass4567")
    refresh = api.http.post("/api/collections/users/auth-refresh", headers=auth(new_token))
    assert refresh.status_code == 200, refresh.text
    assert refresh.json()["record"]["id"] == record["id"]


def test_user_cannot_change_another_users_password(api: Api, server: ServerProcess) -> None:
    victim, victim_token, victim_email = new_user(api)
    _, attacker_token, _ = new_user(api)
    response = api.http.patch(f"/api/collections/users/records/{victim['id']}", headers=auth(attacker_token),
                              json={"password": "hijacked123", "passwordConfirm": "hijacked123"})
    assert response.status_code in (403, 404), response.text
    error(server, response, response.status_code)
    assert api.http.post("/api/collections/users/auth-refresh", headers=auth(victim_token)).status_code == 200
    assert api.login("users", victim_email, "userpass123")


def test_superuser_cli_upsert_invalidates_old_token(fresh_server: ServerProcess) -> None:
    api = Api(fresh_server)
    try:
        old_token = api.superuser_token()
        assert api.http.get("/api/collections", headers=auth(old_token)).status_code == 200
        result = run_cli("superuser", "upsert", SUPERUSER_EMAIL, "brand-new-pass", data_dir=fresh_server.data_dir)
        assert f'Successfully saved superuser "{SUPERUSER_EMAIL}"!' in result.stdout
        assert error(fresh_server, api.http.get("/api/collections", headers=auth(old_token)), 401) == UNAUTHORIZED
        refresh = api.http.post("/api/collections/_superusers/auth-refresh", headers=auth(old_token))
        assert error(fresh_server, refresh, 401) == UNAUTHORIZED
        assert error(fresh_server, login_response(api, "_superusers", SUPERUSER_EMAIL, SUPERUSER_PASSWORD), 400) == AUTH_FAILED
        new_token = api.login("_superusers", SUPERUSER_EMAIL, "brand-new-pass")
        assert api.http.get("/api/collections", headers=auth(new_token)).status_code == 200
    finally:
        api.close()


# ---------------------------------------------------------------------------------------------
# file tokens
# ---------------------------------------------------------------------------------------------


def test_file_token_superuser(api: Api, su: dict[str, str]) -> None:
    response = api.http.post("/api/files/token", headers=su)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token"}
    assert isinstance(body["token"], str) and body["token"]


def test_file_token_without_auth(api: Api, server: ServerProcess) -> None:
    assert error(server, api.http.post("/api/files/token"), 401) == UNAUTHORIZED
    response = api.http.post("/api/files/token", headers={"Authorization": "garbage"})
    assert error(server, response, 401) == UNAUTHORIZED


def test_file_token_user(api: Api) -> None:
    _, token, _ = new_user(api)
    response = api.http.post("/api/files/token", headers=auth(token))
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["token"], str) and response.json()["token"]


# ---------------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------------


def test_health_anonymous(api: Api) -> None:
    response = api.http.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {"message": "API is healthy.", "code": 200, "data": {}}


def test_health_ignores_invalid_token(api: Api) -> None:
    response = api.http.get("/api/health", headers={"Authorization": "garbage"})
    assert response.status_code == 200
    assert response.json()["data"] == {}


def test_health_superuser(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/health", headers=su)
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "API is healthy." and body["code"] == 200
    assert body["data"] == {"canBackup": True, "realIP": "127.0.0.1", "possibleProxyHeader": "",
                            "backupStale": False}  # ours: backupStale (the catalog, issue 15)


def test_health_superuser_behind_untrusted_proxy(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/health", headers={**su, "X-Forwarded-For": "203.0.113.7"})
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["possibleProxyHeader"] != ""
    assert "forwarded" in data["possibleProxyHeader"].lower()
    assert data["realIP"] == "127.0.0.1"  # the header is not trusted


def test_health_user(api: Api) -> None:
    _, token, _ = new_user(api)
    response = api.http.get("/api/health", headers=auth(token))
    assert response.status_code == 200
    assert response.json()["data"] == {}


# ---------------------------------------------------------------------------------------------
# no filesystem paths in errors
# ---------------------------------------------------------------------------------------------


def test_error_bodies_never_contain_a_path(api: Api, server: ServerProcess, su: dict[str, str]) -> None:
    requests = [
        ("POST", "/api/collections/_superusers/auth-with-password", {"content": b"{bad"}),
        ("POST", "/api/collections/_superusers/auth-with-password", {"json": {"identity": 1, "password": 2}}),
        ("POST", "/api/collections/nope/auth-with-password", {"json": {"identity": "a", "password": "b"}}),
        ("POST", "/api/collections/nope/auth-refresh", {"headers": su}),
        ("GET", "/api/collections", {"headers": {"Authorization": "x.y.z"}}),
        ("GET", "/api/backups/missing.zip", {}),
        ("DELETE", "/api/backups/missing.zip", {"headers": su}),
        ("POST", "/api/backups/missing.zip/restore", {"headers": su}),
        ("GET", "/api/files/users/nope/nope.png", {}),
        ("POST", "/api/collections/users/records", {"json": {"email": "bad", "password": "x"}}),
    ]
    collected = list(ERROR_TEXTS)
    for method, url, kwargs in requests:
        response = api.http.request(method, url, **kwargs)
        assert response.status_code >= 400, (method, url, response.text)
        collected.append(response.text)
    assert len(collected) >= len(requests)
    for text in collected:
        assert str(server.data_dir) not in text
        assert str(server.data_dir.parent) not in text
        assert "pb_data" not in text
        assert "Traceback" not in text


def test_auth_methods(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/collections/users/auth-methods")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["password"] == {"identityFields": ["email"], "enabled": True}
    assert body["oauth2"]["enabled"] is False and body["mfa"]["enabled"] is False
    # Password auth turned off for the collection: the route says so and logins are refused.
    name = "authm_" + os.urandom(3).hex()
    assert api.http.post("/api/collections", headers=su, json={
        "name": name, "type": "auth", "createRule": "", "passwordAuth": {"enabled": False},
    }).status_code == 200
    assert api.http.get(f"/api/collections/{name}/auth-methods").json()["password"]["enabled"] is False
    created = api.http.post(f"/api/collections/{name}/records",
                            json={"email": "pa@example.com", "password": "pass12345", "passwordConfirm": "pass12345"})
    assert created.status_code == 200, created.text
    refused = api.http.post(f"/api/collections/{name}/auth-with-password",
                            json={"identity": "pa@example.com", "password": "pass12345"})
    assert refused.status_code == 400
    # Not an auth collection, or no such collection.
    assert api.http.get("/api/collections/nope_nope/auth-methods").status_code == 404
