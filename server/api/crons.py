from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .common import get_app, json_response, no_content, require_superuser


async def list_crons(request: Request) -> Response:
    await require_superuser(request)
    jobs = get_app(request).scheduler.jobs()
    return json_response([{"id": job.id, "expression": job.expression} for job in jobs])


async def run_cron(request: Request) -> Response:
    await require_superuser(request)
    get_app(request).scheduler.run_now(request.path_params["id"])
    return no_content()
