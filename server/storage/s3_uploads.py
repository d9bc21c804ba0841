"""The record of unfinished S3 multipart uploads (no boto3 here: the manager makes it at start)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger("server.storage.s3")

RECORD_FILE = ".pb_s3_uploads.json"  # in pb_data: kept by a restore, never in a backup (a dot file)


class UploadRecords:
    """The multipart uploads this data directory has begun and not finished, in a JSON file.

    A writer adds its upload when S3 gives it an id and removes it once completed or aborted. What
    remains belongs to a process that was killed, or to an abort that failed: ``unowned`` lists
    those (for one endpoint and bucket) so that they are aborted instead of costing storage until
    a lifecycle rule. A writer records its key *before* asking S3 for an upload (``upload_id``
    ""), so that a process killed before it learnt the id still leaves a trace: the uploads of
    that key are then found by listing. ``path`` ``None``: kept in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._memory: list[dict[str, str]] = []
        self._owned: set[tuple[str, str, str]] = set()  # (endpoint, bucket, key) of this process's live writers

    def add(self, endpoint: str | None, bucket: str, key: str, upload_id: str = "") -> None:
        """Record an upload of ``key`` (its id, or "" before S3 gave one), owned by the caller."""
        with self._lock:
            self._owned.add((endpoint or "", bucket, key))
            record = self._record(endpoint, bucket, key, upload_id)
            records = [r for r in self._read() if r != self._record(endpoint, bucket, key, "")] if upload_id else self._read()
            self._write(records + [record])

    def remove(self, endpoint: str | None, bucket: str, key: str, upload_id: str) -> None:
        """The upload ``upload_id`` of ``key`` is completed or aborted: forget it (and its owner)."""
        with self._lock:
            self._owned.discard((endpoint or "", bucket, key))
            record = self._record(endpoint, bucket, key, upload_id)
            records = self._read()
            if record in records:
                self._write([r for r in records if r != record])

    def release(self, endpoint: str | None, bucket: str, key: str) -> None:
        """The writer of ``key`` gave up on its upload (its abort failed, or S3 never said whether it
        began one): anyone may abort it now."""
        with self._lock:
            self._owned.discard((endpoint or "", bucket, key))

    def unowned(self, endpoint: str | None, bucket: str) -> list[tuple[str, str]]:
        """``(key, upload id or "")`` of the recorded uploads to ``endpoint``/``bucket`` that no writer
        of this process owns."""
        with self._lock:
            return [(r["key"], r["uploadId"]) for r in self._read()
                    if r["endpoint"] == (endpoint or "") and r["bucket"] == bucket
                    and (r["endpoint"], r["bucket"], r["key"]) not in self._owned]

    @staticmethod
    def _record(endpoint: str | None, bucket: str, key: str, upload_id: str) -> dict[str, str]:
        return {"endpoint": endpoint or "", "bucket": bucket, "key": key, "uploadId": upload_id}

    def _read(self) -> list[dict[str, str]]:
        if self.path is None:
            return list(self._memory)
        try:
            records = json.loads(self.path.read_text())
            return [r for r in records if isinstance(r, dict) and {"endpoint", "bucket", "key", "uploadId"} <= set(r)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("the record of unfinished S3 uploads is unreadable (%s); starting a new one", exc)
            return []

    def _write(self, records: list[dict[str, str]]) -> None:
        if self.path is None:
            self._memory = records
            return
        try:
            if not records:
                self.path.unlink(missing_ok=True)
                return
            temp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(records, handle)
            os.replace(temp, self.path)
        except OSError as exc:  # a full disk must not fail the backup itself
            logger.warning("could not record unfinished S3 uploads (%s)", exc)
