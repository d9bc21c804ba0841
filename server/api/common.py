"""What every handler shares: the app, the requester, body parsing and JSON answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..app import App
from ..errors import ApiError, BadRequest, Forbidden, Unauthorized
from ..records import IncomingFile, RecordInput, Requester

MAX_FORM_FIELD = 32 << 20
_INLINE_JSON_BYTES = 256 << 10


def get_app(request: Request) -> App:
    return request.app.state.core


def json_response(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def no_content() -> Response:
    return Response(status_code=204)


async def requester(request: Request) -> Requester:
    """Who sent the request, from its ``Authorization`` header; a bad token counts as a guest."""
    cached = getattr(request.state, "requester", None)
    if cached is not None:
        return cached
    token = request.headers.get("authorization", "").strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    who = await get_app(request).records.find_by_token(token, "auth")
    request.state.requester = who
    return who


async def require_auth(request: Request) -> Requester:
    who = await requester(request)
    if who.record is None:
        raise Unauthorized()
    return who


async def require_superuser(request: Request) -> Requester:
    who = await require_auth(request)
    if not who.is_superuser:
        raise Forbidden()
    return who


async def read_json(request: Request, message: str = "An error occurred while loading the submitted data.") -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``; anything else is a 400.

    Its size is bounded by the body limit middleware (``api.limits``)."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
    if not body.strip():
        return {}
    try:
        # Parsing megabytes of JSON takes long enough to stall other requests: do it in a thread.
        data = json.loads(body) if len(body) < _INLINE_JSON_BYTES else await asyncio.to_thread(json.loads, bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(message) from exc
    if not isinstance(data, dict):
        raise BadRequest(message)
    return data


def is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind in ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_body(request: Request) -> dict[str, Any]:
    """A JSON or form body as a plain dict (repeated form keys become lists); files excluded."""
    if not is_form(request):
        return await read_json(request)
    payload = await read_record_input(request)
    return payload.data


async def read_record_input(request: Request) -> RecordInput:
    """A record body: JSON, or multipart/urlencoded with files (spooled to disk by Starlette)."""
    if not is_form(request):
        return RecordInput(await read_json(request, "Failed to load the submitted data due to invalid formatting."))
    try:
        form = await request.form(max_files=1000, max_fields=1000, max_part_size=MAX_FORM_FIELD)
    except ApiError:
        raise
    except Exception as exc:  # malformed multipart
        raise BadRequest("Failed to load the submitted data due to invalid formatting.") from exc
    data: dict[str, Any] = {}
    files: dict[str, list[IncomingFile]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            size = value.size if value.size is not None else _measure(value)
            files.setdefault(key, []).append(IncomingFile(value.filename or "file", size, value.file))
        elif key == "@jsonPayload":
            try:
                extra = json.loads(value)
            except ValueError as exc:
                raise BadRequest("Failed to load the submitted data due to invalid formatting.") from exc
            if isinstance(extra, dict):
                data.update(extra)
        elif key in data:
            previous = data[key]
            data[key] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            data[key] = value
    request.state.form = form  # closed by the middleware once the response is sent
    return RecordInput(data, files, from_form=True)


def _measure(upload: UploadFile) -> int:
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size
