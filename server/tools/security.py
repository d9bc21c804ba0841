"""Random identifiers and secrets."""

from __future__ import annotations

import os
import string

_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits


def random_string(length: int, alphabet: str = _SECRET_ALPHABET) -> str:
    """``length`` characters of ``alphabet``, uniformly drawn from the OS's CSPRNG.

    Bytes from one ``os.urandom`` call, each kept only below the largest multiple of the alphabet's
    size (no modulo bias): one system call per string instead of ``secrets.choice``'s one per
    character (this runs for every record and every request log entry)."""
    size = len(alphabet)
    limit = 256 - 256 % size
    out: list[str] = []
    while len(out) < length:
        out.extend(alphabet[b % size] for b in os.urandom(length + length // 2 + 4) if b < limit)
    return "".join(out[:length])


def random_id() -> str:
    """A 15-character record id, as PocketBase generates them."""
    return random_string(15, _ID_ALPHABET)


def random_digits(length: int) -> str:
    return random_string(length, string.digits)
