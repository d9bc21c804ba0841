"""The client's IP, honouring the trusted proxy headers from the settings."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

_PROXY_HEADERS = ("cf-connecting-ip", "fly-client-ip", "x-real-ip", "x-forwarded-for")


def client_ip(request: Request, trusted: dict[str, Any]) -> tuple[str, str]:
    """``(real IP, the first proxy-looking header present that is not trusted)``."""
    remote = request.client.host if request.client else ""
    for header in trusted.get("headers", []):
        value = request.headers.get(header.lower(), "")
        if value:
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if parts:
                return (parts[0] if trusted.get("useLeftmostIP") else parts[-1]), ""
    untrusted = next((h for h in _PROXY_HEADERS if request.headers.get(h)), "")
    return remote, untrusted.title().replace("Ip", "IP") if untrusted else ""
