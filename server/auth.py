"""Passwords, auth tokens (JWT, as PocketBase's) and file tokens (itsdangerous).

An auth token is an HS256 JWT whose payload is ``{id, collectionId, type: "auth", refreshable,
exp}``: the SDKs decode it to know whether it is still valid. It is signed with the record's own
``tokenKey`` plus its collection's secret, so changing a password (which rotates ``tokenKey``)
or deleting the record invalidates every token issued before.

A file token is an itsdangerous timed signature over ``{id, collectionId, type: "file"}`` with
the same kind of per-record key; it is opaque to clients and lives ``fileToken.duration`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import bcrypt
import jwt
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from .collections import Collection
from .tools.security import random_string

BCRYPT_ROUNDS = 10  # as PocketBase (Go's bcrypt.DefaultCost)
MAX_PASSWORD_BYTES = 71  # bcrypt ignores what comes after the 72nd byte
_FILE_TOKEN_SALT = "pb-file-token"


async def hash_password(password: str) -> str:
    """The bcrypt hash of ``password``, computed in a worker thread (it takes tens of ms)."""
    return await asyncio.to_thread(_hash, password)


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


async def check_password(password: str, hashed: str) -> bool:
    if not hashed:
        return False
    return await asyncio.to_thread(_check, password, hashed)


def _check(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode()[:72], hashed.encode())
    except ValueError:
        return False


def new_token_key() -> str:
    return random_string(50)


@dataclass(frozen=True)
class TokenClaims:
    record_id: str
    collection_id: str
    kind: str


def issue_auth_token(collection: Collection, record_id: str, token_key: str, refreshable: bool = True) -> str:
    payload = {
        "collectionId": collection.id,
        "exp": int(time.time()) + collection.token_duration("authToken"),
        "id": record_id,
        "refreshable": refreshable,
        "type": "auth",
    }
    return jwt.encode(payload, token_key + collection.token_secret("authToken"), algorithm="HS256")


def peek_auth_token(token: str) -> TokenClaims | None:
    """The claims of a token *before* its signature is checked (to find the key to check it with)."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        return None
    record_id, collection_id = payload.get("id"), payload.get("collectionId")
    if not isinstance(record_id, str) or not isinstance(collection_id, str) or payload.get("type") != "auth":
        return None
    return TokenClaims(record_id, collection_id, "auth")


def verify_auth_token(token: str, collection: Collection, token_key: str) -> bool:
    try:
        payload = jwt.decode(
            token,
            token_key + collection.token_secret("authToken"),
            algorithms=["HS256"],
            options={"require": ["exp", "id", "collectionId", "type"]},
        )
    except jwt.PyJWTError:
        return False
    return payload.get("type") == "auth"


def _file_serializer(collection: Collection, token_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(token_key + collection.token_secret("fileToken"), salt=_FILE_TOKEN_SALT)


def issue_file_token(collection: Collection, record_id: str, token_key: str) -> str:
    payload = {"id": record_id, "collectionId": collection.id, "type": "file"}
    return str(_file_serializer(collection, token_key).dumps(payload))


def peek_file_token(token: str) -> TokenClaims | None:
    try:
        ok, payload = URLSafeTimedSerializer("unused", salt=_FILE_TOKEN_SALT).loads_unsafe(token)
    except Exception:  # loads_unsafe raises on undecodable payloads
        return None
    if not isinstance(payload, dict) or payload.get("type") != "file":
        return None
    record_id, collection_id = payload.get("id"), payload.get("collectionId")
    if not isinstance(record_id, str) or not isinstance(collection_id, str):
        return None
    return TokenClaims(record_id, collection_id, "file")


def verify_file_token(token: str, collection: Collection, token_key: str) -> bool:
    try:
        payload: Any = _file_serializer(collection, token_key).loads(
            token, max_age=collection.token_duration("fileToken")
        )
    except (SignatureExpired, BadSignature):
        return False
    return isinstance(payload, dict) and payload.get("type") == "file"
