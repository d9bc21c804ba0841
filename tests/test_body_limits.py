"""Request bodies are bounded: 32 MB by default, more for record routes by their file fields."""

from __future__ import annotations

from pathlib import Path

from conftest import Api, unique


def test_oversized_json_body_is_refused_with_413(api: Api, su: dict[str, str]) -> None:
    before = api.http.get("/api/settings", headers=su).json()
    body = b'{"meta": {"appName": "' + b"x" * (33 << 20) + b'"}}'
    response = api.http.patch("/api/settings", headers={**su, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 413
    assert response.json() == {"status": 413, "message": "The request body is too large.", "data": {}}
    assert api.http.get("/api/settings", headers=su).json() == before


def test_oversized_chunked_body_without_length_is_refused(api: Api, su: dict[str, str]) -> None:
    def chunks():
        piece = b"x" * (1 << 20)
        yield b'{"meta": {"appName": "'
        for _ in range(34):
            yield piece
        yield b'"}}'

    before = api.http.get("/api/settings", headers=su).json()
    response = api.http.patch("/api/settings", headers={**su, "Content-Type": "application/json"}, content=chunks())
    assert response.status_code == 413
    assert api.http.get("/api/settings", headers=su).json() == before


def test_record_upload_over_the_collections_file_allowance_is_refused(api: Api, su: dict[str, str]) -> None:
    name = unique("lim")
    created = api.http.post("/api/collections", headers=su, json={
        "name": name, "createRule": "", "listRule": "",
        "fields": [{"name": "doc", "type": "file", "maxSelect": 1, "maxSize": 1000}],
    })
    assert created.status_code == 200, created.text
    collection_id = created.json()["id"]
    # The allowance is 32 MB plus the field's 1000 bytes: a 40 MB upload never reaches the disk.
    response = api.http.post(f"/api/collections/{name}/records",
                             files={"doc": ("big.txt", b"a" * (40 << 20), "text/plain")})
    assert response.status_code == 413
    assert api.http.get(f"/api/collections/{name}/records").json()["totalItems"] == 0
    storage: Path = api.server.data_dir / "storage" / collection_id
    assert not storage.exists() or not any(storage.rglob("*"))
    # A file within the allowance but over the field's maxSize is a validation error instead.
    response = api.http.post(f"/api/collections/{name}/records",
                             files={"doc": ("small.txt", b"a" * 2000, "text/plain")})
    assert response.status_code == 400
    assert response.json()["data"]["doc"]["code"] == "validation_file_size_limit"


def test_a_large_file_within_the_field_limit_is_accepted(api: Api, su: dict[str, str]) -> None:
    name = unique("big")
    assert api.http.post("/api/collections", headers=su, json={
        "name": name, "createRule": "", "viewRule": "",
        "fields": [{"name": "doc", "type": "file", "maxSelect": 1, "maxSize": 40 << 20}],
    }).status_code == 200
    payload = bytes(range(256)) * ((36 << 20) // 256)
    response = api.http.post(f"/api/collections/{name}/records", files={"doc": ("blob.bin", payload, "application/octet-stream")})
    assert response.status_code == 200, response.text
    record = response.json()
    download = api.http.get(f"/api/files/{name}/{record['id']}/{record['doc']}")
    assert download.status_code == 200 and download.content == payload
