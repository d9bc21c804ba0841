"""Record CRUD routes of a collection."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..collections import Collection
from ..errors import NotFound
from .common import get_app, json_response, no_content, read_record_input, requester


def _collection(request: Request) -> Collection:
    found = get_app(request).collections.find(request.path_params["collection"])
    if found is None:
        raise NotFound("Missing or invalid collection context.")
    return found


async def list_records(request: Request) -> Response:
    page = await get_app(request).records.list(_collection(request), await requester(request), request.query_params)
    return json_response(page.to_json())


async def view_record(request: Request) -> Response:
    record = await get_app(request).records.view(_collection(request), request.path_params["record"], await requester(request))
    return json_response(record)


async def create_record(request: Request) -> Response:
    collection = _collection(request)
    payload = await read_record_input(request)
    record = await get_app(request).records.create(collection, payload, await requester(request))
    return json_response(record)


async def update_record(request: Request) -> Response:
    collection = _collection(request)
    payload = await read_record_input(request)
    record = await get_app(request).records.update(collection, request.path_params["record"], payload, await requester(request))
    return json_response(record)


async def delete_record(request: Request) -> Response:
    await get_app(request).records.delete(_collection(request), request.path_params["record"], await requester(request))
    return no_content()
