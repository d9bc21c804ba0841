"""Which rows of a table two SQLite files certainly hold alike, from their pages alone.

A partial restore's summary compares every record of the backup's table with the live one. Most
of a big table's pages are usually byte-for-byte the same in both files (a backup is a copy of
the live file's pages, and a table changes in a few places), and comparing pages costs a
fraction of decoding every record. ``differing_ranges`` walks the two b-trees of a rowid table
from their roots, descending only through interior pages that are identical in both files (so
their children are the same page numbers with the same key bounds), and returns the rowid
ranges of the table whose leaves are not identical: only those need a record-by-record walk.

Why an identical leaf settles its rows: in a table b-tree the keys of the interior pages above
a leaf bound the rowids that can be on it, so when the path to it is identical in both files,
the rows of that rowid range are exactly the leaf's cells in both. Its cells are the rowid and
the record, byte for byte, as long as none spills into overflow pages (pages elsewhere, which
may differ): the caller makes sure no record of the table is that large (``dbstat``'s
``mx_payload``). The two files must also agree on page size, reserved bytes and text encoding,
and the caller must know the two tables have the same columns in the same order.

The live file is trusted (it is this server's); the other is a backup that may be damaged: the
walk only ever follows page numbers read from pages identical to the live file's, so it goes
where the live tree goes, and a short or missing page just counts as different.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Reader = Callable[[int, int], bytes]  # (offset, size) -> bytes, possibly short at the end

MIN_ROWID = -(1 << 63)
MAX_ROWID = (1 << 63) - 1
_BELOW = MIN_ROWID - 1  # the exclusive lower bound of the leftmost child
_INTERIOR, _LEAF = 0x05, 0x0D
_RUN_PAGES = 256  # pages read in one go from each file (1 MiB of 4 KiB pages)
_MAX_DEPTH = 40  # a table b-tree of 2^63 rows is far shallower


def header_info(header: bytes) -> tuple[int, int, int] | None:
    """(page size, usable size, text encoding) from a database file's first 100 bytes."""
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None
    size = struct.unpack_from(">H", header, 16)[0]
    page_size = 65536 if size == 1 else size
    reserved = header[20]
    encoding = struct.unpack_from(">I", header, 56)[0]
    return page_size, page_size - reserved, encoding


def max_local_payload(usable: int) -> int:
    """The largest record a table leaf cell holds without an overflow page."""
    return usable - 35


def _varint(data: bytes, at: int) -> int:
    value = 0
    for index in range(8):
        byte = data[at + index]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value
    return (value << 8) | data[at + 8]


def _to_signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Interior:
    """An interior page identical in both files: its children and (on demand) their key bounds."""

    __slots__ = ("page", "low", "high", "pointers")

    def __init__(self, page: bytes, low: int, high: int) -> None:
        self.page, self.low, self.high = page, low, high
        count = struct.unpack_from(">H", page, 3)[0]
        self.pointers = struct.unpack_from(f">{count}H", page, 12)

    def children(self) -> list[int]:
        page = self.page
        kids = [struct.unpack_from(">I", page, pointer)[0] for pointer in self.pointers]
        kids.append(struct.unpack_from(">I", page, 8)[0])
        return kids

    def bounds(self, index: int) -> tuple[int, int]:
        """The rowids child ``index`` may hold: ``(low, high]``, ``low`` exclusive."""
        low = self.low if index == 0 else _to_signed(_varint(self.page, self.pointers[index - 1] + 4))
        high = self.high if index == len(self.pointers) else _to_signed(_varint(self.page, self.pointers[index] + 4))
        return low, high


def differing_ranges(read_a: Reader, root_a: int, read_b: Reader, root_b: int,
                     page_size: int) -> list[tuple[int, int]]:
    """Inclusive rowid ranges ``[low, high]`` of the table rooted at ``root_a`` in file A (and
    ``root_b`` in B) outside which both tables hold exactly the same rows, byte for byte (see the
    module's docstring for what the caller must have checked). Adjacent ranges are merged."""
    differing: list[tuple[int, int]] = []

    def page(read: Reader, number: int) -> bytes:
        return read((number - 1) * page_size, page_size) if number > 1 else b""

    # A level of the two trees: (page number in A, page number in B, parent, child index).
    # Below the roots the numbers are the same in both files (their parents are identical).
    first_a, first_b = page(read_a, root_a), page(read_b, root_b)
    if len(first_a) != page_size or first_a != first_b:
        return [(MIN_ROWID, MAX_ROWID)]
    if first_a[0] == _LEAF:
        return []
    if first_a[0] != _INTERIOR:
        return [(MIN_ROWID, MAX_ROWID)]
    parents = [_Interior(first_a, _BELOW, MAX_ROWID)]
    depth = 0
    while parents:
        depth += 1
        if depth > _MAX_DEPTH:
            return [(MIN_ROWID, MAX_ROWID)]
        level: list[tuple[int, _Interior, int]] = []
        for parent in parents:
            level.extend((child, parent, index) for index, child in enumerate(parent.children()))
        level.sort(key=lambda entry: entry[0])
        next_parents: list[_Interior] = []

        def differ(parent: _Interior, index: int) -> None:
            low, high = parent.bounds(index)
            if low < high:
                differing.append((low + 1, high))

        start = 0
        while start < len(level):
            end = start + 1  # a run of consecutive page numbers, read in one go from each file
            while end < len(level) and end - start < _RUN_PAGES and level[end][0] == level[end - 1][0] + 1:
                end += 1
            first = level[start][0]
            if first <= 1:  # page 1 holds the schema, never a table's page: corrupt
                for _, parent, index in level[start:end]:
                    differ(parent, index)
                start = end
                continue
            size = (end - start) * page_size
            block_a = read_a((first - 1) * page_size, size)
            block_b = read_b((first - 1) * page_size, size)
            if block_a == block_b and len(block_a) == size and block_a[::page_size] == bytes([_LEAF]) * (end - start):
                start = end  # all leaves, all identical: settled
                continue
            for offset, (_, parent, index) in enumerate(level[start:end]):
                one = block_a[offset * page_size:(offset + 1) * page_size]
                if len(one) != page_size or one != block_b[offset * page_size:(offset + 1) * page_size]:
                    differ(parent, index)
                elif one[0] == _INTERIOR:
                    low, high = parent.bounds(index)
                    next_parents.append(_Interior(one, low, high))
                elif one[0] != _LEAF:
                    differ(parent, index)
            start = end
        parents = next_parents
    differing.sort()
    merged: list[tuple[int, int]] = []
    for low, high in differing:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def without_overflow(read: Reader, page_size: int, roots: list[int]) -> bool:
    """Whether a database file (not auto-vacuumed) has no overflow page at all, so that no record
    of any table spills out of its leaf: its pages are exactly those of its b-trees (``roots``:
    every table's and index's root page, 1 included), counted from their interior pages alone,
    the free list's and the lock-byte page. False when it has others, or cannot tell."""
    header = read(0, 100)
    if header_info(header) is None or struct.unpack_from(">I", header, 52)[0] != 0:
        return False
    freelist = struct.unpack_from(">I", header, 36)[0]
    pages = struct.unpack_from(">I", header, 28)[0]
    if pages <= 0 or len(read((pages - 1) * page_size, page_size)) != page_size or \
            read(pages * page_size, 1):
        return False  # (the header's page count is not the file's)
    counted = freelist + (1 if pages > (1 << 30) // page_size else 0)
    for root in roots:
        level = [root]
        for _depth in range(_MAX_DEPTH):
            first = read((level[0] - 1) * page_size, page_size)
            offset = 100 if level[0] == 1 else 0
            if len(first) != page_size:
                return False
            kind = first[offset]
            if kind in (_LEAF, 0x0A):
                counted += len(level)
                break
            if kind not in (_INTERIOR, 0x02):
                return False
            children: list[int] = []
            for number in level:
                page = first if number == level[0] else read((number - 1) * page_size, page_size)
                offset = 100 if number == 1 else 0
                if len(page) != page_size or page[offset] != kind:
                    return False
                count = struct.unpack_from(">H", page, offset + 3)[0]
                pointers = struct.unpack_from(f">{count}H", page, offset + 12)
                children.extend(struct.unpack_from(">I", page, pointer)[0] for pointer in pointers)
                children.append(struct.unpack_from(">I", page, offset + 8)[0])
            counted += len(level)
            if not children or counted + len(children) > pages:
                return False
            level = children
        else:
            return False
    return counted == pages
