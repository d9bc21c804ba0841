"""The HTTP layer: Starlette routes over the ``App`` core, PocketBase's error shape, request logs."""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app import App
from ..errors import ApiError, NotFound, TooLarge
from . import backups, collections, crons, dashboard, files, health, record_auth, records, settings
from .limits import BODY_LIMIT_KEY, DEFAULT_BODY_LIMIT

logger = logging.getLogger("server.api")


def routes() -> list[BaseRoute]:
    c = "/api/collections/{collection}"
    return [
        Route("/api/health", health.health, methods=["GET", "HEAD"]),
        Route(c + "/auth-with-password", record_auth.auth_with_password, methods=["POST"]),
        Route(c + "/auth-refresh", record_auth.auth_refresh, methods=["POST"]),
        Route(c + "/auth-methods", record_auth.auth_methods, methods=["GET"]),
        Route(c + "/records", records.list_records, methods=["GET"]),
        Route(c + "/records", records.create_record, methods=["POST"]),
        Route(c + "/records/{record}", records.view_record, methods=["GET"]),
        Route(c + "/records/{record}", records.update_record, methods=["PATCH"]),
        Route(c + "/records/{record}", records.delete_record, methods=["DELETE"]),
        Route("/api/collections", collections.list_collections, methods=["GET"]),
        Route("/api/collections", collections.create_collection, methods=["POST"]),
        Route(c, collections.view_collection, methods=["GET"]),
        Route(c, collections.update_collection, methods=["PATCH"]),
        Route(c, collections.delete_collection, methods=["DELETE"]),
        Route("/api/files/token", files.file_token, methods=["POST"]),
        Route("/api/files/{collection}/{record}/{filename}", files.download, methods=["GET", "HEAD"]),
        Route("/api/settings", settings.get_settings, methods=["GET"]),
        Route("/api/settings", settings.patch_settings, methods=["PATCH"]),
        Route("/api/settings/test/s3", settings.test_s3, methods=["POST"]),
        Route("/api/crons", crons.list_crons, methods=["GET"]),
        Route("/api/crons/{id}", crons.run_cron, methods=["POST"]),
        Route("/api/backups", backups.list_backups, methods=["GET"]),
        Route("/api/backups", backups.create_backup, methods=["POST"]),
        Route("/api/backups/status", backups.status, methods=["GET"]),
        Route("/api/backups/replication", backups.replication_status, methods=["GET"]),
        Route("/api/backups/replication/restore", backups.replication_restore, methods=["POST"]),
        Route("/api/backups/upload", backups.upload_backup, methods=["POST"]),
        Route("/api/backups/prune", backups.prune, methods=["POST"]),
        Route("/api/backups/notify/test", backups.notify_test, methods=["POST"]),
        Route("/api/backups/{key}/info", backups.info, methods=["GET"]),
        Route("/api/backups/{key}/pin", backups.pin, methods=["POST", "DELETE"]),
        Route("/api/backups/{key}", backups.download_backup, methods=["GET", "HEAD"]),
        Route("/api/backups/{key}", backups.delete_backup, methods=["DELETE"]),
        Route("/api/backups/{key:path}/restore", backups.restore_backup, methods=["POST"]),
        Route("/_", dashboard.redirect, methods=["GET", "HEAD"]),
        Mount("/_", app=dashboard.DashboardFiles()),
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return JSONResponse(NotFound().to_json(), status_code=404)
    message = {405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
    return JSONResponse({"status": exc.status_code, "message": message, "data": {}}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


class ApiMiddleware:
    """What every request goes through, in one layer (each ASGI layer costs a coroutine and a
    ``send`` wrapper per message; three separate ones were a measurable share of a small request):

    - the body limit: request bodies over a limit are refused (413), counting bytes as they
      arrive. The limit is ``DEFAULT_BODY_LIMIT`` unless a handler sets ``scope[BODY_LIMIT_KEY]``
      before it reads the body (``None`` lifts it): record routes raise it by the collection's
      file sizes;
    - the request log: one ``_logs`` entry per API request; spooled upload files are closed
      afterwards;
    - unexpected errors: an unhandled exception is answered with the contract's 500, logged, and
      the connection is kept. (A Starlette ``Exception`` handler re-raises after answering, and
      uvicorn then drops the keep-alive connection without a ``Connection: close``: the client's
      next request on it fails.) An exception after the response has started cannot be answered;
      it propagates. The request log sees the 500.
    """

    def __init__(self, app: ASGIApp, core: App) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        status = 500
        started = False
        received = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received
            limit = scope.get(BODY_LIMIT_KEY, DEFAULT_BODY_LIMIT)
            if limit is not None:
                declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise TooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit is not None and received > limit:
                    raise TooLarge()
            return message

        try:
            try:
                await self.app(scope, limited_receive, send_wrapper)
            finally:
                state: dict[str, Any] = scope.get("state", {})
                form = state.get("form")
                if form is not None:
                    await form.close()
                self._log(scope, state, status, time.perf_counter() - started_at)
        except Exception as exc:
            if started:
                raise
            method, path = scope.get("method", ""), scope.get("path", "")
            logger.exception("unhandled error on %s %s", method, path)
            self.core.logs.error("Unhandled error", url=path, method=method, error=type(exc).__name__)
            body = {"status": 500, "message": "Something went wrong while processing your request.", "data": {}}
            await JSONResponse(body, status_code=500)(scope, receive, send)

    def _log(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        settings = self.core.settings.data["logs"]
        if settings["maxDays"] == 0:
            return
        level = 8 if status >= 500 else 4 if status >= 400 else 0
        if level < settings["minLevel"]:
            return
        user_agent = referer = ""
        for key, value in scope["headers"]:
            if key == b"user-agent":
                user_agent = value.decode("latin-1")
            elif key == b"referer":
                referer = value.decode("latin-1")
        path = scope.get("path", "")
        who = state.get("requester")
        query = scope.get("query_string")
        data: dict[str, Any] = {
            "type": "request",
            "method": scope.get("method", ""),
            "url": path + ("?" + _redact_query(query.decode("latin-1")) if query else ""),
            "status": status,
            "execTime": round(seconds * 1000, 3),
            "userAgent": user_agent,
            "referer": referer,
            "auth": "" if who is None or who.collection is None else who.collection.name,
        }
        if settings["logIP"]:
            data["remoteIP"] = (scope.get("client") or ("", 0))[0]
        if settings["logAuthId"] and who is not None and who.record is not None:
            data["authId"] = who.record["id"]
        self.core.logs.add(level, f"{data['method']} {path}", data)


def _redact_query(query: str) -> str:
    """The query string for the request log, without credentials: a file token (``?token=``)
    downloads a backup for minutes, so it must not be readable in ``_logs``.
    (**ours**: PocketBase logs it.)"""
    parts = []
    for part in query.split("&"):
        name, sep, _ = part.partition("=")
        parts.append(f"{name}=***" if sep and urllib.parse.unquote_plus(name).lower() == "token" else part)
    return "&".join(parts)


def create_asgi_app(core: App, on_started: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """The ASGI app over ``core``; ``on_started`` runs once the core has started."""

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await core.start()
        if on_started is not None:
            await on_started()
        try:
            yield
        finally:
            await core.close()

    app = Starlette(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.core = core
    app.router.redirect_slashes = False  # as PocketBase: /api/health/ is a 404, not a redirect
    app.add_middleware(ApiMiddleware, core=core)
    return app
