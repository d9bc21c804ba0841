"""The backup catalog: what each backup holds, the facts kept beside the backups, and retention.

- ``describe_archive`` reads a backup's facts from its zip directory and our manifest only (a
  few ranged GETs on S3), never from the whole archive.
- ``CatalogFile`` is the store's own small file ``.pb_catalog.json``, kept *with the backups* (in
  ``pb_data/backups`` or the bucket), so that pins and the facts of uploads survive a restart and
  a full restore, which replaces ``pb_data``. It holds, per key, ``pinned`` and ``createdBy`` (for
  what the manifest cannot say: an upload), and the last successful jobs.
- ``retained`` is restic's ``forget --keep-last/--keep-daily/--keep-weekly/--keep-monthly``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO

from ..storage import FileInfo, Storage, StorageError
from ..tools.times import format_datetime
from . import archive

logger = logging.getLogger("server.backups")

CATALOG_FILE = ".pb_catalog.json"
CATALOG_FORMAT = 1
MAX_CATALOG_SIZE = 16 << 20
MAX_MANIFEST_SIZE = 64 << 20
RETENTION_KEYS = ("keepLast", "keepDaily", "keepWeekly", "keepMonthly")
CREATOR_KINDS = ("superuser", "scheduler", "cli", "upload", "pre-restore")
AGE_MAGIC = b"age-encryption.org/v1\n"  # an age file (issue 17): its zip directory is not readable


class CatalogError(StorageError):
    """The catalog file cannot be read (the message is safe to show)."""


# --- what one backup holds ------------------------------------------------------------------


def describe_archive(handle: BinaryIO) -> dict[str, Any]:
    """The facts of the backup in ``handle`` (seekable), from its zip directory and manifest.

    Blocking. Raises ``archive.ArchiveError`` if it is not a readable zip."""
    head = handle.read(len(AGE_MAGIC))
    if head == AGE_MAGIC:
        return {"format": None, "encrypted": True, "createdAt": None, "appName": None, "serverVersion": None,
                "databases": None, "files": None, "collections": None, "createdBy": None}
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as zipped:
            infos = zipped.infolist()
            manifest = _manifest(zipped, infos)
    except archive.ArchiveError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        raise archive.ArchiveError("the file is not a readable zip archive") from exc
    databases: dict[str, int] = {}
    count = size = 0
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename
        if name in archive.DATABASES:
            databases[name] = info.file_size
        elif name.startswith("storage/"):
            count += 1
            size += info.file_size
    facts: dict[str, Any] = {"format": "manifest" if manifest is not None else "plain", "encrypted": False,
                             "databases": databases, "files": {"count": count, "bytes": size}}
    if manifest is not None:
        collections = manifest.get("collections")
        facts.update(createdAt=_text(manifest.get("createdAt")), appName=_text(manifest.get("app")),
                     serverVersion=_text(manifest.get("serverVersion")),
                     createdBy=creator(manifest.get("createdBy")),
                     collections=collections if isinstance(collections, dict) else None)
    else:
        data_db = next((info for info in infos if info.filename == "data.db"), None)
        facts.update(createdAt=_entry_time(data_db), appName=None, serverVersion=None, createdBy=None,
                     collections=None)
    return facts


def _manifest(zipped: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> dict[str, Any] | None:
    info = next((i for i in reversed(infos) if i.filename == archive.MANIFEST), None)
    if info is None:
        return None
    if info.file_size > MAX_MANIFEST_SIZE:
        raise archive.ArchiveError("the archive manifest is too large")
    try:
        manifest = json.loads(zipped.read(info))
    except Exception as exc:
        raise archive.ArchiveError("the archive manifest is not readable") from exc
    return manifest if isinstance(manifest, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def creator(value: Any) -> dict[str, Any] | None:
    """A well-formed ``createdBy`` (``kind``, with ``id`` and ``email`` for a superuser), else None."""
    if not isinstance(value, dict) or value.get("kind") not in CREATOR_KINDS:
        return None
    out: dict[str, Any] = {"kind": value["kind"]}
    for name in ("id", "email"):
        if isinstance(value.get(name), str) and value[name]:
            out[name] = value[name]
    return out


def _entry_time(info: zipfile.ZipInfo | None) -> str | None:
    """When a plain zip's ``data.db`` was written: the extended timestamp (UTC) where the zip has
    one (Go's writer, PocketBase's, does), else its MS-DOS time, taken as UTC."""
    if info is None:
        return None
    extra = info.extra
    while len(extra) >= 4:
        tag, length = struct.unpack("<HH", extra[:4])
        body = extra[4:4 + length]
        if tag == 0x5455 and len(body) >= 5 and body[0] & 1:
            return format_datetime(datetime.fromtimestamp(struct.unpack("<I", body[1:5])[0], timezone.utc))
        extra = extra[4 + length:]
    try:
        return format_datetime(datetime(*info.date_time, tzinfo=timezone.utc))
    except ValueError:
        return None


def kind_by_name(key: str) -> dict[str, Any] | None:
    """What a backup's name tells of its maker, where nothing else does."""
    from .manager import AUTO_PREFIX, PRE_RESTORE_PREFIX

    if key.startswith(AUTO_PREFIX):
        return {"kind": "scheduler"}
    if key.startswith(PRE_RESTORE_PREFIX):
        return {"kind": "pre-restore"}
    return None


# --- the catalog file -----------------------------------------------------------------------


@dataclass
class Catalog:
    backups: dict[str, dict[str, Any]]
    last_success: dict[str, Any] | None = None  # {op, key, finishedAt}
    last_backup: dict[str, Any] | None = None  # the last successful backup: {key, finishedAt}
    stale_alerted: str | None = None  # the lastBackup finishedAt (or "never") a stale alert was sent for

    def pinned(self, key: str) -> bool:
        return bool(self.backups.get(key, {}).get("pinned"))

    def to_json(self) -> dict[str, Any]:
        return {"format": CATALOG_FORMAT, "backups": self.backups, "lastSuccess": self.last_success,
                "lastBackup": self.last_backup, "staleAlerted": self.stale_alerted}

    @classmethod
    def parse(cls, data: bytes | None) -> "Catalog":
        if not data:
            return cls({})
        try:
            raw = json.loads(data)
            backups = raw.get("backups") or {}
            assert isinstance(backups, dict)
            backups = {key: value for key, value in backups.items() if isinstance(value, dict)}
        except Exception as exc:
            raise CatalogError("the backup catalog file is not readable") from exc
        return cls(backups, _dict_or_none(raw.get("lastSuccess")), _dict_or_none(raw.get("lastBackup")),
                   raw.get("staleAlerted") if isinstance(raw.get("staleAlerted"), str) else None)


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


class CatalogFile:
    """``Catalog`` in a store: read at each use (another process, the CLI, may have changed it),
    changed under a lock, written whole and atomically."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # held by each change, and by a prune while it deletes (pins wait)

    async def read(self, storage: Storage) -> Catalog:
        data = await storage.read_meta(CATALOG_FILE)
        if data is not None and len(data) > MAX_CATALOG_SIZE:
            raise CatalogError("the backup catalog file is too large")
        return Catalog.parse(data)

    async def change(self, storage: Storage, edit: Callable[[Catalog], Any]) -> Catalog:
        async with self.lock:
            return await self.change_locked(storage, edit)

    async def change_locked(self, storage: Storage, edit: Callable[[Catalog], Any]) -> Catalog:
        """``change`` for a caller that holds ``lock``."""
        catalog = await self.read(storage)
        edit(catalog)
        await storage.write_meta(CATALOG_FILE, json.dumps(catalog.to_json(), indent=1, sort_keys=True).encode())
        return catalog


# --- retention ------------------------------------------------------------------------------


def retention_set(retention: Any) -> bool:
    return isinstance(retention, dict) and any(int(retention.get(name) or 0) > 0 for name in RETENTION_KEYS)


def retained(backups: Iterable[tuple[FileInfo, datetime]], retention: dict[str, Any]) -> set[str]:
    """The keys that restic's ``forget`` would keep: the newest ``keepLast``, and the newest backup
    of each of the last ``keepDaily`` days, ``keepWeekly`` ISO weeks and ``keepMonthly`` months that
    have a backup (in UTC). ``backups``: each with the time it was made."""
    newest_first = sorted(backups, key=lambda item: item[1], reverse=True)
    keep: set[str] = set()
    last = int(retention.get("keepLast") or 0)
    keep.update(info.key for info, _ in newest_first[:last])
    buckets: list[tuple[str, Callable[[datetime], tuple[int, ...]]]] = [
        ("keepDaily", lambda t: (t.year, t.month, t.day)),
        ("keepWeekly", lambda t: tuple(t.isocalendar())[:2]),
        ("keepMonthly", lambda t: (t.year, t.month)),
    ]
    for name, bucket in buckets:
        wanted = int(retention.get(name) or 0)
        seen: set[tuple[int, ...]] = set()
        for info, made in newest_first:
            if len(seen) >= wanted:
                break
            period = bucket(made.astimezone(timezone.utc))
            if period not in seen:
                seen.add(period)
                keep.add(info.key)
    return keep
