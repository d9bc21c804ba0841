"""``/api/backups``: list, create, upload, download, delete, restore, and status (ours)."""

from __future__ import annotations

import re
from typing import Any
from email.utils import format_datetime as http_date

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..backups.notify import DeliveryError
from ..backups.partial import parse_body as parse_restore_body
from ..records import Requester
from ..errors import BadRequest, Forbidden, NotFound, ValidationError, field_error
from ..tools.multipart import MultipartError, file_part
from ..tools.times import format_datetime, parse_datetime
from .files import FILE_HEADERS
from .common import get_app, json_response, no_content, read_json, require_superuser
from .limits import BODY_LIMIT_KEY

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _maker(who: Requester) -> dict[str, Any]:
    record = who.record or {}
    return {"kind": "superuser", "id": record.get("id", ""), "email": record.get("email", "")}


async def list_backups(request: Request) -> Response:
    await require_superuser(request)
    files, pinned = await get_app(request).backups.list_with_pins()
    # The SDK's shape; ours: "pinned" (from one read of the catalog) where the catalog could be read.
    return json_response([{"key": f.key, "size": f.size, "modified": format_datetime(f.modified),
                           **({"pinned": f.key in pinned} if pinned is not None else {})} for f in files])


async def status(request: Request) -> Response:
    await require_superuser(request)
    return json_response(await get_app(request).backups.status())


async def info(request: Request) -> Response:
    await require_superuser(request)
    return json_response(await get_app(request).backups.info(request.path_params["key"]))


async def pin(request: Request) -> Response:
    await require_superuser(request)
    await get_app(request).backups.set_pinned(request.path_params["key"], request.method == "POST")
    return no_content()


async def prune(request: Request) -> Response:
    await require_superuser(request)
    body = await read_json(request)
    errors: dict[str, Any] = {}
    keep = body.get("keep")
    if keep is None:
        errors["keep"] = field_error("validation_required", "Cannot be blank.")
    elif not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        errors["keep"] = field_error("validation_min_greater_equal_than_required", "Must be an integer no less than 0.")
    scope = body.get("scope", "scheduled")
    if scope not in ("scheduled", "all"):
        errors["scope"] = field_error("validation_in_invalid", 'Must be "scheduled" or "all".')
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        errors["dryRun"] = field_error("validation_invalid_value", "Must be true or false.")
    if errors:
        raise ValidationError(errors)
    return json_response(await get_app(request).backups.prune_backups(keep, scope, dry_run))


async def notify_test(request: Request) -> Response:
    await require_superuser(request)
    try:
        await get_app(request).backups.notifier.test()
    except DeliveryError as exc:
        raise BadRequest(f"The test event was not delivered: {exc}.") from None
    return no_content()


async def create_backup(request: Request) -> Response:
    who = await require_superuser(request)
    body = await read_json(request)
    name = body.get("name") or ""
    if not isinstance(name, str):
        raise BadRequest("An error occurred while loading the submitted data.")
    await get_app(request).backups.start_create(name or None, created_by=_maker(who))
    return no_content()


async def upload_backup(request: Request) -> Response:
    who = await require_superuser(request)
    request.scope[BODY_LIMIT_KEY] = None  # no size limit: the body is streamed to disk
    declared = request.headers.get("content-length", "")
    try:
        # ours (issue 17): an ``identity`` field, before or after the file, checks an encrypted upload.
        fields: dict[str, str] = {}
        part = await file_part(request.stream(), request.headers.get("content-type", ""), "file", ("identity",), fields)
        if part is None:
            raise ValidationError({"file": field_error("validation_required", "Cannot be blank.")})
        filename, chunks = part
        await get_app(request).backups.upload(filename, chunks, int(declared) if declared.isdigit() else None,
                                              fields, uploaded_by=_maker(who))
    except MultipartError as exc:
        raise BadRequest("Failed to load the submitted data due to invalid formatting.") from exc
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening; the upload was discarded
    return no_content()


async def download_backup(request: Request) -> Response:
    app = get_app(request)
    who = await app.records.find_by_token(request.query_params.get("token", ""), "file")
    if not who.is_superuser:
        raise Forbidden("Insufficient permissions to access the resource.")
    key = request.path_params["key"]
    info = await app.backups.stat(key)
    if info is None:
        raise NotFound()
    headers = {
        **FILE_HEADERS,
        "accept-ranges": "bytes",
        "content-disposition": f'attachment; filename="{key}"',
        "last-modified": http_date(info.modified, usegmt=True),
    }
    start, end, status_code = 0, info.size, 200
    wanted = request.headers.get("range")
    if wanted:
        parsed = _parse_range(wanted, info.size)
        if parsed is None:
            unsatisfiable = {"content-range": f"bytes */{info.size}",
                             "content-disposition": headers["content-disposition"],
                             "content-security-policy": headers["content-security-policy"]}
            return Response("invalid range: failed to overlap\n", status_code=416, headers=unsatisfiable,
                            media_type="text/plain; charset=utf-8")
        start, end = parsed
        status_code = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{info.size}"
    headers["content-length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status_code, headers=headers, media_type="application/zip")
    chunks = await app.backups.open_read(key, start, end)
    return StreamingResponse(chunks, status_code=status_code, headers=headers, media_type="application/zip")


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as ``[start, end)``; ``None`` if it cannot be satisfied.

    Several ranges are answered with the first one only (as many servers do)."""
    first = value.split(",", 1)[0].strip()
    match = _RANGE_RE.match(first)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):  # a suffix: the last N bytes
        length = int(match.group(2))
        if length == 0 or size == 0:
            return None
        return max(0, size - length), size
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    if start >= size or end <= start:
        return None
    return start, min(end, size)


async def delete_backup(request: Request) -> Response:
    await require_superuser(request)
    await get_app(request).backups.delete(request.path_params["key"])
    return no_content()


async def restore_backup(request: Request) -> Response:
    await require_superuser(request)
    # ours: an optional body asks for a partial restore or a dry run (no body: the full restore).
    body = await read_json(request)
    restore, identities = parse_restore_body(body)  # (an identity alone: still the full restore)
    await get_app(request).backups.start_restore(request.path_params["key"], restore, identities)
    return no_content()


async def replication_status(request: Request) -> Response:
    await require_superuser(request)
    return json_response(get_app(request).replication.status())


async def replication_restore(request: Request) -> Response:
    """ours (issue 16): ``{"at", "collections"?, "mode"?, "dryRun"?}``: that moment from the replica,
    restored as a backup is (full with its re-exec, partial, or a dry run)."""
    await require_superuser(request)
    body = await read_json(request)
    raw_at = body.get("at")
    if raw_at is None or raw_at == "":
        raise ValidationError({"at": field_error("validation_required", "Cannot be blank.")})
    at = parse_datetime(raw_at) if isinstance(raw_at, str) else None
    if at is None:
        raise ValidationError({"at": field_error("validation_invalid_datetime",
                                                 "Must be a datetime (YYYY-MM-DD HH:MM:SS.mmmZ or ISO 8601).")})
    rest = {k: v for k, v in body.items() if k != "at"}
    restore, identities = parse_restore_body(rest)
    await get_app(request).backups.start_replica_restore(at, restore, identities)
    return no_content()
