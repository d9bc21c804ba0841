"""Alerts: a JSON event POSTed to ``settings.backups.notify.webhookURL`` when a backup or restore
fails, a scheduled run is skipped, or no backup has succeeded for ``staleAfterHours``.

Delivery never blocks a job or a request: each event is sent by a task of its own, the HTTP call
in a worker thread, with a timeout and retries with backoff; an endpoint that cannot be reached is
logged, never fatal. An event carries no secret and no path: the op, the key, the error (our own
safe messages), the time and the app name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..tools.times import now

logger = logging.getLogger("server.backups.notify")

TIMEOUT = 5.0  # seconds for one delivery attempt
RETRIES = 3  # after the first attempt
RETRY_ENV = "PB_NOTIFY_RETRY_SECONDS"  # the first backoff (doubled at each retry); 1 s by default
EVENTS = ("failure", "skipped", "stale", "test")


class DeliveryError(Exception):
    """Why an event was not delivered (safe to show: never the URL, which may hold a token)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a POST is never turned into a GET elsewhere: a 3xx is a failed delivery


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, payload: dict[str, Any], timeout: float = TIMEOUT) -> None:
    """One delivery attempt (blocking); ``DeliveryError`` says why it failed."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"pb-backup-server/{__version__}"})
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(1 << 16)
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"the webhook answered {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        raise DeliveryError(f"the webhook could not be reached: {text.lower()}") from None
    except TimeoutError:
        raise DeliveryError(f"the webhook did not answer within {timeout:g} s") from None
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"the webhook could not be reached: {type(exc).__name__}") from None


class Notifier:
    """Sends events to the webhook of the current settings (``settings()`` gives ``backups.notify``)."""

    def __init__(self, settings: Callable[[], dict[str, Any]], app_name: Callable[[], str],
                 on_undelivered: Callable[[str, str], None] | None = None) -> None:
        self._settings = settings
        self._app_name = app_name
        self._on_undelivered = on_undelivered or (lambda event, reason: None)
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0

    def event(self, event: str, op: str, key: str, error: str | None, **extra: Any) -> dict[str, Any]:
        return {"event": event, "op": op, "key": key, "error": error, "time": now(), "app": self._app_name(),
                **extra}

    def send(self, event: str, op: str, key: str, error: str | None, **extra: Any) -> None:
        """Deliver an event in the background, if a webhook is set and the event is wanted."""
        config = self._settings()
        url = config.get("webhookURL") or ""
        if not url or (event in ("failure", "skipped") and not config.get("onFailure", True)):
            return
        payload = self.event(event, op, key, error, **extra)
        try:
            task = asyncio.get_running_loop().create_task(self._deliver(url, payload), name=f"notify-{event}")
        except RuntimeError:
            return  # no event loop (never in a server)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        delay = float(os.environ.get(RETRY_ENV) or 1.0)
        for attempt in range(RETRIES + 1):
            try:
                await asyncio.to_thread(post, url, payload)
                self.delivered += 1
                return
            except DeliveryError as exc:
                reason = str(exc)
            if attempt < RETRIES:
                await asyncio.sleep(delay * 2 ** attempt)
        logger.warning("the %s alert was not delivered: %s", payload["event"], reason)
        self._on_undelivered(payload["event"], reason)

    async def test(self) -> None:
        """Send a test event now, once; ``DeliveryError`` says why it failed."""
        url = self._settings().get("webhookURL") or ""
        if not url:
            raise DeliveryError("no webhook URL is set (backups.notify.webhookURL)")
        await asyncio.to_thread(post, url, self.event("test", "test", "", None))

    async def close(self) -> None:
        """Cancel the deliveries still under way (the server is stopping)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
