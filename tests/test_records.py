"""Records API: CRUD (JSON and multipart), value validation, files on disk, listing, access rules.

Every test makes collections of its own (``unique`` names), so the tests share one server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Api, ServerProcess, auth, unique

RECORD_ID_RE = re.compile(r"^[a-z0-9]{15}$")
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}Z$")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(48))
PNG2 = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(48, 96))
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"
ONLY_SUPERUSERS = "Only superusers can perform this action."

POSTS_FIELDS: list[dict[str, Any]] = [
    {"name": "title", "type": "text", "required": True, "max": 100},
    {"name": "views", "type": "number"},
    {"name": "published", "type": "bool"},
    {"name": "contact", "type": "email"},
    {"name": "link", "type": "url"},
    {"name": "when", "type": "date"},
    {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 2},
    {"name": "category", "type": "select", "values": ["x", "y"], "maxSelect": 1},
    {"name": "meta", "type": "json"},
    {"name": "cover", "type": "file", "maxSelect": 1, "maxSize": 1000, "mimeTypes": ["image/png", "text/plain"]},
    {"name": "docs", "type": "file", "maxSelect": 3},
    {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False},
    {"name": "updated", "type": "autodate", "onCreate": True, "onUpdate": True},
]
PUBLIC = {"listRule": "", "viewRule": "", "createRule": "", "updateRule": "", "deleteRule": ""}
LOCKED = dict.fromkeys(PUBLIC)


# --- helpers ------------------------------------------------------------------------------------


def make_collection(api: Api, su: dict[str, str], fields: list[dict[str, Any]] | None = None,
                    rules: dict[str, Any] | None = None, kind: str = "base", prefix: str = "posts") -> dict[str, Any]:
    body = {"name": unique(prefix), "type": kind, "fields": POSTS_FIELDS if fields is None else fields,
            **(PUBLIC if rules is None else rules)}
    response = api.http.post("/api/collections", json=body, headers=su)
    assert response.status_code == 200, response.text
    return response.json()


def url(collection: dict[str, Any] | str, record_id: str | None = None) -> str:
    name = collection if isinstance(collection, str) else collection["name"]
    base = f"/api/collections/{name}/records"
    return base if record_id is None else f"{base}/{record_id}"


def create_record(api: Api, collection: dict[str, Any], headers: dict[str, str] | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    response = api.http.post(url(collection), headers=headers, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def count_rows(server: ServerProcess, collection: dict[str, Any]) -> int:
    return int(server.sql(f'SELECT COUNT(*) AS n FROM "{collection["name"]}"')[0]["n"])


def row(server: ServerProcess, collection: dict[str, Any], record_id: str) -> Any:
    rows = server.sql(f'SELECT * FROM "{collection["name"]}" WHERE id = ?', (record_id,))
    return rows[0] if rows else None


def storage_dir(server: ServerProcess, collection: dict[str, Any], record_id: str | None = None) -> Path:
    root = server.data_dir / "storage" / collection["id"]
    return root if record_id is None else root / record_id


def stored_files(server: ServerProcess, collection: dict[str, Any]) -> list[Path]:
    root = storage_dir(server, collection)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"status", "message", "data"}, body
    assert body["status"] == status
    if message is not None:
        assert body["message"] == message, body
    return body


def assert_record_shape(record: dict[str, Any], collection: dict[str, Any]) -> None:
    assert record["collectionId"] == collection["id"]
    assert record["collectionName"] == collection["name"]
    assert RECORD_ID_RE.match(record["id"]), record["id"]
    assert list(record) == sorted(record), "record keys are alphabetical"


def stored_name_re(base: str, ext: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(base)}_[a-z0-9]{{10}}\.{re.escape(ext)}$")


# --- CRUD with JSON -------------------------------------------------------------------------------


def test_crud_with_json(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    payload = {
        "title": "Hello", "views": 5.0, "published": True, "contact": "someone@example.com",
        "link": "https://example.com/a?b=c", "when": "2024-05-06T07:08:09Z", "tags": ["a", "c"],
        "category": "y", "meta": {"k": [1, 2], "s": "v"}, "unknownKey": "ignored",
    }
    response = api.http.post(url(posts), json=payload)
    assert response.status_code == 200, response.text
    created = response.json()
    assert_record_shape(created, posts)
    assert set(created) == {"collectionId", "collectionName", "id"} | {f["name"] for f in POSTS_FIELDS}
    assert created["title"] == "Hello"
    assert created["views"] == 5 and type(created["views"]) is int
    assert created["published"] is True
    assert created["contact"] == "someone@example.com"
    assert created["link"] == "https://example.com/a?b=c"
    assert created["when"] == "2024-05-06 07:08:09.000Z"
    assert created["tags"] == ["a", "c"] and created["category"] == "y"
    assert created["meta"] == {"k": [1, 2], "s": "v"}
    assert created["cover"] == "" and created["docs"] == []
    assert DATETIME_RE.match(created["created"]) and created["updated"] == created["created"]
    assert count_rows(server, posts) == 1

    viewed = api.http.get(url(posts, created["id"]))
    assert viewed.status_code == 200 and viewed.json() == created

    response = api.http.patch(url(posts, created["id"]), json={"title": "Changed", "views": 2.5, "tags": []})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert_record_shape(updated, posts)
    assert updated["id"] == created["id"]
    assert updated["title"] == "Changed" and updated["views"] == 2.5 and updated["tags"] == []
    for key in ("published", "contact", "link", "when", "category", "meta", "created"):
        assert updated[key] == created[key], key
    assert updated["updated"] >= created["updated"]
    assert api.http.get(url(posts, created["id"])).json() == updated
    assert row(server, posts, created["id"])["title"] == "Changed"

    response = api.http.delete(url(posts, created["id"]))
    assert response.status_code == 204 and response.content == b""
    assert_error(api.http.get(url(posts, created["id"])), 404)
    assert_error(api.http.delete(url(posts, created["id"])), 404)
    assert_error(api.http.patch(url(posts, created["id"]), json={"title": "x"}), 404)
    assert count_rows(server, posts) == 0


@pytest.mark.parametrize(("given", "expected"), [
    ("2024-05-06", "2024-05-06 00:00:00.000Z"),
    ("2024-05-06T07:08:09Z", "2024-05-06 07:08:09.000Z"),
    ("2024-01-02 03:04:05.678Z", "2024-01-02 03:04:05.678Z"),
    ("2024-05-06T07:08:09+02:00", "2024-05-06 05:08:09.000Z"),
    ("", ""),
])
def test_date_values_are_normalized(api: Api, su: dict[str, str], given: str, expected: str) -> None:
    posts = make_collection(api, su)
    response = api.http.post(url(posts), json={"title": "d", "when": given})
    assert response.status_code == 200, response.text
    assert response.json()["when"] == expected


def test_numbers_and_ids(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    for given, expected in ((12, 12), ("12", 12), (-3, -3), (1.5, 1.5), (1e3, 1000), (0, 0)):
        record = create_record(api, posts, json={"title": "n", "views": given})
        assert record["views"] == expected and type(record["views"]) is type(expected), (given, record["views"])
    custom = create_record(api, posts, json={"id": "customid0000001", "title": "c"})
    assert custom["id"] == "customid0000001"
    duplicate = assert_error(api.http.post(url(posts), json={"id": "customid0000001", "title": "c"}), 400)
    assert duplicate["data"]["id"]["code"] == "validation_not_unique"
    short = assert_error(api.http.post(url(posts), json={"id": "abc", "title": "c"}), 400)
    assert short["data"]["id"]["code"] == "validation_min_text_constraint"
    assert count_rows(server, posts) == 7


def test_modifiers_on_update(api: Api, su: dict[str, str]) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, json={"title": "m", "tags": ["a"]})
    response = api.http.patch(url(posts, record["id"]), json={"tags+": "b"})
    assert response.status_code == 200, response.text
    assert response.json()["tags"] == ["a", "b"]
    response = api.http.patch(url(posts, record["id"]), json={"tags-": ["a"]})
    assert response.status_code == 200, response.text
    assert response.json()["tags"] == ["b"]
    failed = assert_error(api.http.patch(url(posts, record["id"]), json={"tags+": ["a", "c"]}), 400,
                          "Failed to update record.")
    assert failed["data"]["tags"]["code"] == "validation_too_many_values"
    assert api.http.get(url(posts, record["id"])).json()["tags"] == ["b"]


# --- multipart ------------------------------------------------------------------------------------


def test_multipart_create(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    response = api.http.post(url(posts), data={
        "title": "multi", "tags": ["a", "b"], "meta": '{"x": 1, "y": [true]}', "views": "7", "published": "true",
        "when": "2024-05-06 01:02:03.000Z",
    }, files={"cover": ("My Photo.png", PNG, "image/png")})
    assert response.status_code == 200, response.text
    record = response.json()
    assert_record_shape(record, posts)
    assert record["title"] == "multi"
    assert record["tags"] == ["a", "b"]
    assert record["meta"] == {"x": 1, "y": [True]}
    assert record["views"] == 7 and record["published"] is True
    assert record["when"] == "2024-05-06 01:02:03.000Z"
    assert stored_name_re("my_photo", "png").match(record["cover"]), record["cover"]
    path = storage_dir(server, posts, record["id"]) / record["cover"]
    assert path.is_file() and path.read_bytes() == PNG
    assert stored_files(server, posts) == [path]
    assert row(server, posts, record["id"])["cover"] == record["cover"]


def test_multipart_json_payload_and_several_files(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    payload = {"title": "from payload", "meta": {"deep": [1, {"a": None}]}, "views": 3, "tags": ["c"]}
    response = api.http.post(url(posts), data={"@jsonPayload": json.dumps(payload)}, files=[
        ("docs", ("report.pdf", PDF, "application/pdf")),
        ("docs", ("notes.txt", b"plain notes", "text/plain")),
        ("cover", ("hello.txt", b"hello text", "text/plain")),
    ])
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["title"] == "from payload" and record["views"] == 3 and record["tags"] == ["c"]
    assert record["meta"] == {"deep": [1, {"a": None}]}
    assert len(record["docs"]) == 2
    assert stored_name_re("report", "pdf").match(record["docs"][0])
    assert stored_name_re("notes", "txt").match(record["docs"][1])
    assert stored_name_re("hello", "txt").match(record["cover"])
    directory = storage_dir(server, posts, record["id"])
    assert (directory / record["docs"][0]).read_bytes() == PDF
    assert (directory / record["docs"][1]).read_bytes() == b"plain notes"
    assert (directory / record["cover"]).read_bytes() == b"hello text"
    assert len(stored_files(server, posts)) == 3


def test_multipart_short_file_name_gets_random_base(api: Api, su: dict[str, str]) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, data={"title": "short"}, files={"cover": ("b.png", PNG, "image/png")})
    assert re.fullmatch(r"[a-z0-9]{3,}_[a-z0-9]{10}\.png", record["cover"]), record["cover"]
    assert not record["cover"].startswith("b_")


# --- validation failures ----------------------------------------------------------------------------

TOO_BIG = b"x" * 1001

JSON_FAILURES = [
    ("missing_required", {"views": 1}, "title", "validation_required"),
    ("empty_required", {"title": ""}, "title", "validation_required"),
    ("null_required", {"title": None}, "title", "validation_required"),
    ("text_too_long", {"title": "x" * 101}, "title", "validation_max_text_constraint"),
    ("text_not_string", {"title": ["a"]}, "title", None),
    ("number_abc", {"title": "t", "views": "abc"}, "views", "validation_invalid_number"),
    ("number_bool", {"title": "t", "views": True}, "views", "validation_invalid_number"),
    ("bool_notbool", {"title": "t", "published": "notbool"}, "published", "validation_invalid_bool"),
    ("bad_email", {"title": "t", "contact": "not-an-email"}, "contact", "validation_is_email"),
    ("bad_url", {"title": "t", "link": "not a url"}, "link", "validation_invalid_url"),
    ("bad_date", {"title": "t", "when": "not a date"}, "when", "validation_invalid_date"),
    ("bad_date_month", {"title": "t", "when": "2024-13-01 00:00:00"}, "when", "validation_invalid_date"),
    ("select_not_allowed", {"title": "t", "tags": ["z"]}, "tags", "validation_invalid_value"),
    ("single_select_not_allowed", {"title": "t", "category": "z"}, "category", "validation_invalid_value"),
    ("too_many_selects", {"title": "t", "tags": ["a", "b", "c"]}, "tags", "validation_too_many_values"),
    ("too_many_single_select", {"title": "t", "category": ["x", "y"]}, "category", "validation_too_many_values"),
]


@pytest.mark.parametrize(("case", "body", "field", "code"), JSON_FAILURES, ids=[c[0] for c in JSON_FAILURES])
def test_json_create_validation_failures(api: Api, su: dict[str, str], server: ServerProcess, case: str,
                                         body: dict[str, Any], field: str, code: str | None) -> None:
    posts = make_collection(api, su)
    error = assert_error(api.http.post(url(posts), json=body), 400, "Failed to create record.")
    assert field in error["data"], error
    assert set(error["data"][field]) >= {"code", "message"}
    if code is not None:
        assert error["data"][field]["code"] == code, error
    assert count_rows(server, posts) == 0
    # a superuser is validated the same way
    error = assert_error(api.http.post(url(posts), json=body, headers=su), 400, "Failed to create record.")
    assert field in error["data"]
    assert count_rows(server, posts) == 0


MULTIPART_FAILURES = [
    ("file_too_large", {"title": "t"}, [("cover", ("big.txt", TOO_BIG, "text/plain"))],
     "cover", "validation_file_size_limit"),
    ("wrong_mime_by_content", {"title": "t"}, [("cover", ("x.png", PDF, "image/png"))],
     "cover", "validation_invalid_mime_type"),
    ("two_files_for_max_select_1", {"title": "t"},
     [("cover", ("a.png", PNG, "image/png")), ("cover", ("b.png", PNG2, "image/png"))],
     "cover", "validation_max_select_constraint"),
    ("four_files_for_max_select_3", {"title": "t"},
     [("docs", (f"d{i}.txt", b"doc %d" % i, "text/plain")) for i in range(4)],
     "docs", "validation_max_select_constraint"),
    ("valid_file_missing_title", {"views": "1"}, [("cover", ("ok.png", PNG, "image/png"))],
     "title", "validation_required"),
    ("valid_file_bad_number", {"title": "t", "views": "abc"}, [("docs", ("ok.txt", b"ok", "text/plain"))],
     "views", "validation_invalid_number"),
    ("valid_file_bad_bool", {"title": "t", "published": "notbool"}, [("cover", ("ok.png", PNG, "image/png"))],
     "published", "validation_invalid_bool"),
    ("valid_file_bad_date", {"title": "t", "when": "yesterday"}, [("cover", ("ok.png", PNG, "image/png"))],
     "when", "validation_invalid_date"),
]


@pytest.mark.parametrize(("case", "data", "files", "field", "code"), MULTIPART_FAILURES,
                         ids=[c[0] for c in MULTIPART_FAILURES])
def test_multipart_create_validation_failures(api: Api, su: dict[str, str], server: ServerProcess, case: str,
                                              data: dict[str, Any], files: list[Any], field: str, code: str) -> None:
    posts = make_collection(api, su)
    error = assert_error(api.http.post(url(posts), data=data, files=files), 400, "Failed to create record.")
    assert error["data"][field]["code"] == code, error
    assert count_rows(server, posts) == 0
    assert stored_files(server, posts) == []
    # no absolute path leaks into the message
    assert str(server.data_dir) not in json.dumps(error)


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b'"string"', b'{"title": "x",}'])
def test_create_with_bad_json_body(api: Api, su: dict[str, str], server: ServerProcess, raw: bytes) -> None:
    posts = make_collection(api, su)
    response = api.http.post(url(posts), content=raw, headers={"Content-Type": "application/json"})
    error = assert_error(response, 400)
    assert error["data"] == {}
    assert count_rows(server, posts) == 0


def test_unknown_collection(api: Api, su: dict[str, str]) -> None:
    name = unique("nope")
    for headers in (None, su):
        error = assert_error(api.http.post(url(name), json={"title": "x"}, headers=headers), 404,
                             "Missing or invalid collection context.")
        assert error["data"] == {}
        assert_error(api.http.post(url(name), data={"title": "x"}, files={"f": ("a.txt", b"a")}, headers=headers),
                     404, "Missing or invalid collection context.")
        assert_error(api.http.patch(url(name, "abcdefghijklmno"), json={}, headers=headers), 404)
        assert_error(api.http.get(url(name), headers=headers), 404)
        assert_error(api.http.get(url(name, "abcdefghijklmno"), headers=headers), 404)
        assert_error(api.http.delete(url(name, "abcdefghijklmno"), headers=headers), 404)


def test_failed_update_changes_nothing(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, data={"title": "orig", "views": "4"},
                           files={"cover": ("keep.png", PNG, "image/png")})
    before = stored_files(server, posts)
    response = api.http.patch(url(posts, record["id"]), data={"title": "", "views": "9"},
                              files={"cover": ("new.png", PNG2, "image/png")})
    error = assert_error(response, 400, "Failed to update record.")
    assert error["data"]["title"]["code"] == "validation_required"
    assert api.http.get(url(posts, record["id"])).json() == record
    assert stored_files(server, posts) == before


# --- files on update and delete ---------------------------------------------------------------------


def test_replacing_single_file_removes_old_one(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, data={"title": "f"}, files={"cover": ("first.png", PNG, "image/png")})
    directory = storage_dir(server, posts, record["id"])
    old = directory / record["cover"]
    assert old.is_file()
    response = api.http.patch(url(posts, record["id"]), files={"cover": ("second.png", PNG2, "image/png")})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert stored_name_re("second", "png").match(updated["cover"])
    assert not old.exists()
    assert (directory / updated["cover"]).read_bytes() == PNG2
    assert stored_files(server, posts) == [directory / updated["cover"]]


def test_file_removal_with_minus_modifier(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, data={"title": "f"}, files=[
        ("cover", ("c.txt", b"cover", "text/plain")),
        ("docs", ("one.txt", b"one", "text/plain")), ("docs", ("two.txt", b"two", "text/plain")),
    ])
    directory = storage_dir(server, posts, record["id"])
    response = api.http.patch(url(posts, record["id"]), json={"cover-": [record["cover"]], "docs-": record["docs"][0]})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["cover"] == ""
    assert updated["docs"] == [record["docs"][1]]
    assert not (directory / record["cover"]).exists()
    assert not (directory / record["docs"][0]).exists()
    assert (directory / record["docs"][1]).read_bytes() == b"two"
    assert row(server, posts, record["id"])["cover"] == ""
    # docs+ appends to what is kept
    response = api.http.patch(url(posts, record["id"]), files={"docs+": ("three.txt", b"three", "text/plain")})
    assert response.status_code == 200, response.text
    docs = response.json()["docs"]
    assert docs[0] == record["docs"][1] and len(docs) == 2 and stored_name_re("three", "txt").match(docs[1])
    assert sorted(p.name for p in stored_files(server, posts)) == sorted(docs)


def test_setting_file_field_to_empty_removes_file(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    record = create_record(api, posts, data={"title": "f"}, files=[
        ("cover", ("c.png", PNG, "image/png")), ("docs", ("one.txt", b"one", "text/plain"))])
    directory = storage_dir(server, posts, record["id"])
    response = api.http.patch(url(posts, record["id"]), json={"cover": ""})
    assert response.status_code == 200, response.text
    assert response.json()["cover"] == ""
    assert not (directory / record["cover"]).exists()
    response = api.http.patch(url(posts, record["id"]), data={"docs": ""})
    assert response.status_code == 200, response.text
    assert response.json()["docs"] == []
    assert stored_files(server, posts) == []
    # naming a file the record does not have is refused
    error = assert_error(api.http.patch(url(posts, record["id"]), json={"docs": ["ghost.txt"]}), 400)
    assert "docs" in error["data"]


def test_deleting_record_removes_its_files(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    keep = create_record(api, posts, data={"title": "keep"}, files={"cover": ("k.png", PNG, "image/png")})
    gone = create_record(api, posts, data={"title": "gone"}, files=[
        ("cover", ("g.png", PNG, "image/png")), ("docs", ("d.txt", b"d", "text/plain"))])
    assert storage_dir(server, posts, gone["id"]).is_dir()
    assert api.http.delete(url(posts, gone["id"])).status_code == 204
    assert not storage_dir(server, posts, gone["id"]).exists()
    assert stored_files(server, posts) == [storage_dir(server, posts, keep["id"]) / keep["cover"]]


def test_unique_violation_with_file_leaves_no_file(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su)
    index = f"CREATE UNIQUE INDEX `idx_title_{posts['id']}` ON `{posts['name']}` (`title`)"
    assert api.http.patch(f"/api/collections/{posts['name']}", json={"indexes": [index]}, headers=su).status_code == 200
    first = create_record(api, posts, data={"title": "same"}, files={"cover": ("a.png", PNG, "image/png")})
    error = assert_error(api.http.post(url(posts), data={"title": "same"}, files={"cover": ("b.png", PNG2, "image/png")}),
                         400, "Failed to create record.")
    assert error["data"]["title"]["code"] == "validation_not_unique"
    assert count_rows(server, posts) == 1
    assert stored_files(server, posts) == [storage_dir(server, posts, first["id"]) / first["cover"]]


# --- list ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seven(api: Api, su: dict[str, str]) -> dict[str, Any]:
    """A public collection with 7 records t1..t7 (views 1..7, odd ones published, t7 without date)."""
    posts = make_collection(api, su)
    for i in range(1, 8):
        data: dict[str, Any] = {"title": f"t{i}", "views": i, "published": i % 2 == 1,
                                "tags": ["a"] if i <= 3 else ["b", "c"]}
        if i != 7:
            data["when"] = f"2024-01-0{i} 10:00:00.000Z"
        create_record(api, posts, json=data)
    return posts


def titles(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["title"] for item in response.json()["items"]]


def test_list_pagination(api: Api, seven: dict[str, Any]) -> None:
    response = api.http.get(url(seven), params={"perPage": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["items", "page", "perPage", "totalItems", "totalPages"]
    assert (body["page"], body["perPage"], body["totalItems"], body["totalPages"]) == (1, 3, 7, 3)
    assert [i["title"] for i in body["items"]] == ["t1", "t2", "t3"]
    for item in body["items"]:
        assert list(item) == sorted(item)
        assert item["collectionName"] == seven["name"]
    assert titles(api.http.get(url(seven), params={"perPage": 3, "page": 2})) == ["t4", "t5", "t6"]
    body = api.http.get(url(seven), params={"perPage": 3, "page": 3}).json()
    assert [i["title"] for i in body["items"]] == ["t7"] and body["page"] == 3
    body = api.http.get(url(seven), params={"perPage": 3, "page": 9}).json()
    assert body["items"] == [] and body["page"] == 9 and body["totalItems"] == 7

    default = api.http.get(url(seven)).json()
    assert (default["page"], default["perPage"], default["totalItems"], default["totalPages"]) == (1, 30, 7, 1)


def test_list_per_page_bounds(api: Api, seven: dict[str, Any]) -> None:
    body = api.http.get(url(seven), params={"perPage": 5000}).json()
    assert body["perPage"] == 1000 and len(body["items"]) == 7
    body = api.http.get(url(seven), params={"perPage": 0}).json()
    assert body["perPage"] == 30 and len(body["items"]) == 7
    body = api.http.get(url(seven), params={"perPage": -5, "page": -1}).json()
    assert body["perPage"] == 30 and body["page"] == 1
    for params in ({"page": "abc"}, {"perPage": "abc"}, {"page": "1.5"}):
        assert_error(api.http.get(url(seven), params=params), 400)


def test_list_skip_total(api: Api, seven: dict[str, Any]) -> None:
    for value in ("1", "true"):
        body = api.http.get(url(seven), params={"skipTotal": value, "perPage": 2}).json()
        assert body["totalItems"] == -1 and body["totalPages"] == -1
        assert [i["title"] for i in body["items"]] == ["t1", "t2"]


def test_list_sort(api: Api, su: dict[str, str], seven: dict[str, Any]) -> None:
    assert titles(api.http.get(url(seven), params={"sort": "-title,id"})) == [f"t{i}" for i in range(7, 0, -1)]
    assert titles(api.http.get(url(seven), params={"sort": "title"})) == [f"t{i}" for i in range(1, 8)]
    by_published = titles(api.http.get(url(seven), params={"sort": "-published,-views"}))
    assert by_published == ["t7", "t5", "t3", "t1", "t6", "t4", "t2"]
    assert sorted(titles(api.http.get(url(seven), params={"sort": "@random"}))) == [f"t{i}" for i in range(1, 8)]
    for bad in ("nofield", "-nofield", "title,nofield", "title desc", "-created,(title)"):
        assert_error(api.http.get(url(seven), params={"sort": bad}), 400)
    # a hidden field cannot be sorted on
    assert_error(api.http.get(url("users"), params={"sort": "password"}, headers=su), 400)
    assert_error(api.http.get(url("users"), params={"sort": "tokenKey"}, headers=su), 400)


@pytest.mark.parametrize(("expression", "expected"), [
    ("title = 't3'", ["t3"]),
    ('title = "t3"', ["t3"]),
    ("title != 't3'", ["t1", "t2", "t4", "t5", "t6", "t7"]),
    ("views > 2 && published = true", ["t3", "t5", "t7"]),
    ("title = 't1' || title = 't6'", ["t1", "t6"]),
    ("(title = 't1' || title = 't2') && views >= 2", ["t2"]),
    ("title ~ 't'", ["t1", "t2", "t3", "t4", "t5", "t6", "t7"]),
    ("title ~ '5'", ["t5"]),
    ("title !~ '5'", ["t1", "t2", "t3", "t4", "t6", "t7"]),
    ("views >= 6.5", ["t7"]),
    ("views < 2", ["t1"]),
    ("views <= 2", ["t1", "t2"]),
    ("published = false", ["t2", "t4", "t6"]),
    ("published != true", ["t2", "t4", "t6"]),
    ("when = null", ["t7"]),
    ("when != null", ["t1", "t2", "t3", "t4", "t5", "t6"]),
    ("when > '2024-01-04 00:00:00.000Z'", ["t4", "t5", "t6"]),
    ("tags ~ 'c'", ["t4", "t5", "t6", "t7"]),
    ("title = 'nothing'", []),
])
def test_list_filter(api: Api, seven: dict[str, Any], expression: str, expected: list[str]) -> None:
    response = api.http.get(url(seven), params={"filter": expression})
    assert titles(response) == expected, expression
    assert response.json()["totalItems"] == len(expected)


@pytest.mark.parametrize(("expression", "mentioned"), [
    ("nofield = 1", "nofield"),
    ("(title = 't1'", ("parenthesis", "end", ")")),
    ("title = ", "end"),
    ("title ?= 't1'", "?="),
    ("@collection.x.y = 1", "@collection"),
    ("title = 't1' ||", "end"),
    ("title", "end"),
])
def test_list_invalid_filter(api: Api, seven: dict[str, Any], expression: str, mentioned: str | tuple[str, ...]) -> None:
    error = assert_error(api.http.get(url(seven), params={"filter": expression}), 400)
    options = (mentioned,) if isinstance(mentioned, str) else mentioned
    assert any(o.lower() in error["message"].lower() for o in options), error["message"]
    assert error["data"] == {}


def test_filter_on_hidden_field_refused(api: Api, su: dict[str, str]) -> None:
    for expression in ("password != ''", "tokenKey != ''"):
        error = assert_error(api.http.get(url("users"), params={"filter": expression}, headers=su), 400)
        assert expression.split()[0] in error["message"]


def test_list_fields_projection(api: Api, seven: dict[str, Any]) -> None:
    response = api.http.get(url(seven), params={"fields": "id,title", "perPage": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totalItems"] == 7
    assert [set(item) for item in body["items"]] == [{"id", "title"}, {"id", "title"}]
    assert [item["title"] for item in body["items"]] == ["t1", "t2"]
    everything = api.http.get(url(seven), params={"fields": "*", "perPage": 1}).json()["items"][0]
    assert "views" in everything and "collectionId" in everything


# --- access rules -----------------------------------------------------------------------------------


def test_null_rules_only_superusers(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    locked = make_collection(api, su, rules=LOCKED)
    record = create_record(api, locked, headers=su, json={"title": "secret"})
    _, user_token = api.create_user(unique("u") + "@example.com")
    for who in (None, auth(user_token), auth("garbage-token")):
        calls = [
            api.http.get(url(locked), headers=who),
            api.http.post(url(locked), json={"title": "x"}, headers=who),
            api.http.get(url(locked, record["id"]), headers=who),
            api.http.get(url(locked, "missingrecord00"), headers=who),
            api.http.patch(url(locked, record["id"]), json={"title": "hacked"}, headers=who),
            api.http.delete(url(locked, record["id"]), headers=who),
        ]
        for response in calls:
            assert_error(response, 403, ONLY_SUPERUSERS)
    assert count_rows(server, locked) == 1
    assert row(server, locked, record["id"])["title"] == "secret"

    listed = api.http.get(url(locked), headers=su)
    assert listed.status_code == 200 and [i["id"] for i in listed.json()["items"]] == [record["id"]]
    assert api.http.get(url(locked, record["id"]), headers=su).status_code == 200
    response = api.http.patch(url(locked, record["id"]), json={"title": "by su"}, headers=su)
    assert response.status_code == 200 and response.json()["title"] == "by su"
    assert api.http.post(url(locked), json={"title": "x"}, headers=su).status_code == 200
    assert api.http.delete(url(locked, record["id"]), headers=su).status_code == 204
    assert count_rows(server, locked) == 1


def test_empty_rules_let_guests_do_everything(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su, rules=PUBLIC)
    record = create_record(api, posts, json={"title": "guest"})
    assert api.http.get(url(posts)).json()["totalItems"] == 1
    assert api.http.get(url(posts, record["id"])).json()["title"] == "guest"
    response = api.http.patch(url(posts, record["id"]), json={"title": "guest2"})
    assert response.status_code == 200 and response.json()["title"] == "guest2"
    assert api.http.delete(url(posts, record["id"])).status_code == 204
    assert count_rows(server, posts) == 0
    # an invalid token on a public route counts as a guest
    assert api.http.get(url(posts), headers=auth("not-a-token")).status_code == 200


def test_owner_rule_on_users(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    alice_email = unique("alice") + "@example.com"
    alice, alice_token = api.create_user(alice_email)
    bob, bob_token = api.create_user(unique("bob") + "@example.com")
    listed = api.http.get(url("users"), headers=auth(alice_token))
    assert listed.status_code == 200
    assert [u["id"] for u in listed.json()["items"]] == [alice["id"]]
    assert listed.json()["totalItems"] == 1
    own = api.http.get(url("users", alice["id"]), headers=auth(alice_token)).json()
    assert own["email"] == alice_email
    assert "password" not in own and "tokenKey" not in own

    assert_error(api.http.get(url("users", bob["id"]), headers=auth(alice_token)), 404)
    assert_error(api.http.patch(url("users", bob["id"]), json={"name": "pwned"}, headers=auth(alice_token)), 404)
    assert_error(api.http.delete(url("users", bob["id"]), headers=auth(alice_token)), 404)
    assert server.sql("SELECT name FROM users WHERE id = ?", (bob["id"],))[0]["name"] == ""

    response = api.http.patch(url("users", alice["id"]), json={"name": "Alice"}, headers=auth(alice_token))
    assert response.status_code == 200 and response.json()["name"] == "Alice"

    guest = api.http.get(url("users"))
    assert guest.status_code == 200 and guest.json()["items"] == [] and guest.json()["totalItems"] == 0
    assert_error(api.http.get(url("users", alice["id"])), 404)
    everyone = api.http.get(url("users"), headers=su, params={"perPage": 1000}).json()
    assert {alice["id"], bob["id"]} <= {u["id"] for u in everyone["items"]}
    assert all("password" not in u and "tokenKey" not in u for u in everyone["items"])
    # bob can still delete himself
    assert api.http.delete(url("users", bob["id"]), headers=auth(bob_token)).status_code == 204
    assert server.sql("SELECT 1 FROM users WHERE id = ?", (bob["id"],)) == []


def test_list_rule_expression_filters_for_guests(api: Api, su: dict[str, str]) -> None:
    posts = make_collection(api, su, rules={**PUBLIC, "listRule": "published = true",
                                             "viewRule": "published = true"})
    shown = create_record(api, posts, json={"title": "shown", "published": True})
    hidden = create_record(api, posts, json={"title": "hidden", "published": False})
    body = api.http.get(url(posts)).json()
    assert [i["title"] for i in body["items"]] == ["shown"] and body["totalItems"] == 1
    # the rule and a filter combine
    assert titles(api.http.get(url(posts), params={"filter": "title = 'hidden'"})) == []
    assert titles(api.http.get(url(posts), params={"filter": "title ~ 'o'"})) == ["shown"]
    assert api.http.get(url(posts, shown["id"])).status_code == 200
    assert_error(api.http.get(url(posts, hidden["id"])), 404)
    assert titles(api.http.get(url(posts), headers=su)) == ["shown", "hidden"]


def test_create_rule_requires_auth(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su, rules={**PUBLIC, "createRule": "@request.auth.id != ''"})
    error = assert_error(api.http.post(url(posts), json={"title": "guest"}), 400, "Failed to create record.")
    assert error["data"] == {}
    assert_error(api.http.post(url(posts), data={"title": "guest"}, files={"cover": ("g.png", PNG, "image/png")}),
                 400, "Failed to create record.")
    assert count_rows(server, posts) == 0
    assert stored_files(server, posts) == []
    _, token = api.create_user(unique("creator") + "@example.com")
    record = create_record(api, posts, headers=auth(token), json={"title": "member"})
    assert record["title"] == "member"
    assert count_rows(server, posts) == 1


def test_create_rule_on_submitted_values(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su, rules={**PUBLIC, "createRule": "views > 10"})
    assert_error(api.http.post(url(posts), json={"title": "low", "views": 3}), 400)
    assert count_rows(server, posts) == 0
    assert create_record(api, posts, json={"title": "high", "views": 11})["views"] == 11


def test_update_and_delete_rules_with_expressions(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    posts = make_collection(api, su, rules={**PUBLIC, "updateRule": "published = false", "deleteRule": "views > 5"})
    open_record = create_record(api, posts, json={"title": "open", "published": False, "views": 9})
    closed = create_record(api, posts, json={"title": "closed", "published": True, "views": 1})
    assert_error(api.http.patch(url(posts, closed["id"]), json={"title": "x"}), 404)
    assert row(server, posts, closed["id"])["title"] == "closed"
    assert api.http.patch(url(posts, open_record["id"]), json={"title": "y"}).status_code == 200
    assert_error(api.http.delete(url(posts, closed["id"])), 404)
    assert api.http.delete(url(posts, open_record["id"])).status_code == 204
    assert count_rows(server, posts) == 1


def test_verified_cannot_be_set_by_non_superuser(api: Api, su: dict[str, str], server: ServerProcess) -> None:
    email = unique("ver") + "@example.com"
    response = api.http.post(url("users"), json={"email": email, "password": "userpass123",
                                                  "passwordConfirm": "userpass123", "verified": True})
    error = assert_error(response, 400, "Failed to create record.")
    assert "verified" in error["data"]
    assert server.sql("SELECT 1 FROM users WHERE email = ?", (email,)) == []

    user, token = api.create_user(email)
    assert user["verified"] is False
    error = assert_error(api.http.patch(url("users", user["id"]), json={"verified": True}, headers=auth(token)), 400)
    assert "verified" in error["data"]
    assert server.sql("SELECT verified FROM users WHERE id = ?", (user["id"],))[0]["verified"] == 0

    response = api.http.patch(url("users", user["id"]), json={"verified": True}, headers=su)
    assert response.status_code == 200 and response.json()["verified"] is True
    assert server.sql("SELECT verified FROM users WHERE id = ?", (user["id"],))[0]["verified"] == 1


def test_email_visibility(api: Api, su: dict[str, str]) -> None:
    members = make_collection(api, su, fields=[{"name": "nick", "type": "text"}], kind="auth", prefix="members",
                              rules={**PUBLIC, "updateRule": None, "deleteRule": None})
    hidden_email = unique("hid") + "@example.com"
    shown_email = unique("shown") + "@example.com"
    password = {"password": "memberpass1", "passwordConfirm": "memberpass1"}

    hidden = create_record(api, members, json={"email": hidden_email, "nick": "h", **password})
    assert "email" not in hidden, "a guest does not see a hidden email, even in its create response"
    assert "password" not in hidden and "tokenKey" not in hidden
    shown = create_record(api, members, json={"email": shown_email, "emailVisibility": True, "nick": "s", **password})
    assert shown["email"] == shown_email

    items = {i["id"]: i for i in api.http.get(url(members)).json()["items"]}
    assert "email" not in items[hidden["id"]] and items[shown["id"]]["email"] == shown_email
    assert "email" not in api.http.get(url(members, hidden["id"])).json()

    hidden_token = api.login(members["name"], hidden_email, "memberpass1")
    shown_token = api.login(members["name"], shown_email, "memberpass1")
    assert api.http.get(url(members, hidden["id"]), headers=auth(hidden_token)).json()["email"] == hidden_email
    assert api.http.get(url(members, shown["id"]), headers=auth(hidden_token)).json()["email"] == shown_email
    assert "email" not in api.http.get(url(members, hidden["id"]), headers=auth(shown_token)).json()
    listed = {i["id"]: i for i in api.http.get(url(members), headers=auth(shown_token)).json()["items"]}
    assert "email" not in listed[hidden["id"]]

    for item in api.http.get(url(members), headers=su).json()["items"]:
        assert "email" in item
    # a filter on the email works for the superuser
    found = api.http.get(url(members), params={"filter": f"email = '{hidden_email}'"}, headers=su).json()
    assert [i["id"] for i in found["items"]] == [hidden["id"]]


def test_view_fields_projection(api: Api, seven: dict[str, Any]) -> None:
    first = api.http.get(url(seven), params={"perPage": 1}).json()["items"][0]
    response = api.http.get(url(seven, first["id"]), params={"fields": "id,title"})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": first["id"], "title": first["title"]}


@pytest.mark.parametrize("params", [
    {"page": "99999999999999999999"},
    {"page": "9223372036854775808"},
    {"perPage": "99999999999999999999", "page": "99999999999999999999"},
])
def test_list_out_of_range_page_is_400(api: Api, seven: dict[str, Any], params: dict[str, str]) -> None:
    assert_error(api.http.get(url(seven), params=params), 400)


@pytest.mark.parametrize(("expression", "expected"), [
    ("views = 99999999999999999999999", []),
    ("views > -99999999999999999999999", [f"t{i}" for i in range(1, 8)]),
    ("title = 1e5", None),
    ("views = 1.5.5", None),
])
def test_list_filter_odd_numbers_never_500(api: Api, seven: dict[str, Any], expression: str,
                                           expected: list[str] | None) -> None:
    """Out-of-range number literals are compared as floats; malformed ones are a 400."""
    response = api.http.get(url(seven), params={"filter": expression})
    if expected is None:
        assert_error(response, 400)
    else:
        assert titles(response) == expected
