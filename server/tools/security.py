"""Random identifiers and secrets."""

from __future__ import annotations

import secrets
import string

_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits


def random_string(length: int, alphabet: str = _SECRET_ALPHABET) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def random_id() -> str:
    """A 15-character record id, as PocketBase generates them."""
    return random_string(15, _ID_ALPHABET)


def random_digits(length: int) -> str:
    return random_string(length, string.digits)
