"""Reading the committed frames of a SQLite WAL file (https://sqlite.org/fileformat.html#the_write_ahead_log).

A WAL starts with a 32-byte header (magic, version, page size, checkpoint sequence, salt-1, salt-2,
checksums); each frame is a 24-byte header (page number, the database size in pages for the commit
frame of a transaction or 0, salt-1, salt-2, checksums) followed by the page. A frame belongs to the
current WAL only if its salts are the header's: after a checkpoint restarts the WAL, frames are
written again from the start, and older frames past the new end keep the old salts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
MAGICS = (0x377F0682, 0x377F0683)


@dataclass
class Batch:
    """The transactions committed in the WAL between two reads: the last version of each page
    they wrote, and the database size after the last one."""

    pages: dict[int, memoryview] = field(default_factory=dict)
    commit: int = 0
    transactions: int = 0


def header(raw: bytes) -> tuple[int, bytes] | None:
    """The page size and the salts of a WAL header, None if there is none (an empty WAL)."""
    if len(raw) < WAL_HEADER_SIZE:
        return None
    magic, _version, page_size = struct.unpack_from(">III", raw)
    if magic not in MAGICS:
        return None
    if page_size == 1:
        page_size = 65536
    return page_size, raw[16:24]


def parse(raw: bytes, start: int, page_size: int, salts: bytes) -> tuple[Batch, int]:
    """The committed transactions in ``raw`` (the WAL bytes from file offset ``start``) and the file
    offset just past the last commit frame (``start`` if there is none)."""
    batch = Batch()
    view = memoryview(raw)
    frame = FRAME_HEADER_SIZE + page_size
    pending: dict[int, memoryview] = {}
    position = 0
    end = start
    while position + frame <= len(raw):
        if raw[position + 8:position + 16] != salts:
            break
        pgno, commit = struct.unpack_from(">II", raw, position)
        pending[pgno] = view[position + FRAME_HEADER_SIZE:position + frame]
        position += frame
        if commit:
            batch.pages.update(pending)
            pending = {}
            batch.commit = commit
            batch.transactions += 1
            end = start + position
    return batch, end
