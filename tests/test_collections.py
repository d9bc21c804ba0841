"""Collections API (superuser only): list, view, create with validation, schema migrations, delete.

Every test works on collections of its own (``unique`` names), so the tests share one server.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Api, ServerProcess, auth, unique

DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}Z$")
RECORD_ID_RE = re.compile(r"^[a-z0-9]{15}$")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))

COMMON_FIELD_KEYS = {"hidden", "id", "name", "presentable", "system", "type"}
TYPE_FIELD_KEYS = {
    "text": {"autogeneratePattern", "help", "max", "min", "pattern", "primaryKey", "required"},
    "number": {"help", "max", "min", "onlyInt", "required"},
    "bool": {"help", "required"},
    "email": {"exceptDomains", "help", "onlyDomains", "required"},
    "url": {"exceptDomains", "help", "onlyDomains", "required"},
    "date": {"help", "max", "min", "required"},
    "select": {"help", "maxSelect", "required", "values"},
    "json": {"help", "maxSize", "required"},
    "file": {"help", "maxSelect", "maxSize", "mimeTypes", "protected", "required", "thumbs"},
    "autodate": {"onCreate", "onUpdate"},
}
ID_FIELD = {
    "autogeneratePattern": "[a-z0-9]{15}", "help": "", "hidden": False, "id": "text3208210256", "max": 15,
    "min": 15, "name": "id", "pattern": "^[a-z0-9]+$", "presentable": False, "primaryKey": True,
    "required": True, "system": True, "type": "text",
}

ALL_TYPES_FIELDS: list[dict[str, Any]] = [
    {"name": "title", "type": "text", "required": True, "max": 100},
    {"name": "views", "type": "number"},
    {"name": "published", "type": "bool"},
    {"name": "contact", "type": "email"},
    {"name": "link", "type": "url"},
    {"name": "when", "type": "date"},
    {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 2},
    {"name": "meta", "type": "json"},
    {"name": "cover", "type": "file", "maxSelect": 1, "maxSize": 1000000, "mimeTypes": ["image/png", "text/plain"]},
    {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False},
    {"name": "updated", "type": "autodate", "onCreate": True, "onUpdate": True},
]


# --- helpers ------------------------------------------------------------------------------------


def create(api: Api, su: dict[str, str], name: str | None = None, fields: list[dict[str, Any]] | None = None,
           **extra: Any) -> dict[str, Any]:
    body = {"name": name or unique("col"), "type": "base", "fields": fields if fields is not None else
            [{"name": "title", "type": "text"}], **extra}
    response = api.http.post("/api/collections", json=body, headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def get_collection(api: Api, su: dict[str, str], name: str) -> dict[str, Any]:
    response = api.http.get(f"/api/collections/{name}", headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def patch(api: Api, su: dict[str, str], name: str, body: dict[str, Any]) -> httpx.Response:
    return api.http.patch(f"/api/collections/{name}", json=body, headers=su)


def add_record(api: Api, su: dict[str, str], collection: str, data: dict[str, Any]) -> dict[str, Any]:
    response = api.http.post(f"/api/collections/{collection}/records", json=data, headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def columns(server: ServerProcess, table: str) -> dict[str, Any]:
    quoted = '"' + table.replace('"', '""') + '"'
    return {row["name"]: row for row in server.sql(f"PRAGMA table_info({quoted})")}


def table_exists(server: ServerProcess, table: str) -> bool:
    return bool(server.sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)))


def stored_collection(server: ServerProcess, name: str) -> list[Any]:
    return server.sql("SELECT * FROM _collections WHERE name = ? COLLATE NOCASE", (name,))


def field_of(collection: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in collection["fields"] if f["name"] == name)


def assert_refused(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"status", "message", "data"}
    assert body["status"] == status
    return body


def assert_not_created(server: ServerProcess, name: str) -> None:
    assert stored_collection(server, name) == []
    assert not table_exists(server, name)


def storage_files(server: ServerProcess, collection_id: str) -> list[Path]:
    root = server.data_dir / "storage" / collection_id
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- list and view --------------------------------------------------------------------------------


def test_list_collections_shape_and_system_collections(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/collections", headers=su)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"page", "perPage", "totalItems", "totalPages", "items"}
    assert body["page"] == 1 and body["perPage"] == 30
    assert body["totalItems"] >= 2 and body["totalPages"] >= 1
    by_name = {c["name"]: c for c in body["items"]}
    superusers = by_name["_superusers"]
    assert superusers["id"] == "pbc_3142635823"
    assert superusers["type"] == "auth" and superusers["system"] is True
    users = by_name["users"]
    assert users["id"] == "_pb_users_auth_" and users["type"] == "auth" and users["system"] is False
    # no secrets are exposed
    for collection in (superusers, users):
        for key in ("authToken", "passwordResetToken", "emailChangeToken", "verificationToken", "fileToken"):
            assert "secret" not in collection[key]
            assert isinstance(collection[key]["duration"], int)


def test_list_collections_paginates(api: Api, su: dict[str, str]) -> None:
    create(api, su)
    full = api.http.get("/api/collections", headers=su).json()
    response = api.http.get("/api/collections", params={"perPage": 1, "page": 2}, headers=su)
    assert response.status_code == 200
    body = response.json()
    assert body["perPage"] == 1 and body["page"] == 2
    assert body["totalItems"] == full["totalItems"] and body["totalPages"] == full["totalItems"]
    assert [c["id"] for c in body["items"]] == [full["items"][1]["id"]]


def test_view_collection_by_name_and_by_id(api: Api, su: dict[str, str]) -> None:
    created = create(api, su)
    by_name = get_collection(api, su, created["name"])
    by_id = get_collection(api, su, created["id"])
    assert by_name == created
    assert by_id == created
    assert get_collection(api, su, "_superusers")["id"] == "pbc_3142635823"
    assert get_collection(api, su, "pbc_3142635823")["name"] == "_superusers"
    assert get_collection(api, su, "_pb_users_auth_")["name"] == "users"


def test_view_unknown_collection_is_404(api: Api, su: dict[str, str]) -> None:
    for target in ("nope_" + unique(), "pbc_000"):
        body = assert_refused(api.http.get(f"/api/collections/{target}", headers=su), 404)
        assert body["message"] == "The requested resource wasn't found."
        assert body["data"] == {}
    assert_refused(patch(api, su, unique("nope"), {"listRule": ""}), 404)


def test_collections_require_superuser(api: Api, su: dict[str, str]) -> None:
    _, user_token = api.create_user(unique("u") + "@example.com")
    name = unique("noauth")
    existing = create(api, su)
    calls = [
        ("GET", "/api/collections", None),
        ("GET", f"/api/collections/{existing['name']}", None),
        ("POST", "/api/collections", {"name": name, "type": "base"}),
        ("PATCH", f"/api/collections/{existing['name']}", {"name": name}),
        ("DELETE", f"/api/collections/{existing['name']}", None),
    ]
    for method, url, body in calls:
        anonymous = assert_refused(api.http.request(method, url, json=body), 401)
        assert anonymous["message"] == "The request requires valid record authorization token."
        garbage = assert_refused(api.http.request(method, url, json=body, headers=auth("garbage.token.here")), 401)
        assert garbage["message"] == anonymous["message"]
        user = assert_refused(api.http.request(method, url, json=body, headers=auth(user_token)), 403)
        assert user["message"] == "The authorized record is not allowed to perform this action."
    assert_not_created(api.server, name)
    assert get_collection(api, su, existing["name"]) == existing
    assert table_exists(api.server, existing["name"])


# --- create ---------------------------------------------------------------------------------------


def test_create_base_collection_with_every_field_type(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("every")
    response = api.http.post("/api/collections", json={"name": name, "type": "base", "fields": ALL_TYPES_FIELDS},
                             headers=su)
    assert response.status_code == 200, response.text
    collection = response.json()

    assert re.fullmatch(r"pbc_\d+", collection["id"])
    assert collection["id"] == f"pbc_{zlib.crc32(('base' + name).encode())}"
    assert collection["name"] == name and collection["type"] == "base" and collection["system"] is False
    assert collection["indexes"] == []
    for rule in ("listRule", "viewRule", "createRule", "updateRule", "deleteRule"):
        assert collection[rule] is None
    assert DATETIME_RE.match(collection["created"]) and DATETIME_RE.match(collection["updated"])
    assert list(collection)[:7] == ["id", "listRule", "viewRule", "createRule", "updateRule", "deleteRule", "name"]

    fields = collection["fields"]
    assert fields[0] == ID_FIELD
    assert [f["name"] for f in fields] == ["id"] + [f["name"] for f in ALL_TYPES_FIELDS]
    for field, sent in zip(fields[1:], ALL_TYPES_FIELDS):
        kind = sent["type"]
        assert field["type"] == kind
        assert re.fullmatch(rf"{kind}\d+", field["id"]), field["id"]
        assert field["id"] == f"{kind}{zlib.crc32(sent['name'].encode())}"
        assert set(field) == COMMON_FIELD_KEYS | TYPE_FIELD_KEYS[kind], (kind, sorted(field))
        assert list(field) == sorted(field), "field keys are alphabetical"
        assert field["system"] is False and field["hidden"] is False and field["presentable"] is False
        for key, value in sent.items():
            assert field[key] == value, (kind, key)

    title = field_of(collection, "title")
    assert title["required"] is True and title["max"] == 100 and title["min"] == 0 and title["primaryKey"] is False
    number = field_of(collection, "views")
    assert number["min"] is None and number["max"] is None and number["onlyInt"] is False
    assert field_of(collection, "tags")["maxSelect"] == 2
    cover = field_of(collection, "cover")
    assert cover["thumbs"] == [] and cover["protected"] is False
    assert field_of(collection, "meta")["maxSize"] == 0
    assert field_of(collection, "updated")["onUpdate"] is True

    # the definition is stored and served back identically
    assert get_collection(api, su, name) == collection
    [row] = stored_collection(server, name)
    assert row["id"] == collection["id"] and row["type"] == "base"

    # the table exists with one column per field
    cols = columns(server, name)
    assert list(cols) == [f["name"] for f in fields]
    assert cols["id"]["pk"] == 1
    expected_types = {
        "id": "TEXT", "title": "TEXT", "views": "NUMERIC", "published": "BOOLEAN", "contact": "TEXT",
        "link": "TEXT", "when": "TEXT", "tags": "JSON", "meta": "JSON", "cover": "TEXT",
        "created": "TEXT", "updated": "TEXT",
    }
    assert {n: c["type"].upper() for n, c in cols.items()} == expected_types
    for name_ in ("title", "views", "published", "tags", "cover"):
        assert cols[name_]["notnull"] == 1, name_


def test_create_minimal_collection_gets_only_id_field(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("min")
    response = api.http.post("/api/collections", json={"name": name}, headers=su)
    assert response.status_code == 200, response.text
    collection = response.json()
    assert collection["type"] == "base"
    assert collection["fields"] == [ID_FIELD]
    assert list(columns(server, name)) == ["id"]


def test_create_duplicate_name_is_case_insensitive(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("dup")
    first = create(api, su, name)
    for candidate in (name, name.upper()):
        body = assert_refused(api.http.post("/api/collections", json={"name": candidate, "type": "base"}, headers=su))
        assert body["message"] == "Failed to create collection."
        assert body["data"]["name"]["code"] == "validation_collection_name_exists"
    assert len(stored_collection(server, name)) == 1
    assert get_collection(api, su, name) == first
    # the system names are taken too
    body = assert_refused(api.http.post("/api/collections", json={"name": "USERS"}, headers=su))
    assert body["data"]["name"]["code"] == "validation_collection_name_exists"


@pytest.mark.parametrize("bad_name", ["bad name!", "a-b", "x.y", "sqlite_master", "_collections"])
def test_create_invalid_name(api: Api, su: dict[str, str], server: ServerProcess, bad_name: str) -> None:
    body = assert_refused(api.http.post("/api/collections", json={"name": bad_name, "type": "base"}, headers=su))
    assert body["message"] == "Failed to create collection."
    assert body["data"]["name"]["code"] == "validation_match_invalid"
    assert body["data"]["name"]["message"] == "Must be in a valid format."
    if bad_name not in ("sqlite_master", "_collections"):
        assert_not_created(server, bad_name)


@pytest.mark.parametrize("body", [{"type": "base"}, {"name": "", "type": "base"}, {}])
def test_create_missing_name(api: Api, su: dict[str, str], body: dict[str, Any]) -> None:
    before = api.http.get("/api/collections", headers=su).json()["totalItems"]
    error = assert_refused(api.http.post("/api/collections", json=body, headers=su))
    assert error["data"]["name"]["code"] == "validation_required"
    assert api.http.get("/api/collections", headers=su).json()["totalItems"] == before


def test_create_unknown_collection_type(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("weird")
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "type": "weird"}, headers=su))
    assert body["data"]["type"]["code"] == "validation_in_invalid"
    assert_not_created(server, name)


def test_create_invalid_field_name(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("badfield")
    fields = [{"name": "ok", "type": "text"}, {"name": "a b", "type": "text"}]
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": fields}, headers=su))
    assert body["message"] == "Failed to create collection."
    # the index counts the auto-added id field as 0
    assert set(body["data"]["fields"]) == {"2"}
    assert body["data"]["fields"]["2"]["name"]["code"] == "validation_match_invalid"
    assert_not_created(server, name)


def test_create_field_without_name(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("noname")
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": [{"type": "text"}]},
                                        headers=su))
    assert body["data"]["fields"]["1"]["name"]["code"] == "validation_required"
    assert_not_created(server, name)


def test_create_select_without_values(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("sel")
    for field in ({"name": "s", "type": "select"}, {"name": "s", "type": "select", "values": []}):
        body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": [field]}, headers=su))
        assert body["data"]["fields"]["1"]["values"]["code"] == "validation_required"
    assert_not_created(server, name)


def test_create_duplicate_field_names(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("dupf")
    fields = [{"name": "title", "type": "text"}, {"name": "Title", "type": "number"}]
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": fields}, headers=su))
    errors = body["data"]["fields"]
    assert errors, body
    assert any(e.get("name", {}).get("code") == "validation_duplicated_field_name" for e in errors.values())
    assert_not_created(server, name)
    # exact duplicates too
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": [
        {"name": "x", "type": "text"}, {"name": "x", "type": "text"}]}, headers=su))
    assert body["data"]["fields"]
    assert_not_created(server, name)


def test_create_unknown_field_type(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("ftype")
    for kind in ("weird", "password", None):
        field: dict[str, Any] = {"name": "x", "type": kind}
        body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": [field]}, headers=su))
        assert "type" in body["data"]["fields"]["1"], body
    assert_not_created(server, name)


def test_create_reserved_field_name(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("reserved")
    body = assert_refused(api.http.post("/api/collections", json={
        "name": name, "fields": [{"name": "collectionName", "type": "text"}]}, headers=su))
    assert "name" in body["data"]["fields"]["1"]
    assert_not_created(server, name)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"name": "x",}', b'"text"'])
def test_create_bad_json_body(api: Api, su: dict[str, str], raw: bytes) -> None:
    before = api.http.get("/api/collections", headers=su).json()["totalItems"]
    response = api.http.post("/api/collections", content=raw,
                             headers={**su, "Content-Type": "application/json"})
    body = assert_refused(response)
    assert body["data"] == {}
    assert api.http.get("/api/collections", headers=su).json()["totalItems"] == before


def test_create_with_explicit_id(api: Api, su: dict[str, str]) -> None:
    wanted = "explicit" + unique("").strip("_")
    collection = create(api, su, id=wanted)
    assert collection["id"] == wanted
    body = assert_refused(api.http.post("/api/collections", json={"name": unique("again"), "id": wanted}, headers=su))
    assert "id" in body["data"]


SUPPORTED_RULES = [
    "title = 'x' && views > 3",
    "id = @request.auth.id",
    "@request.auth.id != ''",
    "(title != 'a' || views <= 2) && published = true",
    "title ~ 'abc' || title !~ \"d\"",
    "views >= 1.5 && views < 10",
    "title = null",
    "title = views",
]
UNSUPPORTED_RULES = [
    "title ?= 'x'",
    "@collection.posts.title = 'x'",
    "nofield = 1",
    "title = ",
    "title = 'x' ||",
    "(title = 'x'",
    "title",
    "title == 'x'",
    "@request.body.title = 'x'",
    "title:lower = 'x'",
    "strftime('%Y', title) = '2024'",
]


def test_supported_rules_are_accepted(api: Api, su: dict[str, str]) -> None:
    fields = [{"name": "title", "type": "text"}, {"name": "views", "type": "number"},
              {"name": "published", "type": "bool"}]
    for index, rule in enumerate(SUPPORTED_RULES):
        rules = {"listRule": rule, "viewRule": rule, "createRule": rule, "updateRule": rule, "deleteRule": rule}
        collection = create(api, su, fields=fields, **rules)
        for key, value in rules.items():
            assert collection[key] == value, (index, key)
        # and the rule runs: listing as a guest gives 200 (possibly empty)
        listed = api.http.get(f"/api/collections/{collection['name']}/records")
        assert listed.status_code == 200, (rule, listed.text)
    # also through PATCH, and "" / null reset
    collection = create(api, su, fields=fields)
    response = patch(api, su, collection["name"], {"listRule": "title = 'x' && views > 3", "viewRule": ""})
    assert response.status_code == 200, response.text
    assert response.json()["listRule"] == "title = 'x' && views > 3" and response.json()["viewRule"] == ""
    response = patch(api, su, collection["name"], {"listRule": None})
    assert response.status_code == 200 and response.json()["listRule"] is None


@pytest.mark.parametrize("rule", UNSUPPORTED_RULES)
def test_unsupported_rules_are_refused(api: Api, su: dict[str, str], server: ServerProcess, rule: str) -> None:
    fields = [{"name": "title", "type": "text"}, {"name": "views", "type": "number"}]
    name = unique("rule")
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "fields": fields, "listRule": rule},
                                        headers=su))
    assert body["message"] == "Failed to create collection."
    assert body["data"]["listRule"]["code"] == "validation_invalid_rule"
    assert_not_created(server, name)
    # the same rule through PATCH is refused too, and the collection is unchanged
    collection = create(api, su, fields=fields, viewRule="")
    body = assert_refused(patch(api, su, collection["name"], {"viewRule": rule, "listRule": ""}))
    assert body["data"]["viewRule"]["code"] == "validation_invalid_rule"
    assert get_collection(api, su, collection["name"]) == collection


def test_rule_must_be_string_or_null(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    name = unique("rulet")
    body = assert_refused(api.http.post("/api/collections", json={"name": name, "listRule": 1}, headers=su))
    assert body["data"]["listRule"]["code"] == "validation_invalid_rule"
    assert_not_created(server, name)


def test_rule_on_field_added_in_same_request(api: Api, su: dict[str, str]) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}])
    fields = collection["fields"] + [{"name": "score", "type": "number"}]
    response = patch(api, su, collection["name"], {"fields": fields, "listRule": "score > 1"})
    assert response.status_code == 200, response.text
    # a rule on a field removed in the same request is refused
    kept = [f for f in response.json()["fields"] if f["name"] != "score"]
    body = assert_refused(patch(api, su, collection["name"], {"fields": kept, "listRule": "score > 2"}))
    assert body["data"]["listRule"]["code"] == "validation_invalid_rule"


# --- migrations -----------------------------------------------------------------------------------


def test_add_field_migrates_existing_records(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}], listRule="", viewRule="")
    name = collection["name"]
    first = add_record(api, su, name, {"title": "one"})
    second = add_record(api, su, name, {"title": "two"})
    new_fields = [
        {"name": "score", "type": "number"},
        {"name": "flag", "type": "bool"},
        {"name": "note", "type": "text"},
        {"name": "data", "type": "json"},
        {"name": "labels", "type": "select", "values": ["x", "y"], "maxSelect": 3},
    ]
    response = patch(api, su, name, {"fields": collection["fields"] + new_fields})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert [f["name"] for f in updated["fields"]] == ["id", "title", "score", "flag", "note", "data", "labels"]
    assert updated["id"] == collection["id"]
    assert field_of(updated, "score")["id"] == f"number{zlib.crc32(b'score')}"

    assert list(columns(server, name)) == ["id", "title", "score", "flag", "note", "data", "labels"]
    for record in (first, second):
        got = api.http.get(f"/api/collections/{name}/records/{record['id']}").json()
        assert got["title"] == record["title"]
        assert got["score"] == 0 and got["flag"] is False and got["note"] == "" and got["data"] is None
        assert got["labels"] == []
    listed = api.http.get(f"/api/collections/{name}/records").json()
    assert [r["title"] for r in listed["items"]] == ["one", "two"]
    assert all(r["score"] == 0 for r in listed["items"])
    # and the new fields can be written
    third = add_record(api, su, name, {"title": "three", "score": 4, "flag": True, "labels": ["x", "y"]})
    assert third["score"] == 4 and third["flag"] is True and third["labels"] == ["x", "y"]


def test_remove_field_drops_column_and_keeps_other_data(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}, {"name": "extra", "type": "text"},
                                         {"name": "views", "type": "number"}], listRule="", viewRule="")
    name = collection["name"]
    record = add_record(api, su, name, {"title": "keep", "extra": "drop me", "views": 7})
    kept = [f for f in collection["fields"] if f["name"] != "extra"]
    response = patch(api, su, name, {"fields": kept})
    assert response.status_code == 200, response.text
    assert [f["name"] for f in response.json()["fields"]] == ["id", "title", "views"]
    assert list(columns(server, name)) == ["id", "title", "views"]
    got = api.http.get(f"/api/collections/{name}/records/{record['id']}").json()
    assert "extra" not in got
    assert got["title"] == "keep" and got["views"] == 7
    # the id field is re-added even when the client leaves it out
    response = patch(api, su, name, {"fields": [f for f in kept if f["name"] != "id"]})
    assert response.status_code == 200, response.text
    assert [f["name"] for f in response.json()["fields"]] == ["id", "title", "views"]
    assert response.json()["fields"][0] == ID_FIELD


def test_rename_field_keeps_its_data(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}, {"name": "views", "type": "number"}],
                        listRule="", viewRule="")
    name = collection["name"]
    record = add_record(api, su, name, {"title": "hello", "views": 3})
    fields = [dict(f) for f in collection["fields"]]
    title_id = field_of(collection, "title")["id"]
    for field in fields:
        if field["name"] == "title":
            field["name"] = "headline"
    response = patch(api, su, name, {"fields": fields})
    assert response.status_code == 200, response.text
    renamed = field_of(response.json(), "headline")
    assert renamed["id"] == title_id
    assert list(columns(server, name)) == ["id", "headline", "views"]
    got = api.http.get(f"/api/collections/{name}/records/{record['id']}").json()
    assert got["headline"] == "hello" and got["views"] == 3 and "title" not in got
    assert api.http.get(f"/api/collections/{name}/records", params={"filter": "headline = 'hello'"}).json()[
        "totalItems"] == 1


def test_rename_collection(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    old = unique("old")
    new = unique("new")
    collection = create(api, su, old, fields=[{"name": "title", "type": "text"}], listRule="", viewRule="",
                        indexes=[f"CREATE UNIQUE INDEX `idx_title_{old}` ON `{old}` (`title`)"])
    record = add_record(api, su, old, {"title": "kept"})
    response = patch(api, su, old, {"name": new})
    assert response.status_code == 200, response.text
    renamed = response.json()
    assert renamed["name"] == new and renamed["id"] == collection["id"]
    assert not table_exists(server, old) and table_exists(server, new)
    assert stored_collection(server, old) == []
    assert api.http.get(f"/api/collections/{old}", headers=su).status_code == 404
    assert api.http.get(f"/api/collections/{old}/records").status_code == 404
    assert get_collection(api, su, collection["id"])["name"] == new
    got = api.http.get(f"/api/collections/{new}/records/{record['id']}")
    assert got.status_code == 200 and got.json()["title"] == "kept" and got.json()["collectionName"] == new
    # the index follows the table
    assert all(f"`{new}`" in index for index in renamed["indexes"]), renamed["indexes"]
    duplicate = api.http.post(f"/api/collections/{new}/records", json={"title": "kept"}, headers=su)
    assert duplicate.status_code == 400 and duplicate.json()["data"]["title"]["code"] == "validation_not_unique"
    # renaming to a taken name fails and changes nothing
    body = assert_refused(patch(api, su, new, {"name": "Users"}))
    assert body["data"]["name"]["code"] == "validation_collection_name_exists"
    assert table_exists(server, new)


def test_rename_system_collection_refused(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    body = assert_refused(patch(api, su, "_superusers", {"name": unique("su")}))
    assert body["data"]["name"]["code"] == "validation_collection_system_name_change"
    assert table_exists(server, "_superusers")


def test_change_field_type_refused(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}])
    name = collection["name"]
    record = add_record(api, su, name, {"title": "text value"})
    fields = [dict(f) for f in collection["fields"]]
    fields[1]["type"] = "number"
    body = assert_refused(patch(api, su, name, {"fields": fields}))
    assert body["message"] == "Failed to update collection."
    assert "1" in body["data"]["fields"], body
    assert "validation_field_type_change" in str(body["data"]["fields"]["1"])
    assert get_collection(api, su, name) == collection
    assert columns(server, name)["title"]["type"] == "TEXT"
    assert server.sql(f'SELECT title FROM "{name}" WHERE id = ?', (record["id"],))[0]["title"] == "text value"


def test_change_collection_type_refused(api: Api, su: dict[str, str]) -> None:
    collection = create(api, su)
    body = assert_refused(patch(api, su, collection["name"], {"type": "auth"}))
    assert body["data"]["type"]["code"] == "validation_collection_type_change"
    assert get_collection(api, su, collection["name"]) == collection
    body = assert_refused(patch(api, su, "users", {"type": "base"}))
    assert body["data"]["type"]["code"] == "validation_collection_type_change"
    assert get_collection(api, su, "users")["type"] == "auth"


def test_select_max_select_conversion(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "pick", "type": "select", "values": ["a", "b", "c"],
                                          "maxSelect": 1}], listRule="", viewRule="")
    name = collection["name"]
    filled = add_record(api, su, name, {"pick": "b"})
    empty = add_record(api, su, name, {})
    assert filled["pick"] == "b" and empty["pick"] == ""

    fields = [dict(f) for f in collection["fields"]]
    fields[1]["maxSelect"] = 2
    response = patch(api, su, name, {"fields": fields})
    assert response.status_code == 200, response.text
    assert field_of(response.json(), "pick")["maxSelect"] == 2
    view = lambda rid: api.http.get(f"/api/collections/{name}/records/{rid}").json()  # noqa: E731
    assert view(filled["id"])["pick"] == ["b"]
    assert view(empty["id"])["pick"] == []
    assert server.sql(f'SELECT pick FROM "{name}" WHERE id = ?', (filled["id"],))[0]["pick"] == '["b"]'
    both = add_record(api, su, name, {"pick": ["a", "c"]})
    assert both["pick"] == ["a", "c"]

    fields[1]["maxSelect"] = 1
    response = patch(api, su, name, {"fields": fields})
    assert response.status_code == 200, response.text
    assert view(filled["id"])["pick"] == "b"
    assert view(empty["id"])["pick"] == ""
    # a list of several keeps a single one of its values
    assert view(both["id"])["pick"] in ("a", "c")
    assert server.sql(f'SELECT pick FROM "{name}" WHERE id = ?', (filled["id"],))[0]["pick"] == "b"


def test_unique_index_rejects_duplicates(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "code", "type": "text"}, {"name": "n", "type": "number"}],
                        createRule="")
    name = collection["name"]
    index = f"CREATE UNIQUE INDEX `idx_code_{collection['id']}` ON `{name}` (`code`)"
    response = patch(api, su, name, {"indexes": [index]})
    assert response.status_code == 200, response.text
    assert response.json()["indexes"] == [index]
    assert server.sql("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (f"idx_code_{collection['id']}",))
    add_record(api, su, name, {"code": "A1"})
    response = api.http.post(f"/api/collections/{name}/records", json={"code": "A1", "n": 2})
    body = assert_refused(response)
    assert body["message"] == "Failed to create record."
    assert body["data"]["code"]["code"] == "validation_not_unique"
    assert server.sql(f'SELECT COUNT(*) AS n FROM "{name}"')[0]["n"] == 1
    other = add_record(api, su, name, {"code": "B2"})
    # the same constraint on update
    response = api.http.patch(f"/api/collections/{name}/records/{other['id']}", json={"code": "A1"}, headers=su)
    assert assert_refused(response)["data"]["code"]["code"] == "validation_not_unique"
    # an index that existing data violates is refused
    add_record(api, su, name, {"code": "C3", "n": 5})
    add_record(api, su, name, {"code": "D4", "n": 5})
    bad = f"CREATE UNIQUE INDEX `idx_n_{collection['id']}` ON `{name}` (`n`)"
    body = assert_refused(patch(api, su, name, {"indexes": [index, bad]}))
    assert "indexes" in body["data"]
    assert get_collection(api, su, name)["indexes"] == [index]


@pytest.mark.parametrize("statement", [
    "CREATE INDEX `idx_bad` ON `{name}` (`nope`)",
    "CREATE INDEX idx_syntax ON {name} (",
    "DROP TABLE `{name}`",
    "not sql at all",
])
def test_invalid_index_refused_and_collection_unchanged(api: Api, su: dict[str, str], server: ServerProcess,
                                                        statement: str) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}])
    name = collection["name"]
    record = add_record(api, su, name, {"title": "safe"})
    bad = statement.format(name=name)
    body = assert_refused(patch(api, su, name, {"indexes": [bad], "listRule": ""}))
    assert "indexes" in body["data"], body
    assert get_collection(api, su, name) == collection
    assert table_exists(server, name)
    assert server.sql(f'SELECT title FROM "{name}" WHERE id = ?', (record["id"],))[0]["title"] == "safe"
    assert server.sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                      (name,)) == []
    # on create too
    other = unique("idx")
    body = assert_refused(api.http.post("/api/collections", json={
        "name": other, "fields": [{"name": "title", "type": "text"}], "indexes": [statement.format(name=other)]},
        headers=su))
    assert "indexes" in body["data"]
    assert_not_created(server, other)


def test_failed_migration_is_atomic(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    """A rename plus a new field plus a bad index: nothing of it is applied."""
    collection = create(api, su, fields=[{"name": "title", "type": "text"}])
    name = collection["name"]
    new_name = unique("atomic")
    fields = collection["fields"] + [{"name": "extra", "type": "number"}]
    body = assert_refused(patch(api, su, name, {
        "name": new_name, "fields": fields, "indexes": [f"CREATE INDEX `i_{new_name}` ON `{new_name}` (`missing`)"]}))
    assert "indexes" in body["data"]
    assert get_collection(api, su, name) == collection
    assert list(columns(server, name)) == ["id", "title"]
    assert not table_exists(server, new_name)


# --- delete ---------------------------------------------------------------------------------------


def test_delete_collection_removes_table_and_files(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"},
                                         {"name": "doc", "type": "file", "maxSelect": 1}])
    name, cid = collection["name"], collection["id"]
    response = api.http.post(f"/api/collections/{name}/records", data={"title": "with file"},
                             files={"doc": ("picture.png", PNG, "image/png")}, headers=su)
    assert response.status_code == 200, response.text
    record = response.json()
    stored = server.data_dir / "storage" / cid / record["id"] / record["doc"]
    assert stored.is_file() and stored.read_bytes() == PNG

    response = api.http.delete(f"/api/collections/{name}", headers=su)
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert not table_exists(server, name)
    assert stored_collection(server, name) == []
    assert not (server.data_dir / "storage" / cid).exists()
    assert api.http.get(f"/api/collections/{name}", headers=su).status_code == 404
    assert api.http.get(f"/api/collections/{cid}", headers=su).status_code == 404
    assert api.http.get(f"/api/collections/{name}/records", headers=su).status_code == 404
    # deleting it again
    assert assert_refused(api.http.delete(f"/api/collections/{name}", headers=su), 404)["data"] == {}
    # the name can be used again
    again = create(api, su, name)
    assert again["name"] == name
    assert storage_files(server, again["id"]) == []


def test_delete_collection_by_id(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su)
    assert api.http.delete(f"/api/collections/{collection['id']}", headers=su).status_code == 204
    assert not table_exists(server, collection["name"])


def test_delete_superusers_refused(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    for target in ("_superusers", "pbc_3142635823"):
        body = assert_refused(api.http.delete(f"/api/collections/{target}", headers=su))
        assert body["message"] == "Failed to delete collection."
    assert table_exists(server, "_superusers")
    assert get_collection(api, su, "_superusers")["system"] is True
    # the superuser can still log in
    assert api.superuser_token()


def test_delete_unknown_collection_404(api: Api, su: dict[str, str]) -> None:
    body = assert_refused(api.http.delete(f"/api/collections/{unique('ghost')}", headers=su), 404)
    assert body["message"] == "The requested resource wasn't found."


# --- migrations that must keep rules, indexes and names consistent ---------------------------------


@pytest.mark.parametrize("change", ["rename", "remove"])
def test_field_used_by_a_rule_cannot_disappear(api: Api, su: dict[str, str], server: ServerProcess,
                                               change: str) -> None:
    """A stored rule must never name a missing field: the change is refused (as PocketBase, which
    validates every rule on save), and the records API keeps working."""
    collection = create(api, su, fields=[{"name": "title", "type": "text"}, {"name": "views", "type": "number"}],
                        listRule="title = 'x'", viewRule="")
    name = collection["name"]
    add_record(api, su, name, {"title": "x"})
    if change == "rename":
        fields = [dict(f, name="headline") if f["name"] == "title" else f for f in collection["fields"]]
    else:
        fields = [f for f in collection["fields"] if f["name"] != "title"]
    body = assert_refused(patch(api, su, name, {"fields": fields}))
    assert body["data"]["listRule"]["code"] == "validation_invalid_rule"
    assert get_collection(api, su, name) == collection
    assert list(columns(server, name)) == ["id", "title", "views"]
    listed = api.http.get(f"/api/collections/{name}/records")
    assert listed.status_code == 200 and listed.json()["totalItems"] == 1
    # changing the rule in the same request makes the change valid
    response = patch(api, su, name, {"fields": fields, "listRule": "views >= 0"})
    assert response.status_code == 200, response.text
    assert api.http.get(f"/api/collections/{name}/records").status_code == 200


def test_swap_two_field_names(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "a", "type": "text"}, {"name": "b", "type": "text"}], viewRule="")
    name = collection["name"]
    record = add_record(api, su, name, {"a": "value of a", "b": "value of b"})
    swapped = {"a": "b", "b": "a"}
    fields = [dict(f, name=swapped.get(f["name"], f["name"])) for f in collection["fields"]]
    response = patch(api, su, name, {"fields": fields})
    assert response.status_code == 200, response.text
    assert [f["name"] for f in response.json()["fields"]] == ["id", "b", "a"]
    got = api.http.get(f"/api/collections/{name}/records/{record['id']}").json()
    assert got["b"] == "value of a" and got["a"] == "value of b"


def test_rename_collection_changing_only_case(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    collection = create(api, su, fields=[{"name": "title", "type": "text"}], viewRule="")
    name = collection["name"]
    record = add_record(api, su, name, {"title": "t"})
    response = patch(api, su, name, {"name": name.upper()})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == name.upper()
    assert get_collection(api, su, collection["id"])["name"] == name.upper()
    assert table_exists(server, name.upper())
    got = api.http.get(f"/api/collections/{name.upper()}/records/{record['id']}")
    assert got.status_code == 200 and got.json()["title"] == "t"


def test_rename_collection_with_unquoted_index(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    old, new = unique("plain"), unique("plainnew")
    create(api, su, old, fields=[{"name": "code", "type": "text"}],
           indexes=[f"CREATE UNIQUE INDEX idx_code_{old} ON {old} (code)"])
    add_record(api, su, old, {"code": "k"})
    response = patch(api, su, old, {"name": new})
    assert response.status_code == 200, response.text
    assert table_exists(server, new) and not table_exists(server, old)
    assert len(response.json()["indexes"]) == 1 and old not in response.json()["indexes"][0].replace(f"idx_code_{old}", "")
    duplicate = api.http.post(f"/api/collections/{new}/records", json={"code": "k"}, headers=su)
    assert duplicate.status_code == 400 and duplicate.json()["data"]["code"]["code"] == "validation_not_unique"


def test_list_collections_filter(api: Api, su: dict[str, str]) -> None:
    response = api.http.get("/api/collections", params={"filter": "type = 'auth' && system = true"}, headers=su)
    assert response.status_code == 200, response.text
    assert [c["name"] for c in response.json()["items"]] == ["_superusers"]
    response = api.http.get("/api/collections", params={"filter": "name ~ 'user'"}, headers=su)
    assert "users" in [c["name"] for c in response.json()["items"]]
    assert all("user" in c["name"] for c in response.json()["items"])
    response = api.http.get("/api/collections", params={"filter": "fields = 'x'"}, headers=su)
    assert response.status_code == 400
    assert "fields" in response.json()["message"]


def test_list_collections_sort(api: Api, su: dict[str, str]) -> None:
    names = [c["name"] for c in api.http.get("/api/collections", params={"sort": "-name", "perPage": 1000}, headers=su).json()["items"]]
    assert names == sorted(names, reverse=True)
    items = api.http.get("/api/collections", params={"sort": "type,name", "perPage": 1000}, headers=su).json()["items"]
    assert [(c["type"], c["name"]) for c in items] == sorted((c["type"], c["name"]) for c in items)
    response = api.http.get("/api/collections", params={"sort": "fields"}, headers=su)
    assert response.status_code == 400 and "fields" in response.json()["message"]
