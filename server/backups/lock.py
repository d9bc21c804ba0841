"""One backup job at a time across processes: the server and the CLI share ``pb_data/.pb_backup.lock``.

Two byte-range locks (``fcntl.lockf``) on that file:

- byte 0, exclusive, while a backup job (create, upload, restore, delete or prune from the CLI)
  runs in some process;
- byte 1, shared, for as long as a server process serves this data directory, so that the CLI
  can tell that a server is running (a restore must then go through the server's API).

The kernel drops a process's locks when it exits or re-executes itself (the descriptor is
close-on-exec), so a crash never leaves a stale lock. POSIX record locks belong to the process
and are all released when any descriptor of the file is closed: this module keeps one
descriptor per process and never closes it while a lock is held. The lock file stays in place
through a restore's swap (``restore.KEPT``).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

LOCK_FILE = ".pb_backup.lock"
_JOB = 0
_SERVER = 1

_descriptors: dict[Path, int] = {}
_serving: set[Path] = set()
_guard = threading.Lock()


def _descriptor(path: Path) -> int:
    with _guard:
        fd = _descriptors.get(path)
        if fd is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _descriptors[path] = fd
        return fd


def _try(fd: int, mode: int, start: int) -> bool:
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB, 1, start)
    except (BlockingIOError, PermissionError):
        return False
    return True


class ProcessLock:
    def __init__(self, root: Path) -> None:
        self.path = root.resolve() / LOCK_FILE

    def try_job(self) -> bool:
        """Take the job lock if no process holds it (without waiting)."""
        return _try(_descriptor(self.path), fcntl.LOCK_EX, _JOB)

    def release_job(self) -> None:
        fcntl.lockf(_descriptor(self.path), fcntl.LOCK_UN, 1, _JOB)

    def hold_server(self) -> bool:
        """Mark this process as a server of the data directory (until ``release_server`` or exit);
        ``False`` while a restore from the command line holds the data directory."""
        if self.path in _serving:
            return True
        if not _try(_descriptor(self.path), fcntl.LOCK_SH, _SERVER):
            return False
        _serving.add(self.path)
        return True

    def try_exclusive(self) -> bool:
        """Claim the data directory for this process alone (a restore from the command line): no
        server runs, and none can start until ``release_exclusive`` or exit."""
        return _try(_descriptor(self.path), fcntl.LOCK_EX, _SERVER)

    def release_exclusive(self) -> None:
        fcntl.lockf(_descriptor(self.path), fcntl.LOCK_UN, 1, _SERVER)

    def release_server(self) -> None:
        if self.path in _serving:
            _serving.discard(self.path)
            fcntl.lockf(_descriptor(self.path), fcntl.LOCK_UN, 1, _SERVER)

    def server_running(self) -> bool:
        """Whether a server (this process, or another) serves this data directory."""
        if self.path in _serving:
            return True  # (probing below would drop this process's own lock)
        fd = _descriptor(self.path)
        if _try(fd, fcntl.LOCK_EX, _SERVER):
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SERVER)
            return False
        return True
