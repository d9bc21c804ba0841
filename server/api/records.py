"""Record CRUD routes of a collection."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..collections import Collection
from ..errors import NotFound
from ..fields import max_file_size
from ..records import pick_fields
from .limits import BODY_LIMIT_KEY, DEFAULT_BODY_LIMIT
from .common import get_app, json_response, no_content, read_record_input, requester


def _collection(request: Request) -> Collection:
    found = get_app(request).collections.find(request.path_params["collection"])
    if found is None:
        raise NotFound("Missing or invalid collection context.")
    return found


async def list_records(request: Request) -> Response:
    page = await get_app(request).records.list_page(_collection(request), await requester(request), request.query_params)
    return json_response(page.to_json())


async def view_record(request: Request) -> Response:
    record = await get_app(request).records.view(_collection(request), request.path_params["record"], await requester(request))
    return json_response(pick_fields([record], request.query_params.get("fields"))[0])


def _allow_files(request: Request, collection: Collection) -> None:
    """Raise the body limit by what the collection's file fields may legitimately carry."""
    extra = sum(max_file_size(f) * int(f.get("maxSelect") or 1) for f in collection.file_fields())
    request.scope[BODY_LIMIT_KEY] = DEFAULT_BODY_LIMIT + extra


async def create_record(request: Request) -> Response:
    collection = _collection(request)
    _allow_files(request, collection)
    payload = await read_record_input(request)
    record = await get_app(request).records.create(collection, payload, await requester(request))
    return json_response(record)


async def update_record(request: Request) -> Response:
    collection = _collection(request)
    _allow_files(request, collection)
    payload = await read_record_input(request)
    record = await get_app(request).records.update(collection, request.path_params["record"], payload, await requester(request))
    return json_response(record)


async def delete_record(request: Request) -> Response:
    await get_app(request).records.delete(_collection(request), request.path_params["record"], await requester(request))
    return no_content()
