"""Field values: from what a client sends to what SQLite stores, and back.

``coerce`` turns a client's value into the stored form (strictly: a wrong type is an error, not a
silent zero), ``validate`` checks it against the field's options, ``decode`` turns a column value
into what the API returns, and ``to_sql`` into what SQLite binds.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from . import fields as F
from .errors import field_error
from .tools.times import normalize_datetime

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
URL_RE = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.I)
_ID_RE = re.compile(r"^[a-z0-9]+$")
TRUE = {"true", "1", "on", "yes"}
FALSE = {"false", "0", "off", "no", ""}


def truthy(value: Any) -> bool:
    """Whether a client's value means "true" (``True``, 1, or a string such as "true"/"on")."""
    if value is None or isinstance(value, (bool, int, float)):
        return bool(value)
    return str(value).strip().lower() in TRUE


def error(code: str, message: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = field_error(code, message)
    if params:
        out["params"] = params
    return out


def check_id(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, str):
        return error("validation_invalid_value", "Must be a string.")
    if len(value) < 15:
        return error("validation_min_text_constraint", "Must be at least 15 character(s).", min=15)
    if len(value) > 15:
        return error("validation_max_text_constraint", "Must be no more than 15 character(s).", max=15)
    if not _ID_RE.match(value):
        return error("validation_invalid_format", "Invalid value format.")
    return None


def to_sql(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, bool):
        return int(value)
    return value


def decode(field: dict[str, Any], raw: Any) -> Any:
    kind = field["type"]
    if kind == "number":
        value = float(raw or 0)
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if kind == "bool":
        return bool(raw)
    if kind == "json":
        if raw is None:
            return None
        if isinstance(raw, (int, float)):
            return raw
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return raw
    if F.is_multiple(field):
        if isinstance(raw, str) and raw.startswith("["):
            try:
                return list(json.loads(raw))
            except ValueError:
                return []
        return [raw] if raw else []
    return "" if raw is None else str(raw)


def coerce(field: dict[str, Any], data: dict[str, Any], current: Any, from_form: bool) -> tuple[Any, dict[str, Any] | None]:
    """The stored form of the client's value for ``field``, or the error that refuses it."""
    name, kind = field["name"], field["type"]
    value = data.get(name, current)
    if kind in ("text", "email", "url"):
        if value is None:
            return "", None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and kind == "text":
            return str(value), None
        if not isinstance(value, str):
            return None, error("validation_invalid_value", "Must be a string.")
        return (value.strip() if kind != "text" else value), None
    if kind == "number":
        if value is None or value == "":
            return 0, None
        if isinstance(value, bool):
            return None, error("validation_invalid_number", "Must be a number.")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return None, error("validation_invalid_number", "Must be a number.")
        if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            return None, error("validation_invalid_number", "Must be a number.")
        return (int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)), None
    if kind == "bool":
        if isinstance(value, bool):
            return value, None
        if value is None:
            return False, None
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value), None
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE, None
        return None, error("validation_invalid_bool", "Must be a boolean.")
    if kind == "date":
        if value in (None, ""):
            return "", None
        normalized = normalize_datetime(value) if isinstance(value, str) else None
        if normalized is None:
            return None, error("validation_invalid_date", "Must be a valid date.")
        return normalized, None
    if kind == "select":
        if F.is_multiple(field):
            items = [] if value in (None, "") else (value if isinstance(value, list) else [value])
            if name + "+" in data:
                extra = data[name + "+"]
                items = list(current) + (extra if isinstance(extra, list) else [extra])
            if name + "-" in data:
                gone = data[name + "-"]
                gone_list = gone if isinstance(gone, list) else [gone]
                items = [i for i in items if i not in gone_list]
            if not all(isinstance(i, str) for i in items):
                return None, error("validation_invalid_value", "Must be a list of strings.")
            return list(dict.fromkeys(items)), None
        if isinstance(value, list):
            if len(value) > 1:
                return None, error("validation_too_many_values", "Select no more than 1.", maxSelect=1)
            value = value[0] if value else ""
        if value is None:
            return "", None
        if not isinstance(value, str):
            return None, error("validation_invalid_value", "Must be a string.")
        return value, None
    if kind == "json":
        if from_form and isinstance(value, str):
            try:
                return json.loads(value), None
            except ValueError:
                return value, None
        return value, None
    return value, None


def validate(field: dict[str, Any], value: Any) -> dict[str, Any] | None:
    kind = field["type"]
    required = field.get("required")
    empty = value in ("", None, [], {}) or (kind == "number" and value == 0) or (kind == "bool" and value is False)
    if required and empty:
        return error("validation_required", "Cannot be blank.")
    if empty:
        return None
    if kind == "text":
        length = len(value)
        if field.get("min") and length < field["min"]:
            return error("validation_min_text_constraint", f"Must be at least {field['min']} character(s).", min=field["min"])
        maximum = field.get("max") or 5000
        if length > maximum:
            return error("validation_max_text_constraint", f"Must be no more than {maximum} character(s).", max=maximum)
        if field.get("pattern") and not re.search(field["pattern"], value):
            return error("validation_invalid_format", "Invalid value format.")
    elif kind == "number":
        if field.get("onlyInt") and not float(value).is_integer():
            return error("validation_not_an_integer", "Must be an integer.")
        if field.get("min") is not None and value < field["min"]:
            return error("validation_min_number_constraint", f"Must be larger than {field['min']}.", min=field["min"])
        if field.get("max") is not None and value > field["max"]:
            return error("validation_max_number_constraint", f"Must be less than {field['max']}.", max=field["max"])
    elif kind in ("email", "url"):
        if kind == "email" and not EMAIL_RE.match(value):
            return error("validation_is_email", "Must be a valid email address.")
        if kind == "url" and not URL_RE.match(value):
            return error("validation_invalid_url", "Must be a valid url.")
        domain = value.rsplit("@", 1)[-1] if kind == "email" else re.sub(r"^https?://([^/:?#]+).*$", r"\1", value, flags=re.I)
        if field.get("onlyDomains") and domain.lower() not in [d.lower() for d in field["onlyDomains"]]:
            return error("validation_email_domain_not_allowed" if kind == "email" else "validation_url_domain_not_allowed", "Domain not allowed.")
        if field.get("exceptDomains") and domain.lower() in [d.lower() for d in field["exceptDomains"]]:
            return error("validation_email_domain_not_allowed" if kind == "email" else "validation_url_domain_not_allowed", "Domain not allowed.")
    elif kind == "date":
        if field.get("min") and value < normalize_datetime(field["min"]):
            return error("validation_min_date_constraint", f"Must be no earlier than {field['min']}.")
        if field.get("max") and value > normalize_datetime(field["max"]):
            return error("validation_max_date_constraint", f"Must be no later than {field['max']}.")
    elif kind == "select":
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in field["values"]:
                return error("validation_invalid_value", f"Invalid value {item}.", value=item)
        limit = int(field.get("maxSelect") or 1)
        if len(items) > limit:
            return error("validation_too_many_values", f"Select no more than {limit}.", maxSelect=limit)
    elif kind == "json":
        limit = int(field.get("maxSize") or F.DEFAULT_JSON_MAX_SIZE)
        if len(json.dumps(value)) > limit:
            return error("validation_json_size_limit", f"The maximum allowed JSON size is {limit} bytes.", maxSize=limit)
    return None
