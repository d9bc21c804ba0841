"""``S3Storage`` against a real S3-compatible server (``rclone serve s3``), below the HTTP API.

rclone accepts multipart parts of any size (checked: it does not enforce S3's 5 MiB minimum), so
these tests shrink ``PART_SIZE`` to keep multipart uploads of several parts small and fast. rclone
ignores ``If-None-Match``, so the refusal of an existing key rests on the check before the commit.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest

from conftest import S3Server, free_port
from server.storage import s3
from server.storage.base import FileInfo, InvalidKey, StorageError, StoredFileExists, StoredFileMissing
from server.storage.s3 import PROBE_PREFIX, S3Config, S3Storage, S3Writer
from server.storage.s3_uploads import RECORD_FILE, UploadRecords

PART = 256 << 10  # the part size of these tests (rclone takes parts below S3's 5 MiB minimum)
WRONG_SECRET = "wrong-secret-9876543210"


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PART_SIZE", PART)
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 1)  # failures at once: no retries with backoff


def make_storage(tmp_path: Path, endpoint: str, bucket: str, secret: str = S3Server.SECRET) -> S3Storage:
    config = S3Config(bucket=bucket, region="us-east-1", endpoint=endpoint, access_key=S3Server.ACCESS_KEY,
                      secret=secret, force_path_style=True)
    return S3Storage(config, tmp_path / "temp")


def new_bucket(server: S3Server) -> str:
    """A new bucket, made through S3: ``S3Server.bucket()`` only makes a directory, which rclone does
    not see once it has listed its root (its VFS caches directory listings for 5 minutes)."""
    name = f"bk{os.urandom(4).hex()}"
    client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id=S3Server.ACCESS_KEY,
                          aws_secret_access_key=S3Server.SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    assert (server.root / name).is_dir()
    return name


@pytest.fixture()
def bucket(s3_server: S3Server) -> str:
    return new_bucket(s3_server)


@pytest.fixture()
def storage(s3_server: S3Server, bucket: str, tmp_path: Path) -> S3Storage:
    return make_storage(tmp_path, s3_server.url, bucket)


def payload(size: int) -> bytes:
    return os.urandom(size)


async def chunked(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    """``data`` in chunks that do not line up with the parts."""
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


async def read_all(storage: S3Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key, start, end)])


def operations(storage: S3Storage) -> list[str]:
    """The names of the S3 operations the storage's client sends from now on (a botocore event hook)."""
    seen: list[str] = []
    storage.client().meta.events.register("before-call.s3", lambda model, **_: seen.append(model.name))
    return seen


def uploads(storage: S3Storage) -> list[dict[str, Any]]:
    """The unfinished multipart uploads of the storage's bucket."""
    client = storage.client()
    try:
        return client.list_multipart_uploads(Bucket=storage.config.bucket).get("Uploads", [])
    except client.exceptions.NoSuchUpload:  # rclone's answer for a bucket that never had one
        return []


def assert_utc_now(moment: datetime) -> None:
    assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=5)


# --- writing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * PART, 7 * PART + 12_345], ids=["parts-exact", "parts-and-tail"])
async def test_multipart_write_reads_back_equal(storage: S3Storage, s3_server: S3Server, bucket: str, size: int) -> None:
    assert 7 > s3.PARTS_IN_FLIGHT  # the larger payload has more parts than may be in flight at once
    data = payload(size)
    sent = operations(storage)
    info = await storage.write("big.zip", chunked(data))
    parts = -(-size // PART)
    assert sent.count("CreateMultipartUpload") == 1 and sent.count("UploadPart") == parts
    assert sent.count("CompleteMultipartUpload") == 1 and "PutObject" not in sent
    assert (info.key, info.size) == ("big.zip", size)
    assert_utc_now(info.modified)
    assert await read_all(storage, "big.zip") == data
    assert (s3_server.root / bucket / "big.zip").read_bytes() == data
    stat_info = await storage.stat("big.zip")
    assert stat_info is not None and stat_info.size == size
    listed = await storage.list()
    assert [(f.key, f.size) for f in listed] == [("big.zip", size)]
    assert_utc_now(listed[0].modified)
    assert uploads(storage) == []


@pytest.mark.parametrize("size", [0, 1, 1000, PART - 1])
async def test_small_write_is_a_single_put(storage: S3Storage, s3_server: S3Server, bucket: str, size: int) -> None:
    data = payload(size)
    sent = operations(storage)
    info = await storage.write("small.zip", chunked(data, 777))
    assert "PutObject" in sent and "CreateMultipartUpload" not in sent and "UploadPart" not in sent
    assert info == FileInfo("small.zip", size, info.modified)
    assert_utc_now(info.modified)
    assert await read_all(storage, "small.zip") == data
    assert s3_server.objects(bucket) == ["small.zip"]
    assert [(f.key, f.size) for f in await storage.list()] == [("small.zip", size)]
    assert await storage.exists("small.zip")


async def test_writer_file_interface(storage: S3Storage) -> None:
    def run() -> FileInfo:
        with storage.open_write("w.zip") as writer:
            assert isinstance(writer, S3Writer)
            for _ in range(5):
                assert writer.write(memoryview(b"x" * 100_000)) == 100_000
                writer.flush()
            assert writer.tell() == writer.bytes_written == 500_000
            info = writer.commit()
        with pytest.raises(ValueError):
            writer.write(b"more")
        writer.abort()  # harmless after a commit
        return info

    info = await asyncio.to_thread(run)
    assert info.size == 500_000
    assert await read_all(storage, "w.zip") == b"x" * 500_000


async def test_nothing_visible_before_commit_and_abort_cleans_up(storage: S3Storage, s3_server: S3Server,
                                                                 bucket: str) -> None:
    writer = await asyncio.to_thread(storage.open_write, "pending.zip")
    await asyncio.to_thread(writer.write, payload(3 * PART + 10))
    assert [u["Key"] for u in uploads(storage)] == ["pending.zip"]
    assert await storage.list() == []
    assert await storage.stat("pending.zip") is None
    assert "pending.zip" not in s3_server.objects(bucket)

    await asyncio.to_thread(writer.abort)
    await asyncio.to_thread(writer.abort)  # twice is fine
    assert await storage.list() == []
    assert "pending.zip" not in s3_server.objects(bucket)
    assert uploads(storage) == []
    with pytest.raises(ValueError):
        writer.write(b"late")


async def test_failing_source_aborts_the_upload(storage: S3Storage, s3_server: S3Server, bucket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    aborted: list[str] = []
    original = storage.abort_upload

    def spy(key: str, upload_id: str) -> None:
        aborted.append(key)
        original(key, upload_id)

    monkeypatch.setattr(storage, "abort_upload", spy)

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * (PART // 2)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        await storage.write("broken.zip", broken())
    assert aborted == ["broken.zip"]  # a multipart upload had started, and it was aborted
    assert await storage.list() == []
    assert "broken.zip" not in s3_server.objects(bucket)
    assert uploads(storage) == []
    assert storage.uploads.unowned(storage.config.endpoint, bucket) == []


@pytest.mark.parametrize("size", [10, 2 * PART + 5], ids=["single-put", "multipart"])
async def test_commit_refuses_an_existing_key(storage: S3Storage, s3_server: S3Server, bucket: str, size: int) -> None:
    original = payload(1234)
    await storage.write("taken.zip", chunked(original))
    with pytest.raises(StoredFileExists):
        await storage.write("taken.zip", chunked(payload(size)))
    assert await read_all(storage, "taken.zip") == original
    assert (s3_server.root / bucket / "taken.zip").read_bytes() == original
    assert uploads(storage) == []
    assert [(f.key, f.size) for f in await storage.list()] == [("taken.zip", 1234)]


async def test_commit_refuses_a_key_taken_since_open(storage: S3Storage) -> None:
    def run() -> None:
        first, second = storage.open_write("race.zip"), storage.open_write("race.zip")
        first.write(b"1" * (PART + 1))
        second.write(b"2" * 100)
        second.commit()
        with pytest.raises(StoredFileExists):
            first.commit()
        first.abort()

    await asyncio.to_thread(run)
    assert await read_all(storage, "race.zip") == b"2" * 100
    assert uploads(storage) == []


async def test_put_file(storage: S3Storage, tmp_path: Path) -> None:
    data = payload(2 * PART + 99)
    source = tmp_path / "source.zip"
    source.write_bytes(data)
    seen: list[int] = []
    info = await storage.put_file("put.zip", source, seen.append)
    assert (info.key, info.size) == ("put.zip", len(data))
    assert sum(seen) == len(data)
    assert not source.exists()  # consumed
    assert await read_all(storage, "put.zip") == data

    other = tmp_path / "other.zip"
    other.write_bytes(b"other")
    with pytest.raises(StoredFileExists):
        await storage.put_file("put.zip", other)
    assert await read_all(storage, "put.zip") == data
    assert uploads(storage) == []


# --- reading, listing, deleting --------------------------------------------------------------------


async def test_read_ranges(storage: S3Storage) -> None:
    data = payload(3 * (1 << 20) + 17)  # more than one read chunk
    await storage.write("r.zip", chunked(data, 1 << 20))
    assert await read_all(storage, "r.zip") == data
    assert await read_all(storage, "r.zip", 100, 2_500_000) == data[100:2_500_000]
    assert await read_all(storage, "r.zip", 0, 10) == data[:10]
    assert await read_all(storage, "r.zip", 1_000_000) == data[1_000_000:]
    assert await read_all(storage, "r.zip", len(data) - 1, None) == data[-1:]
    assert await read_all(storage, "r.zip", 5, 5) == b""
    assert await read_all(storage, "r.zip", 9, 3) == b""
    with pytest.raises(StoredFileMissing):
        await read_all(storage, "missing.zip")
    with pytest.raises(StoredFileMissing):
        await read_all(storage, "missing.zip", 10, 20)


async def test_list_filters_prefix_subdirs_and_invalid_names(storage: S3Storage) -> None:
    for key in ("b.zip", "a.zip", "ab.zip", "c"):
        await storage.write(key, chunked(key.encode()))
    client, name = storage.client(), storage.config.bucket
    for key in (".hidden", "a/b.zip", "subdir/x.zip", "ab/nested.zip"):
        client.put_object(Bucket=name, Key=key, Body=b"not a backup")

    listed = await storage.list()
    assert [f.key for f in listed] == ["a.zip", "ab.zip", "b.zip", "c"]
    assert [f.size for f in listed] == [5, 6, 5, 1]
    for info in listed:
        assert_utc_now(info.modified)
    assert [f.key for f in await storage.list("a")] == ["a.zip", "ab.zip"]
    assert [f.key for f in await storage.list("ab")] == ["ab.zip"]
    assert [f.key for f in await storage.list("b.zip")] == ["b.zip"]
    assert await storage.list("z") == []
    assert await storage.list("subdir/") == []


async def test_list_of_an_empty_bucket(storage: S3Storage) -> None:
    assert await storage.list() == []


async def test_delete(storage: S3Storage, s3_server: S3Server, bucket: str) -> None:
    with pytest.raises(StoredFileMissing):
        await storage.delete("nothing.zip")
    await storage.write("gone.zip", chunked(b"bye"))
    await storage.write("kept.zip", chunked(b"hi"))
    await storage.delete("gone.zip")
    assert await storage.stat("gone.zip") is None
    assert [f.key for f in await storage.list()] == ["kept.zip"]
    assert s3_server.objects(bucket) == ["kept.zip"]
    with pytest.raises(StoredFileMissing):
        await storage.delete("gone.zip")


async def test_local_copy(storage: S3Storage, tmp_path: Path) -> None:
    data = payload(2 * (1 << 20) + 3)
    await storage.write("copy.zip", chunked(data, 1 << 20))
    temp = tmp_path / "downloads"  # created on demand
    seen: list[int] = []
    async with storage.local_copy("copy.zip", temp, seen.append) as path:
        assert path.parent == temp
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sum(seen) == len(data)
    assert not path.exists()
    assert list(temp.iterdir()) == []

    async with storage.local_copy("copy.zip", temp) as path:  # no progress callback
        assert path.read_bytes() == data
    assert list(temp.iterdir()) == []


async def test_local_copy_of_a_missing_key(storage: S3Storage, tmp_path: Path) -> None:
    temp = tmp_path / "downloads"
    with pytest.raises(StoredFileMissing):
        async with storage.local_copy("missing.zip", temp):
            pytest.fail("no copy of a missing key")
    assert not temp.exists() or list(temp.iterdir()) == []


BAD_KEYS = ["../x.zip", "a/b.zip", ".x", "", "a\x00b.zip", "a\\b.zip", "..", "x" * 256]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_invalid_keys_are_refused_everywhere(storage: S3Storage, s3_server: S3Server, bucket: str,
                                                   tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidKey):
        await storage.stat(key)
    with pytest.raises(InvalidKey):
        await storage.exists(key)
    with pytest.raises(InvalidKey):
        await read_all(storage, key)
    with pytest.raises(InvalidKey):
        await read_all(storage, key, 3, 3)
    with pytest.raises(InvalidKey):
        storage.open_write(key)
    with pytest.raises(InvalidKey):
        await storage.write(key, chunked(b"data"))
    source = tmp_path / "source.zip"
    source.write_bytes(b"data")
    with pytest.raises(InvalidKey):
        await storage.put_file(key, source)
    assert source.exists()
    temp = tmp_path / "downloads"
    with pytest.raises(InvalidKey):
        async with storage.local_copy(key, temp):
            pass
    assert not temp.exists() or list(temp.iterdir()) == []
    with pytest.raises(InvalidKey):
        await storage.delete(key)
    assert s3_server.objects(bucket) == []
    assert uploads(storage) == []


# --- errors ----------------------------------------------------------------------------------------


def assert_safe(exc: BaseException, *words: str) -> str:
    assert isinstance(exc, StorageError), repr(exc)
    message = str(exc)
    assert S3Server.SECRET not in message and WRONG_SECRET not in message, message
    assert any(word in message.lower() for word in words), message
    return message


async def failures(storage: S3Storage, tmp_path: Path, with_stat: bool = True) -> list[BaseException]:
    """The errors of every operation of ``storage``."""
    source = tmp_path / "source.zip"
    source.write_bytes(b"data")
    attempts: list[Any] = [
        storage.list(),
        read_all(storage, "a.zip"),
        read_all(storage, "a.zip", 1, 2),
        storage.write("small.zip", chunked(b"tiny")),
        storage.write("big.zip", chunked(payload(2 * PART + 1))),
        storage.put_file("put.zip", source),
    ]
    if with_stat:
        attempts += [storage.stat("a.zip"), storage.delete("a.zip")]
    errors = []
    for attempt in attempts:
        with pytest.raises(StorageError) as caught:
            await attempt
        errors.append(caught.value)
    with pytest.raises(StorageError) as caught:
        async with storage.local_copy("a.zip", tmp_path / "downloads"):
            pass
    errors.append(caught.value)
    assert source.exists()
    return errors


async def test_wrong_secret(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    storage = make_storage(tmp_path, s3_server.url, bucket, secret=WRONG_SECRET)
    for error in await failures(storage, tmp_path):
        assert_safe(error, "credentials")
    with pytest.raises(StorageError) as caught:
        await storage.probe()
    assert assert_safe(caught.value, "credentials").startswith("failed to upload a test file")
    assert s3_server.objects(bucket) == []


async def test_missing_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    storage = make_storage(tmp_path, s3_server.url, "no-such-bucket")
    # A HEAD has no body to say which of the bucket or the object is missing: stat and delete
    # answer as for a missing file, so they are left out here.
    for error in await failures(storage, tmp_path, with_stat=False):
        assert "no-such-bucket" in assert_safe(error, "bucket")
    with pytest.raises(StorageError) as caught:
        await storage.probe()
    assert assert_safe(caught.value, "bucket").startswith("failed to upload a test file")
    assert not (s3_server.root / "no-such-bucket").exists()


async def test_unreachable_endpoint(tmp_path: Path) -> None:
    storage = make_storage(tmp_path, f"http://127.0.0.1:{free_port()}", "whatever")
    started = asyncio.get_running_loop().time()
    for error in await failures(storage, tmp_path):
        assert_safe(error, "reach")
        assert storage.config.endpoint in str(error)
    with pytest.raises(StorageError) as caught:
        await storage.probe()
    assert assert_safe(caught.value, "reach").startswith("failed to upload a test file")
    assert asyncio.get_running_loop().time() - started < 10


async def test_probe(storage: S3Storage, s3_server: S3Server, bucket: str) -> None:
    sent = operations(storage)
    await storage.probe()
    assert {"PutObject", "GetObject", "DeleteObject"} <= set(sent)
    assert s3_server.objects(bucket) == []
    assert not [p for p in (s3_server.root / bucket).rglob("*") if p.name.startswith(PROBE_PREFIX) and p.is_file()]
    assert await storage.list() == []
    await storage.probe()  # again: a fresh name each time


async def test_uploads_of_a_killed_process_are_aborted_by_the_next_write(s3_server: S3Server, bucket: str,
                                                                          tmp_path: Path) -> None:
    # The record lives in pb_data: a process killed mid-upload leaves its upload id there, and the
    # next process's next write aborts it (S3 keeps an unfinished upload's parts, and bills them,
    # until then). A writer that is still alive in this process is never aborted.
    record = tmp_path / RECORD_FILE
    config = make_storage(tmp_path, s3_server.url, bucket).config
    killed = S3Storage(config, tmp_path / "temp", UploadRecords(record))
    writer = await asyncio.to_thread(killed.open_write, "killed.zip")
    await asyncio.to_thread(writer.write, payload(2 * PART + 10))
    assert [u["Key"] for u in uploads(killed)] == ["killed.zip"]
    assert record.stat().st_mode & 0o777 == 0o600
    assert killed.uploads.unowned(config.endpoint, bucket) == []  # its own writer is alive

    # One killed after asking S3 for an upload, before it learnt the id: only its key is recorded.
    client = killed.client()
    client.create_multipart_upload(Bucket=bucket, Key="unanswered.zip")
    UploadRecords(record).add(config.endpoint, bucket, "unanswered.zip")
    assert sorted(u["Key"] for u in uploads(killed)) == ["killed.zip", "unanswered.zip"]

    # A new process (a new record object on the same file), other buckets' records left alone.
    restarted = S3Storage(config, tmp_path / "temp", UploadRecords(record))
    restarted.uploads.add("http://elsewhere:9", "other", "x.zip", "other-upload")
    restarted.uploads.release("http://elsewhere:9", "other", "x.zip")
    live = await asyncio.to_thread(restarted.open_write, "live.zip")  # aborts both first
    await asyncio.to_thread(live.write, payload(2 * PART))
    assert [u["Key"] for u in uploads(restarted)] == ["live.zip"]
    assert restarted.open_write("third.zip").abort() is None  # does not abort the live writer's upload
    assert [u["Key"] for u in uploads(restarted)] == ["live.zip"]
    await asyncio.to_thread(live.commit)
    assert uploads(restarted) == []
    assert [f.key for f in await restarted.list()] == ["live.zip"]
    assert json.loads(record.read_text()) == [
        {"endpoint": "http://elsewhere:9", "bucket": "other", "key": "x.zip", "uploadId": "other-upload"}]


def test_describe_and_repr_never_show_the_secret(storage: S3Storage) -> None:
    assert S3Server.SECRET not in repr(storage.config)
    described = storage.describe()
    assert described["kind"] == "s3" and described["bucket"] == storage.config.bucket
    assert S3Server.SECRET not in repr(described)


# --- an endpoint that goes away mid-upload ---------------------------------------------------------


def wait_for_parts(storage: S3Storage, key: str, count: int) -> None:
    """Until the server holds ``count`` parts of the upload of ``key`` (parts go up in the background)."""
    client, name = storage.client(), storage.config.bucket
    for _ in range(200):
        [upload] = [u for u in uploads(storage) if u["Key"] == key]
        parts = client.list_parts(Bucket=name, Key=key, UploadId=upload["UploadId"]).get("Parts", [])
        if len(parts) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the parts of {key} never arrived")


async def test_outage_mid_upload(tmp_path: Path) -> None:
    outage = S3Server(tmp_path / "s3" / "root")
    outage.start()
    try:
        name = new_bucket(outage)
        storage = make_storage(tmp_path, outage.url, name)

        def before() -> tuple[S3Writer, S3Writer]:
            first, second = storage.open_write("first.zip"), storage.open_write("second.zip")
            for writer, key in ((first, "first.zip"), (second, "second.zip")):
                writer.write(b"z" * (2 * PART + 10))
                wait_for_parts(storage, key, 2)
            return first, second

        first, second = await asyncio.to_thread(before)
        outage.stop()

        def during() -> list[BaseException]:
            errors: list[BaseException] = []
            with pytest.raises(StorageError) as caught:  # a part fails; it shows at a later write
                for _ in range(s3.PARTS_IN_FLIGHT + 2):
                    first.write(b"z" * PART)
            errors.append(caught.value)
            first.abort()  # cannot reach the endpoint either: remembered, not raised
            first.abort()
            with pytest.raises(StorageError) as caught:
                second.commit()  # aborts, which fails too
            errors.append(caught.value)
            second.abort()
            storage.open_write("third.zip").abort()  # retries the stale aborts, which fail again
            return errors

        for error in await asyncio.to_thread(during):
            assert_safe(error, "reach")
        assert sorted(key for key, _ in storage.uploads.unowned(outage.url, name)) == ["first.zip", "second.zip"]

        # Back on the same port, same data: rclone kept no multipart state, so the stale uploads
        # are gone; the next write retries their aborts and forgets them.
        outage = S3Server(outage.root, port=outage.port)
        outage.start()
        data = payload(2 * PART + 3)
        info = await storage.write("after.zip", chunked(data))
        assert storage.uploads.unowned(outage.url, name) == []
        assert info.size == len(data)
        assert await read_all(storage, "after.zip") == data
        assert [f.key for f in await storage.list()] == ["after.zip"]
        # (the killed rclone left its own staging files of the two uploads; S3 does not show them)
        assert [o for o in outage.objects(name) if not o.startswith(".rclone_temp_multipart_")] == ["after.zip"]
        assert uploads(storage) == []
    finally:
        outage.stop()


async def test_a_writer_that_lost_a_part_cannot_be_committed(storage: S3Storage, s3_server: S3Server,
                                                              bucket: str) -> None:
    """One part upload fails (the connection drops once; the endpoint itself stays up): the
    writer refuses to complete an object that would miss that part, and its upload is aborted."""
    from botocore.exceptions import ConnectionClosedError

    failed: list[int] = []

    def drop_once(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2 and not failed:
            failed.append(2)
            raise ConnectionClosedError(endpoint_url=s3_server.url)

    events = storage.client().meta.events
    events.register("provide-client-params.s3.UploadPart", drop_once)
    try:
        def run() -> BaseException:
            writer = storage.open_write("holed.zip")
            with pytest.raises(StorageError) as caught:
                for _ in range(s3.PARTS_IN_FLIGHT + 3):
                    writer.write(b"y" * PART)
            with pytest.raises(StorageError):
                writer.commit()  # the endpoint is fine by now; the missing part is not
            return caught.value

        error = await asyncio.to_thread(run)
    finally:
        events.unregister("provide-client-params.s3.UploadPart", drop_once)
    assert failed == [2]
    assert_safe(error, "reach")
    assert await storage.list() == []
    assert uploads(storage) == []
    # The storage itself is fine: the next write goes through.
    await storage.write("whole.zip", chunked(payload(3 * PART)))
    assert [f.key for f in await storage.list()] == ["whole.zip"]
