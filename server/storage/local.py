"""Backups on the local disk: one flat directory, files published by an atomic link."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..tools.fsync import fsync_dir
from ..tools.security import random_string
from .base import (CHUNK_SIZE, FileInfo, Progress, Storage, StorageError, StoredFileExists, StoredFileMissing, Writer,
                   check_key, check_meta_name)

FILE_MODE = 0o600
DIR_MODE = 0o700


def _info(key: str, st: os.stat_result) -> FileInfo:
    return FileInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))



def _publish(source: Path, target: Path) -> None:
    """Give ``source`` the name ``target`` unless ``target`` exists (atomically where the file
    system has hard links), then forget ``source``."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise StoredFileExists("a file with that name already exists") from None
    except OSError:
        # No hard links here (some FUSE or network file systems): a check-then-rename instead.
        if target.exists():
            raise StoredFileExists("a file with that name already exists") from None
        os.replace(source, target)
    else:
        source.unlink()
    fsync_dir(target.parent)


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, refusing a symbolic link in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileNotFoundError(str(path)) from None
        raise
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise IsADirectoryError(str(path))
    return handle


class LocalWriter(Writer):
    def __init__(self, target: Path, temp_dir: Path) -> None:
        self._target = target
        self._temp = temp_dir / f"upload_{random_string(12)}.part"
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._done = False

    # zipfile uses seek/tell where it can, to fill in entry sizes after the data.
    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        assert self._file is not None
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        assert self._file is not None
        return self._file.tell()

    def write(self, data: Any) -> int:
        assert self._file is not None, "writer is closed"
        written = self._file.write(data)
        self.bytes_written += written
        return written

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def commit(self) -> FileInfo:
        assert self._file is not None and not self._done, "writer is closed"
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            _publish(self._temp, self._target)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return _info(self._target.name, self._target.stat())

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()  # flushes what is buffered: fails again on a full disk
            except OSError:
                pass
        if not self._done:
            self._temp.unlink(missing_ok=True)
            self._done = True


class LocalStorage(Storage):
    """Files in ``root``; work in progress in ``temp_dir``, which must be on the same file system
    (both live in ``pb_data``) so that publishing is a rename, not a copy."""

    kind = "local"

    def __init__(self, root: Path, temp_dir: Path) -> None:
        self.root = root
        self.temp_dir = temp_dir

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _ensure_dirs(self) -> None:
        for directory in (self.root, self.temp_dir):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                os.chmod(directory, DIR_MODE)

    async def list(self, prefix: str = "") -> list[FileInfo]:
        def scan() -> list[FileInfo]:
            found = []
            try:
                entries = list(os.scandir(self.root))
            except FileNotFoundError:
                return []
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.startswith(prefix):
                    continue
                try:
                    check_key(entry.name)
                    st = entry.stat(follow_symlinks=False)
                except (StorageError, OSError):
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append(_info(entry.name, st))
            return sorted(found, key=lambda info: info.key)

        return await asyncio.to_thread(scan)

    async def stat(self, key: str) -> FileInfo | None:
        path = self._path(key)

        def look() -> FileInfo | None:
            try:
                st = os.stat(path, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            return _info(key, st) if stat.S_ISREG(st.st_mode) else None

        return await asyncio.to_thread(look)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(_open_regular, path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoredFileMissing("no such file") from None
        try:
            await asyncio.to_thread(handle.seek, start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                size = CHUNK_SIZE if left is None else min(CHUNK_SIZE, left)
                chunk = await asyncio.to_thread(handle.read, size)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    def open_write(self, key: str) -> LocalWriter:
        target = self._path(key)
        self._ensure_dirs()
        return LocalWriter(target, self.temp_dir)

    async def put_file(self, key: str, path: Path, progress: Progress | None = None) -> FileInfo:
        target = self._path(key)

        def move() -> FileInfo:
            self._ensure_dirs()
            os.chmod(path, FILE_MODE)
            if os.stat(path).st_dev != os.stat(self.root).st_dev:
                raise OSError("different file systems")
            _publish(path, target)
            return _info(key, target.stat())

        try:
            return await asyncio.to_thread(move)
        except StoredFileExists:
            raise
        except OSError:
            return await super().put_file(key, path, progress)

    @asynccontextmanager
    async def local_copy(self, key: str, temp_dir: Path, progress: Progress | None = None) -> AsyncIterator[Path]:
        if await self.stat(key) is None:
            raise StoredFileMissing("no such file")
        yield self._path(key)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink)
        except (FileNotFoundError, IsADirectoryError):
            raise StoredFileMissing("no such file") from None

    def open_ranged(self, key: str) -> BinaryIO:
        try:
            return _open_regular(self._path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoredFileMissing("no such file") from None

    async def read_meta(self, name: str) -> bytes | None:
        path = self.root / check_meta_name(name)

        def read() -> bytes | None:
            try:
                with _open_regular(path) as handle:
                    return handle.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

        return await asyncio.to_thread(read)

    async def write_meta(self, name: str, data: bytes) -> None:
        path = self.root / check_meta_name(name)

        def write() -> None:
            self._ensure_dirs()
            temp = self.root / f"{name}.{random_string(8)}.tmp"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            fsync_dir(self.root)

        await asyncio.to_thread(write)

    async def delete_meta(self, name: str) -> None:
        path = self.root / check_meta_name(name)
        await asyncio.to_thread(path.unlink, True)

    async def free_bytes(self) -> int | None:
        def free() -> int:
            place = self.root if self.root.is_dir() else self.root.parent
            return shutil.disk_usage(place).free

        return await asyncio.to_thread(free)
