"""Datetimes in PocketBase's wire format: UTC ``YYYY-MM-DD HH:MM:SS.mmmZ``."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

_FORMAT_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?)?$"
)


def format_datetime(value: datetime) -> str:
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


_second: tuple[int, str] = (-1, "")  # the last second formatted by ``now``, and its text


def now() -> str:
    """The current time in the wire format (each request's log entry has one: the formatted
    second is reused within a second)."""
    global _second
    moment = time.time()
    whole = int(moment)
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{int((moment - whole) * 1000):03d}Z"


def parse_datetime(text: str) -> datetime | None:
    """Parse the wire format and the common ISO 8601 variants; ``None`` if it is neither."""
    match = _FORMAT_RE.match(text.strip())
    if match is None:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip().replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def normalize_datetime(text: str) -> str | None:
    parsed = parse_datetime(text)
    return None if parsed is None else format_datetime(parsed)
