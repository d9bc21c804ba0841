"""``python -m server backup ...``: the backup manager from a shell.

The same ``BackupManager`` and storage (local or S3, per the saved settings) as the server, and
the same lock (``pb_data/.pb_backup.lock``): the CLI and a running server never run two jobs at
once. A restore needs the data directory to itself, so it is refused while a server runs (the
server's API restores without downtime for the clients).

Results go to standard output; progress and errors to standard error: a bar on a terminal, a
plain line per step otherwise. Exit code 0 on success, 1 on failure (with the reason).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from . import replica_cli
from .app import App, opened
from .backups import archive, crypto, partial, restore
from .backups.manager import AUTO_PREFIX, BUSY_MESSAGE, Busy, BackupManager, RestoreReady, describe_error
from .errors import ApiError, NotFound
from .tools.times import format_datetime

SERVER_RUNNING = ("A server is running on this data directory: restore through its API instead "
                  "(POST /api/backups/{key}/restore), which keeps clients waiting rather than refused.")


class Failure(Exception):
    """A command failed; the message says why (exit code 1)."""


# --- progress ------------------------------------------------------------------------------------


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


class Progress:
    """A byte counter shown as a bar on a terminal, or as a plain line per step (and per quarter of
    each step) when the output is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr, bar: bool | None = None) -> None:
        self.stream = stream
        self.bar = stream.isatty() if bar is None else bar
        self._tqdm: Any = None
        self._step = ""
        self._started = time.monotonic()
        self._quarter = 0

    def step(self, label: str, total: int = 0) -> None:
        """A new step of ``total`` bytes (0 when unknown)."""
        self._close_bar()
        self._step, self._started, self._quarter = label, time.monotonic(), 0
        if self.bar and total:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label,
                              file=self.stream, dynamic_ncols=True, leave=True)
        else:
            self.line(f"{label}" + (f" ({_mb(total)})" if total else "") + " ...")

    def update(self, done: int, total: int) -> None:
        if self._tqdm is not None:
            if total and self._tqdm.total != total:
                self._tqdm.total = total
            self._tqdm.update(done - self._tqdm.n)
            return
        if self.bar or not total:
            return
        quarter = min(4, done * 4 // total)
        if quarter > self._quarter and quarter < 4:
            self._quarter = quarter
            elapsed = max(time.monotonic() - self._started, 1e-6)
            self.line(f"  {quarter * 25}%: {_mb(done)} of {_mb(total)}, {done / elapsed / 1e6:.1f} MB/s")

    def done(self, message: str = "") -> None:
        self._close_bar()
        if message:
            self.line(message)

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


async def _follow(manager: BackupManager, progress: Progress, work: Awaitable[Any]) -> Any:
    """Await ``work`` while showing the manager's job progress."""
    task = asyncio.ensure_future(work)
    job = manager.active
    while not task.done():
        job = manager.active or job
        if job is not None:
            progress.update(job.bytes_done, job.bytes_total)
        await asyncio.wait({task}, timeout=0.1)
    if job is not None:  # where the job ended (the bar would otherwise stop at its last poll)
        progress.update(job.bytes_done, job.bytes_total)
    return task.result()


# --- commands ------------------------------------------------------------------------------------


async def list_backups(app: App, args: argparse.Namespace, progress: Progress) -> None:
    files, pinned = await app.backups.list_with_pins()
    if args.json:  # the API's list, field for field
        print(json.dumps([{"key": f.key, "size": f.size, "modified": format_datetime(f.modified),
                           **({"pinned": f.key in pinned} if pinned is not None else {})} for f in files], indent=1))
        return
    if not files:
        progress.line(f"No backups in {app.backups.storage().describe()['kind']} storage.")
        return
    width = max(len(f.key) for f in files)
    for f in files:
        print(f"{f.key:<{width}}  {f.size:>14,d}  {format_datetime(f.modified)}"
              + ("  pinned" if pinned and f.key in pinned else ""))


async def create_backup(app: App, args: argparse.Namespace, progress: Progress) -> None:
    manager = app.backups
    started = time.monotonic()
    key = await manager.start_create(args.name or None, created_by={"kind": "cli"})
    job = manager.active  # kept: a small backup may be over before the first look at it
    progress.step(f"Creating {key} ({manager.storage().describe()['kind']} storage)")
    while manager.active is job and job is not None and job.bytes_total == 0:
        await asyncio.sleep(0.01)  # the job lists its files first
    if job is not None and job.bytes_total:
        progress.step("Writing the archive", job.bytes_total)
    await _follow(manager, progress, manager.wait())
    last = manager.last or {}
    if last.get("key") != key or not last.get("ok"):
        raise Failure(f"The backup failed: {last.get('error') or 'unknown error'}")
    info = await manager.stat(key)
    size = f", {_mb(info.size)}" if info is not None else ""
    progress.done(f"Done in {time.monotonic() - started:.1f} s.")
    print(f"Created {key}{size}")


async def verify_backup(app: App, args: argparse.Namespace, progress: Progress) -> None:
    labels = {"fetch": "Downloading", "extract": "Extracting and checking"}
    current = {"step": ""}

    def report(step: str, done: int, total: int) -> None:
        if step != current["step"]:
            current["step"] = step
            progress.step(labels.get(step, step), total)
        progress.update(done, total)

    try:
        result = await app.backups.verify(args.key, report, quick=args.quick, identities=read_identities(args))
    except archive.ArchiveError as exc:
        progress.done()
        raise Failure(f"{args.key} is NOT a valid backup: {exc}{_identity_hint(exc)}") from None
    checks = "manifest checksums, " if result["manifest"] else "no manifest (a PocketBase-style zip); "
    files = f"{result['files']} files, " if result["files"] is not None else ""
    check = "quick_check" if result["verified"] == archive.QUICK_TIER else "integrity_check"
    progress.done()
    encrypted = "encrypted (age), " if result.get("encrypted") else ""
    print(f"{args.key} is a valid backup: {encrypted}{files}{_mb(result['bytes'])}; {checks}databases pass {check}.")


def read_identities(args: argparse.Namespace) -> crypto.Identities | None:
    """The identities of ``--identity-file`` (an age identity file, as age-keygen writes; ``-``:
    standard input), or None. The file's content is never shown."""
    path = getattr(args, "identity_file", None)
    if not path:
        return None
    try:
        if path == "-":
            text = sys.stdin.read(crypto.MAX_IDENTITY_TEXT + 1)
        else:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read(crypto.MAX_IDENTITY_TEXT + 1)
    except OSError as exc:
        raise Failure(f"Cannot read the identity file: {exc.strerror or type(exc).__name__}") from None
    try:
        return crypto.parse_identities(text)
    except crypto.IdentityError:
        raise Failure("The identity file holds no age identity (AGE-SECRET-KEY-1... lines, as age-keygen writes).") \
            from None


def _identity_hint(reason: object) -> str:
    return " (pass --identity-file KEY.txt)" if str(reason) == crypto.IDENTITY_REQUIRED else ""


async def delete_backup(app: App, args: argparse.Namespace, progress: Progress) -> None:
    async with _job_lock(app):
        await app.backups.delete(args.key)
    print(f"Deleted {args.key}")


async def prune_backups(app: App, args: argparse.Namespace, progress: Progress) -> None:
    if args.keep < 0:
        raise Failure("--keep must be 0 or more")
    result = await app.backups.prune_backups(args.keep, "all" if args.all else "scheduled", args.dry_run)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    verb = "Would delete" if args.dry_run else "Deleted"
    for key in result["deleted"]:
        print(f"{verb} {key}")
    kind = "unpinned backups" if args.all else "unpinned scheduled (@auto_) backups"
    done = "would be deleted" if args.dry_run else "deleted"
    progress.line(f"Kept the newest {args.keep} {kind}: {len(result['deleted'])} {done}, "
                  f"{_mb(result['freedBytes'])} freed; {result['before']} backups before, {result['after']} after.")


@asynccontextmanager
async def _job_lock(app: App) -> AsyncIterator[None]:
    """The backup lock for a short CLI job (delete, prune)."""
    if not app.backups.lock.try_job():
        raise Busy()
    try:
        yield
    finally:
        app.backups.lock.release_job()


async def restore_backup(data_dir: str, args: argparse.Namespace, progress: Progress) -> None:
    """Restore with no server running: extract and verify, swap, then open the new data (the
    old data is put back if it does not open)."""
    app = App(data_dir)
    lock = app.backups.lock
    if not lock.try_exclusive():
        raise Failure(SERVER_RUNNING.replace("{key}", args.key))
    try:
        ready = await _prepare_restore(app, args.key, progress, read_identities(args))
        progress.step("Swapping the data")
        await asyncio.to_thread(restore.swap_in, app.datadir.root, ready.new_dir, ready.key, ready.started_at,
                                ready.verified, ready.safety)
        progress.step("Opening the restored data")
        async with opened(data_dir) as restored:  # commits the swap, or rolls it back
            outcome = restored.backups.last
            await restored.logs.prepare()  # "Backup restored" (or its failure), as a server logs it
            if outcome is not None and outcome.get("ok") and restore.preserving(restored.datadir.root) is not None:
                progress.step("Saving the replaced data as a backup")
                await _follow(restored.backups, progress, restored.backups.preserve_replaced())
            await restored.logs.flush()
    finally:
        lock.release_exclusive()
    if outcome is None or not outcome.get("ok"):
        reason = (outcome or {}).get("error") or "unknown error"
        raise Failure(f"The restored data did not open; the previous data was put back: {reason}")
    progress.done("Done.")
    print(f"Restored {args.key}")
    safety = (outcome or {}).get("safetyCopy")
    if safety is not None and safety.get("ok") and safety.get("key"):
        print(f"The replaced data was saved as {safety['key']}")
    elif safety is not None and not safety.get("ok"):
        progress.line(f"Warning: the replaced data could not be saved as a backup ({safety.get('error')}); it is kept "
                      "in the data directory and saved at the next start")


async def restore_partial(data_dir: str, args: argparse.Namespace, progress: Progress) -> None:
    """``restore KEY --collections a,b [--mode] [--dry-run]``, or a full restore's ``--dry-run``:
    the server's partial restore job, run here with the server stopped; prints the summary."""
    body: dict[str, Any] = {"dryRun": bool(args.dry_run)}
    if args.collections is not None:
        body["collections"] = [name.strip() for name in args.collections.split(",") if name.strip()]
        body["mode"] = args.mode or "merge"
    elif args.mode:
        body["mode"] = args.mode
    try:
        request = partial.parse_request(body)
    except ApiError as exc:
        raise Failure(describe_error(exc)) from None
    assert request is not None
    identities = read_identities(args)
    app = App(data_dir)
    lock = app.backups.lock
    if not lock.try_exclusive():
        raise Failure(SERVER_RUNNING.replace("{key}", args.key))
    try:
        await app.open()
        try:
            await app.logs.prepare()
            manager = app.backups
            await manager.start_restore(args.key, request, identities)
            what = "Dry run of" if request.dry_run else "Restoring"
            names = f" ({', '.join(request.collections)}, {request.mode})" if request.collections else ""
            progress.step(f"{what} {args.key}{names}")
            await _follow(manager, progress, manager.wait())
            last = manager.last or {}
        finally:
            await app.logs.flush()
            await app.close()
    finally:
        lock.release_exclusive()
    progress.done()
    if not last.get("ok"):
        reason = last.get("error") or "unknown error"
        raise Failure(f"The restore failed; nothing was changed: {reason}{_identity_hint(reason)}")
    summary = last.get("summary") or {"dryRun": request.dry_run, "collections": {}}
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(summary_table(summary))
    print("Dry run: nothing was changed." if request.dry_run else f"Restored {args.key}")


def summary_table(summary: dict[str, Any]) -> str:
    """A restore's summary, one line per collection."""
    header = ("collection", "action", "inserted", "updated", "deleted", "unchanged", "files added", "replaced",
              "removed")
    rows = [header]
    for name, item in summary.get("collections", {}).items():
        files = item.get("files", {})
        rows.append((name, item.get("action", ""), *(str(item.get(k, 0)) for k in ("inserted", "updated", "deleted",
                                                                                   "unchanged")),
                     *(str(files.get(k, 0)) for k in ("added", "replaced", "removed"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [cell.rjust(widths[i + 2])
                                                                      for i, cell in enumerate(row[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


async def _prepare_restore(app: App, key: str, progress: Progress,
                           identities: crypto.Identities | None = None) -> RestoreReady:
    ready: list[RestoreReady] = []

    async def keep(prepared: RestoreReady) -> None:
        ready.append(prepared)

    await app.open()
    try:
        await app.logs.prepare()  # a refused restore is logged, as by a server
        manager = app.backups
        manager.on_restore_ready = keep
        await manager.start_restore(key, None, identities)
        progress.step(f"Fetching, extracting and verifying {key}")
        await _follow(manager, progress, manager.wait())
        if not ready:
            last = manager.last or {}
            reason = last.get("error") or "unknown error"
            raise Failure(f"The backup was refused; nothing was changed: {reason}{_identity_hint(reason)}")
    finally:
        await app.logs.flush()
        await app.close()  # the databases are closed before the swap; the job lock stays taken
    return ready[0]


# --- wiring --------------------------------------------------------------------------------------


Command = Callable[[App, argparse.Namespace, Progress], Awaitable[None]]
COMMANDS: dict[str, Command] = {"list": list_backups, "create": create_backup, "verify": verify_backup,
                                "delete": delete_backup, "prune": prune_backups}


def add_parser(commands: Any, default_dir: str) -> None:
    backup = commands.add_parser("backup", help="list, create, verify, restore, delete and prune backups",
                                 description="Manage backups (local or S3, per the saved settings).")
    actions = backup.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=default_dir, help=f"the data directory (default {default_dir})")
    listing = actions.add_parser("list", parents=[common], help="list the backups")
    listing.add_argument("--json", action="store_true", help="as JSON, as the API's list")
    create = actions.add_parser("create", parents=[common], help="create a backup")
    create.add_argument("--name", help="the backup name (default: pb_backup_<app>_<UTC timestamp>.zip)")
    for name, text in (("restore", "restore a backup (the server must be stopped)"),
                       ("verify", "check a backup without restoring it"),
                       ("delete", "delete a backup")):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("key")
        if name == "verify":
            action.add_argument("--quick", action="store_true",
                                help="check the databases as a restore does (quick_check when the manifest's "
                                     "checksums match) instead of the full integrity_check")
        if name in ("restore", "verify"):
            action.add_argument("--identity-file", metavar="KEY.txt",
                                help="an age identity file (as age-keygen writes; '-': standard input) to decrypt "
                                     "an encrypted backup with; it is never stored")
        if name == "restore":
            action.add_argument("--collections", metavar="A,B",
                                help="restore only these collections (records and files); the rest is left alone")
            action.add_argument("--mode", choices=partial.MODES,
                                help="with --collections: merge (default: the backup's records written back, "
                                     "newer ones kept) or replace (the collections exactly as in the backup)")
            action.add_argument("--dry-run", action="store_true", help="change nothing; print what would change")
            action.add_argument("--json", action="store_true", help="print the summary as JSON")
    replica_cli.add_parser(actions)
    prune = actions.add_parser("prune", parents=[common], help="delete all but the newest scheduled backups")
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="how many to keep (0: delete all)")
    prune.add_argument("--all", action="store_true", help="consider every backup, not only the scheduled ones")
    prune.add_argument("--dry-run", action="store_true", help="delete nothing; print what would be deleted")
    prune.add_argument("--json", action="store_true", help="print {before, after, deleted, freedBytes} as JSON")


def run(args: argparse.Namespace) -> int:
    # Failures are reported once, as "Error: ..." lines; library warnings still show.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("server").setLevel(logging.CRITICAL)  # (its errors are the "Error:" line)
    logging.getLogger("server.storage").setLevel(logging.WARNING)
    if args.action == "replica":
        return replica_cli.run(args)
    progress = Progress()
    if getattr(args, "keep", 0) is not None and getattr(args, "keep", 0) < 0:
        print("--keep must be 0 or more", file=sys.stderr)
        return 2
    try:
        if not Path(args.dir).is_dir():
            raise Failure(f"No data directory at {args.dir}")
        if args.action == "restore" and (args.collections is not None or args.dry_run or args.mode):
            asyncio.run(restore_partial(args.dir, args, progress))
        elif args.action == "restore":
            asyncio.run(restore_backup(args.dir, args, progress))
        else:
            asyncio.run(_with_app(args, progress))
    except Failure as exc:
        progress.line(f"Error: {exc}")
        return 1
    except Busy:
        progress.line(f"Error: {BUSY_MESSAGE}")
        return 1
    except ApiError as exc:
        progress.line(f"Error: {describe_error(exc)}")
        return 1
    except KeyboardInterrupt:
        progress.line("Interrupted; nothing was published.")
        return 130
    except Exception as exc:  # an unexpected failure: its reason, without a traceback
        progress.line(f"Error: {describe_error(exc)}")
        return 1
    return 0


async def _with_app(args: argparse.Namespace, progress: Progress) -> None:
    async with opened(args.dir) as app:  # (it leaves the temp work of a job elsewhere alone)
        await app.logs.prepare()  # what the CLI does is logged in auxiliary.db too
        try:
            await COMMANDS[args.action](app, args, progress)
        except NotFound:
            raise Failure(f"No backup named {getattr(args, 'key', '')!r}") from None
        finally:
            await app.logs.flush()

