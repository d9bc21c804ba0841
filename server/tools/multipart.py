"""Streaming a file out of a multipart/form-data body, chunk by chunk, without spooling it.

``file_part(stream, content_type, field)`` reads the body until the part named ``field`` that has a
filename begins, and returns that filename and an async iterator over the part's bytes; nothing
is held in memory beyond one network chunk. Other parts are skipped, except the small text fields
named in ``fields``, whose values go into the caller's dict ``found``: those before the file
as the file starts, those after it once its bytes are consumed (the rest of the body is then
read), each at most ``MAX_FIELD`` bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header


MAX_FIELD = 64 << 10


class MultipartError(ValueError):
    pass


def boundary_of(content_type: str) -> bytes | None:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    boundary = options.get(b"boundary")
    return boundary or None


async def _events(stream: AsyncIterator[bytes], boundary: bytes) -> AsyncIterator[tuple[str, Any]]:
    pending: list[tuple[str, Any]] = []
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        pending.append(("headers", dict(headers)))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        pending.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        pending.append(("end", None))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    async for chunk in stream:
        try:
            parser.write(chunk)
        except Exception as exc:
            raise MultipartError("malformed multipart body") from exc
        for event in pending:
            yield event
        pending.clear()
    try:
        parser.finalize()
    except Exception as exc:
        raise MultipartError("malformed multipart body") from exc
    for event in pending:
        yield event


async def file_part(stream: AsyncIterator[bytes], content_type: str, field: str,
                    fields: tuple[str, ...] = (), found: dict[str, str] | None = None,
                    ) -> tuple[str, AsyncIterator[bytes]] | None:
    """The filename and the bytes of the first file part named ``field``; ``None`` if there is none.

    ``fields``: the text fields wanted, the first value of each put into ``found`` (see above)."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    wanted = {name.encode(): name for name in fields} if found is not None else {}
    events = _events(stream, boundary)
    async for kind, value in events:
        if kind != "headers":
            continue
        _, options = parse_options_header(value.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        part_name = options.get(b"name")
        if part_name == field.encode() and filename is not None:
            name = filename.decode("utf-8", "replace")
            name = name.replace("\\", "/").rsplit("/", 1)[-1]  # some clients send a full path
            return name, _part_data(events, wanted, found)
        if filename is None and part_name in wanted and found is not None:
            value = await _field_value(events)
            found.setdefault(wanted[part_name], value)
    return None


async def _field_value(events: AsyncIterator[tuple[str, Any]]) -> str:
    value = bytearray()
    async for kind, data in events:
        if kind == "data":
            value += data
            if len(value) > MAX_FIELD:
                raise MultipartError("a form field is too large")
        elif kind == "end":
            return value.decode("utf-8", "replace")
    raise MultipartError("the body ended before a field did")


async def _part_data(events: AsyncIterator[tuple[str, Any]], wanted: dict[bytes, str] | None = None,
                     found: dict[str, str] | None = None) -> AsyncIterator[bytes]:
    ended = False
    async for kind, value in events:
        if kind == "data":
            if value:
                yield value
        elif kind == "end":
            ended = True
            break
    if not ended:
        raise MultipartError("the body ended before the file did")
    if wanted and found is not None:  # fields after the file: the rest of the body is read for them
        async for kind, value in events:
            if kind != "headers":
                continue
            _, options = parse_options_header(value.get(b"content-disposition", b""))
            part_name = options.get(b"name")
            if options.get(b"filename") is None and part_name in wanted:
                value = await _field_value(events)
                found.setdefault(wanted[part_name], value)
