from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .common import get_app, json_response, read_json, require_superuser


async def get_settings(request: Request) -> Response:
    await require_superuser(request)
    return json_response(get_app(request).settings.public())


async def patch_settings(request: Request) -> Response:
    await require_superuser(request)
    data = await read_json(request)
    return json_response(await get_app(request).settings.update(data))
