"""LTX files (superfly/ltx, the format of Litestream 0.5): encoder, decoder and checksums.

Layout of a file (all integers big-endian):
- a 100-byte header: ``LTX1``, flags, page size, commit (database size in pages after this file),
  min and max TXID, timestamp (ms since the epoch), the pre-apply checksum of the database, WAL
  offset/size/salts (zero here), node id;
- the pages in ascending page number, each a 6-byte page header (pgno, flags = 1: a 4-byte size
  follows) then the size and the LZ4 *block* of the page;
- an empty page header, the page index (uvarints pgno, offset, size; 0; then its byte length as u64);
- a 16-byte trailer: the post-apply checksum of the database and the file checksum, a CRC-64 (ISO,
  as Go's ``hash/crc64``) of everything before it with each page *uncompressed* instead of its block.

The database checksum is the XOR of every page's ``CRC-64(pgno || page)`` (the lock page left out),
with the top bit set (``FLAG``) on each checksum; a snapshot (min TXID 1) holds every page.

Litestream 0.5 writes its files with the "no checksum" flag (pre- and post-apply checksums zero)
and its restore insists on that, so ours carry the flag too, and keep the database checksums
before and after the file in bytes 80-95 of the header, which the format reserves (zero in
Litestream's files, ignored by its reader, covered by the file checksum).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import lz4.block
from fastcrc import crc64

MAGIC = b"LTX1"
HEADER_SIZE = 100
PAGE_HEADER_SIZE = 6
TRAILER_SIZE = 16
FLAG = 1 << 63
LOW = FLAG - 1
PAGE_FLAG_SIZE = 1
HEADER_FLAG_NO_CHECKSUM = 1 << 1
_HEADER = struct.Struct(">4sIIIQQqQqqIIQQQ")  # 96 bytes used of the 100 (80-95: ours)


class LTXError(Exception):
    """An LTX file that is not what it must be (damaged, truncated, out of order)."""


def crc(data: bytes | memoryview, initial: int | None = None) -> int:
    return crc64.go_iso(data, initial) if initial is not None else crc64.go_iso(data)


def page_checksum(pgno: int, data: bytes | memoryview) -> int:
    return FLAG | crc(data, crc(struct.pack(">I", pgno)))


def lock_pgno(page_size: int) -> int:
    return (1 << 30) // page_size + 1


def filename(min_txid: int, max_txid: int) -> str:
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int] | None:
    if len(name) != 37 or not name.endswith(".ltx") or name[16] != "-":
        return None
    try:
        return int(name[:16], 16), int(name[17:33], 16)
    except ValueError:
        return None


@dataclass
class Header:
    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int  # ms since the epoch
    pre_apply: int = 0  # ours: the database checksum before this file (0 for a snapshot)
    post_apply: int = 0  # ours: the database checksum after it
    flags: int = HEADER_FLAG_NO_CHECKSUM

    @property
    def is_snapshot(self) -> bool:
        return self.min_txid == 1

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.flags, self.page_size, self.commit, self.min_txid, self.max_txid,
                           self.timestamp, 0, 0, 0, 0, 0, 0, self.pre_apply, self.post_apply)
        return raw + bytes(HEADER_SIZE - len(raw))

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        if len(raw) < HEADER_SIZE or raw[:4] != MAGIC:
            raise LTXError("not an LTX file")
        (_, flags, page_size, commit, min_txid, max_txid, timestamp, _pre, _off, _size, _s1, _s2, _node,
         pre, post) = _HEADER.unpack_from(raw)
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1) or not 0 < min_txid <= max_txid:
            raise LTXError("invalid LTX header")
        return cls(page_size, commit, min_txid, max_txid, timestamp, pre, post, flags)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Encoder:
    """Writes one LTX file to ``out`` (anything with ``write``); pages in ascending order."""

    def __init__(self, out: BinaryIO, header: Header) -> None:
        self._out = out
        self.header = header
        raw = header.pack()
        self._hash = crc(raw)
        out.write(raw)
        self._n = len(raw)
        self._index: list[tuple[int, int, int]] = []
        self._last = 0

    def _put(self, data: bytes, hashed: bytes | memoryview | None = None) -> None:
        self._out.write(data)
        self._hash = crc(data if hashed is None else hashed, self._hash)
        self._n += len(data)

    def page(self, pgno: int, data: bytes | memoryview) -> None:
        if pgno <= self._last or len(data) != self.header.page_size:
            raise LTXError("pages out of order")
        start = self._n
        block = lz4.block.compress(data, store_size=False)
        head = struct.pack(">IHI", pgno, PAGE_FLAG_SIZE, len(block))
        self._out.write(head)
        self._out.write(block)
        self._hash = crc(data, crc(head, self._hash))
        self._n += len(head) + len(block)
        self._index.append((pgno, start, self._n - start))
        self._last = pgno

    def finish(self, post_apply: int = 0) -> int:
        """The end marker, index and trailer; returns the file checksum. (The trailer's post-apply
        checksum stays 0, as the flag says: ours is in the header.)"""
        self._put(bytes(PAGE_HEADER_SIZE))
        index = b"".join(_uvarint(p) + _uvarint(o) + _uvarint(s) for p, o, s in self._index) + _uvarint(0)
        self._put(index + struct.pack(">Q", len(index)))
        post = struct.pack(">Q", post_apply)
        file_checksum = FLAG | crc(post, self._hash)
        self._out.write(post + struct.pack(">Q", file_checksum))
        return file_checksum


@dataclass
class Decoded:
    header: Header
    post_apply: int


def decode(handle: BinaryIO) -> Iterator[tuple[int, bytes] | Decoded]:
    """The pages of an LTX file as ``(pgno, data)``, then a ``Decoded`` once the file checksum
    has been checked (``LTXError`` if anything is wrong: nothing after a bad page is trusted)."""
    raw = handle.read(HEADER_SIZE)
    header = Header.unpack(raw)
    hashed = crc(raw)
    size = header.page_size
    last = 0
    while True:
        head = handle.read(PAGE_HEADER_SIZE)
        if len(head) != PAGE_HEADER_SIZE:
            raise LTXError("truncated LTX file")
        hashed = crc(head, hashed)
        pgno, flags = struct.unpack(">IH", head)
        if pgno == 0 and flags == 0:
            break
        if pgno <= last or flags != PAGE_FLAG_SIZE:
            raise LTXError("invalid LTX page header")
        length_raw = handle.read(4)
        if len(length_raw) != 4:
            raise LTXError("truncated LTX file")
        hashed = crc(length_raw, hashed)
        (length,) = struct.unpack(">I", length_raw)
        block = handle.read(length)
        if len(block) != length:
            raise LTXError("truncated LTX file")
        try:
            data = lz4.block.decompress(block, uncompressed_size=size)
        except Exception:
            raise LTXError("damaged LTX page") from None
        if len(data) != size:
            raise LTXError("damaged LTX page")
        hashed = crc(data, hashed)
        last = pgno
        yield pgno, data
    rest = handle.read()
    if len(rest) < TRAILER_SIZE + 8:
        raise LTXError("truncated LTX file")
    hashed = crc(rest[:-8], hashed)
    post_apply, file_checksum = struct.unpack(">QQ", rest[-TRAILER_SIZE:])
    if FLAG | hashed != file_checksum:
        raise LTXError("LTX file checksum mismatch")
    yield Decoded(header, post_apply)


def compact(inputs: list[str], out: BinaryIO) -> Header:
    """One file for the consecutive files ``inputs`` (TXIDs following each other): the last
    version of each page, the database size and checksum after the last one, its timestamp.
    Holds the distinct pages in memory (what changed in the span)."""
    pages: dict[int, bytes] = {}
    headers: list[Header] = []
    for path in inputs:
        with open(path, "rb") as handle:
            for item in decode(handle):
                if isinstance(item, Decoded):
                    if headers and item.header.min_txid != headers[-1].max_txid + 1:
                        raise LTXError("the files to compact do not follow each other")
                    headers.append(item.header)
                else:
                    pages[item[0]] = item[1]
    first, last = headers[0], headers[-1]
    header = Header(last.page_size, last.commit, first.min_txid, last.max_txid, last.timestamp,
                    first.pre_apply, last.post_apply)
    encoder = Encoder(out, header)
    for pgno in sorted(pages):
        if pgno <= last.commit:
            encoder.page(pgno, pages[pgno])
    encoder.finish()
    return header
