"""File downloads of records, and file tokens."""

from __future__ import annotations

import asyncio
import os

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from .. import auth as tokens
from ..errors import NotFound
from ..values import decode
from ..tools import mimetypes
from .common import get_app, json_response, require_auth

_INLINE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp",
                 "video/mp4", "audio/mpeg", "application/pdf", "application/ogg")
# Served files (record files and backups): cached, and never run as a page in the API's origin.
FILE_HEADERS = {
    "cache-control": "max-age=2592000, stale-while-revalidate=86400",
    "content-security-policy": "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; sandbox",
    "x-content-type-options": "nosniff",
}


async def file_token(request: Request) -> Response:
    who = await require_auth(request)
    assert who.collection is not None and who.record is not None
    token = tokens.issue_file_token(who.collection, who.record["id"], who.record["tokenKey"])
    return json_response({"token": token})


async def download(request: Request) -> Response:
    app = get_app(request)
    collection = app.collections.find(request.path_params["collection"])
    if collection is None:
        raise NotFound("Missing or invalid collection context.")
    record_id = request.path_params["record"]
    filename = request.path_params["filename"]
    row = await app.records.find_row(collection, record_id)
    if row is None:
        raise NotFound()
    owner = None
    for field in collection.file_fields():
        value = decode(field, row[field["name"]])
        names = value if isinstance(value, list) else [value]
        if filename in names:
            owner = field
            break
    if owner is None:
        raise NotFound()
    if owner.get("protected"):
        # ours: a protected file always needs a valid file token (PocketBase serves it to anyone
        # when the view rule is ""), and the token's record must pass the view rule.
        who = await app.records.find_by_token(request.query_params.get("token", ""), "file")
        if who.record is None or not await app.records.can_access(collection, record_id, who, "viewRule"):
            raise NotFound()
    path = app.datadir.record_dir(collection.id, record_id) / filename
    head = await asyncio.to_thread(_read_head, path)
    if head is None:
        raise NotFound()
    media_type = mimetypes.detect(head)
    base_type = media_type.split(";", 1)[0]
    inline = base_type in _INLINE_TYPES and request.query_params.get("download", "") in ("", "0", "false")
    disposition = "inline" if inline else "attachment"
    headers = dict(FILE_HEADERS)
    return FileResponse(path, media_type=media_type, headers=headers, filename=filename,
                        content_disposition_type=disposition)


def _read_head(path: os.PathLike[str]) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(mimetypes.SNIFF_LENGTH)
    except (FileNotFoundError, IsADirectoryError):
        return None

