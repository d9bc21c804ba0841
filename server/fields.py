"""Field types of a collection: their options, defaults, SQL columns and option validation.

A field is kept as a plain dict in PocketBase's JSON shape (``{"id", "name", "type", "system",
"hidden", "presentable", "required", "help", ...type options}``), so that what is stored, what
is returned and what a client sends are the same thing.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from .errors import field_error
from .tools.times import normalize_datetime

NAME_RE = re.compile(r"^\w+$")
MAX_NAME_LENGTH = 100

_COMMON: dict[str, Any] = {"hidden": False, "presentable": False, "system": False, "help": ""}

TYPE_OPTIONS: dict[str, dict[str, Any]] = {
    "text": {"required": False, "min": 0, "max": 0, "pattern": "", "autogeneratePattern": "", "primaryKey": False},
    "number": {"required": False, "min": None, "max": None, "onlyInt": False},
    "bool": {"required": False},
    "email": {"required": False, "exceptDomains": [], "onlyDomains": []},
    "url": {"required": False, "exceptDomains": [], "onlyDomains": []},
    "date": {"required": False, "min": "", "max": ""},
    "select": {"required": False, "values": [], "maxSelect": 1},
    "json": {"required": False, "maxSize": 0},
    "file": {"required": False, "maxSelect": 1, "maxSize": 0, "mimeTypes": [], "thumbs": [], "protected": False},
    "password": {"required": True, "min": 8, "max": 0, "pattern": "", "cost": 0},
    "autodate": {"onCreate": True, "onUpdate": False},
}
USER_TYPES = ("text", "number", "bool", "email", "url", "date", "select", "json", "file", "autodate")

DEFAULT_FILE_MAX_SIZE = 5 << 20
DEFAULT_JSON_MAX_SIZE = 1 << 20

# Keys a record's JSON carries besides its fields; no field may take these names.
RESERVED_NAMES = {"expand", "collectionid", "collectionname", "passwordconfirm", "oldpassword"}


def field_id(field_type: str, name: str) -> str:
    """PocketBase's default field id: the type followed by the CRC-32 of the name."""
    return f"{field_type}{zlib.crc32(name.encode())}"


def make_field(field_type: str, name: str, **options: Any) -> dict[str, Any]:
    field = {**_COMMON, **TYPE_OPTIONS[field_type], **options, "name": name, "type": field_type}
    field.setdefault("id", field_id(field_type, name))
    if field_type == "autodate":
        field.pop("required", None)
        field.pop("help", None)
    return dict(sorted(field.items()))


def max_file_size(field: dict[str, Any]) -> int:
    """The largest file a file field takes, in bytes (``maxSize`` 0 means the default)."""
    return int(field.get("maxSize") or DEFAULT_FILE_MAX_SIZE)


def is_multiple(field: dict[str, Any]) -> bool:
    return field["type"] in ("select", "file") and int(field.get("maxSelect") or 1) > 1


def column_definition(field: dict[str, Any]) -> str:
    """The SQLite column for a field, as PocketBase declares it."""
    name = quote(field["name"])
    kind = field["type"]
    if kind == "text" and field.get("primaryKey"):
        return f"{name} TEXT PRIMARY KEY DEFAULT ('r'||lower(hex(randomblob(7)))) NOT NULL"
    if kind == "number":
        return f"{name} NUMERIC DEFAULT 0 NOT NULL"
    if kind == "bool":
        return f"{name} BOOLEAN DEFAULT FALSE NOT NULL"
    if kind == "json":
        return f"{name} JSON DEFAULT NULL"
    if is_multiple(field):
        return f"{name} JSON DEFAULT '[]' NOT NULL"
    return f"{name} TEXT DEFAULT '' NOT NULL"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def normalize(raw: Any, existing: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A field definition from a client, completed with defaults; and its errors by option name.

    ``existing`` is the stored field with the same id, if any: system flags and the type cannot
    be changed through the API.
    """
    errors: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return None, {"": field_error("validation_invalid_value", "Must be an object.")}
    kind = raw.get("type")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        errors["name"] = field_error("validation_required", "Cannot be blank.")
    elif len(name) > MAX_NAME_LENGTH or not NAME_RE.match(name):
        errors["name"] = field_error("validation_match_invalid", "Must be in a valid format.")
    elif name.lower() in RESERVED_NAMES:
        errors["name"] = field_error("validation_not_in_invalid_values", "The name is reserved.")
    if existing is not None and kind != existing["type"]:
        errors["type"] = field_error("validation_field_type_change", "Cannot change the field type.")
    elif kind not in TYPE_OPTIONS or (existing is None and kind not in USER_TYPES):
        errors["type"] = field_error("validation_field_invalid_type", "Invalid or unsupported field type.")
    if errors:
        return None, errors

    base = existing if existing is not None else make_field(kind, name)
    field = dict(base)
    for key, value in raw.items():
        if key in ("id", "type", "system") or key not in field:
            continue
        field[key] = value
    field["name"] = name
    if existing is None:
        field["id"] = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else field_id(kind, name)
        field["system"] = False
    errors.update(_check_options(field))
    return dict(sorted(field.items())), errors


def _check_options(field: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    kind = field["type"]

    def bool_option(key: str) -> None:
        if key in field and not isinstance(field[key], bool):
            errors[key] = field_error("validation_invalid_value", "Must be a boolean.")

    def int_option(key: str, minimum: int, nullable: bool = False) -> None:
        value = field.get(key)
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
            errors[key] = field_error("validation_invalid_value", f"Must be a whole number of at least {minimum}.")
        else:
            field[key] = int(value)

    def string_list(key: str) -> None:
        value = field.get(key)
        if value is None:
            field[key] = []
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors[key] = field_error("validation_invalid_value", "Must be a list of strings.")

    for key in ("hidden", "presentable", "required", "primaryKey", "onlyInt", "protected", "onCreate", "onUpdate"):
        bool_option(key)
    if not isinstance(field.get("help", ""), str):
        errors["help"] = field_error("validation_invalid_value", "Must be a string.")
    if kind in ("text", "password"):
        int_option("min", 0)
        int_option("max", 0)
        pattern = field.get("pattern", "")
        if not isinstance(pattern, str):
            errors["pattern"] = field_error("validation_invalid_value", "Must be a string.")
        elif pattern:
            try:
                re.compile(pattern)
            except re.error:
                errors["pattern"] = field_error("validation_invalid_regex", "Invalid regular expression.")
    elif kind == "number":
        for key in ("min", "max"):
            value = field.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                errors[key] = field_error("validation_invalid_value", "Must be a number or null.")
    elif kind in ("email", "url"):
        string_list("exceptDomains")
        string_list("onlyDomains")
    elif kind == "date":
        for key in ("min", "max"):
            value = field.get(key) or ""
            if value and (not isinstance(value, str) or normalize_datetime(value) is None):
                errors[key] = field_error("validation_invalid_date", "Must be a valid date.")
    elif kind == "select":
        string_list("values")
        values = field.get("values")
        if isinstance(values, list) and not values:
            errors["values"] = field_error("validation_required", "Cannot be blank.")
        elif isinstance(values, list) and len(set(values)) != len(values):
            errors["values"] = field_error("validation_duplicated_values", "The values must be unique.")
        int_option("maxSelect", 0)
        if "maxSelect" not in errors and field["maxSelect"] == 0:
            field["maxSelect"] = 1
    elif kind == "json":
        int_option("maxSize", 0)
    elif kind == "file":
        int_option("maxSelect", 0)
        int_option("maxSize", 0)
        string_list("mimeTypes")
        string_list("thumbs")
        if "maxSelect" not in errors and field["maxSelect"] == 0:
            field["maxSelect"] = 1
    return errors
