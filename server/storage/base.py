"""The storage interface shared by the local and S3 implementations."""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_SIZE = 1 << 20
MAX_KEY_LENGTH = 255
# Flat names only: no separators, no NUL or control characters, no leading dot (our temp and
# status files), so a key can never name a path outside the store or one of its working files.
Progress = Callable[[int], None]
_KEY_RE = re.compile(r"^[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*$")
# The store's own small files (the catalog): a leading dot, so that no key and no listing meets them.
_META_RE = re.compile(r"^\.[a-z0-9_]+\.json$")


class StorageError(Exception):
    """A storage failure whose message is safe to show (no paths, no secrets)."""


class InvalidKey(StorageError):
    pass


class StoredFileMissing(StorageError):
    pass


class StoredFileExists(StorageError):
    pass


def check_key(key: str) -> str:
    try:
        size = len(key.encode("utf-8"))  # a lone surrogate is no file name (nor an S3 key)
    except UnicodeEncodeError:
        raise InvalidKey("invalid key") from None
    if not key or size > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key) or key in (".", ".."):
        raise InvalidKey("invalid key")
    return key


def check_meta_name(name: str) -> str:
    if not _META_RE.fullmatch(name):
        raise InvalidKey("invalid metadata name")
    return name


@dataclass(frozen=True)
class FileInfo:
    key: str
    size: int
    modified: datetime  # timezone-aware, UTC


class Writer(abc.ABC):
    """A write-only file-like object whose content is published under a key only on ``commit``.

    Its methods block: use it from a worker thread.
    """

    bytes_written = 0

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        pass

    @abc.abstractmethod
    def commit(self) -> FileInfo:
        """Publish what was written (fails with ``StoredFileExists`` if the key was taken since)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was written; nothing is published. Safe to call more than once."""

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


class Storage(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[FileInfo]:
        """Every stored file whose key starts with ``prefix``, sorted by key."""

    @abc.abstractmethod
    async def stat(self, key: str) -> FileInfo | None: ...

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of ``key`` in chunks (``StoredFileMissing`` if absent)."""

    @abc.abstractmethod
    def open_write(self, key: str) -> Writer:
        """A writer for ``key`` (blocking calls: use it in a worker thread)."""

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> FileInfo:
        writer = await asyncio.to_thread(self.open_write, key)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(writer.write, chunk)
            return await asyncio.to_thread(writer.commit)
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise

    async def put_file(self, key: str, path: Path, progress: Progress | None = None) -> FileInfo:
        """Publish the local file ``path`` under ``key``; the file is consumed (moved or deleted).

        Streamed in chunks, each read in a worker thread, so that a stopping server can interrupt it."""

        async def chunks() -> AsyncIterator[bytes]:
            handle = await asyncio.to_thread(open, path, "rb")
            try:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk
            finally:
                await asyncio.to_thread(handle.close)

        info = await self.write(key, chunks())
        await asyncio.to_thread(path.unlink, True)
        return info

    @abc.abstractmethod
    def local_copy(self, key: str, temp_dir: Path,
                   progress: Progress | None = None) -> AbstractAsyncContextManager[Path]:
        """A local file with the bytes of ``key`` (the file itself where it is local, else a copy
        in ``temp_dir``, reported to ``progress`` as it arrives, removed when the context ends)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; ``StoredFileMissing`` if it is not there."""

    @abc.abstractmethod
    def open_ranged(self, key: str) -> BinaryIO:
        """A seekable, read-only file of ``key`` whose reads fetch only what they need (a ranged
        GET on S3), for reading an archive's directory without the whole archive. Blocking: use it
        in a worker thread (``StoredFileMissing`` if absent)."""

    @abc.abstractmethod
    async def read_meta(self, name: str) -> bytes | None:
        """The store's own small file ``name`` (``.something.json``, never a key); None if absent."""

    @abc.abstractmethod
    async def write_meta(self, name: str, data: bytes) -> None:
        """Replace the small file ``name`` atomically (a reader sees the old or the new bytes)."""

    async def check_writable(self) -> None:
        """Write and remove a small file; raises ``StorageError`` (or ``OSError``) if it cannot."""
        await self.write_meta(".pb_write_test.json", b"{}")
        await self.delete_meta(".pb_write_test.json")

    @abc.abstractmethod
    async def delete_meta(self, name: str) -> None: ...

    async def free_bytes(self) -> int | None:
        """Free space where the store can tell (a local disk); None elsewhere."""
        return None

    def describe(self) -> dict[str, Any]:
        """What a client may know of this storage (never a secret)."""
        return {"kind": self.kind}
