"""Application settings, persisted as one JSON document in ``data.db`` (``_params``)."""

from __future__ import annotations

import copy
import json
from typing import Any

from croniter import croniter

from .database import Database
from .errors import ValidationError, field_error
from .tools.times import now
from .values import EMAIL_RE, URL_RE

PARAMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS _params (
    id TEXT PRIMARY KEY NOT NULL,
    value JSON DEFAULT NULL,
    created TEXT DEFAULT '' NOT NULL,
    updated TEXT DEFAULT '' NOT NULL
);
"""
_KEY = "settings"
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")

DEFAULTS: dict[str, Any] = {
    "meta": {
        "appName": "Acme",
        "appURL": "http://localhost:8090",
        "senderName": "Support",
        "senderAddress": "support@example.com",
        "hideControls": False,
    },
    "logs": {"maxDays": 5, "minLevel": 0, "logIP": True, "logAuthId": False},
    "backups": {
        "cron": "",
        "cronMaxKeep": 3,
        # ours: how many safety copies of the data a full restore replaced are kept (0: none made)
        "preRestoreMaxKeep": 3,
        # ours (issue 15): restic's generations for scheduled backups (all 0: cronMaxKeep applies)
        "retention": {"keepLast": 0, "keepDaily": 0, "keepWeekly": 0, "keepMonthly": 0},
        # ours (issue 15): alerts to a webhook on failures, and when no backup succeeded for a while
        "notify": {"webhookURL": "", "onFailure": True, "staleAfterHours": 0},
        "s3": {"enabled": False, "bucket": "", "region": "", "endpoint": "", "accessKey": "", "secret": "",
               "forcePathStyle": False},
        # ours (issue 17): backups, safety copies and replica files age-encrypted to these public
        # keys ("age1..."); the passphrase (age's scrypt mode) is write-only, and refused for now
        # (see docs/pocketbase-differences.md).
        "encryption": {"recipients": [], "passphrase": ""},
        # ours (issue 16): data.db and auxiliary.db shipped continuously (server.replication), to
        # the local directory ``path`` when set, else the backup storage (S3 under replica/, or
        # pb_data/backups/replica); syncInterval in ms (0: a write waits for the replica),
        # retention and snapshotInterval in hours.
        "replication": {"enabled": False, "syncInterval": 1000, "retention": 72, "snapshotInterval": 24,
                        "path": ""},
    },
    "trustedProxy": {"headers": [], "useLeftmostIP": False},
}
_SECRETS = (("backups", "s3", "secret"), ("backups", "encryption", "passphrase"))
MAX_KEEP = 100_000
MAX_SYNC_INTERVAL_MS = 3_600_000
MAX_REPLICA_HOURS = 24 * 3660
MAX_STALE_HOURS = 24 * 366


def is_valid_cron(expression: str) -> bool:
    if expression in CRON_MACROS:
        return True
    return len(expression.split()) == 5 and croniter.is_valid(expression)


def _merge(base: dict[str, Any], patch: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Deep-merge the keys of ``patch`` that ``defaults`` knows; unknown keys are ignored."""
    for key, value in patch.items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], dict):
            if isinstance(value, dict):
                _merge(base[key], value, defaults[key])
            else:
                base[key] = value  # wrong shape: left for validation to report
        else:
            base[key] = value


class Settings:
    """The settings document; ``data`` always holds every key of ``DEFAULTS``."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.data: dict[str, Any] = copy.deepcopy(DEFAULTS)
        self._listeners: list[Any] = []
        self.data_root: Any = None  # pb_data (set by the App): a replica's path must be outside it

    def on_change(self, callback: Any) -> None:
        """``callback(settings)`` (sync or async) runs after each successful save."""
        self._listeners.append(callback)

    async def load(self) -> None:
        await self._db.execute(PARAMS_SCHEMA)
        raw = await self._db.scalar("SELECT value FROM _params WHERE id = ?", (_KEY,))
        data = copy.deepcopy(DEFAULTS)
        if raw:
            _merge(data, json.loads(raw), DEFAULTS)
        self.data = data

    def public(self) -> dict[str, Any]:
        """The settings as the API shows them: secrets removed."""
        out = copy.deepcopy(self.data)
        for path in _SECRETS:
            node = out
            for key in path[:-1]:
                node = node[key]
            node.pop(path[-1], None)
        return out

    async def update(self, patch: Any) -> dict[str, Any]:
        if not isinstance(patch, dict):
            raise ValidationError({}, "An error occurred while loading the submitted data.")
        candidate = copy.deepcopy(self.data)
        _merge(candidate, patch, DEFAULTS)
        errors = validate(candidate)
        path = None if errors else candidate["backups"]["replication"]["path"]
        if path and self.data_root is not None:
            from pathlib import Path

            resolved = Path(path).resolve()
            if resolved == Path(self.data_root) or Path(self.data_root) in resolved.parents:
                errors = {"backups": {"replication": {"path": field_error(
                    "validation_invalid_value", "Must be a directory outside the data directory (pb_data).")}}}
        if errors:
            raise ValidationError(errors, "An error occurred while saving the new settings.")
        stamp = now()
        await self._db.execute(
            "INSERT INTO _params (id, value, created, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET value = excluded.value, updated = excluded.updated",
            (_KEY, json.dumps(candidate), stamp, stamp),
        )
        self.data = candidate
        for callback in self._listeners:
            result = callback(self)
            if hasattr(result, "__await__"):
                await result
        return self.public()

    @property
    def app_name(self) -> str:
        return str(self.data["meta"]["appName"])


def validate(data: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, Any] = {}

    def put(section: str, key: str, code: str, message: str, sub: str | None = None) -> None:
        target = errors.setdefault(section, {})
        if sub is not None:
            target = target.setdefault(sub, {})
        target[key] = field_error(code, message)

    def check_types(section: str, node: Any, defaults: dict[str, Any], sub: str | None = None) -> bool:
        if not isinstance(node, dict):
            problem = field_error("validation_invalid_value", "Must be an object.")
            if sub is None:
                errors[section] = problem
            else:
                errors.setdefault(section, {})[sub] = problem
            return False
        for key, default in defaults.items():
            value = node.get(key)
            if isinstance(default, dict):
                continue
            ok = (
                isinstance(value, bool) if isinstance(default, bool)
                else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                else isinstance(value, list) if isinstance(default, list)
                else isinstance(value, str)
            )
            if not ok:
                put(section, key, "validation_invalid_value", "Invalid value type.", sub)
        return True

    for section, defaults in DEFAULTS.items():
        check_types(section, data.get(section), defaults)
    if errors:
        return errors
    meta = data["meta"]
    if not meta["appName"].strip():
        put("meta", "appName", "validation_required", "Cannot be blank.")
    elif len(meta["appName"]) > 255:
        put("meta", "appName", "validation_length_out_of_range", "The length must be between 1 and 255.")
    if not URL_RE.match(meta["appURL"]):
        put("meta", "appURL", "validation_is_url", "Must be a valid URL.")
    if meta["senderAddress"] and not EMAIL_RE.match(meta["senderAddress"]):
        put("meta", "senderAddress", "validation_is_email", "Must be a valid email address.")
    logs = data["logs"]
    if logs["maxDays"] < 0:
        put("logs", "maxDays", "validation_min_greater_equal_than_required", "Must be no less than 0.")
    backups = data["backups"]
    if backups["cron"] and not is_valid_cron(backups["cron"]):
        put("backups", "cron", "validation_invalid_cron",
            "Invalid cron expression - must be a valid macro or to have exactly 5 space separated segments.")
    if backups["cronMaxKeep"] < 0:
        put("backups", "cronMaxKeep", "validation_min_greater_equal_than_required", "Must be no less than 0.")
    if backups["preRestoreMaxKeep"] < 0:
        put("backups", "preRestoreMaxKeep", "validation_min_greater_equal_than_required", "Must be no less than 0.")
    retention = backups["retention"]
    if check_types("backups", retention, DEFAULTS["backups"]["retention"], sub="retention"):
        for key in DEFAULTS["backups"]["retention"]:
            value = retention[key]
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_KEEP:
                put("backups", key, "validation_out_of_range", f"Must be between 0 and {MAX_KEEP}.", sub="retention")
    notify = backups["notify"]
    if check_types("backups", notify, DEFAULTS["backups"]["notify"], sub="notify"):
        url = notify["webhookURL"]
        if isinstance(url, str) and url and (not URL_RE.match(url) or not url.lower().startswith(("http://", "https://"))):
            put("backups", "webhookURL", "validation_is_url", "Must be a valid http(s) URL.", sub="notify")
        hours = notify["staleAfterHours"]
        if isinstance(hours, int) and not isinstance(hours, bool) and not 0 <= hours <= MAX_STALE_HOURS:
            put("backups", "staleAfterHours", "validation_out_of_range", f"Must be between 0 and {MAX_STALE_HOURS}.",
                sub="notify")
    s3 = backups["s3"]
    if check_types("backups", s3, DEFAULTS["backups"]["s3"], sub="s3") and s3["enabled"]:
        for key in ("bucket", "region", "endpoint", "accessKey", "secret"):
            if not s3[key]:
                put("backups", key, "validation_required", "Cannot be blank.", sub="s3")
        if s3["endpoint"] and not URL_RE.match(s3["endpoint"]):
            put("backups", "endpoint", "validation_is_url", "Must be a valid URL.", sub="s3")
    encryption = backups["encryption"]
    if check_types("backups", encryption, DEFAULTS["backups"]["encryption"], sub="encryption"):
        from .backups.crypto import recipient_errors  # (pyrage: imported by those who use it)

        problem = recipient_errors(encryption["recipients"])
        if problem is not None:
            put("backups", "recipients", "validation_invalid_recipient", problem, sub="encryption")
        if isinstance(encryption["passphrase"], str) and encryption["passphrase"]:
            put("backups", "passphrase", "validation_not_supported",
                "Passphrase encryption is not available yet (the age library in use encrypts a passphrase "
                "file in memory only, and a backup is never held in memory): use recipients, e.g. the "
                "public key age-keygen prints.", sub="encryption")
    replication = backups["replication"]
    if check_types("backups", replication, DEFAULTS["backups"]["replication"], sub="replication"):
        def bounded(key: str, low: int, high: int) -> None:
            value = replication[key]
            if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
                put("backups", key, "validation_out_of_range", f"Must be between {low} and {high}.", sub="replication")

        bounded("syncInterval", 0, MAX_SYNC_INTERVAL_MS)
        bounded("retention", 1, MAX_REPLICA_HOURS)
        bounded("snapshotInterval", 1, MAX_REPLICA_HOURS)
        path = replication["path"]
        if isinstance(path, str) and path and (not path.startswith("/") or "\x00" in path):
            put("backups", "path", "validation_invalid_value", "Must be an absolute path.", sub="replication")
    proxy = data["trustedProxy"]
    if not all(isinstance(h, str) and h for h in proxy["headers"]):
        put("trustedProxy", "headers", "validation_invalid_value", "Must be a list of header names.")
    return errors
