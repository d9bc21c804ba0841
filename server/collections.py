"""Collections: their definitions in ``_collections``, their tables, and schema migrations.

Every collection is a real SQLite table named after it. Creating, changing and deleting a
collection runs the matching DDL in the same transaction as the change to ``_collections``, so a
failed change leaves both as they were.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import sqlite3
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field as dataclass_field
from typing import Any

from . import fields as F
from . import paging
from .database import Database, Transaction
from .datadir import DataDir
from .errors import BadRequest, NotFound, ValidationError, field_error
from .tools import filter as filters
from .tools.security import random_digits, random_string
from .tools.times import now

SUPERUSERS = "_superusers"
SUPERUSERS_ID = "pbc_3142635823"
USERS = "users"
USERS_ID = "_pb_users_auth_"

RULES = ("listRule", "viewRule", "createRule", "updateRule", "deleteRule")
AUTH_RULES = ("authRule", "manageRule")
_NAME_RE = re.compile(r"^\w+$")
_INDEX_TABLE_RE = re.compile(r"(\bON\s+)(`[^`]+`|\"[^\"]+\"|\[[^\]]+\]|\w+)", re.I)
_SORTABLE = ("id", "name", "type", "system", "created", "updated")
_FILTERABLE = {"id", "name", "type", "system", "created", "updated", *RULES}
_RESERVED_TABLES = {"_collections", "_params", "_migrations", "_logs"}

AUTH_DEFAULTS: dict[str, Any] = {
    "authRule": "",
    "manageRule": None,
    "authAlert": {"enabled": True},
    "oauth2": {"providers": [], "mappedFields": {"id": "", "name": "", "username": "", "avatarURL": ""}, "enabled": False},
    "passwordAuth": {"enabled": True, "identityFields": ["email"]},
    "mfa": {"enabled": False, "duration": 600, "rule": ""},
    "otp": {"enabled": False, "duration": 180, "length": 8},
    "authToken": {"duration": 604800},
    "passwordResetToken": {"duration": 1800},
    "emailChangeToken": {"duration": 1800},
    "verificationToken": {"duration": 259200},
    "fileToken": {"duration": 180},
}
_TOKEN_OPTIONS = ("authToken", "passwordResetToken", "emailChangeToken", "verificationToken", "fileToken")

SCHEMA = """
CREATE TABLE IF NOT EXISTS _collections (
    id TEXT PRIMARY KEY NOT NULL,
    system BOOLEAN DEFAULT FALSE NOT NULL,
    type TEXT DEFAULT 'base' NOT NULL,
    name TEXT UNIQUE NOT NULL,
    fields JSON DEFAULT '[]' NOT NULL,
    indexes JSON DEFAULT '[]' NOT NULL,
    listRule TEXT DEFAULT NULL,
    viewRule TEXT DEFAULT NULL,
    createRule TEXT DEFAULT NULL,
    updateRule TEXT DEFAULT NULL,
    deleteRule TEXT DEFAULT NULL,
    options JSON DEFAULT '{}' NOT NULL,
    created TEXT DEFAULT '' NOT NULL,
    updated TEXT DEFAULT '' NOT NULL
);
"""


@dataclass
class Collection:
    id: str
    name: str
    type: str = "base"
    system: bool = False
    fields: list[dict[str, Any]] = dataclass_field(default_factory=list)
    indexes: list[str] = dataclass_field(default_factory=list)
    rules: dict[str, str | None] = dataclass_field(default_factory=lambda: dict.fromkeys(RULES))
    options: dict[str, Any] = dataclass_field(default_factory=dict)
    created: str = ""
    updated: str = ""

    @property
    def is_auth(self) -> bool:
        return self.type == "auth"

    @property
    def is_superusers(self) -> bool:
        return self.id == SUPERUSERS_ID

    def field(self, name: str) -> dict[str, Any] | None:
        return next((f for f in self.fields if f["name"] == name), None)

    def field_names(self) -> list[str]:
        return [f["name"] for f in self.fields]

    def file_fields(self) -> list[dict[str, Any]]:
        return [f for f in self.fields if f["type"] == "file"]

    def rule(self, name: str) -> str | None:
        if name in AUTH_RULES:
            return self.options.get(name)
        return self.rules.get(name)

    def token_secret(self, kind: str) -> str:
        return self.options[kind]["secret"]

    def token_duration(self, kind: str) -> int:
        return int(self.options[kind]["duration"])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, **self.rules, "name": self.name, "type": self.type}
        out["fields"] = copy.deepcopy(self.fields)
        out.update(indexes=list(self.indexes), created=self.created, updated=self.updated, system=self.system)
        if self.is_auth:
            for key, value in self.options.items():
                if isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k != "secret"}
                out[key] = copy.deepcopy(value)
        return out


def _auth_fields() -> list[dict[str, Any]]:
    return [
        _id_field(),
        F.make_field("password", "password", system=True, hidden=True),
        F.make_field("text", "tokenKey", system=True, hidden=True, required=True, min=30, max=60,
                     autogeneratePattern="[a-zA-Z0-9]{50}"),
        F.make_field("email", "email", system=True, required=True),
        F.make_field("bool", "emailVisibility", system=True),
        F.make_field("bool", "verified", system=True),
    ]


def _id_field() -> dict[str, Any]:
    return F.make_field("text", "id", system=True, required=True, primaryKey=True, min=15, max=15,
                        pattern="^[a-z0-9]+$", autogeneratePattern="[a-z0-9]{15}")


def _autodate_fields(system: bool) -> list[dict[str, Any]]:
    return [
        F.make_field("autodate", "created", system=system, onCreate=True, onUpdate=False),
        F.make_field("autodate", "updated", system=system, onCreate=True, onUpdate=True),
    ]


def _auth_options(token_duration: int) -> dict[str, Any]:
    options = copy.deepcopy(AUTH_DEFAULTS)
    for key in _TOKEN_OPTIONS:
        options[key]["secret"] = random_string(50)
    options["authToken"]["duration"] = token_duration
    return options


def _auth_indexes(name: str, collection_id: str) -> list[str]:
    return [
        f"CREATE UNIQUE INDEX `idx_tokenKey_{collection_id}` ON `{name}` (`tokenKey`)",
        f"CREATE UNIQUE INDEX `idx_email_{collection_id}` ON `{name}` (`email`) WHERE `email` != ''",
    ]


def _system_collections() -> list[Collection]:
    stamp = now()
    superusers = Collection(
        id=SUPERUSERS_ID, name=SUPERUSERS, type="auth", system=True,
        fields=_auth_fields() + _autodate_fields(True),
        indexes=_auth_indexes(SUPERUSERS, SUPERUSERS_ID),
        options=_auth_options(86400), created=stamp, updated=stamp,
    )
    users = Collection(
        id=USERS_ID, name=USERS, type="auth", system=False,
        fields=_auth_fields()
        + [F.make_field("text", "name", max=255),
           F.make_field("file", "avatar", maxSelect=1, mimeTypes=["image/jpeg", "image/png", "image/svg+xml", "image/gif", "image/webp"])]
        + _autodate_fields(False),
        indexes=_auth_indexes(USERS, USERS_ID),
        rules={"listRule": "id = @request.auth.id", "viewRule": "id = @request.auth.id", "createRule": "",
               "updateRule": "id = @request.auth.id", "deleteRule": "id = @request.auth.id"},
        options=_auth_options(432000), created=stamp, updated=stamp,
    )
    return [superusers, users]


def _from_row(row: Any) -> Collection:
    return Collection(
        id=row["id"], name=row["name"], type=row["type"], system=bool(row["system"]),
        fields=json.loads(row["fields"]), indexes=json.loads(row["indexes"]),
        rules={rule: row[rule] for rule in RULES}, options=json.loads(row["options"]),
        created=row["created"], updated=row["updated"],
    )


def validate_rule(expression: Any, columns: Iterable[str]) -> dict[str, str] | None:
    """``None`` if ``expression`` is a rule we can enforce, else the field error to report."""
    if expression is None or expression == "":
        return None
    if not isinstance(expression, str):
        return field_error("validation_invalid_rule", "Must be null or a string.")
    try:
        filters.parse(expression, set(columns))
    except filters.FilterError as exc:
        return field_error("validation_invalid_rule", f"Invalid or unsupported rule: {exc}")
    return None


RESTORING_MESSAGE = "The collection is being restored; try again in a moment."


class CollectionStore:
    """The cached set of collections, and every change to them."""

    def __init__(self, db: Database, datadir: DataDir) -> None:
        self._db = db
        self._datadir = datadir
        self._by_id: dict[str, Collection] = {}
        self._by_name: dict[str, Collection] = {}  # lower-cased name -> the first collection of that name
        # Names (lower case) of the collections a partial restore is rewriting: their records and
        # definitions may not change meanwhile. Set with the database's writes paused, and checked
        # inside every write transaction, so no write to them commits after it is set.
        self.restoring: set[str] = set()

    def check_writable(self, collection: Collection) -> None:
        if collection.name.lower() in self.restoring:
            raise BadRequest(RESTORING_MESSAGE)

    async def bootstrap(self) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(SCHEMA)
            for collection in _system_collections():
                exists = await tx.fetchone("SELECT 1 FROM _collections WHERE id = ?", (collection.id,))
                if exists is None:
                    await self._insert(tx, collection)
                    await self._create_table(tx, collection)
        await self.reload()

    async def reload(self) -> None:
        rows = await self._db.fetchall("SELECT * FROM _collections ORDER BY created, name")
        by_id = {row["id"]: _from_row(row) for row in rows}
        by_name: dict[str, Collection] = {}
        for collection in by_id.values():
            by_name.setdefault(collection.name.lower(), collection)
        self._by_id, self._by_name = by_id, by_name

    def all(self) -> list[Collection]:
        return list(self._by_id.values())

    async def list_page(self, params: Mapping[str, str]) -> paging.Page:
        """A page of collections, with the records list's ``page``, ``perPage``, ``filter`` and
        ``sort`` parameters (sortable by their scalar keys)."""
        page, per_page = paging.parse(params)
        expression = params.get("filter", "").strip()
        try:
            found = await self.matching(expression) if expression else self.all()
        except filters.FilterError as exc:
            raise BadRequest(f"Invalid filter: {exc}") from exc
        items = [c.to_json() for c in found]
        # Sort keys apply last-first, so that the first one given is the primary order (stable sort).
        for key in reversed([k.strip() for k in params.get("sort", "").split(",") if k.strip()]):
            name = key.lstrip("-+")
            if name not in _SORTABLE:
                raise BadRequest(f"Invalid sort field {key!r}.")
            items.sort(key=lambda c: c[name], reverse=key.startswith("-"))
        chunk = items[(page - 1) * per_page : page * per_page]
        return paging.Page(page, per_page, len(items), paging.total_pages(len(items), per_page), chunk)

    async def matching(self, expression: str) -> list[Collection]:
        """The collections a filter expression selects (over their stored columns)."""
        node = filters.parse(expression, _FILTERABLE)
        condition, args = filters.to_sql(node, None)
        rows = await self._db.fetchall(f"SELECT id FROM _collections WHERE {condition}", args)
        wanted = {row["id"] for row in rows}
        return [c for c in self._by_id.values() if c.id in wanted]

    def find(self, id_or_name: str) -> Collection | None:
        found = self._by_id.get(id_or_name)
        if found is not None:
            return found
        return self._by_name.get(id_or_name.lower())

    def get(self, id_or_name: str) -> Collection:
        found = self.find(id_or_name)
        if found is None:
            raise NotFound()
        return found

    # --- changes -------------------------------------------------------------------------

    async def create(self, data: dict[str, Any]) -> Collection:
        kind = data.get("type") or "base"
        errors: dict[str, Any] = {}
        if kind not in ("base", "auth"):
            errors["type"] = field_error("validation_in_invalid", "Must be a valid value.")
            raise ValidationError(errors, "Failed to create collection.")
        collection_id = data.get("id") if isinstance(data.get("id"), str) and data.get("id") else None
        if collection_id is not None and (not _NAME_RE.match(collection_id) or len(collection_id) > 100):
            errors["id"] = field_error("validation_match_invalid", "Must be in a valid format.")
        elif collection_id is not None and collection_id in self._by_id:
            errors["id"] = field_error("validation_pk_invalid", "The model primary key is invalid or already exists.")
        if collection_id is None:
            collection_id = "pbc_" + str(zlib.crc32(f"{kind}{data.get('name')}".encode()))
            if collection_id in self._by_id:  # a name reused after a rename: fall back to a random id
                collection_id = "pbc_" + random_digits(10)
        stamp = now()
        base_fields = _auth_fields() if kind == "auth" else [_id_field()]
        candidate = Collection(id=collection_id, name="", type=kind, fields=base_fields, created=stamp, updated=stamp,
                               options=_auth_options(604800) if kind == "auth" else {})
        collection = self._apply(candidate, data, errors, creating=True)
        self.check_writable(collection)  # (a collection being restored from the backup, created again)
        async with self._db.transaction() as tx:
            self.check_writable(collection)
            await self._insert(tx, collection)
            await self._create_table(tx, collection)
        await self.reload()
        return self.get(collection.id)

    async def update(self, current: Collection, data: dict[str, Any]) -> Collection:
        errors: dict[str, Any] = {}
        if "type" in data and data["type"] != current.type:
            errors["type"] = field_error("validation_collection_type_change", "Collection type cannot be changed.")
        self.check_writable(current)
        updated = self._apply(copy.deepcopy(current), data, errors, creating=False)
        updated.updated = now()
        if updated.name.lower() in self.restoring:
            raise BadRequest(RESTORING_MESSAGE)
        async with self._db.transaction() as tx:
            self.check_writable(current)
            if updated.name.lower() in self.restoring:
                raise BadRequest(RESTORING_MESSAGE)
            await self._migrate(tx, current, updated)
            await tx.execute(
                "UPDATE _collections SET name=?, fields=?, indexes=?, listRule=?, viewRule=?, createRule=?, "
                "updateRule=?, deleteRule=?, options=?, updated=? WHERE id=?",
                (updated.name, json.dumps(updated.fields), json.dumps(updated.indexes),
                 *[updated.rules[r] for r in RULES], json.dumps(updated.options), updated.updated, updated.id),
            )
        await self.reload()
        return self.get(updated.id)

    async def delete(self, collection: Collection) -> None:
        if collection.system:
            raise ValidationError({}, "Failed to delete collection.")
        self.check_writable(collection)
        async with self._db.transaction() as tx:
            self.check_writable(collection)
            await tx.execute(f"DROP TABLE IF EXISTS {F.quote(collection.name)}")
            await tx.execute("DELETE FROM _collections WHERE id = ?", (collection.id,))
        await self.reload()
        target = self._datadir.storage / collection.id
        await asyncio.to_thread(shutil.rmtree, target, True)

    # --- helpers -------------------------------------------------------------------------

    def _apply(self, collection: Collection, data: dict[str, Any], errors: dict[str, Any], creating: bool) -> Collection:
        """Merge the client's ``data`` into ``collection``, validating everything; raise on errors."""
        message = "Failed to create collection." if creating else "Failed to update collection."
        if "name" in data or creating:
            name = data.get("name")
            if not isinstance(name, str) or not name:
                errors["name"] = field_error("validation_required", "Cannot be blank.")
            elif len(name) > 255 or not _NAME_RE.match(name) or name.lower().startswith("sqlite_") or name.lower() in _RESERVED_TABLES:
                errors["name"] = field_error("validation_match_invalid", "Must be in a valid format.")
            elif collection.system and name != collection.name:
                errors["name"] = field_error("validation_collection_system_name_change", "System collection name cannot be changed.")
            else:
                other = self.find(name)
                if other is not None and other.id != collection.id:
                    errors["name"] = field_error("validation_collection_name_exists", "Collection name must be unique (case insensitive).")
                collection.name = name

        if "fields" in data:
            self._apply_fields(collection, data["fields"], errors, creating)

        if "indexes" in data:
            indexes = data["indexes"]
            if not isinstance(indexes, list) or not all(isinstance(i, str) and re.match(r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s", i, re.I) for i in indexes):
                errors["indexes"] = field_error("validation_invalid_index", "Each index must be a CREATE INDEX statement.")
            else:
                required = _auth_indexes(collection.name, collection.id) if collection.is_auth else []
                collection.indexes = [i for i in required if i not in indexes] + list(indexes)

        columns = collection.field_names()
        for rule in RULES + (AUTH_RULES if collection.is_auth else ()):
            if rule not in data and "fields" not in data:
                continue
            # A changed field list re-checks every rule: a rule must not name a field that is gone.
            value = data[rule] if rule in data else collection.rule(rule)
            problem = validate_rule(value, columns)
            if problem is not None:
                errors[rule] = problem
            elif rule in AUTH_RULES:
                collection.options[rule] = value
            else:
                collection.rules[rule] = value

        if collection.is_auth:
            for key in _TOKEN_OPTIONS:
                if key in data:
                    duration = data[key].get("duration") if isinstance(data[key], dict) else None
                    if isinstance(duration, bool) or not isinstance(duration, int) or not 10 <= duration <= 31536000:
                        errors[key] = {"duration": field_error("validation_invalid_value", "Must be between 10 and 31536000 seconds.")}
                    else:
                        collection.options[key]["duration"] = duration
            if "passwordAuth" in data and isinstance(data["passwordAuth"], dict):
                enabled = data["passwordAuth"].get("enabled", True)
                collection.options["passwordAuth"]["enabled"] = bool(enabled)
        if errors:
            raise ValidationError(errors, message)
        return collection

    def _apply_fields(self, collection: Collection, raw_fields: Any, errors: dict[str, Any], creating: bool) -> None:
        if not isinstance(raw_fields, list):
            errors["fields"] = field_error("validation_invalid_value", "Must be a list of fields.")
            return
        existing = {f["id"]: f for f in collection.fields}
        by_name = {f["name"]: f for f in collection.fields}
        result: list[dict[str, Any]] = []
        field_errors: dict[str, Any] = {}
        # Error keys are indexes in the final list, where left-out system fields come first.
        mentioned = {str(r.get("id") or "") for r in raw_fields if isinstance(r, dict)} | {
            str(r.get("name") or "") for r in raw_fields if isinstance(r, dict)}
        offset = sum(1 for f in collection.fields if f.get("system") and f["id"] not in mentioned and f["name"] not in mentioned)
        for position, raw in enumerate(raw_fields):
            index = position + offset
            match = None
            if isinstance(raw, dict):
                match = existing.get(raw.get("id")) if raw.get("id") else None
                if match is None and not raw.get("id") and creating:
                    match = by_name.get(raw.get("name")) if by_name.get(raw.get("name"), {}).get("system") else None
            normalized, problems = F.normalize(raw, match)
            if problems:
                field_errors[str(index)] = problems
            elif normalized is not None:
                result.append(normalized)
        # System fields (id, and the auth ones) are kept even when the client leaves them out.
        kept_ids = {f["id"] for f in result}
        kept_names = {f["name"] for f in result}
        missing_system = [f for f in collection.fields
                          if f.get("system") and f["id"] not in kept_ids and f["name"] not in kept_names]
        result = missing_system + result
        names = [f["name"].lower() for f in result]
        for index, name in enumerate(names):
            if names.count(name) > 1:
                field_errors.setdefault(str(index), {})["name"] = field_error(
                    "validation_duplicated_field_name", "Duplicated or invalid field name."
                )
        if field_errors:
            errors["fields"] = field_errors
        collection.fields = result

    async def _insert(self, tx: Transaction, collection: Collection) -> None:
        await tx.execute(
            "INSERT INTO _collections (id, system, type, name, fields, indexes, listRule, viewRule, createRule, "
            "updateRule, deleteRule, options, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (collection.id, collection.system, collection.type, collection.name, json.dumps(collection.fields),
             json.dumps(collection.indexes), *[collection.rules[r] for r in RULES], json.dumps(collection.options),
             collection.created, collection.updated),
        )

    async def _create_table(self, tx: Transaction, collection: Collection) -> None:
        columns = ", ".join(F.column_definition(f) for f in collection.fields)
        await tx.execute(f"CREATE TABLE {F.quote(collection.name)} ({columns})")
        await self._create_indexes(tx, collection)

    async def _create_indexes(self, tx: Transaction, collection: Collection) -> None:
        for statement in collection.indexes:
            try:
                await tx.execute(statement)
            except sqlite3.Error as exc:
                raise ValidationError(
                    {"indexes": field_error("validation_invalid_index", f"Invalid index: {exc}.")},
                    "Failed to save collection.",
                ) from exc

    async def _migrate(self, tx: Transaction, old: Collection, new: Collection) -> None:
        table = F.quote(old.name)
        index_rows = await tx.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (old.name,)
        )
        for row in index_rows:
            await tx.execute(f"DROP INDEX IF EXISTS {F.quote(row['name'])}")
        if old.name != new.name:
            if old.name.lower() == new.name.lower():  # SQLite names are case-insensitive: go via a temp name
                await tx.execute(f"ALTER TABLE {table} RENAME TO {F.quote('_tmp_' + old.id)}")
                table = F.quote("_tmp_" + old.id)
            await tx.execute(f"ALTER TABLE {table} RENAME TO {F.quote(new.name)}")
            table = F.quote(new.name)
        old_by_id = {f["id"]: f for f in old.fields}
        new_ids = {f["id"] for f in new.fields}
        for field in old.fields:
            if field["id"] not in new_ids:
                await tx.execute(f"ALTER TABLE {table} DROP COLUMN {F.quote(field['name'])}")
        # Renames go through temporary names, so that two fields may swap names.
        renamed = [f for f in new.fields if f["id"] in old_by_id and old_by_id[f["id"]]["name"] != f["name"]]
        for index, field in enumerate(renamed):
            await tx.execute(f"ALTER TABLE {table} RENAME COLUMN {F.quote(old_by_id[field['id']]['name'])} TO {F.quote(f'_tmp_{index}')}")
        for index, field in enumerate(renamed):
            await tx.execute(f"ALTER TABLE {table} RENAME COLUMN {F.quote(f'_tmp_{index}')} TO {F.quote(field['name'])}")
        for field in new.fields:
            before = old_by_id.get(field["id"])
            if before is None:
                await tx.execute(f"ALTER TABLE {table} ADD COLUMN {F.column_definition(field)}")
                continue
            column = F.quote(field["name"])
            if F.is_multiple(before) and not F.is_multiple(field):
                await tx.execute(
                    f"UPDATE {table} SET {column} = COALESCE(json_extract({column}, '$[#-1]'), '') "
                    f"WHERE json_valid({column}) AND json_type({column}) = 'array'"
                )
            elif not F.is_multiple(before) and F.is_multiple(field):
                await tx.execute(
                    f"UPDATE {table} SET {column} = CASE WHEN {column} = '' THEN '[]' ELSE json_array({column}) END"
                )
        if old.name != new.name:
            new.indexes = [_INDEX_TABLE_RE.sub(lambda m: f"{m.group(1)}`{new.name}`", i, count=1) for i in new.indexes]
        await self._create_indexes(tx, new)
