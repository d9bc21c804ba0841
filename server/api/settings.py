from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..errors import BadRequest, ValidationError, field_error
from ..storage import StorageError
from .common import get_app, json_response, no_content, read_json, require_superuser


async def get_settings(request: Request) -> Response:
    await require_superuser(request)
    return json_response(get_app(request).settings.public())


async def patch_settings(request: Request) -> Response:
    await require_superuser(request)
    data = await read_json(request)
    return json_response(await get_app(request).settings.update(data))


S3_TEST_FAILED = "Failed to test the S3 filesystem."


async def test_s3(request: Request) -> Response:
    """``POST /api/settings/test/s3 {"filesystem": "backups"}``: probe the saved S3 settings."""
    await require_superuser(request)
    filesystem = (await read_json(request)).get("filesystem")
    if filesystem is not None and not isinstance(filesystem, str):
        raise BadRequest("An error occurred while loading the submitted data.")  # as PocketBase: not a string
    if not filesystem:
        raise ValidationError({"filesystem": field_error("validation_required", "Cannot be blank.")}, S3_TEST_FAILED)
    if filesystem not in ("storage", "backups"):
        raise ValidationError({"filesystem": field_error("validation_in_invalid", "Must be a valid value.")},
                              S3_TEST_FAILED)
    try:
        if filesystem == "storage":  # record files always live on the local disk here
            raise StorageError("S3 storage filesystem is not enabled.")
        await get_app(request).backups.test_s3()
    except StorageError as exc:
        raise BadRequest(f"{S3_TEST_FAILED} Raw error: \n{str(exc).rstrip('.')}.") from exc
    return no_content()
