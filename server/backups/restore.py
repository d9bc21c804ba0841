"""Swapping a verified backup into ``pb_data``, and finishing or undoing that swap at the next start.

The swap runs with every database closed, just before the process re-executes itself:

1. ``journal.json`` in ``.pb_restore/`` records the plan (phase ``swapping``) and is fsynced.
2. Every entry of ``pb_data`` except ``KEPT`` moves into ``.pb_restore/old/``; every entry of
   the extracted backup moves into ``pb_data``. Each move is a rename in one file system.
3. The journal says ``swapped``.

At the next start (``recover``), before anything opens a database:

- phase ``swapping`` (the process died mid-swap): undo it, the old data comes back;
- phase ``swapped``: the caller tries to open the new data; ``commit`` deletes the old data if it
  did, ``rollback`` puts the old data back if it did not;
- phase ``preserving``: the new data booted and is served, and the old data, still in
  ``.pb_restore/old/``, is to become the safety copy ``@pre_restore_<app>_<UTC time>.zip``
  (planned by ``swap_in``'s ``safety``; written by the backup manager). It is deleted only once
  that backup is published (``preserved``), so a crash while the copy is written leaves it to be
  copied again at the next start.

So the data directory always ends up holding either the complete old data or the complete new
data, the old data is deleted only after the new data has booted, and, with a safety copy
asked for, only after it is a backup.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import faults
from ..storage.s3_uploads import RECORD_FILE
from ..tools.fsync import fsync_dir
from ..tools.security import random_string

logger = logging.getLogger("server.backups")

WORK_DIR = ".pb_restore"
TEMP_DIR = ".pb_temp_to_delete"
# Entries of pb_data that a restore leaves where they are.
KEPT = frozenset({"backups", ".pb_temp_to_delete", WORK_DIR, ".pb_backup.lock", RECORD_FILE, RECORD_FILE + ".tmp"})


@dataclass
class Outcome:
    """How a restore ended, as learnt at start-up."""

    key: str
    started_at: str
    ok: bool
    error: str | None = None
    verified: str | None = None  # the verification tier (``archive.tier``) of the restored backup


def _write_journal(root: Path, journal: dict[str, Any]) -> None:
    work = root / WORK_DIR
    temp = work / "journal.json.tmp"
    with open(temp, "w") as handle:
        json.dump(journal, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, work / "journal.json")
    fsync_dir(work)


def read_journal(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / WORK_DIR / "journal.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:
        # A journal cut short: written before any move (it is replaced atomically), so nothing moved.
        return {"phase": "swapping", "old": [], "new": [], "key": "", "startedAt": ""}


def swap_in(root: Path, new_dir: Path, key: str, started_at: str, verified: str | None = None,
            safety: dict[str, Any] | None = None) -> None:
    """Move the current data aside and the extracted backup ``new_dir`` in (databases closed).

    ``safety``: the safety copy the current data is to become once the new data is served
    (``{"key", "keep", "app"}``: its name, how many such copies are kept, the app's name), decided
    now, by the settings of the data replaced; None: the old data is deleted."""
    faults.raise_point("restore-swap")
    work = root / WORK_DIR
    if preserving(root) is not None:  # (the manager saves it before it lets a restore begin)
        raise RuntimeError("the data replaced by the previous restore is not saved yet")
    if work.is_dir() and not work.is_symlink():
        shutil.rmtree(work)  # what a finished restore failed to delete
    elif work.exists() or work.is_symlink():
        work.unlink()
    (work / "old").mkdir(parents=True)
    os.chmod(work, 0o700)
    old = sorted(name for name in os.listdir(root) if name not in KEPT)
    new = sorted(name for name in os.listdir(new_dir) if name not in KEPT)
    journal = {"phase": "swapping", "key": key, "startedAt": started_at, "old": old, "new": new,
               "newDir": str(new_dir), "verified": verified}
    if safety is not None:
        journal["safety"] = safety
    _write_journal(root, journal)
    faults.point("restore-before-swap")
    for index, name in enumerate(old):
        os.rename(root / name, work / "old" / name)
        if index == 0:
            faults.point("restore-mid-swap")
    for name in new:
        os.rename(new_dir / name, root / name)
    fsync_dir(root)
    fsync_dir(work / "old")
    journal["phase"] = "swapped"
    _write_journal(root, journal)
    faults.point("restore-after-swap")


def _undo(root: Path, journal: dict[str, Any]) -> None:
    """Put the old data back: the new entries go to a trash directory, the old ones return."""
    work = root / WORK_DIR
    trash = work / f"failed_{random_string(8)}"
    trash.mkdir()
    old_names = set(journal.get("old", []))
    for name in journal.get("new", []):
        if (root / name).exists() or (root / name).is_symlink():
            # A new entry with the name of an old one that never moved out is the old one itself.
            if name in old_names and not (work / "old" / name).exists():
                continue
            os.rename(root / name, trash / name)
    for name in journal.get("old", []):
        if (work / "old" / name).exists():
            if (root / name).exists():
                os.rename(root / name, trash / (name + ".dup"))
            os.rename(work / "old" / name, root / name)
    fsync_dir(root)


def _finish(root: Path, background: bool = False) -> None:
    """Forget the journal, then delete what was set aside.

    ``background``: the deletion (seconds for a large database) is not waited for: the work
    directory is renamed into the temp directory (which every start empties, should the process
    stop first) and deleted there by a thread, so the server serves the new data at once."""
    work = root / WORK_DIR
    (work / "journal.json").unlink(missing_ok=True)
    fsync_dir(work)
    if background:
        doomed = root / TEMP_DIR / f"restored_{random_string(8)}"
        try:
            doomed.parent.mkdir(exist_ok=True)
            os.rename(work, doomed)
        except OSError:
            pass
        else:
            threading.Thread(target=shutil.rmtree, args=(doomed, True), name="restore-cleanup", daemon=True).start()
            return
    shutil.rmtree(work, ignore_errors=True)


def interrupted(root: Path) -> Outcome | None:
    """Undo a swap that a crash cut short (phase ``swapping``); ``None`` if there was none.

    A work directory without a journal is what a crash left of a restore that had not begun to
    move anything (the journal is written first) or that had ended (the journal is removed last,
    before the work directory): nothing in it is data any more, and it is deleted."""
    journal = read_journal(root)
    if journal is None:
        work = root / WORK_DIR
        if work.is_dir() and not work.is_symlink():
            logger.warning("removing what an ended restore left in %s", WORK_DIR)
            shutil.rmtree(work, ignore_errors=True)
        return None
    if journal.get("phase") != "swapping":
        return None
    logger.warning("a restore was interrupted during the swap: putting the previous data back")
    _undo(root, journal)
    _finish(root)
    return Outcome(journal.get("key", ""), journal.get("startedAt", ""), False,
                   "the restore was interrupted while swapping the data; the previous data was kept",
                   journal.get("verified"))


def pending(root: Path) -> dict[str, Any] | None:
    """The journal of a swap that completed and awaits its first boot."""
    journal = read_journal(root)
    return journal if journal is not None and journal.get("phase") == "swapped" else None


def preserving(root: Path) -> dict[str, Any] | None:
    """The journal of a restore whose new data is served and whose old data awaits its safety copy."""
    journal = read_journal(root)
    return journal if journal is not None and journal.get("phase") == "preserving" else None


def committed_outcome(root: Path) -> Outcome | None:
    """The outcome of a restore that was committed (phase ``preserving``), or None."""
    journal = preserving(root)
    if journal is None:
        return None
    return Outcome(journal.get("key", ""), journal.get("startedAt", ""), True, None, journal.get("verified"))


def replaced_dir(root: Path) -> Path:
    """Where the data replaced by a restore waits (phase ``preserving``)."""
    return root / WORK_DIR / "old"


def commit(root: Path, journal: dict[str, Any], background: bool = False) -> Outcome:
    """The new data booted: the old data is deleted, or, with a safety copy planned, kept until it
    has become that backup (phase ``preserving``; the manager writes it, then calls ``preserved``)."""
    faults.point("restore-before-commit")
    if journal.get("safety"):
        _write_journal(root, {**journal, "phase": "preserving"})
    else:
        _finish(root, background)
    return Outcome(journal.get("key", ""), journal.get("startedAt", ""), True, None, journal.get("verified"))


def preserved(root: Path, background: bool = False) -> None:
    """The safety copy is published (or none is wanted any more): the old data goes."""
    faults.point("restore-before-forget")
    _finish(root, background)


def rollback(root: Path, journal: dict[str, Any], reason: str) -> Outcome:
    logger.error("the restored data did not start (%s): putting the previous data back", reason)
    _undo(root, journal)
    _finish(root)
    return Outcome(journal.get("key", ""), journal.get("startedAt", ""), False,
                   f"the restored data did not start ({reason}); the previous data was kept", journal.get("verified"))
