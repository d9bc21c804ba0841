"""Record file downloads (``GET /api/files/...``) and file tokens, through HTTP."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from conftest import Api, ServerProcess, auth, unique

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"IEND-tail-of-the-png"
TEXT = b"plain text notes, line one\nline two\n"
SECRET_PNG = b"\x89PNG\r\n\x1a\n" + b"protected bytes " * 20
USERS_ID = "_pb_users_auth_"
FILE_SALT = "pb-file-token"


@dataclass
class Setup:
    collection: dict[str, Any]  # viewRule "owner = @request.auth.id", protected field "secret"
    public_collection: dict[str, Any]  # viewRule "", protected field "secret"
    record: dict[str, Any]  # owned by owner
    other_record: dict[str, Any]  # another record of the same collection, with its own files
    public_record: dict[str, Any]
    owner: dict[str, Any]
    owner_token: str
    stranger: dict[str, Any]
    stranger_token: str


def _create_collection(api: Api, su: dict[str, str], view_rule: str) -> dict[str, Any]:
    response = api.http.post("/api/collections", headers=su, json={
        "name": unique("files"),
        "type": "base",
        "listRule": view_rule,
        "viewRule": view_rule,
        "fields": [
            {"name": "owner", "type": "text"},
            {"name": "pic", "type": "file", "maxSelect": 1},
            {"name": "notes", "type": "file", "maxSelect": 1},
            {"name": "secret", "type": "file", "maxSelect": 1, "protected": True},
        ],
    })
    assert response.status_code == 200, response.text
    return response.json()


def _create_record(api: Api, su: dict[str, str], collection: dict[str, Any], owner: str) -> dict[str, Any]:
    response = api.http.post(
        f"/api/collections/{collection['name']}/records", headers=su, data={"owner": owner},
        files=[("pic", ("picture.png", PNG, "image/png")),
               ("notes", ("notes.txt", TEXT, "text/plain")),
               ("secret", ("secret.png", SECRET_PNG, "image/png"))],
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["pic"] and record["notes"] and record["secret"], record
    return record


@pytest.fixture(scope="module")
def setup(api: Api, su: dict[str, str]) -> Setup:
    owner, owner_token = api.create_user(unique("owner") + "@example.com")
    stranger, stranger_token = api.create_user(unique("stranger") + "@example.com")
    collection = _create_collection(api, su, "owner = @request.auth.id")
    public_collection = _create_collection(api, su, "")
    return Setup(
        collection=collection,
        public_collection=public_collection,
        record=_create_record(api, su, collection, owner["id"]),
        other_record=_create_record(api, su, collection, owner["id"]),
        public_record=_create_record(api, su, public_collection, owner["id"]),
        owner=owner, owner_token=owner_token, stranger=stranger, stranger_token=stranger_token,
    )


def file_url(collection: dict[str, Any], record: dict[str, Any], name: str, by: str = "id") -> str:
    return f"/api/files/{collection[by]}/{record['id']}/{name}"


def file_token(api: Api, token: str) -> str:
    response = api.http.post("/api/files/token", headers=auth(token))
    assert response.status_code == 200, response.text
    value = response.json()["token"]
    assert isinstance(value, str) and value
    return value


def file_key(server: ServerProcess, collection_name: str, collection_id: str, record_id: str) -> str:
    """The signing key of a record's file tokens: its tokenKey + its collection's fileToken secret."""
    token_key = server.sql(f'SELECT tokenKey FROM "{collection_name}" WHERE id = ?', (record_id,))[0]["tokenKey"]
    options = json.loads(server.sql("SELECT options FROM _collections WHERE id = ?", (collection_id,))[0]["options"])
    return token_key + options["fileToken"]["secret"]


def craft_file_token(key: str, record_id: str, collection_id: str, age: int = 0) -> str:
    """A file token signed as the server signs them, with a timestamp ``age`` seconds in the past."""

    class AgedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - age

    class AgedSerializer(URLSafeTimedSerializer):
        default_signer = AgedSigner

    payload = {"id": record_id, "collectionId": collection_id, "type": "file"}
    return str(AgedSerializer(key, salt=FILE_SALT).dumps(payload))


def raw_get(server: ServerProcess, target: str) -> tuple[int, bytes]:
    """A GET with the request target sent byte for byte (no client-side URL normalisation)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1])
    return status, response


# --- public files --------------------------------------------------------------------------


def test_download_by_collection_id_and_name(api: Api, setup: Setup) -> None:
    for by in ("id", "name"):
        response = api.http.get(file_url(setup.collection, setup.record, setup.record["pic"], by))
        assert response.status_code == 200, response.text
        assert response.content == PNG
        assert response.headers["content-type"].split(";")[0] == "image/png"
        assert response.headers["content-disposition"].startswith("inline")
        assert setup.record["pic"] in response.headers["content-disposition"]


def test_download_headers(api: Api, setup: Setup) -> None:
    response = api.http.get(file_url(setup.collection, setup.record, setup.record["pic"]))
    assert response.status_code == 200
    assert response.headers["accept-ranges"] == "bytes"
    assert "max-age" in response.headers["cache-control"]
    csp = response.headers["content-security-policy"]
    assert "sandbox" in csp and "default-src 'none'" in csp
    assert response.headers["content-length"] == str(len(PNG))


def test_text_file_is_an_attachment(api: Api, setup: Setup) -> None:
    response = api.http.get(file_url(setup.collection, setup.record, setup.record["notes"]))
    assert response.status_code == 200
    assert response.content == TEXT
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["content-disposition"].startswith("attachment")
    assert setup.record["notes"] in response.headers["content-disposition"]


def test_download_query_forces_attachment(api: Api, setup: Setup) -> None:
    response = api.http.get(file_url(setup.collection, setup.record, setup.record["pic"]), params={"download": "1"})
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-disposition"].startswith("attachment")


def test_head(api: Api, setup: Setup) -> None:
    response = api.http.head(file_url(setup.collection, setup.record, setup.record["pic"]))
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(PNG))
    assert response.headers["content-type"].split(";")[0] == "image/png"


def test_range(api: Api, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["pic"])
    response = api.http.get(url, headers={"Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 0-9/{len(PNG)}"
    assert response.content == PNG[:10]
    response = api.http.get(url, headers={"Range": "bytes=20-"})
    assert response.status_code == 206
    assert response.content == PNG[20:]


def test_unsatisfiable_range(api: Api, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["pic"])
    response = api.http.get(url, headers={"Range": f"bytes={len(PNG) + 100}-{len(PNG) + 200}"})
    assert response.status_code == 416
    assert PNG[:8] not in response.content


def test_public_file_ignores_view_rule(api: Api, setup: Setup) -> None:
    # The view rule excludes guests, but pic is not protected: served to anyone.
    assert api.http.get(f"/api/collections/{setup.collection['name']}/records/{setup.record['id']}").status_code == 404
    assert api.http.get(file_url(setup.collection, setup.record, setup.record["pic"])).status_code == 200


# --- not found -----------------------------------------------------------------------------


def test_missing_file_record_and_collection(api: Api, setup: Setup) -> None:
    c, r = setup.collection, setup.record
    for url in (
        f"/api/files/{c['id']}/{r['id']}/missing_abcdefghij.png",
        f"/api/files/{c['id']}/zzzzzzzzzzzzzzz/{r['pic']}",
        f"/api/files/{unique('nope')}/{r['id']}/{r['pic']}",
        f"/api/files/{setup.public_collection['id']}/{r['id']}/{r['pic']}",  # right record id, wrong collection
    ):
        response = api.http.get(url)
        assert response.status_code == 404, url
        body = response.json()
        assert body["status"] == 404 and body["data"] == {}


def test_filename_of_another_record(api: Api, setup: Setup) -> None:
    other = setup.other_record
    assert api.http.get(file_url(setup.collection, other, other["pic"])).status_code == 200
    response = api.http.get(file_url(setup.collection, setup.record, other["pic"]))
    assert response.status_code == 404
    assert PNG not in response.content


@pytest.mark.parametrize("template", [
    "/api/files/{c}/{r}/..%2F..%2F..%2F..%2Fdata.db",
    "/api/files/{c}/{r}/..%2f..%2f..%2f..%2fdata.db",
    "/api/files/{c}/{r}/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fdata.db",
    "/api/files/{c}/{r}/..%5C..%5C..%5C..%5Cdata.db",
    "/api/files/{c}/{r}/{pic}%2F..%2F..%2F..%2F..%2Fdata.db",
    "/api/files/{c}/..%2F..%2F..%2Fdata.db/{pic}",
    "/api/files/{c}/..%2F..%2F../data.db",
    "/api/files/..%2F..%2Fdata.db/{r}/{pic}",
    "/api/files/{c}/{r}/../../../../data.db",
    "/api/files/{c}/{r}/%2Fetc%2Fpasswd",
    "/api/files/{c}/..%2F{r}/{pic}",
])
def test_path_traversal_never_serves_files(server: ServerProcess, setup: Setup, template: str) -> None:
    target = template.format(c=setup.collection["id"], r=setup.record["id"], pic=setup.record["pic"])
    status, response = raw_get(server, target)
    assert status in (400, 404), (target, response[:300])
    assert b"SQLite format 3" not in response
    assert b"root:" not in response


# --- protected files -----------------------------------------------------------------------


def test_protected_file_without_token(api: Api, setup: Setup) -> None:
    for collection, record in ((setup.collection, setup.record), (setup.public_collection, setup.public_record)):
        response = api.http.get(file_url(collection, record, record["secret"]))
        assert response.status_code == 404
        assert SECRET_PNG not in response.content
        assert response.json()["status"] == 404


def test_protected_file_with_auth_token_instead_of_file_token(api: Api, setup: Setup, su: dict[str, str]) -> None:
    url = file_url(setup.collection, setup.record, setup.record["secret"])
    superuser_auth_token = su["Authorization"]
    for token in (setup.owner_token, superuser_auth_token):
        assert api.http.get(url, params={"token": token}).status_code == 404
        # the Authorization header is not a credential for files
        assert api.http.get(url, headers=auth(token)).status_code == 404
    # the same holds where the view rule is public
    public_url = file_url(setup.public_collection, setup.public_record, setup.public_record["secret"])
    assert api.http.get(public_url, params={"token": setup.owner_token}).status_code == 404
    assert api.http.get(public_url, headers=auth(setup.owner_token)).status_code == 404


def test_protected_file_with_superuser_file_token(api: Api, setup: Setup, su: dict[str, str]) -> None:
    token = file_token(api, su["Authorization"])
    response = api.http.get(file_url(setup.collection, setup.record, setup.record["secret"]), params={"token": token})
    assert response.status_code == 200
    assert response.content == SECRET_PNG


def test_protected_file_follows_view_rule(api: Api, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["secret"])
    owner_file_token = file_token(api, setup.owner_token)
    response = api.http.get(url, params={"token": owner_file_token})
    assert response.status_code == 200
    assert response.content == SECRET_PNG
    stranger_file_token = file_token(api, setup.stranger_token)
    response = api.http.get(url, params={"token": stranger_file_token})
    assert response.status_code == 404
    assert SECRET_PNG not in response.content
    # with a public view rule, any valid file token will do
    public_url = file_url(setup.public_collection, setup.public_record, setup.public_record["secret"])
    response = api.http.get(public_url, params={"token": stranger_file_token})
    assert response.status_code == 200
    assert response.content == SECRET_PNG


def test_file_token_needs_auth(api: Api) -> None:
    assert api.http.post("/api/files/token").status_code == 401
    assert api.http.post("/api/files/token", headers=auth("garbage")).status_code == 401


def test_tampered_file_token(api: Api, server: ServerProcess, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["secret"])
    token = file_token(api, setup.owner_token)
    assert api.http.get(url, params={"token": token}).status_code == 200
    payload, timestamp, signature = token.rsplit(".", 2)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    candidates = [
        f"{payload}.{timestamp}.{flipped}",
        f"{payload}.{timestamp}",
        token[:-4],
        "garbage",
    ]
    # the owner's payload re-signed with a wrong key
    candidates.append(craft_file_token("wrong-key", setup.owner["id"], USERS_ID))
    # the stranger's own token with its payload swapped for the owner's
    stranger_token = file_token(api, setup.stranger_token)
    _, s_timestamp, s_signature = stranger_token.rsplit(".", 2)
    candidates.append(f"{payload}.{s_timestamp}.{s_signature}")
    for candidate in candidates:
        response = api.http.get(url, params={"token": candidate})
        assert response.status_code == 404, candidate
        assert SECRET_PNG not in response.content


def test_crafted_file_tokens_fresh_and_expired(api: Api, server: ServerProcess, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["secret"])
    key = file_key(server, "users", USERS_ID, setup.owner["id"])
    fresh = craft_file_token(key, setup.owner["id"], USERS_ID)
    response = api.http.get(url, params={"token": fresh})
    assert response.status_code == 200, "a token crafted like the server's must be accepted"
    assert response.content == SECRET_PNG
    expired = craft_file_token(key, setup.owner["id"], USERS_ID, age=1000)
    response = api.http.get(url, params={"token": expired})
    assert response.status_code == 404
    assert SECRET_PNG not in response.content


def test_file_token_lives_180_seconds(api: Api, server: ServerProcess, setup: Setup) -> None:
    url = file_url(setup.collection, setup.record, setup.record["secret"])
    key = file_key(server, "users", USERS_ID, setup.owner["id"])
    # the issued token is signed with that key and stamped now
    issued = file_token(api, setup.owner_token)
    payload, stamp = URLSafeTimedSerializer(key, salt=FILE_SALT).loads(issued, return_timestamp=True)
    assert payload == {"id": setup.owner["id"], "collectionId": USERS_ID, "type": "file"}
    assert abs(stamp.timestamp() - time.time()) < 30
    # 150 s old: still valid; 210 s old: expired
    assert api.http.get(url, params={"token": craft_file_token(key, setup.owner["id"], USERS_ID, age=150)}).status_code == 200
    assert api.http.get(url, params={"token": craft_file_token(key, setup.owner["id"], USERS_ID, age=210)}).status_code == 404


def test_file_token_of_deleted_user(api: Api, setup: Setup, su: dict[str, str]) -> None:
    user, token = api.create_user(unique("gone") + "@example.com")
    url = file_url(setup.public_collection, setup.public_record, setup.public_record["secret"])
    ftoken = file_token(api, token)
    assert api.http.get(url, params={"token": ftoken}).status_code == 200
    response = api.http.delete(f"/api/collections/users/records/{user['id']}", headers=su)
    assert response.status_code == 204, response.text
    response = api.http.get(url, params={"token": ftoken})
    assert response.status_code == 404
    assert SECRET_PNG not in response.content


def test_file_token_after_password_change(api: Api, setup: Setup, su: dict[str, str]) -> None:
    email = unique("pwchange") + "@example.com"
    user, token = api.create_user(email, "firstpass123")
    url = file_url(setup.public_collection, setup.public_record, setup.public_record["secret"])
    old = file_token(api, token)
    assert api.http.get(url, params={"token": old}).status_code == 200
    response = api.http.patch(f"/api/collections/users/records/{user['id']}", headers=su,
                              json={"password": "secondpass456", "passwordConfirm": "secondpass456"})
    assert response.status_code == 200, response.text
    assert api.http.get(url, params={"token": old}).status_code == 404
    new = file_token(api, api.login("users", email, "secondpass456"))
    response = api.http.get(url, params={"token": new})
    assert response.status_code == 200
    assert response.content == SECRET_PNG
