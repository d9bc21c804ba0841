"""Paged list answers, as PocketBase shapes them, for records and collections alike."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

MAX_PER_PAGE = 1000
DEFAULT_PER_PAGE = 30
_MAX_INT = 2**62  # beyond what SQLite's 64-bit OFFSET can take once multiplied


@dataclass
class Page:
    page: int
    per_page: int
    total_items: int  # -1 when the count was skipped
    total_pages: int
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "page": self.page, "perPage": self.per_page,
                "totalItems": self.total_items, "totalPages": self.total_pages}


def parse(params: Mapping[str, str]) -> tuple[int, int]:
    """``(page, perPage)`` from query parameters: non-positive values take the defaults, perPage
    is clamped to ``MAX_PER_PAGE``, anything that is not a whole number is a 400."""
    page = _positive_int(params.get("page"), 1, "page")
    per_page = min(_positive_int(params.get("perPage"), DEFAULT_PER_PAGE, "perPage"), MAX_PER_PAGE)
    return page, per_page


def total_pages(total_items: int, per_page: int) -> int:
    return math.ceil(total_items / per_page)


def _positive_int(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"Invalid {name} value.") from exc
    if value >= _MAX_INT:
        raise BadRequest(f"Invalid {name} value.")
    return value if value > 0 else default
