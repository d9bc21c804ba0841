"""Auth routes of auth collections: password login, token refresh, auth methods."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .. import auth as tokens
from ..errors import BadRequest, Forbidden, ValidationError, field_error
from ..records import Requester
from .common import get_app, json_response, read_body, require_auth

_AUTH_FAILED = "Failed to authenticate."


def _auth_collection(request: Request):
    collection = get_app(request).collections.get(request.path_params["collection"])
    if not collection.is_auth:
        raise BadRequest("The collection is not an auth collection.")
    return collection


async def auth_with_password(request: Request) -> Response:
    app = get_app(request)
    collection = _auth_collection(request)
    data = await read_body(request)
    errors = {}
    for key in ("identity", "password"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise BadRequest("An error occurred while loading the submitted data.")
        if not value:
            errors[key] = field_error("validation_required", "Cannot be blank.")
    if errors:
        raise ValidationError(errors)
    if not collection.options.get("passwordAuth", {}).get("enabled", True):
        raise BadRequest("The collection is not configured to allow password authentication.")
    row = await app.records.find_auth_row(collection, data["identity"])
    # Check a password even for an unknown identity, so timing does not tell which emails exist.
    hashed = row["password"] if row is not None else "$2b$10$" + "x" * 53
    if not await tokens.check_password(data["password"], hashed) or row is None:
        raise BadRequest(_AUTH_FAILED)
    token = tokens.issue_auth_token(collection, row["id"], row["tokenKey"])
    who = Requester(record=dict(row), collection=collection)
    return json_response({"record": app.records.to_json(collection, row, who), "token": token})


async def auth_refresh(request: Request) -> Response:
    app = get_app(request)
    collection = _auth_collection(request)
    who = await require_auth(request)
    assert who.collection is not None and who.record is not None
    if who.collection.id != collection.id:
        raise Forbidden("The request requires valid auth record of this collection.")
    row = await app.records.find_row(collection, who.record["id"])
    if row is None:
        raise Forbidden()
    token = tokens.issue_auth_token(collection, row["id"], row["tokenKey"])
    return json_response({"record": app.records.to_json(collection, row, who), "token": token})


async def auth_methods(request: Request) -> Response:
    collection = _auth_collection(request)
    password = collection.options.get("passwordAuth", {})
    return json_response({
        "password": {"identityFields": password.get("identityFields", ["email"]), "enabled": password.get("enabled", True)},
        "oauth2": {"providers": [], "enabled": False},
        "mfa": {"enabled": False, "duration": 0},
        "otp": {"enabled": False, "duration": 0},
    })
