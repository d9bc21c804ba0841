"""Superuser CRUD of collections."""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import Response

from ..errors import BadRequest
from ..tools.filter import FilterError
from .common import get_app, json_response, no_content, read_json, require_superuser

_SORTABLE = ("id", "name", "type", "system", "created", "updated")
_FORMAT_ERROR = "Failed to load the submitted data due to invalid formatting."


async def list_collections(request: Request) -> Response:
    await require_superuser(request)
    params = request.query_params
    store = get_app(request).collections
    expression = params.get("filter", "").strip()
    try:
        found = await store.matching(expression) if expression else store.all()
    except FilterError as exc:
        raise BadRequest(f"Invalid filter: {exc}") from exc
    items = [c.to_json() for c in found]
    try:
        page = max(int(params.get("page") or 1), 1)
        per_page = min(max(int(params.get("perPage") or 30), 1), 1000)
    except ValueError as exc:
        raise BadRequest("Invalid page or perPage value.") from exc
    # Sort keys apply last-first, so that the first one given is the primary order (stable sort).
    for key in reversed([k.strip() for k in params.get("sort", "").split(",") if k.strip()]):
        name = key.lstrip("-+")
        if name not in _SORTABLE:
            raise BadRequest(f"Invalid sort field {key!r}.")
        items.sort(key=lambda c: c[name], reverse=key.startswith("-"))
    total = len(items)
    chunk = items[(page - 1) * per_page : page * per_page]
    return json_response({"page": page, "perPage": per_page, "totalItems": total,
                          "totalPages": math.ceil(total / per_page), "items": chunk})


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
