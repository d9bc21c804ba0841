from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .common import json_response, requester
from .proxy import client_ip


async def health(request: Request) -> Response:
    body: dict = {"message": "API is healthy.", "code": 200, "data": {}}
    who = await requester(request)
    if who.is_superuser:
        app = request.app.state.core
        real_ip, proxy_header = client_ip(request, app.settings.data["trustedProxy"])
        body["data"] = {"canBackup": app.backups.can_backup, "realIP": real_ip, "possibleProxyHeader": proxy_header,
                        "backupStale": app.backups.backup_stale}  # ours (issue 15)
    return json_response(body)
