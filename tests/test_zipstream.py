"""The streaming zip writer (``server.tools.zipstream``): what it writes is a standard zip that
Python's ``zipfile`` and Info-ZIP's ``unzip -t`` read back byte for byte, whatever the chunk
boundaries, the method chosen (stored or deflated), zip64 or the output's lack of ``seek``."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from server.tools import zipstream
from server.tools.zipstream import CHUNK, ZipStream


class Unseekable:
    """An output that can only be written to (as an S3 multipart upload)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self.buffer.write(data)

    def getvalue(self) -> bytes:
        return self.buffer.getvalue()


def text(size: int, seed: int = 1) -> bytes:
    words = [f"word{i}".encode() for i in range(300)]
    out = bytearray()
    state = seed
    while len(out) < size:
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[state % len(words)] + b" "
    return bytes(out[:size])


def write(entries: dict[str, bytes], workers: int = 2, **kwargs: int) -> bytes:
    out = Unseekable()
    stream = ZipStream(out, workers=workers)  # type: ignore[arg-type]
    for name, data in entries.items():
        stream.add_file(name, io.BytesIO(data), 1_700_000_000.0, len(data), **kwargs)
    stream.close()
    return out.getvalue()


def unzip_test(tmp_path: Path, data: bytes) -> None:
    if shutil.which("unzip") is None:
        pytest.fail("unzip is needed for this test (apt-get install unzip)")
    path = tmp_path / "out.zip"
    path.write_bytes(data)
    result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "No errors detected" in result.stdout, result.stdout + result.stderr


SIZES = [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_round_trip_at_every_chunk_boundary(tmp_path: Path, workers: int) -> None:
    entries = {f"text/{size}.txt": text(size, size) for size in SIZES}
    entries |= {f"random/{size}.bin": os.urandom(size) for size in SIZES}
    entries["ünïcode/名前.txt"] = text(5000)
    data = write(entries, workers)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == list(entries)
        for name, content in entries.items():
            assert archive.read(name) == content, name
            info = archive.getinfo(name)
            assert info.file_size == len(content)
            assert info.flag_bits & 0x08  # sizes in a data descriptor: the output was never seeked
            assert (info.external_attr >> 16) == 0o100644
            assert info.date_time == time.localtime(1_700_000_000)[:6]
        # Text is deflated; random bytes are stored as they are.
        assert archive.getinfo(f"text/{3 * CHUNK + 17}.txt").compress_type == zipfile.ZIP_DEFLATED
        assert archive.getinfo(f"text/{3 * CHUNK + 17}.txt").compress_size < (3 * CHUNK) // 2
        assert archive.getinfo(f"random/{3 * CHUNK + 17}.bin").compress_type == zipfile.ZIP_STORED
    unzip_test(tmp_path, data)


def test_output_does_not_depend_on_the_number_of_threads() -> None:
    entries = {"a.txt": text(5 * CHUNK + 3), "b.bin": os.urandom(2 * CHUNK)}
    assert write(entries, 1) == write(entries, 2) == write(entries, 4)


def test_digest_and_progress_see_every_byte_in_order() -> None:
    content = text(4 * CHUNK + 5)
    seen = bytearray()
    counted: list[int] = []
    out = Unseekable()
    stream = ZipStream(out)  # type: ignore[arg-type]
    entry = stream.add_file("a.txt", io.BytesIO(content), time.time(), len(content), on_chunk=seen.extend,
                            progress=counted.append)
    stream.close()
    assert bytes(seen) == content and sum(counted) == len(content)
    assert entry.size == len(content)


def test_zip64_entry_and_more_than_65535_entries(tmp_path: Path) -> None:
    out = Unseekable()
    stream = ZipStream(out)  # type: ignore[arg-type]
    big = text(CHUNK + 10)
    # A size hint past 2 GiB makes the entry zip64 (local header, data descriptor, central directory).
    stream.add_file("zip64.txt", io.BytesIO(big), time.time(), 3 << 30)
    for index in range(70_000):
        stream.add_bytes(f"e/{index}", b"x")
    stream.close()
    data = out.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert len(archive.infolist()) == 70_001
        assert archive.read("zip64.txt") == big
        assert archive.read("e/69999") == b"x"
    assert b"PK\x06\x06" in data[-200:] and b"PK\x06\x07" in data[-200:]  # zip64 end records
    unzip_test(tmp_path, data)


def test_cancel_stops_an_entry_midway() -> None:
    cancel = threading.Event()
    out = Unseekable()
    stream = ZipStream(out, cancel=cancel)  # type: ignore[arg-type]

    calls: list[int] = []

    def stop_after_two(_: bytes) -> None:
        calls.append(1)
        if len(calls) == 2:
            cancel.set()

    with pytest.raises(zipstream.Cancelled):
        stream.add_file("a.txt", io.BytesIO(text(6 * CHUNK)), time.time(), 6 * CHUNK, on_chunk=stop_after_two)
    stream.abort()


def test_isal_is_the_deflate_in_use() -> None:
    """isal is a dependency: the zlib fallback is for platforms without its wheels."""
    assert zipstream.FAST_DEFLATE == "isal"
