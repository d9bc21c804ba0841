"""Content-based mime type detection for uploaded files (magic numbers, then a text check)."""

from __future__ import annotations

_SIGNATURES: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"%PDF-", 0, "application/pdf"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"PK\x05\x06", 0, "application/zip"),
    (b"\x1f\x8b", 0, "application/gzip"),
    (b"BM", 0, "image/bmp"),
    (b"SQLite format 3\x00", 0, "application/vnd.sqlite3"),
    (b"ftypavif", 4, "image/avif"),
    (b"ftypheic", 4, "image/heic"),
    (b"ftypisom", 4, "video/mp4"),
    (b"ftypmp42", 4, "video/mp4"),
    (b"ID3", 0, "audio/mpeg"),
    (b"OggS", 0, "application/ogg"),
]

SNIFF_LENGTH = 3072


def detect(head: bytes) -> str:
    """The mime type of a file whose first bytes (``SNIFF_LENGTH`` suffice) are ``head``."""
    for magic, offset, mime in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    stripped = head.lstrip()
    if stripped[:5].lower() == b"<svg " or (stripped[:5] == b"<?xml" and b"<svg" in head):
        return "image/svg+xml"
    if _is_text(head):
        if stripped[:1] in (b"{", b"["):
            return "application/json"
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still text.
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def matches(detected: str, allowed: list[str]) -> bool:
    """Whether ``detected`` is one of ``allowed`` (parameters such as charset are ignored)."""
    base = detected.split(";", 1)[0].strip().lower()
    for item in allowed:
        candidate = item.split(";", 1)[0].strip().lower()
        if candidate == base or (base == "application/json" and candidate == "text/plain"):
            return True
    return False
