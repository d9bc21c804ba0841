"""``GET /_/``: the dashboard, a static single-page app from ``server/dashboard/`` (as PocketBase
serves its own at ``/_/``). It talks to the server only through the public API, as any client does.

Every answer carries a Content-Security-Policy that allows scripts, styles and requests from this
origin only (no inline script, no other host) and forbids framing (``frame-ancestors 'none'``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import RedirectResponse, Response
from starlette.requests import Request
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

ROOT = Path(__file__).resolve().parent.parent / "dashboard"

HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # The download link carries a short-lived file token in its query: never sent on to anyone.
    "referrer-policy": "no-referrer",
    # Revalidated on each load (ETag), so that a new server version is never run with old scripts.
    "cache-control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """The dashboard's files, with its security headers; ``/_/`` is ``index.html``."""

    def __init__(self) -> None:
        super().__init__(directory=ROOT, html=True)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


async def redirect(request: Request) -> Response:
    """``/_`` → ``/_/``, as PocketBase."""
    return RedirectResponse("/_/", status_code=301)
