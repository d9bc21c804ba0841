"""The official JS SDK (npm `pocketbase`) drives the whole backup flow against our server:
create (followed to its end through ``/api/backups/status``), list, download with a file token,
upload, restore (the server swaps the data and re-executes itself: same PID, same socket), delete,
and the error answers the SDK reports. Runs ```tests/e2e/sdk_backups.mjs`` on a server of its own; a second run restores a damaged backup,
which must fail with its reason in the status and leave the data (and the process) as they were."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CATALOG, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, S3Server, ServerProcess, dumps, wait_emptied
from test_backup_restore import SAFETY_NAME, login

SAFETY = "@pre_restore_<app>_<UTC time>.zip"  # a safety copy, whatever its time

E2E = Path(__file__).resolve().parent / "e2e"


def run_script(url: str, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        ["node", "sdk_backups.mjs", url, SUPERUSER_EMAIL, SUPERUSER_PASSWORD, *extra],
        cwd=E2E, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, f"sdk_backups.mjs failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


VALIDATION_MESSAGE = "An error occurred while validating the submitted data."

EXPECTED: dict[str, Any] = {
    "auth": {"isSuperuser": True},
    "create": {"returned": True, "last": {"op": "create", "key": "sdk_one.zip", "ok": True, "error": None}},
    "list": {"keys": ["sdk_one.zip"], "sizeIsPositiveInt": True, "modifiedFormat": True},
    "download": {
        "urlHasToken": True,
        "status": 200,
        "contentType": "application/zip",
        "contentDisposition": 'attachment; filename="sdk_one.zip"',
        "sizeMatchesList": True,
        "startsWithZipMagic": True,
        "hasDataDb": True,
        "hasAuxiliaryDb": True,
    },
    "upload": {"returned": True, "keys": ["sdk_one.zip", "sdk_two.zip"], "sizeMatches": True},
    "beforeRestore": ["five", "four", "one, edited", "three"],
    "restore": {
        "returned": True,
        "last": {"op": "restore", "key": "sdk_one.zip", "ok": True, "error": None},
        "errorStatusesWhileWaiting": [],
        "connectionFailuresAreFew": True,
    },
    "afterRestore": {
        "titles": ["one", "three", "two"],
        "sameRecordsAsAtBackupTime": True,
        # ours: the data the restore replaced is kept as a backup (CONTRACT.md, restore step 6)
        "backups": [SAFETY, "sdk_one.zip", "sdk_two.zip"],
        "health": {"code": 200, "canBackup": True},
    },
    "delete": {"returned": True, "keys": [SAFETY, "sdk_one.zip"]},
    "errors": {
        "createBadName": {"status": 400, "message": VALIDATION_MESSAGE, "data": {
            "name": {"code": "validation_match_invalid", "message": "Must be in a valid format."}}},
        "createExisting": {"status": 400, "message": VALIDATION_MESSAGE, "data": {
            "name": {"code": "validation_backup_name_exists",
                     "message": "The backup file name is invalid or already exists."}}},
        "restoreMissing": {"status": 400, "message": "Missing or invalid backup file.", "data": {}},
        # ours: PocketBase says 400 (CONTRACT.md, Backups)
        "deleteMissing": {"status": 404, "message": "The requested resource wasn't found.", "data": {}},
        "uploadNotAZip": {"status": 400, "message": VALIDATION_MESSAGE, "data": {
            "file": {"code": "validation_invalid_mime_type",
                     "message": '"not_a_zip.zip" mime type must be one of: application/zip.'}}},
        "listAsGuest": {"status": 401, "message": "The request requires valid record authorization token.",
                        "data": {}},
        "downloadWithAuthToken": {"status": 403, "message": "Insufficient permissions to access the resource."},
    },
}


def safety_named(value: Any) -> Any:
    """``value`` with the name of a safety copy (its time varies) replaced by ``SAFETY``."""
    if isinstance(value, dict):
        return {key: safety_named(item) for key, item in value.items()}
    if isinstance(value, list):
        return [safety_named(item) for item in value]
    if isinstance(value, str) and SAFETY_NAME.fullmatch(value):
        return SAFETY
    return value


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_sdk_backup_create_download_upload_restore_delete(fresh_server: ServerProcess, storage: str,
                                                          request: pytest.FixtureRequest) -> None:
    """The same script, the same answers, whether backups live on the disk or in a bucket."""
    assert fresh_server.process is not None
    pid = fresh_server.process.pid
    if storage == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = s3.bucket()
        response = httpx.patch(fresh_server.url + "/api/settings", headers=login(fresh_server),
                               json={"backups": {"s3": s3.settings(bucket)}}, timeout=30)
        assert response.status_code == 200, response.text
    result = safety_named(run_script(fresh_server.url))
    print("info:", result.pop("info", None))
    assert result == EXPECTED, f"got:\n{dumps(result)}\nexpected:\n{dumps(EXPECTED)}"
    # The restore re-executed the process in place: same PID, still running, started twice.
    assert fresh_server.process.pid == pid
    assert fresh_server.process.poll() is None, fresh_server.output()
    assert fresh_server.output().count("Server started at") == 2, fresh_server.output()
    backups_dir = fresh_server.data_dir / "backups"
    on_disk = sorted(p.name for p in backups_dir.iterdir() if p.name != CATALOG) if backups_dir.exists() else []
    if storage == "s3":
        assert safety_named(s3.objects(bucket)) == [SAFETY, "sdk_one.zip"] and on_disk == []
    else:
        assert safety_named(on_disk) == [SAFETY, "sdk_one.zip"]
    # The swap cleaned up after itself: no old data kept, no extracted copy left.
    assert not (fresh_server.data_dir / ".pb_restore").exists()
    assert wait_emptied(fresh_server.data_dir / ".pb_temp_to_delete") == []


def test_sdk_restore_of_a_damaged_backup_fails_and_keeps_the_data(fresh_server: ServerProcess, tmp_path: Path) -> None:
    assert fresh_server.process is not None
    pid = fresh_server.process.pid
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as archive:  # the structure of a backup, but data.db is no database
        archive.writestr("data.db", b"this is not an SQLite database " * 64)
        archive.writestr("auxiliary.db", b"")
    result = run_script(fresh_server.url, "--bad-restore", str(damaged))
    expected = {
        "upload": {"returned": True, "keys": ["sdk_bad.zip"]},
        "restore": {"returned": True, "last": {"op": "restore", "key": "sdk_bad.zip", "ok": False,
                                               "error": "data.db is not a valid SQLite database"}},
        "after": {"titles": ["kept"], "backups": ["sdk_bad.zip"], "authStillValid": True,
                  "health": {"code": 200, "canBackup": True}},
    }
    assert result == expected, f"got:\n{dumps(result)}\nexpected:\n{dumps(expected)}"
    # Refused before the swap: no re-exec, nothing left behind.
    assert fresh_server.process.pid == pid and fresh_server.process.poll() is None
    assert fresh_server.output().count("Server started at") == 1, fresh_server.output()
    assert not (fresh_server.data_dir / ".pb_restore").exists()
    assert wait_emptied(fresh_server.data_dir / ".pb_temp_to_delete") == []
