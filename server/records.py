"""Records of a collection: value validation, access rules, files, and the CRUD itself."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, BinaryIO

from . import auth as tokens
from . import fields as F
from . import paging
from . import values as V
from .collections import Collection, CollectionStore
from .database import Database, Transaction
from .datadir import DataDir
from .errors import BadRequest, Forbidden, NotFound, ValidationError
from .tools import filter as filters
from .tools import mimetypes
from .tools.security import random_id, random_string
from .tools.times import now

_SORT_RE = re.compile(r"^([+-]?)(\w+)$")


@dataclass(frozen=True)
class Requester:
    """Who makes a request: nobody, a superuser, or a record of an auth collection."""

    record: dict[str, Any] | None = None
    collection: Collection | None = None

    @property
    def is_superuser(self) -> bool:
        return self.collection is not None and self.collection.is_superusers

    def rule_context(self) -> dict[str, Any] | None:
        if self.record is None or self.collection is None:
            return None
        return {**self.record, "collectionId": self.collection.id, "collectionName": self.collection.name}


GUEST = Requester()


@dataclass
class IncomingFile:
    """An uploaded file, already spooled by the HTTP layer: read it from ``stream``."""

    filename: str
    size: int
    stream: BinaryIO
    mime_type: str = ""  # sniffed from the content by ``_sniff`` before validation


def _sniff(uploads: list[IncomingFile]) -> None:
    """Detect each upload's mime type from its first bytes (blocking: run in a worker thread)."""
    for upload in uploads:
        upload.stream.seek(0)
        upload.mime_type = mimetypes.detect(upload.stream.read(mimetypes.SNIFF_LENGTH))
        upload.stream.seek(0)


@dataclass
class RecordInput:
    data: dict[str, Any] = dataclass_field(default_factory=dict)
    files: dict[str, list[IncomingFile]] = dataclass_field(default_factory=dict)
    from_form: bool = False  # multipart/urlencoded: every value arrived as a string



def _file_name(original: str) -> str:
    """``<snake_name>_<random>.<ext>`` as PocketBase names stored files."""
    base, ext = os.path.splitext(os.path.basename(original.replace("\\", "/")))
    ext = re.sub(r"[^a-z0-9.]", "", ext.lower())[:20]
    base = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")[:100]
    if len(base) < 3:
        base = random_string(10, "abcdefghijklmnopqrstuvwxyz0123456789")
    return f"{base}_{random_string(10, 'abcdefghijklmnopqrstuvwxyz0123456789')}{ext}"


class RecordService:
    def __init__(self, db: Database, collections: CollectionStore, datadir: DataDir) -> None:
        self._db = db
        self._collections = collections
        self._datadir = datadir

    # --- reading ---------------------------------------------------------------------------

    async def list_page(self, collection: Collection, requester: Requester, params: Mapping[str, str]) -> paging.Page:
        rule = collection.rule("listRule")
        if rule is None and not requester.is_superuser:
            raise Forbidden("Only superusers can perform this action.")
        page, per_page = paging.parse(params)
        columns = set(collection.field_names())
        where, args = self._rule_sql(collection, requester, "listRule")
        raw_filter = params.get("filter", "")
        if raw_filter.strip():
            try:
                node = filters.parse(raw_filter, columns - _hidden_names(collection))
            except filters.FilterError as exc:
                raise BadRequest(f"Invalid filter: {exc}") from exc
            sql, filter_args = filters.to_sql(node, requester.rule_context())
            where, args = f"({where}) AND {sql}", args + filter_args
        order = self._order_by(params.get("sort", ""), columns - _hidden_names(collection))
        table = F.quote(collection.name)
        skip_total = params.get("skipTotal", "").lower() in V.TRUE
        offset = (page - 1) * per_page
        rows = await self._db.fetchall(
            f"SELECT * FROM {table} WHERE {where} {order} LIMIT ? OFFSET ?", args + [per_page, offset]
        )
        if skip_total:
            total_items = total_pages = -1
        else:
            total_items = int(await self._db.scalar(f"SELECT COUNT(*) FROM {table} WHERE {where}", args))
            total_pages = paging.total_pages(total_items, per_page)
        items = [self.to_json(collection, row, requester) for row in rows]
        return paging.Page(page, per_page, total_items, total_pages, pick_fields(items, params.get("fields")))

    async def view(self, collection: Collection, record_id: str, requester: Requester) -> dict[str, Any]:
        if collection.rule("viewRule") is None and not requester.is_superuser:
            raise Forbidden("Only superusers can perform this action.")
        row = await self._fetch_allowed(collection, record_id, requester, "viewRule")
        return self.to_json(collection, row, requester)

    async def find_row(self, collection: Collection, record_id: str) -> sqlite3.Row | None:
        return await self._db.fetchone(f"SELECT * FROM {F.quote(collection.name)} WHERE id = ?", (record_id,))

    async def find_auth_row(self, collection: Collection, identity: str) -> sqlite3.Row | None:
        identity_fields = collection.options.get("passwordAuth", {}).get("identityFields") or ["email"]
        for name in identity_fields:
            if collection.field(name) is None:
                continue
            row = await self._db.fetchone(
                f"SELECT * FROM {F.quote(collection.name)} WHERE {F.quote(name)} = ? COLLATE NOCASE", (identity,)
            )
            if row is not None:
                return row
        return None

    async def find_by_token(self, token: str, kind: str) -> Requester:
        """The auth record behind an auth (``kind="auth"``) or file token; a guest if the token is
        missing, malformed, expired, or signed with a key that no longer exists (password changed,
        record deleted)."""
        peek, verify = (tokens.peek_auth_token, tokens.verify_auth_token) if kind == "auth" else (
            tokens.peek_file_token, tokens.verify_file_token)
        claims = peek(token) if token else None
        if claims is None:
            return GUEST
        collection = self._collections.find(claims.collection_id)
        if collection is None or not collection.is_auth or collection.id != claims.collection_id:
            return GUEST
        row = await self.find_row(collection, claims.record_id)
        if row is None or not verify(token, collection, row["tokenKey"]):
            return GUEST
        return Requester(record=dict(row), collection=collection)

    async def can_access(self, collection: Collection, record_id: str, requester: Requester, rule_name: str) -> bool:
        try:
            await self._fetch_allowed(collection, record_id, requester, rule_name)
        except NotFound:
            return False
        return True

    # --- writing ---------------------------------------------------------------------------

    async def create(self, collection: Collection, payload: RecordInput, requester: Requester) -> dict[str, Any]:
        rule = collection.rule("createRule")
        if rule is None and not requester.is_superuser:
            raise Forbidden("Only superusers can perform this action.")
        self._collections.check_writable(collection)
        values, pending, errors = await self._prepare(collection, payload, requester, None)
        if errors:
            raise ValidationError(errors, "Failed to create record.")
        if rule and not requester.is_superuser and not await self._candidate_matches(collection, rule, values, requester):
            raise BadRequest("Failed to create record.")
        written = await self._write_files(collection, values["id"], pending)
        columns = ", ".join(F.quote(k) for k in values)
        marks = ", ".join("?" for _ in values)
        try:
            # One statement, atomic on its own, that also gives the row as stored: one trip. The
            # partial restore's guard is checked under the write lock, just before it.
            rows = await self._db.execute_returning(
                f"INSERT INTO {F.quote(collection.name)} ({columns}) VALUES ({marks}) RETURNING *",
                [V.to_sql(v) for v in values.values()],
                lambda: self._collections.check_writable(collection),
            )
        except sqlite3.IntegrityError as exc:
            await asyncio.to_thread(_remove_files, written)
            raise _unique_error(exc, "Failed to create record.") from exc
        except BaseException:
            await asyncio.to_thread(_remove_files, written)
            raise
        return self.to_json(collection, rows[0], requester)

    async def update(self, collection: Collection, record_id: str, payload: RecordInput, requester: Requester) -> dict[str, Any]:
        if collection.rule("updateRule") is None and not requester.is_superuser:
            raise Forbidden("Only superusers can perform this action.")
        self._collections.check_writable(collection)
        current = await self._fetch_allowed(collection, record_id, requester, "updateRule")
        values, pending, errors = await self._prepare(collection, payload, requester, current)
        if errors:
            raise ValidationError(errors, "Failed to update record.")
        written = await self._write_files(collection, record_id, pending)
        try:
            async with self._db.transaction() as tx:
                self._collections.check_writable(collection)
                assignments = ", ".join(f"{F.quote(k)} = ?" for k in values)
                await tx.execute(
                    f"UPDATE {F.quote(collection.name)} SET {assignments} WHERE id = ?",
                    [V.to_sql(v) for v in values.values()] + [record_id],
                )
        except sqlite3.IntegrityError as exc:
            await asyncio.to_thread(_remove_files, written)
            raise _unique_error(exc, "Failed to update record.") from exc
        except BaseException:
            await asyncio.to_thread(_remove_files, written)
            raise
        await self._delete_replaced_files(collection, current, values)
        row = await self.find_row(collection, record_id)
        assert row is not None
        return self.to_json(collection, row, requester)

    async def delete(self, collection: Collection, record_id: str, requester: Requester) -> None:
        if collection.rule("deleteRule") is None and not requester.is_superuser:
            raise Forbidden("Only superusers can perform this action.")
        self._collections.check_writable(collection)
        await self._fetch_allowed(collection, record_id, requester, "deleteRule")
        if collection.is_superusers and int(await self._db.scalar(f"SELECT COUNT(*) FROM {F.quote(collection.name)}")) <= 1:
            raise BadRequest("You can't delete the only existing superuser.")
        async with self._db.transaction() as tx:
            self._collections.check_writable(collection)
            await tx.execute(f"DELETE FROM {F.quote(collection.name)} WHERE id = ?", (record_id,))
        target = self._datadir.record_dir(collection.id, record_id)
        await asyncio.to_thread(shutil.rmtree, target, True)

    async def set_password(self, collection: Collection, record_id: str, password: str) -> None:
        hashed = await tokens.hash_password(password)
        async with self._db.transaction() as tx:
            self._collections.check_writable(collection)
            await tx.execute(
                f"UPDATE {F.quote(collection.name)} SET password = ?, tokenKey = ?, updated = ? WHERE id = ?",
                (hashed, tokens.new_token_key(), now(), record_id),
            )

    async def insert_auth_record(self, collection: Collection, email: str, password: str) -> str:
        """Create an auth record directly (the CLI's superuser upsert); returns its id."""
        values = self._defaults(collection)
        values.update(id=random_id(), email=email, password=await tokens.hash_password(password),
                      tokenKey=tokens.new_token_key(), verified=True)
        async with self._db.transaction() as tx:
            self._collections.check_writable(collection)
            await self._insert(tx, collection, values)
        return values["id"]

    # --- serialisation ---------------------------------------------------------------------

    def to_json(self, collection: Collection, row: sqlite3.Row | Mapping[str, Any], requester: Requester) -> dict[str, Any]:
        out: dict[str, Any] = {"collectionId": collection.id, "collectionName": collection.name}
        show_email = True
        if collection.is_auth:
            is_owner = requester.record is not None and requester.collection is not None \
                and requester.collection.id == collection.id and requester.record.get("id") == row["id"]
            show_email = bool(row["emailVisibility"]) or requester.is_superuser or is_owner
        for field in collection.fields:
            if field.get("hidden") or (field["name"] == "email" and collection.is_auth and not show_email):
                continue
            out[field["name"]] = V.decode(field, row[field["name"]])
        return dict(sorted(out.items()))

    # --- internals -------------------------------------------------------------------------

    def _rule_sql(self, collection: Collection, requester: Requester, rule_name: str) -> tuple[str, list[Any]]:
        rule = collection.rule(rule_name)
        if requester.is_superuser or rule == "":
            return "1", []
        if rule is None:
            return "0", []
        node = filters.parse(rule, set(collection.field_names()))
        return filters.to_sql(node, requester.rule_context())

    async def _fetch_allowed(self, collection: Collection, record_id: str, requester: Requester, rule_name: str) -> sqlite3.Row:
        where, args = self._rule_sql(collection, requester, rule_name)
        row = await self._db.fetchone(
            f"SELECT * FROM {F.quote(collection.name)} WHERE id = ? AND {where}", [record_id, *args]
        )
        if row is None:
            raise NotFound()
        return row

    def _order_by(self, raw: str, columns: set[str]) -> str:
        parts = []
        for item in (p.strip() for p in raw.split(",")):
            if not item:
                continue
            if item == "@random":
                parts.append("RANDOM()")
                continue
            match = _SORT_RE.match(item)
            if match is None or match.group(2) not in columns:
                raise BadRequest(f"Invalid sort field {item!r}.")
            parts.append(f"{F.quote(match.group(2))} {'DESC' if match.group(1) == '-' else 'ASC'}")
        parts.append("rowid ASC")
        return "ORDER BY " + ", ".join(parts)

    async def _candidate_matches(self, collection: Collection, rule: str, values: dict[str, Any], requester: Requester) -> bool:
        node = filters.parse(rule, set(collection.field_names()))
        condition, args = filters.to_sql(node, requester.rule_context(), table_alias="candidate")
        projection = ", ".join(f"? AS {F.quote(name)}" for name in values)
        row = await self._db.fetchone(
            f"SELECT 1 FROM (SELECT {projection}) AS candidate WHERE {condition}",
            [V.to_sql(v) for v in values.values()] + args,
        )
        return row is not None

    def _defaults(self, collection: Collection) -> dict[str, Any]:
        values: dict[str, Any] = {}
        stamp = now()
        for field in collection.fields:
            kind = field["type"]
            if kind == "autodate":
                values[field["name"]] = stamp
            elif kind == "number":
                values[field["name"]] = 0
            elif kind == "bool":
                values[field["name"]] = False
            elif kind == "json":
                values[field["name"]] = None
            elif F.is_multiple(field):
                values[field["name"]] = []
            else:
                values[field["name"]] = ""
        return values

    async def _prepare(
        self, collection: Collection, payload: RecordInput, requester: Requester, current: sqlite3.Row | None
    ) -> tuple[dict[str, Any], list[tuple[str, IncomingFile]], dict[str, Any]]:
        """Validate ``payload`` against ``collection``. Returns the column values to write (all of
        them on create, the changed ones on update), the files to store, and the errors."""
        creating = current is None
        data = payload.data
        uploads: list[IncomingFile] = [upload for group in payload.files.values() for upload in group]
        if uploads:
            await asyncio.to_thread(_sniff, uploads)
        errors: dict[str, Any] = {}
        if creating:
            values = self._defaults(collection)
        else:
            values = {f["name"]: V.decode(f, current[f["name"]]) for f in collection.fields}
        changed: set[str] = set()
        pending: list[tuple[str, IncomingFile]] = []
        stamp = now()

        for field in collection.fields:
            name, kind = field["name"], field["type"]
            if kind == "autodate":
                if creating and field.get("onCreate") or not creating and field.get("onUpdate"):
                    values[name] = stamp
                    changed.add(name)
                continue
            if kind == "password" or name == "tokenKey":
                continue
            if name == "id":
                if creating and data.get("id") not in (None, ""):
                    problem = V.check_id(data["id"])
                    if problem:
                        errors["id"] = problem
                    else:
                        values["id"] = data["id"]
                elif creating:
                    values["id"] = random_id()
                continue
            if collection.is_auth and name == "verified" and "verified" in data and not requester.is_superuser:
                if V.truthy(data["verified"]) and not values["verified"]:
                    errors["verified"] = V.error("validation_values_mismatch", "Only superusers can change the verified state.")
                    continue
            if kind == "file":
                problem = self._prepare_file(field, data, payload.files, values, pending)
                if problem:
                    errors[name] = problem
                elif any(k in data for k in (name, name + "+", name + "-")) or any(
                    k in payload.files for k in (name, name + "+")
                ):
                    changed.add(name)
                if field.get("required") and not values[name] and name not in errors:
                    errors[name] = V.error("validation_required", "Cannot be blank.")
                continue
            present = name in data or (kind == "select" and F.is_multiple(field) and (name + "+" in data or name + "-" in data))
            if present:
                value, problem = V.coerce(field, data, values[name], payload.from_form)
                if problem:
                    errors[name] = problem
                    continue
                values[name] = value
                changed.add(name)
            problem = V.validate(field, values[name])
            if problem and (present or creating):
                errors[name] = problem

        if collection.is_auth:
            await self._prepare_password(data, values, errors, changed, creating)
        if errors:
            return values, pending, errors
        if not creating:
            values = {k: v for k, v in values.items() if k in changed}
        for unique in ("email",) if collection.is_auth else ():
            if unique in values and values[unique]:
                duplicate = await self._db.fetchone(
                    f"SELECT id FROM {F.quote(collection.name)} WHERE email = ? COLLATE NOCASE AND id != ?",
                    (values[unique], "" if creating else current["id"]),
                )
                if duplicate is not None:
                    errors[unique] = V.error("validation_not_unique", "Value must be unique.")
        if creating and "id" in values and "id" not in errors:
            if await self.find_row(collection, values["id"]) is not None:
                errors["id"] = V.error("validation_not_unique", "Value must be unique.")
        return values, pending, errors

    async def _prepare_password(self, data: dict[str, Any], values: dict[str, Any], errors: dict[str, Any],
                                changed: set[str], creating: bool) -> None:
        password = data.get("password")
        if not creating and password in (None, ""):
            return
        if not isinstance(password, str) or password == "":
            errors["password"] = V.error("validation_required", "Cannot be blank.")
        elif len(password) < 8:
            errors["password"] = V.error("validation_min_text_constraint", "Must be at least 8 character(s).", min=8)
        elif len(password.encode()) > tokens.MAX_PASSWORD_BYTES:
            errors["password"] = V.error("validation_max_text_constraint", "Must be no more than 71 bytes.", max=71)
        confirm = data.get("passwordConfirm")
        if confirm in (None, ""):
            errors["passwordConfirm"] = V.error("validation_required", "Cannot be blank.")
        elif confirm != password:
            errors["passwordConfirm"] = V.error("validation_values_mismatch", "Values don't match.")
        if errors:
            return
        values["password"] = await tokens.hash_password(password)
        values["tokenKey"] = tokens.new_token_key()
        changed.update(("password", "tokenKey"))

    def _prepare_file(self, field: dict[str, Any], data: dict[str, Any], files: dict[str, list[IncomingFile]],
                      values: dict[str, Any], pending: list[tuple[str, IncomingFile]]) -> dict[str, Any] | None:
        name = field["name"]
        multiple = F.is_multiple(field)
        existing = list(values[name]) if multiple else ([values[name]] if values[name] else [])
        kept = existing
        if name in data:
            given = data[name]
            given_list = [] if given in (None, "") else (given if isinstance(given, list) else [given])
            if not all(isinstance(g, str) for g in given_list):
                return V.error("validation_invalid_value", "Must be a list of existing file names.")
            unknown = [g for g in given_list if g not in existing]
            if unknown:
                return V.error("validation_invalid_value", f"Unknown file {unknown[0]!r}.")
            kept = given_list
        elif name in files:
            kept = []  # uploads under the plain name replace the current files; `name+` appends
        removed = data.get(name + "-")
        if removed is not None:
            removed_list = removed if isinstance(removed, list) else [removed]
            kept = [k for k in kept if k not in removed_list]
        uploads = list(files.get(name, [])) + list(files.get(name + "+", []))
        max_size = F.max_file_size(field)
        allowed = field.get("mimeTypes") or []
        new_names: list[str] = []
        for upload in uploads:
            if upload.size > max_size:
                return V.error("validation_file_size_limit",
                              f"Failed to upload {os.path.basename(upload.filename)} - the maximum allowed file size is {max_size} bytes.",
                              maxSize=max_size)
            if allowed:
                detected = upload.mime_type
                if not mimetypes.matches(detected, allowed):
                    return V.error("validation_invalid_mime_type",
                                  f"{os.path.basename(upload.filename)!r} ({detected.split(';')[0]}) mime type must be one of: {', '.join(allowed)}.")
            stored = _file_name(upload.filename)
            new_names.append(stored)
            pending.append((stored, upload))
        result = kept + new_names
        limit = int(field.get("maxSelect") or 1)
        if len(result) > limit:
            pending[len(pending) - len(new_names):] = []
            return V.error("validation_max_select_constraint", f"Select no more than {limit}.", maxSelect=limit)
        values[name] = result if multiple else (result[0] if result else "")
        return None

    async def _write_files(self, collection: Collection, record_id: str, pending: list[tuple[str, IncomingFile]]) -> list[Path]:
        if not pending:
            return []
        directory = self._datadir.record_dir(collection.id, record_id)
        return await asyncio.to_thread(_store_files, directory, pending)

    async def _delete_replaced_files(self, collection: Collection, current: sqlite3.Row, values: dict[str, Any]) -> None:
        stale: list[Path] = []
        directory = self._datadir.record_dir(collection.id, current["id"])
        for field in collection.file_fields():
            if field["name"] not in values:
                continue
            before = V.decode(field, current[field["name"]])
            after = values[field["name"]]
            before_set = set(before if isinstance(before, list) else [before] if before else [])
            after_set = set(after if isinstance(after, list) else [after] if after else [])
            stale.extend(directory / name for name in before_set - after_set)
        if stale:
            await asyncio.to_thread(_remove_files, stale)

    async def _insert(self, tx: Transaction, collection: Collection, values: dict[str, Any]) -> None:
        columns = ", ".join(F.quote(k) for k in values)
        marks = ", ".join("?" for _ in values)
        try:
            await tx.execute(
                f"INSERT INTO {F.quote(collection.name)} ({columns}) VALUES ({marks})",
                [V.to_sql(v) for v in values.values()],
            )
        except sqlite3.IntegrityError as exc:
            raise _unique_error(exc, "Failed to create record.") from exc


def _store_files(directory: Path, pending: list[tuple[str, IncomingFile]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for name, upload in pending:
            target = directory / name
            upload.stream.seek(0)
            with open(target, "xb") as out:
                written.append(target)
                shutil.copyfileobj(upload.stream, out, 1 << 20)
    except BaseException:
        _remove_files(written)
        raise
    return written


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _unique_error(exc: sqlite3.IntegrityError, message: str) -> ValidationError:
    match = re.search(r"UNIQUE constraint failed: \w+\.(\w+)", str(exc))
    column = match.group(1) if match else "id"
    return ValidationError({column: V.error("validation_not_unique", "Value must be unique.")}, message)


def _hidden_names(collection: Collection) -> set[str]:
    return {f["name"] for f in collection.fields if f.get("hidden")}



def pick_fields(items: list[dict[str, Any]], raw: str | None) -> list[dict[str, Any]]:
    if not raw or "*" in raw.split(","):
        return items
    wanted = {name.strip() for name in raw.split(",") if name.strip()}
    return [{k: v for k, v in item.items() if k in wanted} for item in items]
