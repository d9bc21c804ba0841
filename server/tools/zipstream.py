"""A streaming zip writer with parallel deflate (pigz-style), for outputs that cannot seek.

Each entry's data is read in chunks; the chunks are deflated in parallel by a thread pool (ISA-L's
deflate through ``isal`` where installed, else zlib: both release the GIL), each chunk by a fresh
compressor ending in a sync flush (the last one in ``Z_FINISH``). Concatenated, they form one
standard deflate stream, so any unzip reads the archive: Python's ``zipfile``, ``unzip -t``,
PocketBase's Go ``archive/zip``. The CRC-32 is computed in order as chunks are read.

Every ``SEGMENT_CHUNKS`` chunks the dictionary is not carried over: the stream is then a series of
independent segments (as ``pigz --independent`` writes, at a cost of about 0.03% in size on our
data), whose compressed sizes ``ZipEntry.segments`` gives, so that a reader who knows them can
inflate the segments in parallel (``inflate_segment``); any other reader sees one deflate stream.

Entries whose first chunk does not compress are stored. Sizes and CRCs follow each entry in a data
descriptor (the output is never seeked), with zip64 fields where an entry, an offset or the number
of entries needs them.

Memory is bounded: at most ``workers * 2 + 1`` chunks are in flight at a time.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from .threads import background_pool
from dataclasses import dataclass
from typing import IO, Any

try:
    from isal import isal_zlib as _deflate_lib  # ISA-L: several times faster than zlib at level 1

    FAST_DEFLATE = "isal"
except ImportError:  # pragma: no cover - isal has wheels for the platforms we run on
    _deflate_lib = zlib  # type: ignore[assignment]
    FAST_DEFLATE = "zlib"
inflate_lib = _deflate_lib  # ISA-L's inflate: about twice zlib's speed
crc32 = _deflate_lib.crc32  # ISA-L's: several times zlib's

CHUNK = 1 << 20
SEGMENT_CHUNKS = 4  # chunks per independent segment of a deflated entry
SEGMENT = SEGMENT_CHUNKS * CHUNK  # bytes of content per segment (the last one: what is left)
STORED, DEFLATED = 0, 8
SAMPLE = 64 << 10
WINDOW = 32 << 10  # deflate's window: what a chunk may refer back to in the previous one
STORE_RATIO = 0.97  # a first chunk that deflates to more than this is stored as is
_FLAGS = 0x08 | 0x800  # sizes in a data descriptor; UTF-8 names
_ZIP64_LIMIT = 0xFFFFFFFF
_MADE_BY = (3 << 8) | 45  # Unix, spec 4.5 (zip64)


class Cancelled(Exception):
    """The writer's ``cancel`` event was set."""


@dataclass
class ZipEntry:
    name: bytes
    method: int
    dos_time: int
    dos_date: int
    external_attr: int
    offset: int
    zip64: bool
    crc: int = 0
    compressed: int = 0
    size: int = 0
    segments: list[int] | None = None  # deflated: the compressed size of each independent segment


class SegmentError(ValueError):
    """A segment is not the independent deflate segment it was said to be."""


def inflate_segment(raw: bytes, final: bool, limit: int = SEGMENT) -> bytes:
    """The content of one independent segment (``raw``: its compressed bytes), at most ``limit``
    bytes. A segment that is not final must end in a sync flush and use all of ``raw``; the final
    one must end the stream. Anything else raises ``SegmentError`` (or the inflater's error)."""
    inflater = inflate_lib.decompressobj(-15)
    data = inflater.decompress(raw, limit + 1)
    if len(data) > limit or inflater.unconsumed_tail:
        raise SegmentError("the segment inflates to more than it may")
    data += inflater.flush()
    if len(data) > limit or inflater.unused_data or inflater.eof != final:
        raise SegmentError("the segment is not where it was said to be")
    return data


def _dos_time(mtime: float) -> tuple[int, int]:
    t = time.localtime(mtime)
    year = max(1980, min(2107, t.tm_year))
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), ((year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _deflate(data: bytes | memoryview, level: int, final: bool, dictionary: bytes = b"") -> bytes:
    """One chunk of a deflate stream; ``dictionary``: the end of the previous chunk (as pigz does,
    so that splitting the stream costs next to nothing in size)."""
    if dictionary:
        compressor = _deflate_lib.compressobj(level, zlib.DEFLATED, -15, zdict=dictionary)
    else:
        compressor = _deflate_lib.compressobj(level, zlib.DEFLATED, -15)
    head = compressor.compress(data)
    return head + compressor.flush(_deflate_lib.Z_FINISH if final else _deflate_lib.Z_SYNC_FLUSH)


def compresses(sample: bytes, level: int = 1) -> bool:
    """Whether ``sample`` (the start of a file) is worth deflating."""
    if not sample:
        return True
    return len(_deflate(sample[:SAMPLE], level, True)) < STORE_RATIO * min(len(sample), SAMPLE)


class ZipStream:
    """Writes a zip archive into ``out`` (anything with ``write``), entry by entry.

    ``add_file`` takes a readable binary file; ``on_chunk(data)`` sees each chunk of its content in
    order (for a digest), ``progress(n)`` each chunk's size. Blocking: use it from one thread.
    """

    def __init__(self, out: IO[bytes], level: int = 1, workers: int = 2,
                 cancel: threading.Event | None = None) -> None:
        self._out = out
        self._level = level
        self._pool = background_pool(workers, "deflate")  # below the event loop's priority
        self._in_flight = max(1, workers) * 2 + 1
        self._cancel = cancel or threading.Event()
        self._entries: list[ZipEntry] = []
        self._offset = 0
        self._closed = False

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._offset += len(data)

    def add_file(self, name: str, source: IO[bytes], mtime: float, size_hint: int = 0,
                 on_chunk: Callable[[bytes], None] = lambda data: None,
                 progress: Callable[[int], None] = lambda n: None, mode: int = 0o644) -> ZipEntry:
        first = source.read(CHUNK)
        method = DEFLATED if compresses(first, self._level) else STORED
        entry = self._begin(name, method, mtime, size_hint, mode)
        crc, size, compressed = 0, 0, 0
        pending: deque[tuple[Future[bytes], bool]] = deque()  # (a deflated chunk, whether it starts a segment)
        chunk = first
        dictionary = b""
        segments: list[int] = []
        index = 0
        while True:
            if self._cancel.is_set():
                raise Cancelled()
            following = source.read(CHUNK) if chunk else b""
            if chunk:
                crc = crc32(chunk, crc)
                size += len(chunk)
                on_chunk(chunk)
                progress(len(chunk))
            final = not following
            if method == STORED:
                if chunk:
                    self._write(chunk)
                    compressed += len(chunk)
            else:
                starts = index % SEGMENT_CHUNKS == 0
                if starts:
                    dictionary = b""  # a new independent segment
                pending.append((self._pool.submit(_deflate, chunk, self._level, final, dictionary), starts))
                dictionary = chunk[-WINDOW:]
                while len(pending) >= self._in_flight or (final and pending):
                    future, starts = pending.popleft()
                    data = future.result()
                    if starts:
                        segments.append(0)
                    self._write(data)
                    compressed += len(data)
                    segments[-1] += len(data)
            index += 1
            if final:
                break
            chunk = following
        entry.crc, entry.size, entry.compressed = crc, size, compressed
        entry.segments = segments if method == DEFLATED else None
        self._end(entry)
        return entry

    def add_bytes(self, name: str, data: bytes, mtime: float | None = None, mode: int = 0o644) -> ZipEntry:
        return self.add_file(name, io.BytesIO(data), time.time() if mtime is None else mtime, len(data), mode=mode)

    def _begin(self, name: str, method: int, mtime: float, size_hint: int, mode: int) -> ZipEntry:
        encoded = name.encode("utf-8")
        dos_time, dos_date = _dos_time(mtime)
        zip64 = size_hint >= (1 << 31) or self._offset >= _ZIP64_LIMIT
        entry = ZipEntry(encoded, method, dos_time, dos_date, (0o100000 | mode) << 16, self._offset, zip64)
        extra = struct.pack("<HHQQ", 0x0001, 16, 0, 0) if zip64 else b""
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, _FLAGS, method, dos_time, dos_date,
                             0, _ZIP64_LIMIT if zip64 else 0, _ZIP64_LIMIT if zip64 else 0, len(encoded), len(extra))
        self._write(header + encoded + extra)
        return entry

    def _end(self, entry: ZipEntry) -> None:
        if entry.zip64:
            self._write(struct.pack("<IIQQ", 0x08074B50, entry.crc, entry.compressed, entry.size))
        elif entry.compressed > _ZIP64_LIMIT or entry.size > _ZIP64_LIMIT:
            raise ValueError(f"{entry.name!r} outgrew its size hint past 4 GiB without zip64")
        else:
            self._write(struct.pack("<IIII", 0x08074B50, entry.crc, entry.compressed, entry.size))
        self._entries.append(entry)

    def close(self) -> None:
        """Write the central directory and the end records (the archive is then complete)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        start = self._offset
        for entry in self._entries:
            self._write(self._central_header(entry))
        size = self._offset - start
        count = len(self._entries)
        if count >= 0xFFFF or start >= _ZIP64_LIMIT or size >= _ZIP64_LIMIT:
            end64 = self._offset
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _MADE_BY, 45, 0, 0, count, count, size, start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                min(size, _ZIP64_LIMIT), min(start, _ZIP64_LIMIT), 0))

    def abort(self) -> None:
        """Stop without completing the archive (the caller discards what was written)."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _central_header(entry: ZipEntry) -> bytes:
        values: list[int] = []
        compressed, size, offset = entry.compressed, entry.size, entry.offset
        if size >= _ZIP64_LIMIT or entry.zip64:
            values.append(size)
            size = _ZIP64_LIMIT
        if compressed >= _ZIP64_LIMIT or entry.zip64:
            values.append(compressed)
            compressed = _ZIP64_LIMIT
        if offset >= _ZIP64_LIMIT:
            values.append(offset)
            offset = _ZIP64_LIMIT
        extra = struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values) if values else b""
        needed = 45 if values else 20
        return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _MADE_BY, needed, _FLAGS, entry.method, entry.dos_time,
                           entry.dos_date, entry.crc, compressed, size, len(entry.name), len(extra), 0, 0, 0,
                           entry.external_attr, offset) + entry.name + extra


def describe() -> dict[str, Any]:
    return {"deflate": FAST_DEFLATE}
