"""Partial restore: chosen collections of a backup, merged into or replacing the current ones,
while the server keeps serving (CONTRACT.md, "Partial restore").

The job, step by step (``run``):

1. The backup's ``data.db`` is extracted into ``pb_data/.pb_partial_restore/`` with every check
   of a full restore (``archive.extract``: safe entries, manifest SHA-256, database check); then
   the files of the chosen collections (``storage/<collectionId>/...``), the same way.
2. The chosen collections are resolved against the backup and the current data (``Target``).
   A real run now refuses writes to them (``CollectionStore.restoring``, set with the writers
   paused and checked inside every write transaction, so nothing that commits later is lost).
3. The summary is counted (SQL over the live table and the backup's, ``ATTACH``ed read-only),
   from the moment data.db is verified, beside the rest of the extraction. For a ``replace``,
   the two tables' pages are compared first (``tools.sqlite_pages``; the live WAL checkpointed
   once the collections refuse writes: ``_count_records``): rows on leaves identical in both files are
   unchanged without being decoded, and only the other rowid ranges are walked record by record.
4. Each collection is rebuilt beside the live one, in a shadow table of ``data.db``: ``replace``
   copies the backup's table (its own DDL and indexes); ``merge`` copies the live table, then
   upserts the backup's records (the backup wins). Every batch is a short transaction taken
   with this process's writers paused (``Database.writes_paused``), so other collections keep
   being written between batches. A dry run builds its merge in a scratch database instead
   (conflicts are found the same way) and stops after the summary.
5. The files: a journal (``journal.json``) lists every move; files new to a record move into
   ``storage/`` now (unreferenced until the commit, removed again if it does not happen).
6. One short transaction switches: the live table is renamed away, the shadow renamed in, the
   definition written (``replace``), and a marker row (``_params``) says it committed.
7. After the commit: replaced files are swapped in, removed ones deleted, the old table is
   deleted in batches, then the journal and the marker go.

A ``replace`` of collections bigger than the rest of the data (``_Restorer.choose_file_mode``)
skips 4 and 6: the extracted data.db itself, reduced to their tables, gets the rest of the live
data (copied with the writers paused) and the marker, and replaces data.db while every
connection is closed (``Database.replace_file``): that rename is the commit. Copying a big
table row by row would rewrite its random-order id index batch after batch.

A crash at any point is settled at the next start (``recover``), before anything is served:
with the marker the file moves are completed; without it the moved files are taken back.
Either way, left-over shadow and old tables are dropped. So a collection is either wholly
restored or exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import faults
from .. import fields as F
from .. import values as V
from ..errors import BadRequest, ValidationError, field_error
from ..tools import sqlite_pages
from ..tools.fsync import fsync_dir, fsync_path
from ..tools.security import random_string
from ..tools.threads import background_pool
from ..tools.times import format_datetime, now
from . import archive, crypto

if TYPE_CHECKING:
    from ..database import Database
    from .manager import BackupManager, Job

logger = logging.getLogger("server.backups")

MODES = ("merge", "replace")
RESTORABLE_SYSTEM = frozenset({"_superusers", "users"})  # the only system collections one may name
WORK_DIR = ".pb_partial_restore"
MARKER = "__pbPartialRestore__"  # the _params row written by the switching transaction
TABLE_PREFIX = "_pb_partial_"  # shadow and old tables; any left at start are dropped
BATCH_SECONDS = 0.025  # the write lock is held about this long per batch (writers wait at most that)
MAX_CONFLICTS = 10  # ids named in a refusal
# A replace may instead build a whole new data.db from the extracted one (the restored tables as
# they are) plus the rest of the live data, copied while writers wait, then swap the file: no
# row of a big collection is copied. Used while the rest is at most this many rows, and smaller
# than what is restored.
FILE_SWAP_MAX_ROWS = 50_000
# The summary's walk of a restored table against the live one is split into this many rowid ranges,
# each on a connection and a low-priority thread of its own (``_COUNT_THREADS``; the caller does the
# first range itself, so a full pool never waits on itself).
COUNT_WORKERS = 2
_COUNT_THREADS = background_pool(4, "partial-count")
_NAME_RE = re.compile(r"^\w+$")
_IDENT = r'(?:`[^`]+`|"(?:[^"]|"")+"|\[[^\]]+\]|[\w$]+)'
_TABLE_RE = re.compile(rf"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_IDENT}", re.I)
_INDEX_RE = re.compile(rf"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?{_IDENT}\s+ON\s+{_IDENT}", re.I)
_RENAMED_INDEX_RE = re.compile(r"_pr[a-z0-9]{6}$")
_CONSTRAINT_RE = re.compile(r"(UNIQUE|NOT NULL|CHECK) constraint failed: ([^\s,]+)")


class RestoreRefused(BadRequest):
    """The backup's content does not allow the restore asked for; nothing was changed."""


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreRequest:
    """What a restore request's body asks for. ``collections`` None: a full restore."""

    collections: tuple[str, ...] | None = None
    mode: str = "merge"
    dry_run: bool = False

    @property
    def partial(self) -> bool:
        return self.collections is not None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dryRun": self.dry_run}
        if self.collections is not None:
            out.update(collections=list(self.collections), mode=self.mode)
        return out


def parse_request(body: dict[str, Any]) -> RestoreRequest | None:
    """The restore asked for by a JSON body; ``None`` for the plain full restore (no body, ``{}``,
    or only an ``identity``).

    Raises ``ValidationError`` (400, the contract's shape) for a malformed body."""
    return parse_body(body)[0]


def parse_body(body: dict[str, Any]) -> tuple[RestoreRequest | None, crypto.Identities | None]:
    """``parse_request``, and the body's ``identity`` (issue 17: the age identity of an encrypted
    backup, one ``AGE-SECRET-KEY-1...`` or an identity file's text) parsed, or None. The identity
    stays apart from the request: a body holding only an identity is the full restore, with its
    re-exec, as no body is; it is never described, stored or echoed."""
    errors: dict[str, Any] = {}
    identities: crypto.Identities | None = None
    raw_identity = body.get("identity")
    if raw_identity is not None and raw_identity != "":
        try:
            identities = crypto.parse_identities(raw_identity)
        except crypto.IdentityError as exc:
            errors["identity"] = field_error("validation_invalid_identity", str(exc))
    names: tuple[str, ...] | None = None
    raw = body.get("collections")
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
            errors["collections"] = field_error("validation_invalid_value", "Must be a list of collection names.")
        elif not raw:
            errors["collections"] = field_error("validation_required", "Name at least one collection.")
        else:
            bad = next((n for n in raw if not _NAME_RE.fullmatch(n) or len(n) > 255), None)
            system = next((n for n in raw if n.startswith("_") and n.lower() != "_superusers"), None)
            if bad is not None:
                errors["collections"] = field_error("validation_match_invalid", f"Invalid collection name {bad[:80]!r}.")
            elif system is not None:
                errors["collections"] = field_error(
                    "validation_system_collection",
                    f"The system collection {system!r} cannot be restored alone (only _superusers and users can).")
            else:
                seen: dict[str, str] = {}
                for name in raw:
                    seen.setdefault(name.lower(), name)
                names = tuple(seen.values())
    mode = body.get("mode")
    if mode is not None and (not isinstance(mode, str) or mode not in MODES):
        errors["mode"] = field_error("validation_in_invalid", "Must be one of: merge, replace.")
    elif mode == "merge" and raw is None:
        errors["mode"] = field_error("validation_in_invalid",
                                     "A full restore replaces everything; merge needs the collections to merge.")
    dry_run = body.get("dryRun", False)
    if dry_run is None:
        dry_run = False
    if not isinstance(dry_run, bool):
        errors["dryRun"] = field_error("validation_invalid_value", "Must be a boolean.")
    if errors:
        raise ValidationError(errors)
    if names is None and not dry_run:
        return None, identities
    return RestoreRequest(names, mode or "merge", bool(dry_run)), identities


# --- planning ------------------------------------------------------------------------------


def _empty_summary() -> dict[str, Any]:
    return {"inserted": 0, "updated": 0, "deleted": 0, "unchanged": 0,
            "files": {"added": 0, "replaced": 0, "removed": 0}}


@dataclass
class Target:
    """One collection of the request: its backup and current definitions (``_collections`` rows)
    and what happens to it: ``merge``, ``replace``, ``create`` (not in the current data),
    ``delete`` (replace of a collection the backup lacks) or ``keep`` (merge of one it lacks)."""

    asked: str
    backup: dict[str, Any] | None
    current: dict[str, Any] | None
    action: str
    shadow: str = ""
    old: str = ""
    summary: dict[str, Any] = field(default_factory=_empty_summary)
    backup_rows: int | None = None  # the backup table's rows, once counted
    # File work: (stage path, final path, "added"|"replaced"), files and directories to remove.
    moves: list[tuple[str, str, str]] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    remove_dirs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The collection's name once restored."""
        source = self.backup if self.action in ("replace", "create") else self.current
        assert source is not None or self.action in ("delete", "keep")
        return (source or self.current or self.backup or {}).get("name", self.asked)

    @property
    def builds(self) -> bool:
        return self.action in ("merge", "replace", "create")


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(path))}" + ("?mode=ro" if readonly else "")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    # As the server's own connections: in WAL mode a commit is durable at the next checkpoint
    # (no fsync per batch); the switch is made durable explicitly (``_Restorer.switch``).
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -16384")
    return conn


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(sql, params).fetchall()]


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row["name"] for row in conn.execute(f"PRAGMA {schema}.table_info({F.quote(table)})").fetchall()]


def _rewrite_table(sql: str, schema: str, new_name: str) -> str:
    match = _TABLE_RE.match(sql)
    if match is None:
        raise RestoreRefused("a table of the backup has a definition this server cannot read")
    return f"CREATE TABLE {schema}.{F.quote(new_name)}" + sql[match.end():]


def _rewrite_index(sql: str, schema: str, index: str, table: str) -> str:
    match = _INDEX_RE.match(sql)
    if match is None:
        raise RestoreRefused("an index of the backup has a definition this server cannot read")
    unique = "UNIQUE " if match.group(1) else ""
    return f"CREATE {unique}INDEX {schema}.{F.quote(index)} ON {F.quote(table)}" + sql[match.end():]


def _projection(field_def: dict[str, Any] | None, column: str) -> str:
    """The backup's value of ``column`` as the current field stores it: a field whose ``maxSelect``
    changed since is converted as a schema change converts it (``CollectionStore._migrate``)."""
    quoted = "b." + F.quote(column)
    if field_def is None or field_def["type"] not in ("select", "file"):
        return quoted
    if F.is_multiple(field_def):
        return (f"CASE WHEN json_valid({quoted}) AND json_type({quoted}) = 'array' THEN {quoted} "
                f"WHEN {quoted} IS NULL OR {quoted} = '' THEN '[]' ELSE json_array({quoted}) END")
    return (f"CASE WHEN json_valid({quoted}) AND json_type({quoted}) = 'array' "
            f"THEN COALESCE(json_extract({quoted}, '$[#-1]'), '') ELSE {quoted} END")


def _type_problem(field_def: dict[str, Any], raw: Any) -> str | None:
    """Why a stored value cannot be a value of ``field_def`` (its type), or None."""
    kind = field_def["type"]
    if kind == "number":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (isinstance(raw, float) and not math.isfinite(raw)):
            return "Must be a number."
    elif kind == "bool":
        if raw not in (0, 1):
            return "Must be a boolean."
    elif kind == "json":
        if raw is not None and not isinstance(raw, (int, float)):
            try:
                json.loads(raw)
            except (TypeError, ValueError):
                return "Must be valid JSON."
    elif F.is_multiple(field_def):
        try:
            value = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return "Must be a list of strings."
    elif not isinstance(raw, str):
        return "Must be a string."
    return None


def _constraint_reason(exc: sqlite3.IntegrityError) -> str:
    match = _CONSTRAINT_RE.search(str(exc))
    if match is None:
        return "refused by the database"
    column = match.group(2).rsplit(".", 1)[-1]
    kind = match.group(1)
    return f"{column}: " + {"UNIQUE": "Value must be unique.", "NOT NULL": "Cannot be blank."}.get(kind, "Invalid value.")


def _files_under(root: Path) -> dict[str, Path]:
    """The regular files under ``root`` by their path relative to it (links are not followed)."""
    found: dict[str, Path] = {}
    if not root.is_dir() or root.is_symlink():
        return found
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = path
    return found


def _same_content(a: Path, b: Path) -> bool:
    """Whether two regular files hold the same bytes (read 1 MiB at a time: few trips holding the GIL)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as left, open(b, "rb") as right:
        while True:
            chunk = left.read(1 << 20)
            if chunk != right.read(1 << 20):
                return False
            if not chunk:
                return True


def _subdirs(root: Path) -> list[str]:
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False))


class _Restorer:
    """The blocking work of one partial restore (or of a dry run's summary), on a connection of
    its own to ``data.db`` with the backup's ``data.db`` attached as ``bk``. Every method runs in
    a worker thread; ``run`` (on the event loop) orders them and pauses this process's writers
    around each short write."""

    def __init__(self, root: Path, backup_db: Path, stage: Path, work: Path, request: RestoreRequest,
                 token: str) -> None:
        self.root = root
        self.storage = root / "storage"
        self.stage = stage  # holds the backup's storage/<collectionId>/...
        self.work = work
        self.request = request
        self.token = token
        self.dry_run = request.dry_run
        self.targets: list[Target] = []
        self.notes: list[str] = []  # how the count went (for the log)
        self.manifest_files: dict[str, Any] | None = None  # the backup's manifest's "files", once extracted
        self.live_hashes: dict[str, tuple[int, str]] = {}  # current file -> (size, SHA-256): ``hash_live_files``
        self.committed = False
        self.file_mode = False  # the whole data.db is swapped (see ``choose_file_mode``)
        self._counted = False
        self._planned = False
        self.backup_db = backup_db
        self._new: sqlite3.Connection | None = None
        self.conn = _connect(root / "data.db")
        self.conn.execute("ATTACH DATABASE ? AS bk", (f"file:{urllib.parse.quote(str(backup_db))}?mode=ro",))
        # A dry run's merges are built in a scratch database: data.db is not written at all.
        self.schema = "main"
        if self.dry_run:
            self.conn.execute("ATTACH DATABASE ? AS scratch", (str(work / "scratch.db"),))
            self.conn.execute("PRAGMA scratch.journal_mode = OFF")
            self.conn.execute("PRAGMA scratch.synchronous = OFF")
            self.schema = "scratch"

    def close(self) -> None:
        for conn in (self.conn, self._new):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # --- replacing by swapping data.db ---------------------------------------------------

    def choose_file_mode(self) -> bool:
        """Whether to swap the whole data.db: a real replace whose restored collections hold more
        rows than the rest of the live data, itself small (and plain: tables and indexes only)."""
        if self.dry_run or not self.targets or any(t.action not in ("replace", "create", "delete")
                                                   for t in self.targets):
            return False
        skip = {t.current["name"].lower() for t in self.targets if t.current is not None}
        rest = 0
        for row in self.conn.execute("SELECT type, name, sql FROM main.sqlite_master").fetchall():
            if row["type"] in ("view", "trigger") or row["name"].lower() == "sqlite_sequence":
                return False
            if row["type"] != "table" or row["name"].lower() in skip or row["name"].startswith("sqlite_"):
                continue
            if "WITHOUT ROWID" in (row["sql"] or "").upper():
                return False
            cap = FILE_SWAP_MAX_ROWS + 1 - rest
            rest += self._count(f"SELECT count(*) FROM (SELECT 1 FROM main.{F.quote(row['name'])} LIMIT {cap})")
            if rest > FILE_SWAP_MAX_ROWS:
                return False
        restored = sum(t.backup_rows if t.backup_rows is not None else
                       self._count(f"SELECT count(*) FROM bk.{F.quote(t.backup['name'])}")
                       for t in self.targets if t.backup is not None and t.action in ("replace", "create"))
        self.file_mode = restored > rest
        return self.file_mode

    def build_file(self) -> None:
        """The extracted data.db, reduced to the restored collections' tables (no lock taken)."""
        self.conn.close()  # (attached to the extracted file; reopened after the swap)
        keep = {t.backup["name"].lower() for t in self.targets if t.backup is not None
                and t.action in ("replace", "create")}
        new = sqlite3.connect(self.backup_db, isolation_level=None, check_same_thread=False)
        new.row_factory = sqlite3.Row
        self._new = new
        new.execute("PRAGMA journal_mode = DELETE")
        new.execute("PRAGMA synchronous = OFF")  # fsynced once complete
        for kind, name in new.execute("SELECT type, name FROM sqlite_master WHERE type IN ('view', 'trigger')"):
            new.execute(f"DROP {kind.upper()} IF EXISTS {F.quote(name)}")
        for (name,) in new.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
                                   "ESCAPE '\\'").fetchall():
            if name.lower() not in keep:
                new.execute(f"DROP TABLE {F.quote(name)}")
        fsync_path(self.backup_db)  # now: the fsync after the copy of the rest (writers waiting) has little left

    def copy_live(self) -> None:
        """The rest of the live data into the new file, the definitions and the commit marker
        (this process's writers paused: the copy is the live data at this instant)."""
        new = self._new
        assert new is not None
        live_db = self.root / "data.db"
        new.execute("ATTACH DATABASE ? AS live", (f"file:{urllib.parse.quote(str(live_db))}?mode=ro",))
        skip = {t.current["name"].lower() for t in self.targets if t.current is not None}
        new.execute("BEGIN")
        try:
            rows = new.execute("SELECT type, name, tbl_name, sql FROM live.sqlite_master "
                               "WHERE sql IS NOT NULL ORDER BY type = 'index', rowid").fetchall()
            for kind, name, table, sql in rows:
                if table.lower() in skip or name.startswith("sqlite_"):
                    continue
                if kind == "table":
                    new.execute(_rewrite_table(sql, "main", name))
                    columns = ", ".join(F.quote(c) for c in _columns(new, "live", name))
                    new.execute(f"INSERT INTO main.{F.quote(name)} (rowid, {columns}) "
                                f"SELECT rowid, {columns} FROM live.{F.quote(name)}")
                elif kind == "index":
                    new.execute(sql)
            columns = [row[1] for row in new.execute("PRAGMA main.table_info(_collections)")]
            for target in self.targets:
                if target.current is not None:
                    new.execute("DELETE FROM main._collections WHERE id = ?", (target.current["id"],))
                if target.action in ("replace", "create"):
                    assert target.backup is not None
                    present = [c for c in columns if c in target.backup]
                    new.execute(f"INSERT INTO main._collections ({', '.join(F.quote(c) for c in present)}) "
                                f"VALUES ({', '.join('?' for _ in present)})", [target.backup[c] for c in present])
            new.execute("INSERT OR REPLACE INTO main._params (id, value, created, updated) VALUES (?, ?, ?, ?)",
                        (MARKER, json.dumps({"token": self.token}), now(), now()))
            new.execute("COMMIT")
        except BaseException:
            new.execute("ROLLBACK")
            raise
        finally:
            new.execute("DETACH DATABASE live")
        new.close()
        self._new = None
        fsync_path(self.backup_db)

    def swap_file(self) -> None:
        """Put the new file in place of data.db (every connection to it closed): the commit."""
        live_db = self.root / "data.db"
        wal = live_db.with_name("data.db-wal")
        if wal.exists() and wal.stat().st_size > 0 and not _last_close_clears_wal(live_db, wal):
            raise RestoreRefused("Another process has data.db open; nothing was changed.")
        faults.point("partial-before-commit")
        for leftover in (wal, live_db.with_name("data.db-shm")):
            leftover.unlink(missing_ok=True)
        # The replaced file keeps a name in the work directory: freeing its blocks (a tenth of a
        # second for the reference data.db) is left to the work directory's removal, after the
        # connections are open again, instead of being done by this rename while reads wait.
        kept = self.work / "replaced.db"
        kept.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.link(live_db, kept)
        os.replace(self.backup_db, live_db)
        fsync_dir(self.root)
        self.committed = True

    def reconnect(self) -> None:
        self.conn = _connect(self.root / "data.db")

    # --- resolving ---------------------------------------------------------------------

    def resolve(self) -> list[Target]:
        try:
            backup = _rows(self.conn, "SELECT * FROM bk._collections")
        except sqlite3.DatabaseError as exc:
            raise RestoreRefused("the backup's data.db has no readable collections") from exc
        current = _rows(self.conn, "SELECT * FROM main._collections")
        by_name_bk = {row["name"].lower(): row for row in backup}
        by_name_cur = {row["name"].lower(): row for row in current}
        by_id_cur = {row["id"]: row for row in current}
        names = self.request.collections
        if names is None:  # the summary of a full restore: every collection, replaced
            names = tuple(dict.fromkeys([row["name"] for row in backup] + [row["name"] for row in current]))
        targets = []
        for asked in names:
            bk = by_name_bk.get(asked.lower())
            cur = by_name_cur.get(asked.lower())
            if bk is None and cur is None:
                raise RestoreRefused(f"The collection {asked!r} is in neither the backup nor the current data; "
                                     "nothing was changed.")
            if self.request.partial:
                for row in (bk, cur):
                    if row is not None and row["system"] and row["name"].lower() not in RESTORABLE_SYSTEM:
                        raise RestoreRefused(f"The system collection {row['name']!r} cannot be restored alone.")
            mode = self.request.mode if self.request.partial else "replace"
            if cur is None:
                action = "create"
            elif bk is None:
                action = "delete" if mode == "replace" else "keep"
            else:
                action = mode
            if action in ("replace", "create") and bk is not None:
                other = by_id_cur.get(bk["id"])
                if other is not None and (cur is None or other["id"] != cur["id"]):
                    raise RestoreRefused(
                        f"The backup's collection {bk['name']!r} has the id of the current collection "
                        f"{other['name']!r}; restore that one too, or rename it back first. Nothing was changed.")
            if action in ("merge", "replace") and bk is not None and cur is not None and bk["type"] != cur["type"] \
                    and action == "merge":
                raise RestoreRefused(f"The collection {asked!r} is of type {cur['type']} now and was {bk['type']} "
                                     "in the backup: use mode replace. Nothing was changed.")
            target = Target(asked, bk, cur, action)
            suffix = f"{self.token}_{len(targets)}"
            target.shadow = f"{TABLE_PREFIX}new_{suffix}"
            target.old = f"{TABLE_PREFIX}old_{suffix}"
            targets.append(target)
        if self.request.partial:
            for target in targets:
                for row in (target.backup, target.current):
                    if row is not None and self._table_sql("bk" if row is target.backup else "main", row["name"]) is None:
                        raise RestoreRefused(f"The table of the collection {row['name']!r} is missing; nothing was changed.")
        self.targets = targets
        return targets

    def _table_sql(self, schema: str, table: str) -> str | None:
        row = self.conn.execute(f"SELECT sql FROM {schema}.sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE",
                                (table,)).fetchone()
        return None if row is None else row["sql"]

    def storage_prefixes(self) -> list[str]:
        """The archive paths holding the files of the collections to restore."""
        return [f"storage/{t.backup['id']}/" for t in self.targets if t.backup is not None and t.action != "keep"]

    # --- the summary -------------------------------------------------------------------

    def count_records(self, live_file: int | None = None) -> None:
        """Count each target's records (``Target.summary``). Only on connections of its own, so
        that it can run beside the extraction of the files and the file planning (``plan_files``,
        which uses ``self.conn``). ``live_file``: see ``_differing_ranges``."""
        conns = [self._reader() for _ in range(COUNT_WORKERS)]
        try:
            for target in self.targets:
                self._count_records(target, conns, live_file)
        finally:
            for conn in conns:
                conn.close()
        self._counted = True

    def plan_files(self) -> None:
        """Count and plan the file work of every target (the files must all be extracted)."""
        for target in self.targets:
            self._plan_files(target)
        self._planned = True

    def summarize(self) -> dict[str, Any]:
        """What the restore changes (records and files), counted and planned first if not yet."""
        if not self._counted:
            self.count_records()
        if not self._planned:
            self.plan_files()
        out: dict[str, Any] = {}
        for target in self.targets:
            summary = dict(target.summary)
            summary["action"] = target.action
            out[target.name] = summary
        return {"dryRun": self.dry_run, "collections": out}

    def _reader(self) -> sqlite3.Connection:
        conn = _connect(self.root / "data.db")
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("ATTACH DATABASE ? AS bk", (f"file:{urllib.parse.quote(str(self.backup_db))}?mode=ro",))
        except BaseException:
            conn.close()
            raise
        return conn

    def _count(self, sql: str, conn: sqlite3.Connection | None = None) -> int:
        return int((conn or self.conn).execute(sql).fetchone()[0] or 0)

    def _differing_ranges(self, target: Target, conn: sqlite3.Connection,
                          live_file: int | None) -> list[tuple[int, int]] | None:
        """The rowid ranges (inclusive) outside which the backup's table and the live one hold the
        same rows byte for byte, found from their pages (``tools.sqlite_pages``); None when the
        pages cannot tell (the live file not checkpointed, different table definitions or file formats,
        records big enough for overflow pages). ``live_file``: a descriptor of the live data.db
        whose pages of this table are current and stay so (``_count_records``)."""
        bk, cur = target.backup, target.current
        if live_file is None or bk is None or cur is None:
            return None
        bk_sql, live_sql = self._table_sql("bk", bk["name"]), self._table_sql("main", cur["name"])
        try:  # the same columns in the same order, with the same defaults
            if bk_sql is None or live_sql is None or _rewrite_table(bk_sql, "x", "t") != _rewrite_table(live_sql, "x", "t"):
                return None
        except RestoreRefused:
            return None
        # The extracted file is this job's own: no other process has it open, so closing this
        # descriptor takes no lock from anyone (unlike the live file's; see ``Database.open_file``).
        fd = os.open(self.backup_db, os.O_RDONLY | os.O_CLOEXEC)
        try:
            formats = {sqlite_pages.header_info(os.pread(f, 100, 0)) for f in (fd, live_file)}
            if len(formats) != 1 or None in formats:
                return None
            page_size, usable, _encoding = formats.pop()  # type: ignore[misc]
            roots = [conn.execute(f"SELECT rootpage FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?",
                                  (name,)).fetchone() for schema, name in (("bk", bk["name"]), ("main", cur["name"]))]
            if any(root is None or not root[0] for root in roots):
                return None
            ranges = sqlite_pages.differing_ranges(lambda at, size: os.pread(fd, size, at), int(roots[0][0]),
                                                   lambda at, size: os.pread(live_file, size, at),
                                                   int(roots[1][0]), page_size)
            # No record of the backup's table may spill into overflow pages (elsewhere in the file):
            # the file has none at all (its b-trees' interior pages tell), or else the table's
            # largest record says so (``dbstat``, which reads the whole table).
            trees = [int(row[0]) for row in conn.execute("SELECT rootpage FROM bk.sqlite_master WHERE rootpage > 0")]
            if not sqlite_pages.without_overflow(lambda at, size: os.pread(fd, size, at), page_size, [1, *trees]):
                row = conn.execute("SELECT mx_payload FROM dbstat('bk', 1) WHERE name = ?", (bk["name"],)).fetchone()
                if row is None or row[0] is None or int(row[0]) > sqlite_pages.max_local_payload(usable):
                    return None
            return ranges
        except Exception:  # (a damaged backup, say: the walk of the records then tells, or fails with the reason)
            return None
        finally:
            os.close(fd)

    def _count_records(self, target: Target, conns: list[sqlite3.Connection], live_file: int | None = None) -> None:
        s = target.summary
        bk, cur = target.backup, target.current
        conn = conns[0]
        if target.action == "keep":
            return
        if target.action == "create":
            assert bk is not None
            s["inserted"] = target.backup_rows = self._count(f"SELECT count(*) FROM bk.{F.quote(bk['name'])}", conn)
            return
        assert cur is not None
        live = f"main.{F.quote(cur['name'])}"
        n_live = self._count(f"SELECT count(*) FROM {live}", conn)
        if target.action == "delete":
            s["deleted"] = n_live
            return
        assert bk is not None
        theirs = f"bk.{F.quote(bk['name'])}"
        bk_columns = _columns(conn, "bk", bk["name"])
        live_columns = _columns(conn, "main", cur["name"])
        fields = {f["name"]: f for f in json.loads(cur["fields"])}
        # A shared record is unchanged when the fields both tables have hold the same values.
        common = [c for c in bk_columns if c in live_columns]
        if target.action == "merge":
            pairs = [(_projection(fields.get(c), c), "l." + F.quote(c)) for c in common]
        else:
            pairs = [("b." + F.quote(c), "l." + F.quote(c)) for c in common]
        equal = " AND ".join(f"({a}) IS {b}" for a, b in pairs) if pairs else "0"
        # Records mostly keep their rowid (a restore keeps it too): those are paired by rowid, in
        # a walk of both tables in order (split in rowid ranges walked in parallel); only the
        # others are looked up by id.
        walk = (f"SELECT count(*), coalesce(sum(l.id IS b.id), 0), "
                f"coalesce(sum(CASE WHEN l.id IS b.id AND {equal} THEN 1 ELSE 0 END), 0) "
                f"FROM {theirs} AS b LEFT JOIN {live} AS l ON l.rowid = b.rowid WHERE b.rowid BETWEEN ? AND ?")
        low, high = conn.execute(f"SELECT min(rowid), max(rowid) FROM {theirs}").fetchone()
        n_bk = paired = paired_same = 0
        if low is not None:
            # Leaves identical in both files settle their rows at once (``_differing_ranges``):
            # only the other rowid ranges are walked, and the rows outside them count as paired
            # and unchanged.
            todo = self._differing_ranges(target, conn, live_file) if target.action == "replace" else None
            if todo is None:
                ranges = _ranges(int(low), int(high), len(conns))
            else:
                ranges = [(max(a, int(low)), min(b, int(high))) for a, b in todo if b >= low and a <= high]
            if ranges:
                for row in _walk_ranges(walk, ranges, conns):
                    n_bk, paired, paired_same = n_bk + int(row[0]), paired + int(row[1]), paired_same + int(row[2])
            if todo is not None:
                settled = self._count(f"SELECT count(*) FROM {theirs}", conn) - n_bk
                n_bk, paired, paired_same = n_bk + settled, paired + settled, paired_same + settled
                self.notes.append(f"{bk['name']}: {settled} rows settled by their pages, {n_bk - settled} walked")
            else:
                self.notes.append(f"{bk['name']}: {n_bk} rows walked")
        target.backup_rows = n_bk
        by_id = (0, 0)
        if paired < n_bk:
            by_id = conn.execute(
                f"SELECT count(*), coalesce(sum(CASE WHEN {equal} THEN 1 ELSE 0 END), 0) "
                f"FROM {theirs} AS b JOIN {live} AS l ON l.id = b.id "
                f"WHERE NOT EXISTS (SELECT 1 FROM {live} AS x WHERE x.rowid = b.rowid AND x.id = b.id)").fetchone()
        shared, same = paired + int(by_id[0]), paired_same + int(by_id[1])
        s.update(inserted=n_bk - shared, updated=shared - same, unchanged=same,
                 deleted=n_live - shared if target.action == "replace" else 0)

    def hash_live_files(self) -> None:
        """The SHA-256 of the current files the backup's may replace (``storage/<id>/`` of each
        target once restored), so that ``plan_files`` can compare them with the manifest's instead
        of reading both files. Done beside the count and the rest of the extraction, the restored
        collections already refusing writes (their files do not change meanwhile)."""
        for target in self.targets:
            if target.backup is None or target.action not in ("replace", "create", "merge"):
                continue
            dest = target.backup if target.action in ("replace", "create") else target.current  # (as _plan_files)
            if dest is None:
                continue
            for path in _files_under(self.storage / dest["id"]).values():
                digest = hashlib.sha256()
                try:
                    with open(path, "rb") as handle:
                        while chunk := handle.read(1 << 20):
                            digest.update(chunk)
                        size = os.fstat(handle.fileno()).st_size
                except OSError:
                    continue  # (compared byte for byte then)
                self.live_hashes[str(path)] = (size, digest.hexdigest())

    def _same_file(self, name: str, staged: Path, live: Path) -> bool:
        """Whether the backup's file ``name`` (extracted to ``staged``: its bytes are the
        manifest's) holds the same bytes as the current file ``live``."""
        listed = (self.manifest_files or {}).get(name)
        known = self.live_hashes.get(str(live))
        if isinstance(listed, dict) and known is not None and isinstance(listed.get("sha256"), str):
            return known == (listed.get("size"), listed["sha256"])
        return _same_content(staged, live)

    def _plan_files(self, target: Target) -> None:
        files = target.summary["files"]
        bk, cur = target.backup, target.current
        src = self.stage / "storage" / bk["id"] if bk is not None else None
        if target.action == "keep":
            return
        if target.action == "delete":
            dest_id = None
        elif target.action in ("replace", "create"):
            dest_id = bk["id"] if bk is not None else None
        else:
            dest_id = cur["id"] if cur is not None else None
        dest = self.storage / dest_id if dest_id else None
        if cur is not None and (dest is None or cur["id"] != dest_id):
            # The current collection's files all go (deleted, or replaced by one of another id).
            doomed = _files_under(self.storage / cur["id"])
            files["removed"] += len(doomed)
            if doomed or (self.storage / cur["id"]).is_dir():
                target.remove_dirs.append(str(self.storage / cur["id"]))
        if dest is None or src is None:
            return
        backup_records = set(_subdirs(src))
        for record in sorted(backup_records):
            theirs = _files_under(src / record)
            ours = _files_under(dest / record)
            for rel, path in theirs.items():
                final = dest / record / rel
                if rel not in ours:
                    files["added"] += 1
                    target.moves.append((str(path), str(final), "added"))
                elif not self._same_file(f"storage/{bk['id']}/{record}/{rel}", path, ours[rel]):
                    files["replaced"] += 1
                    target.moves.append((str(path), str(final), "replaced"))
            for rel, path in ours.items():
                if rel not in theirs:
                    files["removed"] += 1
                    target.removes.append(str(path))
        theirs_table = f"bk.{F.quote(bk['name'])}"
        for record in _subdirs(dest):
            if record in backup_records:
                continue
            if target.action == "merge":
                # A record the backup holds without files loses its current ones; one created since
                # the backup keeps them.
                if self.conn.execute(f"SELECT 1 FROM {theirs_table} WHERE id = ?", (record,)).fetchone() is None:
                    continue
            doomed = _files_under(dest / record)
            files["removed"] += len(doomed)
            target.removes.extend(str(path) for path in doomed.values())

    # --- validating a merge --------------------------------------------------------------

    def validate_merge(self, target: Target, cancelled: Callable[[], bool]) -> None:
        """Refuse a merge whose backup values the current definition refuses (required, type and
        the field's options), naming the records."""
        bk, cur = target.backup, target.current
        assert bk is not None and cur is not None
        fields = [f for f in json.loads(cur["fields"]) if f["type"] != "autodate"]
        bk_columns = set(_columns(self.conn, "bk", bk["name"]))
        present = [f for f in fields if f["name"] in bk_columns]
        missing_required = [f for f in fields if f["name"] not in bk_columns and f.get("required")]
        projection = ", ".join(_projection(f, f["name"]) for f in present) or "NULL"
        cursor = self.conn.execute(
            f"SELECT b.id AS __id, l.id IS NOT NULL AS __present, {projection} "
            f"FROM bk.{F.quote(bk['name'])} AS b LEFT JOIN main.{F.quote(cur['name'])} AS l ON l.id = b.id")
        problems: list[str] = []
        count = 0
        while True:
            rows = cursor.fetchmany(2000)
            if not rows:
                break
            if cancelled():
                raise archive.Cancelled()
            for row in rows:
                problem = None
                for index, field_def in enumerate(present):
                    raw = row[index + 2]
                    if field_def["type"] == "password":
                        problem = "password: Cannot be blank." if not raw else None
                    else:
                        reason = _type_problem(field_def, raw)
                        if reason is None:
                            error = V.validate(field_def, V.decode(field_def, raw))
                            reason = error["message"] if error else None
                        problem = f"{field_def['name']}: {reason}" if reason else None
                    if problem:
                        break
                if problem is None and not row[1] and missing_required:
                    problem = f"{missing_required[0]['name']}: Cannot be blank."
                if problem:
                    count += 1
                    if len(problems) < MAX_CONFLICTS:
                        problems.append(f"{row[0]} ({problem})")
        if count:
            more = f" and {count - len(problems)} more" if count > len(problems) else ""
            raise RestoreRefused(
                f"{count} record(s) of the backup do not fit the current definition of {cur['name']!r}: "
                f"{', '.join(problems)}{more}. Nothing was changed.")

    # --- building the shadow tables ------------------------------------------------------

    def create_shadow(self, target: Target) -> None:
        """The shadow table with its indexes, empty (one short transaction)."""
        source_schema, source = ("bk", target.backup) if target.action in ("replace", "create") else ("main", target.current)
        assert source is not None
        table_sql = self._table_sql(source_schema, source["name"])
        assert table_sql is not None
        schema = self.schema if target.action == "merge" else "main"
        index_rows = _rows(self.conn, f"SELECT name, sql FROM {source_schema}.sqlite_master "
                                      "WHERE type = 'index' AND tbl_name = ? COLLATE NOCASE AND sql IS NOT NULL",
                           (source["name"],))
        statements = [_rewrite_table(table_sql, schema, target.shadow)]
        for row in index_rows:
            statements.append(_rewrite_index(row["sql"], schema, self._index_name(schema, row["name"]), target.shadow))
        self._write(lambda: [self.conn.execute(sql) for sql in statements], schema)

    def _index_name(self, schema: str, name: str) -> str:
        """The backup's index name where it is free, else one with a suffix (index names are
        unique in a database, and the live table keeps its own until the switch)."""
        base = _RENAMED_INDEX_RE.sub("", name)
        taken = {row[0].lower() for row in self.conn.execute(f"SELECT name FROM {schema}.sqlite_master")}
        if base.lower() not in taken:
            return base
        return f"{base}_pr{self.token[:6]}"

    def _write(self, work: Callable[[], Any], schema: str = "main") -> Any:
        self.conn.execute("BEGIN IMMEDIATE" if schema == "main" else "BEGIN")
        try:
            result = work()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return result

    def copy_batch(self, source: str, target_table: str, schema: str, columns: list[str], after: int,
                   rows: int) -> int | None:
        """Copy the next ``rows`` rows (by rowid, kept) of ``source`` after ``after`` into the
        shadow; the last rowid copied, or None when there are none left."""
        upper = self.conn.execute(f"SELECT rowid FROM {source} WHERE rowid > ? ORDER BY rowid LIMIT 1 OFFSET ?",
                                  (after, rows - 1)).fetchone()
        names = ", ".join(F.quote(c) for c in columns)
        bound = "" if upper is None else " AND rowid <= ?"
        params: tuple[Any, ...] = (after,) if upper is None else (after, upper[0])
        self._write(lambda: self.conn.execute(
            f"INSERT INTO {schema}.{F.quote(target_table)} (rowid, {names}) SELECT rowid, {names} FROM {source} "
            f"WHERE rowid > ?{bound}", params), schema)
        return None if upper is None else int(upper[0])

    def upsert_batch(self, target: Target, after: int, rows: int) -> int | None:
        """Write the backup's records after rowid ``after`` into a merge's shadow (the backup wins)."""
        bk, cur = target.backup, target.current
        assert bk is not None and cur is not None
        source = f"bk.{F.quote(bk['name'])}"
        upper = self.conn.execute(f"SELECT rowid FROM {source} WHERE rowid > ? ORDER BY rowid LIMIT 1 OFFSET ?",
                                  (after, rows - 1)).fetchone()
        fields = {f["name"]: f for f in json.loads(cur["fields"])}
        live_columns = _columns(self.conn, "main", cur["name"])
        common = [c for c in _columns(self.conn, "bk", bk["name"]) if c in live_columns]
        names = ", ".join(F.quote(c) for c in common)
        values = ", ".join(_projection(fields.get(c), c) for c in common)
        updates = ", ".join(f"{F.quote(c)} = excluded.{F.quote(c)}" for c in common if c != "id")
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        sql = (f"INSERT INTO {self.schema}.{F.quote(target.shadow)} ({names}) SELECT {values} FROM {source} AS b "
               f"WHERE b.rowid > ?{'' if upper is None else ' AND b.rowid <= ?'} ORDER BY b.rowid "
               f"ON CONFLICT(id) {conflict}")
        params: tuple[Any, ...] = (after,) if upper is None else (after, upper[0])
        try:
            self._write(lambda: self.conn.execute(sql, params), self.schema)
        except sqlite3.IntegrityError:
            self._refuse_conflicts(target, sql.replace("b.rowid > ?", "b.rowid = ?").replace(" AND b.rowid <= ?", ""),
                                   after, None if upper is None else int(upper[0]), source)
        return None if upper is None else int(upper[0])

    def _refuse_conflicts(self, target: Target, one_row_sql: str, after: int, upper: int | None, source: str) -> None:
        """A batch broke a constraint (unique, not null): find its records, one by one, and refuse."""
        bound = "" if upper is None else " AND rowid <= ?"
        params: tuple[Any, ...] = (after,) if upper is None else (after, upper)
        candidates = self.conn.execute(f"SELECT rowid, id FROM {source} WHERE rowid > ?{bound} ORDER BY rowid",
                                       params).fetchall()
        problems: list[str] = []
        self.conn.execute("BEGIN")
        try:
            for rowid, record_id in candidates:
                self.conn.execute("SAVEPOINT one")
                try:
                    self.conn.execute(one_row_sql, (rowid,))
                except sqlite3.IntegrityError as exc:
                    problems.append(f"{record_id} ({_constraint_reason(exc)})")
                    self.conn.execute("ROLLBACK TO one")
                self.conn.execute("RELEASE one")
                if len(problems) >= MAX_CONFLICTS:
                    break
        finally:
            self.conn.execute("ROLLBACK")
        name = target.current["name"] if target.current else target.asked
        listed = ", ".join(problems) or "(not found one by one)"
        raise RestoreRefused(f"Records of the backup conflict with the current data of {name!r}: {listed}. "
                             "Nothing was changed.")

    def row_count(self, table: str) -> int:
        return self._count(f"SELECT count(*) FROM {table}")

    # --- the files, the switch, and what follows -----------------------------------------

    def journal(self, key: str, started_at: str, phase: str) -> None:
        data = {"phase": phase, "token": self.token, "key": key, "startedAt": started_at,
                "moves": [m for t in self.targets for m in t.moves],
                "removes": [r for t in self.targets for r in t.removes],
                "removeDirs": [d for t in self.targets for d in t.remove_dirs]}
        _write_json(self.work / "journal.json", data)

    def stage_added(self) -> None:
        """Move the files new to their records into place (unreferenced until the commit)."""
        moved = 0
        for stage, final, kind in (m for t in self.targets for m in t.moves):
            if kind != "added" or os.path.lexists(final):
                continue
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(stage, final)
            moved += 1
            if moved == 1:
                faults.point("partial-files-staging")
        for directory in {os.path.dirname(m[1]) for t in self.targets for m in t.moves}:
            with contextlib.suppress(OSError):
                fsync_dir(Path(directory))

    def switch(self) -> None:
        """The one short transaction that puts the restored collections in place."""
        bk_columns = {row["name"] for row in self.conn.execute("PRAGMA bk.table_info(_collections)")}
        cur_columns = [row["name"] for row in self.conn.execute("PRAGMA main.table_info(_collections)")]
        columns = [c for c in cur_columns if c in bk_columns]

        def work() -> None:
            self.conn.execute("INSERT OR REPLACE INTO main._params (id, value, created, updated) VALUES (?, ?, ?, ?)",
                              (MARKER, json.dumps({"token": self.token}), now(), now()))
            for target in self.targets:
                if target.action == "keep":
                    continue
                if target.current is not None:
                    self.conn.execute(f"ALTER TABLE main.{F.quote(target.current['name'])} RENAME TO {F.quote(target.old)}")
                if target.builds:
                    self.conn.execute(f"ALTER TABLE main.{F.quote(target.shadow)} RENAME TO {F.quote(target.name)}")
                if target.action in ("replace", "create", "delete") and target.current is not None:
                    self.conn.execute("DELETE FROM main._collections WHERE id = ?", (target.current["id"],))
                if target.action in ("replace", "create"):
                    assert target.backup is not None
                    marks = ", ".join("?" for _ in columns)
                    self.conn.execute(f"INSERT INTO main._collections ({', '.join(F.quote(c) for c in columns)}) "
                                      f"VALUES ({marks})", [target.backup[c] for c in columns])
            faults.point("partial-before-commit")

        # The commit must be durable before any file is replaced or removed after it.
        self.conn.execute("PRAGMA main.synchronous = FULL")
        try:
            self._write(work)
        finally:
            self.conn.execute("PRAGMA main.synchronous = NORMAL")
        self.committed = True

    def finish_files(self) -> None:
        """After the commit: replaced files swapped in, removed ones deleted."""
        apply_file_plan(self.work / "journal.json")

    def forget(self) -> None:
        """The restore is complete: its journal, then its marker, then its work directory go."""
        (self.work / "journal.json").unlink(missing_ok=True)
        fsync_dir(self.work)
        self._write(lambda: self.conn.execute("DELETE FROM main._params WHERE id = ?", (MARKER,)))

    def undo_staged(self) -> None:
        undo_file_plan(self.work / "journal.json")

    def leftover_tables(self) -> list[str]:
        return [row[0] for row in self.conn.execute(
            "SELECT name FROM main.sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
            (TABLE_PREFIX.replace("_", "\\_") + "%" + self.token + "%",))]

    def delete_batch(self, table: str, rows: int) -> bool:
        """Delete up to ``rows`` rows of a table being dropped; True once it is dropped."""
        upper = self.conn.execute(f"SELECT rowid FROM main.{F.quote(table)} ORDER BY rowid LIMIT 1 OFFSET ?",
                                  (rows - 1,)).fetchone()
        if upper is None:
            self._write(lambda: self.conn.execute(f"DROP TABLE IF EXISTS main.{F.quote(table)}"))
            return True
        self._write(lambda: self.conn.execute(f"DELETE FROM main.{F.quote(table)} WHERE rowid <= ?", (upper[0],)))
        return False


def _ranges(low: int, high: int, parts: int) -> list[tuple[int, int]]:
    """``[low, high]`` cut into at most ``parts`` consecutive inclusive ranges."""
    step = (high - low) // max(1, parts) + 1
    return [(start, min(high, start + step - 1)) for start in range(low, high + 1, step)]


def _walk_ranges(sql: str, ranges: list[tuple[int, int]], conns: list[sqlite3.Connection]) -> list[tuple[Any, ...]]:
    """``sql`` (one row, summed here column by column) over every range, the ranges shared out
    between the connections (``_in_parallel``) by about equal spans of rowids."""
    if len(ranges) <= len(conns):
        return _in_parallel(sql, ranges, conns[:len(ranges)])
    groups: list[list[tuple[int, int]]] = [[] for _ in conns]
    spans = [0] * len(conns)
    for bounds in sorted(ranges, key=lambda r: r[0] - r[1]):  # the widest first, to the least loaded
        index = spans.index(min(spans))
        groups[index].append(bounds)
        spans[index] += bounds[1] - bounds[0] + 1
    used = [(group, conn) for group, conn in zip(groups, conns) if group]

    def walk_group(conn: sqlite3.Connection, group: list[tuple[int, int]]) -> tuple[Any, ...]:
        rows = [tuple(conn.execute(sql, bounds).fetchone()) for bounds in group]
        return tuple(sum(int(row[i] or 0) for row in rows) for i in range(len(rows[0])))

    futures = [_COUNT_THREADS.submit(walk_group, conn, group) for group, conn in used[1:]]
    try:
        first = walk_group(used[0][1], used[0][0])
    finally:
        for future in futures:
            with contextlib.suppress(BaseException):
                future.result()
    return [first, *(future.result() for future in futures)]


def _in_parallel(sql: str, ranges: list[tuple[int, int]], conns: list[sqlite3.Connection]) -> list[tuple[Any, ...]]:
    """``sql`` (one row) for each range, the first on this thread, the others on ``_COUNT_THREADS``,
    each on its own connection; every one has ended when this returns (or raises)."""
    futures = [_COUNT_THREADS.submit(lambda c=conn, r=bounds: tuple(c.execute(sql, r).fetchone()))
               for conn, bounds in zip(conns[1:], ranges[1:])]
    try:
        first = tuple(conns[0].execute(sql, ranges[0]).fetchone())
    finally:
        for future in futures:
            with contextlib.suppress(BaseException):
                future.result()
    return [first, *(future.result() for future in futures)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        return {}  # cut short: written before anything moved (it is replaced atomically)


def apply_file_plan(journal_path: Path) -> None:
    """Complete a committed restore's file work (idempotent: a crash may have cut it short)."""
    journal = _read_json(journal_path) or {}
    for stage, final, _kind in journal.get("moves", []):
        if os.path.lexists(stage):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(stage, final)
    for path in journal.get("removes", []):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for directory in journal.get("removeDirs", []):
        shutil.rmtree(directory, ignore_errors=True)
    # Record directories left empty go too.
    for path in journal.get("removes", []):
        parent = Path(path).parent
        while parent.name and parent.parent.name != "storage":
            with contextlib.suppress(OSError):
                parent.rmdir()
            parent = parent.parent
        with contextlib.suppress(OSError):
            parent.rmdir()


def undo_file_plan(journal_path: Path) -> None:
    """Take back the files an uncommitted restore moved into storage (those new to a record)."""
    journal = _read_json(journal_path) or {}
    for stage, final, kind in journal.get("moves", []):
        if kind == "added" and not os.path.lexists(stage) and os.path.lexists(final):
            os.unlink(final)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(final))


# --- the job -------------------------------------------------------------------------------


class _Batches:
    """Batch sizes that keep each write transaction near ``BATCH_SECONDS``."""

    def __init__(self, rows: int = 5000) -> None:
        self.rows = rows

    def measured(self, seconds: float) -> None:
        if seconds <= 0:
            self.rows = min(self.rows * 2, 200_000)
            return
        factor = max(0.5, min(2.0, BATCH_SECONDS / seconds))
        self.rows = max(100, min(200_000, int(self.rows * factor)))


async def _paused(db: Database, schema: str, work: Callable[[], Any]) -> Any:
    """Run ``work`` in a thread; while it writes to data.db this process's writers wait."""
    if schema != "main":
        return await asyncio.to_thread(work)
    async with db.writes_paused():
        return await asyncio.to_thread(work)


async def _copy_table(restorer: _Restorer, db: Database, source: str, target: str, schema: str, columns: list[str],
                      job: Job) -> None:
    batches = _Batches()
    after = -(1 << 63)
    first = True
    while True:
        if job.cancel.is_set():
            raise archive.Cancelled()
        await asyncio.to_thread(faults.gate, "partial-copy")  # (tests hold the job here, between batches)
        started = time.monotonic()
        rows = batches.rows
        upper = await _paused(db, schema, lambda: restorer.copy_batch(source, target, schema, columns, after, rows))
        batches.measured(time.monotonic() - started)
        if first:
            faults.point("partial-copying")
            first = False
        if upper is None:
            return
        after = upper
        await asyncio.sleep(0)  # the writers waiting on the lock go first


async def _upsert_table(restorer: _Restorer, db: Database, target: Target, job: Job) -> None:
    batches = _Batches()
    after = -(1 << 63)
    while True:
        if job.cancel.is_set():
            raise archive.Cancelled()
        started = time.monotonic()
        rows = batches.rows
        upper = await _paused(db, restorer.schema, lambda: restorer.upsert_batch(target, after, rows))
        batches.measured(time.monotonic() - started)
        if upper is None:
            return
        after = upper
        await asyncio.sleep(0)


async def _drop_tables(restorer: _Restorer, db: Database, tables: list[str]) -> None:
    """Drop big tables in batches of short deletes (a DROP of a large table frees every page in
    one transaction: seconds with the write lock held)."""
    for table in tables:
        batches = _Batches(5000)
        while True:
            started = time.monotonic()
            rows = batches.rows
            dropped = await _paused(db, "main", lambda: restorer.delete_batch(table, rows))
            batches.measured(time.monotonic() - started)
            if dropped:
                break
            await asyncio.sleep(0)


async def _build(restorer: _Restorer, db: Database, job: Job) -> None:
    for target in restorer.targets:
        if not target.builds:
            continue
        if target.action == "merge" or not restorer.dry_run:
            await _paused(db, restorer.schema if target.action == "merge" else "main",
                          lambda: restorer.create_shadow(target))
        if target.action in ("replace", "create"):
            if restorer.dry_run:
                continue  # the backup's own table: nothing to find by building it
            assert target.backup is not None
            columns = _columns(restorer.conn, "bk", target.backup["name"])
            await _copy_table(restorer, db, f"bk.{F.quote(target.backup['name'])}", target.shadow, "main", columns, job)
        else:
            assert target.current is not None
            await asyncio.to_thread(restorer.validate_merge, target, job.cancel.is_set)
            columns = _columns(restorer.conn, "main", target.current["name"])
            await _copy_table(restorer, db, f"main.{F.quote(target.current['name'])}", target.shadow, restorer.schema,
                              columns, job)
            await _upsert_table(restorer, db, target, job)


async def _count_records(restorer: _Restorer, db: Database, guarded: bool, checkpointed: Callable[[], None]) -> None:
    """``restorer.count_records`` on its threads. When the restored collections refuse writes
    (``guarded``: a real run) and the live WAL could be checkpointed completely since, the live
    data.db file itself holds their tables' current pages, and keeps them (no write to those
    tables commits any more, and without auto-vacuum no other write moves their pages), so the
    count compares them with the backup's (``_Restorer._differing_ranges``), read through the
    database's own descriptor (``Database.open_file``). No lock is taken: writers go on.
    ``checkpointed`` is called once that is settled (the checkpoint's fsync is not to share the
    disk with the extracted file's)."""
    loop = asyncio.get_running_loop()
    live_file: int | None = None
    try:
        if guarded and await loop.run_in_executor(_COUNT_THREADS, _checkpoint_fully, db.path):
            live_file = db.open_file().fileno()
    finally:
        checkpointed()
    await loop.run_in_executor(_COUNT_THREADS, restorer.count_records, live_file)


def _last_close_clears_wal(live_db: Path, wal: Path) -> bool:
    """A WAL left after this process closed its connections means another connection still has
    the file open: SQLite's last connection checkpoints the WAL and deletes it on close. Ours
    may not have been the last one for a moment (a connection of another thread of this process
    that has closed since). So one more connection, which reads and closes: if it is the last,
    SQLite checkpoints and deletes the WAL as it closes; if another process holds the file, the
    WAL stays as it is (no explicit checkpoint, which could empty it under that process too)."""
    try:
        conn = sqlite3.connect(live_db, timeout=0.2, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return not wal.exists() or wal.stat().st_size == 0


def _checkpoint_fully(path: Path, attempts: int = 10) -> bool:
    """Whether every frame of the WAL of ``path`` is now in the main file (a passive checkpoint,
    which waits for no one, tried a few times as readers end), and it has no auto-vacuum."""
    try:
        conn = sqlite3.connect(path, timeout=0.05, isolation_level=None, check_same_thread=False)
    except sqlite3.Error:
        return False
    try:
        if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 0:
            return False
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            return False
        for attempt in range(attempts):
            busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy and log == done:
                return True
            time.sleep(0.02)
        return False
    except sqlite3.Error:
        return False
    finally:
        conn.close()


async def run(manager: BackupManager, job: Job, request: RestoreRequest) -> None:
    """The partial restore of ``job.key`` (or a dry run of it); ``job.summary`` gets the summary.

    Raises with the reason (the manager records it) and then has changed nothing."""
    store = manager.collections
    assert store is not None, "a partial restore needs the collections (App sets them)"
    root = manager.datadir.root
    work = root / WORK_DIR
    token = random_string(10, "abcdefghijklmnopqrstuvwxyz0123456789")
    started_at = format_datetime(job.started_at)
    await asyncio.to_thread(_fresh_dir, work)
    if not request.dry_run:
        await asyncio.to_thread(_write_json, work / "journal.json",
                                {"phase": "started", "token": token, "key": job.key, "startedAt": started_at})
    restorer: _Restorer | None = None
    held: set[str] = set()
    storage = manager.storage()
    clock = _Clock()

    def set_total(total: int) -> None:
        job.bytes_total, job.bytes_done = total, 0

    try:
        info = await storage.stat(job.key)
        job.bytes_total = info.size if info is not None else 0
        from .manager import _in_background, job_plain_copy  # (the manager imports this module)

        async with job_plain_copy(manager, job) as zip_path:
            faults.point("partial-fetched")
            # One pass for data.db and the files of the collections of those names now (a backup
            # mostly has the same ids); a second one for the files of any other id it turns out to
            # have. Files land in work/db/storage/<collectionId>/...
            guessed = tuple(f"storage/{found.id}/" for found in (store.find(name) for name in request.collections or ())
                            if found is not None)
            loop = asyncio.get_running_loop()
            db_out: asyncio.Future[None] = loop.create_future()

            def on_verified(name: str, _path: Path) -> None:
                if name == "data.db":
                    loop.call_soon_threadsafe(lambda: db_out.done() or db_out.set_result(None))

            # The records are counted from the moment data.db's bytes match the manifest, while
            # its database check and the files go on (without a manifest: once all is checked).
            extracting = asyncio.ensure_future(_in_background(
                archive.extract, zip_path, work / "db", job.advance, job.cancel, set_total, False,
                lambda path: path == "data.db" or (bool(guessed) and path.startswith(guessed)), on_verified))
            counting: asyncio.Future[None] | None = None
            syncing: asyncio.Future[None] | None = None
            hashing: asyncio.Future[None] | None = None
            try:
                await asyncio.wait([extracting, db_out], return_when=asyncio.FIRST_COMPLETED)
                if not db_out.done():
                    await extracting
                restorer = await asyncio.to_thread(_Restorer, root, work / "db" / "data.db", work / "db", work,
                                                   request, token)
                await asyncio.to_thread(restorer.resolve)
                if not request.dry_run:
                    names = {t.name.lower() for t in restorer.targets} | {
                        t.current["name"].lower() for t in restorer.targets if t.current is not None}
                    async with manager.db.writes_paused():  # no write to them commits from now on
                        store.restoring |= names
                        held = names
                # Beside the count and the rest of the extraction: the current files hashed, and (a
                # replace, which may swap data.db for the extracted one) the extracted data.db
                # written to disk.
                sync = not request.dry_run and request.mode == "replace"

                def start_sync() -> None:
                    nonlocal syncing
                    if sync and syncing is None:
                        syncing = asyncio.ensure_future(asyncio.to_thread(fsync_path, work / "db" / "data.db"))

                counting = asyncio.ensure_future(_count_records(restorer, manager.db, not request.dry_run, start_sync))
                hashing = loop.run_in_executor(_FILE_THREADS, restorer.hash_live_files)
                manifest = await extracting
                restorer.manifest_files = (manifest or {}).get("files")
                clock.lap("extracted")
                missing = tuple(p for p in restorer.storage_prefixes() if p not in guessed)
                if missing:
                    await _in_background(archive.extract, zip_path, work / "more", job.advance, job.cancel,
                                         set_total, False, lambda path: path.startswith(missing))
                    await asyncio.to_thread(_merge_dirs, work / "more" / "storage", work / "db" / "storage")
                await hashing
                await _in_background(restorer.plan_files)  # (beside the count, too)
                await counting
                start_sync()  # (if the count failed before its pin)
                if syncing is not None:
                    await syncing
            except BaseException:
                await asyncio.wait([f for f in (extracting, counting, syncing, hashing) if f is not None])
                if not extracting.cancelled() and extracting.exception() is not None:
                    raise extracting.exception() from None  # a damaged backup first, as it is the cause
                raise
        clock.lap("fetched, verified and counted")
        faults.point("partial-verified")
        job.summary = await asyncio.to_thread(restorer.summarize)
        clock.lap("summary")
        if not request.dry_run and await asyncio.to_thread(restorer.choose_file_mode):
            await _swap_file(restorer, manager, job, held, clock)
            held = set()
            return
        await _build(restorer, manager.db, job)
        clock.lap("built")
        if request.dry_run:
            return
        await asyncio.to_thread(restorer.journal, job.key, started_at, "staged")
        await asyncio.to_thread(restorer.stage_added)
        faults.point("partial-staged")
        async with manager.db.writes_paused():
            await asyncio.to_thread(restorer.switch)
            faults.point("partial-committed")
            await store.reload()
            store.restoring -= held
            held = set()
        clock.lap("switched")
        await asyncio.to_thread(restorer.finish_files)
        faults.point("partial-files-done")
        await _drop_tables(restorer, manager.db, [t.old for t in restorer.targets if t.current is not None
                                                   and t.action != "keep"])
        await asyncio.to_thread(restorer.forget)
        clock.lap("old tables deleted")
        logger.info("partial restore of %s (%s): %s; %s", job.key, ", ".join(t.name for t in restorer.targets), clock,
                    "; ".join(restorer.notes))
    except BaseException:
        if restorer is not None and not restorer.committed:
            await _abort(restorer, manager.db)
        raise
    finally:
        store.restoring -= held
        if restorer is not None:
            await asyncio.to_thread(restorer.close)
        if restorer is None or not restorer.committed or (work / "journal.json").exists() is False:
            await asyncio.to_thread(_discard, work, manager.datadir.temp, token)


async def _swap_file(restorer: _Restorer, manager: BackupManager, job: Job, held: set[str], clock: _Clock) -> None:
    """The replace by a new data.db (``_Restorer.choose_file_mode``)."""
    store = manager.collections
    assert store is not None
    await asyncio.to_thread(faults.gate, "partial-copy")  # (tests hold the job here)
    await asyncio.to_thread(restorer.build_file)
    await asyncio.to_thread(faults.gate, "partial-copy")
    faults.point("partial-copying")
    clock.lap("new data.db built")
    await asyncio.to_thread(restorer.journal, job.key, format_datetime(job.started_at), "staged")
    await asyncio.to_thread(restorer.stage_added)
    faults.point("partial-staged")
    async with manager.db.writes_paused():
        await asyncio.to_thread(restorer.copy_live)
        await manager.db.replace_file(restorer.swap_file)
        faults.point("partial-committed")
        await asyncio.to_thread(restorer.reconnect)
        await store.reload()
        store.restoring -= held
    clock.lap("rest copied and switched")
    await asyncio.to_thread(restorer.finish_files)
    faults.point("partial-files-done")
    await asyncio.to_thread(restorer.forget)
    clock.lap("files")
    logger.info("partial restore of %s (%s, data.db swapped): %s; %s", job.key,
                ", ".join(t.name for t in restorer.targets), clock, "; ".join(restorer.notes))


async def _abort(restorer: _Restorer, db: Database) -> None:
    """Undo what an uncommitted restore did: the files moved in, the shadow tables."""
    try:
        await asyncio.to_thread(restorer.undo_staged)
        await asyncio.to_thread((restorer.work / "journal.json").unlink, True)
        if not restorer.dry_run and not restorer.file_mode:
            tables = await asyncio.to_thread(restorer.leftover_tables)
            await _drop_tables(restorer, db, tables)
    except Exception:  # the next start finishes it (recover)
        logger.exception("cleaning up after a failed partial restore")


class _Clock:
    """Where a job's time goes (for the log)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.laps: list[str] = []

    def lap(self, what: str) -> None:
        now_ = time.monotonic()
        self.laps.append(f"{what} {now_ - self._last:.2f} s")
        self._last = now_

    def __str__(self) -> str:
        return ", ".join(self.laps)


def _merge_dirs(source: Path, target: Path) -> None:
    """Move the entries of ``source`` (collection directories) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        for entry in os.listdir(source):
            if not (target / entry).exists():
                os.rename(source / entry, target / entry)


_DISCARD_THREADS = background_pool(1, "partial-discard")
_FILE_THREADS = background_pool(1, "partial-files")


def _discard(work: Path, temp: Path, token: str) -> None:
    """Remove the work directory: at once from where the next job looks, then its content (the
    extracted files, the replaced data.db) in the background, at low priority: the job is done
    without waiting for the blocks to be freed. Whatever a crash leaves in ``temp`` goes at the
    next start (``DataDir.prepare``)."""
    trash = temp / f"partial_restore_{token}"
    try:
        temp.mkdir(exist_ok=True)
        os.rename(work, trash)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        return
    _DISCARD_THREADS.submit(shutil.rmtree, trash, True)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.chmod(path, 0o700)


# --- the summary of a full restore's dry run ----------------------------------------------


def summarize_full(root: Path, extracted: Path, work: Path) -> dict[str, Any]:
    """What a full restore of the backup extracted in ``extracted`` would change, per collection."""
    work.mkdir(parents=True, exist_ok=True)
    restorer = _Restorer(root, extracted / "data.db", extracted, work, RestoreRequest(None, "replace", True), "dry")
    try:
        restorer.resolve()
        return restorer.summarize()
    finally:
        restorer.close()


# --- at start --------------------------------------------------------------------------------


def recover(root: Path) -> dict[str, Any] | None:
    """Settle what a crash left of a partial restore (blocking; before the databases are used
    by anyone): complete a committed one's file work, take back an uncommitted one's, drop the
    shadow and old tables. Returns the job's outcome (``key``, ``startedAt``, ``ok``, ``error``)
    when a journal said which job it was."""
    work = root / WORK_DIR
    journal = _read_json(work / "journal.json")
    db_path = root / "data.db"
    if not db_path.exists():
        shutil.rmtree(work, ignore_errors=True)
        return None
    conn = _connect(db_path)
    try:
        try:
            marker = conn.execute("SELECT value FROM _params WHERE id = ?", (MARKER,)).fetchone()
        except sqlite3.OperationalError:
            marker = None
        token = json.loads(marker[0]).get("token") if marker is not None else None
        outcome = None
        if journal is not None:
            committed = bool(token) and token == journal.get("token")
            if committed:
                logger.warning("completing the files of a partial restore the process was stopped in")
                apply_file_plan(work / "journal.json")
            else:
                logger.warning("a partial restore was interrupted before its commit: nothing of it is kept")
                undo_file_plan(work / "journal.json")
            if journal.get("key"):
                outcome = {"key": journal["key"], "startedAt": journal.get("startedAt", ""), "ok": committed,
                           "error": None if committed else
                           "the partial restore was interrupted before it completed; nothing was changed"}
            (work / "journal.json").unlink(missing_ok=True)
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
            (TABLE_PREFIX.replace("_", "\\_") + "%",))]
        if tables or marker is not None:
            conn.execute("BEGIN IMMEDIATE")
            for table in tables:
                conn.execute(f"DROP TABLE IF EXISTS {F.quote(table)}")
            conn.execute("DELETE FROM _params WHERE id = ?", (MARKER,))
            conn.execute("COMMIT")
    finally:
        conn.close()
    shutil.rmtree(work, ignore_errors=True)
    return outcome


def collection_counts(db_path: Path, files: list[str]) -> dict[str, dict[str, int]] | None:
    """Records and files of each collection (by name), for a backup's manifest; ``files`` are the
    archive names of the storage files. None if the database cannot tell."""
    try:
        conn = _connect(db_path, readonly=True)
    except sqlite3.Error:
        return None
    try:
        rows = _rows(conn, "SELECT id, name FROM _collections")
        by_id = {row["id"]: row["name"] for row in rows}
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            try:
                count = int(conn.execute(f"SELECT count(*) FROM {F.quote(row['name'])}").fetchone()[0])
            except sqlite3.Error:
                count = 0
            out[row["name"]] = {"records": count, "files": 0}
        for name in files:
            parts = name.split("/")
            if len(parts) >= 3 and parts[0] == "storage" and parts[1] in by_id:
                out[by_id[parts[1]]]["files"] += 1
        return out
    except sqlite3.Error:
        return None
    finally:
        conn.close()

