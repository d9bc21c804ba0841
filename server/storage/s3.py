"""Backups in an S3-compatible bucket (AWS S3, MinIO, R2, Backblaze B2, rclone ...), on boto3.

boto3 blocks, so every call runs in a worker thread. Backups are objects at the root of the
bucket, named by their key. A writer streams into a multipart upload with parts of a fixed size and
a fixed number of them in flight, so memory stays bounded whatever the size of the backup. The
object only appears when the upload is completed; a failure or an interruption aborts it, so a
partial backup is never visible.

Errors become ``StorageError`` with a message that says what went wrong (bad credentials, no such
bucket, unreachable endpoint) and never carries the secret.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import io
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from ..tools.security import random_string
from .s3_uploads import UploadRecords
from .base import (CHUNK_SIZE, FileInfo, Progress, Storage, StorageError, StoredFileExists, StoredFileMissing, Writer,
                   check_key, check_meta_name)

logger = logging.getLogger("server.storage.s3")

PART_SIZE = 8 << 20  # S3 wants at least 5 MiB for every part but the last
PARTS_IN_FLIGHT = 3  # memory of a writer: about (PARTS_IN_FLIGHT + 1) * PART_SIZE
MAX_ATTEMPTS = 3  # boto3's standard retry mode: transient errors and throttling, with backoff
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 30
# S3 calls of the async methods run in threads of their own, not in asyncio's default pool: an
# endpoint that hangs must not starve the rest of the server (password checks, file work) of threads.
CALL_THREADS = 8
PROBE_PREFIX = "pb_settings_test_"

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="s3-call")
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(function, *args))


@dataclass(frozen=True)
class S3Config:
    bucket: str
    region: str
    endpoint: str
    access_key: str
    secret: str = field(repr=False)
    force_path_style: bool = False

    @classmethod
    def from_settings(cls, s3: dict[str, Any]) -> "S3Config":
        return cls(bucket=s3["bucket"], region=s3["region"], endpoint=s3["endpoint"], access_key=s3["accessKey"],
                   secret=s3["secret"], force_path_style=bool(s3["forcePathStyle"]))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _is_missing(exc: ClientError) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


class S3Error(StorageError):
    pass


def explain(exc: BaseException, config: S3Config) -> StorageError:
    """A ``StorageError`` that says what went wrong in words a user can act on, without secrets."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in ("NoSuchBucket",):
            return S3Error(f"S3 bucket {config.bucket!r} does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidSignature"):
            return S3Error(f"S3 refused the credentials or the access ({code}): check the access key, the secret "
                           "and the bucket's permissions")
        if _is_missing(exc):
            return StoredFileMissing("no such file")
        if code in ("PreconditionFailed", "412"):
            return StoredFileExists("a file with that name already exists")
        return S3Error(f"S3 request failed ({code or 'unknown error'})")
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
        return S3Error(f"cannot reach the S3 endpoint {config.endpoint}")
    if isinstance(exc, ReadTimeoutError):
        return S3Error(f"the S3 endpoint {config.endpoint} stopped answering")
    if isinstance(exc, NoCredentialsError):
        return S3Error("S3 access key and secret are missing")
    if isinstance(exc, BotoCoreError):
        return S3Error(f"S3 request failed ({type(exc).__name__})")
    if isinstance(exc, ValueError):  # botocore's answer to a malformed endpoint URL
        return S3Error(f"invalid S3 endpoint {config.endpoint!r}")
    return S3Error(f"S3 request failed ({type(exc).__name__})")


class S3Writer(Writer):
    """Streams into a multipart upload, started once a first part is full (a small file is one PUT).

    Parts are filled into at most ``PARTS_IN_FLIGHT + 1`` buffers of ``PART_SIZE``, allocated once
    and reused: memory stays bounded, and the allocator is not left with a trail of freed 8 MiB
    blocks in its per-thread arenas (which showed as +100 MB of RSS that was never given back).

    Not seekable: ``zipfile`` then writes data descriptors after each entry instead of seeking back.
    """

    def __init__(self, storage: "S3Storage", key: str) -> None:
        self._storage = storage
        self._key = key
        self._current: bytearray | None = None  # the part being filled
        self._fill = 0
        self._free: deque[bytearray] = deque()  # buffers handed back by finished part uploads
        self._allocated = 0
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._next_part = 1
        self._pending: set[Future[None]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._done = False
        self._failed: BaseException | None = None  # a part was lost: this upload can only be aborted

    def write(self, data: Any) -> int:
        if self._done:
            raise ValueError("writer is closed")
        self._check()
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                buffer = self._buffer()
                count = min(len(view), PART_SIZE - self._fill)
                buffer[self._fill:self._fill + count] = view[:count]
                self._fill += count
                view = view[count:]
                if self._fill == PART_SIZE:
                    self._current = None
                    self._send(buffer, PART_SIZE)
        except BaseException as exc:
            self._failed = exc if isinstance(exc, StorageError) else S3Error(
                "the upload failed earlier and cannot be completed")
            raise
        self.bytes_written += size
        return size

    def _buffer(self) -> bytearray:
        if self._current is None:
            if self._free:
                self._current = self._free.pop()
            else:
                assert self._allocated <= PARTS_IN_FLIGHT, "more part buffers than parts in flight"
                self._current = bytearray(PART_SIZE)
                self._allocated += 1
            self._fill = 0
        return self._current

    def _check(self) -> None:
        """Refuse to go on after a failure, with that failure's reason (``zipfile`` writes once
        more as it closes an entry: that second error must not hide the first)."""
        if self._failed is not None:
            raise self._failed

    def _send(self, buffer: bytearray, length: int) -> None:
        storage = self._storage
        if self._upload_id is None:
            endpoint, bucket = storage.config.endpoint, storage.config.bucket
            storage.uploads.add(endpoint, bucket, self._key)  # first: a kill before the answer leaves a trace
            try:
                answer = storage.call(storage.client().create_multipart_upload, Bucket=bucket, Key=self._key)
            except BaseException:
                storage.uploads.release(endpoint, bucket, self._key)  # S3 may have begun one: found later
                raise
            self._upload_id = answer["UploadId"]
            storage.uploads.add(endpoint, bucket, self._key, self._upload_id)
            self._pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        number, self._next_part = self._next_part, self._next_part + 1
        assert self._pool is not None
        self._pending.add(self._pool.submit(self._upload_part, number, buffer, length))
        self._wait(PARTS_IN_FLIGHT)  # then at least one buffer is free for the next part

    def _upload_part(self, number: int, buffer: bytearray, length: int) -> None:
        storage = self._storage
        try:
            body = buffer if length == len(buffer) else bytes(memoryview(buffer)[:length])
            answer = storage.call(storage.client().upload_part, Bucket=storage.config.bucket, Key=self._key,
                                  UploadId=self._upload_id, PartNumber=number, Body=body)
            self._parts[number] = answer["ETag"]
        finally:
            self._free.append(buffer)

    def _wait(self, most: int) -> None:
        """Wait until at most ``most`` parts are in flight; a failed part raises here."""
        while len(self._pending) > most or any(f.done() for f in self._pending):
            done, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                self._pending.discard(future)
                future.result()

    def commit(self) -> FileInfo:
        if self._done:
            raise ValueError("writer is closed")
        storage = self._storage
        try:
            self._check()
            client, bucket = storage.client(), storage.config.bucket
            if self._upload_id is None:
                body = bytes(memoryview(self._current)[:self._fill]) if self._current is not None else b""
                self._release_buffers()
                storage.refuse_existing(self._key)
                storage.conditional(client.put_object, Bucket=bucket, Key=self._key, Body=body)
            else:
                if self._current is not None and self._fill:
                    buffer, self._current = self._current, None
                    self._send(buffer, self._fill)
                self._wait(0)
                self._release_buffers()
                parts = [{"PartNumber": n, "ETag": tag} for n, tag in sorted(self._parts.items())]
                storage.refuse_existing(self._key)
                storage.conditional(client.complete_multipart_upload, Bucket=bucket, Key=self._key,
                                    UploadId=self._upload_id, MultipartUpload={"Parts": parts})
                storage.uploads.remove(storage.config.endpoint, storage.config.bucket, self._key, self._upload_id)
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        self._close_pool()
        self._done = True
        info = storage.stat_sync(self._key)
        if info is None:
            raise S3Error("the backup was written but S3 does not list it")
        return info

    def abort(self) -> None:
        if self._done and self._upload_id is None:
            return
        self._done = True
        for future in self._pending:
            future.cancel()
        if self._pending:
            wait(self._pending)
            self._pending.clear()
        self._close_pool()
        self._release_buffers()
        if self._upload_id is not None:
            if not self._storage.abort_upload(self._key, self._upload_id):
                # retried before the next write
                self._storage.uploads.release(self._storage.config.endpoint, self._storage.config.bucket, self._key)
            self._upload_id = None

    def _release_buffers(self) -> None:
        self._current = None
        self._fill = 0
        self._free.clear()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class S3Storage(Storage):
    kind = "s3"

    def __init__(self, config: S3Config, temp_dir: Path, uploads: UploadRecords | None = None) -> None:
        self.config = config
        self.temp_dir = temp_dir
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._conditional_writes = True  # If-None-Match: *, until the server says it does not know it
        # Multipart uploads begun and not yet completed or aborted, kept in a file of pb_data when
        # given: those of a process that was killed, or whose abort failed (the endpoint was down),
        # are aborted at the next start and before each write.
        self.uploads = uploads if uploads is not None else UploadRecords(None)

    # --- the client (blocking) --------------------------------------------------------------

    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                config = Config(
                    region_name=self.config.region or None,
                    s3={"addressing_style": "path" if self.config.force_path_style else "auto"},
                    retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=READ_TIMEOUT,
                    max_pool_connections=PARTS_IN_FLIGHT + 8,
                    # Checksums only where S3 requires them: many S3-compatible servers send the whole
                    # object's checksum with a ranged GET, which newer botocore would then reject.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                try:
                    self._client = boto3.session.Session().client(
                        "s3", endpoint_url=self.config.endpoint or None, aws_access_key_id=self.config.access_key,
                        aws_secret_access_key=self.config.secret, config=config)
                except Exception as exc:
                    raise explain(exc, self.config) from None
            return self._client

    def call(self, method: Callable[..., T], **kwargs: Any) -> T:
        try:
            return method(**kwargs)
        except Exception as exc:
            raise explain(exc, self.config) from None

    def conditional(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        """A write that must not replace an existing object: ``If-None-Match: *`` where the server
        knows it (AWS, R2, MinIO); servers that ignore it are covered by ``refuse_existing``."""
        if self._conditional_writes:
            try:
                return method(IfNoneMatch="*", **kwargs)
            except ClientError as exc:
                if _code(exc) not in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                    raise explain(exc, self.config) from None
                self._conditional_writes = False
            except Exception as exc:
                raise explain(exc, self.config) from None
        return self.call(method, **kwargs)

    def refuse_existing(self, key: str) -> None:
        if self.stat_sync(key) is not None:
            raise StoredFileExists("a file with that name already exists")

    def stat_sync(self, key: str) -> FileInfo | None:
        try:
            answer = self.client().head_object(Bucket=self.config.bucket, Key=check_key(key))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise explain(exc, self.config) from None
        except Exception as exc:
            raise explain(exc, self.config) from None
        return FileInfo(key, int(answer["ContentLength"]), answer["LastModified"].astimezone(timezone.utc))

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort an unfinished multipart upload; ``False`` (and it stays recorded) if S3 could not be told."""
        try:
            try:
                self.client().abort_multipart_upload(Bucket=self.config.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _code(exc) not in ("NoSuchUpload", "404"):  # else already gone (aborted or expired)
                    raise explain(exc, self.config) from None
            except Exception as exc:
                raise explain(exc, self.config) from None
        except StorageError as exc:
            logger.warning("could not abort an unfinished S3 upload of %s (%s); will retry", key, exc)
            return False
        self.uploads.remove(self.config.endpoint, self.config.bucket, key, upload_id)
        return True

    def abort_unfinished(self) -> int:
        """Abort the recorded uploads of this bucket that no writer owns; the number aborted.

        A key recorded without an upload id (its process died before S3 answered) has its uploads
        looked up by listing; none found, the record goes."""
        aborted = 0
        for key, upload_id in self.uploads.unowned(self.config.endpoint, self.config.bucket):
            if upload_id:
                aborted += self.abort_upload(key, upload_id)
                continue
            try:
                found = self._uploads_of(key)
            except StorageError as exc:
                logger.warning("could not list the unfinished S3 uploads of %s (%s); will retry", key, exc)
                continue
            done = [self.abort_upload(key, found_id) for found_id in found]
            aborted += sum(done)
            if all(done):
                self.uploads.remove(self.config.endpoint, self.config.bucket, key, "")
        return aborted

    def _uploads_of(self, key: str) -> list[str]:
        """The ids of the unfinished multipart uploads of ``key``."""
        client = self.client()
        try:
            answer = client.list_multipart_uploads(Bucket=self.config.bucket, Prefix=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchUpload", "404"):  # rclone's answer for a bucket that never had one
                return []
            raise explain(exc, self.config) from None
        except Exception as exc:
            raise explain(exc, self.config) from None
        return [upload["UploadId"] for upload in answer.get("Uploads", []) if upload.get("Key") == key]

    # --- the interface ----------------------------------------------------------------------

    async def list(self, prefix: str = "") -> list[FileInfo]:
        def scan() -> list[FileInfo]:
            found = []
            pages = self.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=prefix, Delimiter="/")
            try:
                for page in pages:
                    for item in page.get("Contents", []):
                        try:
                            key = check_key(item["Key"])
                        except StorageError:
                            continue
                        found.append(FileInfo(key, int(item["Size"]), item["LastModified"].astimezone(timezone.utc)))
            except Exception as exc:
                raise explain(exc, self.config) from None
            return sorted(found, key=lambda info: info.key)

        return await _in_thread(scan)

    async def stat(self, key: str) -> FileInfo | None:
        check_key(key)
        return await _in_thread(self.stat_sync, key)

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_key(key)
        if end is not None and end <= start:
            return
        wanted: dict[str, Any] = {}
        if start or end is not None:
            wanted["Range"] = f"bytes={start}-{'' if end is None else end - 1}"

        def get() -> Any:
            return self.call(self.client().get_object, Bucket=self.config.bucket, Key=key, **wanted)

        answer = await _in_thread(get)
        body = answer["Body"]
        try:
            while True:
                try:
                    chunk = await _in_thread(body.read, CHUNK_SIZE)
                except Exception as exc:
                    raise explain(exc, self.config) from None
                if not chunk:
                    break
                yield chunk
        finally:
            await _in_thread(body.close)

    def open_write(self, key: str) -> S3Writer:
        check_key(key)
        self.abort_unfinished()  # those of a killed process, or whose abort failed
        return S3Writer(self, key)

    @asynccontextmanager
    async def local_copy(self, key: str, temp_dir: Path, progress: Progress | None = None) -> AsyncIterator[Path]:
        target = temp_dir / f"download_{random_string(12)}.zip"

        def open_target() -> Any:
            temp_dir.mkdir(parents=True, exist_ok=True)
            return os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

        try:
            handle = await _in_thread(open_target)
            try:
                async for chunk in self.read(key):
                    await _in_thread(handle.write, chunk)
                    if progress is not None:
                        progress(len(chunk))
            finally:
                await _in_thread(handle.close)
            yield target
        finally:
            await _in_thread(target.unlink, True)

    async def delete(self, key: str) -> None:
        check_key(key)

        def remove() -> None:
            if self.stat_sync(key) is None:  # S3 deletes are idempotent; ours says what was missing
                raise StoredFileMissing("no such file")
            self.call(self.client().delete_object, Bucket=self.config.bucket, Key=key)

        await _in_thread(remove)

    async def probe(self) -> None:
        """Write, read back and delete a small object; raises ``StorageError`` saying which step
        failed and why."""
        key = f"{PROBE_PREFIX}{random_string(5)}/test.txt"
        body = b"test " + random_string(16).encode()

        def run() -> None:
            client, bucket = self.client(), self.config.bucket
            try:
                self.call(client.put_object, Bucket=bucket, Key=key, Body=body)
            except StorageError as exc:
                raise S3Error(f"failed to upload a test file: {exc}") from None
            try:
                try:
                    read = self.call(client.get_object, Bucket=bucket, Key=key)["Body"].read()
                except StorageError as exc:
                    raise S3Error(f"failed to read back the test file: {exc}") from None
                if read != body:
                    raise S3Error("the test file read back differs from what was written")
            finally:
                try:
                    self.call(client.delete_object, Bucket=bucket, Key=key)
                except StorageError as exc:
                    raise S3Error(f"failed to delete the test file: {exc}") from None

        await _in_thread(run)

    def open_ranged(self, key: str) -> io.BufferedReader:
        info = self.stat_sync(key)
        if info is None:
            raise StoredFileMissing("no such file")
        return io.BufferedReader(RangedObject(self, key, info.size), buffer_size=64 << 10)

    async def read_meta(self, name: str) -> bytes | None:
        check_meta_name(name)

        def get() -> bytes | None:
            try:
                answer = self.client().get_object(Bucket=self.config.bucket, Key=name)
                return answer["Body"].read()
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise explain(exc, self.config) from None
            except Exception as exc:
                raise explain(exc, self.config) from None

        return await _in_thread(get)

    async def write_meta(self, name: str, data: bytes) -> None:
        check_meta_name(name)
        await _in_thread(functools.partial(self.call, self.client().put_object, Bucket=self.config.bucket, Key=name,
                                           Body=data, ContentType="application/json"))

    async def delete_meta(self, name: str) -> None:
        check_meta_name(name)
        await _in_thread(functools.partial(self.call, self.client().delete_object, Bucket=self.config.bucket, Key=name))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "bucket": self.config.bucket, "region": self.config.region,
                "endpoint": self.config.endpoint}


class RangedObject(io.RawIOBase):
    """A seekable read-only view of one object: each read that misses the cache is one ranged GET.

    The first read within the object's last ``TAIL`` bytes fetches all of them: a zip keeps its
    directory and our manifest there, so reading both usually costs one request; other misses
    fetch at least ``BLOCK`` bytes. Blocking: use it in a worker thread."""

    TAIL = 1 << 20
    BLOCK = 256 << 10
    MOST = 4 << 20  # a read returns at most this much (memory stays bounded); callers loop

    def __init__(self, storage: S3Storage, key: str, size: int) -> None:
        super().__init__()
        self._storage, self._key, self._size = storage, key, size
        self._pos = 0
        self._spans: list[tuple[int, bytes]] = []  # (start, bytes), at most a few
        self._tail_fetched = False
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos, self.MOST)
        if want <= 0:
            return 0
        data = self._cached(self._pos, want)
        if data is None:
            start = self._pos
            if not self._tail_fetched and self._size - start <= self.TAIL:
                start, self._tail_fetched = max(0, self._size - self.TAIL), True
            end = min(self._size, max(self._pos + want, start + self.BLOCK))
            self._fetch(start, end)
            data = self._cached(self._pos, want)
            assert data is not None
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _cached(self, pos: int, want: int) -> bytes | None:
        for start, data in self._spans:
            if start <= pos and pos + want <= start + len(data):
                return data[pos - start:pos - start + want]
        return None

    def _fetch(self, start: int, end: int) -> None:
        storage = self._storage
        answer = storage.call(storage.client().get_object, Bucket=storage.config.bucket, Key=self._key,
                              Range=f"bytes={start}-{end - 1}")
        try:
            data = answer["Body"].read()
        except Exception as exc:
            raise explain(exc, storage.config) from None
        self.requests += 1
        self._spans = [(start, data)] + self._spans[:3]
