"""Superuser CRUD of collections."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .common import get_app, json_response, no_content, read_json, require_superuser

_FORMAT_ERROR = "Failed to load the submitted data due to invalid formatting."


async def list_collections(request: Request) -> Response:
    await require_superuser(request)
    page = await get_app(request).collections.list_page(request.query_params)
    return json_response(page.to_json())


async def view_collection(request: Request) -> Response:
    await require_superuser(request)
    return json_response(get_app(request).collections.get(request.path_params["collection"]).to_json())


async def create_collection(request: Request) -> Response:
    await require_superuser(request)
    data = await read_json(request, _FORMAT_ERROR)
    created = await get_app(request).collections.create(data)
    return json_response(created.to_json())


async def update_collection(request: Request) -> Response:
    await require_superuser(request)
    store = get_app(request).collections
    current = store.get(request.path_params["collection"])
    data = await read_json(request, _FORMAT_ERROR)
    updated = await store.update(current, data)
    return json_response(updated.to_json())


async def delete_collection(request: Request) -> Response:
    await require_superuser(request)
    store = get_app(request).collections
    await store.delete(store.get(request.path_params["collection"]))
    return no_content()
